"""The fake quantizers of QuantizationAwareTraining: torchao's configs and the straight-through quantizers.

Weights: torchao's ``IntxFakeQuantizer``, symmetric, per output channel or per group of input
columns. Activations: torchao's asymmetric per-token ``IntxFakeQuantizer``, or the symmetric int8
quantizer of the ``Int8Tensor`` conversion itself (:class:`_SymmetricInt8Activation`), so training
sees the codes inference will use. Rounding is in the forward pass, the gradient is straight-through.

Examples:
    >>> act, weight = fake_quantize_configs()
    >>> act.dtype, act.is_symmetric, weight.dtype, weight.is_symmetric
    (torch.int8, False, torch.int8, True)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lightning_efficient.errors import ConfigurationError, check_choice

__all__ = ["ACTIVATIONS", "GRANULARITIES", "WEIGHT_DTYPES", "fake_quantize_configs"]

WEIGHT_DTYPES = ("int8", "int4")
GRANULARITIES = ("per_channel", "per_group")
#: Activation schemes: int8, dynamic; symmetric per tensor or per token (torchao ``Int8Tensor``), or asymmetric
#: per token (torchao ``IntxUnpackedToInt8Tensor``).
ACTIVATIONS = ("per_tensor", "per_token", "asymmetric_per_token")


def _torchao() -> Any:
    """Import torchao, or fail naming the extra that installs it."""
    try:
        import torchao.quantization
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigurationError(
            'QuantizationAwareTraining needs torchao: pip install "lightning-efficient[quant]" (or torchao>=0.18)'
        ) from None
    import torchao

    return torchao


def _converted_types() -> tuple[type, ...]:
    """torchao's int8 weight tensors that :func:`export_quantized` (and :func:`load_quantized`) put in place."""
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    return Int8Tensor, IntxUnpackedToInt8Tensor


def _holds_converted_layers(model: nn.Module) -> bool:
    """Whether some module of ``model`` already has a torchao int8 weight (the model was converted)."""
    converted = _converted_types()
    return any(isinstance(getattr(module, "weight", None), converted) for module in model.modules())


def _dtype(weight_dtype: str) -> torch.dtype:
    return {"int8": torch.int8, "int4": torch.int4}[weight_dtype]


def fake_quantize_configs(
    weight_dtype: str = "int8", granularity: str = "per_channel", group_size: int = 32
) -> tuple[Any, Any]:
    """torchao's fake-quantization configs ``(activation, weight)`` of the Intx scheme.

    Activations: int8, per token, asymmetric, dynamic (``activations="asymmetric_per_token"``).
    Weights: ``weight_dtype``, symmetric, per output channel or per group of ``group_size`` input
    columns (the weights of every scheme). These are the configs torchao's ``QATConfig`` derives
    from ``Int8DynamicActivationIntxWeightConfig``, that scheme's conversion target.

    Examples:
        >>> act, weight = fake_quantize_configs("int4", "per_group", 16)
        >>> act.dtype, weight.dtype, weight.granularity.group_size
        (torch.int8, torch.int4, 16)
    """
    _torchao()
    from torchao.quantization import MappingType
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    check_choice("weight_dtype", weight_dtype, WEIGHT_DTYPES)
    check_choice("granularity", granularity, GRANULARITIES)
    activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False, scale_precision=None)
    if granularity == "per_channel":
        weight = IntxFakeQuantizeConfig(
            _dtype(weight_dtype), "per_channel", mapping_type=MappingType.SYMMETRIC, scale_precision=None
        )
    else:
        weight = IntxFakeQuantizeConfig(
            _dtype(weight_dtype), group_size=group_size, mapping_type=MappingType.SYMMETRIC, scale_precision=None
        )
    return activation, weight


def _embedding_weight_config() -> Any:
    """Embedding tables: int8 weights per row (symmetric), no activation quantization."""
    from torchao.quantization import MappingType
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    return IntxFakeQuantizeConfig(torch.int8, "per_channel", mapping_type=MappingType.SYMMETRIC, scale_precision=None)


def _int8_scheme(activations: str) -> bool:
    """Whether ``activations`` converts to torchao's ``Int8Tensor`` (symmetric) rather than its Intx layout."""
    return activations in ("per_tensor", "per_token")


def _activation_granularity(activations: str) -> Any:
    from torchao.quantization import PerRow, PerTensor

    return PerRow() if activations == "per_token" else PerTensor()


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized values; backward: the gradient of the identity (straight-through)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _SymmetricInt8Activation(nn.Module):
    """int8, symmetric, dynamic, per tensor or per token: the activation quantizer of torchao's ``Int8Tensor``
    conversion itself (``Int8Tensor.from_hp``), with a straight-through gradient."""

    def __init__(self, activations: str) -> None:
        super().__init__()
        self.granularity = _activation_granularity(activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

        quantized = Int8Tensor.from_hp(x.detach(), self.granularity).dequantize()
        return _StraightThrough.apply(x, quantized)


def _activation_quantizer(activations: str) -> nn.Module:
    if _int8_scheme(activations):
        return _SymmetricInt8Activation(activations)
    from torchao.quantization.qat import IntxFakeQuantizer

    return IntxFakeQuantizer(fake_quantize_configs()[0])


class _FakeQuantizers(nn.Module):
    """The activation and weight fake quantizers of one Linear (held by the callback, not the model)."""

    def __init__(self, activation: nn.Module | None, weight_config: Any) -> None:
        super().__init__()
        from torchao.quantization.qat import IntxFakeQuantizer

        self.activation = activation
        self.weight = IntxFakeQuantizer(copy.copy(weight_config))  # own copy: freezing changes it

    def freeze_weight(self, weight: torch.Tensor) -> None:
        """Measure the weight scales of ``weight`` now and hold them from here on."""
        self.weight.config = copy.copy(self.weight.config)
        self.weight.config.is_dynamic = False
        self.weight.scale = self.weight.zero_point = None
        with torch.no_grad():
            self.weight(weight.detach())

    def set_frozen(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.weight.config = copy.copy(self.weight.config)
        self.weight.config.is_dynamic = False
        self.weight.scale, self.weight.zero_point = scale.clone(), zero_point.clone()

    @property
    def frozen(self) -> bool:
        return not self.weight.config.is_dynamic

    def release(self) -> None:
        """Detach the ranges the last forward measured (they are recomputed at the next one), so that
        the quantizers keep no autograd graph alive and can be copied and pickled."""
        for quantizer in (self.activation, self.weight):
            if quantizer is not None:
                for attribute in ("scale", "zero_point"):
                    value = getattr(quantizer, attribute, None)
                    if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                        setattr(quantizer, attribute, value.detach())
