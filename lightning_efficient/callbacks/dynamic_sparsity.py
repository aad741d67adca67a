"""DynamicSparsity: train sparse from step 0, moving the connections as training goes (RigL, SET).

The target layers (by default every ``Linear`` of the Transformer blocks, as
:class:`~lightning_efficient.callbacks.MagnitudePruning`) start with random masks of the asked
sparsity; masked weights are exact zeros in the weights themselves, and the masks are the pruning
package's buffers (``weight_mask``), so a checkpoint carries them and ``export_pruned`` makes them
permanent. Every ``update_every`` optimizer steps until ``end_step``, each layer drops the
``f(t) * n_active`` active weights of smallest magnitude and grows as many inactive ones:

- ``rigl`` (Evci et al. 2020): those with the largest dense-gradient magnitude of that step (the
  gradient of every weight, masked or not, which backward computes anyway);
- ``set`` (Mocanu et al. 2018): at random (from the callback's own generator).

A grown weight starts at zero and its optimizer moments (every state tensor of the weight's shape,
e.g. Adam's ``exp_avg``/``exp_avg_sq``) are reset at its entries. The drop fraction decays with a
cosine, ``f(t) = drop_fraction / 2 * (1 + cos(pi t / end_step))`` (RigL's), or stays constant.
Each layer keeps exactly its number of active weights. Under RigL, a layer that got no gradient
on an update step (its block skipped by LayerDrop) keeps its mask until the next update.

Layer densities: ``uniform`` gives every layer the same sparsity; ``erk`` (Erdős-Rényi-Kernel, RigL's)
makes a layer's density proportional to ``(n_in + n_out) / (n_in * n_out)``, scaled so the whole
reaches the asked sparsity; a layer that would need a density above 1 is kept dense and the rest
is rescaled (a warning names it).

Every DDP rank makes the same decision: the weights and the all-reduced gradients are the same on
every rank, ties are broken by index, and SET's draws come from a generator seeded alike on every
rank. Masks (model buffers), the update counter and the generator resume exactly.

The monitor's FLOPs stay the dense FLOPs that ran (masked weights still multiply); the callback
logs ``dynamic_sparsity/sparsity`` and, under its own name, ``dynamic_sparsity/theoretical_flops_fraction``:
the share of the target layers' multiply-adds that a sparse kernel would do (their density, weighted
by size). Per-layer sparsity goes to the loggers at each update.

Examples:
    >>> import lightning.pytorch as pl
    >>> from lightning_efficient import BertMLM, MLMDataModule
    >>> dm = MLMDataModule(vocab_size=2000, max_length=32, batch_size=8)
    >>> rigl = DynamicSparsity(sparsity=0.8, update_every=2, end_step=4)
    >>> trainer = pl.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_progress_bar=False,
    ...                      enable_checkpointing=False, enable_model_summary=False, callbacks=[rigl])
    >>> trainer.fit(BertMLM(vocab_size=dm.vocab_size, preset="tiny"), dm)
    >>> rigl.updates, round(rigl.current_sparsity, 2)
    (1, 0.8)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_efficient.callbacks.pruning.masks import (
    add_masks,
    layer_sparsity,
    log_layer_sparsity,
    multiply_gradients,
    multiply_weights,
    select_unmasked,
    total_sparsity,
)
from lightning_efficient.errors import ConfigurationError, check_int, check_patterns
from lightning_efficient.technique import Technique, check_choice, check_range, check_schedule_reached

__all__ = [
    "DISTRIBUTIONS",
    "DROP_SCHEDULES",
    "METHODS",
    "DynamicSparsity",
    "drop_fraction_at",
    "erk_densities",
    "update_mask",
]

METHODS = ("rigl", "set")
DISTRIBUTIONS = ("uniform", "erk")
DROP_SCHEDULES = ("cosine", "constant")


def drop_fraction_at(step: int, drop_fraction: float, end_step: int, schedule: str = "cosine") -> float:
    """The share of active weights moved at ``step``: ``drop_fraction / 2 * (1 + cos(pi step / end_step))`` or constant.

    Examples:
        >>> [round(drop_fraction_at(t, 0.3, 100), 3) for t in (0, 50, 100)]
        [0.3, 0.15, 0.0]
    """
    if schedule == "constant":
        return drop_fraction
    return drop_fraction / 2 * (1 + math.cos(math.pi * min(step, end_step) / end_step))


def erk_densities(shapes: dict[str, tuple[int, ...]], sparsity: float) -> tuple[dict[str, float], list[str]]:
    """Erdős-Rényi-Kernel densities (RigL): density proportional to ``sum(shape) / prod(shape)``, overall ``1 - sparsity``.

    Layers whose density would exceed 1 are made dense and the others rescaled, until none does.

    Returns:
        The density of each layer, and the names of the layers made dense.

    Examples:
        >>> densities, dense = erk_densities({"wide": (64, 64), "thin": (2, 64)}, 0.5)
        >>> round(densities["wide"], 3), densities["thin"], dense
        (0.484, 1.0, ['thin'])
    """
    total = sum(math.prod(shape) for shape in shapes.values())
    dense: list[str] = []
    while True:
        budget = (1 - sparsity) * total - sum(math.prod(shapes[n]) for n in dense)  # weights left to give
        raw = {n: sum(s) / math.prod(s) for n, s in shapes.items() if n not in dense}
        if not raw:
            return dict.fromkeys(shapes, 1.0), dense
        scale = budget / sum(raw[n] * math.prod(shapes[n]) for n in raw)
        over = [n for n in raw if scale * raw[n] > 1]
        if not over:
            densities = {n: 1.0 if n in dense else scale * raw[n] for n in shapes}
            return densities, dense
        dense += over


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask of ``scores``' shape, True at its ``k`` largest entries (ties: the lower index)."""
    flat = scores.flatten()
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        order = torch.sort(flat, descending=True, stable=True).indices  # stable: ties keep index order
        chosen[order[:k]] = True
    return chosen.view_as(scores)


def update_mask(
    mask: torch.Tensor, weight: torch.Tensor, grow_scores: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One drop-and-grow step of a layer: the new mask and the grown positions.

    Drops ``round(fraction * active)`` active weights of smallest ``|weight|`` and grows as many
    positions of largest ``grow_scores`` among those inactive after the drop (a dropped weight may
    be grown again). The number of active weights is unchanged.

    Examples:
        >>> mask = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
        >>> new, grown = update_mask(mask, torch.tensor([0.1, 2.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 5.0, 1.0]), 0.5)
        >>> new.int().tolist(), grown.int().tolist()
        ([0, 1, 1, 0], [0, 0, 1, 0])
    """
    active = int(mask.sum())
    moved = round(fraction * active)
    if moved == 0:
        return mask.clone(), torch.zeros_like(mask)
    keep_scores = torch.where(mask, weight.detach().abs().float(), torch.full_like(weight, -1.0, dtype=torch.float))
    kept = _top_k(keep_scores, active - moved)
    lifted = torch.where(kept, torch.full_like(grow_scores, -math.inf, dtype=torch.float), grow_scores.float())
    grown = _top_k(lifted, moved)
    return kept | grown, grown & ~mask


class DynamicSparsity(Technique):
    """Sparse training with a fixed number of active weights per layer, rewired by RigL or SET.

    Args:
        method: ``"rigl"`` (grow by dense-gradient magnitude) or ``"set"`` (grow at random).
        sparsity: Share of the target weights masked, in [0, 1).
        distribution: ``"uniform"`` (every layer at ``sparsity``) or ``"erk"`` (see the module docstring).
        update_every: Optimizer steps between mask updates (>= 1; RigL: 100).
        drop_fraction: The share of active weights moved at the first update, in (0, 1] (RigL: 0.3).
        drop_schedule: ``"cosine"`` (decays to 0 at ``end_step``) or ``"constant"``.
        end_step: The last step with updates (RigL: 75% of training); must reach a first update.
        include: Shell-style patterns of module names (the whole model is searched); default: every
            module of ``module_types`` in the Transformer blocks.
        exclude: Patterns of names to leave out.
        module_types: Class names of the modules made sparse (their ``weight``).
        seed: Seed of the callback's generator (initial masks, SET's draws).
        block_paths: Attribute paths of the block lists, for models the block locator does not know.
        strict_schedule: Fail before training when the run ends before the first update.

    Logged every step: ``dynamic_sparsity/sparsity`` and ``dynamic_sparsity/theoretical_flops_fraction``;
    at each update ``dynamic_sparsity/moved`` (weights moved) and ``dynamic_sparsity/sparsity/<layer>``.
    """

    name = "dynamic_sparsity"
    hooks = ("on_train_start", "on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
    #: Weights are masked before QAT holds its weight scales at the same step (sparsify, then quantize).
    runs_before = ("qat",)
    conflicts_with = ("pruning", "progressive_stacking")
    distributed_safe = True
    keep_after_fit = True
    masks_weights = True
    compile_safe = True  # tests/test_compile.py: compiled training equals eager
    compile_note = "masks are rewired outside the forward"

    def __init__(
        self,
        method: str = "rigl",
        sparsity: float = 0.8,
        distribution: str = "uniform",
        update_every: int = 100,
        drop_fraction: float = 0.3,
        drop_schedule: str = "cosine",
        end_step: int = 1000,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        module_types: Sequence[str] = ("Linear",),
        seed: int = 0,
        block_paths: Sequence[str] | None = None,
        strict_schedule: bool = True,
    ) -> None:
        super().__init__()
        self.method = check_choice("method", method, METHODS)
        self.sparsity = float(check_range("sparsity", sparsity, low=0.0, high=1.0, high_inclusive=False))
        self.distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
        self.update_every = check_int("update_every", update_every, low=1)
        self.drop_fraction = float(check_range("drop_fraction", drop_fraction, low=0.0, low_inclusive=False, high=1.0))
        self.drop_schedule = check_choice("drop_schedule", drop_schedule, DROP_SCHEDULES)
        self.end_step = check_int("end_step", end_step, low=0)
        if self.end_step < self.update_every:
            raise ConfigurationError(
                f"end_step={end_step} comes before the first update (update_every={update_every}): "
                f"raise end_step to at least {update_every} or lower update_every"
            )
        self.include = check_patterns("include", include or None)
        self.exclude = check_patterns("exclude", exclude or None) or []
        self.module_types = tuple(module_types)
        self.seed = seed
        self.block_paths = list(block_paths) if block_paths else None
        self.strict_schedule = bool(strict_schedule)
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0
        self.last_update = -1
        self.densities: dict[str, float] = {}
        self._targets: dict[str, nn.Module] = {}
        self._grow_scores: dict[str, torch.Tensor] = {}
        self._masked_at_step = -1
        self._sparsity: float | None = None  # logged every step; masks change only at updates

    # -- surgery ------------------------------------------------------------------------------
    def apply(self, pl_module: nn.Module) -> Any:
        self._targets = select_unmasked(
            pl_module, self.include, self.exclude, self.module_types, self.block_paths, type(self).__name__
        )
        shapes = {name: tuple(module.weight.shape) for name, module in self._targets.items()}
        if self.distribution == "erk":
            self.densities, dense = erk_densities(shapes, self.sparsity)
            if dense:
                warnings.warn(
                    f"{self.name}: ERK at sparsity {self.sparsity} would give {', '.join(dense)} a density above 1: "
                    "they stay dense and the other layers are sparser",
                    UserWarning,
                    stacklevel=2,
                )
        else:
            self.densities = {name: 1.0 - self.sparsity for name in shapes}
        handle = add_masks(self._targets.values())
        with torch.no_grad():  # random masks of the exact size (a resume loads its own); applied when training starts
            for name, module in self._targets.items():
                count = round(self.densities[name] * module.weight.numel())
                scores = torch.rand(module.weight.shape, generator=self.generator)
                module.weight_mask.copy_(_top_k(scores, count))
        return handle

    def remove(self, pl_module: nn.Module) -> None:
        super().remove(pl_module)
        self._targets, self._grow_scores = {}, {}

    # -- the update ---------------------------------------------------------------------------
    def _is_update_step(self, step: int) -> bool:
        return 0 < step <= self.end_step and step % self.update_every == 0 and step > self.last_update

    @torch.no_grad()
    def update(self, step: int, optimizer: torch.optim.Optimizer | None) -> int:
        """Drop and grow in every target layer (RigL's grow scores must have been kept this step); weights moved."""
        fraction = drop_fraction_at(step, self.drop_fraction, self.end_step, self.drop_schedule)
        moved = 0
        for name, module in self._targets.items():
            mask = module.weight_mask.bool()
            if self.method == "rigl":
                if name not in self._grow_scores:  # no gradient this step (e.g. LayerDrop skipped its block): kept
                    continue
                scores = self._grow_scores[name]
            else:
                scores = torch.rand(mask.shape, generator=self.generator)
            new_mask, grown = update_mask(mask, module.weight, scores, fraction)
            module.weight_mask.copy_(new_mask)
            module.weight.mul_(new_mask)
            module.weight.masked_fill_(grown, 0.0)  # a grown weight starts at zero
            if optimizer is not None:
                _reset_moments(optimizer, module.weight, grown)
            moved += int(grown.sum())
        self._grow_scores = {}
        self._sparsity = None
        self.updates += 1
        self.last_update = step
        return moved

    def layer_sparsity(self) -> dict[str, float]:
        """The share of masked weights of each target layer, by name."""
        return layer_sparsity(self._targets)

    @property
    def current_sparsity(self) -> float:
        """The share of masked weights over all target layers."""
        return total_sparsity(self._targets)

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_schedule_reached(trainer, "update_every", self.update_every, self.strict_schedule)
        # the initial masks; after a resume, exact whatever the loaded weights hold
        multiply_weights(self._targets.values())
        self._masked_at_step = trainer.global_step
        self._sparsity = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._sparsity is None:
            self._sparsity = self.current_sparsity
        self.log_metrics(pl_module, {"sparsity": self._sparsity, "theoretical_flops_fraction": 1.0 - self._sparsity})

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.method == "rigl" and self._is_update_step(trainer.global_step):  # the dense gradient, this step only
            self._grow_scores = {n: m.weight.grad.detach().abs().float() for n, m in self._targets.items()
                                 if m.weight.grad is not None}  # fmt: skip
        multiply_gradients(self._targets.values())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._masked_at_step:
            return  # no optimizer step since the last multiply (gradient accumulation)
        self._masked_at_step = trainer.global_step
        multiply_weights(self._targets.values())
        step = trainer.global_step - 1  # the optimizer step that just ran
        if not self._is_update_step(step):
            return
        optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None
        moved = self.update(step, optimizer)
        log_layer_sparsity(trainer, self.name, self._targets, moved=float(moved))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "updates": self.updates, "last_update": self.last_update}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])
        self.updates = state_dict["updates"]
        self.last_update = state_dict["last_update"]


@torch.no_grad()
def _reset_moments(optimizer: torch.optim.Optimizer, weight: torch.Tensor, grown: torch.Tensor) -> None:
    """Zero the optimizer state of ``weight`` at the ``grown`` entries (every state tensor of its shape)."""
    state = optimizer.state.get(weight, {})
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == weight.shape:
            value.masked_fill_(grown, 0)
