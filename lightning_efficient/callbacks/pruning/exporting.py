"""Make pruning permanent: masks into the weights, pruned heads and FFN neurons sliced out; save and reload HF models.

:func:`export_pruned` multiplies every mask into its weight and deletes the mask buffers; with
``shrink=True`` it also slices the Linear layers of the blocks so that pruned heads and neurons are
gone (the blocks become smaller dense modules, which run with fewer FLOPs). Which layers make up a
head or a neuron, and which attribute holds the head count, come from the blocks' entries in
:mod:`lightning_efficient.architectures`. HF models inside the model get their new shapes written
into their config, so :func:`load_pruned` (or plain ``from_pretrained``, for shapes the config can
express) reads a saved copy back.

Examples:
    >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=6)
    >>> encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    >>> with torch.no_grad():
    ...     _ = encoder.layers[0].linear2.weight[:, :2].zero_()  # two dead FFN neurons in block 0
    >>> report = export_pruned(encoder)
    >>> report["neurons_removed"], encoder.layers[0].linear1.out_features, encoder.layers[1].linear1.out_features
    (2, 4, 6)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_efficient.architectures import architecture_of, attention_views, block_view
from lightning_efficient.blocks import find_block_stacks
from lightning_efficient.callbacks.pruning.masks import remove_masks
from lightning_efficient.callbacks.pruning.structured import BlockUnits, _alive_heads, _alive_neurons, block_units
from lightning_efficient.exported import load_pruned

__all__ = ["export", "export_pruned", "load_pruned"]


@torch.no_grad()
def _slice_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> None:
    """Keep only the rows (``dim=0``) or columns (``dim=1``) of ``linear`` where ``keep`` is True, in place."""
    index = keep.nonzero().squeeze(1)
    linear.weight = nn.Parameter(linear.weight.index_select(dim, index).clone(), linear.weight.requires_grad)
    if dim == 0:
        linear.out_features = len(index)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.index_select(0, index).clone(), linear.bias.requires_grad)
    else:
        linear.in_features = len(index)


def _shrink(units: BlockUnits) -> tuple[int, int]:
    """Slice away the heads and neurons whose output columns are all zero; returns (heads, neurons) removed."""
    removed_heads = removed_neurons = 0
    for unit in units.attentions:
        keep = _alive_heads(unit)
        if not keep.any():
            keep[0] = True  # an attention with no head cannot run; keep one (its output is zero)
        removed = int((~keep).sum())
        if removed:
            rows = keep.repeat_interleave(unit.head_size)
            for linear in unit.inputs:
                _slice_linear(linear, rows, 0)
            _slice_linear(unit.output, rows, 1)
            setattr(unit.module, unit.heads_attribute, int(keep.sum()))
            if unit.width_attribute is not None:  # e.g. HF BERT's all_head_size, kept beside the head count
                setattr(unit.module, unit.width_attribute, int(rows.sum()))
            removed_heads += removed
    if units.ffn is not None:
        keep = _alive_neurons(units.ffn)
        if not keep.any():
            keep[0] = True
        removed = int((~keep).sum())
        if removed:
            _slice_linear(units.ffn.inputs, keep, 0)
            _slice_linear(units.ffn.output, keep, 1)
            removed_neurons += removed
    return removed_heads, removed_neurons


def _hf_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost ``transformers.PreTrainedModel`` submodules of ``model``, with their names."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside = any(outer == "" or name.startswith(f"{outer}.") for outer, _ in found)
        if isinstance(module, PreTrainedModel) and not inside:
            found.append((name, module))
    return found


def _ffn_inputs(model: nn.Module) -> list[nn.Linear]:
    """The first FFN layer of every known block of ``model``."""
    views = [block_view(block) for _, block in model.named_modules() if architecture_of(block) is not None]
    return [view.ffn.first for view in views if view.ffn is not None]


def _record_structure(hf_model: nn.Module, original: dict[str, tuple[int, int]]) -> bool:
    """Write the sliced layers' shapes into the HF model's config; return whether ``from_pretrained`` loads it.

    When every block was pruned alike and the config can say so (``intermediate_size``; ViT's
    ``num_attention_heads`` with ``head_dim``), the config fields are changed and the model
    loads with ``from_pretrained``. Otherwise (per-layer sizes, or BERT heads: transformers 5
    derives the head size from ``hidden_size / num_attention_heads`` and has no ``pruned_heads``)
    the config keeps its fields and records ``pruned_linears`` / ``pruned_heads_count``, which
    :func:`load_pruned` reads. The head-count attributes come from the blocks' architecture entries.
    """
    config = hf_model.config
    names = {id(m): name for name, m in hf_model.named_modules()}
    shapes = {name: (m.out_features, m.in_features) for name, m in hf_model.named_modules() if isinstance(m, nn.Linear)}
    linears = {name: list(shape) for name, shape in shapes.items() if original.get(name, shape) != shape}
    if not linears:
        return True
    heads = {
        path: [attention.layout.heads, attention.heads]
        for path, attention in attention_views(hf_model).items()
        if any(names[id(linear)] in linears for linear in attention.projections)
    }
    # Try the uniform form the config can express; keep it if it rebuilds exactly these shapes.
    candidate = config.to_dict()
    widths = {tuple(linears[names[id(m)]]) for m in _ffn_inputs(hf_model) if names[id(m)] in linears}
    if len(widths) == 1 and "intermediate_size" in candidate:
        candidate["intermediate_size"] = next(iter(widths))[0]
    counts = {count for _, count in heads.values()}
    if len(counts) == 1 and "num_attention_heads" in candidate:  # ViT reads head_dim; BERT derives it (rejected below)
        candidate["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        candidate["num_attention_heads"] = next(iter(counts))
    loadable = False
    try:
        rebuilt_config = type(config).from_dict(candidate)
        with torch.device("meta"):
            rebuilt = type(hf_model)(rebuilt_config)
        expected = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
        loadable = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == expected
    except Exception:  # noqa: BLE001 - any failure means: not expressible by the config
        loadable = False
    if loadable:
        for key in ("intermediate_size", "head_dim", "num_attention_heads"):
            if key in candidate and candidate[key] != getattr(config, key, None):
                setattr(config, key, candidate[key])
        return True
    config.pruned_linears = linears
    config.pruned_heads_count = heads
    return False


@torch.no_grad()
def export_pruned(model: nn.Module, shrink: bool = True, block_paths: Sequence[str] | None = None) -> dict[str, Any]:
    """Make the pruning of ``model`` permanent, in place; with ``shrink``, slice away pruned heads and neurons.

    Masks are multiplied into the weights and deleted. With ``shrink=True`` every head and FFN
    neuron whose output-projection columns are all zero is removed from the Linear layers of the
    blocks (this changes no output: such a unit adds exactly zero), and the head-count attributes
    follow. Blocks of a class without an architecture entry are left as they are. HF models inside
    ``model`` get the new shapes in their config, so ``save_pretrained`` writes a model that
    ``from_pretrained`` (uniform FFN pruning) or :func:`load_pruned` (any) reads back.

    Args:
        model: The model (masks added by :class:`~lightning_efficient.callbacks.MagnitudePruning`, or
            weights whose pruned units are all zero).
        shrink: Slice the pruned heads and neurons out of the blocks.
        block_paths: Attribute paths of the block lists, for models the block locator does not know.

    Returns:
        ``{"masked_modules", "heads_removed", "neurons_removed", "parameters_before",
        "parameters_after", "hf_loadable"}`` (``hf_loadable``: plain ``from_pretrained`` reads
        each HF model saved after this; None when there is none).

    Examples:
        >>> from lightning_efficient import BertClassifier, MagnitudePruning
        >>> model = BertClassifier(vocab_size=50, num_labels=2, preset="tiny")
        >>> pruning = MagnitudePruning(final_sparsity=0.5, structure="neurons")
        >>> pruning.attach(model); pruning.prune_now(model, 0.5)
        >>> report = export_pruned(model)
        >>> report["neurons_removed"], model.model.bert.encoder.layer[0].intermediate.dense.out_features
        (57, 18)
        >>> report["hf_loadable"], model.model.config.intermediate_size
        (True, 18)
    """
    before = sum(p.numel() for p in model.parameters())
    count = remove_masks(model)
    hf_models = _hf_models(model)
    original = {
        (prefix, name): (m.out_features, m.in_features)
        for prefix, hf in hf_models
        for name, m in hf.named_modules()
        if isinstance(m, nn.Linear)
    }
    heads = neurons = 0
    if shrink:
        for stack in find_block_stacks(model, block_paths):
            for block in stack.blocks:
                if architecture_of(block) is not None:  # an unknown block: nothing is known to slice
                    h, n = _shrink(block_units(block))
                    heads, neurons = heads + h, neurons + n
    loadable = [
        _record_structure(hf, {name: shape for (p, name), shape in original.items() if p == prefix})
        for prefix, hf in hf_models
    ]
    return {
        "masked_modules": count,
        "heads_removed": heads,
        "neurons_removed": neurons,
        "parameters_before": before,
        "parameters_after": sum(p.numel() for p in model.parameters()),
        "hf_loadable": all(loadable) if loadable else None,
    }


def export(model: nn.Module, shrink: bool = True, block_paths: Sequence[str] | None = None) -> dict[str, Any]:
    """Deprecated name of :func:`export_pruned` (kept for one release): warns, then exports.

    Examples:
        >>> from lightning_efficient import BertClassifier
        >>> model = BertClassifier(vocab_size=50, num_labels=2, preset="tiny")
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     report = export(model)
        >>> report["masked_modules"], caught[0].category.__name__
        (0, 'DeprecationWarning')
    """
    warnings.warn(
        "lightning_efficient.callbacks.pruning.export is deprecated; use lightning_efficient.callbacks.export_pruned",
        DeprecationWarning,
        stacklevel=2,
    )
    return export_pruned(model, shrink=shrink, block_paths=block_paths)
