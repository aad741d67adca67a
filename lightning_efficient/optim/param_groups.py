"""The no-decay rule: biases and normalisation scales get no weight decay and no LAMB trust ratio.

One rule for the whole package, as in the BERT and LAMB recipes, that works on any model: a tensor
with fewer than two dimensions (a bias, a LayerNorm / RMSNorm scale) is not decayed and, under
LAMB, steps with trust ratio 1; matrices, embeddings and convolution kernels are decayed.
``EfficientModule`` (AdamW) and the ``LAMB`` / ``Lion`` optimizers (given LightningCLI's flat
``module.parameters()``) all split parameters with :func:`no_decay_groups`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["is_no_decay", "no_decay_groups", "split_flat_params"]


def is_no_decay(param: torch.Tensor) -> bool:
    """Whether ``param`` gets no weight decay (and trust ratio 1): it has fewer than two dimensions.

    Examples:
        >>> layer = torch.nn.LayerNorm(4)
        >>> is_no_decay(layer.weight), is_no_decay(torch.nn.Linear(4, 4).weight)
        (True, False)
    """
    return param.ndim < 2


def no_decay_groups(params: Iterable[torch.Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """Split parameters into a decayed group and a no-decay group (biases, norm scales).

    The no-decay group has ``weight_decay`` 0 and ``trust_ratio: False`` (read by ``LAMB``; other
    optimizers ignore the key). Empty groups are left out; the order of the parameters is kept.

    Args:
        params: The parameters to split (e.g. ``model.parameters()``).
        weight_decay: Weight decay of the decayed group.

    Returns:
        Parameter-group dicts for any ``torch.optim.Optimizer``.

    Examples:
        >>> groups = no_decay_groups(torch.nn.Linear(3, 2).parameters(), weight_decay=0.01)
        >>> [(len(g["params"]), g["weight_decay"], g["trust_ratio"]) for g in groups]
        [(1, 0.01, True), (1, 0.0, False)]
    """
    params = list(params)
    groups = [
        {"params": [p for p in params if not is_no_decay(p)], "weight_decay": weight_decay, "trust_ratio": True},
        {"params": [p for p in params if is_no_decay(p)], "weight_decay": 0.0, "trust_ratio": False},
    ]
    return [group for group in groups if group["params"]]


def split_flat_params(params: Iterable[Any], weight_decay: float, no_decay_1d: bool) -> list[Any]:
    """What an optimizer built on the rule hands to ``torch.optim.Optimizer``.

    A flat iterable of tensors (what LightningCLI passes) is split by :func:`no_decay_groups` when
    ``no_decay_1d`` is set; explicit parameter-group dicts (or named parameters) are kept as given.

    Examples:
        >>> layer = torch.nn.Linear(3, 2)
        >>> len(split_flat_params(layer.parameters(), 0.01, no_decay_1d=True))
        2
        >>> given = [{"params": [layer.bias], "weight_decay": 0.5}]
        >>> split_flat_params(given, 0.01, no_decay_1d=True) == given
        True
    """
    params = list(params)
    if no_decay_1d and params and all(isinstance(p, torch.Tensor) for p in params):
        return no_decay_groups(params, weight_decay)
    return params
