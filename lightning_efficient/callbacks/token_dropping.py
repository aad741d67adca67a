"""TokenDropping: in MLM pretraining, run the middle blocks on a subset of the tokens only.

Token dropping (Hou et al. 2022) and random-LTD (Yao et al. 2022) save the compute of the middle
Transformer blocks on tokens that matter little there: the first blocks see the whole sequence,
then only the kept tokens go through the blocks ``layers = (first, last)`` of each encoder stack,
and after ``last`` the dropped tokens come back with the hidden state they had entering
``first`` (they skip the range), so the blocks after it and the prediction head see the full
sequence again. Position embeddings are added before the first block, so a gathered token keeps
its position. The linear layers cost ``K / T`` and attention ``(K / T)^2`` of the full sequence in
the range, and the FLOPs the :class:`~lightning_efficient.monitor.EfficiencyMonitor` counts follow
(it reads the shapes that run).

Which tokens are kept, for each sequence: always the positions the loss predicts (the masked
tokens, which the model reports as ``predicted_positions``) and position 0 ([CLS]); the rest of
the ``K = ceil(keep_fraction * T)`` are drawn at random among the real tokens (random-LTD's rule;
:func:`select_kept_tokens` also ranks by given importance scores, Hou et al.'s rule, for use in a
plain PyTorch loop); padding goes first. ``K`` grows to the largest number of predicted positions
in a row if that is more. One subset serves the whole range (Hou et al.'s structure; random-LTD
draws a subset per block). The kept fraction is fixed, or moves linearly from ``keep_fraction``
to ``final_keep_fraction`` over ``schedule_steps`` optimizer steps (random-LTD grows it to the full
sequence). Evaluation and prediction run the full sequence.

The draws come from a generator seeded anew at every batch from ``(seed, rank, optimizer step,
micro-batch)``: a resumed run draws what the uninterrupted run would have, and the checkpointed
state is the same on every rank (each rank drops different tokens of its own batch).

Models: the callback needs the module to say which positions are predicted: an attribute
``predicted_positions``, a ``(B, T)`` bool tensor while the encoder runs (``BertMLM`` sets it in
``masked_logits``; the protocol is stated in :mod:`lightning_efficient.losses`). A model without it
(translation, image classification) is refused at setup.

Your own module takes part in two steps (the last example below): set
``self.predicted_positions = None`` in ``__init__`` (the attribute is what the callback checks for
at setup), and run the encoder inside ``with predicting(self, labels != -100):``
(:func:`lightning_efficient.losses.predicting` sets the mask and clears it afterwards, also on
error). The blocks must be in a stack the block locator finds (HF encoders,
``nn.TransformerEncoder``, a registered block class; else pass ``block_paths``); a padding mask
reaches them as ``attention_mask`` (HF) or ``src_key_padding_mask`` (torch), and the callback
restricts it to the kept tokens. A run that forgets ``predicting`` trains on the full sequence,
with a warning.

Examples:
    >>> import lightning.pytorch as pl
    >>> from lightning_efficient import BertMLM, MLMDataModule
    >>> dm = MLMDataModule(vocab_size=2000, max_length=32, batch_size=8)
    >>> dropping = TokenDropping(keep_fraction=0.5)  # the tiny preset's 3 blocks: block 1 on 16 of 32 tokens
    >>> trainer = pl.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
    ...                      enable_checkpointing=False, enable_model_summary=False, callbacks=[dropping])
    >>> trainer.fit(BertMLM(vocab_size=dm.vocab_size, preset="tiny", max_length=32), dm)
    >>> dropping.ranges, round(float(trainer.callback_metrics["token_dropping/kept_tokens"]), 2)
    ([(1, 1)], 0.5)
    >>> TokenDropping(keep_fraction=0.0)
    Traceback (most recent call last):
    ...
    lightning_efficient.errors.ConfigurationError: keep_fraction=0.0 must lie in (0.0, 1.0]

    Your own masked-LM module, with the hook:

    >>> import torch.nn.functional as F
    >>> from lightning_efficient.losses import predicting
    >>> from lightning_efficient.testing import quiet_trainer
    >>> class MyMaskedLM(pl.LightningModule):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.predicted_positions = None  # the hook: TokenDropping reads it while the encoder runs
    ...         self.embed, self.head = nn.Embedding(50, 16), nn.Linear(16, 50)
    ...         layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    ...         self.encoder = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
    ...
    ...     def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
    ...         ids, labels = batch  # labels: -100 where nothing is predicted
    ...         with predicting(self, labels != -100):  # these positions are never dropped
    ...             hidden = self.encoder(self.embed(ids))
    ...         return F.cross_entropy(self.head(hidden).flatten(0, 1), labels.flatten())
    ...
    ...     def configure_optimizers(self) -> torch.optim.Optimizer:
    ...         return torch.optim.AdamW(self.parameters(), lr=1e-3)
    >>> generator = torch.Generator().manual_seed(0)
    >>> ids = torch.randint(1, 50, (16, 12), generator=generator)
    >>> labels = torch.where(torch.rand(16, 12, generator=generator) < 0.15, ids, -100)
    >>> loader = torch.utils.data.DataLoader(list(zip(ids, labels)), batch_size=4)
    >>> dropping = TokenDropping(keep_fraction=0.5)  # blocks 1 and 2 of the 4 on 6 of the 12 tokens
    >>> trainer = quiet_trainer(max_steps=2, callbacks=[dropping])
    >>> trainer.fit(MyMaskedLM(), loader)
    >>> dropping.ranges, round(float(trainer.callback_metrics["token_dropping/kept_tokens"]), 2)
    ([(1, 2)], 0.5)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_efficient.blocks import (
    HIDDEN_KEYWORDS,
    Priority,
    block_hidden_states,
    find_block_stacks,
    wrap_forward,
)
from lightning_efficient.errors import ConfigurationError, NoTargetModulesError
from lightning_efficient.losses import PREDICTED_POSITIONS
from lightning_efficient.technique import Technique, check_range

__all__ = [
    "TOKEN_DROP_PRIORITY",
    "TokenDropping",
    "gather_mask",
    "gather_tokens",
    "keep_count",
    "scatter_tokens",
    "scheduled_keep_fraction",
    "select_kept_tokens",
]

#: Priority of the token-dropping wrappers: outside :data:`~lightning_efficient.blocks.SKIP_PRIORITY`,
#: so a block that LayerDrop or ProgressiveStacking skips passes the shortened sequence through.
TOKEN_DROP_PRIORITY = Priority.TOKEN_DROP

#: Keyword names of the attention masks a block may take (HF layers, ``nn.TransformerEncoderLayer``).
MASK_KEYWORDS = ("attention_mask", "src_key_padding_mask", "src_mask")

_MASK64 = (1 << 64) - 1


# -- pure functions ------------------------------------------------------------------------------
def keep_count(fraction: float, length: int) -> int:
    """Tokens kept of ``length`` at ``fraction``: ``ceil(fraction * length)``, at least 1.

    Examples:
        >>> keep_count(0.5, 128), keep_count(0.3, 10), keep_count(0.01, 16), keep_count(1.0, 7)
        (64, 3, 1, 7)
    """
    return max(1, min(length, math.ceil(fraction * length - 1e-9)))  # 1e-9: 0.3 * 10 is 3.0000000000000004


def scheduled_keep_fraction(step: int, start: float, final: float | None = None, steps: int | None = None) -> float:
    """The kept fraction at optimizer step ``step``: ``start``, or linear from ``start`` to ``final`` over ``steps``.

    Examples:
        >>> [scheduled_keep_fraction(t, 0.5, 1.0, 100) for t in (0, 50, 100, 150)]
        [0.5, 0.75, 1.0, 1.0]
        >>> scheduled_keep_fraction(70, 0.5)
        0.5
    """
    if final is None or not steps:
        return start
    return start + (final - start) * min(step / steps, 1.0)


def select_kept_tokens(
    required: torch.Tensor,
    keep: int,
    generator: torch.Generator | None = None,
    real: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """The positions to keep in each sequence, ``(B, K)`` sorted ascending.

    Every ``required`` position is kept; the others are filled with real tokens, drawn at random
    (random-LTD) or, given ``scores``, the highest-scoring first (Hou et al.'s importance); padding
    comes last. ``K = max(keep, most required positions in a row)``, at most ``T``; a row with fewer
    than ``K`` real tokens keeps some padding (which the gathered attention mask still masks out).

    Args:
        required: ``(B, T)`` bool: positions that must be kept (the predicted ones, [CLS]).
        keep: Positions to keep per row (before raising it to the required count).
        generator: Source of the random draw (CPU); ignored with ``scores``.
        real: ``(B, T)`` bool, True for real tokens (None: all are real).
        scores: ``(B, T)`` importance of each token (higher: kept first), instead of a random draw.

    Examples:
        >>> required = torch.tensor([[True, False, False, True, False, False]])
        >>> real = torch.tensor([[True, True, True, True, True, False]])
        >>> select_kept_tokens(required, 3, scores=torch.tensor([[0.0, 0.1, 0.9, 0.0, 0.5, 1.0]]), real=real)
        tensor([[0, 2, 3]])
        >>> select_kept_tokens(required, 1, torch.Generator().manual_seed(0))  # raised to the 2 required
        tensor([[0, 3]])
    """
    batch, length = required.shape
    keep = min(length, max(keep, int(required.sum(dim=1).max())))
    if scores is None:
        tiebreak = torch.rand((batch, length), generator=generator).to(required.device)  # [0, 1)
    else:  # ranks in [0, 1): only the order of the scores counts
        tiebreak = scores.argsort(dim=1).argsort(dim=1).to(torch.float64) / length
    real_tokens = torch.ones_like(required) if real is None else real.to(required.device, torch.bool)
    rank = tiebreak + real_tokens.to(tiebreak.dtype) + 2 * required.to(tiebreak.dtype)  # required > real > pad
    return rank.topk(keep, dim=1).indices.sort(dim=1).values


def _take(values: torch.Tensor, indices: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``values`` restricted, along ``dim``, to the positions ``indices`` ``(B, K)`` of each row of dimension 0.

    One advanced-indexing copy of the kept rows (its backward an indexed add): ``torch.gather`` with an
    index expanded over the hidden size costs several times more on the CPU, forward and backward.
    """
    rows = torch.arange(indices.shape[0], device=indices.device)[:, None]
    return values.movedim(dim, 1)[rows, indices].movedim(1, dim)


def gather_tokens(hidden: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The rows ``indices`` ``(B, K)`` of each sequence of ``hidden`` ``(B, T, ...)``: ``(B, K, ...)``.

    Examples:
        >>> gather_tokens(torch.arange(6.0).view(1, 3, 2), torch.tensor([[0, 2]])).tolist()
        [[[0.0, 1.0], [4.0, 5.0]]]
    """
    return _take(hidden, indices)


def scatter_tokens(full: torch.Tensor, kept: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``full`` ``(B, T, ...)`` with the rows ``indices`` replaced by ``kept`` ``(B, K, ...)`` (out of place).

    Gradients flow to ``kept`` at the kept positions and to ``full`` everywhere else.

    Examples:
        >>> full = torch.zeros(1, 3, 2)
        >>> scatter_tokens(full, torch.ones(1, 2, 2), torch.tensor([[0, 2]])).tolist()
        [[[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]]
    """
    dtype = torch.promote_types(full.dtype, kept.dtype)  # autocast may hand the two over in different dtypes
    rows = torch.arange(indices.shape[0], device=indices.device)[:, None]
    return full.to(dtype).index_put((rows, indices), kept.to(dtype))  # indices are unique in a row: no accumulation


def gather_mask(mask: torch.Tensor | None, indices: torch.Tensor) -> torch.Tensor | None:
    """An attention mask restricted to the kept tokens, in its own form (bool or additive).

    Takes a key-padding mask ``(B, T)``, or ``(B, T)``-keyed masks ``(B | 1, heads | 1, T | 1, T)``
    and ``(B | 1, T | 1, T)``: the key dimension, and the query dimension when it is ``T``, are
    restricted to ``indices`` ``(B, K)``.

    Examples:
        >>> mask = torch.tensor([[[[0.0, -1e9, 0.0]]]])  # (1, 1, 1, 3): key 1 is masked
        >>> gather_mask(mask, torch.tensor([[1, 2]])).tolist()
        [[[[-1000000000.0, 0.0]]]]
    """
    if mask is None:
        return None
    batch = indices.shape[0]
    if mask.dim() == 2:
        return _take(mask.expand(batch, -1), indices)
    if mask.dim() not in (3, 4):
        raise ValueError(
            f"token dropping cannot restrict an attention mask of shape {tuple(mask.shape)} to the kept tokens"
        )
    squeeze = mask.dim() == 3
    mask = mask.unsqueeze(1) if squeeze else mask
    mask = mask.expand(batch, *mask.shape[1:])
    queries, length = mask.shape[2:]
    mask = _take(mask, indices, dim=3)  # keys
    if queries == length:
        mask = _take(mask, indices, dim=2)  # queries
    mask = mask.contiguous()  # the copies leave the kept dimensions outermost
    return mask.squeeze(1) if squeeze else mask


def _real_tokens(name: str, mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """``(B, T)`` bool, True for the real tokens that an attention mask lets be attended (None: all)."""
    if mask is None:
        return None
    if name == "src_key_padding_mask":  # nn.TransformerEncoderLayer: True or -inf at padding
        return ~mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if mask.dim() == 2:  # HF's (B, T) form: 1 at real tokens (or an additive 0 / -inf mask)
        if mask.dtype == torch.bool:
            return mask.expand(batch, -1)
        if mask.is_floating_point() and bool((mask < 0).any()):
            return (mask > torch.finfo(mask.dtype).min / 2).expand(batch, -1)
        return (mask != 0).expand(batch, -1)
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    allowed = allowed.expand(batch, *allowed.shape[1:])
    return allowed.reshape(batch, -1, allowed.shape[-1]).any(dim=1)  # a key some query may attend to


def _stream_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64), so neighbouring steps get unrelated streams."""
    state = 0
    for value in values:
        state = (state ^ (value & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        state = (state ^ (state >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state & ((1 << 63) - 1)


# -- the callback ----------------------------------------------------------------------------------
@dataclass
class _Dropped:
    """One encoder call's dropping, from the first block of the range to the last."""

    indices: torch.Tensor  # (B, K) kept positions, sorted
    entering: torch.Tensor  # (B, T, H) the hidden states entering the range
    masks: dict[int | str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # where: (mask, restricted)

    def restrict(self, where: int | str, mask: torch.Tensor | None) -> torch.Tensor | None:
        """``mask`` restricted to the kept tokens, restricted once for the blocks of the range that share it."""
        if mask is None:
            return None
        cached = self.masks.get(where)
        if cached is None or cached[0] is not mask:
            cached = self.masks[where] = (mask, gather_mask(mask, self.indices))
        return cached[1]


def _replace_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The block call's arguments with its hidden states replaced (where :func:`block_hidden_states` found them)."""
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    name = next(name for name in HIDDEN_KEYWORDS if isinstance(kwargs.get(name), torch.Tensor))
    return args, {**kwargs, name: hidden}


def _masks(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[int | str, str, torch.Tensor | None]]:
    """Where a block call's attention masks are: ``(position or keyword, mask name, mask)``."""
    found: list[tuple[int | str, str, torch.Tensor | None]] = []
    if len(args) > 1 and (args[1] is None or isinstance(args[1], torch.Tensor)):
        found.append((1, "attention_mask", args[1]))  # HF layers: (hidden_states, attention_mask, ...)
    found.extend((name, name, kwargs[name]) for name in MASK_KEYWORDS if name in kwargs)
    return found


class TokenDropping(Technique):
    """Run the middle blocks of each encoder stack on the predicted tokens and a random share of the rest.

    Args:
        keep_fraction: Share of the sequence length kept in the dropped blocks, in (0, 1] (1: no
            dropping); the start of the schedule with ``final_keep_fraction``.
        final_keep_fraction: If given, the kept fraction moves linearly from ``keep_fraction`` to
            this over ``schedule_steps`` optimizer steps (random-LTD: up to 1), in (0, 1].
        schedule_steps: Length of that schedule in optimizer steps (>= 1); by default the run's
            (``trainer.estimated_stepping_batches`` at the first fit, kept in checkpoints).
        layers: ``(first, last)`` block indices (inclusive) of the dropped range in each encoder
            stack; by default every block but the first and the last (random-LTD's choice).
        seed: Seed of the draws (mixed with the rank, the optimizer step and the micro-batch).
        block_paths: Attribute paths of the block lists, for models the block locator does not
            know (e.g. ``["model.layers"]``); by default every encoder stack found.

    Logged every training step: ``token_dropping/keep_fraction`` (the scheduled fraction) and
    ``token_dropping/kept_tokens`` (the realised ``K / T``: higher when a row predicts more
    positions than the fraction keeps; 1 when nothing was dropped).

    Attributes:
        ranges: The ``(first, last)`` range of each stack, once applied.
    """

    name = "token_dropping"
    hooks = ("setup", "on_train_start", "on_train_batch_start", "on_train_batch_end")
    distributed_safe = True
    compile_safe = True
    compile_note = "a graph break at the kept tokens' draw in the block wrapper (new kept counts: new shapes)"

    def __init__(
        self,
        keep_fraction: float = 0.5,
        final_keep_fraction: float | None = None,
        schedule_steps: int | None = None,
        layers: tuple[int, int] | None = None,
        seed: int = 0,
        block_paths: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        bounds = {"low": 0.0, "high": 1.0, "low_inclusive": False}
        self.keep_fraction = float(check_range("keep_fraction", keep_fraction, **bounds))
        self.final_keep_fraction = (
            None
            if final_keep_fraction is None
            else float(check_range("final_keep_fraction", final_keep_fraction, **bounds))
        )
        if schedule_steps is not None:
            if isinstance(schedule_steps, bool) or not isinstance(schedule_steps, int) or schedule_steps < 1:
                raise ConfigurationError(f"schedule_steps={schedule_steps!r} must be an integer >= 1 or None")
            if final_keep_fraction is None:
                raise ConfigurationError(
                    f"schedule_steps={schedule_steps} schedules nothing without final_keep_fraction; pass both or neither"
                )
        self.schedule_steps = schedule_steps
        if layers is not None:
            pair = tuple(layers)
            if len(pair) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
                raise ConfigurationError(f"layers={layers!r} must be a pair (first, last) of block indices")
            if not 0 <= pair[0] <= pair[1]:
                raise ConfigurationError(f"layers={pair!r} must satisfy 0 <= first <= last (inclusive block indices)")
            layers = (pair[0], pair[1])
        self.layers = layers
        self.seed = seed
        self.block_paths = list(block_paths) if block_paths else None
        self.ranges: list[tuple[int, int]] = []
        self._module: nn.Module | None = None
        self._total_steps: int | None = None  # the schedule's length, resolved at the first fit
        self._last_step, self._micro = -1, 0
        self._fraction = self.keep_fraction
        self._generator = torch.Generator().manual_seed(_stream_seed(seed, 0, 0, 0))
        self._active: dict[int, _Dropped | None] = {}
        self._realised: list[float] = []
        self._warned = False

    # -- surgery --------------------------------------------------------------------------------
    def apply(self, pl_module: nn.Module) -> list[Any]:
        if not hasattr(pl_module, PREDICTED_POSITIONS):
            raise ConfigurationError(
                f"token_dropping never drops the positions the loss predicts, and {type(pl_module).__name__} does not "
                "say which they are: it has no attribute predicted_positions. A masked-LM module (like BertMLM) sets "
                "it to the (B, T) bool mask labels != -100 while its encoder runs; a model that predicts from every "
                "position or from a pooled one (translation, image classification) cannot drop tokens"
            )
        stacks = [stack for stack in find_block_stacks(pl_module, self.block_paths) if stack.role != "decoder"]
        if not stacks:
            raise NoTargetModulesError(
                f"token_dropping acts on encoder stacks, and {type(pl_module).__name__} has only decoder stacks"
            )
        handles, self.ranges = [], []
        for s, stack in enumerate(stacks):
            depth = len(stack)
            if self.layers is None:
                if depth < 3:
                    raise ConfigurationError(
                        f"token_dropping's default range (every block but the first and the last) is empty for "
                        f"{type(pl_module).__name__}'s stack {stack.path!r} of {depth} blocks; pass layers=(first, last)"
                    )
                first, last = 1, depth - 2
            else:
                first, last = self.layers
                if last >= depth:
                    raise ConfigurationError(
                        f"layers={self.layers!r} is outside {type(pl_module).__name__}'s stack {stack.path!r}: it has "
                        f"{depth} blocks (indices 0 to {depth - 1})"
                    )
            self.ranges.append((first, last))
            handles.extend(
                wrap_forward(block, functools.partial(self._forward, s, i, first, last, block), TOKEN_DROP_PRIORITY)
                for i, block in enumerate(stack.blocks)
                if first <= i <= last
            )
        self._module = pl_module
        return handles

    def remove(self, pl_module: nn.Module) -> None:
        super().remove(pl_module)
        self._module, self._active = None, {}

    def _forward(
        self, stack: int, index: int, first: int, last: int, block: nn.Module, forward: Any, *args: Any, **kwargs: Any
    ) -> Any:
        if index == first:
            self._active[stack] = self._start(block, args, kwargs)
        state = self._active.get(stack)
        if state is None:  # evaluation, nothing to drop, or nothing predicted
            return forward(*args, **kwargs)
        if index == first:
            args, kwargs = _replace_hidden(args, kwargs, gather_tokens(state.entering, state.indices))
        for where, name, mask in _masks(args, kwargs):
            if name == "src_mask" and mask is not None:
                raise ValueError(
                    "token dropping cannot restrict a src_mask (one mask for every sequence) to each row's kept tokens"
                )
            if isinstance(where, int):
                args = (*args[:where], state.restrict(where, mask), *args[where + 1 :])
            else:
                kwargs = {**kwargs, where: state.restrict(where, mask)}
        if isinstance(kwargs.get("position_ids"), torch.Tensor):
            positions = kwargs["position_ids"]
            kwargs = {**kwargs, "position_ids": positions.expand(state.indices.shape[0], -1).gather(1, state.indices)}
        output = forward(*args, **kwargs)
        if index != last:
            return output
        self._active[stack] = None
        hidden = output[0] if isinstance(output, tuple) else output
        restored = scatter_tokens(state.entering, hidden, state.indices)  # (B, T, H): dropped tokens as they entered
        return (restored, *output[1:]) if isinstance(output, tuple) else restored

    def _start(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Dropped | None:
        """At the first block of the range: choose the kept tokens of this call (None: keep all)."""
        if not block.training:
            return None
        required = getattr(self._module, PREDICTED_POSITIONS, None)
        if required is None:
            if not self._warned:
                self._warned = True
                rank_zero_warn(
                    f"TokenDropping: {type(self._module).__name__} ran its encoder in training mode without "
                    "predicted_positions, so the full sequence ran; set it to the (B, T) bool mask of predicted "
                    "positions while the encoder runs"
                )
            return None
        hidden = block_hidden_states(args, kwargs)
        batch, length = hidden.shape[:2]
        if tuple(required.shape) != (batch, length):
            raise ValueError(
                f"predicted_positions has shape {tuple(required.shape)}, but the blocks run on {batch} sequences of "
                f"{length} tokens; it must be (B, T) = ({batch}, {length})"
            )
        required = required.to(hidden.device, torch.bool)
        real = None
        for _, name, mask in _masks(args, kwargs):
            if name != "src_mask" and mask is not None:
                real = _real_tokens(name, mask, batch)
                break
        required = required.clone()
        required[:, 0] |= torch.ones_like(required[:, 0]) if real is None else real[:, 0]  # [CLS], if it is real
        indices = select_kept_tokens(required, keep_count(self._fraction, length), self._generator, real)
        self._realised.append(indices.shape[1] / length)
        if indices.shape[1] == length:
            return None
        return _Dropped(indices, hidden)

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._total_steps, self._last_step, self._micro = None, -1, 0  # a resumed run loads them after this
        self._warned = False
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.final_keep_fraction is None or self._total_steps is not None:
            return
        total = self.schedule_steps or trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ConfigurationError(
                f"token_dropping's schedule to final_keep_fraction={self.final_keep_fraction} needs a length: the run's "
                f"is {total}; pass schedule_steps or set trainer.max_steps"
            )
        self._total_steps = int(total)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._micro = self._micro + 1 if step == self._last_step else 0  # micro-batches of one optimizer step
        self._last_step = step
        self._fraction = scheduled_keep_fraction(step, self.keep_fraction, self.final_keep_fraction, self._total_steps)
        self._generator.manual_seed(_stream_seed(self.seed, trainer.global_rank, step, self._micro))  # no new generator
        self._realised = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        kept = sum(self._realised) / len(self._realised) if self._realised else 1.0
        self.log_metrics(pl_module, {"keep_fraction": self._fraction, "kept_tokens": kept})

    def plan_at(self, step: int, total_steps: int, num_blocks: int) -> dict[str, Any]:
        """The kept fraction of the tokens at optimizer step ``step``, and each block's share of its work.

        ``keep_fraction`` follows :func:`scheduled_keep_fraction` over ``schedule_steps`` (by default
        the run's ``total_steps``, as at the first fit). ``block_work`` is that fraction for the
        blocks of the dropped range of a stack of ``num_blocks`` (``layers``, by default all but the
        first and the last) and 1.0 elsewhere. The plan's scaling is linear in the tokens: a block's
        linear layers cost ``K / T`` of their full work, but its attention ``(K / T)^2``, and ``K``
        rises to the most predicted positions in a row; so the work of a dropped block is slightly
        overstated (at BERT-small's 128 tokens attention is about 8% of a block).

        Examples:
            >>> TokenDropping(keep_fraction=0.5).plan_at(0, 100, 4)
            {'keep_fraction': 0.5, 'block_work': [1.0, 0.5, 0.5, 1.0]}
            >>> TokenDropping(keep_fraction=0.5, final_keep_fraction=1.0).plan_at(50, 100, 3)
            {'keep_fraction': 0.75, 'block_work': [1.0, 0.75, 1.0]}
        """
        fraction = scheduled_keep_fraction(
            step, self.keep_fraction, self.final_keep_fraction, self.schedule_steps or total_steps
        )
        first, last = self.layers if self.layers is not None else (1, num_blocks - 2)
        return {
            "keep_fraction": fraction,
            "block_work": [fraction if first <= index <= last else 1.0 for index in range(num_blocks)],
        }

    def state_dict(self) -> dict[str, Any]:
        return {"schedule_steps": self._total_steps, "last_step": self._last_step, "micro": self._micro}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._total_steps = state_dict["schedule_steps"]
        self._last_step = state_dict["last_step"]
        self._micro = state_dict["micro"]
