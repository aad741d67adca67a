"""Checkpoints hold what the user thinks: last.ckpt is the latest state, saves are atomic, a killed
run resumes bit-identically (even with a cold peak-FLOPs cache), random states come back for any
module, and a non-finite loss stops the run without overwriting the last finite checkpoint."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from lightning_efficient import (
    AtomicCheckpointIO,
    BertMLM,
    ConfigurationError,
    EfficiencyMonitor,
    LastCheckpoint,
    NonFiniteLossError,
    NonFiniteLossGuard,
    RandomStates,
    ResumableDataLoader,
    ResumableSampler,
)
from lightning_efficient.flops import measure_peak_flops
from lightning_efficient.testing import quiet_trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("techniques", "pipelines"))


class DropoutRegressor(pl.LightningModule):
    """A user's own module: dropout (torch RNG) and a loss scale drawn from NumPy and Python ``random``."""

    def __init__(self, lr: float = 0.05, dropout: float = 0.5) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(dropout), nn.Linear(16, 1))
        self.lr = lr
        self.steps = 0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.steps += 1
        x, y = batch
        scale = 1.0 + 0.1 * float(np.random.rand()) + 0.1 * random.random()
        return nn.functional.mse_loss(self.net(x), y) * scale

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> ResumableDataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(64, 8, generator=generator)
        data = TensorDataset(x, x.sum(1, keepdim=True))  # 16 steps an epoch; Lightning resumes the position
        return ResumableDataLoader(data, batch_size=4, sampler=ResumableSampler(data, shuffle=True, seed=0))


class Interrupted(Exception):
    """Stands for a crash in the middle of a run."""


class InterruptAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Interrupted


def _fit(root: Path, steps: int, callbacks: list, ckpt_path: str | None = None, **module: float) -> pl.LightningModule:
    model = DropoutRegressor(**module)
    trainer = quiet_trainer(max_steps=steps, callbacks=callbacks, enable_checkpointing=True, default_root_dir=str(root),
                            limit_val_batches=0, plugins=[AtomicCheckpointIO()])  # fmt: skip
    trainer.fit(model, ckpt_path=ckpt_path)
    return model


def _seed(seed: int) -> None:
    pl.seed_everything(seed, verbose=False)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- 3. atomic saves --------------------------------------------------------------------------
def test_a_save_failing_midway_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def partial_then_fail(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", partial_then_fail)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    kept = io.load_checkpoint(path, weights_only=True)
    assert kept["global_step"] == 1 and torch.equal(kept["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# -- 1. + 2. + 5. + 6. in every shipped config ------------------------------------------------
@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_run_config_turns_the_safeguards_on(config):
    trainer = yaml.safe_load(config.read_text())["trainer"]
    assert [p["class_path"] for p in trainer["plugins"]] == ["lightning_efficient.AtomicCheckpointIO"]
    callbacks = {c["class_path"]: c.get("init_args", {}) for c in trainer["callbacks"]}
    assert trainer["callbacks"][0]["class_path"] == "lightning_efficient.RandomStates"  # restores first
    assert "lightning_efficient.NonFiniteLossGuard" in callbacks
    last = callbacks["lightning_efficient.LastCheckpoint"]
    best = callbacks["lightning.pytorch.callbacks.ModelCheckpoint"]
    assert last["every_n_train_steps"] >= 1 and last["dirpath"] == best["dirpath"]
    assert best["save_last"] is False  # only LastCheckpoint writes last.ckpt


# -- 1. a run killed with SIGKILL resumes bit-identically -------------------------------------
HANG_WORKER = """
import pathlib, sys, time
import lightning.pytorch as pl
sys.path.insert(0, sys.argv[1])
from test_checkpointing_runs import _fit, _seed, LastCheckpoint, RandomStates, EfficiencyMonitor

class HangAt(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 5:
            pathlib.Path("hanging").touch()
            time.sleep(600)

_seed(0)
root = pathlib.Path("run")
_fit(root, 8, [RandomStates(), EfficiencyMonitor(), LastCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3), HangAt()])
"""


def _safe_callbacks(root: Path) -> list[pl.Callback]:
    return [RandomStates(), EfficiencyMonitor(), LastCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3)]


def test_a_run_killed_with_sigkill_resumes_bit_identical(tmp_path, monkeypatch):
    measure_peak_flops("cpu")  # cached for every run here
    _seed(0)
    _fit(tmp_path / "whole", 8, _safe_callbacks(tmp_path / "whole"))
    uninterrupted = torch.load(tmp_path / "whole" / "ckpt" / "last.ckpt", weights_only=True)
    assert uninterrupted["global_step"] == 8  # the last step, though 8 is no multiple of 3

    worker = subprocess.Popen([sys.executable, "-c", HANG_WORKER, str(Path(__file__).parent)], cwd=tmp_path,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "hanging").exists():
            assert worker.poll() is None, worker.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the worker never reached step 5"
            time.sleep(0.1)
        os.kill(worker.pid, signal.SIGKILL)  # kill -9 at step 5: last.ckpt was written at step 3
    finally:
        worker.kill()
        worker.wait()
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind

    _seed(1)  # a new process
    _fit(tmp_path / "run", 8, _safe_callbacks(tmp_path / "run"), ckpt_path=str(last))
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 8
    assert _same_weights(resumed["state_dict"], uninterrupted["state_dict"])


# -- 4. measuring the peak after a resume changes nothing --------------------------------------
def test_our_module_resumes_bit_identical_with_a_cold_peak_flops_cache(tmp_path, monkeypatch, mlm_data):
    """BertMLM restores its random states when its checkpoint loads; the monitor then measures the peak."""

    def fit(root: Path, steps: int, ckpt_path: str | None = None, stop_at: int | None = None) -> BertMLM:
        _seed(0)
        model = BertMLM(vocab_size=mlm_data.vocab_size, preset="tiny", max_length=17)
        callbacks = [EfficiencyMonitor(), LastCheckpoint(dirpath=root, every_n_train_steps=3)]
        trainer = quiet_trainer(max_steps=steps, callbacks=callbacks + ([InterruptAt(stop_at)] if stop_at else []),
                                enable_checkpointing=True, default_root_dir=str(root), limit_val_batches=0)  # fmt: skip
        trainer.fit(model, mlm_data, ckpt_path=ckpt_path)
        return model

    measure_peak_flops("cpu")  # warm: the uninterrupted and the interrupted run never measure
    fit(tmp_path / "whole", 6)
    with pytest.raises(Interrupted):
        fit(tmp_path / "broken", 6, stop_at=4)
    monkeypatch.setenv("LIGHTNING_EFFICIENT_CACHE", str(tmp_path / "cold"))  # a fresh machine
    fit(tmp_path / "broken", 6, ckpt_path=str(tmp_path / "broken" / "last.ckpt"))
    assert (tmp_path / "cold" / "peak_flops.json").is_file()  # the resumed run measured the peak
    assert _same_weights(_weights(tmp_path / "broken" / "last.ckpt"), _weights(tmp_path / "whole" / "last.ckpt"))


def test_measuring_the_peak_leaves_the_global_random_streams_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_EFFICIENT_CACHE", str(tmp_path))  # cold: it really measures
    torch.manual_seed(3)
    before = torch.get_rng_state()
    assert measure_peak_flops("cpu") > 0
    assert (tmp_path / "peak_flops.json").is_file()
    assert torch.equal(torch.get_rng_state(), before)


# -- 5. random states of any module -----------------------------------------------------------
@pytest.mark.parametrize("with_random_states", [True, False])
def test_a_plain_module_with_dropout_resumes_exactly_only_with_random_states(tmp_path, with_random_states):
    _seed(0)
    _fit(tmp_path / "whole", 8, [LastCheckpoint(dirpath=tmp_path / "whole" / "ckpt", every_n_train_steps=3)])
    uninterrupted = _weights(tmp_path / "whole" / "ckpt" / "last.ckpt")

    extra = [RandomStates()] if with_random_states else []
    checkpoints = tmp_path / "broken" / "ckpt"
    _seed(0)
    with pytest.raises(Interrupted):
        _fit(
            tmp_path / "broken", 8, [*extra, LastCheckpoint(dirpath=checkpoints, every_n_train_steps=3), InterruptAt(5)]
        )
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 3
    _seed(1)  # a new process: its random streams are anywhere
    resumed_extra = [RandomStates()] if with_random_states else []
    _fit(tmp_path / "broken", 8, [*resumed_extra, LastCheckpoint(dirpath=checkpoints, every_n_train_steps=3)],
         ckpt_path=str(checkpoints / "last.ckpt"))  # fmt: skip
    resumed = _weights(checkpoints / "last.ckpt")
    assert _same_weights(resumed, uninterrupted) is with_random_states  # without it dropout draws other masks


# -- 6. non-finite loss -----------------------------------------------------------------------
def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    checkpoints = tmp_path / "ckpt"
    _seed(0)
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step (\d+) .*learning rate \(1000\.0\)") as err:
        _fit(tmp_path, 40, [NonFiniteLossGuard(), LastCheckpoint(dirpath=checkpoints, every_n_train_steps=1)],
             lr=1e3, dropout=0.0)  # fmt: skip
    step = int(err.value.args[0].split(" at step ")[1].split()[0])
    kept = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert kept["global_step"] == step  # written after the last finite step, never after the bad one
    assert all(torch.isfinite(w).all() for w in kept["state_dict"].values())

    _seed(0)  # without the guard the same run ends "successfully" with non-finite weights on disk
    _fit(tmp_path / "unguarded", 40, [LastCheckpoint(dirpath=tmp_path / "unguarded", every_n_train_steps=1)],
         lr=1e3, dropout=0.0)  # fmt: skip
    assert not all(torch.isfinite(w).all() for w in _weights(tmp_path / "unguarded" / "last.ckpt").values())


# -- 2. unwritable checkpoint directory -------------------------------------------------------
def test_an_unwritable_checkpoint_directory_fails_before_the_first_step(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    model = DropoutRegressor()
    trainer = quiet_trainer(max_steps=3, enable_checkpointing=True, default_root_dir=str(tmp_path), limit_val_batches=0,
                            callbacks=[pl.callbacks.ModelCheckpoint(dirpath=blocker / "best"),
                                       LastCheckpoint(dirpath=tmp_path / "ok", every_n_train_steps=1)])  # fmt: skip
    with pytest.raises(ConfigurationError, match=r"checkpoint directory '.*a_file/best' cannot be written"):
        trainer.fit(model)
    assert model.steps == 0 and not (tmp_path / "ok" / "last.ckpt").exists()


def test_last_checkpoint_checks_its_argument():
    with pytest.raises(ConfigurationError, match=r"every_n_train_steps=0 must be an integer >= 1"):
        LastCheckpoint(every_n_train_steps=0)


# -- 5. + 6. on DDP with 2 CPU processes -------------------------------------------------------
DDP_TIMEOUT_S = 240


def test_two_ddp_processes_resume_each_rank_random_states_and_stop_together_on_a_nan(tmp_path):
    """One 2-process gloo launch of ``safeguards_worker.py`` under a hard timeout, so a hang fails.

    Each rank draws its own dropout masks. Resumed at step 3, the run ends bit-identical to the
    uninterrupted one on both ranks; a checkpoint holding rank 0's states only does not (the
    control: each rank needs its own states back). A loss that is ``nan`` on rank 1 only stops
    both ranks at the same step, before that step's update.
    """
    worker = Path(__file__).parent / "safeguards_worker.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(worker.parent), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    try:
        result = subprocess.run([sys.executable, str(worker), str(tmp_path)], check=False, env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=DDP_TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the 2-process run hung for {DDP_TIMEOUT_S} s:\n{expired.stderr}")
    assert result.returncode == 0, result.stderr[-3000:]

    def load(name: str) -> list[dict]:
        return [torch.load(tmp_path / f"{name}_rank{rank}.pt", weights_only=True) for rank in (0, 1)]

    whole, broken, resumed, one_state = load("whole"), load("broken"), load("resumed"), load("one_state")
    assert [r["world_size"] for r in whole] == [2, 2] and [r["steps"] for r in broken] == [3, 3]
    states = torch.load(tmp_path / "broken" / "last.ckpt", weights_only=True)["callbacks"]["RandomStates"]["ranks"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])  # each rank's own
    for rank in (0, 1):
        assert whole[rank]["steps"] == resumed[rank]["steps"] == one_state[rank]["steps"] == 8
        assert _same_weights(resumed[rank]["weights"], whole[rank]["weights"]), f"rank {rank}"
        assert not _same_weights(one_state[rank]["weights"], whole[rank]["weights"]), f"rank {rank}"
    assert _same_weights(whole[0]["weights"], whole[1]["weights"])  # DDP keeps the ranks in step
    assert _same_weights(_weights(tmp_path / "resumed" / "last.ckpt"), _weights(tmp_path / "whole" / "last.ckpt"))

    nan = load("nan")
    for rank in (0, 1):
        assert nan[rank]["error"] is not None, f"rank {rank} did not stop"
        assert nan[rank]["steps"] == 2 and nan[rank]["training_steps"] == 3  # stopped at step 2, before its update
        assert " at step 2 (epoch 0, batch 2)" in nan[rank]["error"]
    assert nan[1]["error"].startswith("loss is nan at step 2")  # the rank whose loss is nan names it
    assert nan[0]["error"].startswith("loss is not finite on another rank at step 2")  # the other rank says so
