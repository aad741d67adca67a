"""LAMB (You et al. 2019, Algorithm 2): Adam moments scaled per tensor by a trust ratio.

For each parameter tensor ``w`` with gradient ``g`` at step ``t``::

    m = beta1 m + (1 - beta1) g                      v = beta2 v + (1 - beta2) g^2
    r = m_hat / (sqrt(v_hat) + eps)                  m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)
    u = r + weight_decay w                           (decoupled weight decay, inside the update)
    ratio = min(||w||, clamp) / ||u||                (1 when ||w|| or ||u|| is 0, or trust_ratio is off)
    w = w - lr ratio u

Written on ``torch._foreach_*`` kernels (our own rather than pytorch-optimizer 4.1.0, whose
``Lamb`` is not this formula: see the CHANGELOG).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from lightning_efficient.optim.base import Bucket, ForeachOptimizer

__all__ = ["LAMB", "trust_ratios"]


def trust_ratios(
    weights: list[torch.Tensor], updates: list[torch.Tensor], clamp: float | None, scale: float = 1.0
) -> list[torch.Tensor]:
    """Per-tensor ``min(||w||, clamp) / ||scale * u||`` in fp32, 1 where either norm is 0.

    Args:
        weights: The weight tensors ``w``.
        updates: The update tensors ``u`` (up to the factor ``scale``).
        clamp: Upper bound of the weight norm in the numerator; None: no bound.
        scale: Positive factor of the updates (folded into the norm instead of a pass over ``u``).

    Returns:
        One 0-d fp32 tensor per weight, on the weights' device.

    Examples:
        >>> w = [torch.full((4,), 3.0), torch.zeros(2), torch.ones(4)]
        >>> u = [torch.ones(4), torch.ones(2), torch.zeros(4)]
        >>> [round(r.item(), 3) for r in trust_ratios(w, u, clamp=5.0)]  # ||w|| = 6 clipped to 5, ||u|| = 2
        [2.5, 1.0, 1.0]
    """
    weight_norms = torch.stack(torch._foreach_norm(weights)).float()
    update_norms = torch.stack(torch._foreach_norm(updates)).float() * scale
    numerators = weight_norms if clamp is None else weight_norms.clamp(max=clamp)
    ratios = torch.where((weight_norms > 0) & (update_norms > 0), numerators / update_norms, 1.0)
    return list(ratios.unbind())


class LAMB(ForeachOptimizer):
    """LAMB: layer-wise adaptive large-batch optimizer (You et al. 2019, Algorithm 2).

    Given a flat list of parameters (LightningCLI passes ``module.parameters()``) and
    ``no_decay_1d=True``, biases and norm scales (tensors with ndim < 2) get weight decay 0 and
    trust ratio 1 (:func:`~lightning_efficient.optim.param_groups.no_decay_groups`); parameter
    groups given as dicts are used as given (a group may set ``trust_ratio: False``). The state of
    16-bit parameters and all norms are fp32. The last trust ratio of each parameter is kept in
    ``optimizer.state[param]["trust_ratio"]`` (a 0-d fp32 tensor) for monitoring.

    From YAML: ``optimizer: {class_path: lightning_efficient.optim.LAMB, init_args: {lr: 2e-3}}``.

    Args:
        params: Parameters or parameter-group dicts.
        lr: Learning rate (> 0).
        betas: Decay rates of the first and second moments, each in [0, 1).
        eps: Added to ``sqrt(v_hat)`` (> 0).
        weight_decay: Decoupled weight decay inside the trust-ratio update (>= 0).
        clamp: Upper bound of ``||w||`` in the trust ratio (> 0); None: no bound.
        bias_correction: Divide the moments by ``1 - beta^t`` (Algorithm 2); False: raw moments.
        no_decay_1d: Split flat parameters by the no-decay rule.

    Examples:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = LAMB(model.parameters(), lr=1e-2)
        >>> [(len(g["params"]), g["weight_decay"], g["trust_ratio"]) for g in optimizer.param_groups]
        [(1, 0.01, True), (1, 0.0, False)]
        >>> model(torch.ones(3, 4)).sum().backward()
        >>> optimizer.step()
        >>> optimizer.state[model.weight]["trust_ratio"].shape, optimizer.state[model.bias]["trust_ratio"].item()
        (torch.Size([]), 1.0)
    """

    state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        clamp: float | None = 10.0,
        bias_correction: bool = True,
        no_decay_1d: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "clamp": clamp,
            "bias_correction": bias_correction,
            "trust_ratio": True,
        }
        super().__init__(params, defaults, no_decay_1d)

    def update(self, group: dict[str, Any], bucket: Bucket) -> None:
        weights, grads = bucket.working()
        exp_avg, exp_avg_sq = bucket.state("exp_avg"), bucket.state("exp_avg_sq")
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        t = bucket.step
        correction1, correction2 = (1 - beta1**t, 1 - beta2**t) if group["bias_correction"] else (1.0, 1.0)

        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)  # m = beta1 m + (1 - beta1) g
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)  # v = beta2 v + (1 - beta2) g^2

        # With c1 = 1 - beta1^t, c2 = 1 - beta2^t and q = m / (sqrt(v) + eps sqrt(c2)), r = (sqrt(c2) / c1) q.
        # One buffer x per tensor, written in one pass, holds u up to a factor (u = factor x):
        #   weight decay on:  x = w + (sqrt(c2) / (c1 wd)) q,  factor = wd
        #   weight decay off: x = q,                          factor = sqrt(c2) / c1
        scale = math.sqrt(correction2) / correction1
        updates = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_add_(updates, eps * math.sqrt(correction2))
        for w, m, x in zip(weights, exp_avg, updates):  # (no foreach op writes into its divisor)
            if weight_decay > 0:
                torch.addcdiv(w, m, x, value=scale / weight_decay, out=x)
            else:
                torch.div(m, x, out=x)
        factor = weight_decay if weight_decay > 0 else scale

        if group["trust_ratio"]:
            ratios = trust_ratios(weights, updates, group["clamp"], factor)
            for state, ratio in zip(bucket.states, ratios):
                state["trust_ratio"] = ratio
            torch._foreach_addcmul_(weights, updates, ratios, value=-lr * factor)  # w -= lr ratio u
        else:
            for state in bucket.states:
                if "trust_ratio" not in state:
                    state["trust_ratio"] = torch.ones((), dtype=torch.float32, device=bucket.params[0].device)
            torch._foreach_add_(weights, updates, alpha=-lr * factor)  # w -= lr u
        bucket.write_back(weights)
