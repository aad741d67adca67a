"""What tests and benchmarks share: a quiet ``Trainer`` and a reference technique.

:func:`quiet_trainer` is the ``Trainer`` of every test and benchmark run: no logger, checkpoints,
progress bar or model summary, so a run writes nothing and prints nothing but what it is asked to.

:class:`BlockOutputNoise` is deliberately small but exercises every part of the
:class:`~lightning_efficient.technique.Technique` contract: validated arguments, surgery on the
blocks that :func:`~lightning_efficient.blocks.find_block_stacks` finds (forward hooks, so
checkpoint keys do not change), a random stream of its own saved in its state, a schedule with a
transition (noise starts at ``start_step``), and metrics under ``block_noise/``. Adding Gaussian
noise to hidden states is a known regulariser, but the class exists to be tested against: read it
as the template for a new technique.

Examples:
    >>> from lightning_efficient import BertMLM, MLMDataModule
    >>> dm = MLMDataModule(vocab_size=2000, max_length=32, batch_size=8)
    >>> noise = BlockOutputNoise(std=0.1, start_step=1)
    >>> trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[noise])
    >>> trainer.fit(BertMLM(vocab_size=dm.vocab_size, preset="tiny"), dm)
    >>> noise.draws  # 3 blocks x 2 noisy steps
    6
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_efficient.blocks import find_block_stacks
from lightning_efficient.technique import Technique, check_range

__all__ = ["QUIET_TRAINER", "BlockOutputNoise", "quiet_trainer"]

QUIET_TRAINER: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
"""The ``Trainer`` arguments that :func:`quiet_trainer` sets unless overridden."""


def quiet_trainer(**overrides: Any) -> pl.Trainer:
    """A ``Trainer`` that writes and prints nothing of its own: no logger, checkpoints, progress bar or summary.

    Args:
        **overrides: Any ``Trainer`` arguments; they win over :data:`QUIET_TRAINER` (e.g.
            ``enable_checkpointing=True`` for a resume test, ``logger=CSVLogger(root)``).

    Examples:
        >>> trainer = quiet_trainer(max_steps=2, accelerator="cpu")
        >>> trainer.max_steps, trainer.logger, trainer.checkpoint_callback
        (2, None, None)
    """
    return pl.Trainer(**{**QUIET_TRAINER, **overrides})


def add_noise(hidden: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """``hidden + std * N(0, 1)``, drawing the noise from ``generator`` (on the CPU, then moved).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> add_noise(torch.zeros(3), 0.0, g).tolist()
        [0.0, 0.0, 0.0]
    """
    noise = torch.randn(hidden.shape, generator=generator, dtype=torch.float32)
    return hidden + (std * noise).to(device=hidden.device, dtype=hidden.dtype)


class BlockOutputNoise(Technique):
    """Add Gaussian noise to the output of every Transformer block during training.

    Args:
        std: Standard deviation of the noise (>= 0).
        start_step: First optimizer step with noise; before it the blocks run unchanged.
        seed: Seed of the technique's own generator (the same on every DDP rank).
        block_paths: Attribute paths of the block lists, for models the block locator does not
            know (e.g. ``["model.layers"]``).
    """

    name = "block_noise"
    hooks = ("on_train_batch_start",)
    distributed_safe = True
    compile_safe = True  # tests/test_compile.py: compiled training equals eager
    compile_note = "the noise draw (its own torch.Generator) breaks the graph after each block"

    def __init__(
        self, std: float = 0.01, start_step: int = 0, seed: int = 0, block_paths: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        self.std = check_range("std", std, low=0.0)
        self.start_step = int(check_range("start_step", start_step, low=0))
        self.seed = seed
        self.block_paths = list(block_paths) if block_paths else None
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = 0
        self.active = False

    def apply(self, pl_module: nn.Module) -> list[Any]:
        stacks = find_block_stacks(pl_module, self.block_paths)
        return [block.register_forward_hook(self._hook) for stack in stacks for block in stack.blocks]

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if not (module.training and self.active):
            return None
        self.draws += 1
        if isinstance(output, tuple):  # HF blocks may return (hidden, attentions, ...)
            return (add_noise(output[0], self.std, self.generator), *output[1:])
        return add_noise(output, self.std, self.generator)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.active = trainer.global_step >= self.start_step
        self.log_metrics(pl_module, {"active": float(self.active), "draws": float(self.draws)})

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "draws": self.draws}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])
        self.draws = state_dict["draws"]
