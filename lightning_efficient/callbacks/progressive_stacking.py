"""ProgressiveStacking: train a shallow model first and grow it by copying its trained blocks.

Gong et al. (2019, "Efficient training of BERT by progressively stacking") train an L-block BERT,
copy its blocks on top to make 2L, and go on training: the shallow stages are cheap and the
copies start from useful weights. The callback follows a schedule ``stages = {step: depth}`` (e.g.
``{0: 3, 1000: 6, 3000: 12}``) for every block stack of the model (BERT, ViT, both stacks of an
encoder-decoder), with two growth rules from ``depth`` to ``new_depth`` blocks (``k = new_depth -
depth <= depth`` new blocks):

- ``stack``: blocks ``depth .. new_depth - 1`` become copies of blocks ``0 .. k - 1`` (Gong et al.:
  with ``k = depth`` the whole trained stack is repeated on top);
- ``interleave``: each of the bottom ``k`` blocks is followed by its copy
  (``b0 b0' b1 b1' ... b(k-1) b(k-1)' bk ... b(depth-1)``).

How it is built: the model keeps its configured depth throughout, so its parameters and
checkpoint keys never change; blocks beyond the current depth are *inactive*: skipped without
being called (their input passes through), so they cost no compute and get no gradient. Growing
copies weights into the next blocks in place. The optimizer therefore needs no rebuild: blocks
that were trained keep their optimizer state (with the interleave rule the state moves with the
weights, matched by parameter name), the copies start with none, and the LR schedule runs on.
A checkpoint holds the full parameter set plus the current depth, so a resume from before, at or
after a growth step continues exactly. The cost of this design is memory: the inactive blocks'
parameters exist from the start.

Examples:
    >>> import lightning.pytorch as pl
    >>> from lightning_efficient import BertMLM, MLMDataModule
    >>> dm = MLMDataModule(vocab_size=2000, max_length=32, batch_size=8)
    >>> grow = ProgressiveStacking(stages={0: 2, 2: 3})  # the tiny preset has 3 blocks
    >>> trainer = pl.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_progress_bar=False,
    ...                      enable_checkpointing=False, enable_model_summary=False, callbacks=[grow])
    >>> model = BertMLM(vocab_size=dm.vocab_size, preset="tiny")
    >>> trainer.fit(model, dm)
    >>> grow.depth
    3
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
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
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.technique import Technique, check_choice, check_unused_parameters_allowed

__all__ = ["RULES", "ProgressiveStacking", "grow_blocks", "growth_sources", "validate_stages"]

RULES = ("stack", "interleave")


def validate_stages(stages: Mapping[int, int]) -> dict[int, int]:
    """Check a growth schedule ``{step: depth}``; return it sorted by step.

    Raises:
        ConfigurationError: No stage at step 0, a negative step, a depth below 1, a depth that
            does not grow, or a growth by more than the current depth (no rule can copy more
            blocks than there are).

    Examples:
        >>> validate_stages({100: 6, 0: 3})
        {0: 3, 100: 6}
        >>> validate_stages({0: 3, 100: 7})
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: stages: growing from 3 to 7 blocks at step 100 copies 4 blocks, but only 3 exist; grow to at most 6 blocks per stage
    """
    if not isinstance(stages, Mapping) or not stages:
        raise ConfigurationError(f"stages={stages!r} must be a non-empty mapping {{step: depth}}, e.g. {{0: 3, 1000: 6}}")
    try:
        ordered = {int(step): int(depth) for step, depth in sorted(stages.items(), key=lambda item: int(item[0]))}
    except (TypeError, ValueError):
        raise ConfigurationError(f"stages={stages!r} must map integer steps to integer depths") from None
    if 0 not in ordered:
        raise ConfigurationError(f"stages={stages!r} must give the starting depth at step 0, e.g. {{0: 3, ...}}")
    previous = None
    for step, depth in ordered.items():
        if step < 0:
            raise ConfigurationError(f"stages: step {step} is negative; steps are optimizer steps >= 0")
        if depth < 1:
            raise ConfigurationError(f"stages: depth {depth} at step {step} must be >= 1")
        if previous is not None:
            if depth <= previous:
                raise ConfigurationError(
                    f"stages: depth {depth} at step {step} does not grow from {previous}; depths must increase with the step"
                )
            if depth > 2 * previous:
                raise ConfigurationError(
                    f"stages: growing from {previous} to {depth} blocks at step {step} copies {depth - previous} blocks, "
                    f"but only {previous} exist; grow to at most {2 * previous} blocks per stage"
                )
        previous = depth
    return ordered


def growth_sources(depth: int, new_depth: int, rule: str) -> list[tuple[int, bool]]:
    """For each block position ``0 .. new_depth - 1`` after growth: (source block, is it the original).

    Examples:
        >>> growth_sources(3, 5, "stack")
        [(0, True), (1, True), (2, True), (0, False), (1, False)]
        >>> growth_sources(3, 5, "interleave")
        [(0, True), (0, False), (1, True), (1, False), (2, True)]
    """
    check_choice("rule", rule, RULES)
    copies = new_depth - depth
    if rule == "stack":
        return [(i, True) for i in range(depth)] + [(i, False) for i in range(copies)]
    sources = []
    for i in range(depth):
        sources.append((i, True))
        if i < copies:
            sources.append((i, False))
    return sources


@torch.no_grad()
def grow_blocks(
    blocks: Sequence[nn.Module], depth: int, new_depth: int, rule: str, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Grow the active prefix of ``blocks`` from ``depth`` to ``new_depth`` in place, by ``rule``.

    Copies weights and buffers into the block positions the rule assigns; in a copy, every submodule
    with a ``reset_when_copied()`` method (:class:`~lightning_efficient.callbacks.residual_init.BranchScale`)
    is then reset to its initial value. With ``optimizer``, a
    block that was trained keeps its optimizer state (moved, by parameter name, to the position
    its weights move to); a copy starts with none.

    Examples:
        >>> blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(4))
        >>> grow_blocks(blocks, 2, 4, "stack")
        >>> torch.equal(blocks[2].weight, blocks[0].weight), torch.equal(blocks[3].weight, blocks[1].weight)
        (True, True)
    """
    sources = growth_sources(depth, new_depth, rule)
    if new_depth > len(blocks):
        raise ConfigurationError(f"cannot grow to {new_depth} blocks: the stack has {len(blocks)}")
    saved_state: dict[tuple[int, str], Any] = {}
    if optimizer is not None:
        for i in range(depth):
            for name, param in blocks[i].named_parameters():
                if param in optimizer.state:
                    saved_state[(i, name)] = optimizer.state[param]
    for position in reversed(range(new_depth)):  # top down: a source is read before it is overwritten
        source, original = sources[position]
        if source != position:
            target = blocks[position].state_dict()
            for key, value in blocks[source].state_dict().items():
                target[key].copy_(value)
        if not original:  # a copy: parts that a technique gives every new block (ResidualInit's scales) start again
            for module in blocks[position].modules():
                reset = getattr(module, "reset_when_copied", None)
                if callable(reset):
                    reset()
        if optimizer is None:
            continue
        for name, param in blocks[position].named_parameters():
            state = saved_state.get((source, name)) if original else None
            if state is None:
                optimizer.state.pop(param, None)
            else:
                optimizer.state[param] = state


class ProgressiveStacking(Technique):
    """Grow every block stack of the model on a schedule, by copying trained blocks.

    Args:
        stages: ``{optimizer step: depth}``, starting at step 0 and ending at the model's
            configured depth, e.g. ``{0: 3, 1000: 6, 3000: 12}``. Each stage may at most double
            the depth.
        rule: ``"stack"`` (copies on top, Gong et al.) or ``"interleave"`` (each block followed by
            its copy).
        block_paths: Attribute paths of the block lists, for models the block locator does not
            know; by default every stack found (both stacks of an encoder-decoder grow together).

    Logged every training step: ``progressive_stacking/depth``.

    Raises:
        ConfigurationError: A bad schedule or rule (in ``__init__``); at ``setup``, a schedule
            whose last depth is not the depth of every stack. A growth step at or after
            ``max_steps`` warns at ``setup`` (the run will not reach the full depth), and so does a
            fit that ends before the last stage.
    """

    name = "progressive_stacking"
    hooks = ("setup", "teardown", "on_train_batch_start")
    conflicts_with = ("layer_drop",)
    distributed_safe = True
    keep_after_fit = True  # validate / test / predict after fit see the depth that was trained

    def __init__(self, stages: Mapping[int, int], rule: str = "stack", block_paths: Sequence[str] | None = None) -> None:
        super().__init__()
        self.stages = validate_stages(stages)
        self.rule = check_choice("rule", rule, RULES)
        self.block_paths = list(block_paths) if block_paths else None
        self.depth = self.stages[0]
        self._stacks: list[Sequence[nn.Module]] = []

    def depth_at(self, step: int) -> int:
        """The scheduled depth at optimizer step ``step``.

        Examples:
            >>> ProgressiveStacking({0: 3, 10: 6}).depth_at(9), ProgressiveStacking({0: 3, 10: 6}).depth_at(10)
            (3, 6)
        """
        return [depth for start, depth in self.stages.items() if start <= step][-1]

    def apply(self, pl_module: nn.Module) -> list[Any]:
        stacks = find_block_stacks(pl_module, self.block_paths)
        final = list(self.stages.values())[-1]
        for stack in stacks:
            if len(stack) != final:
                relation = "grows past" if final > len(stack) else "stops short of"
                raise ConfigurationError(
                    f"stages={self.stages} {relation} the configured depth: it ends at {final} blocks but "
                    f"{stack.path} has {len(stack)}; make the last stage {len(stack)}"
                    + (" (or pass block_paths to grow one stack)" if len(stacks) > 1 else "")
                )
        self._stacks = [stack.blocks for stack in stacks]
        return [
            wrap_forward(block, functools.partial(self._forward, i, block), Priority.SKIP)
            for stack in stacks
            for i, block in enumerate(stack.blocks)
        ]

    def _forward(self, index: int, block: nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
        if index < self.depth:
            return forward(*args, **kwargs)
        return passthrough_output(block, block_hidden_states(args, kwargs))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_unused_parameters_allowed(trainer, self.name)
        late = [step for step in self.stages if step > 0 and 0 < trainer.max_steps <= step]
        if stage == "fit" and late:
            warnings.warn(
                f"{self.name}: stages={self.stages} grows at step {late[0]}, but the run stops at "
                f"max_steps={trainer.max_steps}: the model will not reach its full depth in this run",
                stacklevel=2,
            )
        super().setup(trainer, pl_module, stage)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        target = self.depth_at(trainer.global_step)
        if target > self.depth:
            optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None
            if optimizer is None and trainer.optimizers:
                raise ConfigurationError(f"{self.name} supports one optimizer; the module has {len(trainer.optimizers)}")
            for blocks in self._stacks:
                grow_blocks(blocks, self.depth, target, self.rule, optimizer)
            self.depth = target
        self.log_metrics(pl_module, {"depth": float(self.depth)})

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        final = list(self.stages.values())[-1]
        if stage == "fit" and self.depth < final:
            warnings.warn(
                f"{self.name}: fit ended at depth {self.depth} of {final} (step {trainer.global_step}); "
                f"{final - self.depth} block(s) per stack were never trained, and a model loaded from this "
                "run's checkpoint without this callback runs them: resume the run to finish growing",
                stacklevel=2,
            )
        super().teardown(trainer, pl_module, stage)

    def state_dict(self) -> dict[str, Any]:
        return {"depth": self.depth}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.depth = state_dict["depth"]
