"""EfficiencyMonitor: counts, FLOPs, time-to-target, summary JSON, hook, resume, exception safety."""

from __future__ import annotations

import csv
import json
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from lightning_efficient import BertMLM, ConfigurationError, Translation, ViTClassifier
from lightning_efficient.compare import load_summary
from lightning_efficient.monitor import EfficiencyMonitor, batch_counts, measure_peak_flops
from lightning_efficient.testing import quiet_trainer

VOCAB, WIDTH, OUT, SEQ = 23, 12, 7, 9
SUMMARY_KEYS = {
    "version", "run_name", "device", "precision", "world_size", "steps", "samples", "tokens", "wall_time_s",
    "train_time_s", "samples_per_s", "tokens_per_s", "flops_per_step", "total_flops", "achieved_flops_per_s",
    "peak_flops_per_s", "peak_flops_source", "mfu", "peak_memory_bytes", "memory_kind", "monitor", "mode", "target",
    "final_metrics", "history",
}  # fmt: skip


def texts(n: int = 12) -> list[dict[str, torch.Tensor]]:
    """Padded token rows of lengths 3..9: every batch has its own token count."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        length = 3 + (i * 5) % 7
        mask = (torch.arange(SEQ) < length).long()
        rows.append({"input_ids": torch.randint(1, VOCAB, (SEQ,), generator=generator) * mask, "attention_mask": mask})
    return rows


def loader(n: int = 12) -> DataLoader:
    return DataLoader(texts(n), batch_size=2, shuffle=False)


def batch_tokens(n: int = 12) -> list[int]:
    return [int(batch["attention_mask"].sum()) for batch in loader(n)]


def tokens_after(steps: int, per_epoch: int = 6) -> int:
    """Real tokens of the first ``steps`` batches, epochs repeating the loader's order."""
    tokens = batch_tokens()[:per_epoch]
    return sum(tokens[i % per_epoch] for i in range(steps))


class Tiny(pl.LightningModule):
    """Embedding + one linear layer; validation logs a scripted ``val/loss`` chosen by the step.

    FLOPs per step: the linear layer on every position, trained and fed by a trained embedding:
    3 x 2 x B x T x WIDTH x OUT.
    """

    def __init__(
        self, script: dict[int, float] | None = None, fail_at_step: int | None = None, checkpointed: bool = False
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.head = nn.Linear(WIDTH, OUT)
        self.script = script or {}
        self.fail_at_step = fail_at_step
        self.checkpointed = checkpointed

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hidden = self.embed(batch["input_ids"])  # (B, T, WIDTH)
        if self.checkpointed:  # the backward runs self.head again: recomputation, not model FLOPs
            out = torch.utils.checkpoint.checkpoint(self.head, hidden, use_reentrant=False)
        else:
            out = self.head(hidden)  # (B, T, OUT)
        if self.global_step == self.fail_at_step:
            raise RuntimeError("training_step failed on purpose")
        return out.pow(2).mean()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        # The sanity check logs a value that would reach any target: the monitor must ignore it.
        value = -100.0 if self.trainer.sanity_checking else self.script.get(self.global_step, 10.0)
        self.log("val/loss", value)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def tiny_step_flops(batch_size: int = 2) -> int:
    return 3 * 2 * batch_size * SEQ * WIDTH * OUT


def trainer(root: str, callbacks: list[Callback], **kwargs) -> pl.Trainer:
    defaults = {"default_root_dir": root, "log_every_n_steps": 1, "limit_val_batches": 1, "accelerator": "cpu"}
    return quiet_trainer(callbacks=callbacks, **{**defaults, **kwargs})


# -- arguments -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"mode": "lowest"}, "mode='lowest'"),
        ({"monitor": ""}, "monitor=''"),
        ({"target": float("nan")}, "target=nan"),
        ({"target": "0.5"}, "target='0.5'"),
        ({"peak_flops": 0}, "peak_flops=0"),
        ({"peak_flops": -1e12}, "peak_flops=-1000000000000.0"),
        ({"window": 0}, "window=0"),
        ({"window": 2.5}, "window=2.5"),
        ({"summary_file": " "}, "summary_file=' '"),
    ],
)
def test_bad_arguments_are_named(kwargs, named):
    with pytest.raises(ConfigurationError) as error:
        EfficiencyMonitor(**kwargs)
    assert named in str(error.value)


# -- counting ---------------------------------------------------------------------------------------
def test_batch_counts_heuristic_and_model_overrides():
    ids = torch.tensor([[2, 7, 3, 0], [2, 5, 6, 3]])
    mask = (ids != 0).long()
    assert batch_counts({"input_ids": ids, "attention_mask": mask}) == (2, 7)
    assert batch_counts({"input_ids": ids}) == (2, 8)
    assert batch_counts((ids, torch.zeros(2))) == (2, 8)  # 2-D integer tensor: tokens
    assert batch_counts([torch.zeros(5, 3), torch.zeros(5)]) == (5, 5)  # features: one token per sample
    translation = Translation(vocab_size=50, preset="tiny")
    labels = torch.tensor([[9, 8, 3], [7, 3, -100]])
    samples, tokens = translation.count_batch({"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert (samples, int(tokens)) == (2, 7 + 5)
    vit = ViTClassifier(num_labels=3, preset="tiny", image_size=28, patch_size=4)
    assert vit.count_batch({"pixel_values": torch.zeros(3, 1, 28, 28), "labels": torch.zeros(3)}) == (3, 3 * 50)
    bert = BertMLM(vocab_size=50, preset="tiny")
    samples, tokens = bert.count_batch({"input_ids": ids, "attention_mask": mask})
    assert (samples, int(tokens)) == (2, 7)


def test_measured_peak_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_EFFICIENT_CACHE", str(tmp_path))
    peak = measure_peak_flops("cpu")
    cached = json.loads((tmp_path / "peak_flops.json").read_text())
    assert list(cached.values()) == [peak] and "float32" in next(iter(cached))
    assert measure_peak_flops("cpu") == peak  # read back, not measured again


# -- FLOPs of a real model ---------------------------------------------------------------------------
class BatchRecorder(Callback):
    """Keeps each batch and the masking generator state at the step's start, and the monitor's count."""

    def __init__(self, monitor: EfficiencyMonitor) -> None:
        self.monitor = monitor
        self.batches, self.states, self.flops = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({k: v.clone() for k, v in batch.items()})
        self.states.append(pl_module.mask_generator.get_state())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.flops.append(self.monitor.last_step["flops"])


def test_flops_per_step_of_a_fitted_bert_equal_flop_counter_mode(root):
    torch.manual_seed(0)
    model = BertMLM(vocab_size=VOCAB + 10, preset="tiny", max_length=SEQ)
    monitor = EfficiencyMonitor(peak_flops=1e11)
    recorder = BatchRecorder(monitor)
    trainer(root, [monitor, recorder], max_steps=3).fit(model, loader())
    model.train()
    for batch, state, counted in zip(recorder.batches, recorder.states, recorder.flops, strict=True):
        generator = torch.Generator()
        generator.set_state(state)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as reference:
            loss, _, _ = model._step(batch, generator)  # the step's masks: same masked positions, same head FLOPs
            loss.backward()
        assert counted == reference.get_total_flops()
    assert monitor.summary["total_flops"] == sum(recorder.flops)
    assert monitor.summary["tokens"] == tokens_after(3)


# -- time-to-target and the summary ------------------------------------------------------------------
def test_time_to_target_on_a_scripted_metric(root):
    script = {2: 5.0, 4: 3.5, 6: 2.9, 8: 3.1, 10: 1.0}  # validation every 2 steps
    monitor = EfficiencyMonitor(target=3.0, peak_flops=1e11)
    trainer(root, [monitor], max_steps=10, val_check_interval=2).fit(Tiny(script), loader(), loader())
    target = monitor.summary["target"]
    assert target["reached"] and target["value"] == 3.0
    assert target["step"] == 6 and target["tokens"] == tokens_after(6)
    history = monitor.summary["history"]
    assert [(p["step"], p["tokens"], p["value"]) for p in history] == [
        (s, tokens_after(s), pytest.approx(v)) for s, v in script.items()
    ]
    assert 0 < target["train_time_s"] <= target["wall_time_s"]
    assert target["train_time_s"] == history[2]["train_time_s"]


def test_target_of_a_max_metric_never_reached(root):
    monitor = EfficiencyMonitor(target=0.5, mode="max", peak_flops=1e11)
    trainer(root, [monitor], max_steps=4, val_check_interval=2).fit(Tiny({2: 0.2, 4: 0.4}), loader(), loader())
    assert monitor.summary["target"] == {
        "value": 0.5, "reached": False, "step": None, "wall_time_s": None, "train_time_s": None, "tokens": None
    }  # fmt: skip
    assert [p["value"] for p in monitor.summary["history"]] == [pytest.approx(0.2), pytest.approx(0.4)]


def test_summary_json_follows_the_schema(root):
    monitor = EfficiencyMonitor(target=3.0, peak_flops=2e11, summary_file="eff.json")
    trainer(root, [monitor], max_steps=4, val_check_interval=2).fit(Tiny({2: 4.0, 4: 2.0}), loader(), loader())
    with open(os.path.join(root, "eff.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    assert set(summary) == SUMMARY_KEYS
    tokens = tokens_after(4)
    assert summary["version"] == 2 and summary["run_name"] == "run" and summary["world_size"] == 1
    assert summary["device"].startswith("cpu") and summary["precision"] == "32-true"
    assert (summary["steps"], summary["samples"], summary["tokens"]) == (4, 8, tokens)
    assert summary["total_flops"] == 4 * tiny_step_flops() and summary["flops_per_step"] == tiny_step_flops()
    assert summary["tokens_per_s"] == pytest.approx(tokens / summary["train_time_s"])
    assert summary["samples_per_s"] == pytest.approx(8 / summary["train_time_s"])
    assert summary["achieved_flops_per_s"] == pytest.approx(summary["total_flops"] / summary["train_time_s"])
    assert summary["mfu"] == pytest.approx(summary["achieved_flops_per_s"] / 2e11)
    assert summary["peak_flops_per_s"] == 2e11 and summary["peak_flops_source"] == "given"
    assert 0 < summary["train_time_s"] <= summary["wall_time_s"]
    assert summary["memory_kind"] in ("process_peak_rss", "ru_maxrss") and summary["peak_memory_bytes"] > 0
    assert (summary["monitor"], summary["mode"]) == ("val/loss", "min")
    assert set(summary["target"]) == {"value", "reached", "step", "wall_time_s", "train_time_s", "tokens"}
    assert summary["target"]["step"] == 4
    assert summary["final_metrics"]["val/loss"] == pytest.approx(2.0)
    assert summary["final_metrics"]["efficiency/flops_per_step"] == tiny_step_flops()
    logged = {"efficiency/tokens_per_s", "efficiency/samples_per_s", "efficiency/mfu", "efficiency/peak_memory_gb"}
    assert logged <= set(summary["final_metrics"])
    point_keys = {"step", "wall_time_s", "train_time_s", "tokens", "value", "flops"}
    assert [set(point) for point in summary["history"]] == [point_keys] * 2
    assert [point["flops"] for point in summary["history"]] == [2 * tiny_step_flops(), 4 * tiny_step_flops()]
    assert load_summary(os.path.join(root, "eff.json")) == summary  # what `compare` reads, it accepts


def test_logs_on_logging_steps_and_when_the_target_is_reached(root):
    monitor = EfficiencyMonitor(target=3.0, peak_flops=1e11)
    logger = CSVLogger(root, name="csv", version=0)
    run = trainer(root, [monitor], max_steps=4, val_check_interval=2, log_every_n_steps=2, logger=logger)
    run.fit(Tiny({2: 4.0, 4: 2.5}), loader(), loader())
    with open(os.path.join(logger.log_dir, "metrics.csv"), encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    flops_steps = [int(row["step"]) for row in rows if row.get("efficiency/flops_per_step")]
    assert flops_steps == [1, 3]  # logging steps 2 and 4 (Lightning's 0-based logger step)
    assert [float(row["efficiency/flops_per_step"]) for row in rows if row.get("efficiency/flops_per_step")] == [
        tiny_step_flops()
    ] * 2
    assert all(row.get("efficiency/mfu") for row in rows if row.get("efficiency/flops_per_step"))
    (reached,) = [row for row in rows if row.get("efficiency/target_tokens")]
    assert int(float(reached["efficiency/target_tokens"])) == tokens_after(4) == monitor.summary["target"]["tokens"]
    assert float(reached["efficiency/target_wall_s"]) == pytest.approx(monitor.summary["target"]["wall_time_s"])


def test_activation_checkpointing_recomputation_is_not_counted(root):
    monitor = EfficiencyMonitor(peak_flops=1e11)
    trainer(root, [monitor], max_steps=2).fit(Tiny(checkpointed=True), loader())
    assert monitor.summary["flops_per_step"] == tiny_step_flops()


# -- technique hook ----------------------------------------------------------------------------------
class ScalesFlops(Callback):
    """A technique reporting work the counter cannot see; records what it was given."""

    def __init__(self, factor: float, extra: float) -> None:
        self.factor, self.extra, self.received = factor, extra, []

    def adjust_step_flops(self, trainer, pl_module, flops: float) -> float:
        self.received.append(flops)
        return flops * self.factor + self.extra


def test_adjust_step_flops_is_applied_in_callback_order(root):
    first, second = ScalesFlops(2.0, 0.0), ScalesFlops(1.0, 1000.0)
    monitor = EfficiencyMonitor(peak_flops=1e11)
    trainer(root, [first, monitor, second], max_steps=3).fit(Tiny(), loader())
    step = tiny_step_flops()
    assert first.received == [step] * 3
    assert second.received == [2 * step] * 3
    assert monitor.summary["total_flops"] == 3 * (2 * step + 1000)


# -- resume ------------------------------------------------------------------------------------------
def test_resumed_totals_equal_the_uninterrupted_run(tmp_path):
    script = {3: 4.0, 6: 2.0}  # validation at the end of each 3-batch epoch

    def fit(root, max_steps, ckpt_path=None, save=False):
        monitor = EfficiencyMonitor(target=3.0, peak_flops=1e11)
        callbacks = [monitor]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1))  # after validation
        run = trainer(str(root), callbacks, max_steps=max_steps, limit_train_batches=3, enable_checkpointing=save)
        run.fit(Tiny(script), loader(), loader(), ckpt_path=ckpt_path)
        return monitor.summary

    whole = fit(tmp_path / "whole", 6)
    fit(tmp_path / "first", 3, save=True)
    (checkpoint,) = (tmp_path / "ckpt").iterdir()
    state = torch.load(checkpoint, weights_only=True)  # plain values only
    assert any(key.startswith("EfficiencyMonitor") for key in state["callbacks"])
    resumed = fit(tmp_path / "resumed", 6, ckpt_path=str(checkpoint))
    for key in ("steps", "samples", "tokens", "total_flops", "flops_per_step"):
        assert resumed[key] == whole[key], key
    points = [[(p["step"], p["tokens"]) for p in summary["history"]] for summary in (resumed, whole)]
    assert points[0] == points[1] == [(3, tokens_after(3, per_epoch=3)), (6, tokens_after(6, per_epoch=3))]
    assert (resumed["target"]["step"], resumed["target"]["tokens"]) == (6, tokens_after(6, per_epoch=3))
    assert resumed["wall_time_s"] > resumed["history"][0]["wall_time_s"]  # the first run's time is carried


# -- exception safety --------------------------------------------------------------------------------
def test_counting_mode_is_popped_when_training_step_raises(root):
    monitor = EfficiencyMonitor(peak_flops=1e11)
    with pytest.raises(RuntimeError, match="on purpose"):
        trainer(root, [monitor], max_steps=4).fit(Tiny(fail_at_step=2), loader())
    assert torch._C._len_torch_function_stack() == 0
    assert not monitor._counting
    assert monitor.counter.flops == tiny_step_flops()  # the failing step's forward, up to the raise
    nn.Linear(4, 4)(torch.randn(2, 4))
    assert monitor.counter.flops == tiny_step_flops()  # nothing after it is counted
