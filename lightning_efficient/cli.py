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
  that checkpoint.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI

from lightning_efficient import compare
from lightning_efficient.data.tokenizers import CHECKPOINT_KEY
from lightning_efficient.errors import CheckpointMismatchError

__all__ = ["EfficientCLI", "main"]


def _import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _accepts(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


def checkpoint_module_name(ckpt_path: str | Path) -> str | None:
    """Name of the LightningModule class that wrote a checkpoint of ours (None for foreign ones)."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)  # no tensor is read
    return checkpoint.get(CHECKPOINT_KEY, {}).get("module")


class EfficientCLI(LightningCLI):
    """LightningCLI with data-derived model arguments and checkpoint-aware tokenizers (see module doc)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(**kwargs)

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
        config = self._subcommand_config()
        ckpt_path = config.get("ckpt_path")
        model = config.get("model")
        if not ckpt_path or model is None or not getattr(model, "class_path", None):
            return
        if not Path(ckpt_path).is_file():
            raise CheckpointMismatchError(f"ckpt_path {ckpt_path!r} does not exist")
        written_by = checkpoint_module_name(ckpt_path)
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
            unset = [k for k, v in model_cfg.init_args.items() if v is None and k in provided and _accepts(model_cls, k)]
            if unset:  # e.g. predict --ckpt_path: the checkpoint's hyperparameters already set them
                datamodule = data_cls(**data_cfg.init_args.as_dict())
                for name, value in datamodule.model_arguments().items():
                    if name in unset:
                        model_cfg.init_args[name] = value
        super().instantiate_classes()
        if datamodule is not None:
            # Keep the instance that already resolved its tokenizer and read its files.
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
