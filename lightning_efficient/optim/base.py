"""What LAMB and Lion share: validated settings, fp32 state, and foreach buckets.

A step runs a handful of ``torch._foreach_*`` calls per *bucket*: the parameters of one group
that share device, dtype and step count. 16-bit parameters (bf16/fp16) are updated in fp32: their
state is fp32, the bucket works on fp32 copies of the weights and gradients and writes the result
back. Lightning's ``bf16-mixed`` / ``16-mixed`` keep fp32 parameters, which need no copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_efficient.errors import ConfigurationError
from lightning_efficient.optim.param_groups import split_flat_params

__all__ = ["Bucket", "ForeachOptimizer", "state_dtype", "validate_settings"]

LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype of an optimizer's state for ``param``: fp32 for 16-bit floats, else the param's.

    Examples:
        >>> state_dtype(torch.zeros(2, dtype=torch.bfloat16)), state_dtype(torch.zeros(2, dtype=torch.float64))
        (torch.float32, torch.float64)
    """
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_settings(settings: Mapping[str, Any]) -> None:
    """Raise ``ConfigurationError`` naming the first bad optimizer setting and its allowed range.

    Checks whichever of ``lr``, ``betas``, ``eps``, ``weight_decay``, ``clamp`` are present.

    Examples:
        >>> validate_settings({"lr": 1e-3, "betas": (0.9, 0.999)})
        >>> validate_settings({"lr": 0.0})
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: lr=0.0 must be a finite number > 0
    """
    if "lr" in settings and not (_is_number(settings["lr"]) and settings["lr"] > 0):
        raise ConfigurationError(f"lr={settings['lr']!r} must be a finite number > 0")
    if "betas" in settings:
        betas = settings["betas"]
        pair = isinstance(betas, (tuple, list)) and len(betas) == 2
        if not (pair and all(_is_number(b) and 0 <= b < 1 for b in betas)):
            raise ConfigurationError(f"betas={betas!r} must be two numbers in [0, 1)")
    if "eps" in settings and not (_is_number(settings["eps"]) and settings["eps"] > 0):
        raise ConfigurationError(f"eps={settings['eps']!r} must be a finite number > 0")
    if "weight_decay" in settings and not (_is_number(settings["weight_decay"]) and settings["weight_decay"] >= 0):
        raise ConfigurationError(f"weight_decay={settings['weight_decay']!r} must be a finite number >= 0")
    clamp = settings.get("clamp")
    if clamp is not None and not (_is_number(clamp) and clamp > 0):
        raise ConfigurationError(f"clamp={clamp!r} must be a finite number > 0 (or None: no clipping)")


@dataclass
class Bucket:
    """Parameters of one group with the same device, dtype and step count: one set of foreach calls.

    Attributes:
        step: The step count of every parameter in the bucket, this step included (1 on the first).
        params: The parameters (with gradients).
        grads: Their gradients.
        states: Their ``optimizer.state`` dicts.
    """

    step: int
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)

    def state(self, key: str) -> list[torch.Tensor]:
        """The state tensors under ``key``, in parameter order."""
        return [state[key] for state in self.states]

    def working(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Weights and gradients to compute with: the parameters themselves, or fp32 copies of 16-bit ones."""
        if self.params[0].dtype not in LOW_PRECISION:
            return self.params, self.grads
        return [p.float() for p in self.params], [g.float() for g in self.grads]

    def write_back(self, weights: list[torch.Tensor]) -> None:
        """Copy updated fp32 copies back into 16-bit parameters (nothing when they are the parameters)."""
        if weights is not self.params:
            torch._foreach_copy_(self.params, weights)


class ForeachOptimizer(torch.optim.Optimizer):
    """Base of LAMB and Lion: validated groups, fp32 state kept on load, and :class:`Bucket` s.

    Subclasses list their state tensors in ``state_keys`` and implement ``update(group, bucket)``.
    """

    #: Names of the per-parameter state tensors (zero-initialised, :func:`state_dtype`).
    state_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], no_decay_1d: bool) -> None:
        """Check the settings ``defaults``, then split flat ``params`` by the no-decay rule when ``no_decay_1d``.

        A ``betas`` list (as YAML gives it) becomes a tuple; :func:`validate_settings` checks every value.
        """
        if isinstance(defaults.get("betas"), list):
            defaults = {**defaults, "betas": tuple(defaults["betas"])}
        validate_settings(defaults)
        super().__init__(split_flat_params(params, defaults["weight_decay"], no_decay_1d), defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        validate_settings({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer`` does, but keep the saved dtype of floating state tensors.

        Torch casts floating state to each parameter's dtype, which would round the fp32 moments of
        16-bit parameters to 16 bits; here they come back exactly as saved.
        """
        super().load_state_dict(state_dict)
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(index, {}).items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    self.state[param][key] = value.to(device=param.device)

    def buckets(self, group: dict[str, Any]) -> list[Bucket]:
        """Count a step for every parameter of ``group`` with a gradient; bucket them for foreach calls.

        State is created on a parameter's first step: ``step`` (an int) and the ``state_keys`` tensors.
        """
        buckets: dict[tuple[Any, ...], Bucket] = {}
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[param]
            if not state:
                state["step"] = 0
                for key in self.state_keys:
                    state[key] = torch.zeros_like(param, dtype=state_dtype(param), memory_format=torch.preserve_format)
            state["step"] += 1
            # DTensor parameters (tensor parallelism) are bucketed by mesh and placement: a foreach call
            # cannot mix them with plain tensors.
            layout = (getattr(param, "device_mesh", None), getattr(param, "placements", None))
            bucket = buckets.setdefault((param.device, param.dtype, state["step"], layout), Bucket(state["step"]))
            bucket.params.append(param)
            bucket.grads.append(param.grad)
            bucket.states.append(state)
        return list(buckets.values())

    def update(self, group: dict[str, Any], bucket: Bucket) -> None:
        """Update the parameters of one bucket (implemented by each optimizer)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimization step; ``closure`` (re-evaluating the loss) is optional."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for bucket in self.buckets(group):
                self.update(group, bucket)
        return loss
