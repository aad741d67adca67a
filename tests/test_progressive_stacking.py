"""ProgressiveStacking: the schedule checks, exact copies, optimizer state by name, skipped blocks, MoGrow.

Exact resume before, at and after a growth step, composition and DDP are checked by the contract
suite (row ``progressive_stacking`` in ``techniques.py``); the exact resume of ``init="momentum"``
(whose moving average is part of the state) by the same check here.
"""

from __future__ import annotations

import copy
import io
import re
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from techniques import TechniqueCase, tiny_family
from torch import nn
from transformers.models.bert.modeling_bert import BertLayer

from lightning_efficient import BertMLM
from lightning_efficient.callbacks.progressive_stacking import (
    BlockEMA,
    ProgressiveStacking,
    grow_blocks,
    growth_sources,
)
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError
from lightning_efficient.flops import count_flops
from lightning_efficient.testing import quiet_trainer


def stack_of(depth: int) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 3)) for _ in range(depth))


def trained_optimizer(blocks: nn.ModuleList, depth: int) -> torch.optim.Optimizer:
    """AdamW over every block, after two steps that give only the first ``depth`` blocks gradients."""
    optimizer = torch.optim.AdamW(blocks.parameters(), lr=0.1)
    for _ in range(2):
        x = torch.randn(4, 3)
        for block in blocks[:depth]:
            x = x + block(x)
        x.square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize("rule", ["stack", "interleave"])
def test_growth_copies_weights_exactly_and_moves_optimizer_state_by_name(rule: str) -> None:
    blocks = stack_of(6)
    optimizer = trained_optimizer(blocks, depth=4)
    before = copy.deepcopy(blocks)
    state_before = {
        (i, n): copy.deepcopy(optimizer.state[p]) for i in range(4) for n, p in blocks[i].named_parameters()
    }
    grow_blocks(blocks, 4, 6, rule, optimizer)
    expected_order = {"stack": [(0, 1), (1, 1), (2, 1), (3, 1), (0, 0), (1, 0)],
                      "interleave": [(0, 1), (0, 0), (1, 1), (1, 0), (2, 1), (3, 1)]}[rule]  # fmt: skip
    for position, (source, original) in enumerate(expected_order):
        for name, param in blocks[position].named_parameters():
            assert torch.equal(param, dict(before[source].named_parameters())[name]), (position, name)
            if original:  # the trained block's moments came along with its weights
                state = optimizer.state[param]
                for key, value in state_before[(source, name)].items():
                    assert torch.equal(state[key], value), (position, name, key)
            else:  # a copy starts fresh
                assert param not in optimizer.state or not optimizer.state[param], (position, name)


def test_growth_sources_match_the_two_rules() -> None:
    assert growth_sources(2, 4, "stack") == [(0, True), (1, True), (0, False), (1, False)]  # Gong et al.: b0 b1 b0' b1'
    assert growth_sources(2, 4, "interleave") == [(0, True), (0, False), (1, True), (1, False)]


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ({5: 2, 10: 4}, "must give the starting depth at step 0"),
        ({0: 4, 10: 4}, "depth 4 at step 10 does not grow from 4"),
        ({0: 4, 10: 3}, "depth 3 at step 10 does not grow from 4"),
        ({0: 3, 10: 7}, "growing from 3 to 7 blocks at step 10 copies 4 blocks, but only 3 exist"),
        ({0: 0, 10: 1}, "depth 0 at step 0 must be >= 1"),
        ({0: 2, -3: 4}, "must give the starting depth|step -3 is negative"),
        ({}, "non-empty mapping"),
        ({0: "two"}, "integer steps to integer depths"),
    ],
)
def test_bad_schedules_are_refused_before_training(stages: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ProgressiveStacking(stages=stages)


def test_unknown_rule_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="rule='copy' is unknown; choose one of: 'stack', 'interleave'"):
        ProgressiveStacking({0: 1, 5: 2}, rule="copy")


@pytest.mark.parametrize(("stages", "word"), [({0: 2, 4: 4}, "grows past"), ({0: 1, 4: 2}, "stops short of")])
def test_schedule_must_end_at_the_configured_depth(stages: dict, word: str, user_files: dict, tmp_path: Any) -> None:
    model, dm = tiny_family("bert", user_files)
    grow = ProgressiveStacking(stages)
    trainer = pl.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[grow])  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigurationError, match=f"{word} the configured depth.*model.bert.encoder.layer has 3"):
        trainer.fit(model, dm)
    assert trainer.global_step == 0 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class Snapshot(Callback):
    """After the stacking callback's hook at each step: which blocks ran, the weights, the optimizer state."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.state_keys: dict[int, set[str]] = {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self.weights[step] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        optimizer = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.state_keys[step] = {names[id(p)] for p, s in optimizer.state.items() if s}


def test_training_grows_at_the_scheduled_step(monkeypatch: pytest.MonkeyPatch, user_files: dict, tmp_path: Any) -> None:
    calls: list[bool] = []
    original = BertLayer.forward
    monkeypatch.setattr(
        BertLayer, "forward", lambda self, *a, **k: calls.append(self.training) or original(self, *a, **k)
    )
    model, dm = tiny_family("bert", user_files)
    grow, snapshot = ProgressiveStacking({0: 2, 3: 3}, rule="stack"), Snapshot()
    trainer = pl.Trainer(max_steps=5, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[grow, snapshot])  # fmt: skip
    keys = list(model.state_dict())
    trainer.fit(model, dm)
    assert calls == [True] * (3 * 2 + 2 * 3)  # steps 0-2 run 2 blocks, steps 3-4 run 3
    assert list(model.state_dict()) == keys and grow.depth == 3
    layer = "model.bert.encoder.layer"
    at_growth, before = snapshot.weights[3], snapshot.weights[2]
    for key, value in at_growth.items():  # block 2 is now an exact copy of the trained block 0
        if key.startswith(f"{layer}.2."):
            assert torch.equal(value, at_growth[key.replace(f"{layer}.2.", f"{layer}.0.")]), key
            assert not torch.equal(value, before[key]), key
    untrained = {k for k in snapshot.state_keys[3] if k.startswith(f"{layer}.2.")}
    assert not untrained, "the copy must start without optimizer state"
    assert {k for k in snapshot.state_keys[3] if k.startswith(f"{layer}.0.")}, "trained blocks keep their state"
    assert {k for k in snapshot.state_keys[4] if k.startswith(f"{layer}.2.")}, "the copy trains after growth"


def test_inactive_blocks_cost_no_flops() -> None:
    """A 4-block stack at depth 2 costs what the same 2 blocks cost alone."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=11, batch_first=True)
    model = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
    shallow = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(2, 5, 8)
    grow = ProgressiveStacking({0: 2, 10: 4})
    grow.attach(model)
    _, flops = count_flops(model.train(), x)
    _, expected = count_flops(shallow.train(), x)
    assert flops == expected > 0
    model.eval()
    grow.depth = 4
    torch.testing.assert_close(model(x), nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).eval()(x))


# -- MoGrow: init="momentum" ----------------------------------------------------------------------
def block_weights(pl_module: pl.LightningModule, depth: int) -> dict[str, torch.Tensor]:
    """Copies of the parameters of BERT's blocks ``0 .. depth - 1``, keyed as BlockEMA keys them."""
    layers = pl_module.model.bert.encoder.layer
    return {f"0.{b}.{n}": p.detach().clone() for b in range(depth) for n, p in layers[b].named_parameters()}


class StepWeights(Callback):
    """The active blocks' weights as training starts and after each optimizer step; the batches seen."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.start: dict[str, torch.Tensor] = {}
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}
        self.batches = 0
        self._step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = block_weights(pl_module, self.depth)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batches += 1
        if trainer.global_step != self._step:  # the optimizer stepped in this batch
            self.after_step[trainer.global_step] = block_weights(pl_module, self.depth)


@pytest.mark.filterwarnings("ignore:progressive_stacking")  # the run ends before the growth at step 10
@pytest.mark.parametrize("accumulate", [1, 2])
def test_moving_average_follows_the_formula_once_per_optimizer_step(
    accumulate: int, monkeypatch: pytest.MonkeyPatch, user_files: dict, tmp_path: Any
) -> None:
    decay, steps = 0.6, 3
    updates: list[int] = []
    update = BlockEMA.update
    monkeypatch.setattr(BlockEMA, "update", lambda self, *args: updates.append(1) or update(self, *args))
    model, dm = tiny_family("bert", user_files)
    grow, seen = ProgressiveStacking({0: 2, 10: 3}, init="momentum", ema_decay=decay), StepWeights(depth=2)
    trainer = quiet_trainer(max_steps=steps, accumulate_grad_batches=accumulate, limit_val_batches=0,
                            default_root_dir=tmp_path, callbacks=[grow, seen])  # fmt: skip
    trainer.fit(model, dm)
    assert seen.batches == steps * accumulate and sorted(seen.after_step) == [1, 2, 3]
    assert len(updates) == steps, "one update per optimizer step, not per batch"
    reference = {key: value.clone() for key, value in seen.start.items()}  # the average starts at the weights
    for step in range(1, steps + 1):
        reference = {key: decay * value + (1 - decay) * seen.after_step[step][key] for key, value in reference.items()}
    average = grow.ema.state_dict()
    assert sorted(average) == sorted(reference), "the active blocks 0 and 1 only"
    for key, value in reference.items():
        assert average[key].dtype == torch.float32
        # lerp rounds differently from the formula (a few ulp); an update per batch would differ by ~1e-4
        torch.testing.assert_close(average[key], value, rtol=0, atol=1e-6, msg=key)
    assert max((average[key] - seen.after_step[steps][key]).abs().max() for key in average) > 1e-4, "not the weights"


class AroundGrowth(Callback):
    """After the stacking callback: weights of all 3 blocks and the average, at each batch's start and end."""

    def __init__(self, grow: ProgressiveStacking) -> None:
        self.grow = grow
        self.start: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        self.end: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    def _record(self, pl_module: pl.LightningModule) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        average = self.grow.ema.state_dict() if self.grow.ema is not None else {}
        return block_weights(pl_module, 3), {key: value.clone() for key, value in average.items()}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.start[trainer.global_step] = self._record(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.end[trainer.global_step] = self._record(pl_module)


@pytest.mark.parametrize("init", ["copy", "momentum"])
@pytest.mark.parametrize("rule", ["stack", "interleave"])
def test_momentum_growth_starts_copies_at_their_sources_average(
    rule: str, init: str, user_files: dict, tmp_path: Any
) -> None:
    model, dm = tiny_family("bert", user_files)
    grow = ProgressiveStacking({0: 2, 2: 3}, rule=rule, init=init, ema_decay=0.5)
    seen = AroundGrowth(grow)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[grow, seen])
    trainer.fit(model, dm)
    (weights, average), (grown, grown_average) = seen.end[2], seen.start[2]  # before and after the growth
    sources = growth_sources(2, 3, rule)
    assert [original for _, original in sources].count(False) == 1
    for position, (source, original) in enumerate(sources):
        names = [key.split(".", 2)[2] for key in grown if key.startswith(f"0.{position}.")]
        assert names
        for name in names:
            key, source_key = f"0.{position}.{name}", f"0.{source}.{name}"
            expected = average[source_key] if init == "momentum" and not original else weights[source_key]
            assert torch.equal(grown[key], expected), (position, name)
            if init == "momentum":  # every position's average is its source's
                assert torch.equal(grown_average[key], average[source_key]), (position, name)
    if init == "momentum":
        assert any(not torch.equal(average[key], weights[key]) for key in average), "the average is not the weights"
        final = grow.ema.state_dict()  # the copy averages on independently of its source
        assert len({value.data_ptr() for value in final.values()}) == len(final)
        assert sorted(final) == sorted(grown)
    else:
        assert grow.ema is None and not grown_average


def test_grow_blocks_copy_from_gives_the_copies_and_keeps_the_originals() -> None:
    blocks = stack_of(4)
    optimizer = trained_optimizer(blocks, depth=2)
    before = copy.deepcopy(blocks)
    states = [{n: torch.full_like(p, float(i + 1)) for n, p in blocks[i].named_parameters()} for i in range(2)]
    grow_blocks(blocks, 2, 4, "interleave", optimizer, copy_from=states)  # b0 b0' b1 b1'
    for position, (source, original) in enumerate(growth_sources(2, 4, "interleave")):
        for name, param in blocks[position].named_parameters():
            expected = dict(before[source].named_parameters())[name] if original else states[source][name]
            assert torch.equal(param, expected), (position, name)
            assert (param in optimizer.state and bool(optimizer.state[param])) == original, (position, name)
    with pytest.raises(ConfigurationError, match=r"copy_from\[0\] lacks '0.bias'"):
        grow_blocks(stack_of(4), 2, 4, "stack", copy_from=[{"0.weight": torch.zeros(5, 3)}, states[1]])
    with pytest.raises(ConfigurationError, match="copy_from has 1 block states, but growth copies block 1"):
        grow_blocks(stack_of(4), 2, 4, "stack", copy_from=states[:1])


@pytest.mark.parametrize("decay", [0, 1, -0.5, 1.5])
def test_ema_decay_outside_the_open_unit_interval_is_refused(decay: float) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(f"ema_decay={decay!r} must lie in (0.0, 1.0)")):
        ProgressiveStacking({0: 1, 5: 2}, init="momentum", ema_decay=decay)


def test_unknown_init_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="init='ema' is unknown; choose one of: 'copy', 'momentum'"):
        ProgressiveStacking({0: 1, 5: 2}, init="ema")


def momentum_stacking() -> ProgressiveStacking:
    """MoGrow on the tiny models' 3 blocks: 2, the third grown at step 2 between blocks 0 and 1."""
    return ProgressiveStacking({0: 2, 2: 3}, rule="interleave", init="momentum", ema_decay=0.9)


def test_momentum_state_loads_weights_only_and_restores_the_average(user_files: dict, tmp_path: Any) -> None:
    model, dm = tiny_family("bert", user_files)
    grow = momentum_stacking()
    assert ProgressiveStacking({0: 2, 2: 3}).state_dict() == {"depth": 2}  # init="copy": as before
    quiet_trainer(max_steps=3, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[grow]).fit(model, dm)
    buffer = io.BytesIO()
    torch.save(grow.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["depth"] == 3
    assert sorted(state["ema"]) == sorted(BlockEMA.keys([model.model.bert.encoder.layer], 3))
    fresh = momentum_stacking()
    fresh.attach(BertMLM(vocab_size=dm.vocab_size, max_length=33, preset="tiny"))
    assert sorted(fresh.ema.state_dict()) == sorted(BlockEMA.keys([model.model.bert.encoder.layer], 2))  # from apply
    fresh.load_state_dict(state)
    restored, saved = fresh.ema.state_dict(), grow.ema.state_dict()
    assert fresh.depth == 3 and sorted(restored) == sorted(saved)
    assert all(torch.equal(restored[key], saved[key]) for key in saved)
    with pytest.raises(CheckpointMismatchError, match="written with init='copy', but this run has init='momentum'"):
        momentum_stacking().load_state_dict({"depth": 2})
    with pytest.raises(CheckpointMismatchError, match="written with init='momentum', but this run has init='copy'"):
        ProgressiveStacking({0: 2, 2: 3}).load_state_dict(state)
    with pytest.raises(CheckpointMismatchError, match="moving average .* does not match the active blocks"):
        fresh.load_state_dict({"depth": 2, "ema": state["ema"]})


def test_momentum_resume_equals_uninterrupted_run(user_files: dict, tmp_path: Any) -> None:
    """Interrupted before, right before (the growth runs at step 2's batch) and after the growth, then resumed."""
    from test_contract import check_resume  # the contract suite's comparison (its row runs init="copy")

    case = TechniqueCase(
        id="progressive_stacking_momentum",
        build=momentum_stacking,
        yaml="",
    )
    full, (grow,) = check_resume([case], "bert", user_files, tmp_path, steps=4, interrupt_at=(1, 2, 3))
    assert grow.depth == 3 and sorted(full.final["techniques"]["progressive_stacking"]["ema"])
