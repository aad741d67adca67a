"""Structured units of a Transformer block (attention heads, FFN neurons): find them, score them, mask them.

The units of a block come from its entry in :mod:`lightning_efficient.architectures`
(:func:`~lightning_efficient.architectures.block_view`), so a block class described once with
:func:`~lightning_efficient.architectures.register_architecture` is pruned like the built-in ones.
A head is ranked by the L2 norm of its query, key and value rows and its columns of the attention
output projection; an FFN neuron by the norm of its row of the first FFN layer and its column of
the second.

Examples:
    >>> from lightning_efficient import BertMLM
    >>> units = block_units(BertMLM(vocab_size=50, preset="tiny").model.bert.encoder.layer[0])
    >>> units.attentions[0].heads_attribute, units.attentions[0].width_attribute, neuron_scores(units.ffn).shape
    ('num_attention_heads', 'all_head_size', torch.Size([37]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_efficient.architectures import block_view
from lightning_efficient.callbacks.pruning.masks import MASK, SCOPES, _lowest_k
from lightning_efficient.callbacks.pruning.schedule import _count
from lightning_efficient.errors import check_choice

__all__ = [
    "AttentionUnit",
    "BlockUnits",
    "FeedForwardUnit",
    "block_units",
    "head_scores",
    "neuron_scores",
    "structured_masks",
]


@dataclass
class AttentionUnit:
    """The prunable heads of one attention module.

    Attributes:
        module: The attention module holding the head count (updated when heads are sliced away).
        heads_attribute: Its attribute holding the number of heads.
        head_size: Features per head.
        inputs: The query, key and value projections (one row block of ``head_size`` per head).
        output: The output projection (one column block per head).
        width_attribute: Its attribute holding ``heads * head_size``, updated with the head count
            (HF BERT's ``all_head_size``), or None.
    """

    module: nn.Module
    heads_attribute: str
    head_size: int
    inputs: list[nn.Linear]
    output: nn.Linear
    width_attribute: str | None = None

    @property
    def heads(self) -> int:
        return self.output.in_features // self.head_size


@dataclass
class FeedForwardUnit:
    """The prunable neurons of one FFN: rows of ``inputs``, columns of ``output``."""

    inputs: nn.Linear
    output: nn.Linear

    @property
    def neurons(self) -> int:
        return self.output.in_features


@dataclass
class BlockUnits:
    """The attention modules and the FFN of one Transformer block."""

    attentions: list[AttentionUnit]
    ffn: FeedForwardUnit | None


def block_units(block: nn.Module) -> BlockUnits:
    """The attention heads and FFN neurons of a Transformer block, from its architecture entry.

    An attention whose Q, K and V are one fused parameter (``nn.TransformerEncoderLayer``'s
    ``nn.MultiheadAttention``, ``in_proj_weight``) cannot lose heads, so it yields no attention unit.

    Raises:
        ConfigurationError: ``block``'s class has no architecture entry (the message names the known
            classes and :func:`~lightning_efficient.architectures.register_architecture`).

    Examples:
        >>> from lightning_efficient import BertMLM
        >>> units = block_units(BertMLM(vocab_size=50, preset="tiny").model.bert.encoder.layer[0])
        >>> [(a.heads, a.head_size) for a in units.attentions], units.ffn.neurons
        ([(4, 8)], 37)
        >>> units = block_units(nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=5))
        >>> units.attentions, units.ffn.neurons
        ([], 5)
    """
    view = block_view(block)
    attentions = [
        AttentionUnit(
            attention.module,
            attention.layout.heads,
            attention.head_size,
            list(attention.projections),
            attention.output,
            attention.layout.width_attribute,
        )
        for attention in view.attentions
        if not attention.fused
    ]
    ffn = FeedForwardUnit(view.ffn.first, view.ffn.second) if view.ffn is not None else None
    return BlockUnits(attentions, ffn)


def head_scores(unit: AttentionUnit) -> torch.Tensor:
    """The L2 norm of each head's query/key/value rows and output-projection columns, ``(heads,)``.

    Examples:
        >>> from lightning_efficient import BertMLM
        >>> unit = block_units(BertMLM(vocab_size=50, preset="tiny").model.bert.encoder.layer[0]).attentions[0]
        >>> head_scores(unit).shape
        torch.Size([4])
    """
    d = unit.head_size
    squares = sum(x.weight.detach().float().pow(2).view(-1, d, x.in_features).sum(dim=(1, 2)) for x in unit.inputs)
    squares = squares + unit.output.weight.detach().float().pow(2).view(unit.output.out_features, -1, d).sum(dim=(0, 2))
    return squares.sqrt()


def neuron_scores(unit: FeedForwardUnit) -> torch.Tensor:
    """The L2 norm of each FFN neuron's input row and output column, ``(neurons,)``.

    Examples:
        >>> unit = FeedForwardUnit(nn.Linear(4, 3), nn.Linear(3, 4))
        >>> neuron_scores(unit).shape
        torch.Size([3])
    """
    squares = unit.inputs.weight.detach().float().pow(2).sum(1) + unit.output.weight.detach().float().pow(2).sum(0)
    return squares.sqrt()


def _alive_heads(unit: AttentionUnit) -> torch.Tensor:
    """Heads whose output columns are not all masked (or, without masks, not all zero), ``(heads,)`` bool."""
    source = unit.output._buffers.get(MASK, unit.output.weight)
    return source.detach().view(unit.output.out_features, -1, unit.head_size).ne(0).any(dim=2).any(dim=0)


def _alive_neurons(unit: FeedForwardUnit) -> torch.Tensor:
    source = unit.output._buffers.get(MASK, unit.output.weight)
    return source.detach().ne(0).any(dim=0)


def _rank_units(
    scores: list[torch.Tensor], alive: list[torch.Tensor], sparsity: float, scope: str
) -> list[torch.Tensor]:
    """Keep-masks over groups of units (heads of each attention, neurons of each FFN); each group keeps >= 1."""
    ranked = []
    for score, live in zip(scores, alive):
        score = torch.where(live, score, torch.full_like(score, -1.0))
        protected = score.argmax()  # the best unit of every group survives
        score[protected] = math.inf
        ranked.append(score)
    if scope == "per_layer":
        return [_lowest_k(score, min(_count(sparsity, score.numel()), score.numel() - 1)) for score in ranked]
    flat = torch.cat(ranked)
    keep = _lowest_k(flat, min(_count(sparsity, flat.numel()), flat.numel() - len(ranked)))
    return list(keep.split([score.numel() for score in ranked]))


@torch.no_grad()
def structured_masks(
    units: Sequence[BlockUnits], sparsity: float, heads: bool = True, neurons: bool = True, scope: str = "per_layer"
) -> None:
    """Prune the ``sparsity`` share of heads and/or FFN neurons by norm, writing the masks of their Linear layers.

    The Linear layers must carry masks (:func:`~lightning_efficient.callbacks.pruning.masks.add_masks`,
    with ``bias=True`` for the projections whose rows are pruned). Pruned units stay pruned; every
    attention keeps at least one head and every FFN one neuron. Weights are not touched: call
    :func:`~lightning_efficient.callbacks.pruning.masks.apply_masks` after.

    Examples:
        >>> from lightning_efficient import BertMLM
        >>> from lightning_efficient.callbacks.pruning.masks import add_masks
        >>> units = [block_units(b) for b in BertMLM(vocab_size=50, preset="tiny").model.bert.encoder.layer]
        >>> _ = [add_masks([*a.inputs], bias=True) and add_masks([a.output]) for u in units for a in u.attentions]
        >>> _ = [add_masks([u.ffn.inputs], bias=True) and add_masks([u.ffn.output]) for u in units]
        >>> structured_masks(units, 0.5)
        >>> [int(_alive_heads(u.attentions[0]).sum()) for u in units], [int(_alive_neurons(u.ffn).sum()) for u in units]
        ([2, 2, 2], [18, 18, 18])
    """
    check_choice("scope", scope, SCOPES)
    attentions = [a for u in units for a in u.attentions] if heads else []
    if attentions:
        scores, alive = [head_scores(a) for a in attentions], [_alive_heads(a) for a in attentions]
        keeps = _rank_units(scores, alive, sparsity, scope)
        for unit, keep in zip(attentions, keeps):
            rows = keep.repeat_interleave(unit.head_size)  # (heads * head_size,)
            for linear in unit.inputs:
                linear.weight_mask.copy_(rows[:, None].expand_as(linear.weight))
                if linear.bias is not None:
                    linear.bias_mask.copy_(rows)
            unit.output.weight_mask.copy_(rows[None, :].expand_as(unit.output.weight))
    ffns = [u.ffn for u in units if u.ffn is not None] if neurons else []
    if ffns:
        keeps = _rank_units([neuron_scores(f) for f in ffns], [_alive_neurons(f) for f in ffns], sparsity, scope)
        for unit, keep in zip(ffns, keeps):
            unit.inputs.weight_mask.copy_(keep[:, None].expand_as(unit.inputs.weight))
            if unit.inputs.bias is not None:
                unit.inputs.bias_mask.copy_(keep)
            unit.output.weight_mask.copy_(keep[None, :].expand_as(unit.output.weight))
