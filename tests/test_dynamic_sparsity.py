"""DynamicSparsity (RigL, SET): exact per-layer sparsity, where weights grow, reset moments, bad input."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_efficient import BertMLM, MLMDataModule
from lightning_efficient.callbacks import DynamicSparsity, MagnitudePruning
from lightning_efficient.callbacks.dynamic_sparsity import drop_fraction_at, erk_densities, update_mask
from lightning_efficient.callbacks.pruning.masks import multiply_weights
from lightning_efficient.errors import ConfigurationError, NoTargetModulesError
from lightning_efficient.testing import quiet_trainer


class RecordUpdates(DynamicSparsity):
    """Keeps each update's masks, weights and optimizer state for the assertions."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.records = []

    def update(self, step, optimizer):
        before = {n: m.weight_mask.clone() for n, m in self._targets.items()}
        moved = super().update(step, optimizer)
        after = {n: m.weight_mask.clone() for n, m in self._targets.items()}
        weights = {n: m.weight.detach().clone() for n, m in self._targets.items()}
        moments = {n: {k: v.clone() for k, v in optimizer.state[m.weight].items() if torch.is_tensor(v)}
                   for n, m in self._targets.items()}  # fmt: skip
        self.records.append({"step": step, "before": before, "after": after, "weights": weights,
                             "moments": moments, "moved": moved})  # fmt: skip
        return moved


def fit(technique, steps: int = 6, tmp_path=None):
    pl.seed_everything(0)
    data = MLMDataModule(vocab_size=400, max_length=24, batch_size=4)
    model = BertMLM(vocab_size=400, preset="tiny", max_length=24, warmup_fraction=0.0)
    trainer = quiet_trainer(max_steps=steps, callbacks=[technique], limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, data)
    return model, trainer


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_every_update_keeps_each_layers_count_and_grown_weights_start_at_zero_with_no_moments(method):
    technique = RecordUpdates(method=method, sparsity=0.75, update_every=2, end_step=6, drop_fraction=0.5)
    fit(technique, steps=6)
    assert [r["step"] for r in technique.records] == [2, 4]
    for record in technique.records:
        assert record["moved"] > 0
        for name, before in record["before"].items():
            after = record["after"][name]
            assert int(after.sum()) == int(before.sum()) == round(0.25 * before.numel())  # exact, every layer
            grown = after.bool() & ~before.bool()
            assert torch.all(record["weights"][name][grown] == 0)
            assert torch.all(record["weights"][name][~after.bool()] == 0)  # masked weights are exact zeros
            for moment in record["moments"][name].values():
                if moment.shape == after.shape:
                    assert torch.all(moment[grown] == 0)
        assert any((r["after"][n] != r["before"][n]).any() for r in technique.records for n in r["after"])


def test_rigl_grows_where_the_dense_gradient_is_largest_and_drops_the_smallest_weights():
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    weight = torch.tensor([[0.9, -0.05, 0.4, 0.0, 0.0, 0.0]])
    gradient = torch.tensor([[9.0, 0.5, 9.0, 0.1, -3.0, 0.2]]).abs()  # the dropped weight's own gradient is small
    new, grown = update_mask(mask, weight, gradient, fraction=1 / 3)  # move 1 of 3
    assert new.int().tolist() == [[1, 0, 1, 0, 1, 0]]  # -0.05 dropped, |grad| 3.0 grown
    assert grown.int().tolist() == [[0, 0, 0, 0, 1, 0]]


def test_the_drop_fraction_decays_with_a_cosine_to_end_step():
    assert drop_fraction_at(0, 0.3, 1000) == pytest.approx(0.3)
    assert drop_fraction_at(250, 0.3, 1000) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert drop_fraction_at(1000, 0.3, 1000) == pytest.approx(0.0)
    assert drop_fraction_at(700, 0.3, 1000, "constant") == 0.3


def test_erk_densities_follow_the_formula_and_keep_the_overall_sparsity():
    shapes = {"a": (32, 37), "b": (37, 32), "c": (32, 32), "d": (5, 32)}
    densities, dense = erk_densities(shapes, 0.5)
    assert dense == ["d"] and densities["d"] == 1.0
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    assert densities["a"] / densities["c"] == pytest.approx(raw["a"] / raw["c"])
    kept = sum(densities[n] * math.prod(s) for n, s in shapes.items())
    assert kept == pytest.approx(0.5 * sum(math.prod(s) for s in shapes.values()))


def test_erk_warns_naming_the_layers_it_keeps_dense():
    model = BertMLM(vocab_size=60, preset="tiny")
    with pytest.warns(UserWarning, match="would give .* a density above 1"):
        DynamicSparsity(sparsity=0.02, distribution="erk").attach(model)


def test_initial_masks_have_the_exact_sparsity_and_training_starts_from_them():
    model = BertMLM(vocab_size=60, preset="tiny")
    technique = DynamicSparsity(sparsity=0.9)
    technique.attach(model)
    for name, sparsity in technique.layer_sparsity().items():
        numel = model.get_submodule(name).weight.numel()
        assert sparsity == pytest.approx(1 - round(0.1 * numel) / numel)
    multiply_weights(technique._targets.values())  # what on_train_start does
    for name in technique.layer_sparsity():
        module = model.get_submodule(name)
        assert torch.equal(module.weight != 0, module.weight_mask.bool())


def test_set_resumed_between_updates_draws_what_the_uninterrupted_run_draws(tmp_path):
    def run(callbacks, ckpt_path=None, seed=4):
        pl.seed_everything(0)
        data = MLMDataModule(vocab_size=400, max_length=24, batch_size=4)
        model = BertMLM(vocab_size=400, preset="tiny", max_length=24, warmup_fraction=0.0)
        technique = DynamicSparsity(method="set", sparsity=0.7, update_every=2, end_step=6, seed=seed)
        trainer = quiet_trainer(max_steps=6, callbacks=[technique, *callbacks], limit_val_batches=0,
                                enable_checkpointing=bool(callbacks), default_root_dir=tmp_path)  # fmt: skip
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model, technique

    every_step = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    whole, _ = run([every_step])
    resumed, technique = run([], ckpt_path=tmp_path / "step=3.ckpt", seed=9)  # the generator comes from the checkpoint
    assert technique.updates == 2
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"sparsity=1.0 must lie in \[0.0, 1.0\)"),
        ({"sparsity": -0.1}, r"sparsity=-0.1 must lie in \[0.0, 1.0\)"),
        ({"update_every": 0}, "update_every=0 must be an integer >= 1"),
        ({"drop_fraction": 0.0}, r"drop_fraction=0.0 must lie in \(0.0, 1.0\]"),
        ({"drop_fraction": 1.5}, r"drop_fraction=1.5 must lie in \(0.0, 1.0\]"),
        ({"update_every": 100, "end_step": 50}, "end_step=50 comes before the first update"),
        ({"method": "snip"}, r"method='snip'"),
        ({"distribution": "normal"}, r"distribution='normal'"),
    ],
)
def test_bad_arguments_fail_in_one_line(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        DynamicSparsity(**kwargs)


def test_masks_of_magnitude_pruning_on_the_same_weights_are_refused():
    model = BertMLM(vocab_size=60, preset="tiny")
    MagnitudePruning(final_sparsity=0.5).attach(model)
    with pytest.raises(ConfigurationError, match="already has a pruning mask"):
        DynamicSparsity().attach(model)


def test_a_model_without_matching_layers_is_refused():
    with pytest.raises(NoTargetModulesError, match="no block stack|no Transformer block"):
        DynamicSparsity().attach(nn.Sequential(nn.Linear(3, 3)))
