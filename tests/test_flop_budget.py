"""FlopBudget: stops within one step of the budget, fits max_steps and the LR schedule to it, resumes exactly."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_efficient import BertMLM, ConfigurationError, EfficiencyMonitor, RandomStates
from lightning_efficient.models.base import warmup_schedule
from lightning_efficient.pipeline.budget import FlopBudget
from lightning_efficient.summary import SCHEMA_VERSION, read_summary
from lightning_efficient.testing import quiet_trainer

VOCAB, SEQ, LR = 50, 8, 1e-3


def loader(rows: int = 8) -> DataLoader:
    """Identical token rows: every batch is the same, so a resume mid-epoch sees the same data."""
    row = {"input_ids": torch.randint(5, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(0))}
    row["attention_mask"] = torch.ones(SEQ, dtype=torch.long)
    return DataLoader([row] * rows, batch_size=2, shuffle=False)


def model(**kwargs: Any) -> BertMLM:
    """A tiny BERT whose steps all cost the same FLOPs (the head runs on every position)."""
    defaults = {"learning_rate": LR, "warmup_fraction": 0.2, "head_on_masked_only": False}
    return BertMLM(vocab_size=VOCAB, preset="tiny", **{**defaults, **kwargs})


class LearningRates(Callback):
    """The LR each optimizer step runs at (read before the step)."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


class Crash(Callback):
    """Fail before the step after ``step``, as a killed run would (after that step's checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("killed on purpose")


def fit(
    root: Path, callbacks: list[Callback], module: BertMLM | None = None, ckpt_path: str | None = None, **kwargs: Any
) -> pl.Trainer:
    trainer = quiet_trainer(
        callbacks=callbacks, default_root_dir=str(root), accelerator="cpu", log_every_n_steps=1, **kwargs
    )
    trainer.fit(module or model(), loader(), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def step_flops(tmp_path_factory: pytest.TempPathFactory) -> float:
    """The model FLOPs of one training step of :func:`model` on :func:`loader`."""
    monitor = EfficiencyMonitor(peak_flops=1e11)
    fit(tmp_path_factory.mktemp("one_step"), [monitor], max_steps=1)
    assert monitor.total_flops > 0
    return monitor.total_flops


# -- arguments ------------------------------------------------------------------------------------
@pytest.mark.parametrize("flops", [0, -1, math.nan, math.inf, True, "x", None])
def test_a_bad_budget_fails_naming_the_value(flops: Any) -> None:
    with pytest.raises(ConfigurationError, match=rf"^flops={flops!r} must be a positive number of FLOPs, e\.g\. 2e15$"):
        FlopBudget(flops)


def test_fit_schedule_must_be_a_bool() -> None:
    with pytest.raises(ConfigurationError, match=r"fit_schedule='yes' must be true or false"):
        FlopBudget(1e9, fit_schedule="yes")  # type: ignore[arg-type]


def test_without_a_monitor_fit_fails_before_the_first_step(tmp_path: Path) -> None:
    budget = FlopBudget(1e9)
    with pytest.raises(
        ConfigurationError, match=r"needs an EfficiencyMonitor .* add lightning_efficient\.EfficiencyMonitor"
    ):
        fit(tmp_path, [budget], max_steps=3)
    assert budget.stopped_step is None


# -- stopping -------------------------------------------------------------------------------------
def test_stops_at_the_first_step_that_reaches_the_budget(tmp_path: Path, step_flops: float, caplog) -> None:
    monitor, budget = EfficiencyMonitor(peak_flops=1e11), FlopBudget(3.5 * step_flops, fit_schedule=False)
    with caplog.at_level(logging.INFO):
        trainer = fit(tmp_path, [monitor, budget], max_steps=20)
    assert trainer.global_step == budget.stopped_step == 4 and trainer.max_steps == 20  # fit_schedule=False
    used = monitor.total_flops
    assert budget.flops <= used < budget.flops + step_flops  # over by less than one step
    assert used == monitor.summary["total_flops"] == 4 * step_flops
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("FlopBudget: budget")]
    assert lines == [
        f"FlopBudget: budget of {budget.flops:.4g} FLOPs reached at step 4: {used:.4g} FLOPs used (114.3%); stopping"
    ]
    assert float(trainer.callback_metrics["budget/flops_fraction"]) == pytest.approx(used / budget.flops)


def test_placed_before_the_monitor_it_moves_after_it_and_stops_at_the_same_step(
    tmp_path: Path, step_flops: float
) -> None:
    monitor, budget = EfficiencyMonitor(peak_flops=1e11), FlopBudget(3.5 * step_flops, fit_schedule=False)
    trainer = fit(tmp_path, [budget, monitor], max_steps=20)  # read before the monitor's count: one step late
    assert trainer.global_step == 4 and budget.flops <= monitor.total_flops < budget.flops + step_flops
    assert trainer.callbacks.index(budget) == trainer.callbacks.index(monitor) + 1


def test_with_gradient_accumulation_a_step_is_an_optimizer_step(tmp_path: Path, step_flops: float) -> None:
    monitor, budget = EfficiencyMonitor(peak_flops=1e11), FlopBudget(1.5 * 2 * step_flops)  # 1.5 steps of 2 batches
    trainer = fit(tmp_path, [monitor, budget], max_steps=20, accumulate_grad_batches=2)
    assert trainer.global_step == budget.stopped_step == budget.planned_steps == trainer.max_steps == 2
    assert monitor.total_flops == 2 * 2 * step_flops  # stopped on a step boundary, no half-accumulated step


def test_a_budget_beyond_max_steps_lets_the_run_end_at_max_steps(tmp_path: Path, step_flops: float) -> None:
    monitor, budget = EfficiencyMonitor(peak_flops=1e11), FlopBudget(100 * step_flops, fit_schedule=False)
    trainer = fit(tmp_path / "kept", [monitor, budget], max_steps=3)
    assert trainer.global_step == 3 and budget.stopped_step is None and budget.planned_steps is None
    assert monitor.total_flops == 3 * step_flops

    module, budget = model(), FlopBudget(100 * step_flops)  # fit_schedule: max_steps is the lower bound
    trainer = fit(tmp_path / "fitted", [EfficiencyMonitor(peak_flops=1e11), budget], module, max_steps=3)
    assert (trainer.global_step, trainer.max_steps, budget.planned_steps) == (3, 3, 100)
    assert module.schedule_length == 3  # the schedule still ends with the run, at max_steps


# -- the schedule fitted to the budget --------------------------------------------------------------
def test_fit_schedule_plans_max_steps_and_ends_the_lr_schedule_with_the_budget(
    tmp_path: Path, step_flops: float
) -> None:
    shape = "linear"
    module, lrs = model(lr_schedule=shape), LearningRates()
    monitor, budget = EfficiencyMonitor(peak_flops=1e11), FlopBudget(5.5 * step_flops)
    trainer = fit(tmp_path, [monitor, budget, lrs], module, max_steps=1000)  # a 1000-step schedule to start with
    planned = 1 + math.ceil(4.5)  # after step 1: ceil of the remaining 4.5 steps' FLOPs
    assert budget.planned_steps == trainer.max_steps == trainer.global_step == module.schedule_length == planned
    assert budget.stopped_step == planned and monitor.total_flops == planned * step_flops
    warmup = int(0.2 * planned)
    assert lrs.lrs[0] == pytest.approx(LR * warmup_schedule(0, 200, 1000, shape))  # before the plan
    expected = [LR * warmup_schedule(step, warmup, planned, shape) for step in range(1, planned)]
    assert [lrs.lrs[step] for step in range(1, planned)] == pytest.approx(expected)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == planned
    assert scheduler.get_last_lr()[0] == pytest.approx(LR * warmup_schedule(planned, warmup, planned, shape), abs=1e-12)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the end of the decay


# -- resume ---------------------------------------------------------------------------------------
def test_a_resumed_run_stops_at_the_same_step_with_the_same_weights_and_lr(tmp_path: Path, step_flops: float) -> None:
    def run(root: Path, extra: list[Callback], **kwargs: Any) -> tuple[pl.Trainer, BertMLM, FlopBudget, LearningRates]:
        pl.seed_everything(7, verbose=False)
        module, budget, lrs = model(dropout=0.1), FlopBudget(5.5 * step_flops), LearningRates()
        callbacks = [RandomStates(), EfficiencyMonitor(peak_flops=1e11), budget, lrs, *extra]
        try:
            trainer = fit(root, callbacks, module, max_steps=1000, **kwargs)
        except RuntimeError as error:
            assert "killed on purpose" in str(error)
            trainer = None
        return trainer, module, budget, lrs

    whole, whole_module, whole_budget, whole_lrs = run(tmp_path / "whole", [])
    saves = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3, save_top_k=-1)
    run(tmp_path / "first", [saves, Crash(3)], enable_checkpointing=True)
    (checkpoint,) = (tmp_path / "ckpt").iterdir()
    state = torch.load(checkpoint, weights_only=True)  # the plan is plain values
    assert state["global_step"] == 3 and state["callbacks"]["FlopBudget"] == {"flops": 5.5 * step_flops, "planned": 6}

    resumed, module, budget, lrs = run(tmp_path / "resumed", [], ckpt_path=str(checkpoint))
    assert resumed.global_step == whole.global_step == budget.stopped_step == whole_budget.stopped_step == 6
    assert [lrs.lrs[step] for step in (3, 4, 5)] == [whole_lrs.lrs[step] for step in (3, 4, 5)]
    assert (
        resumed.lr_scheduler_configs[0].scheduler.get_last_lr() == whole.lr_scheduler_configs[0].scheduler.get_last_lr()
    )
    ours, theirs = module.state_dict(), whole_module.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert resumed.max_steps == whole.max_steps == 6 and module.schedule_length == whole_module.schedule_length == 6
    assert budget.planned_steps == whole_budget.planned_steps == 6


def test_a_run_resumed_past_its_budget_takes_no_step_more(tmp_path: Path, step_flops: float) -> None:
    saves = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1)
    fit(tmp_path / "first", [EfficiencyMonitor(peak_flops=1e11), FlopBudget(1.5 * step_flops), saves],
        max_steps=1000, enable_checkpointing=True)  # fmt: skip
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    monitor, budget = EfficiencyMonitor(peak_flops=1e11), FlopBudget(1.5 * step_flops, fit_schedule=False)
    trainer = fit(tmp_path / "again", [monitor, budget], max_steps=1000, ckpt_path=str(checkpoint))  # no plan
    assert trainer.global_step == budget.stopped_step == 2 and monitor.total_flops == 2 * step_flops


# -- the monitor's history ------------------------------------------------------------------------
def test_history_points_carry_the_flops_counted_so_far(tmp_path: Path, step_flops: float) -> None:
    monitor = EfficiencyMonitor(peak_flops=1e11)
    trainer = quiet_trainer(
        callbacks=[monitor, FlopBudget(2.5 * step_flops, fit_schedule=False)], default_root_dir=str(tmp_path),
        accelerator="cpu", max_steps=1000, val_check_interval=2, limit_val_batches=1,
    )  # fmt: skip
    trainer.fit(model(), loader(), loader())
    history = monitor.summary["history"]  # validations every 2 steps, and at the stop (step 3)
    assert [(p["step"], p["flops"]) for p in history] == [(2, 2 * step_flops), (3, 3 * step_flops)]
    written = read_summary(tmp_path / "efficiency.json")
    assert written["version"] == SCHEMA_VERSION == 2 and written["history"] == history


def test_a_monitor_checkpoint_from_before_history_flops_resumes_with_unknown_flops() -> None:
    monitor = EfficiencyMonitor(peak_flops=1e11)
    state = monitor.state_dict()
    state["history"] = [{"step": 2, "wall_time_s": 1.0, "train_time_s": 0.5, "tokens": 32, "value": 4.0}]  # no flops
    monitor.load_state_dict(state)
    assert monitor.state_dict()["history"] == [{**state["history"][0], "flops": None}]  # the summary still validates
