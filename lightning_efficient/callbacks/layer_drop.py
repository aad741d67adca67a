"""LayerDrop: skip whole Transformer blocks during training, with fixed, stochastic-depth or PLD rates.

A dropped block is not called at all: its input passes straight to the next block, so its
compute (forward and backward) is saved, and the FLOPs the
:class:`~lightning_efficient.monitor.EfficiencyMonitor` counts follow the blocks that ran. Three
schedules of the keep probability ``p_l`` of block ``l = 1..L`` (of each stack) at optimizer step ``t``:

- ``fixed``: ``p_l = 1 - drop_rate`` (Fan et al. 2019, LayerDrop).
- ``linear``: ``p_l = 1 - drop_rate * l / L`` (Huang et al. 2016, stochastic depth: deeper blocks
  are dropped more; the last one at ``drop_rate``).
- ``progressive``: progressive layer dropping (Zhang & He 2020): a global keep probability
  ``theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar`` that decays from 1 to the floor
  ``theta_bar = 1 - drop_rate``, spread over depth as ``p_l = 1 - l / L * (1 - theta(t))``.

Evaluation and prediction run every block. With ``rescale=True`` a kept block's residual change is
divided by its keep probability, ``x + (block(x) - x) / p_l``, so that its expected output during
training equals the full block's output used at evaluation.

The drops come from a generator that the callback owns, seeds and checkpoints: every DDP rank
draws the same blocks (DDP must run with ``find_unused_parameters=True``, since a dropped block's
parameters get no gradient), and a resumed run draws what the uninterrupted run would have.

Examples:
    >>> import lightning.pytorch as pl
    >>> from lightning_efficient import BertMLM, MLMDataModule
    >>> dm = MLMDataModule(vocab_size=2000, max_length=32, batch_size=8)
    >>> drop = LayerDrop(drop_rate=0.5, seed=3)
    >>> trainer = pl.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_progress_bar=False,
    ...                      enable_checkpointing=False, enable_model_summary=False, callbacks=[drop])
    >>> trainer.fit(BertMLM(vocab_size=dm.vocab_size, preset="tiny"), dm)
    >>> drop.block_slots, 0 < drop.kept_blocks < drop.block_slots  # 4 steps x 3 blocks
    (12, True)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_efficient.blocks import (
    Priority,
    block_hidden_states,
    find_block_stacks,
    passthrough_output,
    wrap_forward,
)
from lightning_efficient.technique import Technique, check_choice, check_range, check_unused_parameters_allowed

__all__ = ["SCHEDULES", "LayerDrop", "keep_probabilities", "progressive_theta"]

SCHEDULES = ("fixed", "linear", "progressive")


def progressive_theta(step: int, drop_rate: float, gamma: float) -> float:
    """PLD's global keep probability ``theta(t) = (1 - theta_bar) exp(-gamma t) + theta_bar``.

    Examples:
        >>> [round(progressive_theta(t, 0.5, 0.01), 4) for t in (0, 100, 10_000)]
        [1.0, 0.6839, 0.5]
    """
    floor = 1.0 - drop_rate
    return (1.0 - floor) * math.exp(-gamma * step) + floor


def keep_probabilities(
    schedule: str, drop_rate: float, depth: int, step: int = 0, gamma: float = 0.001
) -> torch.Tensor:
    """The keep probability of each of ``depth`` blocks at optimizer step ``step`` (float64).

    Examples:
        >>> keep_probabilities("fixed", 0.5, 4).tolist()
        [0.5, 0.5, 0.5, 0.5]
        >>> keep_probabilities("linear", 0.5, 4).tolist()
        [0.875, 0.75, 0.625, 0.5]
        >>> keep_probabilities("progressive", 0.5, 4, step=0).tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    check_choice("schedule", schedule, SCHEDULES)
    depth_fraction = torch.arange(1, depth + 1, dtype=torch.float64) / depth  # l / L
    if schedule == "fixed":
        return torch.full((depth,), 1.0 - drop_rate, dtype=torch.float64)
    if schedule == "linear":
        return 1.0 - drop_rate * depth_fraction
    return 1.0 - depth_fraction * (1.0 - progressive_theta(step, drop_rate, gamma))


class LayerDrop(Technique):
    """Skip Transformer blocks at random during training (LayerDrop / stochastic depth / PLD).

    Args:
        drop_rate: The drop probability of every block (``fixed``) or of the deepest block
            (``linear``), or one minus PLD's floor ``theta_bar`` (``progressive``); in [0, 1).
        schedule: ``"fixed"``, ``"linear"`` or ``"progressive"`` (see the module docstring).
        gamma: PLD's decay rate of ``theta(t)`` per optimizer step (> 0; ``progressive`` only).
            ``theta`` is halfway to its floor after ``ln(2) / gamma`` steps.
        rescale: Divide a kept block's residual change by its keep probability during training.
        seed: Seed of the callback's generator (the same on every DDP rank).
        block_paths: Attribute paths of the block lists, for models the block locator does not
            know (e.g. ``["model.layers"]``); by default every stack found (both stacks of an
            encoder-decoder).

    Logged every training step: ``layer_drop/expected_keep`` (mean keep probability over all
    blocks), ``layer_drop/step_keep`` (fraction of blocks run this step) and
    ``layer_drop/realised_keep`` (the same over the whole run so far).
    """

    name = "layer_drop"
    hooks = ("setup", "on_train_batch_start")
    conflicts_with = ("progressive_stacking",)
    distributed_safe = True
    compile_safe = True
    compile_note = "a graph break at the step's random draw in the block wrapper; the rest of the block compiles"

    def __init__(
        self,
        drop_rate: float = 0.2,
        schedule: str = "fixed",
        gamma: float = 0.001,
        rescale: bool = False,
        seed: int = 0,
        block_paths: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.drop_rate = float(check_range("drop_rate", drop_rate, low=0.0, high=1.0, high_inclusive=False))
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        self.gamma = float(check_range("gamma", gamma, low=0.0, low_inclusive=False))
        self.rescale = bool(rescale)
        self.seed = seed
        self.block_paths = list(block_paths) if block_paths else None
        self.generator = torch.Generator().manual_seed(seed)
        self.kept_blocks = 0
        self.block_slots = 0
        self._depths: list[int] = []
        self._keep: list[torch.Tensor] = []  # per stack: keep probabilities this step
        self._kept: list[torch.Tensor] | None = None  # per stack: which blocks run this step

    def apply(self, pl_module: nn.Module) -> list[Any]:
        stacks = find_block_stacks(pl_module, self.block_paths)
        self._depths = [len(stack) for stack in stacks]
        return [
            wrap_forward(block, functools.partial(self._forward, s, i, block), Priority.SKIP)
            for s, stack in enumerate(stacks)
            for i, block in enumerate(stack.blocks)
        ]

    def remove(self, pl_module: nn.Module) -> None:
        super().remove(pl_module)
        self._kept = None

    def _forward(self, stack: int, index: int, block: nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
        if not block.training or self._kept is None:
            return forward(*args, **kwargs)
        if not self._kept[stack][index]:
            return passthrough_output(block, block_hidden_states(args, kwargs))
        output = forward(*args, **kwargs)
        if not self.rescale:
            return output
        hidden = block_hidden_states(args, kwargs)
        keep = float(self._keep[stack][index])
        if isinstance(output, tuple):
            return (hidden + (output[0] - hidden) / keep, *output[1:])
        return hidden + (output - hidden) / keep

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_unused_parameters_allowed(trainer, self.name)
        super().setup(trainer, pl_module, stage)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._keep = [keep_probabilities(self.schedule, self.drop_rate, d, step, self.gamma) for d in self._depths]
        self._kept = [torch.rand(len(p), generator=self.generator, dtype=torch.float64) < p for p in self._keep]
        kept_now = sum(int(k.sum()) for k in self._kept)
        slots_now = sum(self._depths)
        self.kept_blocks += kept_now
        self.block_slots += slots_now
        self.log_metrics(
            pl_module,
            {
                "expected_keep": float(torch.cat(self._keep).mean()),
                "step_keep": kept_now / slots_now,
                "realised_keep": self.kept_blocks / self.block_slots,
            },
        )

    def plan_at(self, step: int, total_steps: int, num_blocks: int) -> dict[str, Any]:
        """The keep probability of each of ``num_blocks`` blocks (one stack) at optimizer step ``step``.

        ``block_work`` is :func:`keep_probabilities` (a dropped block runs neither forward nor
        backward, so its expected work is its keep probability); ``expected_keep`` is their mean,
        the ``layer_drop/expected_keep`` the run logs. ``total_steps`` is not needed: every
        schedule is a function of the step alone.

        Examples:
            >>> LayerDrop(drop_rate=0.5, schedule="linear").plan_at(0, 100, 4)
            {'expected_keep': 0.6875, 'block_work': [0.875, 0.75, 0.625, 0.5]}
            >>> plan = LayerDrop(drop_rate=0.5, schedule="progressive", gamma=0.01).plan_at(100, 1000, 2)
            >>> round(plan["expected_keep"], 4), [round(p, 4) for p in plan["block_work"]]
            (0.763, [0.842, 0.6839])
        """
        keep = keep_probabilities(self.schedule, self.drop_rate, num_blocks, step, self.gamma)
        return {"expected_keep": float(keep.mean()), "block_work": keep.tolist()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "kept_blocks": self.kept_blocks,
            "block_slots": self.block_slots,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])
        self.kept_blocks = state_dict["kept_blocks"]
        self.block_slots = state_dict["block_slots"]
