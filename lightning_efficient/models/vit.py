"""Vision Transformer classification on small grayscale images (Fashion-MNIST 28x28 by default)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy
from transformers import ViTConfig, ViTForImageClassification

from lightning_efficient.errors import ConfigurationError
from lightning_efficient.losses import cross_entropy_gradient_norms
from lightning_efficient.models.base import EfficientModule, class_names
from lightning_efficient.models.presets import resolve_size

__all__ = ["ViTClassifier"]


class ViTClassifier(EfficientModule):
    """A ViT (transformers' ``ViTForImageClassification``, random init) trained with cross-entropy.

    Args:
        num_labels: Number of classes; must equal the data's.
        label_names: Class names for ``predict`` output.
        image_size: Side of the square input images; must equal the data's.
        num_channels: Image channels (1 for grayscale).
        patch_size: Side of the square patches; must divide ``image_size``.
        preset: Named size; fields below override it.
        hidden_size: Model width.
        num_layers: Number of Transformer blocks.
        num_heads: Attention heads.
        ffn_size: FFN inner width.
        dropout: Dropout of hidden states and attention.
        learning_rate: Peak LR of the default AdamW.
        weight_decay: Weight decay of the default AdamW.
        warmup_fraction: Share of steps of linear LR warmup.
        lr_schedule: ``linear``, ``cosine`` or ``constant`` after warmup.

    Examples:
        >>> model = ViTClassifier(num_labels=10, preset="tiny")
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_labels: int | None = None,
        label_names: list[str] | None = None,
        image_size: int = 28,
        num_channels: int = 1,
        patch_size: int = 4,
        preset: str = "small",
        hidden_size: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        ffn_size: int | None = None,
        dropout: float = 0.1,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        lr_schedule: str = "cosine",
    ) -> None:
        super().__init__(learning_rate, weight_decay, warmup_fraction, lr_schedule)
        self.save_hyperparameters()
        self.label_names = class_names(num_labels, label_names, "pass datamodule.model_arguments()['num_labels']")
        num_labels = len(self.label_names)
        if patch_size <= 0 or image_size % patch_size:
            raise ConfigurationError(f"patch_size={patch_size} must divide image_size={image_size}")
        self.size = resolve_size(preset, hidden_size, num_layers, num_heads, ffn_size)
        config = ViTConfig(
            image_size=image_size,
            patch_size=patch_size,
            num_channels=num_channels,
            hidden_size=self.size.hidden_size,
            num_hidden_layers=self.size.num_layers,
            num_attention_heads=self.size.num_heads,
            intermediate_size=self.size.ffn_size,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            num_labels=num_labels,
        )
        self.model = ViTForImageClassification(config)
        self.val_accuracy = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes=num_labels, average="micro")

    def data_requirements(self) -> dict[str, Any]:
        return {"num_labels": self.hparams.num_labels, "image_size": self.hparams.image_size}

    def count_batch(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        """``(images, images x (patches + 1))``: the tokens the encoder processes, [CLS] included."""
        images = batch["pixel_values"].shape[0]
        return images, images * ((self.hparams.image_size // self.hparams.patch_size) ** 2 + 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_labels)`` of images ``(B, C, H, W)``."""
        return self.model(pixel_values=pixel_values).logits

    def importance_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per image, the gradient-norm bound of its loss (for importance sampling)."""
        return cross_entropy_gradient_norms(self(batch["pixel_values"]), batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.classification_training_step(self(batch["pixel_values"]), batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["pixel_values"])
        self.log("val/loss", F.cross_entropy(logits.float(), batch["labels"]), prog_bar=True)
        self.val_accuracy(logits, batch["labels"])
        self.log("val/accuracy", self.val_accuracy, prog_bar=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["pixel_values"])
        self.log("test/loss", F.cross_entropy(logits.float(), batch["labels"]))
        self.test_accuracy(logits, batch["labels"])
        self.log("test/accuracy", self.test_accuracy)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[dict[str, Any]]:
        """Predicted class name and probability of each image (and its true label when known)."""
        probabilities = self(batch["pixel_values"]).float().softmax(-1)
        results = []
        for row, p in enumerate(probabilities):
            result: dict[str, Any] = {"label": self.label_names[int(p.argmax())], "probability": float(p.max())}
            if "labels" in batch:
                result["true_label"] = self.label_names[int(batch["labels"][row])]
            results.append(result)
        return results
