"""LotteryTicket: one round of iterative magnitude pruning with weight rewinding, a run of its own.

A lottery-ticket experiment (Frankle & Carbin 2019; with rewinding, Frankle et al. 2020; for BERT,
Chen et al. 2020) is a chain of runs, so the ``pipeline`` command drives it, one stage a round
(``configs/pipelines/lottery_ticket.yaml``):

1. The dense round (no ``ticket``): trains as usual and keeps a copy of every parameter of the
   model at ``rewind_step`` (``θ_k``; 0: the initialisation, or the pre-trained weights of a model
   built with ``pretrained=``, as in Chen et al.).
2. Each next round (``ticket=<the previous round's last checkpoint>``): before its first step it
   prunes the previous round's *trained* target weights by magnitude to ``sparsity`` (weights that
   round had pruned stay pruned), sets every parameter back to the ticket's ``θ_k`` (``start="rewind"``)
   or keeps this run's own fresh initialisation (``start="reinit"``: the paper's control, which
   needs another ``seed_everything`` than the dense round's), and trains with the mask fixed
   (masked weights are exact zeros; gradients are masked; :func:`~lightning_efficient.callbacks.pruning.export_pruned`
   makes the masks permanent). Its checkpoint passes ``θ_k`` on to the round after it.

Each round's optimizer and learning-rate schedule start afresh (it is a new fit); with
``rewind_step > 0`` the rewound weights are those of step ``k``, the schedule is the round's own.
:func:`round_sparsities` spreads a final sparsity over rounds (each prunes the same share of what
is left: Frankle & Carbin's 20% per round is ``rounds`` where ``0.8 ** rounds`` is the density).

Examples:
    >>> import lightning.pytorch as pl
    >>> from lightning_efficient import BertMLM, MLMDataModule
    >>> dm = MLMDataModule(vocab_size=2000, max_length=32, batch_size=8)
    >>> dense = LotteryTicket(rewind_step=1)
    >>> trainer = pl.Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_progress_bar=False,
    ...                      enable_checkpointing=False, enable_model_summary=False, callbacks=[dense])
    >>> trainer.fit(BertMLM(vocab_size=dm.vocab_size, preset="tiny"), dm)
    >>> sorted(dense.rewind_weights)[:1], round_sparsities(0.8, 2)
    (['model.bert.embeddings.LayerNorm.bias'], [0.5528, 0.8])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_efficient.callbacks.pruning.masks import (
    MASK,
    SCOPES,
    add_masks,
    layer_sparsity,
    log_layer_sparsity,
    magnitude_masks,
    multiply_gradients,
    multiply_weights,
    select_unmasked,
    total_sparsity,
)
from lightning_efficient.errors import ConfigurationError, check_int, check_patterns
from lightning_efficient.technique import Technique, check_choice, check_range, check_schedule_reached

__all__ = ["STARTS", "LotteryTicket", "round_sparsities"]

#: What a pruned round starts from: the ticket's rewound weights, or this run's own initialisation (the control).
STARTS = ("rewind", "reinit")


def round_sparsities(final_sparsity: float, rounds: int) -> list[float]:
    """The sparsity after each of ``rounds`` rounds that each prune the same share of the remaining weights.

    Examples:
        >>> round_sparsities(0.9, 3)
        [0.5358, 0.7846, 0.9]
    """
    final_sparsity = check_range("final_sparsity", final_sparsity, low=0.0, high=1.0, high_inclusive=False)
    rounds = check_int("rounds", rounds, low=1)
    return [round(1.0 - (1.0 - final_sparsity) ** (r / rounds), 4) for r in range(1, rounds + 1)]


def _fingerprint(weights: dict[str, torch.Tensor]) -> float:
    """A number that tells two sets of weights apart: the sum of their absolute values, in float64."""
    return float(sum(w.detach().double().abs().sum() for w in weights.values()))


class LotteryTicket(Technique):
    """One round of a lottery-ticket experiment: the dense round, or a pruned round from the previous one's ticket.

    Args:
        sparsity: Share of the target weights this round prunes away before training, in [0, 1)
            (ranked as ``scope`` says); 0 for the dense round, which has no ``ticket``.
        ticket: The previous round's checkpoint (its ``last.ckpt``), written by a run with a
            ``LotteryTicket``; None for the dense round.
        rewind_step: The dense round's step whose weights later rounds start from (default 0, the
            initialisation); a pruned round takes it from its ticket (given, it must agree).
        start: ``"rewind"`` (the ticket's weights of ``rewind_step``) or ``"reinit"`` (this run's own
            initialisation with the same mask: the control; give the run another seed than the
            dense round's, or it fails before step 1).
        scope: ``"global"`` (ranked across all target layers, as Chen et al.'s BERT tickets) or
            ``"per_layer"``.
        include: Shell-style patterns of module names (the whole model is searched); default: every
            module of ``module_types`` in the Transformer blocks (not embeddings, not the heads).
        exclude: Patterns of names to leave out.
        module_types: Class names of the modules pruned (their ``weight``).
        block_paths: Attribute paths of the block lists, for models the block locator does not know.

    Logged every step: ``lottery_ticket/sparsity``, ``lottery_ticket/theoretical_flops_fraction`` (the
    share of the target layers' multiply-adds a sparse kernel would do; the monitor's FLOPs stay dense)
    and ``lottery_ticket/round`` (0 for the dense round); once per pruned round, the sparsity of each layer as ``lottery_ticket/sparsity/<layer>``.

    Raises:
        ConfigurationError: Before step 1: ``sparsity > 0`` without a ticket, a ticket that is not
            a file or holds no lottery-ticket state (or none of ``rewind_step``), a ``sparsity`` below
            the ticket's, a ticket of another model, ``start="reinit"`` with the dense round's initial
            weights, a dense run that ends before ``rewind_step``.
    """

    name = "lottery_ticket"
    hooks = ("on_train_start", "on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
    #: Weights are masked before QAT holds its weight scales at the same step (sparsify, then quantize).
    runs_before = ("qat",)
    conflicts_with = ("pruning", "dynamic_sparsity", "prune_at_init", "progressive_stacking")
    distributed_safe = True
    keep_after_fit = True
    masks_weights = True
    compile_safe = True  # tests/test_compile.py: compiled training equals eager
    compile_note = "masks and rewinding act on the weights outside the forward"

    def __init__(
        self,
        sparsity: float = 0.0,
        ticket: str | Path | None = None,
        rewind_step: int | None = None,
        start: str = "rewind",
        scope: str = "global",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        module_types: Sequence[str] = ("Linear",),
        block_paths: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.sparsity = float(check_range("sparsity", sparsity, low=0.0, high=1.0, high_inclusive=False))
        self.ticket = str(ticket) if ticket is not None else None
        if self.ticket is None and self.sparsity > 0:
            raise ConfigurationError(
                f"sparsity={self.sparsity} needs ticket=<the previous round's checkpoint>: the dense round "
                "(no ticket) trains every weight and keeps the weights to rewind to"
            )
        self.start = check_choice("start", start, STARTS)
        if self.ticket is None and self.start != "rewind":
            raise ConfigurationError(
                f"start={self.start!r} is for a pruned round (with a ticket): the dense round starts from its own weights"
            )
        self.rewind_step = check_int("rewind_step", rewind_step, low=0, optional=True)
        self.scope = check_choice("scope", scope, SCOPES)
        self.include = check_patterns("include", include or None)
        self.exclude = check_patterns("exclude", exclude or None) or []
        self.module_types = tuple(module_types)
        self.block_paths = list(block_paths) if block_paths else None
        self.round = 0
        self.rewind_weights: dict[str, torch.Tensor] = {}
        self.initial_fingerprint: float | None = None  # of the dense round's initial target weights
        self._targets: dict[str, nn.Module] = {}
        self._sparsity = 0.0  # logged every step; the masks are set before step 1

    @property
    def _step_to_keep(self) -> int:
        return 0 if self.rewind_step is None else self.rewind_step

    # -- surgery ------------------------------------------------------------------------------
    def apply(self, pl_module: nn.Module) -> Any:
        self._targets = select_unmasked(
            pl_module, self.include, self.exclude, self.module_types, self.block_paths, type(self).__name__
        )
        return add_masks(self._targets.values()) if self.ticket is not None else None

    def remove(self, pl_module: nn.Module) -> None:
        super().remove(pl_module)
        self._targets = {}

    # -- the ticket ---------------------------------------------------------------------------
    @torch.no_grad()
    def start_from_ticket(self, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Prune the ticket's trained weights to :attr:`sparsity`, set the starting weights and apply the masks.

        Args:
            pl_module: The model, with this technique applied.
            checkpoint: The previous round's checkpoint, as ``torch.load`` returns it.
        """
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        where = f"ticket={self.ticket!r}"
        if not state or not state.get("rewind_weights"):
            raise ConfigurationError(
                f"{where} holds no lottery-ticket weights to rewind to: it must be the last checkpoint of a run with "
                "LotteryTicket that trained past its rewind_step"
            )
        if self.rewind_step is not None and self.rewind_step != state["rewind_step"]:
            raise ConfigurationError(
                f"rewind_step={self.rewind_step} differs from the ticket's ({state['rewind_step']}); a pruned round "
                "rewinds to the dense round's step: leave rewind_step out"
            )
        trained = checkpoint["state_dict"]
        parameters = dict(pl_module.named_parameters())
        rewind = state["rewind_weights"]
        differ = [n for n, p in parameters.items() if n not in rewind or rewind[n].shape != p.shape]
        differ += [
            n for n, m in self._targets.items() if getattr(trained.get(f"{n}.weight"), "shape", None) != m.weight.shape
        ]
        if differ or len(rewind) != len(parameters):
            raise ConfigurationError(
                f"{where} is a checkpoint of another model (its weights do not fit this model's"
                f"{', e.g. ' + differ[0] if differ else ''}); give the model the dense round's shape"
            )
        weights = {name: trained[f"{name}.weight"] for name in self._targets}
        previous = {name: trained.get(f"{name}.{MASK}", torch.ones_like(w)).bool() for name, w in weights.items()}
        before = 1.0 - sum(int(m.sum()) for m in previous.values()) / sum(m.numel() for m in previous.values())
        if self.sparsity < before - 1e-6:
            raise ConfigurationError(
                f"sparsity={self.sparsity} is below the ticket's {before:.4g}: a round never revives pruned weights"
            )
        masks = magnitude_masks(weights, self.sparsity, self.scope, previous)
        if self.start == "rewind":
            for name, parameter in parameters.items():
                parameter.copy_(state["rewind_weights"][name])
        elif state.get("initial_fingerprint") is not None and abs(
            _fingerprint({n: m.weight for n, m in self._targets.items()}) - state["initial_fingerprint"]
        ) <= 1e-9 * abs(state["initial_fingerprint"]):
            raise ConfigurationError(
                "start='reinit' got the dense round's initial weights (the same seed, or the same pretrained weights): "
                "the control needs a fresh initialisation; give this run another seed_everything"
            )
        for name, module in self._targets.items():
            getattr(module, MASK).copy_(masks[name])
        multiply_weights(self._targets.values())
        self.round = int(state["round"]) + 1
        self.rewind_step = int(state["rewind_step"])
        self.rewind_weights = dict(state["rewind_weights"])
        self.initial_fingerprint = state.get("initial_fingerprint")

    def layer_sparsity(self) -> dict[str, float]:
        """The share of masked weights of each target layer, by name (empty for the dense round)."""
        return layer_sparsity(self._targets) if self.ticket is not None else {}

    @property
    def current_sparsity(self) -> float:
        """The share of masked weights over all target layers (0 for the dense round)."""
        return total_sparsity(self._targets) if self.ticket is not None else 0.0

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ticket is not None:
            if self.round == 0:  # a fresh round; a resumed one has its round, masks and weights from its checkpoint
                self.start_from_ticket(pl_module, _read_ticket(self.ticket))
                log_layer_sparsity(trainer, self.name, self._targets)
            self._sparsity = self.current_sparsity
            return
        if not self.rewind_weights:
            check_schedule_reached(trainer, "rewind_step", self._step_to_keep, strict=True, relaxed_by=None)
        if trainer.global_step == 0 and self.initial_fingerprint is None:
            self.initial_fingerprint = _fingerprint({n: m.weight for n, m in self._targets.items()})

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.ticket is None and trainer.global_step == self._step_to_keep and not self.rewind_weights:
            self.rewind_step = self._step_to_keep
            self.rewind_weights = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        metrics = {"sparsity": self._sparsity, "theoretical_flops_fraction": 1.0 - self._sparsity}
        self.log_metrics(pl_module, {**metrics, "round": float(self.round)})

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.ticket is not None:
            multiply_gradients(self._targets.values())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.ticket is not None:
            multiply_weights(self._targets.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "rewind_step": self.rewind_step,
            "rewind_weights": dict(self.rewind_weights),
            "initial_fingerprint": self.initial_fingerprint,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.round = state_dict["round"]
        self.rewind_step = state_dict["rewind_step"]
        self.rewind_weights = dict(state_dict["rewind_weights"])
        self.initial_fingerprint = state_dict["initial_fingerprint"]


def _read_ticket(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigurationError(
            f"ticket={path!r} is not a file: it is the previous round's checkpoint (the last.ckpt of a run with "
            "LotteryTicket); run that round first"
        )
    return torch.load(path, map_location="cpu", weights_only=True)
