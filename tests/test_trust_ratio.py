"""TrustRatioMonitor: logged norms equal the test's own from weight snapshots, any optimizer, bf16, cheap, bad input."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_efficient.callbacks.trust_ratio import TrustRatioMonitor
from lightning_efficient.errors import ConfigurationError, NoTargetModulesError
from lightning_efficient.optim import LAMB, Lion

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01),
    "lamb": lambda params: LAMB(params, lr=1e-2),
    "lion": lambda params: Lion(params, lr=1e-3, weight_decay=0.1),
}


class Toy(pl.LightningModule):
    """Two linear layers (odd sizes) with a zero-initialised bias; optionally a TransformerEncoder."""

    def __init__(self, optimizer: str = "sgd", encoder: bool = False) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        nn.init.zeros_(self.net[0].bias)
        layer = nn.TransformerEncoderLayer(d_model=5, nhead=1, dim_feedforward=9, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False) if encoder else None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0]
        if self.encoder is not None:
            x = self.encoder(x.unsqueeze(1)).squeeze(1)
        return (self.net(x) - 1.0).pow(2).mean()

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        data = torch.randn(48, 5, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.optimizer_name](self.parameters())


class WeightSnapshots(Callback):
    """The test's own record: every parameter before each optimizer step and after it, and LAMB's ratios."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.trust: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.before[trainer.global_step + 1] = {n: p.detach().float().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        self.after[step] = {n: p.detach().float().clone() for n, p in pl_module.named_parameters()}
        state = trainer.optimizers[0].state
        self.trust[step] = {
            n: float(state[p]["trust_ratio"])
            for n, p in pl_module.named_parameters()
            if "trust_ratio" in state.get(p, {})
        }


def fit(
    monitor: TrustRatioMonitor, root: Path, steps: int, *callbacks: Callback, model: Toy | None = None, **kwargs: Any
) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=steps, logger=CSVLogger(root), log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=[monitor, *callbacks], **kwargs,
    )  # fmt: skip
    trainer.fit(model or Toy())
    return trainer


def logged(trainer: pl.Trainer) -> dict[int, dict[str, float]]:
    """The CSV logger's rows, merged per step."""
    trainer.logger.save()
    rows: dict[int, dict[str, float]] = {}
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            values = {k: float(v) for k, v in row.items() if k not in ("step", "epoch") and v}
            rows.setdefault(int(row["step"]), {}).update(values)
    return rows


def norm(t: torch.Tensor) -> float:
    return math.sqrt(float((t.double() ** 2).sum()))


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_logs_equal_norms_computed_from_weight_snapshots(optimizer: str, tmp_path: Path) -> None:
    snapshots = WeightSnapshots()
    trainer = fit(TrustRatioMonitor(every_n_steps=2, include_1d=True), tmp_path, 5, snapshots, model=Toy(optimizer))
    rows = logged(trainer)
    assert sorted(rows) == [2, 4]  # steps 2 and 4 of 5
    names = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    for step, row in rows.items():
        ratios = []
        for name in names:
            before, after = snapshots.before[step][name], snapshots.after[step][name]
            weight, update = norm(before), norm(after - before)
            assert update > 0, name  # every optimizer moved every tensor
            assert row[f"trust_ratio/{name}/weight_norm"] == pytest.approx(weight, rel=1e-5), (step, name)
            assert row[f"trust_ratio/{name}/update_norm"] == pytest.approx(update, rel=1e-4), (step, name)
            assert row[f"trust_ratio/{name}/ratio"] == pytest.approx(update / weight, rel=1e-4), (step, name)
            ratios.append(update / weight)
            if optimizer == "lamb":  # LAMB keeps its trust ratio per parameter: logged as it was after the step
                assert row[f"trust_ratio/{name}/trust_ratio"] == pytest.approx(snapshots.trust[step][name], rel=1e-6)
            else:
                assert f"trust_ratio/{name}/trust_ratio" not in row
        assert row["trust_ratio/ratio_median"] == pytest.approx(statistics.median(ratios), rel=1e-4)
        assert row["trust_ratio/ratio_max"] == pytest.approx(max(ratios), rel=1e-4)
        assert len(row) == 4 * 3 + 2 + (4 if optimizer == "lamb" else 0)
    assert trainer.callbacks[0].reports == 2


def test_no_snapshot_on_other_steps(tmp_path: Path) -> None:
    monitor = TrustRatioMonitor(every_n_steps=3)

    class Spy(Callback):  # runs after the monitor in each hook
        def __init__(self) -> None:
            self.copied: dict[int, bool] = {}

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            self.copied[trainer.global_step] = monitor._snapshot is not None

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            assert monitor._snapshot is None  # released right after the report

    spy = Spy()
    trainer = fit(monitor, tmp_path, 7, spy, accumulate_grad_batches=2)
    assert spy.copied == {s: s in (2, 5) for s in range(7)}  # optimizer steps 3 and 6 only
    assert sorted(logged(trainer)) == [3, 6] and monitor.reports == 2
    per_tensor = {f"trust_ratio/net.{i}.weight/{k}" for i in (0, 2) for k in ("weight_norm", "update_norm", "ratio")}
    assert set(monitor.latest) == per_tensor | {"trust_ratio/ratio_median", "trust_ratio/ratio_max"}


def test_zero_weight_has_no_ratio_and_nothing_is_nan(tmp_path: Path) -> None:
    """The zero-initialised bias at step 1: weight norm 0, ratio undefined (left out), no NaN anywhere."""
    trainer = fit(
        TrustRatioMonitor(every_n_steps=1, params=["net.0.*"], include_1d=True), tmp_path, 1, model=Toy("lamb")
    )
    row = logged(trainer)[1]
    assert row["trust_ratio/net.0.bias/weight_norm"] == 0.0 and row["trust_ratio/net.0.bias/update_norm"] > 0
    assert "trust_ratio/net.0.bias/ratio" not in row
    assert row["trust_ratio/ratio_max"] == row["trust_ratio/net.0.weight/ratio"]
    assert all(math.isfinite(v) for v in row.values()) and not any("net.2" in k for k in row)


def test_bf16_mixed_logs_finite_fp32_norms(tmp_path: Path) -> None:
    snapshots = WeightSnapshots()
    trainer = fit(TrustRatioMonitor(every_n_steps=2), tmp_path, 2, snapshots, model=Toy("lamb"), precision="bf16-mixed")
    row = logged(trainer)[2]
    before, after = snapshots.before[2]["net.2.weight"], snapshots.after[2]["net.2.weight"]
    assert row["trust_ratio/net.2.weight/update_norm"] == pytest.approx(norm(after - before), rel=1e-4)
    assert row["trust_ratio/net.2.weight/trust_ratio"] == pytest.approx(snapshots.trust[2]["net.2.weight"], rel=1e-6)
    assert all(math.isfinite(v) for v in row.values())


def test_block_aggregation_combines_the_blocks_tensors(tmp_path: Path) -> None:
    snapshots = WeightSnapshots()
    monitor = TrustRatioMonitor(every_n_steps=2, aggregate="block")
    trainer = fit(monitor, tmp_path, 2, snapshots, model=Toy("adamw", encoder=True))
    row = logged(trainer)[2]
    for block in ("encoder.layers.0", "encoder.layers.1"):
        names = [n for n, p in trainer.lightning_module.named_parameters() if n.startswith(block + ".") and p.ndim >= 2]
        before, after = snapshots.before[2], snapshots.after[2]
        weight = math.sqrt(sum(norm(before[n]) ** 2 for n in names))
        update = math.sqrt(sum(norm(after[n] - before[n]) ** 2 for n in names))
        assert len(names) == 4  # in_proj, out_proj, linear1, linear2
        assert row[f"trust_ratio/{block}/weight_norm"] == pytest.approx(weight, rel=1e-5)
        assert row[f"trust_ratio/{block}/update_norm"] == pytest.approx(update, rel=1e-4)
        assert row[f"trust_ratio/{block}/ratio"] == pytest.approx(update / weight, rel=1e-4)
    assert {k.split("/")[1] for k in row if k.count("/") == 2} == {
        "encoder.layers.0",
        "encoder.layers.1",
        "net.0.weight",
        "net.2.weight",
    }


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "every_n_steps=0 must be >= 1"),
        ({"every_n_steps": -5}, "every_n_steps=-5 must be >= 1"),
        ({"aggregate": "layer"}, "aggregate='layer' is unknown; choose one of: 'tensor', 'block'"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        TrustRatioMonitor(**kwargs)


def test_pattern_matching_nothing_fails_before_training(tmp_path: Path) -> None:
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        NoTargetModulesError, match=r"no trainable matrix .* matched params pattern '\*attention\*' in Toy; candidates: net\.0\.weight, net\.2\.weight"
    ):
        fit(TrustRatioMonitor(params=["net.*", "*attention*"]), tmp_path, 2, model=model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(NoTargetModulesError, match="include_1d=False"):  # biases are not candidates by default
        fit(TrustRatioMonitor(params=["*.bias"]), tmp_path, 2, model=Toy())
    with pytest.raises(NoTargetModulesError, match="Toy"):  # no Transformer block to aggregate over
        fit(TrustRatioMonitor(aggregate="block"), tmp_path, 2, model=Toy())
