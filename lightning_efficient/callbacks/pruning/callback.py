"""The :class:`MagnitudePruning` technique: the schedule, the masks and the structured units put to work in a fit.

Examples:
    >>> from lightning_efficient import BertClassifier
    >>> model = BertClassifier(vocab_size=50, num_labels=2, preset="tiny")
    >>> pruning = MagnitudePruning(final_sparsity=0.5, structure="heads")
    >>> pruning.attach(model); pruning.prune_now(model, 0.5)
    >>> pruning.sparsity, pruning.events
    (0.5, [0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_efficient import targets
from lightning_efficient.architectures import block_view
from lightning_efficient.callbacks.pruning.exporting import export_pruned
from lightning_efficient.callbacks.pruning.masks import (
    SCOPES,
    _mask_pairs,
    _MaskHandle,
    add_masks,
    layer_sparsity,
    log_layer_sparsity,
    magnitude_masks,
    total_sparsity,
)
from lightning_efficient.callbacks.pruning.schedule import _count, cubic_sparsity, pruning_steps
from lightning_efficient.callbacks.pruning.structured import (
    BlockUnits,
    _alive_heads,
    _alive_neurons,
    block_units,
    structured_masks,
)
from lightning_efficient.errors import ConfigurationError, check_int, check_patterns
from lightning_efficient.technique import Technique, check_choice, check_range, check_schedule_reached

__all__ = ["STRUCTURES", "MagnitudePruning"]

#: What is pruned: single weights, or whole attention heads and/or FFN neurons of the blocks.
STRUCTURES = ("unstructured", "heads", "neurons", "heads_and_neurons")


class MagnitudePruning(Technique):
    """Gradual (Zhu & Gupta cubic) or one-shot magnitude pruning, unstructured or of heads and FFN neurons.

    Args:
        final_sparsity: Sparsity reached at ``end_step``: the share of target weights (unstructured)
            or of heads / FFN neurons (structured) pruned; in [0, 1).
        start_step: Optimizer step of the first pruning event (>= 0).
        end_step: Step of the last event (>= ``start_step``; default ``start_step``: one-shot).
        frequency: Steps between events (>= 1).
        initial_sparsity: Sparsity of the first event, in [0, ``final_sparsity``].
        structure: ``"unstructured"`` (single weights), ``"heads"``, ``"neurons"`` or
            ``"heads_and_neurons"`` (whole attention heads / FFN neurons of the blocks; the blocks'
            class needs an entry in :mod:`lightning_efficient.architectures`, see
            :func:`~lightning_efficient.architectures.register_architecture`).
        scope: ``"per_layer"`` (each layer / attention / FFN loses the same share) or ``"global"``
            (ranked across all of them; every attention keeps a head). Structured pruning that
            must load with plain HF ``from_pretrained`` after :meth:`export` needs ``per_layer``.
        include: Unstructured: shell-style patterns of module names to prune (e.g.
            ``"*.attention.*"``), searched in the whole model; default: every module of
            ``module_types`` inside the Transformer blocks (not embeddings, not the heads).
            Structured: patterns of block names (e.g. ``"model.bert.encoder.layer.[0-1]"``).
            Each pattern must match something (chosen by :mod:`lightning_efficient.targets`).
        exclude: Patterns of names to leave out (each must match something).
        module_types: Class names of the modules pruned (unstructured; their ``weight``).
        rewind_step: Lottery-ticket rewinding: keep the target weights of this step and reset the
            surviving weights to them at ``end_step`` (<= ``end_step``; default: no rewinding).
        block_paths: Attribute paths of the block lists, for models the block locator does not know.
        strict_schedule: Fail before training when the run ends before ``end_step`` (set False for a
            schedule spread over several fits, e.g. resuming with a larger ``max_steps``: it warns).

    Logged every step: ``pruning/sparsity`` (share of zero-masked target weights) and
    ``pruning/target_sparsity``; structured also ``pruning/heads_pruned`` and
    ``pruning/neurons_pruned`` (shares). At each event, the sparsity of every pruned layer goes to
    the loggers as ``pruning/sparsity/<module name>`` (see :meth:`layer_sparsity`).
    """

    name = "pruning"
    hooks = ("on_train_start", "on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
    #: Weights are masked before QAT holds its weight scales at the same step (sparsify, then quantize).
    runs_before = ("qat",)
    conflicts_with = ("progressive_stacking",)
    distributed_safe = True
    keep_after_fit = True
    masks_weights = True
    compile_safe = True  # tests/test_compile.py: compiled training equals eager
    compile_note = "masks multiply the weights and gradients outside the forward"

    def __init__(
        self,
        final_sparsity: float = 0.5,
        start_step: int = 0,
        end_step: int | None = None,
        frequency: int = 100,
        initial_sparsity: float = 0.0,
        structure: str = "unstructured",
        scope: str = "per_layer",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        module_types: Sequence[str] = ("Linear",),
        rewind_step: int | None = None,
        block_paths: Sequence[str] | None = None,
        strict_schedule: bool = True,
    ) -> None:
        super().__init__()
        final_sparsity = check_range("final_sparsity", final_sparsity, low=0.0, high=1.0, high_inclusive=False)
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(check_range("initial_sparsity", initial_sparsity, low=0.0, high=final_sparsity))
        self.start_step = check_int("start_step", start_step, low=0)
        end_step = self.start_step if end_step is None else end_step
        self.end_step = check_int("end_step", end_step, low=self.start_step)
        self.frequency = check_int("frequency", frequency, low=1)
        self.structure = check_choice("structure", structure, STRUCTURES)
        self.scope = check_choice("scope", scope, SCOPES)
        self.include = check_patterns("include", include or None)
        self.exclude = check_patterns("exclude", exclude or None) or []
        if isinstance(module_types, str) or not module_types:
            raise ConfigurationError(
                f"module_types={module_types!r} must name at least one module class, as a list, e.g. ['Linear']"
            )
        self.module_types = tuple(module_types)
        self.rewind_step = check_int("rewind_step", rewind_step, low=0, high=self.end_step, optional=True)
        self.block_paths = list(block_paths) if block_paths else None
        self.strict_schedule = bool(strict_schedule)
        self.last_event = -1  # optimizer step of the latest pruning event
        self.target_sparsity = 0.0
        self.rewind_weights: dict[str, torch.Tensor] = {}
        self._targets: dict[str, nn.Module] = {}  # name -> masked module
        self._units: list[BlockUnits] = []
        self._params: list[torch.Tensor] = []
        self._masks: list[torch.Tensor] = []
        self._masked_at_step = -1
        self._stats: dict[str, float] = {}

    @property
    def _prunes_heads(self) -> bool:
        return self.structure in ("heads", "heads_and_neurons")

    @property
    def _prunes_neurons(self) -> bool:
        return self.structure in ("neurons", "heads_and_neurons")

    @property
    def events(self) -> list[int]:
        """The optimizer steps of the pruning events."""
        return pruning_steps(self.start_step, self.end_step, self.frequency)

    def plan_at(self, step: int, total_steps: int, num_blocks: int) -> dict[str, Any]:
        """The sparsity in force at optimizer step ``step`` (Zhu & Gupta's cubic schedule, :func:`cubic_sparsity`).

        An event prunes at the start of its step. The masked weights still run in dense kernels,
        so the work per block does not change (no ``block_work``).

        Examples:
            >>> pruning = MagnitudePruning(final_sparsity=0.8, start_step=10, end_step=20, frequency=5)
            >>> [round(pruning.plan_at(step, 30, 4)["sparsity"], 4) for step in (0, 10, 15, 20)]
            [0.0, 0.0, 0.7, 0.8]
        """
        sparsity = cubic_sparsity(
            step, self.final_sparsity, self.start_step, self.end_step, self.frequency, self.initial_sparsity
        )
        return {"sparsity": sparsity}

    # -- surgery ------------------------------------------------------------------------------
    def apply(self, pl_module: nn.Module) -> Any:
        exclude = self.exclude or None
        if self.structure == "unstructured":
            self._targets = targets.select_modules(
                pl_module, self.include, exclude, self.module_types, block_paths=self.block_paths
            )
            handles = [add_masks(self._targets.values())]
        else:
            blocks = targets.select_blocks(pl_module, self.include, exclude, block_paths=self.block_paths)
            self._units = [block_units(block) for block in blocks.values()]  # an unknown block class fails here
            handles = self._add_structured_masks(pl_module, blocks)
        self._params, self._masks = _mask_pairs(self._targets.values())
        self._update_stats()
        return handles

    def _add_structured_masks(self, pl_module: nn.Module, blocks: dict[str, nn.Module]) -> list[_MaskHandle]:
        heads, neurons = self._prunes_heads, self._prunes_neurons
        module_names = {id(m): n for n, m in pl_module.named_modules()}
        rows, columns = [], []
        for (name, block), units in zip(blocks.items(), self._units):
            if heads and not units.attentions:
                fused = [a.layout.in_proj for a in block_view(block).attentions if a.fused]
                reason = (
                    f"its attention keeps Q, K and V in one fused parameter ({fused[0]}), which cannot lose single heads"
                    if fused
                    else "its architecture entry lists no attention"
                )
                raise ConfigurationError(
                    f"structure={self.structure!r}: block {name} ({type(block).__name__}) has no attention whose heads "
                    f"can be pruned: {reason}; use structure='neurons' or 'unstructured'"
                )
            if neurons and units.ffn is None:
                raise ConfigurationError(
                    f"structure={self.structure!r}: block {name} has no FFN whose neurons can be pruned"
                )
            for unit in units.attentions if heads else []:
                rows += unit.inputs
                columns.append(unit.output)
            if neurons:
                rows.append(units.ffn.inputs)
                columns.append(units.ffn.output)
        self._check_structured_counts(heads, neurons)
        self._targets = {module_names[id(m)]: m for m in [*rows, *columns]}
        return [add_masks(rows, bias=True), add_masks(columns)]

    def _check_structured_counts(self, heads: bool, neurons: bool) -> None:
        """Fail if ``final_sparsity`` would remove every head (or neuron) of a layer."""
        groups = []
        if heads:
            groups.append(("heads", "attention", [a.heads for u in self._units for a in u.attentions]))
        if neurons:
            groups.append(("neurons", "FFN", [u.ffn.neurons for u in self._units]))
        for unit, owner, sizes in groups:
            if self.scope == "per_layer":
                for size in sizes:
                    if _count(self.final_sparsity, size) >= size:
                        raise ConfigurationError(
                            f"final_sparsity={self.final_sparsity} would prune all {size} {unit} of an {owner} layer; "
                            f"with {size} {unit} per layer it must be < {(size - 0.5) / size:.4g}"
                        )
            elif _count(self.final_sparsity, sum(sizes)) > sum(sizes) - len(sizes):
                limit = (sum(sizes) - len(sizes) + 0.5) / sum(sizes)
                raise ConfigurationError(
                    f"final_sparsity={self.final_sparsity} would prune every {unit[:-1]} of some {owner} layer "
                    f"({sum(sizes)} {unit} in {len(sizes)} layers, each keeps one); it must be < {limit:.4g}"
                )

    def remove(self, pl_module: nn.Module) -> None:
        super().remove(pl_module)
        self._targets, self._units, self._params, self._masks = {}, [], [], []

    # -- pruning ------------------------------------------------------------------------------
    @torch.no_grad()
    def prune_now(self, pl_module: nn.Module, sparsity: float) -> None:
        """Raise the masks to ``sparsity`` by magnitude (never reviving a pruned weight) and apply them."""
        if self.structure == "unstructured":
            weights = {name: m.weight for name, m in self._targets.items()}
            masks = {name: m.weight_mask for name, m in self._targets.items()}
            for name, keep in magnitude_masks(weights, sparsity, self.scope, masks).items():
                masks[name].copy_(keep)
        else:
            structured_masks(self._units, sparsity, self._prunes_heads, self._prunes_neurons, self.scope)
        torch._foreach_mul_([p.data for p in self._params], self._masks)
        self.target_sparsity = sparsity
        self._update_stats()

    def layer_sparsity(self) -> dict[str, float]:
        """The share of masked weights of each pruned module, by name."""
        return layer_sparsity(self._targets)

    @property
    def sparsity(self) -> float:
        """The share of masked weights over all pruned modules."""
        return self._stats.get("sparsity", 0.0)

    def _update_stats(self) -> None:
        self._stats = {"sparsity": total_sparsity(self._targets)}
        if self._prunes_heads:
            alive = torch.cat([_alive_heads(a) for u in self._units for a in u.attentions])
            self._stats["heads_pruned"] = 1.0 - float(alive.float().mean())
        if self._prunes_neurons:
            alive = torch.cat([_alive_neurons(u.ffn) for u in self._units])
            self._stats["neurons_pruned"] = 1.0 - float(alive.float().mean())

    def export(self, pl_module: nn.Module) -> dict[str, Any]:
        """Make the pruning permanent (and slice structured units away); the callback lets go of the model.

        See :func:`~lightning_efficient.callbacks.pruning.export_pruned` for what it returns.
        """
        if self._applied_to is not None and self._applied_to is not pl_module:
            raise ConfigurationError(f"{self.name} is applied to another model than the one given to export")
        report = export_pruned(pl_module, shrink=self.structure != "unstructured", block_paths=self.block_paths)
        self._handles = []
        self.remove(pl_module)
        self._applied_to = None
        return report

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_schedule_reached(trainer, "end_step", self.end_step, self.strict_schedule)
        torch._foreach_mul_([p.data for p in self._params], self._masks)  # exact after a resume, whatever was loaded
        self._masked_at_step = trainer.global_step
        self._update_stats()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self.rewind_step and not self.rewind_weights:
            self.rewind_weights = {name: m.weight.detach().clone() for name, m in self._targets.items()}
        if step in self.events and step > self.last_event:
            sparsity = cubic_sparsity(
                step, self.final_sparsity, self.start_step, self.end_step, self.frequency, self.initial_sparsity
            )
            if step == self.end_step and self.rewind_weights:
                with torch.no_grad():
                    for name, m in self._targets.items():
                        m.weight.copy_(self.rewind_weights[name])
            self.prune_now(pl_module, sparsity)
            self.last_event = step
            log_layer_sparsity(trainer, self.name, self._targets)
        metrics = {"sparsity": self.sparsity, "target_sparsity": self.target_sparsity}
        metrics.update({k: v for k, v in self._stats.items() if k != "sparsity"})
        self.log_metrics(pl_module, metrics)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.last_event < 0:
            return
        pairs = [(p.grad, m) for p, m in zip(self._params, self._masks) if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.last_event < 0 or trainer.global_step == self._masked_at_step:
            return  # nothing pruned yet, or no optimizer step since the last multiply (gradient accumulation)
        torch._foreach_mul_([p.data for p in self._params], self._masks)
        self._masked_at_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_event": self.last_event,
            "target_sparsity": self.target_sparsity,
            "rewind_weights": dict(self.rewind_weights),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_event = state_dict["last_event"]
        self.target_sparsity = state_dict["target_sparsity"]
        self.rewind_weights = dict(state_dict.get("rewind_weights", {}))
