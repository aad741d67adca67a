"""MagnitudePruning: gradual magnitude pruning, unstructured or of whole heads and FFN neurons, exact across resume.

The sparsity follows the cubic schedule of Zhu & Gupta (2017): pruning events happen at optimizer
steps ``t = t0, t0 + dt, ..., t0 + n dt`` (``start_step``, every ``frequency`` steps, and always at
``end_step = t0 + n dt``), and the event at step ``t`` raises the sparsity to

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt)) ** 3

(``s_i = initial_sparsity``, ``s_f = final_sparsity``); ``start_step == end_step`` is one-shot
pruning. An event at step ``t`` runs before the optimizer step ``t + 1``, on the weights after
``t`` steps. Weights are ranked by magnitude within each layer (``scope="per_layer"``) or across
all target layers (``"global"``); a pruned weight is never revived.

``structure`` chooses what is pruned: single weights (``"unstructured"``) or whole attention heads
and FFN neurons (``"heads"``, ``"neurons"``, ``"heads_and_neurons"``: ``final_sparsity`` is then the
share of heads and/or neurons). A head is ranked by the L2 norm of its query, key and value rows
and its columns of the attention output projection; an FFN neuron by the norm of its row of the
first FFN layer and its column of the second. No layer ever loses all its heads.

Masks are buffers (``weight_mask``, and ``bias_mask`` for rows of structured pruning) registered
on the pruned ``nn.Linear`` modules when the callback is set up (before Lightning loads a
checkpoint), so a checkpoint holds and reloads them. Weights are multiplied by their masks after
every optimizer step (``on_train_batch_end``, which Lightning runs before ``ModelCheckpoint``
saves) and gradients before it (``on_before_optimizer_step``, before clipping), with one foreach
multiply each: pruned weights stay exactly zero, right after a resume too, and they neither move
the optimizer's moments nor count in the gradient norm. Masks do not skip any computation, so
training FLOPs (and the :class:`~lightning_efficient.monitor.EfficiencyMonitor`'s count) do not
drop; :func:`export` makes the pruning permanent and, for structured pruning, slices the Linear
layers so the blocks become smaller dense modules, which run (and are counted) with fewer FLOPs.

Optional lottery-ticket rewinding (Frankle et al. 2019): with ``rewind_step=k``, the target
weights of step ``k`` are kept in the callback's state, and at the final pruning event
(``end_step``) the surviving weights are reset to them; training then continues from the rewound,
masked weights (the optimizer's moments and the LR schedule are not rewound).

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_efficient import BertMLM, MLMDataModule
    >>> dm = MLMDataModule(vocab_size=2000, max_length=32, batch_size=8)
    >>> pruning = MagnitudePruning(final_sparsity=0.5, start_step=1, end_step=3, frequency=1)
    >>> trainer = pl.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_progress_bar=False,
    ...                      enable_checkpointing=False, enable_model_summary=False, callbacks=[pruning])
    >>> model = BertMLM(vocab_size=dm.vocab_size, preset="tiny")
    >>> trainer.fit(model, dm)
    >>> round(pruning.sparsity, 3)  # share of zero weights in the Linear layers of the blocks
    0.5
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_efficient.blocks import find_block_stacks
from lightning_efficient.errors import ConfigurationError, NoTargetModulesError
from lightning_efficient.technique import Technique, check_choice, check_range

__all__ = [
    "SCOPES",
    "STRUCTURES",
    "AttentionUnit",
    "BlockUnits",
    "FeedForwardUnit",
    "MagnitudePruning",
    "apply_masks",
    "add_masks",
    "block_units",
    "cubic_sparsity",
    "export",
    "head_scores",
    "load_pruned",
    "magnitude_masks",
    "mask_gradients",
    "masked_modules",
    "neuron_scores",
    "pruning_steps",
    "remove_masks",
    "structured_masks",
]

STRUCTURES = ("unstructured", "heads", "neurons", "heads_and_neurons")
SCOPES = ("per_layer", "global")
MASK, BIAS_MASK = "weight_mask", "bias_mask"


# -- the schedule ------------------------------------------------------------------------------
def pruning_steps(start_step: int, end_step: int, frequency: int) -> list[int]:
    """The optimizer steps at which pruning events happen: every ``frequency`` from the start, and the end.

    Example:
        >>> pruning_steps(10, 20, 4), pruning_steps(5, 5, 1)
        ([10, 14, 18, 20], [5])
    """
    return [*range(start_step, end_step, frequency), end_step]


def cubic_sparsity(
    step: int, final_sparsity: float, start_step: int, end_step: int, frequency: int, initial_sparsity: float = 0.0
) -> float:
    """The sparsity in force at optimizer ``step``: that of the latest event at or before it (0 before the first).

    Zhu & Gupta's cubic schedule, ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3`` at the
    events ``t`` of :func:`pruning_steps`.

    Example:
        >>> [round(cubic_sparsity(t, 0.8, 10, 20, 5), 4) for t in (0, 10, 14, 15, 20, 99)]
        [0.0, 0.0, 0.0, 0.7, 0.8, 0.8]
    """
    if step < start_step:
        return 0.0
    event = max(t for t in pruning_steps(start_step, end_step, frequency) if t <= step)
    if end_step == start_step:
        return final_sparsity
    progress = (event - start_step) / (end_step - start_step)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3


def _count(sparsity: float, total: int) -> int:
    """How many of ``total`` units a sparsity prunes (rounded half up)."""
    return min(total, int(math.floor(sparsity * total + 0.5)))


def _lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A bool keep-mask of ``scores``' shape with exactly ``k`` False at the lowest scores (ties: first index)."""
    flat = scores.flatten()
    pruned = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        threshold = flat.kthvalue(k).values
        pruned = flat < threshold
        tied = (flat == threshold).nonzero().squeeze(1)
        pruned[tied[: k - int(pruned.sum())]] = True
    return (~pruned).view_as(scores)


# -- unstructured masks ------------------------------------------------------------------------
def magnitude_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    scope: str = "per_layer",
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Bool keep-masks that prune the ``sparsity`` share of smallest-magnitude weights.

    Args:
        weights: The tensors to rank, by name.
        sparsity: Share of weights pruned: of each tensor (``per_layer``) or of all together (``global``).
        scope: ``"per_layer"`` or ``"global"``.
        masks: Current masks; weights already pruned stay pruned (they rank lowest).

    Example:
        >>> w = {"a": torch.tensor([1.0, -4.0, 2.0, 3.0]), "b": torch.tensor([0.5, 0.6])}
        >>> {k: v.int().tolist() for k, v in magnitude_masks(w, 0.5).items()}
        {'a': [0, 1, 0, 1], 'b': [0, 1]}
        >>> {k: v.int().tolist() for k, v in magnitude_masks(w, 0.5, scope="global").items()}
        {'a': [0, 1, 1, 1], 'b': [0, 0]}
    """
    check_choice("scope", scope, SCOPES)
    scores = {}
    for name, weight in weights.items():
        score = weight.detach().abs().float()
        if masks is not None:
            score = torch.where(masks[name].bool(), score, torch.full_like(score, -1.0))
        scores[name] = score
    if scope == "per_layer":
        return {name: _lowest_k(score, _count(sparsity, score.numel())) for name, score in scores.items()}
    flat = torch.cat([score.flatten() for score in scores.values()])
    keep = _lowest_k(flat, _count(sparsity, flat.numel()))
    sizes = [score.numel() for score in scores.values()]
    return {name: part.view_as(scores[name]) for name, part in zip(scores, keep.split(sizes))}


# -- mask buffers ------------------------------------------------------------------------------
class _MaskHandle:
    """Removes the mask buffers (and load hooks) that :func:`add_masks` added (``.remove()``, like a hook handle)."""

    def __init__(self, modules: list[nn.Module], hooks: list[Any]) -> None:
        self.modules, self.hooks = modules, hooks

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for module in self.modules:
            for buffer in (MASK, BIAS_MASK):
                if buffer in module._buffers:
                    del module._buffers[buffer]


def _fill_missing_masks(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool, *args: Any
) -> None:
    """Load-state-dict pre-hook: a state without masks (written before pruning was added) loads as unpruned."""
    for buffer in (MASK, BIAS_MASK):
        if buffer in module._buffers and f"{prefix}{buffer}" not in state_dict:
            message = f"no {prefix}{buffer} in the loaded state: starting from an all-ones mask"
            warnings.warn(message, UserWarning, stacklevel=2)
            state_dict[f"{prefix}{buffer}"] = torch.ones_like(module._buffers[buffer])


def add_masks(modules: Iterable[nn.Module], bias: bool = False) -> _MaskHandle:
    """Register an all-ones ``weight_mask`` (and ``bias_mask`` with ``bias=True``) buffer on each module.

    The buffers are part of the model's ``state_dict``, so checkpoints carry them; a state dict
    without them (a checkpoint written before pruning was added) loads with all-ones masks and a
    warning. Existing masks are kept. ``.remove()`` on the result deletes the buffers again.

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> handle = add_masks([layer])
        >>> sorted(layer.state_dict())
        ['bias', 'weight', 'weight_mask']
        >>> handle.remove(); sorted(layer.state_dict())
        ['bias', 'weight']
    """
    modules, hooks = list(modules), []
    for module in modules:
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise NoTargetModulesError(f"{type(module).__name__} has no weight tensor to prune")
        if MASK not in module._buffers:
            module.register_buffer(MASK, torch.ones_like(module.weight, requires_grad=False))
            hooks.append(module.register_load_state_dict_pre_hook(_fill_missing_masks))
        if bias and module.bias is not None and BIAS_MASK not in module._buffers:
            module.register_buffer(BIAS_MASK, torch.ones_like(module.bias, requires_grad=False))
    return _MaskHandle(modules, hooks)


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The submodules of ``model`` that carry a ``weight_mask``, by name."""
    return {name: module for name, module in model.named_modules() if MASK in module._buffers}


def _mask_pairs(modules: Iterable[nn.Module]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(parameters, masks)`` of the masked modules: weights, and biases with a ``bias_mask``."""
    params, masks = [], []
    for module in modules:
        params.append(module.weight)
        masks.append(module._buffers[MASK])
        if BIAS_MASK in module._buffers:
            params.append(module.bias)
            masks.append(module._buffers[BIAS_MASK])
    return params, masks


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Multiply every masked weight (and bias) of ``model`` by its mask, in place: call after ``optimizer.step()``.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> _ = add_masks([layer]); layer.weight_mask[0] = 0
        >>> apply_masks(layer); (layer.weight[0] == 0).tolist(), (layer.weight[1] != 0).tolist()
        ([True, True], [True, True])
    """
    params, masks = _mask_pairs(masked_modules(model).values())
    if params:
        torch._foreach_mul_([p.data for p in params], masks)


@torch.no_grad()
def mask_gradients(model: nn.Module) -> None:
    """Multiply the gradients of masked weights by their masks (before the optimizer step, and clipping).

    Example:
        >>> layer = nn.Linear(2, 1)
        >>> _ = add_masks([layer]); layer.weight_mask[0, 1] = 0
        >>> layer(torch.ones(1, 2)).sum().backward(); mask_gradients(layer)
        >>> layer.weight.grad.tolist()
        [[1.0, 0.0]]
    """
    params, masks = _mask_pairs(masked_modules(model).values())
    pairs = [(p.grad, m) for p, m in zip(params, masks) if p.grad is not None]
    if pairs:
        torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])


@torch.no_grad()
def remove_masks(model: nn.Module) -> int:
    """Make the pruning permanent: multiply the weights by their masks and delete the mask buffers.

    Returns:
        How many modules carried masks.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> _ = add_masks([layer]); layer.weight_mask.zero_()[0, 0] = 1
        >>> remove_masks(layer), sorted(layer.state_dict()), int((layer.weight != 0).sum())
        (1, ['bias', 'weight'], 1)
    """
    modules = list(masked_modules(model).values())
    apply_masks(model)
    _MaskHandle(modules, []).remove()
    return len(modules)


# -- structured units (attention heads, FFN neurons) -------------------------------------------
@dataclass
class AttentionUnit:
    """The prunable heads of one attention module.

    Attributes:
        module: The attention module holding the head count (updated when heads are sliced away).
        heads_attribute: Its attribute holding the number of heads.
        head_size: Features per head.
        inputs: The query, key and value projections (one row block of ``head_size`` per head).
        output: The output projection (one column block per head).
    """

    module: nn.Module
    heads_attribute: str
    head_size: int
    inputs: list[nn.Linear]
    output: nn.Linear

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


#: Known attention layouts: (attention path, (q, k, v) names, output path from the block,
#: heads attribute, head size attribute). BERT/RoBERTa, ViT (transformers 5), Marian/BART.
_ATTENTIONS = (
    ("attention.self", ("query", "key", "value"), "attention.output.dense", "num_attention_heads",
     "attention_head_size"),
    ("attention", ("q_proj", "k_proj", "v_proj"), "attention.o_proj", "num_attention_heads", "head_dim"),
    ("self_attn", ("q_proj", "k_proj", "v_proj"), "self_attn.out_proj", "num_heads", "head_dim"),
    ("encoder_attn", ("q_proj", "k_proj", "v_proj"), "encoder_attn.out_proj", "num_heads", "head_dim"),
)
#: Known FFN layouts: (first layer, second layer). BERT/RoBERTa, ViT, Marian/BART, nn.TransformerEncoderLayer.
_FFNS = (("intermediate.dense", "output.dense"), ("mlp.fc1", "mlp.fc2"), ("fc1", "fc2"), ("linear1", "linear2"))


def _get(module: nn.Module, path: str) -> Any:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def block_units(block: nn.Module) -> BlockUnits:
    """Find the attention heads and FFN neurons of a Transformer block (HF BERT, RoBERTa, ViT, Marian, BART).

    ``nn.TransformerEncoderLayer`` has an FFN but its packed ``nn.MultiheadAttention`` cannot lose
    heads, so it yields no attention unit.

    Example:
        >>> from lightning_efficient import BertMLM
        >>> units = block_units(BertMLM(vocab_size=50, preset="tiny").model.bert.encoder.layer[0])
        >>> [(a.heads, a.head_size) for a in units.attentions], units.ffn.neurons
        ([(4, 8)], 37)
    """
    attentions = []
    for path, (q, k, v), output, heads_attribute, size_attribute in _ATTENTIONS:
        module, out = _get(block, path), _get(block, output)
        inputs = [_get(module, name) for name in (q, k, v)] if module is not None else []
        if isinstance(out, nn.Linear) and all(isinstance(x, nn.Linear) for x in inputs) and inputs:
            if isinstance(getattr(module, size_attribute, None), int) and hasattr(module, heads_attribute):
                attentions.append(AttentionUnit(module, heads_attribute, getattr(module, size_attribute), inputs, out))
    ffn = None
    for first, second in _FFNS:
        inputs, output = _get(block, first), _get(block, second)
        if isinstance(inputs, nn.Linear) and isinstance(output, nn.Linear):
            ffn = FeedForwardUnit(inputs, output)
            break
    return BlockUnits(attentions, ffn)


def head_scores(unit: AttentionUnit) -> torch.Tensor:
    """The L2 norm of each head's query/key/value rows and output-projection columns, ``(heads,)``.

    Example:
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

    Example:
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

    The Linear layers must carry masks (:func:`add_masks`, with ``bias=True`` for the projections
    whose rows are pruned). Pruned units stay pruned; every attention keeps at least one head and
    every FFN one neuron. Weights are not touched: call :func:`apply_masks` after.

    Example:
        >>> from lightning_efficient import BertMLM
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


# -- export ------------------------------------------------------------------------------------
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
            if hasattr(unit.module, "all_head_size"):  # HF BERT keeps it beside the head count
                unit.module.all_head_size = int(rows.sum())
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


def _record_structure(hf_model: nn.Module, original: dict[str, tuple[int, int]]) -> bool:
    """Write the sliced layers' shapes into the HF model's config; return whether ``from_pretrained`` loads it.

    When every block was pruned alike and the config can say so (``intermediate_size``; ViT's
    ``num_attention_heads`` with ``head_dim``), the config fields are changed and the model
    loads with ``from_pretrained``. Otherwise (per-layer sizes, or BERT heads: transformers 5
    derives the head size from ``hidden_size / num_attention_heads`` and has no ``pruned_heads``)
    the config keeps its fields and records ``pruned_linears`` / ``pruned_heads_count``, which
    :func:`load_pruned` reads.
    """
    config = hf_model.config
    shapes = {name: (m.out_features, m.in_features) for name, m in hf_model.named_modules() if isinstance(m, nn.Linear)}
    linears = {name: list(shape) for name, shape in shapes.items() if original.get(name, shape) != shape}
    if not linears:
        return True
    heads = {}
    for name, module in hf_model.named_modules():
        for _, _, _, heads_attribute, _ in _ATTENTIONS:
            sliced = any(k.startswith(f"{name}.") for k in linears)
            if sliced and isinstance(getattr(module, heads_attribute, None), int):
                heads[name] = [heads_attribute, getattr(module, heads_attribute)]
    # Try the uniform form the config can express; keep it if it rebuilds exactly these shapes.
    candidate = config.to_dict()
    widths = {tuple(shape) for name, shape in linears.items() if name.endswith(("intermediate.dense", "mlp.fc1"))}
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
def export(model: nn.Module, shrink: bool = True, block_paths: Sequence[str] | None = None) -> dict[str, Any]:
    """Make the pruning of ``model`` permanent, in place; with ``shrink``, slice away pruned heads and neurons.

    Masks are multiplied into the weights and deleted. With ``shrink=True`` every head and FFN
    neuron whose output-projection columns are all zero is removed from the Linear layers of the
    blocks (this changes no output: such a unit adds exactly zero). HF models inside ``model`` get
    the new shapes in their config, so ``save_pretrained`` writes a model that
    ``from_pretrained`` (uniform FFN pruning) or :func:`load_pruned` (any) reads back.

    Returns:
        ``{"masked_modules", "heads_removed", "neurons_removed", "parameters_before",
        "parameters_after", "hf_loadable"}`` (``hf_loadable``: plain ``from_pretrained`` reads
        each HF model saved after this; None when there is none).

    Example:
        >>> from lightning_efficient import BertClassifier
        >>> model = BertClassifier(vocab_size=50, num_labels=2, preset="tiny")
        >>> pruning = MagnitudePruning(final_sparsity=0.5, structure="neurons")
        >>> pruning.attach(model); pruning.prune_now(model, 0.5)
        >>> report = export(model)
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


def load_pruned(path: str | Path, model_class: type | None = None) -> nn.Module:
    """Load an HF model that was :func:`export` ed and saved with ``save_pretrained``, whatever its shapes.

    Builds the model from its config, resizes the Linear layers and head counts the config
    records (``pruned_linears``, ``pruned_heads_count``), then loads the saved weights. A model
    without such records loads with plain ``from_pretrained``.

    Args:
        path: The directory ``save_pretrained`` wrote.
        model_class: The transformers class (default: the config's ``architectures[0]``).

    Raises:
        ConfigurationError: The saved weights do not fit the recorded shapes.
    """
    import transformers
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(path)
    cls = model_class or getattr(transformers, config.architectures[0])
    linears = getattr(config, "pruned_linears", None)
    if not linears:
        return cls.from_pretrained(path)
    model = cls(config)
    for name, (out_features, in_features) in linears.items():
        linear = model.get_submodule(name)
        linear.weight = nn.Parameter(linear.weight.new_empty(out_features, in_features))
        linear.out_features, linear.in_features = out_features, in_features
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.new_empty(out_features))
    for name, (attribute, count) in getattr(config, "pruned_heads_count", {}).items():
        module = model.get_submodule(name)
        setattr(module, attribute, count)
        if hasattr(module, "all_head_size"):
            module.all_head_size = linears.get(f"{name}.query", [module.all_head_size])[0]
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tensors = model.state_dict()
    loaded = {tensor.data_ptr() for key, tensor in tensors.items() if key in state}
    untied = [key for key in missing if tensors[key].data_ptr() not in loaded]  # tied weights are not saved
    if untied or unexpected:
        raise ConfigurationError(
            f"{path}: the saved weights do not fit the recorded shapes: missing {untied[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.eval()


# -- the callback ------------------------------------------------------------------------------
class MagnitudePruning(Technique):
    """Gradual (Zhu & Gupta cubic) or one-shot magnitude pruning, unstructured or of heads and FFN neurons.

    Args:
        final_sparsity: Sparsity reached at ``end_step``: the share of target weights (unstructured)
            or of heads / FFN neurons (structured) pruned; in [0, 1).
        start_step: Optimizer step of the first pruning event (>= 0).
        end_step: Step of the last event (>= ``start_step``; default ``start_step``: one-shot).
        frequency: Steps between events (>= 1).
        initial_sparsity: Sparsity of the first event, in [0, ``final_sparsity``].
        structure: ``"unstructured"`` (single weights), ``"heads"``, ``"neurons"`` or
            ``"heads_and_neurons"`` (whole attention heads / FFN neurons of the blocks).
        scope: ``"per_layer"`` (each layer / attention / FFN loses the same share) or ``"global"``
            (ranked across all of them; every attention keeps a head). Structured pruning that
            must load with plain HF ``from_pretrained`` after :meth:`export` needs ``per_layer``.
        include: Unstructured: shell-style patterns of module names to prune (e.g.
            ``"*.attention.*"``), searched in the whole model; default: every module of
            ``module_types`` inside the Transformer blocks (not embeddings, not the heads).
            Structured: patterns of block names (e.g. ``"model.bert.encoder.layer.[0-1]"``).
            Each pattern must match something.
        exclude: Patterns of names to leave out (each must match something).
        module_types: Class names of the modules pruned (unstructured; their ``weight``).
        rewind_step: Lottery-ticket rewinding: keep the target weights of this step and reset the
            surviving weights to them at ``end_step`` (<= ``end_step``; default: no rewinding).
        block_paths: Attribute paths of the block lists, for models the block locator does not know.
        strict_schedule: Fail before training when the run ends before ``end_step`` (set False for a
            schedule spread over several fits, e.g. resuming with a larger ``max_steps``: it warns).

    Logged every step: ``pruning/sparsity`` (share of zero-masked target weights) and
    ``pruning/target_sparsity``; structured also ``pruning/heads_pruned`` and
    ``pruning/neurons_pruned`` (shares). At each event, the sparsity of every pruned layer goes to
    the loggers as ``pruning/sparsity/<module name>`` (see :meth:`layer_sparsity`).
    """

    name = "pruning"
    hooks = ("on_train_start", "on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
    conflicts_with = ("progressive_stacking",)
    distributed_safe = True
    keep_after_fit = True

    def __init__(
        self,
        final_sparsity: float = 0.5,
        start_step: int = 0,
        end_step: int | None = None,
        frequency: int = 100,
        initial_sparsity: float = 0.0,
        structure: str = "unstructured",
        scope: str = "per_layer",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        module_types: Sequence[str] = ("Linear",),
        rewind_step: int | None = None,
        block_paths: Sequence[str] | None = None,
        strict_schedule: bool = True,
    ) -> None:
        super().__init__()
        final_sparsity = check_range("final_sparsity", final_sparsity, low=0.0, high=1.0, high_inclusive=False)
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(check_range("initial_sparsity", initial_sparsity, low=0.0, high=final_sparsity))
        self.start_step = int(check_range("start_step", start_step, low=0))
        end_step = self.start_step if end_step is None else end_step
        self.end_step = int(check_range("end_step", end_step, low=self.start_step))
        self.frequency = int(check_range("frequency", frequency, low=1))
        self.structure = check_choice("structure", structure, STRUCTURES)
        self.scope = check_choice("scope", scope, SCOPES)
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else []
        self.module_types = tuple(module_types)
        if not self.module_types:
            raise ConfigurationError("module_types=() must name at least one module class, e.g. ('Linear',)")
        if rewind_step is not None:
            rewind_step = int(check_range("rewind_step", rewind_step, low=0, high=self.end_step))
        self.rewind_step = rewind_step
        self.block_paths = list(block_paths) if block_paths else None
        self.strict_schedule = bool(strict_schedule)
        self.last_event = -1  # optimizer step of the latest pruning event
        self.target_sparsity = 0.0
        self.rewind_weights: dict[str, torch.Tensor] = {}
        self._targets: dict[str, nn.Module] = {}  # name -> masked module
        self._units: list[BlockUnits] = []
        self._params: list[torch.Tensor] = []
        self._masks: list[torch.Tensor] = []
        self._masked_at_step = -1
        self._stats: dict[str, float] = {}

    @property
    def _prunes_heads(self) -> bool:
        return self.structure in ("heads", "heads_and_neurons")

    @property
    def _prunes_neurons(self) -> bool:
        return self.structure in ("neurons", "heads_and_neurons")

    @property
    def events(self) -> list[int]:
        """The optimizer steps of the pruning events."""
        return pruning_steps(self.start_step, self.end_step, self.frequency)

    # -- surgery ------------------------------------------------------------------------------
    def _match(self, names: Sequence[str], what: str, owner: str) -> list[str]:
        """Filter ``names`` by ``include``, then ``exclude``; a pattern that matches nothing is an error."""
        chosen = list(names)
        for option, patterns in (("include", self.include or []), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(name, pattern) for name in chosen):
                    shown = ", ".join(chosen[:8]) + (", ..." if len(chosen) > 8 else "")
                    among = "" if option == "include" else " (among the included ones)"
                    raise NoTargetModulesError(
                        f"{option} pattern {pattern!r} matches no {what} of {owner}{among}; its {what}s are: {shown}"
                    )
            if option == "include" and patterns:
                chosen = [n for n in chosen if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        return [n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in self.exclude)]

    def _is_target_type(self, module: nn.Module) -> bool:
        return any(cls.__name__ in self.module_types for cls in type(module).__mro__)

    def apply(self, pl_module: nn.Module) -> Any:
        if self.structure == "unstructured":
            if self.include:
                candidates = {n: m for n, m in pl_module.named_modules() if self._is_target_type(m)}
            else:
                candidates = {
                    f"{stack.path}.{i}.{n}" if n else f"{stack.path}.{i}": m
                    for stack in find_block_stacks(pl_module, self.block_paths)
                    for i, block in enumerate(stack.blocks)
                    for n, m in block.named_modules()
                    if self._is_target_type(m)
                }
            names = self._match(list(candidates), f"{'/'.join(self.module_types)} module", type(pl_module).__name__)
            if not names:
                owner = type(pl_module).__name__
                raise NoTargetModulesError(f"{owner}: every module of types {self.module_types} is excluded")
            self._targets = {name: candidates[name] for name in names}
            handles = [add_masks(self._targets.values())]
        else:
            stacks = find_block_stacks(pl_module, self.block_paths)
            blocks = {f"{s.path}.{i}": block for s in stacks for i, block in enumerate(s.blocks)}
            names = self._match(list(blocks), "block", type(pl_module).__name__)
            self._units = [block_units(blocks[name]) for name in names]
            handles = self._add_structured_masks(pl_module, names)
        self._params, self._masks = _mask_pairs(self._targets.values())
        self._update_stats()
        return handles

    def _add_structured_masks(self, pl_module: nn.Module, block_names: list[str]) -> list[_MaskHandle]:
        heads, neurons = self._prunes_heads, self._prunes_neurons
        module_names = {id(m): n for n, m in pl_module.named_modules()}
        rows, columns = [], []
        for name, units in zip(block_names, self._units):
            if heads and not units.attentions:
                raise ConfigurationError(
                    f"structure={self.structure!r}: block {name} ({type(units).__name__}) has no attention whose heads "
                    "can be pruned (known: HF BERT/RoBERTa, ViT, Marian/BART); use structure='neurons' or "
                    "'unstructured'"
                )
            if neurons and units.ffn is None:
                raise ConfigurationError(
                    f"structure={self.structure!r}: block {name} has no FFN whose neurons can be pruned"
                )
            for unit in units.attentions if heads else []:
                rows += unit.inputs
                columns.append(unit.output)
            if neurons:
                rows.append(units.ffn.inputs)
                columns.append(units.ffn.output)
        self._check_structured_counts(heads, neurons)
        self._targets = {module_names[id(m)]: m for m in [*rows, *columns]}
        return [add_masks(rows, bias=True), add_masks(columns)]

    def _check_structured_counts(self, heads: bool, neurons: bool) -> None:
        """Fail if ``final_sparsity`` would remove every head (or neuron) of a layer."""
        groups = []
        if heads:
            groups.append(("heads", "attention", [a.heads for u in self._units for a in u.attentions]))
        if neurons:
            groups.append(("neurons", "FFN", [u.ffn.neurons for u in self._units]))
        for unit, owner, sizes in groups:
            if self.scope == "per_layer":
                for size in sizes:
                    if _count(self.final_sparsity, size) >= size:
                        raise ConfigurationError(
                            f"final_sparsity={self.final_sparsity} would prune all {size} {unit} of an {owner} layer; "
                            f"with {size} {unit} per layer it must be < {(size - 0.5) / size:.4g}"
                        )
            elif _count(self.final_sparsity, sum(sizes)) > sum(sizes) - len(sizes):
                limit = (sum(sizes) - len(sizes) + 0.5) / sum(sizes)
                raise ConfigurationError(
                    f"final_sparsity={self.final_sparsity} would prune every {unit[:-1]} of some {owner} layer "
                    f"({sum(sizes)} {unit} in {len(sizes)} layers, each keeps one); it must be < {limit:.4g}"
                )

    def remove(self, pl_module: nn.Module) -> None:
        super().remove(pl_module)
        self._targets, self._units, self._params, self._masks = {}, [], [], []

    # -- pruning ------------------------------------------------------------------------------
    @torch.no_grad()
    def prune_now(self, pl_module: nn.Module, sparsity: float) -> None:
        """Raise the masks to ``sparsity`` by magnitude (never reviving a pruned weight) and apply them."""
        if self.structure == "unstructured":
            weights = {name: m.weight for name, m in self._targets.items()}
            masks = {name: m.weight_mask for name, m in self._targets.items()}
            for name, keep in magnitude_masks(weights, sparsity, self.scope, masks).items():
                masks[name].copy_(keep)
        else:
            structured_masks(self._units, sparsity, self._prunes_heads, self._prunes_neurons, self.scope)
        torch._foreach_mul_([p.data for p in self._params], self._masks)
        self.target_sparsity = sparsity
        self._update_stats()

    def layer_sparsity(self) -> dict[str, float]:
        """The share of masked weights of each pruned module, by name."""
        return {name: 1.0 - float(m.weight_mask.sum()) / m.weight_mask.numel() for name, m in self._targets.items()}

    @property
    def sparsity(self) -> float:
        """The share of masked weights over all pruned modules."""
        return self._stats.get("sparsity", 0.0)

    def _update_stats(self) -> None:
        masks = [m.weight_mask for m in self._targets.values()]
        total = sum(m.numel() for m in masks)
        self._stats = {"sparsity": 1.0 - float(sum(m.sum() for m in masks)) / total if total else 0.0}
        if self._prunes_heads:
            alive = torch.cat([_alive_heads(a) for u in self._units for a in u.attentions])
            self._stats["heads_pruned"] = 1.0 - float(alive.float().mean())
        if self._prunes_neurons:
            alive = torch.cat([_alive_neurons(u.ffn) for u in self._units])
            self._stats["neurons_pruned"] = 1.0 - float(alive.float().mean())

    def export(self, pl_module: nn.Module) -> dict[str, Any]:
        """Make the pruning permanent (and slice structured units away); the callback lets go of the model.

        See :func:`export` for what it returns.
        """
        if self._applied_to is not None and self._applied_to is not pl_module:
            raise ConfigurationError(f"{self.name} is applied to another model than the one given to export")
        report = export(pl_module, shrink=self.structure != "unstructured", block_paths=self.block_paths)
        self._handles = []
        self.remove(pl_module)
        self._applied_to = None
        return report

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches  # optimizer steps of the whole run (inf: unbounded)
        if math.isfinite(total) and self.end_step >= total:
            total = int(total)
            message = (
                f"end_step={self.end_step} is not reached: the run has {total} optimizer steps (steps 0-{total - 1}), "
                f"so the schedule must end at a step < {total}; lower end_step or raise max_steps"
            )
            if self.strict_schedule:
                raise ConfigurationError(message + " (or strict_schedule=False to continue it in a later fit)")
            warnings.warn(message, UserWarning, stacklevel=2)
        torch._foreach_mul_([p.data for p in self._params], self._masks)  # exact after a resume, whatever was loaded
        self._masked_at_step = trainer.global_step
        self._update_stats()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self.rewind_step and not self.rewind_weights:
            self.rewind_weights = {name: m.weight.detach().clone() for name, m in self._targets.items()}
        if step in self.events and step > self.last_event:
            sparsity = cubic_sparsity(
                step, self.final_sparsity, self.start_step, self.end_step, self.frequency, self.initial_sparsity
            )
            if step == self.end_step and self.rewind_weights:
                with torch.no_grad():
                    for name, m in self._targets.items():
                        m.weight.copy_(self.rewind_weights[name])
            self.prune_now(pl_module, sparsity)
            self.last_event = step
            self._log_layers(trainer)
        metrics = {"sparsity": self.sparsity, "target_sparsity": self.target_sparsity}
        metrics.update({k: v for k, v in self._stats.items() if k != "sparsity"})
        self.log_metrics(pl_module, metrics)

    def _log_layers(self, trainer: pl.Trainer) -> None:
        if trainer.loggers and trainer.is_global_zero:
            layers = {f"{self.name}/sparsity/{name}": value for name, value in self.layer_sparsity().items()}
            for logger in trainer.loggers:
                logger.log_metrics(layers, step=trainer.global_step)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.last_event < 0:
            return
        pairs = [(p.grad, m) for p, m in zip(self._params, self._masks) if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.last_event < 0 or trainer.global_step == self._masked_at_step:
            return  # nothing pruned yet, or no optimizer step since the last multiply (gradient accumulation)
        torch._foreach_mul_([p.data for p in self._params], self._masks)
        self._masked_at_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_event": self.last_event,
            "target_sparsity": self.target_sparsity,
            "rewind_weights": dict(self.rewind_weights),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_event = state_dict["last_event"]
        self.target_sparsity = state_dict["target_sparsity"]
        self.rewind_weights = dict(state_dict.get("rewind_weights", {}))
