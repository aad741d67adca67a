"""Lion (Chen et al. 2023, Algorithm 1): the sign of an interpolated momentum.

For each parameter tensor ``w`` with gradient ``g``::

    update = sign(beta1 m + (1 - beta1) g)
    w = w - lr (update + weight_decay w)            (decoupled weight decay)
    m = beta2 m + (1 - beta2) g

Every element moves by exactly ``lr`` (plus decay), so Lion wants a learning rate 3-10x smaller
and a weight decay 3-10x larger than AdamW's. Written on ``torch._foreach_*`` kernels.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lightning_efficient.optim.base import Bucket, ForeachOptimizer

__all__ = ["Lion"]


class Lion(ForeachOptimizer):
    """Lion: evolved sign momentum (Chen et al. 2023, Algorithm 1).

    Given a flat list of parameters (LightningCLI passes ``module.parameters()``) and
    ``no_decay_1d=True``, biases and norm scales (tensors with ndim < 2) get weight decay 0
    (:func:`~lightning_efficient.optim.param_groups.no_decay_groups`; its ``trust_ratio`` key is
    ignored here); parameter groups given as dicts are used as given. The momentum of 16-bit
    parameters is fp32.

    From YAML: ``optimizer: {class_path: lightning_efficient.optim.Lion, init_args: {lr: 1e-4, weight_decay: 0.1}}``.

    Args:
        params: Parameters or parameter-group dicts.
        lr: Learning rate (> 0); typically 3-10x smaller than AdamW's.
        betas: ``beta1`` interpolates the update, ``beta2`` the momentum; each in [0, 1).
        weight_decay: Decoupled weight decay (>= 0); typically 3-10x larger than AdamW's.
        no_decay_1d: Split flat parameters by the no-decay rule.

    Examples:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = Lion(model.parameters(), lr=0.1)
        >>> before = model.weight.detach().clone()
        >>> model(torch.ones(3, 4)).sum().backward()
        >>> optimizer.step()
        >>> torch.allclose((before - model.weight.detach()).abs(), torch.full((2, 4), 0.1))  # each moved by lr
        True
    """

    state_keys = ("exp_avg",)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        no_decay_1d: bool = True,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay}, no_decay_1d)

    def update(self, group: dict[str, Any], bucket: Bucket) -> None:
        weights, grads = bucket.working()
        exp_avg = bucket.state("exp_avg")
        beta1, beta2 = group["betas"]
        lr, weight_decay = group["lr"], group["weight_decay"]

        updates = torch._foreach_lerp(exp_avg, grads, 1 - beta1)  # beta1 m + (1 - beta1) g
        torch._foreach_sign_(updates)
        if weight_decay != 0:
            torch._foreach_add_(updates, weights, alpha=weight_decay)  # update + wd w
        torch._foreach_add_(weights, updates, alpha=-lr)  # w -= lr (update + wd w)
        torch._foreach_lerp_(exp_avg, grads, 1 - beta2)  # m = beta2 m + (1 - beta2) g
        bucket.write_back(weights)
