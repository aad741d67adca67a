"""FlopBudget: stop a fit when the counted model FLOPs reach a budget, the LR schedule fitted to it.

Comparing recipes at equal compute ("train large, then compress", Li, Wallace et al. 2020) needs
every run to spend the same model FLOPs, whatever its model size, and to end its LR schedule where
its budget ends rather than cutting a longer schedule short. :class:`FlopBudget` stops ``fit`` on
the count of :class:`~lightning_efficient.monitor.EfficiencyMonitor` (the FLOPs of what actually ran,
forward and backward) and, after the first step, fits ``max_steps`` and the module's LR schedule to
the number of steps the budget pays for.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_efficient.errors import ConfigurationError
from lightning_efficient.monitor import EfficiencyMonitor

__all__ = ["FlopBudget"]

_ROUNDING = 1e-9  # of a step: a remaining budget of k steps give or take float rounding plans k steps, not k + 1


class FlopBudget(pl.Callback):
    """Stop ``fit`` once the model FLOPs counted by the ``EfficiencyMonitor`` reach ``flops``.

    After every optimizer step, when the monitor's :attr:`~lightning_efficient.monitor.EfficiencyMonitor.total_flops`
    (this fit's count, a resumed run's earlier steps included) is at least ``flops``, it sets
    ``trainer.should_stop`` and logs one line (rank zero, Lightning's INFO logger): the budget, the
    FLOPs used and the step. The run stops at the first step that reaches the budget, so it uses
    less than one step's FLOPs beyond it; as with early stopping, Lightning then runs the
    validation of that step when the run validates at all, so the monitor's history ends at the
    budget. On logging steps it logs ``budget/flops_fraction`` (FLOPs used / budget).

    With ``fit_schedule`` it also fits the run to the budget: after the first optimizer step of a fit
    it plans ``planned = steps so far + ceil(remaining budget / FLOPs of a step so far)`` steps,
    lowers ``max_steps`` to ``planned`` (``min(max_steps, planned)``; Lightning reads
    ``trainer.fit_loop.epoch_loop.max_steps``) and, for the package's modules
    (:class:`~lightning_efficient.models.base.EfficientModule`), stretches or shrinks their
    warmup-and-decay LR schedule to end with the run
    (:meth:`~lightning_efficient.models.base.EfficientModule.set_schedule_length`, ``min(planned,
    the steps max_steps and max_epochs allow)``), as Li, Wallace et al. (2020) train to a budget. The
    first step runs at the LR of the schedule the trainer built; every later step follows the fitted
    one. Another LightningModule gets only the new ``max_steps``: its own LR schedule is left as it
    is (give it a ``set_schedule_length(total_steps)`` method to have it fitted too). The plan
    assumes the first step's FLOPs for every step: techniques that change a step's cost during the
    run (progressive stacking, a token-dropping schedule) make it approximate, and the run ends at
    whichever comes first, the budget or ``planned``.

    The plan is checkpointed (:meth:`state_dict`) and reapplied on resume in ``on_train_start``,
    after the optimizer and scheduler are rebuilt, so a resumed run follows the same schedule and
    stops at the same step as an uninterrupted one. A run resumed at or past its budget stops before
    its first step. A checkpoint planned for another budget is replanned after the first step.

    It needs an :class:`~lightning_efficient.monitor.EfficiencyMonitor` among ``trainer.callbacks``
    (it counts the FLOPs). The budget must read a step's count after the monitor added it: placed
    before the monitor, it moves itself to just after it in ``trainer.callbacks`` (in ``setup``).
    With several processes the budget is of each process's own count (what the monitor counts, on
    its share of the batches), the stop is taken as soon as one process reaches it, and rank zero's
    plan is everyone's.

    Args:
        flops: The budget: model FLOPs to train for (forward and backward, as
            :mod:`lightning_efficient.flops` counts them), e.g. ``2e15``.
        fit_schedule: Fit ``max_steps`` and the module's LR schedule to the budget after the first
            step; False only stops the run when the budget is spent.

    Raises:
        ConfigurationError: ``flops`` is not a positive finite number, ``fit_schedule`` not a bool, or
            (in ``setup``) the trainer has no ``EfficiencyMonitor``.

    Examples:
        >>> import tempfile
        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_efficient import BertMLM, EfficiencyMonitor
        >>> texts = [{"input_ids": torch.randint(5, 50, (8,)), "attention_mask": torch.ones(8, dtype=torch.long)}] * 4
        >>> loader = torch.utils.data.DataLoader(texts, batch_size=2)
        >>> def fit(max_steps, *callbacks):
        ...     monitor = EfficiencyMonitor(peak_flops=1e11)
        ...     trainer = pl.Trainer(max_steps=max_steps, callbacks=[monitor, *callbacks], logger=False,
        ...                          default_root_dir=tempfile.mkdtemp(), enable_checkpointing=False,
        ...                          enable_progress_bar=False, enable_model_summary=False)
        ...     trainer.fit(BertMLM(vocab_size=50, preset="tiny"), loader)
        ...     return trainer, monitor
        >>> _, first = fit(1)  # one step, to know what a step costs
        >>> budget = FlopBudget(flops=2.5 * first.total_flops)
        >>> trainer, monitor = fit(1000, budget)  # a 1000-step schedule, fitted to the 3 steps the budget pays for
        >>> trainer.global_step, trainer.max_steps, budget.planned_steps, budget.stopped_step
        (3, 3, 3, 3)
        >>> budget.flops <= monitor.total_flops < budget.flops + first.total_flops
        True
    """

    def __init__(self, flops: float, fit_schedule: bool = True) -> None:
        if isinstance(flops, bool) or not isinstance(flops, numbers.Real) or not 0 < flops < math.inf:
            raise ConfigurationError(f"flops={flops!r} must be a positive number of FLOPs, e.g. 2e15")
        if not isinstance(fit_schedule, bool):
            raise ConfigurationError(f"fit_schedule={fit_schedule!r} must be true or false")
        self.flops = float(flops)
        self.fit_schedule = fit_schedule
        self._monitor: EfficiencyMonitor | None = None
        self._reset()

    def _reset(self) -> None:
        self._planned: int | None = None
        self._stopped_step: int | None = None
        self._warned_no_flops = False
        self._start_step = self._last_step = 0  # trainer.global_step at on_train_start / at the last check
        self._start_flops = 0.0  # monitor.total_flops at on_train_start

    @property
    def planned_steps(self) -> int | None:
        """The steps the budget pays for, planned after the first step (None before, or without ``fit_schedule``)."""
        return self._planned

    @property
    def stopped_step(self) -> int | None:
        """The step at which the budget stopped this fit (None while it has not)."""
        return self._stopped_step

    def plan_total_steps(self, total_steps: int | None, flops_per_step: float) -> int | None:
        """The run's optimizer steps once the budget caps them, for ``lightning-efficient plan``.

        Examples:
            >>> FlopBudget(flops=1e12).plan_total_steps(10_000_000, flops_per_step=3e9)
            334
        """
        if flops_per_step <= 0:
            return total_steps
        paid = max(1, math.ceil(self.flops / flops_per_step - _ROUNDING))
        return paid if total_steps is None else min(total_steps, paid)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"flops": self.flops, "planned": self._planned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        planned = state_dict.get("planned")
        if planned is not None and state_dict.get("flops") != self.flops:
            rank_zero_info(
                f"FlopBudget: the checkpoint's plan of {planned} steps was for a budget of {state_dict.get('flops')!r} "
                f"FLOPs; the budget is now {self.flops:.4g} FLOPs: planning again after the first step"
            )
            planned = None
        self._planned = None if planned is None else int(planned)

    # -- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        monitor = next((cb for cb in trainer.callbacks if isinstance(cb, EfficiencyMonitor)), None)
        if monitor is None:
            raise ConfigurationError(
                "FlopBudget needs an EfficiencyMonitor in trainer.callbacks (it counts the FLOPs): add "
                "lightning_efficient.EfficiencyMonitor to the callbacks (YAML: `- class_path: "
                "lightning_efficient.EfficiencyMonitor` under trainer.callbacks)"
            )
        callbacks = list(trainer.callbacks)
        position = next(i for i, cb in enumerate(callbacks) if cb is self)
        at_monitor = next(i for i, cb in enumerate(callbacks) if cb is monitor)
        if position < at_monitor:  # read each step's count after the monitor added it
            del callbacks[position]
            callbacks.insert(at_monitor, self)  # just after the monitor, which moved up one place
            trainer.callbacks = callbacks  # a new list: the setup hooks being called keep their order
        self._monitor = monitor
        self._reset()  # a resumed run loads its plan after this

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        used = self._used()
        self._start_step = self._last_step = trainer.global_step
        self._start_flops = used
        if used >= self.flops:  # resumed at or past the budget: no step more
            self._stop(trainer, used)
        elif self.fit_schedule and self._planned is not None:  # resumed: the optimizer and scheduler exist now
            self._apply(trainer, pl_module, "reapplied from the checkpoint")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:  # accumulating gradients: no optimizer step yet
            return
        self._last_step = trainer.global_step
        used = self._used()
        if trainer._logger_connector.should_update_logs:
            pl_module.log("budget/flops_fraction", used / self.flops, on_step=True, on_epoch=False)
        reached = used >= self.flops
        if trainer.world_size > 1:
            reached = trainer.strategy.reduce_boolean_decision(reached, all=False)
        if reached:
            self._stop(trainer, used)
        elif self.fit_schedule and self._planned is None:
            self._plan(trainer, pl_module, used)

    # -- internals ------------------------------------------------------------------------------
    def _used(self) -> float:
        if self._monitor is None:
            raise RuntimeError("FlopBudget: used outside fit (setup did not run)")
        return self._monitor.total_flops

    def _stop(self, trainer: pl.Trainer, used: float) -> None:
        trainer.should_stop = True
        if self._stopped_step is None:
            self._stopped_step = trainer.global_step
            rank_zero_info(
                f"FlopBudget: budget of {self.flops:.4g} FLOPs reached at step {trainer.global_step}: "
                f"{used:.4g} FLOPs used ({used / self.flops:.1%}); stopping"
            )

    def _plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, used: float) -> None:
        steps, spent = trainer.global_step - self._start_step, used - self._start_flops
        planned = None
        if steps > 0 and spent > 0:
            per_step = spent / steps
            planned = trainer.global_step + max(1, math.ceil((self.flops - used) / per_step - _ROUNDING))
        planned = trainer.strategy.broadcast(planned, src=0)  # every process the same max_steps
        if planned is None:
            if not self._warned_no_flops:
                rank_zero_warn(
                    "FlopBudget: the EfficiencyMonitor counted no FLOPs in the first step, so the budget can "
                    "neither plan the run nor stop it; check that the model's work runs inside training_step"
                )
                self._warned_no_flops = True
            return
        self._planned = int(planned)
        self._apply(trainer, pl_module, f"at {spent / steps:.4g} FLOPs per step")

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, why: str) -> None:
        planned = self._planned
        assert planned is not None
        epoch_loop = trainer.fit_loop.epoch_loop  # trainer.max_steps reads it; fit_loop.max_steps has no setter
        before = epoch_loop.max_steps
        run_end = trainer.estimated_stepping_batches  # what max_steps and max_epochs allow, before the change
        epoch_loop.max_steps = planned if before < 0 else min(before, planned)
        length = min(planned, int(run_end)) if math.isfinite(run_end) and run_end > 0 else planned
        set_length = getattr(pl_module, "set_schedule_length", None)
        fitted = bool(set_length(length)) if callable(set_length) else False
        schedule = f"LR schedule over {length} steps" if fitted else "the module's own LR schedule left unchanged"
        rank_zero_info(
            f"FlopBudget: {self.flops:.4g} FLOPs pay for {planned} steps ({why}): "
            f"max_steps {before} -> {epoch_loop.max_steps}, {schedule}"
        )
