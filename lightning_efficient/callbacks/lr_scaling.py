"""Scale the learning rate with the effective batch size, plus an optional warmup.

A learning rate is tuned at some *reference* batch size. Training at a larger effective batch
(per-device batch x gradient accumulation x data-parallel ranks) takes fewer, less noisy steps,
and the LR is scaled up to match: the ``linear`` rule (Goyal et al. 2017, for SGD) multiplies it
by ``effective / reference``, the ``sqrt`` rule (Krizhevsky 2014; the LAMB recipe of You et al.
2019) by the square root of that. :class:`LRScaling` applies the factor to every param group of
the module's optimizer *and* to its LR scheduler (``base_lrs``, from which ``LambdaLR`` recomputes
the LR each step), so the module's own schedule keeps its shape at the scaled height.

Resume: Lightning 2.6 builds the optimizers in ``strategy.setup``, then calls ``on_fit_start``,
then restores the optimizer and scheduler state of a checkpoint, then calls ``on_train_start``.
The restored state already holds the scaled ``lr`` / ``initial_lr`` / ``base_lrs``, so the factor
is applied in ``on_train_start``, to whatever the optimizer holds then, as the ratio between the
wanted factor and the one that state was written with (recorded in this callback's checkpoint
state): 1 on a plain resume, never twice.

Examples:
    >>> import lightning.pytorch as pl
    >>> from lightning.pytorch.demos.boring_classes import BoringModel  # SGD at lr 0.1, batch 1
    >>> scaling = LRScaling(reference_batch_size=1, rule="linear", batch_size=1, warmup_steps=2)
    >>> trainer = pl.Trainer(max_steps=2, accumulate_grad_batches=4, limit_val_batches=0, logger=False,
    ...                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    ...                      callbacks=[scaling])
    >>> trainer.fit(BoringModel())
    >>> scaling.effective_batch, scaling.factor  # 1 x 4 accumulated batches, 4 / 1
    (4, 4.0)
    >>> trainer.optimizers[0].param_groups[0]["lr"], trainer.lr_scheduler_configs[0].scheduler.base_lrs
    (0.4, [0.4])
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_efficient.errors import ConfigurationError
from lightning_efficient.technique import Technique, check_choice, check_range

__all__ = [
    "SCALING_RULES",
    "LRScaling",
    "data_parallel_size",
    "scale_learning_rates",
    "scaled_lr",
    "warmup_factor",
]

#: The known scaling rules.
SCALING_RULES = ("linear", "sqrt")

#: Param-group keys that hold learning rates (``initial_lr``: every scheduler; ``max_lr`` and
#: ``min_lr``: ``OneCycleLR``). Absolute floors of other schedulers (``eta_min``) are left alone.
GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")

#: Scheduler attributes that hold per-group learning rates (``max_lrs``: ``CyclicLR``).
SCHEDULER_LR_ATTRIBUTES = ("base_lrs", "_last_lr", "max_lrs")


def scaled_lr(base_lr: float, effective_batch: int, reference_batch: int, rule: str) -> float:
    """The learning rate for ``effective_batch``, given ``base_lr`` tuned at ``reference_batch``.

    Examples:
        >>> scaled_lr(1e-3, effective_batch=256, reference_batch=32, rule="linear")
        0.008
        >>> round(scaled_lr(1e-3, effective_batch=256, reference_batch=32, rule="sqrt"), 6)
        0.002828
    """
    check_choice("rule", rule, SCALING_RULES)
    ratio = effective_batch / reference_batch
    return base_lr * (ratio if rule == "linear" else math.sqrt(ratio))


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the LR at optimizer step ``step`` (0-based): ``(step + 1) / warmup_steps``, then 1.

    Examples:
        >>> [warmup_factor(s, 4) for s in range(6)]
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
        >>> warmup_factor(0, 0)
        1.0
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def scale_learning_rates(optimizer: torch.optim.Optimizer, schedulers: list[Any], ratio: float) -> None:
    """Multiply every learning rate an optimizer and its schedulers hold by ``ratio``, in place.

    Scales the param groups' ``lr`` (and ``initial_lr``, ``max_lr``, ``min_lr`` where present) and
    the schedulers' ``base_lrs`` / ``_last_lr`` / ``max_lrs``, recursing into ``SequentialLR`` and
    ``ChainedScheduler``. The schedules then continue exactly as if the optimizer had been built
    with ``ratio`` times its learning rate.

    Examples:
        >>> opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
        >>> scale_learning_rates(opt, [sched], 3.0)
        >>> round(opt.param_groups[0]["lr"], 6), [round(lr, 6) for lr in sched.base_lrs]
        (0.15, [0.3])
    """
    for group in optimizer.param_groups:
        for key in GROUP_LR_KEYS:
            if key in group:
                group[key] = group[key] * ratio
    for scheduler in schedulers:
        _scale_scheduler(scheduler, ratio)


def _scale_scheduler(scheduler: Any, ratio: float) -> None:
    """Scale a scheduler's own LR lists and those of the schedulers inside it (``SequentialLR``)."""
    for attribute in SCHEDULER_LR_ATTRIBUTES:
        if hasattr(scheduler, attribute):
            setattr(scheduler, attribute, [lr * ratio for lr in getattr(scheduler, attribute)])
    for child in getattr(scheduler, "_schedulers", ()):
        _scale_scheduler(child, ratio)


def data_parallel_size(trainer: pl.Trainer) -> int:
    """How many data-parallel replicas split each global batch.

    This is ``strategy.distributed_sampler_kwargs["num_replicas"]`` where the strategy has it: the
    world size under DDP/FSDP, only the data-parallel mesh dimension under tensor parallelism
    (``ModelParallelStrategy``: tensor-parallel ranks share a batch). Otherwise
    ``trainer.world_size``.

    Examples:
        >>> data_parallel_size(pl.Trainer(logger=False))
        1
    """
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
    if kwargs and kwargs.get("num_replicas", 0) > 0:
        return int(kwargs["num_replicas"])
    return int(trainer.world_size)


class StepWarmup:
    """Multiply an optimizer's LRs by :func:`warmup_factor` for the duration of each of its steps.

    Its methods are the optimizer's step pre- and post-hooks. They nest: an optimizer subclass
    whose ``step`` calls ``super().step()`` runs the hooks twice, and only the outermost pair acts.
    """

    def __init__(self, trainer: pl.Trainer, warmup_steps: int) -> None:
        self.trainer = trainer
        self.warmup_steps = warmup_steps
        self.depth = 0
        self.saved: list[Any] = []

    def before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.depth += 1
        factor = warmup_factor(self.trainer.global_step, self.warmup_steps)
        if self.depth == 1 and factor < 1.0:
            self.saved = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * factor

    def after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.depth -= 1
        if self.depth == 0 and self.saved:
            for group, lr in zip(optimizer.param_groups, self.saved):
                group["lr"] = lr
            self.saved = []


class LRScaling(Technique):
    """Scale the learning rate by the effective batch size, with an optional linear warmup.

    The effective batch is ``batch_size x trainer.accumulate_grad_batches x data-parallel size``
    (see :func:`data_parallel_size`: under tensor parallelism only the data-parallel ranks count).
    The factor (:func:`scaled_lr` of 1) multiplies the LR of every param group of every optimizer
    and its scheduler's ``base_lrs`` once, at ``on_train_start``; a resumed run does not apply it
    again (see the module docstring). If a run resumes with a different effective batch, the LRs
    are rescaled to the new factor, with a warning.

    Warmup multiplies the LR of optimizer step ``s`` by ``min(1, (s + 1) / warmup_steps)`` on top
    of whatever scheduler the module has: the factor is applied just before each optimizer step
    and undone just after it (optimizer step hooks), so the scheduler and checkpoints only ever
    see the un-warmed LR (``LearningRateMonitor`` too: it logs the LR without the warmup, which
    is :func:`warmup_factor` of the step).

    Logs ``lr_scaling/factor`` and ``lr_scaling/effective_batch`` once, to the loggers, when
    training starts (``pl_module.log`` would repeat them at every logging step).

    Args:
        reference_batch_size: The batch size the configured LR was tuned for (> 0).
        rule: ``"linear"`` or ``"sqrt"``.
        batch_size: Per-device batch size; ``None`` reads ``trainer.datamodule.batch_size``.
        warmup_steps: Optimizer steps of linear warmup (>= 0; 0: none).

    Examples:
        >>> LRScaling(reference_batch_size=32, rule="cubic")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: rule='cubic' is unknown; choose one of: 'linear', 'sqrt'
    """

    name = "lr_scaling"
    hooks = ("on_fit_start", "on_train_start")
    distributed_safe = True
    compile_safe = True  # tests/test_compile.py: compiled training equals eager
    compile_note = "it changes only the learning rates, nothing in the forward"

    def __init__(
        self, reference_batch_size: int, rule: str = "linear", batch_size: int | None = None, warmup_steps: int = 0
    ) -> None:
        super().__init__()
        self.reference_batch_size = int(
            check_range("reference_batch_size", reference_batch_size, low=0, low_inclusive=False)
        )
        self.rule = check_choice("rule", rule, SCALING_RULES)
        if batch_size is not None:
            batch_size = int(check_range("batch_size", batch_size, low=0, low_inclusive=False))
        self.batch_size = batch_size
        self.warmup_steps = int(check_range("warmup_steps", warmup_steps, low=0))
        self.effective_batch: int | None = None
        self.factor: float | None = None
        self._restored_factor: float | None = None
        self._step_hooks: list[Any] = []

    # -- hooks --------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Work out the effective batch and the factor (fails here, before any step, without a batch size)."""
        batch_size = self.batch_size
        if batch_size is None:
            batch_size = getattr(trainer.datamodule, "batch_size", None)
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigurationError(
                f"LRScaling needs the per-device batch size, but batch_size=None and the trainer's datamodule "
                f"({type(trainer.datamodule).__name__}) has no positive integer batch_size "
                f"(found {batch_size!r}); pass LRScaling(batch_size=...)"
            )
        self.effective_batch = batch_size * trainer.accumulate_grad_batches * data_parallel_size(trainer)
        self.factor = scaled_lr(1.0, self.effective_batch, self.reference_batch_size, self.rule)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Scale the (possibly restored) optimizers and schedulers to ``factor``; install the warmup; log."""
        assert self.factor is not None and self.effective_batch is not None
        # What the optimizer state holds now: a restored checkpoint's factor (1 if it was written
        # without LRScaling), or 1 for a freshly built optimizer.
        held = 1.0
        if trainer.ckpt_path is not None:
            held = self._restored_factor if self._restored_factor is not None else 1.0
            if held != self.factor:
                rank_zero_warn(
                    f"LRScaling: the checkpoint's learning rates were scaled by {held:g}; this run's effective "
                    f"batch {self.effective_batch} gives factor {self.factor:g}, so they are rescaled by "
                    f"{self.factor / held:g}"
                )
        if held != self.factor:
            for optimizer in trainer.optimizers:
                schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
                scale_learning_rates(optimizer, schedulers, self.factor / held)
        if self.warmup_steps > 0:
            for optimizer in trainer.optimizers:
                warmup = StepWarmup(trainer, self.warmup_steps)
                self._step_hooks.append(optimizer.register_step_pre_hook(warmup.before_step))
                self._step_hooks.append(optimizer.register_step_post_hook(warmup.after_step))
        metrics = {f"{self.name}/factor": self.factor, f"{self.name}/effective_batch": float(self.effective_batch)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def remove(self, pl_module: nn.Module) -> None:
        """Remove the warmup's optimizer hooks (at teardown)."""
        super().remove(pl_module)
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []
        self._restored_factor = None

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "effective_batch": self.effective_batch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_factor = state_dict["factor"]
