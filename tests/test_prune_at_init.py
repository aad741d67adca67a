"""PruneAtInit: SNIP and GraSP scores against their formulas, the shuffle control, fixed masks, bad input."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_efficient import BertMLM, MLMDataModule
from lightning_efficient.callbacks import MagnitudePruning, PruneAtInit
from lightning_efficient.callbacks.prune_at_init import shuffle_masks
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.testing import quiet_trainer


class TwoLayers(nn.Module):
    """A model with two "blocks" of one Linear each (the user's own stack, named by block_paths)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def loss_of(model: TwoLayers, x: torch.Tensor, y: torch.Tensor):
    return lambda: (model(x) - y).pow(2).sum()


def attached(method: str, sparsity: float = 0.5, **kwargs) -> tuple[TwoLayers, PruneAtInit]:
    model = TwoLayers()
    technique = PruneAtInit(method=method, sparsity=sparsity, block_paths=["layers"], **kwargs)
    technique.attach(model)
    return model, technique


def test_snip_scores_are_the_weight_times_gradient_magnitudes_and_the_lowest_half_goes():
    model, technique = attached("snip")
    x, y = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(5, 4)
    weights = [layer.weight.detach().clone() for layer in model.layers]
    gradients = torch.autograd.grad(loss_of(model, x, y)(), [layer.weight for layer in model.layers])
    expected = [(w * g).abs() for w, g in zip(weights, gradients)]  # SNIP: |w * dL/dw|
    scores = technique.scores(loss_of(model, x, y))
    for name, want in zip(technique._targets, expected):
        torch.testing.assert_close(scores[name], want)
    technique.prune(loss_of(model, x, y))
    threshold = torch.cat([e.flatten() for e in expected]).median()
    for layer, score in zip(model.layers, expected):
        assert torch.equal(layer.weight_mask.bool(), score > threshold)  # ranked across both layers
        assert torch.all(layer.weight[~layer.weight_mask.bool()] == 0)


def test_grasp_scores_are_minus_weight_times_the_hessian_gradient_product():
    model, technique = attached("grasp")
    x, y = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(5, 4)
    params = [layer.weight for layer in model.layers]
    gradients = torch.autograd.grad(loss_of(model, x, y)(), params, create_graph=True)  # exact H g, double backward
    flat = sum((g * g.detach()).sum() for g in gradients)
    hessian_gradient = torch.autograd.grad(flat, params)
    expected = [-(w.detach() * hg) for w, hg in zip(params, hessian_gradient)]
    before = [p.detach().clone() for p in params]
    scores = technique.scores(loss_of(model, x, y))  # a finite difference of two gradients
    for name, want in zip(technique._targets, expected):
        torch.testing.assert_close(-scores[name], want, rtol=0.05, atol=1e-4)  # lowest score pruned = highest -w Hg
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # scoring leaves the weights bit for bit


def test_shuffle_keeps_each_layers_count_and_moves_the_mask():
    masks = {"a": torch.rand(6, 7) > 0.7, "b": torch.rand(3, 9) > 0.2}
    shuffled = shuffle_masks(masks, torch.Generator().manual_seed(0))
    for name, mask in masks.items():
        assert int(shuffled[name].sum()) == int(mask.sum())
        assert not torch.equal(shuffled[name], mask)
    model, technique = attached("magnitude", sparsity=0.75, shuffle=True)
    technique.prune(None)
    assert [int(layer.weight_mask.sum()) for layer in model.layers] != [0, 0]
    assert sum(int(layer.weight_mask.sum()) for layer in model.layers) == 8  # 25% of 32 kept overall


def test_random_prunes_every_layer_to_the_same_sparsity():
    model, technique = attached("random", sparsity=0.5)
    technique.prune(None)
    assert [int(layer.weight_mask.sum()) for layer in model.layers] == [8, 8]


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_masks_are_set_before_step_one_and_stay_fixed_through_training(method):
    pl.seed_everything(0)
    data = MLMDataModule(vocab_size=400, max_length=24, batch_size=4)
    model = BertMLM(vocab_size=400, preset="tiny", max_length=24, warmup_fraction=0.0)
    technique = PruneAtInit(method=method, sparsity=0.8)
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append({n: m.weight_mask.clone() for n, m in technique._targets.items()})

    trainer = quiet_trainer(max_steps=3, callbacks=[technique, Watch()], limit_val_batches=0)
    trainer.fit(model, data)
    assert technique.current_sparsity == pytest.approx(0.8, abs=1e-3)
    logged = trainer.callback_metrics  # the last step's: the sparsity of the masks that ran, not of the init
    assert float(logged["prune_at_init/sparsity"]) == pytest.approx(0.8, abs=1e-3)
    assert float(logged["prune_at_init/theoretical_flops_fraction"]) == pytest.approx(0.2, abs=1e-3)
    assert all(torch.equal(seen[0][n], later[n]) for later in seen[1:] for n in later)
    for name, module in technique._targets.items():
        assert torch.all(module.weight[~module.weight_mask.bool()] == 0), name


def test_bad_input_fails_in_one_line():
    with pytest.raises(ConfigurationError, match=r"sparsity=1.0 must lie in \[0.0, 1.0\)"):
        PruneAtInit(sparsity=1.0)
    with pytest.raises(ConfigurationError, match="method='synflow'"):
        PruneAtInit(method="synflow")
    model = BertMLM(vocab_size=60, preset="tiny")
    MagnitudePruning(final_sparsity=0.5).attach(model)
    with pytest.raises(ConfigurationError, match="already has a pruning mask"):
        PruneAtInit().attach(model)
