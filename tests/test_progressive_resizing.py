"""ProgressiveResizing: the interpolated position embedding, what trains at which size, FLOPs and tokens, bad input.

Exact resume mid-schedule, composition, precision and DDP are checked by the contract suite (row
``progressive_resizing`` in ``techniques.py``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from transformers import ViTConfig, ViTForImageClassification

from lightning_efficient import EfficiencyMonitor, ImageClassificationDataModule, ViTClassifier
from lightning_efficient.callbacks import ProgressiveResizing
from lightning_efficient.callbacks.progressive_resizing import resolve_schedule, validate_schedule
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError
from lightning_efficient.flops import count_flops
from lightning_efficient.testing import quiet_trainer

HIDDEN, FFN, LAYERS, LABELS, PATCH = 32, 37, 3, 10, 4  # the tiny preset, 28x28 images


def tiny_vit(**kwargs: Any) -> ViTClassifier:
    torch.manual_seed(0)
    return ViTClassifier(num_labels=LABELS, preset="tiny", **kwargs)


class PatchSides(Callback):
    """Records the side of the images reaching the patch embedding, in training and in validation."""

    def __init__(self) -> None:
        self.train: list[int] = []
        self.val: list[int] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        patches = pl_module.model.vit.embeddings.patch_embeddings
        patches.register_forward_pre_hook(lambda module, args: self._record(pl_module, args[0]))

    def _record(self, pl_module: pl.LightningModule, pixels: torch.Tensor) -> None:
        (self.train if pl_module.training else self.val).append(pixels.shape[-1])


def test_lower_resolution_uses_the_bicubic_interpolation_of_the_full_size_embedding() -> None:
    model = tiny_vit(dropout=0.0).train()
    technique = ProgressiveResizing([(0, 16), (5, 28)])
    technique.attach(model)
    embeddings = model.model.vit.embeddings
    pixels = torch.randn(2, 1, 28, 28)
    out = embeddings(pixels)  # the hook resizes to 16x16 and interpolates

    # the reference, written out: torch's bicubic on the 7x7 grid of the full-size parameter, to 4x4
    position = embeddings.position_embeddings.detach()
    grid = position[:, 1:].reshape(1, 7, 7, HIDDEN).permute(0, 3, 1, 2)
    small = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, -1)
    resized = F.interpolate(pixels, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    patches = embeddings.patch_embeddings(resized)
    expected = torch.cat([(embeddings.cls_token + position[:, :1]).expand(2, -1, -1), patches + small], dim=1)
    assert out.shape == (2, 17, HIDDEN)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)

    # the gradient reaches the full-size parameter through the interpolation
    out.sum().backward()
    assert embeddings.position_embeddings.grad.shape == (1, 50, HIDDEN)
    assert embeddings.position_embeddings.grad[:, 1:].abs().sum() > 0


def test_the_full_size_is_the_identity() -> None:
    model, plain = tiny_vit(dropout=0.0).train(), tiny_vit(dropout=0.0).train()
    technique = ProgressiveResizing([(0, 16), (1, 28)])
    technique.attach(model)
    technique.resolution.set_side(model, 28)
    pixels = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(pixels), plain(pixels))
    embeddings = model.model.vit.embeddings  # transformers returns the parameter itself at the same grid
    assert embeddings.interpolate_pos_encoding(torch.zeros(1, 50, HIDDEN), 28, 28) is embeddings.position_embeddings


def test_training_at_a_lower_size_with_zero_lr_leaves_the_full_size_outputs_unchanged(tmp_path) -> None:
    model = tiny_vit()
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.0)
    pixels = torch.randn(4, 1, 28, 28)
    before = model.eval()(pixels)
    model.train()  # Lightning keeps the mode a module starts fit in
    sides = PatchSides()
    trainer = quiet_trainer(
        max_steps=3,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        callbacks=[ProgressiveResizing([(0, 12), (2, 20), (3, 28)]), sides],
    )
    trainer.fit(model, ImageClassificationDataModule(batch_size=8))
    assert sides.train == [12, 12, 20] and set(sides.val) == {28}  # trained small, validated at the full size
    assert model.train_image_size is None  # given back at teardown
    assert torch.equal(model.eval()(pixels), before)


def test_eval_size_current_validates_at_the_training_side(tmp_path) -> None:
    sides = PatchSides()
    technique = ProgressiveResizing([(0, 16), (10, 28)], eval_size="current")
    trainer = quiet_trainer(
        max_steps=2, val_check_interval=2, limit_val_batches=1, default_root_dir=tmp_path, callbacks=[technique, sides]
    )
    trainer.fit(tiny_vit(), ImageClassificationDataModule(batch_size=8))
    assert sides.train == [16, 16] and set(sides.val) == {16}


def test_fractions_resolve_against_the_run_and_the_monitor_counts_the_current_size(tmp_path) -> None:
    class Counts(Callback):
        def __init__(self) -> None:
            self.steps: list[dict[str, Any]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.steps.append(dict(monitor.last_step))

    monitor, counts = EfficiencyMonitor(peak_flops=1e11), Counts()
    technique = ProgressiveResizing([(0, 16), (0.5, 28)])
    trainer = quiet_trainer(
        max_steps=4, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[technique, monitor, counts]
    )
    trainer.fit(tiny_vit(), ImageClassificationDataModule(batch_size=8))
    assert technique.state_dict() == {"schedule_steps": [[0, 16], [2, 28]]}

    def step_flops(side: int, images: int = 8) -> float:
        """Model FLOPs of a training step, written out: patch convolution (its input needs no gradient: 2F), then 3F."""
        n = (side // PATCH) ** 2
        tokens = n + 1
        conv = 2 * n * PATCH * PATCH * HIDDEN  # one channel
        block = 2 * tokens * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN) + 4 * tokens * tokens * HIDDEN
        head = 2 * HIDDEN * LABELS
        return images * (2 * conv + 3 * (LAYERS * block + head))

    assert [step["flops"] for step in counts.steps] == [step_flops(16)] * 2 + [step_flops(28)] * 2
    assert [step["tokens"] for step in counts.steps] == [8 * 17] * 2 + [8 * 50] * 2


class HFViT(pl.LightningModule):
    """A user's own module around a transformers ViT: it never resizes, the technique's hook does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=37, num_labels=LABELS)  # fmt: skip
        self.vit = ViTForImageClassification(config)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.vit(pixel_values=batch["pixel_values"]).logits, batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_a_users_hf_vit_trains_at_the_scheduled_sizes(tmp_path) -> None:
    model, seen = HFViT(), []
    model.vit.vit.embeddings.patch_embeddings.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
    trainer = quiet_trainer(
        max_steps=3, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[ProgressiveResizing([(0, 8), (2, 28)])]
    )
    trainer.fit(model, ImageClassificationDataModule(batch_size=8))
    assert seen == [8, 8, 28]
    assert count_flops(model.vit.eval(), pixel_values=torch.zeros(1, 1, 28, 28))[1] > 0  # hooks gone: full size runs


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ([], "non-empty list"),
        ([(0, 16, 1)], "must be a pair"),
        ([(1, 16), (5, 28)], "must start at step 0"),
        ([(0, 28), (5, 16)], "side 16 at 5 does not grow from 28"),
        ([(0, 16), (5, 20), (3, 28)], "start 3 comes after 5"),
        ([(0, 16), (1.5, 28)], "fraction 1.5 must lie in"),
        ([(0, 0), (5, 28)], "side 0 at 0 must be an integer >= 1"),
        ([(0, 16), (-2, 28)], "step -2 is negative"),
    ],
)
def test_bad_schedules_are_refused(schedule: list, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ProgressiveResizing(schedule)


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ([(0, 14), (5, 28)], r"sides \[14\] are not multiples of the model's patch size 4"),
        ([(0, 16), (5, 32)], "largest side 32 is past the model's image size 28"),
        ([(0, 16), (5, 24)], "largest side 24 stops short of the model's image size 28"),
    ],
)
def test_schedules_that_do_not_fit_the_model_are_refused_before_step_1(schedule: list, message: str, tmp_path) -> None:
    model = tiny_vit()
    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path, callbacks=[ProgressiveResizing(schedule)])
    with pytest.raises(ConfigurationError, match=message):
        trainer.fit(model, ImageClassificationDataModule(batch_size=8))
    assert trainer.global_step == 0


def test_fractions_need_a_run_length_and_resolved_starts_must_increase() -> None:
    with pytest.raises(ConfigurationError, match="need the run's length"):
        resolve_schedule(validate_schedule([(0, 16), (0.5, 28)]), float("inf"))
    with pytest.raises(ConfigurationError, match="starts at step 5, not after step 5"):
        resolve_schedule(validate_schedule([(0, 16), (5, 20), (0.5, 28)]), 10)


def test_a_checkpoint_of_other_sides_is_refused() -> None:
    trained = ProgressiveResizing([(0, 16), (5, 28)])
    trained.load_state_dict({"schedule_steps": [[0, 16], [5, 28]]})
    with pytest.raises(
        CheckpointMismatchError, match=r"trained with sides \[12, 28\].*this run's schedule has \[16, 28\]"
    ):
        trained.load_state_dict({"schedule_steps": [[0, 12], [5, 28]]})


def test_the_data_module_can_upsample_and_tells_the_model() -> None:
    dm = ImageClassificationDataModule(batch_size=4, resize_to=64)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape == (4, 1, 64, 64)
    assert dm.model_arguments()["image_size"] == 64
    with pytest.raises(ConfigurationError, match="resize_to=0 must be an image side"):
        ImageClassificationDataModule(resize_to=0)
