"""The ``lightning-efficient`` command: a LightningCLI over every module, data module and technique.

Models, data, optimizers, LR schedulers, callbacks and strategies all come from YAML
``class_path`` blocks or command-line overrides::

    lightning-efficient fit -c configs/bert/small_mlm.yaml
    lightning-efficient fit -c configs/bert/small_mlm.yaml --trainer.max_steps 50 --model.init_args.preset tiny
    lightning-efficient predict -c configs/bert/small_mlm.yaml --ckpt_path runs/bert_small_mlm/checkpoints/last.ckpt
    lightning-efficient compare runs/bert_small_mlm runs/bert_small_mlm_layer_drop   # see compare.py

On top of LightningCLI it
- fills the model arguments that the data decides (``vocab_size``, ``num_labels``, ``label_names``,
  ``image_size``) when the YAML leaves them unset, from ``datamodule.model_arguments()``;
- with ``--ckpt_path``, takes the tokenizer from the checkpoint (so ``predict`` needs only the
  checkpoint) and fails early when the checkpoint was written by another model type;
- with ``model.init_args.pretrained_checkpoint`` (pretrain -> fine-tune), takes the tokenizer from
  that checkpoint;
- reads every ``class_path`` of ours in its canonical spelling (:func:`canonical_class_paths`):
  a deprecated one (``lightning_efficient.callbacks.layer_drop.LayerDrop``,
  ``lightning_efficient.optim.LRScaling``) still loads, with a ``DeprecationWarning`` naming the new path.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace, get_loader, set_loader
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from lightning_efficient import compare
from lightning_efficient.checkpoint import checkpoint_module_class
from lightning_efficient.errors import CheckpointMismatchError

__all__ = ["EfficientCLI", "canonical_class_paths", "main"]


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


class EfficientCLI(LightningCLI):
    """LightningCLI with data-derived model arguments and checkpoint-aware tokenizers (see module doc)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        if not sys.warnoptions:  # Python hides DeprecationWarning; show ours (deprecated class paths) unless -W says
            warnings.filterwarnings("default", category=DeprecationWarning, module=re.escape(__name__))
        super().__init__(**kwargs)

    def init_parser(self, **kwargs: Any) -> Any:
        """LightningCLI's parser, reading YAML through :func:`canonical_class_paths` (``PARSER_MODE``)."""
        kwargs.setdefault("parser_mode", PARSER_MODE)
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

    def _subcommand_config(self) -> Any:
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        canonical_class_paths(self.config)  # what the YAML loader did not see: dict args, command-line strings
        config = self._subcommand_config()
        ckpt_path = config.get("ckpt_path")
        model = config.get("model")
        if not ckpt_path or model is None or not getattr(model, "class_path", None):
            return
        if not Path(ckpt_path).is_file():
            raise CheckpointMismatchError(f"ckpt_path {ckpt_path!r} does not exist")
        written_by = checkpoint_module_class(ckpt_path)  # its metadata only: no tensor is read
        expected = model.class_path.rpartition(".")[2]
        if written_by is not None and written_by != expected:
            raise CheckpointMismatchError(
                f"checkpoint {ckpt_path!r} was written by {written_by}, but this run's model is {expected}; "
                f"use a {written_by} config with it, or a {expected} checkpoint"
            )

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        data, model = config.get("data"), config.get("model")
        if data is None or model is None or not getattr(data, "class_path", None):
            return
        data_cls = _import_class(data.class_path)
        if not _accepts(data_cls, "tokenizer") or data.init_args.get("tokenizer"):
            return
        source = config.get("ckpt_path") or model.init_args.get("pretrained_checkpoint")
        if source:
            data.init_args.tokenizer = str(source)

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
                datamodule = data_cls(**data_cfg.init_args.as_dict())
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
    "One more subcommand, outside LightningCLI: `lightning-efficient compare RUN_DIR RUN_DIR ... "
    "[--output PNG] [--json]` puts the efficiency summaries of several runs side by side "
    "(see `lightning-efficient compare --help`)."
)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-efficient`` console script.

    ``compare`` goes to :func:`lightning_efficient.compare.main` before LightningCLI sees the
    arguments; every other subcommand (``fit``, ``validate``, ``test``, ``predict``) to :class:`EfficientCLI`.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["compare"]:
        compare.main(argv[1:])
        return
    EfficientCLI(args=args, parser_kwargs={"epilog": _COMPARE_EPILOG})


if __name__ == "__main__":
    main()
