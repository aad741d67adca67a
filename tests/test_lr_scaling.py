"""LRScaling: the arithmetic, the warmup per step, exact resume, logging, bad input; the config fragments."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_efficient.callbacks.lr_scaling import (
    LRScaling,
    data_parallel_size,
    scale_learning_rates,
    scaled_lr,
    warmup_factor,
)
from lightning_efficient.errors import ConfigurationError

BASE_LR = 0.1


class RecordingSGD(torch.optim.SGD):
    """SGD that records the learning rate each step actually used (after the step pre-hooks)."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.used: list[float] = []

    def step(self, closure: Any = None) -> Any:
        self.used.append(self.param_groups[0]["lr"])
        return super().step(closure)


class Toy(pl.LightningModule):
    """A linear model whose scheduler is per step: ``lambda`` (x0.9 per step) or ``steplr`` (x0.5 every 2)."""

    def __init__(self, schedule: str = "lambda") -> None:
        super().__init__()
        self.schedule = schedule
        self.layer = nn.Linear(3, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> Any:
        optimizer = RecordingSGD(self.parameters(), lr=BASE_LR)
        if self.schedule == "lambda":
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)
        else:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ToyData(pl.LightningDataModule):
    """Identical rows, so that every batch is the same and a resumed run sees the same data."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.ones(64, 3)), batch_size=self.batch_size
        )


def train(
    scaling: LRScaling | None,
    root: Path,
    steps: int,
    schedule: str = "lambda",
    batch_size: int = 4,
    ckpt_path: str | None = None,
    save_every_step: bool = False,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    callbacks: list[Any] = [scaling] if scaling is not None else []
    if save_every_step:
        callbacks.append(ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=1, save_top_k=-1))
    trainer_kwargs.setdefault("logger", False)
    trainer = pl.Trainer(
        max_steps=steps, limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=save_every_step, default_root_dir=root, callbacks=callbacks, **trainer_kwargs,
    )  # fmt: skip
    pl.seed_everything(0, verbose=False)
    trainer.fit(Toy(schedule), ToyData(batch_size), ckpt_path=ckpt_path)
    return trainer


# -- the arithmetic ---------------------------------------------------------------------------
def test_scaled_lr_rules() -> None:
    assert scaled_lr(1e-3, 256, 32, "linear") == pytest.approx(1e-3 * 8)
    assert scaled_lr(1e-3, 256, 32, "sqrt") == pytest.approx(1e-3 * math.sqrt(8))
    assert scaled_lr(0.4, 8, 32, "linear") == pytest.approx(0.1)  # smaller than the reference: scaled down
    assert scaled_lr(0.4, 8, 32, "sqrt") == pytest.approx(0.2)
    with pytest.raises(ConfigurationError, match="rule='cube'.*'linear', 'sqrt'"):
        scaled_lr(1e-3, 8, 4, "cube")


def fake_trainer(accumulate: int, world_size: int, num_replicas: int | None, batch_size: int | None = 5) -> Any:
    strategy = SimpleNamespace()
    if num_replicas is not None:
        strategy.distributed_sampler_kwargs = {"num_replicas": num_replicas, "rank": 0}
    return SimpleNamespace(
        strategy=strategy, world_size=world_size, accumulate_grad_batches=accumulate,
        datamodule=SimpleNamespace(batch_size=batch_size),
    )  # fmt: skip


def test_effective_batch_counts_accumulation_and_data_parallel_ranks() -> None:
    cases = [  # (accumulate, world size, data-parallel replicas of the strategy, expected effective batch)
        (1, 1, None, 5),  # single device: no sampler kwargs, world size 1
        (3, 1, None, 15),
        (2, 4, 4, 40),  # DDP on 4 ranks
        (2, 8, 2, 20),  # tensor parallel 4 x data parallel 2: only the 2 data-parallel ranks count
        (1, 2, None, 10),  # a strategy without sampler kwargs: the world size
    ]
    for accumulate, world_size, replicas, expected in cases:
        trainer = fake_trainer(accumulate, world_size, replicas)
        assert data_parallel_size(trainer) == expected // 5 // accumulate
        scaling = LRScaling(reference_batch_size=10, rule="linear")
        scaling.on_fit_start(trainer, None)
        assert scaling.effective_batch == expected
        assert scaling.factor == pytest.approx(expected / 10)
        explicit = LRScaling(reference_batch_size=10, rule="sqrt", batch_size=7)  # the argument wins over the data
        explicit.on_fit_start(trainer, None)
        assert explicit.effective_batch == expected // 5 * 7
        assert explicit.factor == pytest.approx(math.sqrt(expected // 5 * 7 / 10))


def test_data_parallel_size_of_a_real_ddp_trainer() -> None:
    """Lightning's DDP strategy reports processes x nodes (no process is started by building the Trainer)."""
    assert data_parallel_size(pl.Trainer(accelerator="cpu", devices=3, strategy="ddp", logger=False)) == 3
    assert data_parallel_size(pl.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", logger=False)) == 4
    assert data_parallel_size(pl.Trainer(accelerator="cpu", devices=1, logger=False)) == 1


@pytest.mark.parametrize("kind", ["lambda", "step", "onecycle", "cosine", "sequential", "cyclic"])
def test_scale_learning_rates_equals_building_with_the_scaled_lr(kind: str) -> None:
    """Scaling a built optimizer + scheduler by 3 gives the LRs of one built with 3x the LR, at every step."""

    def build(lr: float) -> tuple[torch.optim.Optimizer, Any]:
        optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=lr, momentum=0.9)
        sched = torch.optim.lr_scheduler
        if kind == "lambda":
            return optimizer, sched.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
        if kind == "step":
            return optimizer, sched.StepLR(optimizer, step_size=2, gamma=0.5)
        if kind == "onecycle":
            return optimizer, sched.OneCycleLR(optimizer, max_lr=lr, total_steps=10)
        if kind == "cosine":
            return optimizer, sched.CosineAnnealingLR(optimizer, T_max=6, eta_min=0.001)
        if kind == "cyclic":
            return optimizer, sched.CyclicLR(optimizer, base_lr=lr / 10, max_lr=lr, step_size_up=2)
        warm = sched.LinearLR(optimizer, start_factor=0.25, total_iters=3)
        return optimizer, sched.SequentialLR(optimizer, [warm, sched.ExponentialLR(optimizer, 0.8)], milestones=[3])

    scaled_opt, scaled_sched = build(0.1)
    scale_learning_rates(scaled_opt, [scaled_sched], 3.0)
    reference_opt, reference_sched = build(0.3)
    for step in range(9):
        assert scaled_opt.param_groups[0]["lr"] == pytest.approx(reference_opt.param_groups[0]["lr"], rel=1e-9), step
        scaled_opt.step(), scaled_sched.step()
        reference_opt.step(), reference_sched.step()


def test_warmup_factor_values() -> None:
    assert [warmup_factor(s, 3) for s in range(5)] == [1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


# -- in a real fit -----------------------------------------------------------------------------
def test_scaled_warmed_lrs_per_step_on_top_of_the_schedule(tmp_path: Path) -> None:
    """batch 4 x accumulate 2 = 8 vs reference 2, linear: x4; warmup 3 steps on top of x0.9 per step."""
    scaling = LRScaling(reference_batch_size=2, rule="linear", warmup_steps=3)
    trainer = train(
        scaling, tmp_path, steps=5, accumulate_grad_batches=2, logger=CSVLogger(tmp_path), log_every_n_steps=1
    )
    assert (scaling.effective_batch, scaling.factor) == (8, 4.0)
    warm = [1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    expected = [BASE_LR * 4 * 0.9**s * warm[s] for s in range(5)]
    assert trainer.optimizers[0].used == pytest.approx(expected, rel=1e-12)
    # The scheduler never saw the warmup: its state equals a run without warmup (and with the scaling).
    plain = train(
        LRScaling(reference_batch_size=2, rule="linear"), tmp_path / "plain", steps=5, accumulate_grad_batches=2
    )
    assert plain.optimizers[0].used == pytest.approx([BASE_LR * 4 * 0.9**s for s in range(5)], rel=1e-12)
    state = trainer.lr_scheduler_configs[0].scheduler.state_dict()
    assert state == plain.lr_scheduler_configs[0].scheduler.state_dict()
    assert state["base_lrs"] == pytest.approx([BASE_LR * 4])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(BASE_LR * 4 * 0.9**5)  # un-warmed
    # Logged once, at the start.
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = [(row["step"], key, float(value)) for row in rows for key, value in row.items() if key != "step" and value]
    assert logged == [("0", "lr_scaling/effective_batch", 8.0), ("0", "lr_scaling/factor", 4.0)]


def test_warmup_does_not_compound_a_chainable_scheduler(tmp_path: Path) -> None:
    """StepLR multiplies the group's current LR each step: the warmed LR must never be what it sees."""
    trainer = train(
        LRScaling(reference_batch_size=4, rule="sqrt", batch_size=16, warmup_steps=4),
        tmp_path,
        steps=6,
        schedule="steplr",
    )
    warm = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert trainer.optimizers[0].used == pytest.approx(
        [BASE_LR * 2 * 0.5 ** (s // 2) * warm[s] for s in range(6)], rel=1e-12
    )


def test_resume_equals_uninterrupted_run_and_scales_once(tmp_path: Path) -> None:
    def scaling() -> LRScaling:
        return LRScaling(reference_batch_size=1, rule="linear", warmup_steps=3)  # factor 4

    full = train(scaling(), tmp_path / "full", steps=6, save_every_step=True)
    for k in (2, 4):  # mid-warmup, after warmup
        resumed = train(
            scaling(), tmp_path / f"resumed_{k}", steps=6, ckpt_path=str(tmp_path / "full" / f"step={k}.ckpt")
        )
        assert resumed.optimizers[0].used == full.optimizers[0].used[k:], k  # bit for bit
        assert (
            resumed.lr_scheduler_configs[0].scheduler.state_dict()
            == full.lr_scheduler_configs[0].scheduler.state_dict()
        )
        assert resumed.optimizers[0].state_dict()["param_groups"] == full.optimizers[0].state_dict()["param_groups"]
        assert all(
            torch.equal(a, b) for a, b in zip(resumed.lightning_module.parameters(), full.lightning_module.parameters())
        )
    assert full.lr_scheduler_configs[0].scheduler.base_lrs == [BASE_LR * 4]  # once, not 16x
    assert full.optimizers[0].param_groups[0]["initial_lr"] == BASE_LR * 4


def test_resume_with_another_effective_batch_rescales(tmp_path: Path) -> None:
    train(LRScaling(reference_batch_size=4, rule="linear"), tmp_path / "a", steps=2, save_every_step=True)  # x1
    with pytest.warns(UserWarning, match="scaled by 1; .*effective batch 8 gives factor 2"):
        resumed = train(LRScaling(reference_batch_size=4, rule="linear"), tmp_path / "b", steps=4, batch_size=8,
                        ckpt_path=str(tmp_path / "a" / "step=2.ckpt"))  # fmt: skip
    assert resumed.optimizers[0].used == pytest.approx([BASE_LR * 2 * 0.9**s for s in (2, 3)], rel=1e-12)
    # A checkpoint written without LRScaling holds unscaled LRs: scaled once on resume.
    train(None, tmp_path / "c", steps=2, save_every_step=True)
    with pytest.warns(UserWarning, match="scaled by 1"):
        resumed = train(
            LRScaling(reference_batch_size=2, rule="linear"),
            tmp_path / "d",
            steps=4,
            ckpt_path=str(tmp_path / "c" / "step=2.ckpt"),
        )
    assert resumed.lr_scheduler_configs[0].scheduler.base_lrs == [BASE_LR * 2]
    assert resumed.optimizers[0].used == pytest.approx([BASE_LR * 2 * 0.9**s for s in (2, 3)], rel=1e-12)


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "log"}, "rule='log' is unknown; choose one of: 'linear', 'sqrt'"),
        ({"reference_batch_size": 0}, "reference_batch_size=0 must be > 0"),
        ({"reference_batch_size": -32}, "reference_batch_size=-32 must be > 0"),
        ({"batch_size": 0}, "batch_size=0 must be > 0"),
        ({"batch_size": -1}, "batch_size=-1 must be > 0"),
        ({"warmup_steps": -1}, "warmup_steps=-1 must be >= 0"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LRScaling(**{"reference_batch_size": 32, **kwargs})


def test_no_batch_size_fails_before_the_first_step(tmp_path: Path) -> None:
    from lightning.pytorch.demos.boring_classes import BoringModel  # its own dataloader, no datamodule

    trainer = pl.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[LRScaling(reference_batch_size=8)],
    )  # fmt: skip
    with pytest.raises(ConfigurationError, match="batch_size=None.*NoneType.*LRScaling\\(batch_size=...\\)"):
        trainer.fit(BoringModel())
    assert trainer.global_step == 0


# -- the config fragments ----------------------------------------------------------------------
FRAGMENTS = Path(__file__).parents[1] / "configs" / "techniques"
SMALL_MLM = Path(__file__).parents[1] / "configs" / "bert" / "small_mlm.yaml"


@pytest.mark.parametrize(
    "names", [["lamb", "large_batch", "trust_ratio_monitor"], ["lion"], ["lr_scaling"], ["trust_ratio_monitor"]]
)
def test_fragment_loads_through_the_cli(names: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_efficient.callbacks import TrustRatioMonitor
    from lightning_efficient.cli import EfficientCLI
    from lightning_efficient.optim import LAMB, Lion

    fragments = [FRAGMENTS / f"{name}.yaml" for name in names]
    assert f"lightning-efficient fit -c configs/bert/small_mlm.yaml -c configs/techniques/{names[0]}.yaml" in (
        fragments[0].read_text()
    )
    monkeypatch.chdir(tmp_path)
    cli = EfficientCLI(args=["-c", str(SMALL_MLM), *(arg for f in fragments for arg in ("-c", str(f)))], run=False)
    callbacks = {type(cb): cb for cb in cli.trainer.callbacks}
    assert len(cli.trainer.callbacks) > 4, "the fragment must append to the config's callbacks"
    if names[0] in ("lamb", "lion"):  # LightningCLI replaced configure_optimizers; the schedule needs a fit
        monkeypatch.setattr(type(cli.model), "lr_scheduler_config", lambda self, optimizer: {"scheduler": None})
        optimizer = cli.model.configure_optimizers()["optimizer"]
    if names[0] == "lamb":  # the LAMB recipe: lamb + large_batch + trust_ratio_monitor
        scaling = callbacks[LRScaling]
        effective = cli.datamodule.batch_size * cli.trainer.accumulate_grad_batches
        assert effective == 256 == 8 * scaling.reference_batch_size
        assert isinstance(optimizer, LAMB) and optimizer.defaults["weight_decay"] == 0.01
        assert scaled_lr(
            optimizer.defaults["lr"], effective, scaling.reference_batch_size, scaling.rule
        ) == pytest.approx(0.035 * 8**0.5, rel=1e-3)
        assert scaling.warmup_steps == 0 and TrustRatioMonitor in callbacks  # the model's schedule warms up
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]  # no decay for biases / LayerNorm
    elif names[0] == "lion":
        adamw_lr, adamw_wd = cli.model.hparams.learning_rate, cli.model.hparams.weight_decay
        assert isinstance(optimizer, Lion) and optimizer.defaults["betas"] == (0.9, 0.99)
        assert 3 <= adamw_lr / optimizer.defaults["lr"] <= 10
        assert 3 <= optimizer.defaults["weight_decay"] / adamw_wd <= 10
        assert LRScaling not in callbacks  # the optimizer alone: stack lr_scaling.yaml to scale it
    elif names[0] == "lr_scaling":
        assert "configure_optimizers" not in vars(cli.model)  # the model's own AdamW and schedule are kept
        assert (callbacks[LRScaling].reference_batch_size, callbacks[LRScaling].rule) == (32, "sqrt")
    else:
        assert callbacks[TrustRatioMonitor].every_n_steps == 50
