"""Mask buffers on ``nn.Linear`` modules: add them, apply them to weights and gradients, remove them; magnitude ranking.

A mask is a buffer (``weight_mask``, and ``bias_mask`` for rows pruned by structured pruning) on
the pruned module, so a checkpoint holds and reloads it; :func:`apply_masks` multiplies weights
by their masks with one foreach multiply.

Examples:
    >>> layer = nn.Linear(4, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[0.1, -3.0, 0.2, 4.0]]))
    >>> _ = add_masks([layer])
    >>> _ = layer.weight_mask.copy_(magnitude_masks({"w": layer.weight}, 0.5)["w"]); apply_masks(layer)
    >>> layer.weight.tolist(), remove_masks(layer), sorted(layer.state_dict())
    ([[0.0, -3.0, 0.0, 4.0]], 1, ['weight'])
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_efficient import targets
from lightning_efficient.callbacks.pruning.schedule import _count
from lightning_efficient.errors import ConfigurationError, NoTargetModulesError, check_choice

__all__ = [
    "BIAS_MASK",
    "MASK",
    "SCOPES",
    "add_masks",
    "apply_masks",
    "layer_sparsity",
    "log_layer_sparsity",
    "magnitude_masks",
    "mask_gradients",
    "masked_modules",
    "multiply_gradients",
    "multiply_weights",
    "remove_masks",
    "select_unmasked",
    "total_sparsity",
]

#: How weights are ranked: within each layer, or across all target layers.
SCOPES = ("per_layer", "global")
#: The names of the mask buffers.
MASK, BIAS_MASK = "weight_mask", "bias_mask"


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

    Examples:
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

    Examples:
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

    Examples:
        >>> layer = nn.Linear(2, 2)
        >>> _ = add_masks([layer]); layer.weight_mask[0] = 0
        >>> apply_masks(layer); (layer.weight[0] == 0).tolist(), (layer.weight[1] != 0).tolist()
        ([True, True], [True, True])
    """
    multiply_weights(masked_modules(model).values())


@torch.no_grad()
def multiply_weights(modules: Iterable[nn.Module]) -> None:
    """Multiply the weights (and masked biases) of ``modules``, which carry masks, by their masks, in place."""
    params, masks = _mask_pairs(modules)
    if params:
        torch._foreach_mul_([p.data for p in params], masks)


@torch.no_grad()
def multiply_gradients(modules: Iterable[nn.Module]) -> None:
    """Multiply the gradients of the masked weights (and biases) of ``modules`` by their masks, in place."""
    params, masks = _mask_pairs(modules)
    pairs = [(p.grad, m) for p, m in zip(params, masks) if p.grad is not None]
    if pairs:
        torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])


@torch.no_grad()
def mask_gradients(model: nn.Module) -> None:
    """Multiply the gradients of masked weights by their masks (before the optimizer step, and clipping).

    Examples:
        >>> layer = nn.Linear(2, 1)
        >>> _ = add_masks([layer]); layer.weight_mask[0, 1] = 0
        >>> layer(torch.ones(1, 2)).sum().backward(); mask_gradients(layer)
        >>> layer.weight.grad.tolist()
        [[1.0, 0.0]]
    """
    multiply_gradients(masked_modules(model).values())


@torch.no_grad()
def remove_masks(model: nn.Module) -> int:
    """Make the pruning permanent: multiply the weights by their masks and delete the mask buffers.

    Returns:
        How many modules carried masks.

    Examples:
        >>> layer = nn.Linear(2, 2)
        >>> _ = add_masks([layer]); layer.weight_mask.zero_()[0, 0] = 1
        >>> remove_masks(layer), sorted(layer.state_dict()), int((layer.weight != 0).sum())
        (1, ['bias', 'weight'], 1)
    """
    modules = list(masked_modules(model).values())
    apply_masks(model)
    _MaskHandle(modules, []).remove()
    return len(modules)


def select_unmasked(
    model: nn.Module,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    module_types: Sequence[str],
    block_paths: Sequence[str] | None,
    owner: str,
) -> dict[str, nn.Module]:
    """A masking technique's targets (:func:`~lightning_efficient.targets.select_modules`), none already masked.

    Raises:
        ConfigurationError: A target already carries a ``weight_mask`` (another masking technique on the
            same weights); the message names it and ``owner``.
        NoTargetModulesError: Nothing matched.
    """
    chosen = targets.select_modules(model, include, exclude or None, module_types, block_paths=block_paths)
    taken = [name for name, module in chosen.items() if MASK in module._buffers]
    if taken:
        raise ConfigurationError(
            f"{taken[0]} already has a pruning mask (MagnitudePruning, DynamicSparsity, PruneAtInit or LotteryTicket "
            f"on the same weights); {owner} keeps its own masks: exclude those layers from one of them"
        )
    return chosen


def layer_sparsity(modules: Mapping[str, nn.Module]) -> dict[str, float]:
    """The share of masked weights of each masked module, by name."""
    return {name: 1.0 - float(m.weight_mask.sum()) / m.weight_mask.numel() for name, m in modules.items()}


def total_sparsity(modules: Mapping[str, nn.Module]) -> float:
    """The share of masked weights over all ``modules`` together (0 when there are none)."""
    masks = [m.weight_mask for m in modules.values()]
    total = sum(m.numel() for m in masks)
    return 1.0 - float(sum(m.sum() for m in masks)) / total if total else 0.0


def log_layer_sparsity(trainer: Any, prefix: str, modules: Mapping[str, nn.Module], **extra: float) -> None:
    """Send each module's sparsity to the trainer's loggers as ``<prefix>/sparsity/<name>`` (and ``extra``), rank 0."""
    if trainer.loggers and trainer.is_global_zero:
        metrics = {f"{prefix}/sparsity/{name}": value for name, value in layer_sparsity(modules).items()}
        metrics.update({f"{prefix}/{key}": value for key, value in extra.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
