"""From a QuantizationAwareTraining run to an int8 model: conversion, compilation, files.

:func:`export_quantized` converts the fake-quantized layers into torchao's int8 layers (the
scheme's conversion target) with the codes training saw; :func:`compile_quantized` compiles the
model for CPU inference (the fused int8 kernels); :func:`save_quantized` / :func:`load_quantized`
write and read (and compile) it. :func:`export` is the deprecated name of :func:`export_quantized`.

Examples:
    >>> from lightning_efficient import BertClassifier
    >>> model = BertClassifier(vocab_size=50, num_labels=2, preset="tiny").eval()
    >>> qat = QuantizationAwareTraining()
    >>> qat.attach(model)
    >>> report = export_quantized(model, qat)
    >>> report["converted"], report["activations"], qat.is_applied
    (18, 'per_tensor', False)
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_efficient.callbacks.quantization.attention import FusedInProjection, QuantizedMultiheadAttention
from lightning_efficient.callbacks.quantization.callback import QuantizationAwareTraining
from lightning_efficient.callbacks.quantization.fake_quant import (
    _activation_granularity,
    _converted_types,
    _dtype,
    _int8_scheme,
    _torchao,
)
from lightning_efficient.checkpoint import load_checkpoint
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.exported import QUANTIZATION_FILE, apply_recorded_shapes

__all__ = [
    "QUANTIZATION_FILE",
    "WEIGHTS_FILE",
    "compile_quantized",
    "export",
    "export_quantized",
    "load_quantized",
    "save_quantized",
]

WEIGHTS_FILE = "quantized_model.pt"


def _embedding_base_config() -> Any:
    from torchao.quantization import IntxWeightOnlyConfig, PerAxis

    return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))


def _base_config(weight_dtype: str, granularity: str, group_size: int, activations: str) -> Any:
    """The torchao post-training config that :func:`export_quantized` applies (the QAT scheme's target)."""
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        MappingType,
        PerAxis,
        PerGroup,
        PerRow,
    )

    if _int8_scheme(activations):
        return Int8DynamicActivationInt8WeightConfig(
            act_mapping_type=MappingType.SYMMETRIC,
            granularity=[_activation_granularity(activations), PerRow()],
            set_inductor_config=False,  # no process-wide inductor settings; compile_quantized patches its calls only
        )
    weight_granularity = PerAxis(0) if granularity == "per_channel" else PerGroup(group_size)
    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=_dtype(weight_dtype), weight_granularity=weight_granularity
    )


@torch.no_grad()
def export_quantized(model: nn.Module, qat: QuantizationAwareTraining) -> dict[str, Any]:
    """Convert ``qat``'s target layers of ``model`` into torchao int8 layers, in place; ``qat`` lets go.

    Each target ``nn.Linear`` gets an int8 weight (scales per channel or group, the held scales
    when ``freeze_step`` was reached) that quantizes its input at run time as in training:
    torchao's ``Int8Tensor`` for the symmetric ``activations`` schemes, ``IntxUnpackedToInt8Tensor``
    for ``"asymmetric_per_token"``; embedding tables (``embeddings=True``) get int8 rows. The
    outputs equal those of the fake-quantized model up to the float rounding of the int8 products
    (the integer codes are the same). On a CPU, :func:`compile_quantized` then makes it fast. Masks
    of :class:`~lightning_efficient.callbacks.MagnitudePruning` on the same layers should be made
    permanent first (``export_pruned``): zero weights stay zero.

    Returns:
        ``{"converted", "weight_dtype", "granularity", "group_size", "activations", "embeddings",
        "modules"}`` (``modules``: the converted names, relative to ``model``).
    """
    _torchao()
    from torchao.quantization import MappingType, PerRow, quantize_
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor, QuantizeTensorToInt8Kwargs
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    if qat._applied_to is not model:
        raise ConfigurationError(
            "export_quantized: the QuantizationAwareTraining callback is not applied to this model"
        )
    frozen = qat.frozen_scales()
    names = list(qat.targets)
    fused = [name.rpartition(".")[0] for name, module in qat.targets.items() if isinstance(module, FusedInProjection)]
    qat.detach(model)
    for path in fused:
        names, frozen = _split_fused_attention(model, path, names, frozen)
    config = _base_config(qat.weight_dtype, qat.granularity, qat.group_size, qat.activations)
    dynamic = set(names) - set(frozen)
    quantize_(model, config, filter_fn=lambda module, name: name in dynamic and isinstance(module, nn.Linear))
    quantize_(
        model,
        _embedding_base_config(),
        filter_fn=lambda module, name: name in dynamic and isinstance(module, nn.Embedding),
    )
    for name, saved in frozen.items():  # torchao's conversion would measure the scales anew: use the held ones
        layer = model.get_submodule(name)
        table = isinstance(layer, nn.Embedding)
        if not table and _int8_scheme(qat.activations):
            weight = Int8Tensor.from_hp(
                layer.weight.detach(),
                PerRow(),
                scale=saved["scale"].reshape(-1, 1).float(),
                zero_point=torch.zeros(layer.weight.shape[0], 1, dtype=torch.int8, device=layer.weight.device),
                act_quant_kwargs=QuantizeTensorToInt8Kwargs(granularity=_activation_granularity(qat.activations)),
            )
        else:
            group = layer.weight.shape[1] if table or qat.granularity == "per_channel" else qat.group_size
            weight = IntxUnpackedToInt8Tensor.from_hp(
                layer.weight.detach(),
                (1, group),
                torch.int8 if table else _dtype(qat.weight_dtype),
                mapping_type=MappingType.SYMMETRIC,
                activation_quantization=None if table else "int8_asym_per_token",
                intx_choose_qparams_algorithm=None,  # the held scales instead of new ones
                custom_scale=saved["scale"],
                custom_zero_point=saved["zero_point"].to(torch.int8),
            )
        layer.weight = nn.Parameter(weight, requires_grad=False)
    return {
        "converted": len(names),  # a fused in-projection counts as its three converted projections
        "weight_dtype": qat.weight_dtype,
        "granularity": qat.granularity,
        "group_size": qat.group_size,
        "activations": qat.activations,
        "embeddings": qat.embeddings,
        "modules": names,
    }


def _split_fused_attention(
    model: nn.Module, path: str, names: list[str], frozen: dict[str, dict[str, torch.Tensor]]
) -> tuple[list[str], dict[str, dict[str, torch.Tensor]]]:
    """Put a :class:`QuantizedMultiheadAttention` in place of the ``nn.MultiheadAttention`` at ``path``.

    Its fused in-projection target (``<path>.in_proj``) becomes the three Linears ``q_proj``, ``k_proj``,
    ``v_proj`` in ``names``; held scales (one per row of the fused weight) are split alike. The
    enclosing ``nn.TransformerEncoder`` no longer converts padded batches to nested tensors (a path
    that bypasses the attention's forward).
    """
    owner, _, attribute = path.rpartition(".")
    parent = model.get_submodule(owner)
    setattr(parent, attribute, QuantizedMultiheadAttention(getattr(parent, attribute)))
    split = [f"{path}.{letter}_proj" for letter in "qkv"]
    index = names.index(f"{path}.in_proj")
    names = names[:index] + split + names[index + 1 :]
    frozen = dict(frozen)
    saved = frozen.pop(f"{path}.in_proj", None)
    if saved is not None:
        for name, scale, zero_point in zip(split, saved["scale"].chunk(3), saved["zero_point"].chunk(3)):
            frozen[name] = {"scale": scale, "zero_point": zero_point}
    parts = path.split(".")
    for depth in range(len(parts)):
        stack = model.get_submodule(".".join(parts[:depth]))
        if isinstance(stack, nn.TransformerEncoder):
            stack.use_nested_tensor = False
    return names, frozen


def export(model: nn.Module, qat: QuantizationAwareTraining) -> dict[str, Any]:
    """Deprecated name of :func:`export_quantized` (kept for one release): warns, then converts.

    Examples:
        >>> from lightning_efficient import BertClassifier
        >>> model = BertClassifier(vocab_size=50, num_labels=2, preset="tiny").eval()
        >>> qat = QuantizationAwareTraining()
        >>> qat.attach(model)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     report = export(model, qat)
        >>> report["converted"], caught[0].category.__name__
        (18, 'DeprecationWarning')
    """
    warnings.warn(
        "lightning_efficient.callbacks.quantization.export is deprecated; use "
        "lightning_efficient.callbacks.export_quantized (the same conversion)",
        DeprecationWarning,
        stacklevel=2,
    )
    return export_quantized(model, qat)


def compile_quantized(model: nn.Module) -> nn.Module:
    """Compile ``model``'s forward for inference with ``torch.compile`` and Inductor's freezing, in place.

    Under freezing the int8 weights of :func:`export_quantized` become constants of the graph and the int8
    products fused int8 kernels: this is where the speed of an int8 model on a CPU comes from (the
    eager torchao layers are no faster than fp32: 0.5x-1x on BERT-small and -base). Freezing applies where gradients are off
    (``torch.inference_mode``, ``torch.no_grad``, Lightning's ``predict`` / ``validate``); the
    weights are then folded in, so do not change them afterwards. The first call compiles (seconds
    to a minute); a second input shape compiles once more, for every shape from then on. The
    module keeps its type and attributes (``config``, ``generate``); needs a C++ compiler, as any
    ``torch.compile`` on CPU.

    ``model.to(...)`` / ``.cpu()`` where the weights already are (what ``Trainer.predict`` does on a
    CPU) leave it as it is; moving it elsewhere works until its first call (torch's compiled code
    then holds the weights): load it with ``compile=False``, move it, then compile it.

    Returns:
        ``model`` itself.
    """
    import torch._inductor.config as inductor_config

    compiled = torch.compile(model.forward)

    @functools.wraps(model.forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with inductor_config.patch(freezing=True):  # a torch.compile option would not reach dynamo's tracing
            return compiled(*args, **kwargs)

    model.forward = forward
    model._apply = functools.partial(_apply_compiled, model)  # type: ignore[method-assign]
    return model


def _apply_compiled(model: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    """``nn.Module._apply`` of a compiled model: nothing to do when no tensor would change device or dtype.

    torchao's int8 tensors are replaced (swapped) by every ``.to(...)``, even one to where they are, and
    after the first compiled call torch's guards hold weak references to them, which a swap refuses.
    """
    tensors = [*model.parameters(), *model.buffers()]
    moved = [fn(tensor) for tensor in tensors]
    if all(new.device == old.device and new.dtype == old.dtype for new, old in zip(moved, tensors)):
        return model
    try:
        return nn.Module._apply(model, fn, recurse)
    except RuntimeError as error:
        if "swap" not in str(error):
            raise
        raise ConfigurationError(
            f"{type(model).__name__} was compiled by compile_quantized and has run, so its weights cannot move "
            "any more; load it with load_quantized(path, compile=False), move it, then compile_quantized(model)"
        ) from error


def _hf_model(model: nn.Module) -> nn.Module:
    """``model`` itself if it is a transformers model, else its outermost transformers submodule."""
    from transformers import PreTrainedModel

    for _, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise ConfigurationError(f"{type(model).__name__} holds no transformers model to save; save its state_dict instead")


def save_quantized(model: nn.Module, path: str | Path, report: dict[str, Any]) -> Path:
    """Save the transformers model inside ``model``, converted by :func:`export_quantized`, to a directory.

    Writes ``config.json`` (the HF config), ``quantization.json`` (the scheme from ``report``,
    what :func:`export_quantized` returned, and the converted module names) and ``quantized_model.pt`` (the
    state dict with torchao's int8 tensors). :func:`load_quantized` reads it back.
    """
    hf = _hf_model(model)
    converted = _converted_types()
    modules = [n for n, m in hf.named_modules() if isinstance(getattr(m, "weight", None), converted)]
    if not modules:
        raise ConfigurationError(f"{type(hf).__name__} has no converted layer: run export_quantized(model, qat) first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(path)
    scheme = {k: report[k] for k in ("weight_dtype", "granularity", "group_size", "activations", "embeddings")}
    scheme.update(architecture=type(hf).__name__, modules=modules)
    (path / QUANTIZATION_FILE).write_text(json.dumps(scheme, indent=1))
    torch.save(hf.state_dict(), path / WEIGHTS_FILE)
    return path


def load_quantized(path: str | Path, compile: bool = True) -> nn.Module:
    """Load a model written by :func:`save_quantized`: the HF model, int8 layers in place, in eval mode.

    Args:
        path: The directory :func:`save_quantized` wrote.
        compile: Compile it for inference with :func:`compile_quantized` (the fast int8 kernels on a
            CPU; the first call compiles); False: torchao's eager layers.
    """
    _torchao()
    import transformers
    from torchao.quantization import quantize_

    path = Path(path)
    scheme = json.loads((path / QUANTIZATION_FILE).read_text())
    config = transformers.AutoConfig.from_pretrained(path)
    model = getattr(transformers, scheme["architecture"])(config)
    apply_recorded_shapes(model, config)  # pruned before it was quantized: the sliced layers' shapes
    chosen = set(scheme["modules"])
    config = _base_config(
        scheme["weight_dtype"],
        scheme["granularity"],
        scheme["group_size"],
        scheme.get("activations", "asymmetric_per_token"),
    )
    quantize_(model, config, filter_fn=lambda module, name: name in chosen and isinstance(module, nn.Linear))
    quantize_(
        model,
        _embedding_base_config(),
        filter_fn=lambda module, name: name in chosen and isinstance(module, nn.Embedding),
    )
    state = load_checkpoint(path / WEIGHTS_FILE, map_location=None)  # weights_only: torchao's tensors are safe
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tensors = model.state_dict()
    loaded = {tensor.data_ptr() for key, tensor in tensors.items() if key in state}
    untied = [key for key in missing if tensors[key].data_ptr() not in loaded]
    if untied or unexpected:
        raise ConfigurationError(
            f"{path}: the saved weights do not fit the model: missing {untied[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval()  # not re-tied: a quantized embedding table and its float output head stay apart, as saved
    return compile_quantized(model) if compile else model
