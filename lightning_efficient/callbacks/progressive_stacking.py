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

Two ways to initialise a copy (``init``): ``copy`` takes its source block's current weights (Gong et
al.); ``momentum`` is MoGrow (momentum growth, from AutoProg: Li et al. 2022, "Automated Progressive
Learning for Efficient Training of Vision Transformers", CVPR), which keeps an exponential moving
average of the active blocks' parameters (:class:`BlockEMA`, decay ``ema_decay``; AutoProg uses
0.998-0.9996) and starts each copy from the average of its source block, a smoother point than the
last step's weights. The original blocks keep their current weights either way.

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
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError
from lightning_efficient.technique import Technique, check_choice, check_range, check_unused_parameters_allowed

__all__ = [
    "INITS",
    "RULES",
    "BlockEMA",
    "ProgressiveStacking",
    "grow_blocks",
    "grow_stacks",
    "growth_optimizer",
    "growth_sources",
    "validate_stages",
]

RULES = ("stack", "interleave")
#: How a new block is initialised: its source block's current weights, or their moving average (MoGrow).
INITS = ("copy", "momentum")


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
        raise ConfigurationError(
            f"stages={stages!r} must be a non-empty mapping {{step: depth}}, e.g. {{0: 3, 1000: 6}}"
        )
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
    blocks: Sequence[nn.Module],
    depth: int,
    new_depth: int,
    rule: str,
    optimizer: torch.optim.Optimizer | None = None,
    copy_from: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """Grow the active prefix of ``blocks`` from ``depth`` to ``new_depth`` in place, by ``rule``.

    Copies weights and buffers into the block positions the rule assigns; in a copy, every submodule
    with a ``reset_when_copied()`` method (:class:`~lightning_efficient.callbacks.residual_init.BranchScale`)
    is then reset to its initial value. With ``optimizer``, a
    block that was trained keeps its optimizer state (moved, by parameter name, to the position
    its weights move to); a copy starts with none.

    Args:
        blocks: The block list; positions ``0 .. depth - 1`` are active.
        depth: The current depth.
        new_depth: The depth after growth (at most ``2 * depth`` and ``len(blocks)``).
        rule: ``"stack"`` or ``"interleave"`` (:func:`growth_sources`).
        optimizer: The optimizer whose state follows the weights (None: no optimizer state).
        copy_from: For MoGrow: ``copy_from[i]`` maps the names of block ``i``'s parameters (as
            ``block.named_parameters()``) to the values a copy of block ``i`` gets instead of block
            ``i``'s current parameters (e.g. :meth:`BlockEMA.averages`). Buffers still come from the
            block, and the original blocks keep (and move with) their current weights. None: copies
            take the current parameters.

    Raises:
        ConfigurationError: ``new_depth`` exceeds the stack, or ``copy_from`` lacks a block or a
            parameter that a copy needs (checked before anything changes).

    Examples:
        >>> blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(4))
        >>> grow_blocks(blocks, 2, 4, "stack")
        >>> torch.equal(blocks[2].weight, blocks[0].weight), torch.equal(blocks[3].weight, blocks[1].weight)
        (True, True)
        >>> average = {"weight": torch.zeros(2, 2), "bias": torch.ones(2)}
        >>> grow_blocks(blocks, 2, 3, "interleave", copy_from=[average, average])  # b0 b0' b1
        >>> blocks[1].bias.tolist(), torch.equal(blocks[2].weight, blocks[3].weight)  # the copy; b1 moved up
        ([1.0, 1.0], True)
    """
    sources = growth_sources(depth, new_depth, rule)
    if new_depth > len(blocks):
        raise ConfigurationError(f"cannot grow to {new_depth} blocks: the stack has {len(blocks)}")
    if copy_from is not None:
        _check_copy_from(blocks, copy_from, sorted({source for source, original in sources if not original}))
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
        if not original and copy_from is not None:  # MoGrow: the copy's parameters from the given state
            for name, param in blocks[position].named_parameters():
                param.copy_(copy_from[source][name])
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


def grow_stacks(
    stacks: Sequence[Sequence[nn.Module]],
    depth: int,
    new_depth: int,
    rule: str,
    optimizer: torch.optim.Optimizer | None = None,
    ema: BlockEMA | None = None,
) -> None:
    """Grow every stack from ``depth`` to ``new_depth`` blocks with :func:`grow_blocks`, doubling at most per copy.

    With ``ema`` (MoGrow), copies start from its averages, which then follow the growth
    (:meth:`BlockEMA.grown`).

    Examples:
        >>> stack = nn.ModuleList(nn.Linear(2, 2) for _ in range(4))
        >>> grow_stacks([stack], 1, 4, "stack")  # 1 -> 2 -> 4
        >>> all(torch.equal(block.weight, stack[0].weight) for block in stack)
        True
    """
    while depth < new_depth:
        target = min(new_depth, 2 * depth)
        for index, blocks in enumerate(stacks):
            copy_from = ema.averages(index) if ema is not None else None
            grow_blocks(blocks, depth, target, rule, optimizer, copy_from=copy_from)
            if ema is not None:
                ema.grown(index, growth_sources(depth, target, rule))
        depth = target


def growth_optimizer(trainer: pl.Trainer, name: str) -> torch.optim.Optimizer | None:
    """The optimizer whose state a growth moves: the trainer's only one, or None before there is one.

    Raises:
        ConfigurationError: The module has several optimizers (which one holds a block's state is unknown).
    """
    if len(trainer.optimizers) > 1:
        raise ConfigurationError(f"{name} supports one optimizer; the module has {len(trainer.optimizers)}")
    return trainer.optimizers[0] if trainer.optimizers else None


def _check_copy_from(
    blocks: Sequence[nn.Module], copy_from: Sequence[Mapping[str, torch.Tensor]], copied: Sequence[int]
) -> None:
    """Fail unless ``copy_from`` holds exactly the parameters of each block in ``copied``."""
    for index in copied:
        if index >= len(copy_from):
            raise ConfigurationError(
                f"copy_from has {len(copy_from)} block states, but growth copies block {index}; "
                "give one state per active block"
            )
        names = {name for name, _ in blocks[index].named_parameters()}
        missing, extra = sorted(names - set(copy_from[index])), sorted(set(copy_from[index]) - names)
        if missing or extra:
            problem = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, not a parameter of the block"
            raise ConfigurationError(
                f"copy_from[{index}] {problem}; it must map each parameter name of block {index} to a tensor"
            )


class BlockEMA:
    """An exponential moving average of the parameters of the active blocks of block stacks (MoGrow).

    For every parameter of the blocks at positions ``0 .. depth - 1`` of each stack it keeps an fp32
    copy, updated by ``ema = decay * ema + (1 - decay) * weight`` (``torch._foreach_lerp_``, no
    gradient). :meth:`grown` makes the averages follow a growth (:func:`growth_sources`), so a block
    that moves keeps its average and a copy starts from the average of its source. The averages live
    on their parameters' devices (:meth:`update` moves an average that is elsewhere, e.g. one loaded
    from a checkpoint on the CPU).

    :meth:`state_dict` holds only tensors, keyed ``"<stack>.<block>.<parameter name>"`` (e.g.
    ``"0.1.attention.output.dense.weight"``), so it loads with ``torch.load(weights_only=True)``.

    Args:
        decay: The weight of the old average in each update; in (0, 1).

    Raises:
        ConfigurationError: ``decay`` outside (0, 1).

    Examples:
        >>> blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
        >>> with torch.no_grad():
        ...     _ = blocks[0].bias.zero_()
        >>> ema = BlockEMA(decay=0.75)
        >>> ema.reset([blocks], depth=1)  # average block 0, starting at its weights
        >>> with torch.no_grad():
        ...     _ = blocks[0].bias.fill_(1.0)  # an optimizer step
        >>> ema.update([blocks], depth=1)  # 0.75 * 0 + 0.25 * 1
        >>> ema.averages(0)[0]["bias"].tolist()
        [0.25, 0.25]
        >>> ema.grown(0, growth_sources(1, 2, "stack"))  # block 1 becomes a copy of block 0
        >>> sorted(ema.state_dict())
        ['0.0.bias', '0.0.weight', '0.1.bias', '0.1.weight']
    """

    def __init__(self, decay: float) -> None:
        self.decay = float(check_range("decay", decay, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False))
        self._averages: list[list[dict[str, torch.Tensor]]] = []  # [stack][block][parameter name]

    @staticmethod
    def keys(stacks: Sequence[Sequence[nn.Module]], depth: int) -> list[str]:
        """The :meth:`state_dict` keys that averages of positions ``0 .. depth - 1`` of ``stacks`` have.

        Examples:
            >>> BlockEMA.keys([nn.ModuleList([nn.Linear(2, 2)])], depth=1)
            ['0.0.weight', '0.0.bias']
        """
        return [
            f"{s}.{b}.{name}"
            for s, blocks in enumerate(stacks)
            for b in range(depth)
            for name, _ in blocks[b].named_parameters()
        ]

    @torch.no_grad()
    def reset(self, stacks: Sequence[Sequence[nn.Module]], depth: int) -> None:
        """Start the averages of positions ``0 .. depth - 1`` of every stack at the blocks' current weights.

        Averages held before (of any stack or position) are dropped.
        """
        for s, blocks in enumerate(stacks):
            if depth > len(blocks):
                raise ConfigurationError(f"cannot average {depth} blocks of stack {s}: it has {len(blocks)}")
        self._averages = [
            [
                {name: param.detach().to(torch.float32, copy=True) for name, param in blocks[b].named_parameters()}
                for b in range(depth)
            ]
            for blocks in stacks
        ]

    @torch.no_grad()
    def update(self, stacks: Sequence[Sequence[nn.Module]], depth: int) -> None:
        """One step of the average: ``ema = decay * ema + (1 - decay) * weight`` for positions ``0 .. depth - 1``.

        Call it once per optimizer step, after the step.

        Raises:
            ValueError: A block of those positions has no average, or its parameters are not the ones
                averaged (call :meth:`reset` or :meth:`grown` first).
        """
        averages: list[torch.Tensor] = []
        weights: list[torch.Tensor] = []
        for s, blocks in enumerate(stacks):
            for b in range(depth):
                store = self._block(s, b)
                count = 0
                for name, param in blocks[b].named_parameters():
                    average = store.get(name)
                    if average is None:
                        raise ValueError(f"BlockEMA has no average of {s}.{b}.{name}: the block changed since reset()")
                    if average.device != param.device:
                        average = store[name] = average.to(param.device)
                    averages.append(average)
                    weights.append(param.detach().float())
                    count += 1
                if count != len(store):
                    raise ValueError(f"BlockEMA averages {len(store)} tensors of block {s}.{b}, which has {count}")
        if averages:
            torch._foreach_lerp_(averages, weights, 1.0 - self.decay)

    def averages(self, stack_index: int) -> list[dict[str, torch.Tensor]]:
        """The averages of stack ``stack_index``, one ``{parameter name: tensor}`` per block position.

        The tensors are the live averages (for :func:`grow_blocks`'s ``copy_from``): read them, or
        clone them before changing them.
        """
        if not 0 <= stack_index < len(self._averages):
            raise ValueError(f"BlockEMA has no stack {stack_index}; it averages {len(self._averages)} stack(s)")
        return self._averages[stack_index]

    def grown(self, stack_index: int, sources: Sequence[tuple[int, bool]]) -> None:
        """Follow a growth of stack ``stack_index``: position ``p`` takes the average of block ``sources[p][0]``.

        ``sources`` is :func:`growth_sources`'s list. An original (``sources[p][1]``) takes its own
        average; a copy starts from a clone of its source's, so the two then average independently.
        """
        old = self.averages(stack_index)
        taken: set[int] = set()
        new = []
        for position, (source, original) in enumerate(sources):
            if not 0 <= source < len(old):
                raise ValueError(
                    f"growth of stack {stack_index} takes block {source} to position {position}, but only "
                    f"{len(old)} block(s) are averaged"
                )
            if original and source not in taken:
                new.append(old[source])
                taken.add(source)
            else:
                new.append({name: value.clone() for name, value in old[source].items()})
        self._averages[stack_index] = new

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages as ``{"<stack>.<block>.<parameter name>": tensor}`` (the live tensors, not copies)."""
        return {
            f"{s}.{b}.{name}": value
            for s, stack in enumerate(self._averages)
            for b, block in enumerate(stack)
            for name, value in block.items()
        }

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Replace the averages with copies of those in ``state_dict`` (as :meth:`state_dict` writes it).

        Raises:
            ValueError: A key is not ``"<stack>.<block>.<name>"``, or the stacks or blocks are not
                numbered ``0, 1, ...`` without gaps.
            TypeError: A value is not a tensor.
        """
        found: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        for key, value in state_dict.items():
            parts = key.split(".", 2)
            if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or not parts[2]:
                raise ValueError(f"BlockEMA state key {key!r} is not '<stack>.<block>.<parameter name>'")
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"BlockEMA state {key!r} is a {type(value).__name__}, not a tensor")
            found.setdefault(int(parts[0]), {}).setdefault(int(parts[1]), {})[parts[2]] = value
        if sorted(found) != list(range(len(found))):
            raise ValueError(f"BlockEMA state numbers its stacks {sorted(found)}; expected 0, 1, ... without gaps")
        averages = []
        for s in range(len(found)):
            if sorted(found[s]) != list(range(len(found[s]))):
                raise ValueError(
                    f"BlockEMA state numbers the blocks of stack {s} {sorted(found[s])}; expected 0, 1, ... without gaps"
                )
            averages.append(
                [
                    {name: value.detach().to(torch.float32, copy=True) for name, value in found[s][b].items()}
                    for b in range(len(found[s]))
                ]
            )
        self._averages = averages

    def _block(self, stack_index: int, block_index: int) -> dict[str, torch.Tensor]:
        stack = self.averages(stack_index)
        if not 0 <= block_index < len(stack):
            raise ValueError(
                f"BlockEMA has no average of block {stack_index}.{block_index}: it averages {len(stack)} "
                "block(s) of that stack (call reset() or grown() after growing)"
            )
        return stack[block_index]


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
        init: How a new block starts: ``"copy"`` (its source block's current weights) or
            ``"momentum"`` (MoGrow: the exponential moving average of its source block's parameters;
            buffers are still copied). Works with both rules.
        ema_decay: The decay of the moving average with ``init="momentum"``, in (0, 1): after each
            optimizer step ``ema = ema_decay * ema + (1 - ema_decay) * weight`` (AutoProg uses
            0.998-0.9996). It averages over about ``1 / (1 - ema_decay)`` steps (0.999: 1000) and
            still weighs the weights it started from ``t`` steps ago by ``ema_decay ** t`` (0.999 after
            100 steps: 0.90), so keep that horizon well below a stage's length. Unused with
            ``init="copy"``.

    With ``init="momentum"`` the average covers every parameter of the active blocks (positions
    ``0 .. depth - 1`` of every stack). It starts at the weights when training starts (or comes from
    the checkpoint on a resume) and is updated once per optimizer step (not per micro-batch under
    gradient accumulation), after the step, until the last growth (nothing reads it after). At a
    growth each copy takes its source's average, the originals keep their current weights, and each
    position's average becomes its source's (a moved block keeps its own; a copy averages on from the
    one it started at). Cost: one fp32 copy of the
    active blocks' parameters, ``4 * sum(numel of the active blocks' parameters)`` bytes (at the full
    depth 4 bytes per block parameter: ~340 MB for BERT-base's 85M block parameters), on their device
    and in every checkpoint; and per optimizer step one ``lerp`` over them (about 2 FLOPs and 12 bytes
    of memory traffic per parameter), until the last growth.

    Attributes:
        ema: The moving average (:class:`BlockEMA`) with ``init="momentum"``, else None.

    Logged every training step: ``progressive_stacking/depth``.

    Raises:
        ConfigurationError: A bad schedule, rule, init or ``ema_decay`` (in ``__init__``); at
            ``setup``, a schedule whose last depth is not the depth of every stack. A growth step at
            or after ``max_steps`` warns at ``setup`` (the run will not reach the full depth), and so
            does a fit that ends before the last stage.
        CheckpointMismatchError: At a resume, a checkpoint written with the other ``init``.
    """

    name = "progressive_stacking"
    hooks = ("setup", "teardown", "on_train_start", "on_train_batch_start", "on_train_batch_end")
    conflicts_with = ("layer_drop",)
    distributed_safe = True
    keep_after_fit = True  # validate / test / predict after fit see the depth that was trained
    compile_safe = True  # tests/test_compile.py: compiled training equals eager
    compile_note = "recompiles once at each growth (a new block list)"

    def __init__(
        self,
        stages: Mapping[int, int],
        rule: str = "stack",
        block_paths: Sequence[str] | None = None,
        init: str = "copy",
        ema_decay: float = 0.999,
    ) -> None:
        super().__init__()
        self.stages = validate_stages(stages)
        self.rule = check_choice("rule", rule, RULES)
        self.block_paths = list(block_paths) if block_paths else None
        self.init = check_choice("init", init, INITS)
        self.ema_decay = float(
            check_range("ema_decay", ema_decay, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        )
        self.ema = BlockEMA(self.ema_decay) if self.init == "momentum" else None
        self.depth = self.stages[0]
        self._stacks: list[Sequence[nn.Module]] = []
        self._ema_from_apply = False  # made again at train start unless a checkpoint replaces it
        self._step_at_batch_start: int | None = None

    def depth_at(self, step: int) -> int:
        """The scheduled depth at optimizer step ``step``.

        Examples:
            >>> ProgressiveStacking({0: 3, 10: 6}).depth_at(9), ProgressiveStacking({0: 3, 10: 6}).depth_at(10)
            (3, 6)
        """
        return [depth for start, depth in self.stages.items() if start <= step][-1]

    def plan_at(self, step: int, total_steps: int, num_blocks: int) -> dict[str, Any]:
        """The scheduled depth at optimizer step ``step``: blocks below it run (work 1.0), the rest are skipped (0.0).

        A growth happens at the start of its step, so the step of a stage already runs at the new depth.

        Examples:
            >>> ProgressiveStacking({0: 2, 10: 4}).plan_at(9, 20, 4)
            {'depth': 2, 'block_work': [1.0, 1.0, 0.0, 0.0]}
            >>> ProgressiveStacking({0: 2, 10: 4}).plan_at(10, 20, 4)["depth"]
            4
        """
        depth = self.depth_at(step)
        return {"depth": depth, "block_work": [1.0 if index < depth else 0.0 for index in range(num_blocks)]}

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
        if self.ema is not None:  # so that it exists before the first step (a resume replaces it)
            self.ema.reset(self._stacks, self.depth)
            self._ema_from_apply = True
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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fresh run averages from the weights as training starts: on their device, after every technique's
        # surgery and any weights loaded since apply. A resumed run keeps the average its checkpoint restored.
        if self.ema is not None and self._ema_from_apply:
            self.ema.reset(self._stacks, self.depth)
        self._ema_from_apply = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step
        target = self.depth_at(trainer.global_step)
        if target > self.depth:
            grow_stacks(self._stacks, self.depth, target, self.rule, growth_optimizer(trainer, self.name), self.ema)
            self.depth = target
        self.log_metrics(pl_module, {"depth": float(self.depth)})

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # once per optimizer step: a batch that only accumulated gradients left global_step where it was
        growing = self.depth < list(self.stages.values())[-1]  # the average is read only by a growth still to come
        if self.ema is not None and growing and self._step_at_batch_start not in (None, trainer.global_step):
            self.ema.update(self._stacks, self.depth)

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
        if self.ema is None:
            return {"depth": self.depth}
        return {"depth": self.depth, "ema": self.ema.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = "momentum" if "ema" in state_dict else "copy"
        if saved != self.init:
            raise CheckpointMismatchError(
                f"{self.name}: the checkpoint was written with init={saved!r}, but this run has init={self.init!r}; "
                f"resume with init={saved!r}, or start a new run"
            )
        depth = state_dict["depth"]
        if self.ema is not None:
            ema = state_dict["ema"]
            if self._stacks:  # applied: the averages must be those of this model's active blocks
                expected, saved_keys = BlockEMA.keys(self._stacks, depth), set(ema)
                if saved_keys != set(expected):
                    different = min(saved_keys.symmetric_difference(expected))
                    raise CheckpointMismatchError(
                        f"{self.name}: the checkpoint's moving average ({len(saved_keys)} tensors) does not match the "
                        f"active blocks of this model at depth {depth} ({len(expected)} tensors; {different!r} is in "
                        "one only); resume with the model and block_paths that wrote it"
                    )
            self.ema.load_state_dict(ema)
            self._ema_from_apply = False
        self.depth = depth
