"""ProgressiveStacking: the schedule checks, exact copies, optimizer state by name, skipped blocks.

Exact resume before, at and after a growth step, composition and DDP are checked by the contract
suite (row ``progressive_stacking`` in ``techniques.py``).
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from techniques import tiny_family
from torch import nn
from transformers.models.bert.modeling_bert import BertLayer

from lightning_efficient.callbacks.progressive_stacking import ProgressiveStacking, grow_blocks, growth_sources, validate_stages
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.flops import count_flops


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
    state_before = {(i, n): copy.deepcopy(optimizer.state[p]) for i in range(4) for n, p in blocks[i].named_parameters()}
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

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self.weights[step] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        optimizer = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.state_keys[step] = {names[id(p)] for p, s in optimizer.state.items() if s}


def test_training_grows_at_the_scheduled_step(monkeypatch: pytest.MonkeyPatch, user_files: dict, tmp_path: Any) -> None:
    calls: list[bool] = []
    original = BertLayer.forward
    monkeypatch.setattr(BertLayer, "forward", lambda self, *a, **k: calls.append(self.training) or original(self, *a, **k))
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
