"""The ``lightning-efficient`` command: a LightningCLI over every module, data module and technique.

Models, data, optimizers, LR schedulers, callbacks and strategies all come from YAML
``class_path`` blocks or command-line overrides::

    lightning-efficient fit -c configs/bert/small_mlm.yaml
    lightning-efficient fit -c configs/bert/small_mlm.yaml --trainer.max_steps 50 --model.init_args.preset tiny
    lightning-efficient predict -c configs/bert/small_mlm.yaml --ckpt_path runs/bert_small_mlm/checkpoints/last.ckpt
    lightning-efficient fit -c configs/bert/small_mlm.yaml -c configs/techniques/layer_drop.yaml  # runs/bert_small_mlm+layer_drop
    lightning-efficient plan -c configs/bert/small_mlm.yaml -c configs/techniques/layer_drop.yaml  # what that fit would do
    lightning-efficient compare runs/bert_small_mlm runs/bert_small_mlm+layer_drop   # see compare.py

On top of LightningCLI it
- names each run and writes everything under ``runs/<run name>``: ``--run_name``, or the base
  config's run with ``+<fragment>`` for each further ``-c`` file; a ``fit`` into a directory that
  holds a run stops at once unless ``--resume`` or ``--overwrite`` (:mod:`lightning_efficient.runs`);
- stacks fragments: a technique given by two files is merged into one, and the techniques run in
  their declared order whatever order the files list them in (:mod:`lightning_efficient.fragments`);
- ``plan`` (``fit --dry_run``) builds the run and prints what it would do without training
  (:mod:`lightning_efficient.plan`); every ``fit`` starts with a short block of the same facts;
- fills the model arguments that the data decides (``vocab_size``, ``num_labels``, ``label_names``,
  ``image_size``) when the YAML leaves them unset, from ``datamodule.model_arguments()``;
- with ``--ckpt_path``, takes the tokenizer from the checkpoint (so ``predict`` needs only the
  checkpoint) and fails early when the checkpoint was written by another model type;
- with ``model.init_args.pretrained`` (pretrain -> fine-tune), takes the tokenizer from that
  checkpoint, or from the ``tokenizer.json`` of that ``save_pretrained`` directory;
- reads every ``class_path`` of ours in its canonical spelling (:func:`canonical_class_paths`):
  a deprecated one (``lightning_efficient.callbacks.layer_drop.LayerDrop``,
  ``lightning_efficient.optim.LRScaling``) still loads, with a ``DeprecationWarning`` naming the new path;
- prints a mistake as one ``error:`` line and exits with status 2 (:func:`main`): a misspelled key
  with the nearest valid one, a value out of range, an unknown class, a ``--ckpt_path`` that is
  broken, of another model type, or pruned while the run has no pruning (:func:`check_ckpt_path`);
  ``--traceback`` or ``LIGHTNING_EFFICIENT_TRACEBACK=1`` shows the traceback instead;
- accepts a tensor-parallel (distributed) checkpoint's folder as ``--ckpt_path``;
- keeps the first screen quiet: "Epoch 0" rather than "Epoch 0/-2" for a ``max_steps`` run
  (:class:`StepProgressBar`), no column of zero FLOPs in the model summary
  (:class:`SummaryWithoutZeroFlops`), and known-harmless warnings hidden (:func:`hide_harmless_noise`).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import ActionYesNo, Namespace, get_loader, set_loader
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

from lightning_efficient import compare
from lightning_efficient.checkpoint import (
    DISTRIBUTED_METADATA,
    checkpoint_module_class,
    is_distributed_checkpoint,
    load_checkpoint,
    pruning_hint,
    trained_with_pruning,
)
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError, NonFiniteLossError, did_you_mean
from lightning_efficient.fragments import (
    callback_sources,
    check_strategy,
    compose_techniques,
    disagreements,
    setting_source,
)
from lightning_efficient.import_noise import hide_log_lines
from lightning_efficient.models.pretrained import tokenizer_source
from lightning_efficient.runs import (
    RUNS_DIR,
    check_run_directory,
    check_run_name,
    check_way_on,
    default_run_name,
    existing_checkpoints,
    move_outputs,
    output_paths,
    resume_checkpoint,
)
from lightning_efficient.technique import Technique

__all__ = [
    "HARMLESS_CLI_LOG_LINES",
    "HARMLESS_WARNINGS",
    "TRACEBACK_ENV",
    "EfficientCLI",
    "StepProgressBar",
    "SummaryWithoutZeroFlops",
    "canonical_class_paths",
    "check_ckpt_path",
    "exit_on_user_error",
    "hide_harmless_noise",
    "main",
    "short_parse_error",
    "user_error_message",
]


def _import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _accepts(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


#: Subpackages whose exports are the canonical spelling of their classes (techniques, strategies,
#: optimizers); other classes exported at the top level are spelled there.
CANONICAL_SUBPACKAGES = ("callbacks", "strategies", "optim")


@functools.cache
def _spellings() -> tuple[dict[str, str], frozenset[str]]:
    """Our public classes: name -> canonical path, and every valid path (``__all__`` of the top level or a subpackage)."""
    canonical: dict[str, str] = {}
    valid: set[str] = set()
    for subpackage in ("", *CANONICAL_SUBPACKAGES, "models", "data"):
        module = importlib.import_module(f"lightning_efficient.{subpackage}".rstrip("."))
        for name in module.__all__:
            if inspect.isclass(getattr(module, name)):
                valid.add(f"{module.__name__}.{name}")
                if name not in canonical or subpackage in CANONICAL_SUBPACKAGES:
                    canonical[name] = f"{module.__name__}.{name}"
    return canonical, frozenset(valid)


def canonical_class_paths(config: Any) -> Any:
    """Rewrite, in place, every deprecated spelling of our public classes in ``config``'s ``class_path`` values.

    Walks dicts, lists and jsonargparse ``Namespace`` s. A class has two valid spellings, which are
    left as they are: the top level (``lightning_efficient.BertMLM``) and its subpackage
    (``lightning_efficient.callbacks.LayerDrop``, the canonical one for techniques, strategies and
    optimizers). Any other path to the same class (a module-deep one, or a class that moved: a
    ``lightning_efficient.optim.LRScaling``) becomes the canonical path, with a
    ``DeprecationWarning`` naming it. Paths that are not ours, or do not import, are left alone.

    Examples:
        >>> config = {"trainer": {"callbacks": [{"class_path": "lightning_efficient.callbacks.layer_drop.LayerDrop"}]}}
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     config = canonical_class_paths(config)
        >>> config["trainer"]["callbacks"][0]["class_path"], str(caught[0].message)
        ('lightning_efficient.callbacks.LayerDrop', 'class_path lightning_efficient.callbacks.layer_drop.LayerDrop is deprecated; use lightning_efficient.callbacks.LayerDrop')
    """
    items = vars(config) if isinstance(config, Namespace) else config
    if isinstance(items, list):
        for item in items:
            canonical_class_paths(item)
    elif isinstance(items, dict):
        for key, value in items.items():
            if key == "class_path" and isinstance(value, str):
                items[key] = _canonical_class_path(value)
            else:
                canonical_class_paths(value)
    return config


def _canonical_class_path(class_path: str) -> str:
    """``class_path``, or the canonical path of the same class of ours, with a warning, if it is a deprecated one."""
    canonical, valid = _spellings()
    name = class_path.rpartition(".")[2]
    if not class_path.startswith("lightning_efficient.") or class_path in valid or name not in canonical:
        return class_path
    with warnings.catch_warnings():  # a moved name's own warning: ours names the class_path to change
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            same = _import_class(class_path) is _import_class(canonical[name])
        except (ImportError, AttributeError):
            return class_path  # not ours after all: LightningCLI reports it
    if not same:
        return class_path
    rank_zero_warn(f"class_path {class_path} is deprecated; use {canonical[name]}", category=DeprecationWarning)
    return canonical[name]


#: The parser mode of :class:`EfficientCLI`: YAML, with :func:`canonical_class_paths` applied to what is read.
PARSER_MODE = "lightning_efficient"


def _load_yaml(text: str) -> Any:
    return canonical_class_paths(get_loader("yaml")(text))


set_loader(PARSER_MODE, _load_yaml, exceptions=(yaml.YAMLError,))


def _read_config_file(file: str) -> dict[str, Any]:
    """A ``-c`` file's YAML as the CLI reads it (class paths canonical); an empty dict when it is not a mapping."""
    try:
        config = _load_yaml(Path(file).read_text())
    except (OSError, yaml.YAMLError):
        return {}  # a YAML string given to -c, or a file LightningCLI already reported
    return config if isinstance(config, dict) else {}


def _shown_path(file: str) -> str:
    """``file`` relative to the working directory when it lies below it, else as given (for messages)."""
    path = Path(file)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) if path.is_absolute() else file
    except ValueError:
        return file


def _is_first_process() -> bool:
    """Whether this is the first process of a run (rank 0 of its node and of the job, as the launchers set it)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


#: Checkpoint names that Lightning resolves itself (``--ckpt_path last``), and so are not checked here.
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")


def _configured_classes(callbacks: Any) -> list[type]:
    """The classes named by the ``class_path`` of parsed (not yet built) callbacks; those that do not import are left out."""
    items = callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []
    classes = []
    for item in items:
        class_path = item.get("class_path") if isinstance(item, (dict, Namespace)) else None
        try:
            classes.append(_import_class(class_path))
        except (ImportError, AttributeError, ValueError, TypeError):
            continue  # LightningCLI reports it
    return classes


def check_callback_sources(callbacks: Any) -> None:
    """Before anything is built, let each configured technique check the files it will read (``check_sources``).

    So a missing teacher fails at once, not after the data module has trained its tokenizer.
    """
    for callback in callbacks or []:
        class_path = getattr(callback, "class_path", None) or (
            callback.get("class_path") if isinstance(callback, dict) else None
        )
        if not class_path:
            continue
        check = getattr(_import_class(class_path), "check_sources", None)
        if callable(check):
            init_args = (
                callback.get("init_args") if isinstance(callback, dict) else getattr(callback, "init_args", None)
            )
            check(dict(vars(init_args) if isinstance(init_args, Namespace) else init_args or {}))


def _is_sharded_strategy(strategy: Any) -> bool:
    """Whether a parsed ``trainer.strategy`` (a name, or a ``class_path`` config) loads distributed checkpoints."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class_path = strategy.get("class_path") if isinstance(strategy, dict) else getattr(strategy, "class_path", None)
    if isinstance(strategy, ModelParallelStrategy):
        return True
    return class_path is not None and issubclass(_import_class(class_path), ModelParallelStrategy)


def check_ckpt_path(
    ckpt_path: str, model_class_path: str | None = None, callbacks: Any = None, strategy: Any = None
) -> None:
    """Fail before anything is built when ``--ckpt_path`` cannot be loaded by this run.

    Reads the checkpoint's metadata only (memory-mapped; a distributed checkpoint's folder gives its
    ``meta.pt``). Lightning's own names (``last``, ``best``, ``hpc``, ``registry:...``) and remote paths
    are left to Lightning.

    Args:
        ckpt_path: The ``--ckpt_path`` given: a checkpoint file, or a distributed checkpoint's folder.
        model_class_path: The run's ``model.class_path`` (None: not checked against the checkpoint's).
        callbacks: The run's parsed ``trainer.callbacks``.
        strategy: The run's parsed ``trainer.strategy`` (None: not checked).

    Raises:
        CheckpointMismatchError: Nothing is at ``ckpt_path``; another model type wrote it; it was
            trained with MagnitudePruning or sparse training (it holds weight masks) and this run has no
            technique that masks weights; it is a distributed checkpoint (a folder of shards) and the
            run's strategy cannot load one.
        CorruptCheckpointError: The file is truncated or not a checkpoint; a folder is not a distributed checkpoint.

    Examples:
        >>> check_ckpt_path("runs/nowhere.ckpt")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.CheckpointMismatchError: ckpt_path 'runs/nowhere.ckpt' does not exist
    """
    if ckpt_path in LIGHTNING_CKPT_NAMES or ckpt_path.startswith("registry") or "://" in ckpt_path:
        return
    path = Path(ckpt_path)
    if not path.exists():
        raise CheckpointMismatchError(f"ckpt_path {ckpt_path!r} does not exist")
    checkpoint = load_checkpoint(path, mmap=True)  # no tensor is read
    written_by = checkpoint_module_class(checkpoint)
    expected = model_class_path.rpartition(".")[2] if model_class_path else None
    if written_by is not None and expected is not None and written_by != expected:
        raise CheckpointMismatchError(
            f"checkpoint {ckpt_path!r} was written by {written_by}, but this run's model is {expected}; "
            f"use a {written_by} config with it, or a {expected} checkpoint"
        )
    if strategy is not None and is_distributed_checkpoint(path) and not _is_sharded_strategy(strategy):
        raise CheckpointMismatchError(
            f"{ckpt_path!r} is a distributed checkpoint (a folder of shards), which only a sharded strategy loads; "
            "use the strategy fragment that wrote it (e.g. -c configs/techniques/fsdp.yaml), or make it one file "
            f"first: python -m lightning.fabric.utilities.consolidate_checkpoint {ckpt_path} "
            f"(then --ckpt_path {ckpt_path}.consolidated)"
        )
    masking = any(issubclass(cls, Technique) and cls.masks_weights for cls in _configured_classes(callbacks))
    if trained_with_pruning(checkpoint) and not masking:
        raise CheckpointMismatchError(pruning_hint(ckpt_path))


# -- errors a person can read ---------------------------------------------------------------------
#: Set to 1 to see the full traceback of a configuration error (as ``--traceback`` does).
TRACEBACK_ENV = "LIGHTNING_EFFICIENT_TRACEBACK"


def _init_arguments(class_path: str) -> list[str]:
    """The ``__init__`` argument names of the class at ``class_path`` (none when it does not import)."""
    try:
        return [name for name in inspect.signature(_import_class(class_path).__init__).parameters if name != "self"]
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def _class_paths_near(class_path: str) -> list[str]:
    """Class paths a misspelled ``class_path`` may have meant: ours, and the classes of its module."""
    module_name = class_path.rpartition(".")[0]
    candidates = set(_spellings()[1])
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return sorted(candidates)
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    return sorted(
        candidates | {f"{module_name}.{name}" for name in names if inspect.isclass(getattr(module, name, None))}
    )


def _top_level_items(text: str) -> list[str]:
    """``text`` split at the commas outside brackets: ``"dict[str, str], None"`` -> ``["dict[str, str]", "None"]``."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    return [*items, current.strip()]


def _nested_value_error(message: str) -> str | None:
    """For a bad value inside a class's arguments (at any depth): that class, the argument and what it accepts.

    None when the innermost class named does not import (then the class path itself is the problem).

    Examples:
        >>> message = (
        ...     "Problem with given class_path 'lightning_efficient.TextClassificationDataModule': "
        ...     'Parser key "label_map": Subtypes: [dict[str, str], <class "NoneType">]'
        ... )
        >>> _nested_value_error(message)
        "lightning_efficient.TextClassificationDataModule's label_map: the value given is not a dict[str, str] or NoneType"
    """
    class_paths = re.findall(r"Problem with given class_path '([\w.]+)'", message)
    keys = re.findall(r'Parser key "([\w.]+)":', message)
    if not class_paths or not keys:
        return None
    try:
        _import_class(class_paths[-1])
    except (ImportError, AttributeError, ValueError):
        return None
    tail = message[message.rindex(f'Parser key "{keys[-1]}":') :]
    subtypes = re.search(r"Subtypes: \[(.+)\]", tail)
    expected = re.search(r"Expected a (.+?)(?:\.|$)", tail, re.MULTILINE)
    kinds = _top_level_items(subtypes.group(1)) if subtypes else [expected.group(1)] if expected else ["declared type"]
    accepted = " or ".join(re.sub(r"""<class ['"]([\w.]+)['"]>""", r"\1", kind) for kind in kinds)
    return f"{class_paths[-1]}'s {keys[-1]}: the value given is not a {accepted}"


def short_parse_error(message: str, keys: Iterable[str] = ()) -> str:
    """One line for a jsonargparse error: the bad key or value, what is allowed, the nearest valid key.

    Args:
        message: jsonargparse's message (often a dozen lines listing every type it tried).
        keys: The valid option keys of the parser (``trainer.max_steps``, ...), for suggestions.

    Examples:
        >>> short_parse_error("unrecognized arguments: --trainer.max_stepz 3", ["trainer.max_steps", "trainer.min_steps"])
        "unknown option 'trainer.max_stepz'; did you mean 'trainer.max_steps'?"
        >>> short_parse_error('Parser key "trainer.max_steps":\\n  Expected a <class \\'int\\'>. Got value: abc')
        "trainer.max_steps='abc' must be an int"
    """
    unknown = re.search(r"unrecognized arguments: -*([^\s=]+)", message) or re.search(
        r"does not accept option '([^']+)'", message
    )
    if unknown:
        key = unknown.group(1)
        return f"unknown option {key!r}" + did_you_mean(key, keys)
    problem = re.search(r"Problem with given class_path '([\w.]+)':\s*(.+)", message)
    if problem:
        class_path, detail = problem.group(1), problem.group(2).strip()
        option = re.search(r"Option '(\w+)' is not accepted", detail)
        if option:
            name = option.group(1)
            return f"{class_path} has no argument {name!r}" + did_you_mean(name, _init_arguments(class_path))
        nested = _nested_value_error(message)
        if nested:
            return nested
        return f"class_path {class_path!r} cannot be imported ({detail})" + did_you_mean(
            class_path, _class_paths_near(class_path)
        )
    expected = re.search(r'Parser key "([\w.]+)":\s*Expected a (.+?)\. Got value: (.+)', message)
    if expected:
        key, kind, value = expected.groups()
        kind = re.sub(r"<class '([\w.]+)'>", r"\1", kind)
        return f"{key}={value.strip()!r} must be {'an' if kind[:1] in 'aeiou' else 'a'} {kind}"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines[:3])


def user_error_message(error: BaseException) -> str | None:
    """The message of an error the user fixes in their config or command line; None for any other (a bug).

    Our :class:`~lightning_efficient.errors.ConfigurationError` s (also when jsonargparse wrapped one
    while building a class), Lightning's ``MisconfigurationException`` and parse errors qualify.

    Examples:
        >>> user_error_message(ValueError("wrapped")) is None
        True
        >>> try:
        ...     raise ValueError("Does not validate against any of the Union subtypes") from ConfigurationError("rate=2")
        ... except ValueError as error:
        ...     user_error_message(error)
        'rate=2'
    """
    while error is not None:
        if isinstance(error, (ConfigurationError, MisconfigurationException)):
            return str(error)
        if isinstance(error, argparse.ArgumentError):
            return short_parse_error(str(error))
        error = error.__cause__
    return None


def exit_on_user_error(error: BaseException, show_traceback: bool = False, hint: str = "") -> NoReturn:
    """Print a mistake the user fixes (:func:`user_error_message`) as one ``error:`` line and exit with status 2.

    Re-raises ``error`` itself when it is not such a mistake (a bug: its traceback helps) or when
    ``show_traceback``. Every command of the package ends this way (``fit``, ``pipeline``, ``measure``).

    Args:
        error: The exception being handled.
        show_traceback: Raise it instead (``--traceback``, ``LIGHTNING_EFFICIENT_TRACEBACK=1``).
        hint: A second line, e.g. how to see the traceback.
    """
    message = user_error_message(error)
    if message is None or show_traceback:
        raise error
    sys.stderr.write(f"error: {message}\n" + (f"{hint}\n" if hint else ""))
    raise SystemExit(2) from None


# -- a quieter first screen -----------------------------------------------------------------------
#: Known-harmless warnings the CLI hides (and nothing else does): (category, message regex, emitting module regex).
HARMLESS_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
)


#: Log lines the CLI hides: (logger, message regex). Lightning advertises a cloud logger at every fit.
HARMLESS_CLI_LOG_LINES = (("lightning.pytorch.utilities.rank_zero", r"💡 Tip: For seamless cloud logging"),)


def hide_harmless_noise() -> None:
    """Hide :data:`HARMLESS_WARNINGS` and :data:`HARMLESS_CLI_LOG_LINES` (the CLI calls it).

    The package's import already hid the log lines of :mod:`lightning_efficient.import_noise`.
    """
    for category, message, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    hide_log_lines(HARMLESS_CLI_LOG_LINES)


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, reading "Epoch 0" instead of "Epoch 0/-2" when only ``max_steps`` bounds training.

    It leaves out Lightning's ``v_num`` (the logger's version: the last four letters of the run
    name, which the first screen prints whole).
    """

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            description += f"/{self.trainer.max_epochs - 1}"
        return f"{description:{len(self.validation_description)}}"  # as wide as "Validation": no flicker


class SummaryWithoutZeroFlops(ModelSummary):
    """Lightning's model summary, without the FLOPs column and "Total Flops 0" when it counted none.

    Lightning counts FLOPs only for a module with an ``example_input_array``; ours have none (the
    :class:`~lightning_efficient.EfficiencyMonitor` reports measured FLOPs per step instead).
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if total_flops:
            ModelSummary.summarize(
                summary_data, total_parameters, trainable_parameters, model_size, total_training_modes, total_flops
            )
            return
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, 0, *columns
        )
        rank_zero_info("\n" + table.rpartition("\n")[0])  # its last line is the FLOPs total


def _plain(value: Any) -> Any:
    """``value`` with jsonargparse Namespaces as dicts and paths as strings (JSON-serialisable where they are)."""
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _adapter_technique(adapter: str, callbacks: list[Any]) -> Any:
    """``--adapter``: set the run's ParameterEfficientTuning to apply ``adapter``, or build one from the checkpoint.

    Returns:
        The technique to add to the callbacks, or None when the configured one now applies ``adapter``.

    Raises:
        ConfigurationError: The configured technique already names another ``adapter``.
    """
    from lightning_efficient.callbacks.parameter_efficient import ParameterEfficientTuning

    configured = [cb for cb in callbacks if isinstance(cb, ParameterEfficientTuning)]
    if not configured:
        return ParameterEfficientTuning.from_checkpoint(adapter)
    technique = configured[0]
    if technique.adapter and technique.adapter != adapter:
        raise ConfigurationError(
            f"--adapter {adapter!r} and ParameterEfficientTuning(adapter={technique.adapter!r}) disagree; give one"
        )
    technique.adapter = adapter
    return None


class EfficientCLI(LightningCLI):
    """LightningCLI with data-derived model arguments and checkpoint-aware tokenizers (see module doc)."""

    #: Whether parsing also checks the files the run will read (``--ckpt_path``, a technique's
    #: ``check_sources``) and the run directory; a pipeline's dry run checks configs whose inputs do not exist yet.
    check_inputs: bool = True
    #: The run's directory (:mod:`~lightning_efficient.runs`); None when the config names no run.
    run_directory: str | None = None
    #: The technique callbacks in the order they run, each with the ``-c`` file(s) that gave it.
    techniques: Sequence[Any] = ()
    #: How the ``-c`` files were stacked: techniques merged, settings two fragments disagree on.
    notes: Sequence[str] = ()

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        if not sys.warnoptions:  # Python hides DeprecationWarning; show ours (deprecated class paths) unless -W says
            warnings.filterwarnings("default", category=DeprecationWarning, module=re.escape(__name__))
        super().__init__(**kwargs)

    def init_parser(self, **kwargs: Any) -> Any:
        """LightningCLI's parser, reading YAML through :func:`canonical_class_paths` (``PARSER_MODE``).

        A parse error raises (``exit_on_error=False``) instead of printing the usage and exiting:
        :meth:`parse_arguments` turns it into a one-line :class:`ConfigurationError`.
        """
        kwargs.setdefault("parser_mode", PARSER_MODE)
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    @staticmethod
    def configure_optimizers(lightning_module: Any, optimizer: torch.optim.Optimizer, lr_scheduler: Any = None) -> Any:
        """An ``optimizer:`` from YAML without an ``lr_scheduler:`` keeps our modules' warmup-and-decay schedule.

        LightningCLI would otherwise train at a constant LR; with an ``lr_scheduler:`` block, or on
        a module that is not one of ours, LightningCLI's own behaviour applies.
        """
        from lightning_efficient.models.base import EfficientModule

        if lr_scheduler is None and isinstance(lightning_module, EfficientModule):
            return {"optimizer": optimizer, "lr_scheduler": lightning_module.lr_scheduler_config(optimizer)}
        return LightningCLI.configure_optimizers(lightning_module, optimizer, lr_scheduler)

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Our options, on every subcommand.

        ``--adapter <adapter checkpoint>`` applies a ParameterEfficientTuning adapter to the run's base;
        ``--run_name``, ``--resume``, ``--overwrite`` say where the run writes and what happens when a
        run is there already (:mod:`lightning_efficient.runs`); ``--dry_run`` (``plan``) prints what
        ``fit`` would do and stops (``--plan_format json`` for tools).
        """
        parser.add_argument(
            "--adapter",
            type=str | None,
            default=None,
            help="an adapter checkpoint of ParameterEfficientTuning (adapter_only): applied to the model's base, "
            "which the config builds (model.init_args.pretrained)",
        )
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="the run's name: it writes under runs/<run_name> (default: the base config's run, then "
            "+<fragment> for each further -c file, e.g. bert_small_mlm+layer_drop)",
        )
        parser.add_argument(
            "--resume", action=ActionYesNo, default=False, help="fit: continue from the run directory's last.ckpt"
        )
        parser.add_argument(
            "--overwrite",
            action=ActionYesNo,
            default=False,
            help="fit: delete what the run directory holds and start over",
        )
        parser.add_argument(
            "--dry_run",
            action=ActionYesNo,
            default=False,
            help="fit: build everything, print the plan (techniques in order, FLOPs, memory, time, "
            "where it writes) and stop; `lightning-efficient plan` is the same",
        )
        parser.add_argument(
            "--plan_format", type=Literal["text", "json"], default="text", help="the plan's format (--dry_run)"
        )

    def _subcommand_config(self) -> Any:
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """LightningCLI's parsing; a parse error becomes one line (:func:`short_parse_error`), then ``--ckpt_path`` is checked.

        Raises:
            ConfigurationError: A parse error: an unknown option (with the nearest valid one), a value of
                the wrong type, a ``class_path`` that does not import.
            CheckpointMismatchError: See :func:`check_ckpt_path`.
            ConfigurationError: A bad run name, a technique conflict (:mod:`lightning_efficient.fragments`),
                or a ``fit`` into a directory that holds a run (:func:`~lightning_efficient.runs.check_run_directory`).
        """
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as error:
            raise ConfigurationError(short_parse_error(str(error), self._option_keys(args))) from error
        canonical_class_paths(self.config)  # what the YAML loader did not see: dict args, command-line strings
        config = self._subcommand_config()
        self._compose(config)
        if not self.check_inputs:
            return
        check_way_on(bool(config.get("resume")), bool(config.get("overwrite")))
        if self.config.get("subcommand") == "fit" and not config.get("dry_run"):
            self._check_run_directory(config)
        if self.config.get("subcommand") == "fit":
            check_callback_sources((config.get("trainer") or {}).get("callbacks"))
        if config.get("adapter") and not Path(config["adapter"]).is_file():
            raise CheckpointMismatchError(f"--adapter {config['adapter']!r} does not exist")
        ckpt_path = config.get("ckpt_path")
        if ckpt_path:
            model = config.get("model")
            trainer = config.get("trainer") or {}
            check_ckpt_path(
                str(ckpt_path),
                getattr(model, "class_path", None),
                trainer.get("callbacks"),
                trainer.get("strategy") or "auto",
            )

    def _compose(self, config: Any) -> None:
        """Name the run and move its outputs (:mod:`~lightning_efficient.runs`); merge and sort its techniques (:mod:`~lightning_efficient.fragments`)."""
        files = [_shown_path(str(path)) for path in config.get("config") or []]
        read = [(file, _read_config_file(file)) for file in files]
        trainer = config.get("trainer")
        if trainer is None:
            return
        base_root = (read[0][1].get("trainer") or {}).get("default_root_dir") if read else None
        root = trainer.get("default_root_dir")
        if config.get("run_name") is not None:
            name = check_run_name(config["run_name"])
        elif root and root != base_root:  # set on the command line or by a fragment: that directory, as given
            name = Path(root).name
        else:
            name = default_run_name(base_root, files[1:])
        self.run_directory = None
        if name is not None:
            directory = str(Path(root).parent / name) if root else str(Path(RUNS_DIR) / name)
            move_outputs(trainer, [base_root, root], directory, version=name)
            config["run_name"], self.run_directory = name, directory
        callbacks, notes = compose_techniques(trainer.get("callbacks"), callback_sources(read))
        if trainer.get("callbacks") is not None:
            trainer["callbacks"] = [callback.entry for callback in callbacks]
        self.techniques = [callback for callback in callbacks if callback.technique_class() is not None]
        check_strategy(trainer.get("strategy"), self.techniques, setting_source(read, "trainer.strategy"))
        self.notes = notes + disagreements(read[1:])

    def _check_run_directory(self, config: Any) -> None:
        """Stop a fit whose directory holds a run, unless ``--resume`` (which sets ``ckpt_path``) or ``--overwrite``."""
        resume, overwrite = config.get("resume"), config.get("overwrite")
        if self.run_directory is None:
            if resume or overwrite:
                raise ConfigurationError(
                    "--resume and --overwrite need a run directory: set trainer.default_root_dir or --run_name"
                )
            return
        if config.get("ckpt_path"):
            if resume:
                raise ConfigurationError("--resume and --ckpt_path both say where to continue from; give one")
            return  # continuing from a checkpoint the user names
        checkpoint_dirs = [mapping[key] for mapping, key in output_paths(config["trainer"]) if key == "dirpath"]
        if not _is_first_process():  # the first process decided (and deleted, with --overwrite); the others follow
            found = resume_checkpoint(checkpoint_dirs, self.run_directory) if resume else None
        else:
            found = check_run_directory(self.run_directory, checkpoint_dirs, bool(resume), bool(overwrite))
            if resume and found is None:
                rank_zero_info(f"--resume: {self.run_directory} holds no last.ckpt yet; starting the run")
        config["resume"] = config["overwrite"] = False  # acted on: the saved config.yaml must not delete its own run
        if found is not None:
            config["ckpt_path"] = str(found)
            # Lightning warns that the checkpoint folder is not empty: continuing it is what --resume asked for
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

    def _option_keys(self, args: Any) -> list[str]:
        """The option keys of the subcommand named in ``args`` (all subcommands' when none is), for suggestions."""
        parsers = getattr(self, "_subcommand_parsers", {})
        words = sys.argv[1:] if args is None else args if isinstance(args, list) else []
        chosen = [parsers[word] for word in words if word in parsers][:1] or list(parsers.values()) or [self.parser]
        return sorted({action.dest for parser in chosen for action in parser._actions if "." in action.dest})

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        data, model = config.get("data"), config.get("model")
        if data is None or model is None or not getattr(data, "class_path", None):
            return
        data_cls = _import_class(data.class_path)
        inner = data.init_args.get("datamodule") if _accepts(data_cls, "datamodule") else None
        if getattr(inner, "class_path", None):  # a wrapper (TransferSetAugmentation): its inner module reads the text
            data, data_cls = inner, _import_class(inner.class_path)
        if not _accepts(data_cls, "tokenizer") or data.init_args.get("tokenizer"):
            return
        pretrained = (  # the weights the model starts from bring their tokenizer (a BiLSTM: its embeddings')
            model.init_args.get("pretrained")
            or model.init_args.get("pretrained_checkpoint")
            or model.init_args.get("embeddings_from")
        )
        source = config.get("ckpt_path") or tokenizer_source(pretrained)  # a .ckpt, or a directory's tokenizer.json
        if source and is_distributed_checkpoint(source):
            source = Path(source) / DISTRIBUTED_METADATA  # a tensor-parallel checkpoint: its metadata file
        if source:
            data.init_args.tokenizer = str(source)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """LightningCLI's Trainer, with :class:`StepProgressBar` and :class:`SummaryWithoutZeroFlops` as defaults.

        Each replaces Lightning's default only where the config names no progress bar (model
        summary) of its own and does not turn it off.
        """
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        given = config.get("callbacks")
        given = [] if given is None else given if isinstance(given, list) else [given]
        added = []
        wants_bar = _RICH_AVAILABLE and config.get("enable_progress_bar") is not False
        if wants_bar and not config.get("barebones") and not any(isinstance(c, ProgressBar) for c in given):
            added.append(StepProgressBar())
        wants_summary = config.get("enable_model_summary") is not False
        if wants_summary and not config.get("barebones") and not any(isinstance(c, ModelSummary) for c in given):
            added.append(SummaryWithoutZeroFlops())
            kwargs["enable_model_summary"] = False  # Lightning adds no default beside ours, and says nothing about it
        adapter = self._subcommand_config().get("adapter")
        technique = _adapter_technique(str(adapter), given) if adapter else None
        if technique is not None:
            added.append(technique)
        if added:
            kwargs["callbacks"] = [*given, *added]
        return super().instantiate_trainer(**kwargs)

    def plan(self) -> Any:
        """The :class:`~lightning_efficient.plan.RunPlan` of the built run: what ``fit`` would do, measured without training."""
        from lightning_efficient.plan import build_plan

        config = self._subcommand_config()
        directories = list(dict.fromkeys(c.dirpath for c in self.trainer.checkpoint_callbacks if c.dirpath))
        logger = self.trainer.logger
        log_dir = getattr(logger, "log_dir", None) or self.trainer.default_root_dir
        found = existing_checkpoints([self.run_directory, *directories]) if self.run_directory else []
        run = {
            "name": config.get("run_name"),
            "directory": self.run_directory,
            "writes": {
                "checkpoints": [str(directory) for directory in directories],
                "tensorboard": getattr(logger, "save_dir", None) if logger is not None else None,
                "config": str(Path(log_dir) / "config.yaml"),
                "efficiency": str(Path(log_dir) / "efficiency.json"),
            },
            "existing_checkpoint": str(found[0]) if found and not config.get("ckpt_path") else None,
        }
        techniques = [
            {
                "name": callback.technique_class().name,
                "class_path": callback.class_path,
                "source": " + ".join([callback.source, *callback.merged_from]),
                "arguments": _plain(callback.arguments()),
            }
            for callback in self.techniques
        ]
        return build_plan(self.trainer, self.model, self.datamodule, run, techniques, list(self.notes))

    def _run_subcommand(self, subcommand: str) -> None:
        """``fit --dry_run``: print the plan and stop; ``fit``: print the plan's summary block, then fit."""
        config = self._subcommand_config()
        if subcommand == "fit" and config.get("dry_run"):
            plan = self.plan()
            print(json.dumps(plan.to_dict(), indent=2) if config.get("plan_format") == "json" else plan.text())
            return
        if subcommand == "fit" and _is_first_process():
            print(self.plan().summary_block(), flush=True)
        super()._run_subcommand(subcommand)

    def instantiate_classes(self) -> None:
        config = self._subcommand_config()
        data_cfg, model_cfg = config.get("data"), config.get("model")
        datamodule = None
        if data_cfg is not None and model_cfg is not None and getattr(data_cfg, "class_path", None):
            data_cls = _import_class(data_cfg.class_path)
            model_cls = _import_class(model_cfg.class_path)
            provided = getattr(data_cls, "model_argument_names", ())
            unset = [
                k for k, v in model_cfg.init_args.items() if v is None and k in provided and _accepts(model_cls, k)
            ]
            if unset:  # none, e.g., in predict --ckpt_path: the checkpoint's hyperparameters already set them
                # Through the parser, so nested classes (TransferSetAugmentation's datamodule) are built too;
                # that dumps the config before the model's arguments are filled: drop the stale dump.
                datamodule = self._parser(self.config.get("subcommand")).instantiate(Namespace(data=data_cfg)).data
                self.__dict__.pop("config_dump", None)
                for name, value in datamodule.model_arguments().items():
                    if name in unset:
                        model_cfg.init_args[name] = value
        if datamodule is None:
            super().instantiate_classes()
            return
        # The data module is built once: this instance, which already resolved its tokenizer (from a
        # checkpoint's metadata or by training it) and read its files. LightningCLI instantiates the
        # rest with the data left out, and the config keeps its data section (config.yaml).
        config["data"] = None
        try:
            super().instantiate_classes()
        finally:
            config["data"] = data_cfg
        self.datamodule = datamodule
        subcommand = self.config_init.get("subcommand")
        (self.config_init[subcommand] if subcommand else self.config_init)["data"] = datamodule


_COMPARE_EPILOG = (
    "`lightning-efficient plan -c CONFIG [-c FRAGMENT ...] [--format json]` prints what `fit` would do "
    "(`fit --dry_run`). Two more subcommands, outside LightningCLI: `lightning-efficient compare RUN_DIR RUN_DIR ... "
    "[--output PNG] [--json]` puts the efficiency summaries of several runs side by side "
    "(see `lightning-efficient compare --help`); `lightning-efficient pipeline -c PIPELINE.yaml` runs "
    "a pipeline of stages (see `lightning-efficient pipeline --help`)."
)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-efficient`` console script.

    ``compare`` goes to :func:`lightning_efficient.compare.main` and ``pipeline`` to
    :func:`lightning_efficient.pipeline.command.main` before LightningCLI sees the arguments; ``plan``
    is ``fit --dry_run`` (its ``--format`` is ``--plan_format``); every other subcommand (``fit``,
    ``validate``, ``test``, ``predict``) goes to :class:`EfficientCLI`.

    A mistake in the config or on the command line (:func:`user_error_message`: a misspelled key,
    a value out of range, an unknown class, a checkpoint that does not fit) prints one short
    ``error:`` message and exits with status 2; ``--traceback`` (taken out of the arguments here)
    or ``LIGHTNING_EFFICIENT_TRACEBACK=1`` shows the full traceback instead. Known-harmless
    warnings are hidden (:func:`hide_harmless_noise`).

    Args:
        args: The arguments (default: ``sys.argv[1:]``).
    """
    argv = sys.argv[1:] if args is None else list(args)
    show_traceback = "--traceback" in argv or os.environ.get(TRACEBACK_ENV, "0") not in ("", "0")
    argv = [arg for arg in argv if arg != "--traceback"]
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself (and warns when it is given both)
    if argv[:1] == ["compare"]:
        compare.main(argv[1:])
        return
    if argv[:1] == ["plan"]:  # `fit --dry_run`, with `--format` for `--plan_format`
        argv = ["fit", *("--plan_format" if arg == "--format" else arg for arg in argv[1:]), "--dry_run"]
        if args is None:
            sys.argv[1:] = argv
    if argv[:1] == ["pipeline"]:
        from lightning_efficient.pipeline.command import main as pipeline_main

        pipeline_main(argv[1:], show_traceback=show_traceback)
        return
    hide_harmless_noise()
    try:
        EfficientCLI(args=None if args is None else argv, parser_kwargs={"epilog": _COMPARE_EPILOG})
    except NonFiniteLossError as error:  # the run failed (not the command): its message says why and what to do
        if show_traceback:
            raise
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(1) from None
    except Exception as error:  # noqa: BLE001 (exit_on_user_error re-raises anything but a user's mistake)
        exit_on_user_error(error, show_traceback, hint="(run again with --traceback to see where it was raised)")


if __name__ == "__main__":
    main()
