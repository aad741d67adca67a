"""QuantizationAwareTraining: torchao fake quantization during training, then a real int8 model.

From ``start_step`` on, the chosen Linear layers (default: those of the Transformer blocks) compute
``linear(fq_a(x), fq_w(W), b)``: the weight is fake-quantized to int8 per output channel or to int4
(or int8) in groups of ``group_size`` input columns (symmetric), and the input to int8, dynamic
(its range is measured as it comes), in one of three schemes (``activations``):

- ``"per_tensor"`` (the default for int8 weights per channel): symmetric, one scale per tensor.
  It converts to torchao's ``Int8Tensor`` (``Int8DynamicActivationInt8WeightConfig``), whose
  int8 x int8 matrix products :func:`compile_quantized` turns into fused int8 kernels: on an x86
  CPU the fastest scheme (measured on 2 Xeon cores: BERT-base 4.4x, BERT-small 2.3x the eager
  fp32 speed).
- ``"per_token"``: symmetric, one scale per token; the same conversion, finer ranges, slower
  kernels (3.3x and 1.9x).
- ``"asymmetric_per_token"`` (the default, and the only scheme, for int4 or grouped weights):
  converts to torchao's ``IntxUnpackedToInt8Tensor`` (``Int8DynamicActivationIntxWeightConfig``),
  the layout for edge runtimes; on a CPU under PyTorch it has no int8 kernel and runs slower than
  fp32.

Rounding is in the forward pass and the gradient is straight-through. The weight and asymmetric
quantizers are torchao's ``IntxFakeQuantizer``; the symmetric activation quantizer is the
conversion's own (``Int8Tensor.from_hp``), so training sees the codes inference will use.

With ``embeddings=True`` the model's embedding tables are fake-quantized too (int8 per row, weight
only): most of a small BERT's bytes are its vocabulary table, so this is what makes the saved
model about 4x smaller. With ``freeze_step`` the weight scales are measured once at that step and
then held (the classic "freeze the observers" of the last part of QAT); the activation ranges stay
dynamic, as at inference.

How it is built: the Linear modules are not swapped; their ``forward`` is routed through the fake
quantizers (:func:`~lightning_efficient.blocks.wrap_forward`), so parameters and checkpoint keys
never change, other techniques' masks and wrappers on the same modules keep working, and a
checkpoint from before, at or after the switch resumes exactly (whether fake quantization is on
follows the step; frozen scales are in the callback's state). Pruned weights stay exactly zero:
a symmetric quantizer maps 0 to 0.

:func:`export` converts the layers into torchao's int8 model (the scheme's conversion target;
embeddings: ``IntxWeightOnlyConfig``) with outputs equal to the fake-quantized model's up to the
float rounding of the int8 products; :func:`compile_quantized` compiles it for CPU inference;
:func:`save_quantized` / :func:`load_quantized` write and read (and compile) it.

torchao is an optional dependency: ``pip install "lightning-efficient[quant]"``.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_efficient import BertMLM, MLMDataModule
    >>> dm = MLMDataModule(vocab_size=2000, max_length=32, batch_size=8)
    >>> qat = QuantizationAwareTraining(start_step=2)
    >>> trainer = pl.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_progress_bar=False,
    ...                      enable_checkpointing=False, enable_model_summary=False, callbacks=[qat])
    >>> model = BertMLM(vocab_size=dm.vocab_size, preset="tiny")
    >>> trainer.fit(model, dm)
    >>> qat.active, len(qat.targets)  # 6 Linear layers in each of the 3 blocks
    (True, 18)
    >>> report = export(model, qat)
    >>> report["converted"], type(model.model.bert.encoder.layer[0].output.dense.weight.data).__name__
    (18, 'Int8Tensor')
    >>> fast = compile_quantized(model.model)  # int8 kernels from the first call on (it compiles, seconds)
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_efficient.blocks import Priority, find_block_stacks, wrap_forward
from lightning_efficient.errors import ConfigurationError, NoTargetModulesError
from lightning_efficient.technique import Technique, check_choice, check_range

__all__ = [
    "ACTIVATIONS",
    "GRANULARITIES",
    "QAT_PRIORITY",
    "WEIGHT_DTYPES",
    "QuantizationAwareTraining",
    "compile_quantized",
    "export",
    "fake_quantize_configs",
    "load_quantized",
    "save_quantized",
]

WEIGHT_DTYPES = ("int8", "int4")
GRANULARITIES = ("per_channel", "per_group")
#: Activation schemes: int8, dynamic; symmetric per tensor or per token (torchao ``Int8Tensor``), or asymmetric
#: per token (torchao ``IntxUnpackedToInt8Tensor``).
ACTIVATIONS = ("per_tensor", "per_token", "asymmetric_per_token")
#: Priority of the fake-quantization wrapper on a Linear's forward: innermost (it replaces the matmul).
QAT_PRIORITY = Priority.QUANTIZE
QUANTIZATION_FILE = "quantization.json"
WEIGHTS_FILE = "quantized_model.pt"


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

    Example:
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


def _embedding_base_config() -> Any:
    from torchao.quantization import IntxWeightOnlyConfig, PerAxis

    return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))


def _int8_scheme(activations: str) -> bool:
    """Whether ``activations`` converts to torchao's ``Int8Tensor`` (symmetric) rather than its Intx layout."""
    return activations in ("per_tensor", "per_token")


def _activation_granularity(activations: str) -> Any:
    from torchao.quantization import PerRow, PerTensor

    return PerRow() if activations == "per_token" else PerTensor()


def _base_config(weight_dtype: str, granularity: str, group_size: int, activations: str) -> Any:
    """The torchao post-training config that :func:`export` applies (the QAT scheme's target)."""
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


class QuantizationAwareTraining(Technique):
    """Fake-quantize Linear layers with torchao from a chosen step, for an int8 model at the end.

    Args:
        weight_dtype: ``"int8"`` or ``"int4"`` weights.
        granularity: Weight scales ``"per_channel"`` (one per output row) or ``"per_group"``
            (one per ``group_size`` input columns of each row).
        group_size: Columns per weight group (``per_group``, >= 2); must divide the input width
            of every target layer.
        activations: How the inputs are quantized (int8, dynamic): ``"per_tensor"`` or
            ``"per_token"`` (symmetric; int8 weights per channel only; fast int8 kernels on CPU
            through :func:`compile_quantized`), or ``"asymmetric_per_token"`` (any weights;
            torchao's Intx layout, no CPU kernel). Default: ``"per_tensor"`` for int8 weights per
            channel, else ``"asymmetric_per_token"``.
        start_step: Optimizer step from which fake quantization is on (typically the last part
            of training or fine-tuning; 0: from the start).
        freeze_step: Step from which the weight scales are held at their values of that step
            (>= ``start_step``; default: never, the scales follow the weights).
        include: Shell-style patterns of module names to quantize (e.g. ``"*.attention.*"``),
            searched in the whole model; default: every module of ``module_types`` inside the
            Transformer blocks (not embeddings, not the task heads). Each pattern must match.
        exclude: Patterns of names to leave out (each must match something).
        module_types: Class names of the modules quantized (``nn.Linear`` subclasses).
        embeddings: Also fake-quantize every ``nn.Embedding`` of the model (int8 per row, weight
            only; word, position and type tables), for a smaller saved model.
        block_paths: Attribute paths of the block lists, for models the block locator does not know.
        strict_schedule: Fail before training when the run ends before ``start_step`` or
            ``freeze_step`` (set False for a schedule spread over several fits, e.g. resuming with
            a larger ``max_steps``: it warns).

    Validation and prediction in a ``fit`` see the model as it trains (fake-quantized once
    ``start_step`` is reached); ``validate``, ``test`` and ``predict`` runs evaluate it fake-quantized.
    Logged every step: ``qat/active`` (1 once fake quantization is on) and ``qat/frozen``.
    """

    name = "qat"
    hooks = ("setup", "on_train_start", "on_train_batch_start")
    distributed_safe = True
    keep_after_fit = True

    def __init__(
        self,
        weight_dtype: str = "int8",
        granularity: str = "per_channel",
        group_size: int = 32,
        activations: str | None = None,
        start_step: int = 0,
        freeze_step: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        module_types: Sequence[str] = ("Linear",),
        embeddings: bool = False,
        block_paths: Sequence[str] | None = None,
        strict_schedule: bool = True,
    ) -> None:
        super().__init__()
        self.weight_dtype = check_choice("weight_dtype", weight_dtype, WEIGHT_DTYPES)
        self.granularity = check_choice("granularity", granularity, GRANULARITIES)
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise ConfigurationError(f"group_size={group_size!r} must be a positive integer")
        self.group_size = int(check_range("group_size", group_size, low=2))
        int8_per_channel = self.weight_dtype == "int8" and self.granularity == "per_channel"
        if activations is None:
            activations = "per_tensor" if int8_per_channel else "asymmetric_per_token"
        self.activations = check_choice("activations", activations, ACTIVATIONS)
        if _int8_scheme(self.activations) and not int8_per_channel:
            raise ConfigurationError(
                f"activations={self.activations!r} converts to torchao's Int8Tensor, which holds int8 weights per "
                f"channel only, not weight_dtype={self.weight_dtype!r} with granularity={self.granularity!r}; "
                "use activations='asymmetric_per_token' (or leave it unset) for int4 or grouped weights"
            )
        self.start_step = int(check_range("start_step", start_step, low=0))
        if freeze_step is not None:
            freeze_step = int(check_range("freeze_step", freeze_step, low=self.start_step))
        self.freeze_step = freeze_step
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else []
        self.module_types = tuple(module_types)
        if not self.module_types:
            raise ConfigurationError("module_types=() must name at least one module class, e.g. ('Linear',)")
        self.embeddings = bool(embeddings)
        self.block_paths = list(block_paths) if block_paths else None
        self.strict_schedule = bool(strict_schedule)
        _torchao()
        self.active = False
        self.targets: dict[str, nn.Module] = {}
        self._quantizers: dict[str, _FakeQuantizers] = {}
        self._pending_frozen: dict[str, dict[str, torch.Tensor]] = {}

    # -- surgery ------------------------------------------------------------------------------
    def _is_target_type(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and any(cls.__name__ in self.module_types for cls in type(module).__mro__)

    def _candidates(self, pl_module: nn.Module) -> dict[str, nn.Module]:
        if self.include:
            return {n: m for n, m in pl_module.named_modules() if self._is_target_type(m)}
        return {
            f"{stack.path}.{i}.{n}" if n else f"{stack.path}.{i}": m
            for stack in find_block_stacks(pl_module, self.block_paths)
            for i, block in enumerate(stack.blocks)
            for n, m in block.named_modules()
            if self._is_target_type(m)
        }

    def _match(self, names: list[str], owner: str) -> list[str]:
        chosen = list(names)
        for option, patterns in (("include", self.include or []), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(name, pattern) for name in chosen):
                    shown = ", ".join(chosen[:8]) + (", ..." if len(chosen) > 8 else "")
                    raise NoTargetModulesError(
                        f"{option} pattern {pattern!r} matches no {'/'.join(self.module_types)} module of {owner}; "
                        f"its candidates are: {shown}"
                    )
            if option == "include" and patterns:
                chosen = [n for n in chosen if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        return [n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in self.exclude)]

    def apply(self, pl_module: nn.Module) -> list[Any]:
        owner = type(pl_module).__name__
        candidates = self._candidates(pl_module)
        names = self._match(list(candidates), owner)
        if not names:
            raise NoTargetModulesError(
                f"{owner}: no {'/'.join(self.module_types)} module left to quantize after exclude"
            )
        if self.granularity == "per_group":
            bad = {n: candidates[n].in_features for n in names if candidates[n].in_features % self.group_size}
            if bad:
                widths = sorted({candidates[n].in_features for n in names})
                name, width = next(iter(bad.items()))
                divisors = [d for d in range(2, widths[0] + 1) if all(w % d == 0 for w in widths)]
                fix = (
                    f"a group size that divides them all ({divisors[-6:]})"
                    if divisors
                    else "no group size divides them all"
                )
                raise ConfigurationError(
                    f"group_size={self.group_size} does not divide the input width {width} of {name} "
                    f"({len(bad)} layers affected; the target widths are {widths}): {fix}; or use "
                    "granularity='per_channel', or exclude those layers"
                )
        weight = fake_quantize_configs(self.weight_dtype, self.granularity, self.group_size)[1]
        self.targets = {n: candidates[n] for n in names}
        self._quantizers = {n: _FakeQuantizers(_activation_quantizer(self.activations), weight) for n in names}
        handles = [
            wrap_forward(module, functools.partial(self._forward, self._quantizers[n], module), QAT_PRIORITY)
            for n, module in self.targets.items()
        ]
        if self.embeddings:
            tables = {n: m for n, m in pl_module.named_modules() if isinstance(m, nn.Embedding)}
            if not tables:
                raise NoTargetModulesError(f"embeddings=True, but {owner} has no nn.Embedding")
            for name, table in tables.items():
                self.targets[name] = table
                self._quantizers[name] = _FakeQuantizers(None, _embedding_weight_config())
                forward = functools.partial(self._embedding_forward, self._quantizers[name], table)
                handles.append(wrap_forward(table, forward, QAT_PRIORITY))
        return handles

    def remove(self, pl_module: nn.Module) -> None:
        super().remove(pl_module)
        self.targets, self._quantizers = {}, {}

    def _forward(self, quantizers: _FakeQuantizers, module: nn.Linear, forward: Any, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return forward(x)
        output = F.linear(quantizers.activation(x), quantizers.weight(module.weight), module.bias)
        quantizers.release()
        return output

    def _embedding_forward(
        self, quantizers: _FakeQuantizers, table: nn.Embedding, forward: Any, ids: torch.Tensor
    ) -> torch.Tensor:
        if not self.active:
            return forward(ids)
        weight = quantizers.weight(table.weight)
        quantizers.release()
        return F.embedding(
            ids, weight, table.padding_idx, table.max_norm, table.norm_type, table.scale_grad_by_freq, table.sparse
        )

    @property
    def frozen(self) -> bool:
        """Whether the weight scales are held (``freeze_step`` reached)."""
        return bool(self._quantizers) and all(q.frozen for q in self._quantizers.values())

    def frozen_scales(self) -> dict[str, dict[str, torch.Tensor]]:
        """The held weight scales and zero points of each target, by module name (empty unless frozen)."""
        return {
            n: {"scale": q.weight.scale.detach().clone(), "zero_point": q.weight.zero_point.detach().clone()}
            for n, q in self._quantizers.items()
            if q.frozen
        }

    # -- Lightning hooks ----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            self.active = True  # validate / test / predict evaluate the model as it will be quantized

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        for option, step in (("start_step", self.start_step), ("freeze_step", self.freeze_step)):
            if step is not None and step > 0 and math.isfinite(total) and step >= total:
                message = (
                    f"{option}={step} is never reached: the run has {int(total)} optimizer steps "
                    f"(0-{int(total) - 1}); lower it or raise max_steps"
                )
                if self.strict_schedule:
                    raise ConfigurationError(message + " (or strict_schedule=False to reach it in a later fit)")
                warnings.warn(message, UserWarning, stacklevel=2)
        unknown = sorted(set(self._pending_frozen) - set(self._quantizers))
        if unknown:
            raise ConfigurationError(
                f"the checkpoint holds held weight scales of {unknown[:3]}, which this {type(self).__name__} does not "
                "quantize; resume with the include / exclude / embeddings settings of the run that wrote it"
            )
        for name, saved in self._pending_frozen.items():
            device = self.targets[name].weight.device  # the checkpoint may have been read onto another device
            self._quantizers[name].set_frozen(saved["scale"].to(device), saved["zero_point"].to(device))
        self._pending_frozen = {}
        self.active = trainer.global_step >= self.start_step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self.active = step >= self.start_step
        if self.freeze_step is not None and step >= self.freeze_step and not self.frozen:
            for name, quantizers in self._quantizers.items():
                quantizers.freeze_weight(self.targets[name].weight)
        self.log_metrics(pl_module, {"active": float(self.active), "frozen": float(self.frozen)})

    def state_dict(self) -> dict[str, Any]:
        return {"frozen_scales": self.frozen_scales()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_frozen = dict(state_dict.get("frozen_scales", {}))


# -- conversion and files ----------------------------------------------------------------------
@torch.no_grad()
def export(model: nn.Module, qat: QuantizationAwareTraining) -> dict[str, Any]:
    """Convert ``qat``'s target layers of ``model`` into torchao int8 layers, in place; ``qat`` lets go.

    Each target ``nn.Linear`` gets an int8 weight (scales per channel or group, the held scales
    when ``freeze_step`` was reached) that quantizes its input at run time as in training:
    torchao's ``Int8Tensor`` for the symmetric ``activations`` schemes, ``IntxUnpackedToInt8Tensor``
    for ``"asymmetric_per_token"``; embedding tables (``embeddings=True``) get int8 rows. The
    outputs equal those of the fake-quantized model up to the float rounding of the int8 products
    (the integer codes are the same). On a CPU, :func:`compile_quantized` then makes it fast. Masks
    of :class:`~lightning_efficient.callbacks.MagnitudePruning` on the same layers should be made
    permanent first (its ``export``): zero weights stay zero.

    Returns:
        ``{"converted", "weight_dtype", "granularity", "group_size", "activations", "embeddings",
        "modules"}`` (``modules``: the converted names, relative to ``model``).
    """
    _torchao()
    from torchao.quantization import MappingType, PerRow, quantize_
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor, QuantizeTensorToInt8Kwargs
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    if qat._applied_to is not model:
        raise ConfigurationError("export: the QuantizationAwareTraining callback is not applied to this model")
    frozen = qat.frozen_scales()
    names = list(qat.targets)
    qat.detach(model)
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
        "converted": len(names),
        "weight_dtype": qat.weight_dtype,
        "granularity": qat.granularity,
        "group_size": qat.group_size,
        "activations": qat.activations,
        "embeddings": qat.embeddings,
        "modules": names,
    }


def compile_quantized(model: nn.Module) -> nn.Module:
    """Compile ``model``'s forward for inference with ``torch.compile`` and Inductor's freezing, in place.

    Under freezing the int8 weights of :func:`export` become constants of the graph and the int8
    products fused int8 kernels: this is where the speed of an int8 model on a CPU comes from (the
    eager torchao layers are no faster than fp32: 0.5x-1x on BERT-small and -base). Freezing applies where gradients are off
    (``torch.inference_mode``, ``torch.no_grad``, Lightning's ``predict`` / ``validate``); the
    weights are then folded in, so do not change them afterwards. The first call compiles (seconds
    to a minute); a second input shape compiles once more, for every shape from then on. The
    module keeps its type and attributes (``config``, ``generate``); needs a C++ compiler, as any
    ``torch.compile`` on CPU.

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
    return model


def _hf_model(model: nn.Module) -> nn.Module:
    """``model`` itself if it is a transformers model, else its outermost transformers submodule."""
    from transformers import PreTrainedModel

    for _, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise ConfigurationError(f"{type(model).__name__} holds no transformers model to save; save its state_dict instead")


def _converted_types() -> tuple[type, ...]:
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    return Int8Tensor, IntxUnpackedToInt8Tensor


def save_quantized(model: nn.Module, path: str | Path, report: dict[str, Any]) -> Path:
    """Save the transformers model inside ``model``, converted by :func:`export`, to a directory.

    Writes ``config.json`` (the HF config), ``quantization.json`` (the scheme from ``report``,
    what :func:`export` returned, and the converted module names) and ``quantized_model.pt`` (the
    state dict with torchao's int8 tensors). :func:`load_quantized` reads it back.
    """
    hf = _hf_model(model)
    converted = _converted_types()
    modules = [n for n, m in hf.named_modules() if isinstance(getattr(m, "weight", None), converted)]
    if not modules:
        raise ConfigurationError(f"{type(hf).__name__} has no converted layer: run export(model, qat) first")
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
    state = torch.load(path / WEIGHTS_FILE, weights_only=True)  # torchao registers its tensors as safe
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
