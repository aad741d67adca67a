"""The QuantizationAwareTraining callback: which Linear layers, when fake quantization is on, held scales.

The chosen layers are not swapped: their ``forward`` is routed through the fake quantizers of
:mod:`~lightning_efficient.callbacks.quantization.fake_quant` with
:func:`~lightning_efficient.blocks.wrap_forward` at ``Priority.QUANTIZE`` (innermost: it replaces
the matmul), so parameters and checkpoint keys never change. The layers are chosen by the shared
selector (:func:`~lightning_efficient.targets.select_modules`), so a block described with
:func:`~lightning_efficient.architectures.register_architecture` is quantized like a built-in one.

An attention whose Q, K and V are one fused parameter (the architecture table's ``in_proj``:
``nn.MultiheadAttention`` in ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``) is
quantized whole when its output projection is chosen: the fused in-projection is a target of its
own (``<attention>.in_proj``) and the attention's forward runs with both projections
fake-quantized (see :mod:`~lightning_efficient.callbacks.quantization.attention`).

Examples:
    >>> from lightning_efficient import BertClassifier
    >>> qat = QuantizationAwareTraining(exclude=["*.attention.*"])
    >>> qat.attach(BertClassifier(vocab_size=50, num_labels=2, preset="tiny"))
    >>> len(qat.targets), next(iter(qat.targets))  # the 2 FFN layers of each of the 3 blocks
    (6, 'model.bert.encoder.layer.0.intermediate.dense')
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_efficient.architectures import architecture_of, block_view
from lightning_efficient.blocks import Priority, find_block_stacks, wrap_forward
from lightning_efficient.callbacks.quantization.attention import (
    FusedInProjection,
    check_supported_attention,
    fake_quantized_projections,
    multihead_attention,
    no_fast_path,
)
from lightning_efficient.callbacks.quantization.fake_quant import (
    ACTIVATIONS,
    GRANULARITIES,
    WEIGHT_DTYPES,
    _activation_quantizer,
    _embedding_weight_config,
    _FakeQuantizers,
    _holds_converted_layers,
    _int8_scheme,
    _torchao,
    fake_quantize_configs,
)
from lightning_efficient.errors import (
    ConfigurationError,
    NoTargetModulesError,
    check_choice,
    check_int,
    check_patterns,
    check_range,
)
from lightning_efficient.targets import select_modules
from lightning_efficient.technique import Technique, check_schedule_reached

__all__ = ["QAT_PRIORITY", "QuantizationAwareTraining"]

#: Priority of the fake-quantization wrapper on a Linear's forward (an alias of ``Priority.QUANTIZE``):
#: innermost, it replaces the matmul.
QAT_PRIORITY = Priority.QUANTIZE


def _fused_attentions(
    model: nn.Module, chosen: dict[str, nn.Module], block_paths: list[str] | None
) -> dict[str, nn.MultiheadAttention]:
    """The attentions with a fused in-projection (architecture table) whose output projection is chosen, by path.

    Raises:
        ConfigurationError: A chosen Linear is the ``out_proj`` of an ``nn.MultiheadAttention`` that no
            architecture entry describes, or of one that cannot be quantized (see
            :func:`~lightning_efficient.callbacks.quantization.attention.check_supported_attention`).
    """
    fused: dict[str, nn.MultiheadAttention] = {}
    try:
        stacks = find_block_stacks(model, block_paths)
    except NoTargetModulesError:  # include= patterns on a model without a block stack
        stacks = []
    for stack in stacks:
        for index, block in enumerate(stack.blocks):
            if architecture_of(block) is None:
                continue
            for attention in block_view(block).attentions:
                path = ".".join(part for part in (stack.path, str(index), attention.path) if part)
                output = ".".join(part for part in (stack.path, str(index), attention.layout.output) if part)
                if attention.fused and output == f"{path}.out_proj" and output in chosen:
                    check_supported_attention(attention.module, path)
                    fused[path] = attention.module
    for name in chosen:
        owner, _, leaf = name.rpartition(".")
        if leaf == "out_proj" and owner not in fused and isinstance(model.get_submodule(owner), nn.MultiheadAttention):
            raise ConfigurationError(
                f"{name} is the output projection of {owner} (nn.MultiheadAttention), whose fused in-projection "
                "(in_proj_weight) no architecture entry describes, so it would stay in float; describe its block "
                "with register_architecture(..., attentions=[AttentionLayout(<path>, in_proj='in_proj_weight', "
                f"output='<path>.out_proj')]), or exclude '{name}'"
            )
    return fused


class _RestoreAttribute:
    """A handle whose ``remove()`` puts an attribute back."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name, self.value = owner, name, getattr(owner, name)

    def remove(self) -> None:
        setattr(self.owner, self.name, self.value)


def _disable_torch_fast_paths(model: nn.Module, names: list[str]) -> list[Any]:
    """Keep ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` around the targets off their fused
    inference paths, which read the weights directly (and would run unquantized): a no-op forward pre-hook
    on the layer, ``use_nested_tensor=False`` on the stack. Returns the handles that undo it."""
    handles: list[Any] = []
    seen: set[int] = set()
    for name in names:
        parts = name.split(".")
        for depth in range(len(parts)):
            module = model.get_submodule(".".join(parts[:depth]))
            if id(module) in seen:
                continue
            if isinstance(module, nn.TransformerEncoderLayer):
                seen.add(id(module))
                handles.append(module.register_forward_pre_hook(no_fast_path))
            elif isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False):
                seen.add(id(module))
                handles.append(_RestoreAttribute(module, "use_nested_tensor"))
                module.use_nested_tensor = False
    return handles


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
            through :func:`~lightning_efficient.callbacks.quantization.compile_quantized`), or
            ``"asymmetric_per_token"`` (any weights; torchao's Intx layout, no CPU kernel).
            Default: ``"per_tensor"`` for int8 weights per channel, else ``"asymmetric_per_token"``.
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
    ``start_step`` is reached); ``validate``, ``test`` and ``predict`` runs evaluate it fake-quantized,
    or, once it holds int8 layers (``export_quantized``, or ``module.model = load_quantized(...)``),
    as it is.
    Logged every step: ``qat/active`` (1 once fake quantization is on) and ``qat/frozen``.
    """

    name = "qat"
    hooks = ("setup", "on_train_start", "on_train_batch_start")
    distributed_safe = True
    keep_after_fit = True
    compile_safe = True  # tests/test_compile.py: compiled training equals eager
    compile_note = "recompiles once when fake quantization switches on and once when the weight scales freeze"

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
        self.group_size = check_int("group_size", group_size, low=2)
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
        self.include = check_patterns("include", include) if include else None
        self.exclude = check_patterns("exclude", exclude) if exclude else []
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
    def apply(self, pl_module: nn.Module) -> list[Any]:
        owner = type(pl_module).__name__
        chosen = select_modules(
            pl_module, self.include, self.exclude or None, self.module_types, block_paths=self.block_paths
        )
        candidates = {n: m for n, m in chosen.items() if isinstance(m, nn.Linear)}  # torchao converts Linears
        names = list(candidates)
        if not names:
            shown = ", ".join(list(chosen)[:3]) + (", ..." if len(chosen) > 3 else "")
            raise NoTargetModulesError(
                f"no nn.Linear among the modules chosen in {owner} ({shown}); QuantizationAwareTraining quantizes "
                f"nn.Linear layers (module_types={list(self.module_types)!r}), and nn.Embedding tables with embeddings=True"
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
        fused = _fused_attentions(pl_module, candidates, self.block_paths)
        self.targets = {}
        for name in names:
            owner = name.rpartition(".")[0]
            if owner in fused and name == f"{owner}.out_proj":
                self.targets[f"{owner}.in_proj"] = FusedInProjection(fused[owner])
            self.targets[name] = candidates[name]
        self._quantizers = {n: _FakeQuantizers(_activation_quantizer(self.activations), weight) for n in self.targets}
        handles: list[Any] = [
            wrap_forward(module, functools.partial(self._forward, self._quantizers[n], module), Priority.QUANTIZE)
            for n, module in self.targets.items()
            if n in candidates
        ]
        for path, attention in fused.items():
            forward = functools.partial(self._attention_forward, path, attention)
            handles.append(wrap_forward(attention, forward, Priority.QUANTIZE))
        handles += _disable_torch_fast_paths(pl_module, list(self.targets))
        if self.embeddings:
            tables = {n: m for n, m in pl_module.named_modules() if isinstance(m, nn.Embedding)}
            if not tables:
                raise NoTargetModulesError(f"embeddings=True, but {owner} has no nn.Embedding")
            for name, table in tables.items():
                self.targets[name] = table
                self._quantizers[name] = _FakeQuantizers(None, _embedding_weight_config())
                forward = functools.partial(self._embedding_forward, self._quantizers[name], table)
                handles.append(wrap_forward(table, forward, Priority.QUANTIZE))
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

    def _attention_forward(
        self, path: str, attention: nn.MultiheadAttention, forward: Any, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``attention``'s forward (the arguments of ``nn.MultiheadAttention.forward``), fake-quantized while active."""
        if not self.active:
            return forward(*args, **kwargs)
        inner, outer = self._quantizers[f"{path}.in_proj"], self._quantizers[f"{path}.out_proj"]
        project_in, project_out = fake_quantized_projections(
            attention, inner.activation, inner.weight, outer.activation, outer.weight
        )
        result = multihead_attention(attention, project_in, project_out, *args, **kwargs)
        inner.release()
        outer.release()
        return result

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

    def plan_at(self, step: int, total_steps: int, num_blocks: int) -> dict[str, Any]:
        """Whether fake quantization is on (from ``start_step``) and the weight scales held (from ``freeze_step``) at ``step``.

        Fake quantization costs element-wise work only: the matmuls, and so the model FLOPs, stay
        as they are (no ``block_work``).

        Examples:
            >>> qat = QuantizationAwareTraining(start_step=10, freeze_step=15)
            >>> qat.plan_at(9, 20, 4), qat.plan_at(15, 20, 4)
            ({'fake_quant': False, 'scales_frozen': False}, {'fake_quant': True, 'scales_frozen': True})
        """
        return {
            "fake_quant": step >= self.start_step,
            "scales_frozen": self.freeze_step is not None and step >= self.freeze_step,
        }

    # -- Lightning hooks ----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.is_applied and _holds_converted_layers(pl_module):  # export_quantized / load_quantized ran
            if stage == "fit":
                raise ConfigurationError(
                    f"{type(pl_module).__name__} already holds torchao int8 layers (export_quantized or "
                    "load_quantized made it), which cannot train; fit the float model, or remove "
                    "QuantizationAwareTraining from the callbacks"
                )
            self.active = False  # validate / test / predict run the int8 model as it is
            return
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            self.active = True  # validate / test / predict evaluate the model as it will be quantized

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_schedule_reached(trainer, "start_step", self.start_step, self.strict_schedule)
        check_schedule_reached(trainer, "freeze_step", self.freeze_step, self.strict_schedule)
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
