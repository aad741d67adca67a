"""AutoProg: the choice on a constructed case, the search as counted training steps, growth, bad input.

Exact resume (before a search, mid-search, at the choice), composition, precision and DDP (every rank
chooses alike) are checked by the contract suite (row ``autoprog`` in ``techniques.py``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_efficient import EfficiencyMonitor, ImageClassificationDataModule, ViTClassifier
from lightning_efficient.callbacks import AutoProg
from lightning_efficient.callbacks.autoprog import candidate_cost, choose_candidate
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError
from lightning_efficient.flops import count_flops
from lightning_efficient.testing import quiet_trainer

#: stage 0 on 2 blocks at 20x20 (steps 0-1); a search of 4 candidates at steps 2-5; the choice at 6; full from 9
STAGES = [0, 2, 9]


class Trace(Callback):
    """Per training step: AutoProg's depth and side, and the monitor's FLOPs."""

    def __init__(self, auto: AutoProg, monitor: EfficiencyMonitor | None = None) -> None:
        self.auto, self.monitor = auto, monitor
        self.sizes: list[tuple[int, int]] = []
        self.flops: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.sizes.append((self.auto.depth, self.auto.side))
        if self.monitor is not None:
            self.flops.append(self.monitor.last_step["flops"])


class ScoredViT(ViTClassifier):
    """A tiny ViT whose training loss is set by the size AutoProg trains (a constructed search)."""

    def __init__(self, losses: dict[tuple[int, int], float], auto: AutoProg) -> None:
        super().__init__(num_labels=10, preset="tiny")
        self.losses, self.auto = losses, auto

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        real = super().training_step(batch, batch_idx)
        return real * 0 + self.losses[(self.auto.depth, self.auto.side)]


def test_choose_candidate_takes_the_cheapest_within_tolerance_of_the_largest() -> None:
    scores, costs = [2.30, 2.05, 2.02, 2.00], [1.0, 2.0, 3.0, 4.0]
    assert choose_candidate(scores, costs, largest=3, tolerance=0.05) == 1  # 2.05 <= 2.00 * 1.05
    assert choose_candidate(scores, costs, largest=3, tolerance=0.0) == 3
    assert choose_candidate(scores, costs, largest=3, tolerance=0.2) == 0
    assert choose_candidate([1.0, 0.9, 1.0], [1.0, 1.0, 4.0], largest=2, tolerance=0.0) == 1  # equal cost: lower loss


def test_candidate_cost_is_the_counted_forward_flops_of_the_blocks() -> None:
    torch.manual_seed(0)
    model = ViTClassifier(num_labels=10, preset="tiny").eval()
    blocks = model.model.vit.layers
    for side in (20, 28):
        tokens = (side // 4) ** 2 + 1
        hidden = torch.zeros(1, tokens, 32)
        with torch.no_grad():
            counted = sum(count_flops(block, hidden)[1] for block in blocks[:2])
        assert candidate_cost(2, side, patch_size=4, hidden_size=32, ffn_size=37) == counted


def test_the_search_trains_each_candidate_and_keeps_the_cheapest_close_enough(tmp_path) -> None:
    auto = AutoProg(stages=STAGES, image_sizes=[20, 28], depths=[2, 3], search_steps=1, tolerance=0.05)
    losses = {(2, 20): 1.0, (2, 28): 0.50, (3, 20): 1.0, (3, 28): 0.49}  # (2, 28) is within 5% of the largest
    monitor = EfficiencyMonitor(peak_flops=1e11)
    trace = Trace(auto, monitor)
    trainer = quiet_trainer(
        max_steps=10, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[auto, monitor, trace]
    )
    trainer.fit(ScoredViT(losses, auto), ImageClassificationDataModule(batch_size=8))

    (choice,) = auto.choices
    assert choice["step"] == 6 and choice["candidates"] == [[2, 20], [2, 28], [3, 20], [3, 28]]
    assert choice["scores"] == pytest.approx([1.0, 0.5, 1.0, 0.49]) and choice["chosen"] == 1
    assert trace.sizes == [(2, 20)] * 2 + [(2, 20), (2, 28), (3, 20), (3, 28)] + [(2, 28)] * 3 + [(3, 28)]
    # the search steps are ordinary steps: the monitor counted each at its candidate's size
    search_flops = trace.flops[2:6]
    assert search_flops[0] < search_flops[1] and search_flops[2] < search_flops[3] and search_flops[0] < search_flops[2]
    assert trace.flops[6:9] == [search_flops[1]] * 3 and trace.flops[9] == search_flops[3]
    assert monitor.summary["steps"] == 10


def test_the_search_grows_to_the_largest_depth_by_copying_the_trained_block(tmp_path) -> None:
    auto = AutoProg(stages=[0, 2, 9], image_sizes=[28], depths=[1, 3], search_steps=1, init="copy")
    model = ViTClassifier(num_labels=10, preset="tiny")
    layers = model.model.vit.layers

    class AtSearch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 2:  # grown to 3 blocks for the search: blocks 1 and 2 copy block 0 (1 -> 2 -> 3)
                self.equal = [torch.equal(layers[i].mlp.fc2.weight, layers[0].mlp.fc2.weight) for i in (1, 2)]

    at_search = AtSearch()
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[auto, at_search])
    trainer.fit(model, ImageClassificationDataModule(batch_size=8))
    assert at_search.equal == [True, True]
    assert auto.search["candidates"] == [[1, 28], [3, 28]] and auto.grown == 3


def test_momentum_growth_starts_new_blocks_from_the_moving_average(tmp_path) -> None:
    auto = AutoProg(stages=[0, 3, 9], image_sizes=[28], depths=[1, 2], search_steps=1, ema_decay=0.5)
    model = ViTClassifier(num_labels=10, preset="tiny", num_layers=2)
    layers = model.model.vit.layers

    class Averages(Callback):
        def __init__(self) -> None:
            self.average: torch.Tensor | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step <= 3:  # the formula, written out, over the first 3 optimizer steps
                weight = layers[0].mlp.fc2.weight.detach()
                self.average = 0.5 * self.average + 0.5 * weight

        def on_train_start(self, trainer, pl_module) -> None:
            self.average = layers[0].mlp.fc2.weight.detach().clone()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 3:
                self.copied = layers[1].mlp.fc2.weight.detach().clone()
                self.original = layers[0].mlp.fc2.weight.detach().clone()

    averages = Averages()
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[auto, averages])
    trainer.fit(model, ImageClassificationDataModule(batch_size=8))
    assert torch.allclose(averages.copied, averages.average, atol=1e-7)
    assert not torch.allclose(averages.copied, averages.original)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"stages": [0, 10]}, "at least 3 starts"),
        ({"stages": [5, 10, 20]}, "must start at step 0"),
        ({"stages": [0, 20, 10]}, "start 10 comes after 20"),
        ({"stages": [0, 0.5, 1.5]}, "fraction 1.5 must lie in"),
        ({"image_sizes": [28], "depths": None}, "no candidates"),
        ({"image_sizes": [28], "depths": [3]}, "no candidates"),
        ({"image_sizes": [28, 20]}, "must increase"),
        ({"depths": [0, 3]}, "integers >= 1"),
        ({"search_steps": 0}, "search_steps=0"),
        ({"tolerance": -0.1}, "tolerance=-0.1"),
        ({"ema_decay": 1.0}, "ema_decay=1.0"),
        ({"ema_decay": 0}, "ema_decay=0"),
        ({"init": "ema"}, "init='ema'"),
        ({"rule": "fold"}, "rule='fold'"),
    ],
)
def test_bad_arguments_are_refused(arguments: dict[str, Any], message: str) -> None:
    defaults: dict[str, Any] = {"stages": STAGES, "image_sizes": [20, 28], "depths": [2, 3]}
    with pytest.raises(ConfigurationError, match=message):
        AutoProg(**{**defaults, **arguments})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"depths": [2, 4]}, "largest depth 4 is past the 3 blocks"),
        ({"image_sizes": [18, 28]}, r"sides \[18\] are not multiples"),
        ({"stages": [0, 2, 5]}, "shorter than its search of up to 4 candidates"),
    ],
)
def test_arguments_that_do_not_fit_the_model_or_run_stop_before_step_1(arguments: dict, message: str, tmp_path) -> None:
    auto = AutoProg(**{"stages": STAGES, "image_sizes": [20, 28], "depths": [2, 3], "search_steps": 1, **arguments})
    trainer = quiet_trainer(max_steps=10, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[auto])
    model = ViTClassifier(num_labels=10, preset="tiny")
    with pytest.raises(ConfigurationError, match=message):
        trainer.fit(model, ImageClassificationDataModule(batch_size=8))
    assert trainer.global_step == 0
    if "depths" in arguments or "image_sizes" in arguments:  # refused in the surgery: nothing was left on the model
        assert not model.model.vit.embeddings._forward_pre_hooks and not auto.is_applied


def test_a_checkpoint_of_the_other_init_is_refused() -> None:
    copy = AutoProg(stages=STAGES, image_sizes=[20, 28], depths=[2, 3], init="copy")
    momentum = AutoProg(stages=STAGES, image_sizes=[20, 28], depths=[2, 3], init="momentum")
    with pytest.raises(CheckpointMismatchError, match="trained with init='copy', this run has init='momentum'"):
        momentum.load_state_dict(copy.state_dict())


def test_resolution_only_search_keeps_every_block(tmp_path) -> None:
    auto = AutoProg(stages=[0, 2, 6], image_sizes=[12, 20, 28], search_steps=1)
    trace = Trace(auto)
    trainer = quiet_trainer(max_steps=7, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[auto, trace])
    model = ViTClassifier(num_labels=10, preset="tiny")
    trainer.fit(model, ImageClassificationDataModule(batch_size=8))
    assert [side for _, side in trace.sizes][:5] == [12, 12, 12, 20, 28] and trace.sizes[-1][1] == 28
    assert auto.choices[0]["candidates"] == [[0, 12], [0, 20], [0, 28]]  # depth 0: every block
    costs = auto.choices[0]["costs"]
    assert costs == sorted(costs) and costs[0] == candidate_cost(3, 12, 4, 32, 37)
