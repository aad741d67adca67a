"""A stage's run: its config composed and written, its commands, and how it starts from another stage.

Each branch of a stage (:class:`~lightning_efficient.pipeline.spec.StageRun`) becomes a
:class:`StagePlan`: one ordinary run's full YAML, written to ``runs/<pipeline>/<name>/stage.yaml``
and run as ``lightning-efficient <subcommand> -c runs/<pipeline>/<name>/stage.yaml``, so any
strategy, accelerator and technique works inside a stage exactly as it does alone.

The config is composed like LightningCLI composes ``-c base.yaml -c fragment.yaml``
(mappings merge, ``key+:`` appends to a list, another ``class_path`` replaces the block), then the
stage's overrides and sweep choices are set, then:

- every path under the base config's ``trainer.default_root_dir`` moves to the stage's directory
  (TensorBoard logs, checkpoints, predictions): the pipeline owns these names, so a rerun finds them;
- a fit gets an :class:`~lightning_efficient.EfficiencyMonitor` and a
  :class:`~lightning_efficient.LastCheckpoint` when its config has none (the report reads the one,
  the next stage and a resume read the other);
- the budget becomes a :class:`~lightning_efficient.FlopBudget` callback (``flops``; the epoch limit is
  lifted and ``max_steps`` becomes an upper bound of 10^7 unless the stage sets it), ``trainer.max_time``
  (``seconds``) or ``trainer.max_steps`` (``steps``);
- ``from:`` wires the source's final checkpoint in, as the stage's kind says (:data:`STAGE_KINDS`):
  ``fit`` starts the model from it (``model.init_args.pretrained``, with the source's shape),
  ``distil`` makes it the :class:`~lightning_efficient.callbacks.Distillation` teacher, ``ticket``
  makes it the :class:`~lightning_efficient.callbacks.LotteryTicket`'s ticket (the next round of a
  lottery-ticket experiment, the source's shape), ``validate``, ``test`` and ``predict`` load it (``ckpt_path``).

Stage kinds are open: :func:`register_stage_kind` adds one.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_efficient.errors import ConfigurationError
from lightning_efficient.pipeline.spec import SHAPE_KEYS, PipelineSpec, StageRun, expand

__all__ = [
    "CHECKPOINT_NAME",
    "STAGE_FILE",
    "STAGE_KINDS",
    "UNBOUNDED_STEPS",
    "StageKind",
    "StagePlan",
    "get_value",
    "merge_config",
    "plan_stages",
    "python_command",
    "register_stage_kind",
    "set_value",
]

#: The composed config of a stage, in its directory.
STAGE_FILE = "stage.yaml"
#: The final checkpoint of a fit stage, in its ``LastCheckpoint``'s folder.
CHECKPOINT_NAME = "last.ckpt"
#: ``trainer.max_steps`` of a fit under a FLOP budget when the stage does not set it (the budget stops it).
UNBOUNDED_STEPS = 10_000_000
_MONITOR = "lightning_efficient.EfficiencyMonitor"
_LAST = "lightning_efficient.LastCheckpoint"
_BUDGET = "lightning_efficient.FlopBudget"
_DISTILLATION = "lightning_efficient.callbacks.Distillation"
_LOTTERY_TICKET = "lightning_efficient.callbacks.LotteryTicket"


# -- config paths -----------------------------------------------------------------------------------
def _parts(key: str) -> list[tuple[str, str | None]]:
    """``"trainer.callbacks[LastCheckpoint].init_args.dirpath"`` -> ``[(trainer, None), (callbacks, LastCheckpoint), ...]``."""
    parts = []
    for part in key.split("."):
        match = re.fullmatch(r"([\w-]+)(?:\[(\w+)\])?", part)
        if match is None:
            raise ConfigurationError(
                f"config key {key!r} is not a dotted path (e.g. trainer.callbacks[Class].init_args.x)"
            )
        parts.append((match.group(1), match.group(2)))
    return parts


def _class_name(item: Any) -> str | None:
    class_path = item.get("class_path") if isinstance(item, dict) else None
    return class_path.rpartition(".")[2] if isinstance(class_path, str) else None


def _selected(items: Any, class_name: str, key: str) -> list[dict[str, Any]]:
    chosen = [item for item in items or [] if _class_name(item) == class_name] if isinstance(items, list) else []
    if not chosen:
        present = (
            sorted({name for item in items or [] if (name := _class_name(item))}) if isinstance(items, list) else []
        )
        raise ConfigurationError(
            f"config key {key!r}: no {class_name} in that list; it holds: {', '.join(present) or 'nothing'}"
        )
    return chosen


def set_value(config: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` of ``config`` (mappings are created; ``list[ClassName]`` sets every item of that class).

    Examples:
        >>> config = {"trainer": {"callbacks": [{"class_path": "a.LastCheckpoint", "init_args": {"dirpath": "x"}}]}}
        >>> set_value(config, "trainer.callbacks[LastCheckpoint].init_args.dirpath", "y")
        >>> set_value(config, "model.init_args.preset", "tiny")
        >>> config["trainer"]["callbacks"][0]["init_args"]["dirpath"], config["model"]
        ('y', {'init_args': {'preset': 'tiny'}})
    """
    targets = [config]
    parts = _parts(key)
    for index, (name, class_name) in enumerate(parts):
        last = index == len(parts) - 1
        following = []
        for target in targets:
            if class_name is None and last:
                target[name] = copy.deepcopy(value)
            elif class_name is None:
                if not isinstance(target.get(name), dict):
                    target[name] = {}
                following.append(target[name])
            else:
                chosen = _selected(target.get(name), class_name, key)
                if last:
                    raise ConfigurationError(f"config key {key!r} must name a field of {class_name}, e.g. .init_args.x")
                following.extend(chosen)
        targets = following


def get_value(config: dict[str, Any], key: str, default: Any = None) -> Any:
    """The value at the dotted ``key`` (the first item of a ``[ClassName]``), or ``default`` where there is none."""
    current: Any = config
    for name, class_name in _parts(key):
        if not isinstance(current, dict) or name not in current:
            return default
        current = current[name]
        if class_name is not None:
            chosen = (
                [item for item in current or [] if _class_name(item) == class_name] if isinstance(current, list) else []
            )
            if not chosen:
                return default
            current = chosen[0]
    return current


def merge_config(base: dict[str, Any], fragment: dict[str, Any]) -> dict[str, Any]:
    """``fragment`` laid over ``base`` as LightningCLI lays a second ``-c`` file over the first (a new dict).

    Mappings merge key by key; ``key+:`` appends its list to ``key``'s; a block with another
    ``class_path`` replaces the block; anything else replaces the value.

    Examples:
        >>> base = {"trainer": {"max_steps": 10, "callbacks": [{"class_path": "a.A"}]}}
        >>> merge_config(base, {"trainer": {"callbacks+": [{"class_path": "b.B"}], "max_steps": 20}})
        {'trainer': {'max_steps': 20, 'callbacks': [{'class_path': 'a.A'}, {'class_path': 'b.B'}]}}
    """
    merged = copy.deepcopy(base)
    for key, value in fragment.items():
        if isinstance(key, str) and key.endswith("+"):
            name = key[:-1]
            existing = merged.get(name) or []
            merged[name] = [*(existing if isinstance(existing, list) else [existing]), *copy.deepcopy(value)]
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            same_class = value.get("class_path") in (None, merged[key].get("class_path"))
            merged[key] = merge_config(merged[key], value) if same_class else copy.deepcopy(value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigurationError(f"config file {str(path)!r} cannot be read ({error})") from error
    if not isinstance(data, dict):
        raise ConfigurationError(f"config file {str(path)!r} must hold a mapping of config keys")
    return data


def _moved(value: Any, old: str, new: str) -> Any:
    """``value`` with every string under the folder ``old`` moved under ``new`` (walks mappings and lists)."""
    if isinstance(value, dict):
        return {key: _moved(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [_moved(item, old, new) for item in value]
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new + value[len(old.rstrip("/")) :]
    return value


def _callbacks(config: dict[str, Any]) -> list[dict[str, Any]]:
    trainer = config.setdefault("trainer", {})
    callbacks = trainer.get("callbacks")
    if callbacks is None:
        callbacks = []
    elif not isinstance(callbacks, list):
        callbacks = [callbacks]
    trainer["callbacks"] = callbacks
    return callbacks


def _ensure_callback(
    config: dict[str, Any], class_path: str, init_args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The callback of ``class_path``'s class in ``config``, appended when there is none."""
    name = class_path.rpartition(".")[2]
    callbacks = _callbacks(config)
    found = next((item for item in callbacks if _class_name(item) == name), None)
    if found is None:
        found = {"class_path": class_path, "init_args": dict(init_args or {})}
        callbacks.append(found)
    found.setdefault("init_args", {})
    return found


# -- stage kinds ------------------------------------------------------------------------------------
def _take_shape(config: dict[str, Any], source: dict[str, Any]) -> None:
    for key in SHAPE_KEYS:
        value = get_value(source, key)
        if value is not None:
            set_value(config, key, value)


def _start_model(config: dict[str, Any], checkpoint: str, source: dict[str, Any]) -> None:
    """A fit from a source: the model starts from its checkpoint, with its shape unless the stage sets one."""
    _take_shape(config, source)
    set_value(config, "model.init_args.pretrained", checkpoint)


def _next_round(config: dict[str, Any], checkpoint: str, source: dict[str, Any]) -> None:
    """A lottery-ticket round: the source's checkpoint is the LotteryTicket's ticket; the model keeps the source's shape."""
    _take_shape(config, source)
    _ensure_callback(config, _LOTTERY_TICKET)["init_args"]["ticket"] = checkpoint


def _load_checkpoint(config: dict[str, Any], checkpoint: str, source: dict[str, Any]) -> None:
    config["ckpt_path"] = checkpoint


def _teacher(config: dict[str, Any], checkpoint: str, source: dict[str, Any]) -> None:
    _ensure_callback(config, _DISTILLATION)["init_args"]["teacher"] = checkpoint


@dataclass(frozen=True)
class StageKind:
    """What a kind of stage runs and how it starts from another stage.

    Attributes:
        name: The ``kind:`` of a stage.
        subcommand: The ``lightning-efficient`` subcommand that runs it.
        trains: Whether it writes a final checkpoint (so later stages can start ``from:`` it).
        measured: Whether its final model is measured for the report by default (``measure:`` overrides).
        start_from: ``(config, source_checkpoint, source_config)``: wires the source stage's final
            checkpoint into this stage's config.
        shape_from_source: Whether a fit takes the source's model shape (:data:`~lightning_efficient.pipeline.spec.SHAPE_KEYS`).
    """

    name: str
    subcommand: str
    trains: bool
    measured: bool
    start_from: Callable[[dict[str, Any], str, dict[str, Any]], None]
    shape_from_source: bool = False


#: The stage kinds, by name; :func:`register_stage_kind` adds more.
STAGE_KINDS: dict[str, StageKind] = {}


def register_stage_kind(kind: StageKind) -> StageKind:
    """Add (or replace) a stage kind, so pipeline files can name it in ``kind:``."""
    STAGE_KINDS[kind.name] = kind
    return kind


for _kind in (
    StageKind("fit", "fit", trains=True, measured=True, start_from=_start_model, shape_from_source=True),
    StageKind("distil", "fit", trains=True, measured=True, start_from=_teacher),
    StageKind("ticket", "fit", trains=True, measured=True, start_from=_next_round, shape_from_source=True),
    StageKind("validate", "validate", trains=False, measured=False, start_from=_load_checkpoint),
    StageKind("test", "test", trains=False, measured=False, start_from=_load_checkpoint),
    StageKind("predict", "predict", trains=False, measured=False, start_from=_load_checkpoint),
):
    register_stage_kind(_kind)


# -- plans ------------------------------------------------------------------------------------------
@dataclass
class StagePlan:
    """One branch of a stage, ready to run: its directory, composed config and commands."""

    run: StageRun
    directory: Path
    config: dict[str, Any]
    source: StagePlan | None
    latency: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The branch's name (``stage`` or ``stage/label``)."""
        return self.run.name

    @property
    def kind(self) -> StageKind:
        """The stage's kind."""
        return STAGE_KINDS[self.run.stage.kind]

    @property
    def config_file(self) -> Path:
        """Where the composed config is written: ``<directory>/stage.yaml``."""
        return self.directory / STAGE_FILE

    @property
    def checkpoint(self) -> Path | None:
        """The final checkpoint a training stage leaves (its ``LastCheckpoint``'s ``last.ckpt``); None for others."""
        if not self.kind.trains:
            return None
        return Path(get_value(self.config, "trainer.callbacks[LastCheckpoint].init_args.dirpath")) / CHECKPOINT_NAME

    @property
    def measured(self) -> bool:
        """Whether the final model is measured for the report."""
        chosen = self.run.stage.measure
        return self.kind.trains and (self.kind.measured if chosen is None else chosen)

    @property
    def measure_directory(self) -> Path:
        """Where the measured (exported) model and its ``measures.json`` go."""
        return self.directory / "exported"

    def yaml_text(self) -> str:
        """The composed config as YAML, with a header naming the stage and the command that runs it."""
        header = (
            f"# Stage {self.name} of a pipeline, composed by lightning-efficient pipeline.\n# Run: {self.command()}\n"
        )
        return header + yaml.safe_dump(self.config, sort_keys=False)

    def config_hash(self, source_finished: str | None = None) -> str:
        """A hash of what the stage runs: its kind, composed config and (when it starts from one) the source's run."""
        text = "\n".join([self.kind.name, yaml.safe_dump(self.config, sort_keys=True), source_finished or ""])
        return hashlib.sha256(text.encode()).hexdigest()

    def command(self, resume: bool = False) -> str:
        """The plain ``lightning-efficient`` command that runs this stage (``resume``: from its ``last.ckpt``)."""
        words = ["lightning-efficient", *self.arguments(resume)]
        return shlex.join(words)

    def arguments(self, resume: bool = False) -> list[str]:
        """The ``lightning-efficient`` arguments of :meth:`command`."""
        words = [self.kind.subcommand, "-c", str(self.config_file)]
        if resume and self.checkpoint is not None:
            words += ["--ckpt_path", str(self.checkpoint)]
        return words

    def measure_arguments(self) -> list[str]:
        """The arguments of ``python -m lightning_efficient.pipeline.measure`` for this stage's final checkpoint."""
        words = [
            "--config", str(self.config_file), "--checkpoint", str(self.checkpoint),
            "--output", str(self.measure_directory),
        ]  # fmt: skip
        if "batch_sizes" in self.latency:
            words += ["--batch-sizes", *(str(size) for size in self.latency["batch_sizes"])]
        for key in ("repeats", "threads"):
            if key in self.latency:
                words += [f"--{key}", str(self.latency[key])]
        if self.latency.get("compile") is False:
            words.append("--no-compile")
        return words

    def measure_command(self) -> str:
        """The command that measures this stage's final model (for a measured stage)."""
        return shlex.join(["python", "-m", "lightning_efficient.pipeline.measure", *self.measure_arguments()])


def _compose(run: StageRun, spec: PipelineSpec, directory: Path, source: StagePlan | None) -> dict[str, Any]:
    stage = run.stage
    base_file = stage.config
    current = stage
    while base_file is None and current.source is not None:  # no config: the source's (recursively)
        current = spec.stage(current.source)
        base_file = current.config
    config = _read_yaml(base_file)
    choices = dict(run.choices)
    fragments = [*stage.fragments, *([choices.pop("fragments")] if "fragments" in choices else [])]
    for fragment in fragments:
        for file in [fragment] if isinstance(fragment, str) else fragment:
            config = merge_config(config, _read_yaml(file))
    old_root = get_value(config, "trainer.default_root_dir")
    if isinstance(old_root, str) and old_root:
        config = _moved(config, old_root, str(directory))
    config.setdefault("trainer", {})["default_root_dir"] = str(directory)
    given = {**stage.overrides, **choices}
    where = f"stage {run.name!r}"
    try:
        if source is not None:  # before the overrides: a shape the stage sets itself wins
            STAGE_KINDS[stage.kind].start_from(config, str(source.checkpoint), source.config)
        for key, value in given.items():
            set_value(config, key, value)
    except ConfigurationError as error:
        raise ConfigurationError(f"{where}: {error}") from None
    kind = STAGE_KINDS[stage.kind]
    if kind.trains:
        _ensure_callback(config, _MONITOR)
        last = _ensure_callback(config, _LAST, {"dirpath": str(directory / "checkpoints")})
        if not last["init_args"].get("dirpath"):
            last["init_args"]["dirpath"] = str(directory / "checkpoints")
        _apply_budget(config, stage, given)
    elif stage.budget is not None:
        raise ConfigurationError(f"{where}: a budget limits training; a {stage.kind} stage does not train")
    return config


def _apply_budget(config: dict[str, Any], stage: Any, given: dict[str, Any]) -> None:
    budget = stage.budget
    if budget is None:
        return
    trainer = config.setdefault("trainer", {})
    if budget.flops is not None:
        _ensure_callback(config, _BUDGET)["init_args"]["flops"] = budget.flops
        trainer["max_epochs"] = -1
        if "trainer.max_steps" not in given:
            trainer["max_steps"] = UNBOUNDED_STEPS
    if budget.steps is not None:
        trainer["max_steps"] = budget.steps
        trainer["max_epochs"] = -1
    if budget.seconds is not None:
        trainer["max_time"] = {"seconds": round(budget.seconds)}


def plan_stages(spec: PipelineSpec) -> list[StagePlan]:
    """Every branch of every stage, composed, in run order (see the module doc).

    Raises:
        ConfigurationError: A ``from:`` names a stage that does not train, or whose model the
            stage's model cannot start from; a key names nothing (a ``[ClassName]`` not in the list);
            a budget on a stage that does not train.
    """
    plans: dict[str, StagePlan] = {}
    for run in expand(spec):
        source = plans[run.source.name] if run.source is not None else None
        if source is not None and not source.kind.trains:
            raise ConfigurationError(
                f"stage {run.stage.name!r}: from={source.run.stage.name!r} is a {source.kind.name} stage, which "
                f"writes no checkpoint; from: must name a stage that trains "
                f"({', '.join(k.name for k in STAGE_KINDS.values() if k.trains)})"
            )
        directory = spec.directory / run.name
        plan = StagePlan(run, directory, _compose(run, spec, directory, source), source, spec.latency)
        if source is not None:
            _check_start(plan, source)
        plans[run.name] = plan
    return list(plans.values())


def _model_class(config: dict[str, Any]) -> type | None:
    class_path = get_value(config, "model.class_path")
    if not isinstance(class_path, str):
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None  # the parse check names it


def _check_start(plan: StagePlan, source: StagePlan) -> None:
    """A stage that starts from ``source``'s checkpoint must hold a model that can load it."""
    ours, theirs = _model_class(plan.config), _model_class(source.config)
    if ours is None or theirs is None:
        return
    where = f"stage {plan.run.stage.name!r}"
    if plan.kind.start_from is _start_model:
        accepted = getattr(ours, "pretrained_modules", ())
        if theirs.__name__ not in accepted:
            raise ConfigurationError(
                f"{where}: its model {ours.__name__} cannot start from {source.name!r}, a {theirs.__name__} "
                f"checkpoint; it starts from {' or '.join(accepted) or 'no checkpoint of ours'}"
            )
    elif plan.kind.start_from in (_load_checkpoint, _next_round) and ours is not theirs:
        raise ConfigurationError(
            f"{where}: its model {ours.__name__} cannot load {source.name!r}, a {theirs.__name__} checkpoint; "
            f"give it {source.run.stage.name}'s config (or leave config out)"
        )


def python_command(arguments: list[str]) -> list[str]:
    """The argv that runs ``lightning-efficient <arguments>`` with this interpreter."""
    return [sys.executable, "-m", "lightning_efficient.cli", *arguments]
