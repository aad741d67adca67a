"""PruneAtInit: prune once before the first optimizer step (SNIP, GraSP, magnitude, random), with the shuffle control.

Before step 1 the target weights (by default every ``Linear`` of the Transformer blocks) are
scored on the first training batch and the lowest-scored ``sparsity`` share of them, ranked
across all target layers, is masked for the whole run (the pruning package's ``weight_mask``
buffers: masked weights are exact zeros, gradients are masked, checkpoints carry the masks and
``export_pruned`` makes them permanent):

- ``snip`` (Lee et al. 2019): ``|w * dL/dw|``, the connection sensitivity;
- ``grasp`` (Wang et al. 2020): ``-w * (H g)``, weights whose removal least reduces the gradient
  flow kept; ``H g`` is the Hessian-gradient product, taken here as a central difference of two
  gradients, ``(g(w + eps g) - g(w - eps g)) / (2 eps)`` with ``eps = 1e-3 ||w|| / ||g||`` (no double
  backward, so every attention kernel works); the highest scores are pruned, as in the paper;
- ``magnitude``: ``|w|``;
- ``random``: every layer at the same sparsity, at random (the baseline).

``shuffle=True`` is the control of Frankle et al. (2021, "Pruning neural networks at initialization:
why are we missing the mark?"): each layer's mask is permuted at random after scoring, keeping its
count. If shuffled masks train as well, the method found a layer-wise density, not a ticket.

The scoring pass is a training step of the module (forward and backward, no optimizer step) on the
first batch; its gradients are cleared afterwards. Under DDP each rank scores its own first batch and
the gradients are averaged across ranks, so every rank prunes the same weights. A resumed run (past
step 0) keeps the masks of its checkpoint.

Examples:
    >>> import lightning.pytorch as pl
    >>> from lightning_efficient import BertMLM, MLMDataModule
    >>> dm = MLMDataModule(vocab_size=2000, max_length=32, batch_size=8)
    >>> snip = PruneAtInit(method="snip", sparsity=0.9)
    >>> trainer = pl.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
    ...                      enable_checkpointing=False, enable_model_summary=False, callbacks=[snip])
    >>> trainer.fit(BertMLM(vocab_size=dm.vocab_size, preset="tiny"), dm)
    >>> round(snip.sparsity, 2)
    0.9
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_efficient.callbacks.pruning.masks import (
    _lowest_k,
    add_masks,
    layer_sparsity,
    log_layer_sparsity,
    multiply_gradients,
    multiply_weights,
    select_unmasked,
    total_sparsity,
)
from lightning_efficient.callbacks.pruning.schedule import _count
from lightning_efficient.errors import check_patterns
from lightning_efficient.technique import Technique, check_choice, check_range

__all__ = ["METHODS", "PruneAtInit", "grasp_scores", "shuffle_masks", "snip_scores"]

METHODS = ("snip", "grasp", "magnitude", "random")


def snip_scores(weights: dict[str, torch.Tensor], gradients: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SNIP's connection sensitivity ``|w * g|`` of each weight.

    Examples:
        >>> snip_scores({"a": torch.tensor([1.0, -2.0])}, {"a": torch.tensor([-3.0, 0.5])})["a"].tolist()
        [3.0, 1.0]
    """
    return {name: (weight.detach() * gradients[name]).abs().float() for name, weight in weights.items()}


def grasp_scores(
    weights: dict[str, torch.Tensor], hessian_gradient: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """GraSP's score ``S = -w * (H g)`` of each weight; GraSP prunes the highest.

    Examples:
        >>> grasp_scores({"a": torch.tensor([1.0, 2.0])}, {"a": torch.tensor([3.0, -1.0])})["a"].tolist()
        [-3.0, 2.0]
    """
    return {name: -(weight.detach() * hessian_gradient[name]).float() for name, weight in weights.items()}


def shuffle_masks(masks: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Each mask permuted at random: the same number kept in every layer, at other places.

    Examples:
        >>> mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
        >>> shuffled = shuffle_masks({"a": mask}, torch.Generator().manual_seed(0))["a"]
        >>> int(shuffled.sum()), shuffled.shape
        (3, torch.Size([2, 3]))
    """
    shuffled = {}
    for name, mask in masks.items():
        order = torch.randperm(mask.numel(), generator=generator)
        shuffled[name] = mask.flatten()[order].view_as(mask)
    return shuffled


class PruneAtInit(Technique):
    """Prune the target weights once, before the first optimizer step, and keep the masks fixed.

    Args:
        method: ``"snip"``, ``"grasp"``, ``"magnitude"`` or ``"random"`` (see the module docstring).
        sparsity: Share of the target weights pruned, in [0, 1): across all target layers (``random``:
            in each).
        shuffle: Permute each layer's mask after scoring (Frankle et al. 2021's control).
        include: Shell-style patterns of module names (the whole model is searched); default: every
            module of ``module_types`` in the Transformer blocks.
        exclude: Patterns of names to leave out.
        module_types: Class names of the modules pruned (their ``weight``).
        seed: Seed of the generator of ``random`` and ``shuffle``.
        block_paths: Attribute paths of the block lists, for models the block locator does not know.

    Logged every step: ``prune_at_init/sparsity`` and ``prune_at_init/theoretical_flops_fraction`` (the share
    of the target layers' multiply-adds a sparse kernel would do; the monitor's FLOPs stay dense); once, the sparsity of each layer as
    ``prune_at_init/sparsity/<layer>``.
    """

    name = "prune_at_init"
    hooks = ("on_train_start", "on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
    #: Weights are masked before QAT holds its weight scales at the same step (sparsify, then quantize).
    runs_before = ("qat",)
    conflicts_with = ("pruning", "dynamic_sparsity", "progressive_stacking")
    distributed_safe = True
    keep_after_fit = True
    masks_weights = True
    compile_safe = True  # tests/test_compile.py: compiled training equals eager
    compile_note = "scores and masks are computed outside the forward"

    def __init__(
        self,
        method: str = "snip",
        sparsity: float = 0.8,
        shuffle: bool = False,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        module_types: Sequence[str] = ("Linear",),
        seed: int = 0,
        block_paths: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.method = check_choice("method", method, METHODS)
        self.sparsity = float(check_range("sparsity", sparsity, low=0.0, high=1.0, high_inclusive=False))
        self.shuffle = bool(shuffle)
        self.include = check_patterns("include", include or None)
        self.exclude = check_patterns("exclude", exclude or None) or []
        self.module_types = tuple(module_types)
        self.seed = seed
        self.block_paths = list(block_paths) if block_paths else None
        self.generator = torch.Generator().manual_seed(seed)
        self.pruned = False
        self._targets: dict[str, nn.Module] = {}
        self._sparsity: float | None = None  # logged every step; the masks change once

    def apply(self, pl_module: nn.Module) -> Any:
        self._targets = select_unmasked(
            pl_module, self.include, self.exclude, self.module_types, self.block_paths, type(self).__name__
        )
        return add_masks(self._targets.values())

    def remove(self, pl_module: nn.Module) -> None:
        super().remove(pl_module)
        self._targets = {}

    # -- scoring ------------------------------------------------------------------------------
    def _gradients(self, loss_of: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
        modules = list(self._targets.values())
        with torch.enable_grad():
            grads = [grad.detach() for grad in torch.autograd.grad(loss_of(), [m.weight for m in modules])]
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank: the same mean
            for grad in grads:
                torch.distributed.all_reduce(grad)
                grad.div_(torch.distributed.get_world_size())
        return dict(zip(self._targets, grads))

    @torch.no_grad()
    def _shift(self, direction: dict[str, torch.Tensor], eps: float) -> None:
        for name, module in self._targets.items():
            module.weight.add_(direction[name], alpha=eps)

    def scores(self, loss_of: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The score of every target weight (lowest pruned); ``loss_of()`` runs a forward pass and returns the loss."""
        weights = {name: module.weight for name, module in self._targets.items()}
        if self.method == "magnitude":
            return {name: weight.detach().abs().float() for name, weight in weights.items()}
        if self.method == "random":
            return {name: torch.rand(w.shape, generator=self.generator) for name, w in weights.items()}
        gradients = self._gradients(loss_of)
        if self.method == "snip":
            return snip_scores(weights, gradients)
        weight_norm = torch.sqrt(sum(w.detach().float().pow(2).sum() for w in weights.values()))
        gradient_norm = torch.sqrt(sum(g.float().pow(2).sum() for g in gradients.values()))
        eps = float(1e-3 * weight_norm / gradient_norm.clamp_min(1e-12))
        original = {name: weight.detach().clone() for name, weight in weights.items()}
        self._shift(gradients, eps)  # H g ~ (g(w + eps g) - g(w - eps g)) / (2 eps), a central difference
        try:
            ahead = self._gradients(loss_of)
            self._shift(gradients, -2 * eps)
            behind = self._gradients(loss_of)
        finally:  # the weights back bit for bit (shifting back by +eps g would leave rounding errors)
            with torch.no_grad():
                for name, weight in weights.items():
                    weight.copy_(original[name])
        hessian_gradient = {name: (ahead[name] - behind[name]) / (2 * eps) for name in gradients}
        return {name: -score for name, score in grasp_scores(weights, hessian_gradient).items()}  # lowest pruned

    @torch.no_grad()
    def prune(self, loss_of: Callable[[], torch.Tensor]) -> None:
        """Score, rank, (shuffle) and apply the masks."""
        scores = self.scores(loss_of)
        if self.method == "random":
            masks = {name: _lowest_k(score, _count(self.sparsity, score.numel())) for name, score in scores.items()}
        else:
            flat = torch.cat([score.flatten() for score in scores.values()])
            keep = _lowest_k(flat, _count(self.sparsity, flat.numel()))
            sizes = [score.numel() for score in scores.values()]
            masks = {name: part.view_as(scores[name]) for name, part in zip(scores, keep.split(sizes))}
        if self.shuffle:
            masks = shuffle_masks(masks, self.generator)
        for name, module in self._targets.items():
            module.weight_mask.copy_(masks[name])
            module.weight.mul_(module.weight_mask)
        self.pruned = True
        self._sparsity = None

    def layer_sparsity(self) -> dict[str, float]:
        """The share of masked weights of each target layer, by name."""
        return layer_sparsity(self._targets)

    @property
    def current_sparsity(self) -> float:
        """The share of masked weights over all target layers."""
        return total_sparsity(self._targets)

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sparsity = None  # the masks of this fit (a resume loaded its checkpoint's)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.pruned and trainer.global_step == 0:
            needs_loss = self.method in ("snip", "grasp")

            def loss_of() -> torch.Tensor:
                scored = dict(batch) if isinstance(batch, dict) else batch  # the step may pop keys from a dict batch
                return pl_module.training_step(scored, batch_idx)

            self.prune(loss_of if needs_loss else _no_loss)
            pl_module.zero_grad(set_to_none=True)
            log_layer_sparsity(trainer, self.name, self._targets)
        self.pruned = self.pruned or trainer.global_step > 0  # a resumed run keeps its checkpoint's masks
        if self._sparsity is None:
            self._sparsity = self.current_sparsity
        self.log_metrics(pl_module, {"sparsity": self._sparsity, "theoretical_flops_fraction": 1.0 - self._sparsity})

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        multiply_gradients(self._targets.values())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        multiply_weights(self._targets.values())

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "pruned": self.pruned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])
        self.pruned = state_dict["pruned"]


def _no_loss() -> torch.Tensor:
    raise AssertionError("magnitude and random scores need no loss")
