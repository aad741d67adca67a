"""LayerDrop: the schedules' formulas, blocks really skipped, rescaling, keys, FLOPs, bad input.

Exact resume, composition with the other techniques and identical drops on two DDP ranks are
checked by the contract suite (row ``layer_drop`` in ``techniques.py``).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from techniques import tiny_family
from torch import nn
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.marian.modeling_marian import MarianDecoderLayer, MarianEncoderLayer

from lightning_efficient.blocks import find_block_stacks
from lightning_efficient.callbacks.layer_drop import LayerDrop, keep_probabilities, progressive_theta
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.flops import count_flops
from lightning_efficient.technique import check_unused_parameters_allowed
from lightning_efficient.testing import quiet_trainer


def count_calls(monkeypatch: pytest.MonkeyPatch, layer_class: type) -> list[bool]:
    """Patch ``layer_class.forward`` to record each call's ``training`` flag."""
    calls: list[bool] = []
    original = layer_class.forward

    def counting(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(self.training)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(layer_class, "forward", counting)
    return calls


def trainer(callbacks: list[Callback], steps: int, root: Any, **kwargs: Any) -> pl.Trainer:
    return quiet_trainer(max_steps=steps, limit_val_batches=0, default_root_dir=root, callbacks=callbacks, **kwargs)


# -- schedules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [0, 7, 50])
def test_keep_probabilities_follow_the_papers_formulas(step: int) -> None:
    depth, rate, gamma = 6, 0.3, 0.05
    assert keep_probabilities("fixed", rate, depth, step).tolist() == pytest.approx([0.7] * depth)
    assert keep_probabilities("linear", rate, depth, step).tolist() == pytest.approx(
        [1 - rate * l / depth for l in range(1, 7)]
    )
    # Zhang & He: (1 - theta_bar) e^(-gamma t) + theta_bar
    theta = (1 - (1 - rate)) * math.exp(-gamma * step) + (1 - rate)
    assert progressive_theta(step, rate, gamma) == pytest.approx(theta)
    expected = [1 - l / depth * (1 - theta) for l in range(1, 7)]
    assert keep_probabilities("progressive", rate, depth, step, gamma).tolist() == pytest.approx(expected)


def test_average_keep_of_half_for_the_benchmark_settings() -> None:
    """The benchmark's settings: fixed 0.5 and linear 0.8 on 4 blocks both keep half on average."""
    assert float(keep_probabilities("fixed", 0.5, 4).mean()) == pytest.approx(0.5)
    assert float(keep_probabilities("linear", 0.8, 4).mean()) == pytest.approx(1 - 0.8 * 5 / 8)


# -- the blocks are really skipped --------------------------------------------------------------
def test_dropped_blocks_are_not_called_and_evaluation_runs_all(
    monkeypatch: pytest.MonkeyPatch, user_files: dict, tmp_path: Any
) -> None:
    calls = count_calls(monkeypatch, BertLayer)
    model, dm = tiny_family("bert", user_files)
    drop = LayerDrop(drop_rate=0.5, seed=11)
    t = trainer([drop], steps=6, root=tmp_path, limit_train_batches=6, num_sanity_val_steps=0)
    t.fit(model, dm)
    training_calls = sum(calls)
    assert drop.block_slots == 6 * 3
    assert training_calls == drop.kept_blocks  # each kept block ran once per step, dropped ones never
    assert 0 < drop.kept_blocks < drop.block_slots
    calls.clear()
    validator = trainer([drop], steps=1, root=tmp_path)
    validator.limit_val_batches = 2
    validator.validate(model, dm, verbose=False)
    assert drop.is_applied is False and calls == [False] * 6  # 2 batches x every block, in eval mode


def test_both_stacks_of_translation_drop_and_counts_match(
    monkeypatch: pytest.MonkeyPatch, user_files: dict, tmp_path: Any
) -> None:
    encoder_calls = count_calls(monkeypatch, MarianEncoderLayer)
    decoder_calls = count_calls(monkeypatch, MarianDecoderLayer)
    model, dm = tiny_family("mt", user_files)

    class Kept(Callback):
        def __init__(self) -> None:
            self.kept = [0, 0]

        def on_train_batch_start(self, *args: Any) -> None:
            for stack in (0, 1):
                self.kept[stack] += int(drop._kept[stack].sum())

    drop, kept = LayerDrop(drop_rate=0.6, schedule="linear", seed=2), Kept()
    trainer([drop, kept], steps=5, root=tmp_path, num_sanity_val_steps=0).fit(model, dm)
    assert len(drop._depths) == 2
    assert sum(encoder_calls) == kept.kept[0] and sum(decoder_calls) == kept.kept[1]
    assert kept.kept[0] + kept.kept[1] == drop.kept_blocks < drop.block_slots == 5 * 6


def test_same_seed_same_drops_and_state_round_trip() -> None:
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 5, enable_nested_tensor=False)
    first, second = LayerDrop(0.5, seed=4), LayerDrop(0.5, seed=4)
    fake = SimpleNamespace(global_step=0)
    pl_module = SimpleNamespace(log_dict=lambda *a, **k: None)
    for technique in (first, second):
        technique.attach(model)
        technique.detach(model)
        technique._depths = [5]
    draws = []
    for technique in (first, second):
        seq = []
        for _ in range(4):
            technique.on_train_batch_start(fake, pl_module, None, 0)
            seq.append(technique._kept[0].tolist())
        draws.append(seq)
    assert draws[0] == draws[1]
    restored = LayerDrop(0.5, seed=99)
    restored.load_state_dict(second.state_dict())
    restored._depths = [5]
    first.on_train_batch_start(fake, pl_module, None, 0)
    restored.on_train_batch_start(fake, pl_module, None, 0)
    assert torch.equal(first._kept[0], restored._kept[0])


def test_each_step_draws_with_that_steps_keep_probabilities() -> None:
    """Fixed and linear probabilities are computed once, PLD's at every step, and changed settings are picked up."""
    logged: list[float] = []
    pl_module = SimpleNamespace(log_dict=lambda metrics, **kwargs: logged.append(metrics["layer_drop/expected_keep"]))
    drop = LayerDrop(0.5, schedule="progressive", gamma=0.1, seed=3)
    drop._depths = [4]
    generator = torch.Generator().manual_seed(3)
    settings = [("progressive", 0.5, step) for step in (0, 0, 3, 10)] + [("linear", 0.8, 11), ("linear", 0.8, 12)]
    for schedule, rate, step in settings:
        drop.schedule, drop.drop_rate = schedule, rate
        drop.on_train_batch_start(SimpleNamespace(global_step=step), pl_module, None, 0)
        keep = keep_probabilities(schedule, rate, 4, step, 0.1)
        assert torch.equal(drop._kept[0], torch.rand(4, generator=generator, dtype=torch.float64) < keep)
        assert logged[-1] == pytest.approx(float(keep.mean()))
    assert logged[-1] == pytest.approx(0.5) and logged[0] == 1.0 and 0.5 < logged[2] < 1.0


# -- outputs, rescaling, keys --------------------------------------------------------------------
def encoder(depth: int = 3) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=13, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


@pytest.mark.parametrize("rescale", [False, True])
def test_output_equals_the_kept_blocks_run_in_order(rescale: bool) -> None:
    """The stack's output is the kept blocks composed (rescaled: x + (f(x) - x) / p)."""
    model = encoder()
    reference = encoder()
    drop = LayerDrop(drop_rate=0.5, schedule="linear", rescale=rescale)
    drop.attach(model)
    drop._keep = [keep_probabilities("linear", 0.5, 3)]
    drop._kept = [torch.tensor([True, False, True])]
    x = torch.randn(2, 5, 8)
    model.train()
    expected = x
    for i in (0, 2):
        out = reference.layers[i](expected)
        expected = expected + (out - expected) / float(drop._keep[0][i]) if rescale else out
    torch.testing.assert_close(model(x), expected)
    model.eval()  # evaluation: every block, no rescaling
    torch.testing.assert_close(model(x), reference.eval()(x))
    drop.detach(model)
    assert all("forward" not in vars(layer) for layer in model.layers)


def test_checkpoint_keys_unchanged() -> None:
    model = encoder()
    keys = list(model.state_dict())
    drop = LayerDrop(0.3)
    drop.attach(model)
    assert list(model.state_dict()) == keys


def test_flops_follow_the_blocks_that_ran() -> None:
    """The FLOP counter sees 1 of 3 blocks: what one block costs on the stack's input."""
    model, x = encoder(), torch.randn(2, 7, 8)
    model.train()
    _, full = count_flops(model, x)
    _, one_block = count_flops(model.layers[0], x)
    drop = LayerDrop(0.5)
    drop.attach(model)
    drop._keep, drop._kept = [torch.full((3,), 0.5)], [torch.tensor([False, True, False])]
    _, dropped = count_flops(model, x)
    assert 0 < dropped == one_block < full / 2.5


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drop_rate": 1.0}, r"drop_rate=1.0 must lie in \[0.0, 1.0\)"),
        ({"drop_rate": -0.1}, r"drop_rate=-0.1 must lie in \[0.0, 1.0\)"),
        ({"schedule": "cosine"}, "schedule='cosine' is unknown; choose one of: 'fixed', 'linear', 'progressive'"),
        ({"gamma": 0.0}, "gamma=0.0 must be > 0.0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        LayerDrop(**kwargs)


def test_ddp_without_find_unused_parameters_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="ddp_find_unused_parameters_true"):
        check_unused_parameters_allowed(SimpleNamespace(strategy=DDPStrategy()), "layer_drop")
    check_unused_parameters_allowed(SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True)), "layer_drop")


def test_user_block_paths_and_a_model_without_blocks(tmp_path: Any) -> None:
    class Own(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x

    own = Own()
    drop = LayerDrop(0.5, block_paths=["blocks"])
    drop.attach(own)
    drop._keep, drop._kept = [torch.full((3,), 0.5)], [torch.tensor([False, False, False])]
    x = torch.randn(2, 4)
    assert torch.equal(own(x), x)  # every block dropped: the input passes through
    assert [s.path for s in find_block_stacks(own, ["blocks"])] == ["blocks"]
    with pytest.raises(ValueError, match="Sequential"):
        LayerDrop(0.5).attach(nn.Sequential(nn.Linear(2, 2)))
