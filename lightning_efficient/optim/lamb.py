"""LAMB (You et al. 2019, Algorithm 2): Adam moments scaled per tensor by a trust ratio.

For each parameter tensor ``w`` with gradient ``g`` at step ``t``::

    m = beta1 m + (1 - beta1) g                      v = beta2 v + (1 - beta2) g^2
    r = m_hat / (sqrt(v_hat) + eps)                  m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)
    u = r + weight_decay w                           (decoupled weight decay, inside the update)
    ratio = min(||w||, clamp) / ||u||                (1 when ||w|| or ||u|| is 0, or trust_ratio is off)
    w = w - lr ratio u

Our own rather than pytorch-optimizer 4.1.0, whose ``Lamb`` is not this formula (see the CHANGELOG).

How a step runs (per bucket, no per-tensor Python loop of tensor ops, no device sync): the moments
and ``u`` come from one pass of PyTorch's fused AdamW kernel (``torch._fused_adamw_``, private like
the ``torch._foreach_*`` ops; on CPU, CUDA, XPU, MPS), whose formula per element is::

    p = p (1 - lr' wd')                                 (skipped when wd' = 0)
    m = beta1 m + (1 - beta1) g,  v = beta2 v + (1 - beta2) g^2
    p = p - (lr' / c1) m / (sqrt(v) / sqrt(c2) + eps)   c1 = 1 - beta1^t, c2 = 1 - beta2^t

Run on a buffer ``p = weight_decay w`` with ``lr' = -1`` and ``wd' = 0`` it leaves ``p = u``,
computed as the formula above is written (no difference of nearly equal numbers). Then two
``_foreach_norm`` and one ``_foreach_addcmul_`` give ``w = w - lr ratio u``. A group with
``trust_ratio: False`` is exactly AdamW (``lr' = lr``, ``wd' = weight_decay``), run in place.
``bias_correction=False`` is the limit ``t -> inf`` (``beta^t -> 0``): the kernel gets a step count of
2^62, for which ``1 - beta^t`` is exactly 1 in double precision for every beta in [0, 1).
Devices without the kernel, and buckets with a tensor that is not contiguous or is empty, take an
equivalent path of ``torch._foreach_*`` calls.
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
        lr, weight_decay = group["lr"], group["weight_decay"]
        fused = _fused_kernel_applies(weights, grads, exp_avg, exp_avg_sq)

        if group["trust_ratio"]:
            if fused:  # u = weight_decay w + m_hat / (sqrt(v_hat) + eps), in one pass over the bucket
                updates = torch._foreach_mul(weights, weight_decay)
                _fused_adamw(group, bucket, updates, grads, exp_avg, exp_avg_sq, lr=-1.0, weight_decay=0.0)
            else:
                updates = _foreach_direction(group, bucket.step, weights, grads, exp_avg, exp_avg_sq)
            ratios = trust_ratios(weights, updates, group["clamp"])
            for state, ratio in zip(bucket.states, ratios):
                state["trust_ratio"] = ratio
            torch._foreach_addcmul_(weights, updates, ratios, value=-lr)  # w -= lr ratio u
        else:
            for state in bucket.states:
                if "trust_ratio" not in state:
                    state["trust_ratio"] = torch.ones((), dtype=torch.float32, device=bucket.params[0].device)
            if fused:  # w -= lr u: AdamW itself
                _fused_adamw(group, bucket, weights, grads, exp_avg, exp_avg_sq, lr=lr, weight_decay=weight_decay)
            else:
                updates = _foreach_direction(group, bucket.step, weights, grads, exp_avg, exp_avg_sq)
                torch._foreach_add_(weights, updates, alpha=-lr)
        bucket.write_back(weights)


#: A step count ``t`` for which ``1 - beta^t`` is exactly 1 in double precision for every ``beta`` in [0, 1)
#: (the largest, ``1 - 2^-53``, gives ``beta^t = exp(-2^9)``, about 1e-223); exact in fp32 and within int64
#: (the same count whether a kernel reads it as a float or as an integer).
_NO_BIAS_CORRECTION_STEP = 2.0**62


def _fused_adamw(
    group: dict[str, Any],
    bucket: Bucket,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avg: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor],
    lr: float,
    weight_decay: float,
) -> None:
    """Update the moments and ``params -= lr (m_hat / (sqrt(v_hat) + eps) + weight_decay params)`` in one kernel.

    ``lr`` may be negative (the kernel does not check it; ``torch.optim.AdamW`` does). The bucket's step
    count goes in as one fp32 0-d tensor on the bucket's device (``torch.full``: a fill, no host-to-device
    copy), shared by all its tensors; 2^62 without bias correction (see the module docstring).
    """
    beta1, beta2 = group["betas"]
    step = float(bucket.step) if group["bias_correction"] else _NO_BIAS_CORRECTION_STEP
    step_tensor = torch.full((), step, dtype=torch.float32, device=bucket.params[0].device)
    # torch._fused_adamw_ is private (like the torch._foreach_* ops): the kernel of torch.optim.AdamW(fused=True).
    torch._fused_adamw_(
        params, grads, exp_avg, exp_avg_sq, [], [step_tensor] * len(params),
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=group["eps"], amsgrad=False, maximize=False,
    )  # fmt: skip


def _fused_kernel_applies(weights: list[torch.Tensor], *others: list[torch.Tensor]) -> bool:
    """Whether ``torch._fused_adamw_`` takes these tensors: a device type it has a kernel for, all contiguous
    (the CPU kernel walks memory in order, the CUDA one refuses other layouts), none empty (refused on CUDA)."""
    if weights[0].device.type not in _FUSED_DEVICE_TYPES or not all(w.numel() for w in weights):
        return False
    return all(t.is_contiguous() for tensors in (weights, *others) for t in tensors)


try:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    _FUSED_DEVICE_TYPES = frozenset(_get_fused_kernels_supported_devices()) & {"cpu", "cuda", "xpu", "mps"}
except ImportError:  # pragma: no cover - the private helper moved
    _FUSED_DEVICE_TYPES = frozenset({"cpu", "cuda"})


def _foreach_direction(
    group: dict[str, Any],
    step: int,
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avg: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Update the moments and return ``u = m_hat / (sqrt(v_hat) + eps) + weight_decay w`` with foreach calls.

    The path for devices and layouts that ``torch._fused_adamw_`` does not take; same formula.
    """
    beta1, beta2 = group["betas"]
    eps, weight_decay = group["eps"], group["weight_decay"]
    correction1, correction2 = (1 - beta1**step, 1 - beta2**step) if group["bias_correction"] else (1.0, 1.0)

    torch._foreach_lerp_(exp_avg, grads, 1 - beta1)  # m = beta1 m + (1 - beta1) g
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)  # v = beta2 v + (1 - beta2) g^2

    # m_hat / (sqrt(v_hat) + eps) = (sqrt(c2) / c1) m / (sqrt(v) + eps sqrt(c2))
    denominators = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_add_(denominators, eps * math.sqrt(correction2))
    updates = torch._foreach_div(exp_avg, denominators)
    scale = math.sqrt(correction2) / correction1
    if scale != 1.0:
        torch._foreach_mul_(updates, scale)
    if weight_decay != 0:
        torch._foreach_add_(updates, weights, alpha=weight_decay)
    return updates
