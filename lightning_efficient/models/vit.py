"""Vision Transformer classification on small grayscale images (Fashion-MNIST 28x28 by default).

With ``pretrained`` the model starts from one of our ``ViTClassifier`` checkpoints or from a
``save_pretrained`` directory of any model ``AutoModelForImageClassification`` knows. A model
pretrained on larger colour images (ViT-Base: 224x224 RGB, patches of 16) gets the data's images
resized to its input size (bilinear, as its image processor) and their one channel repeated into
three, inside :meth:`ViTClassifier.forward`: the data module stays as it is. That costs compute: at
224x224 with patches of 16 every image is 197 tokens instead of the 50 of a 28x28 image with
patches of 4, about 4x the FLOPs per block (and 16x in the attention scores), besides the larger
model itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy
from transformers import ViTConfig, ViTForImageClassification

from lightning_efficient.data.images import resize_images
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
        pretrained: Starting weights: a ``ViTClassifier`` ``.ckpt`` (its encoder; the classifier starts
            fresh), a ``save_pretrained`` directory or a Hugging Face hub id (a classifier head with
            another label count starts fresh). A directory decides the architecture: leave the size
            arguments unset; images of another size or channel count are adapted in ``forward``.
        image_size: Side of the square images the data gives; must equal the data's.
        num_channels: Channels of the images the data gives (1 for grayscale).
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
        model_config: Written by the module into its checkpoints when it started from a directory;
            leave unset.
        compile: Compile the model with ``torch.compile`` at setup, after the techniques' surgery: ``True``
            for Inductor, or a backend name (``"aot_eager"``, ...); checkpoint keys do not change.

    Examples:
        >>> model = ViTClassifier(num_labels=10, preset="tiny")
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    task = "image_classification"
    #: Our module classes whose checkpoints ``pretrained=`` can start this module from.
    pretrained_modules: tuple[str, ...] = ("ViTClassifier",)

    def __init__(
        self,
        num_labels: int | None = None,
        label_names: list[str] | None = None,
        pretrained: str | None = None,
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
        model_config: dict[str, Any] | None = None,
        compile: bool | str = False,
    ) -> None:
        super().__init__(learning_rate, weight_decay, warmup_fraction, lr_schedule, compile)
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
        self.model = self.build_model(
            "image_classification",
            lambda shape: ViTForImageClassification(config),
            pretrained,
            model_config,
            accepts=self.pretrained_modules,
            shape={**vars(self.size), "image_size": image_size, "patch_size": patch_size, "num_channels": num_channels},
            sizes={"hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads, "ffn_size": ffn_size},
            overrides={
                "num_labels": num_labels,
                "id2label": dict(enumerate(self.label_names)),
                "label2id": {name: i for i, name in enumerate(self.label_names)},
            },
        )
        side = self.model.config.image_size  # ViT's image processor resizes to the same size
        #: ``(height, width)`` of the images the model takes (``forward`` resizes the data's to it).
        self.model_image_size: tuple[int, int] = tuple(side) if isinstance(side, (list, tuple)) else (side, side)
        #: ``(height, width)`` the training forward resizes to instead, or None: ``model_image_size``.
        #: :class:`~lightning_efficient.callbacks.ProgressiveResizing` sets it; evaluation keeps the model's size.
        self.train_image_size: tuple[int, int] | None = None
        self.val_accuracy = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes=num_labels, average="micro")

    def data_requirements(self) -> dict[str, Any]:
        return {"num_labels": self.hparams.num_labels, "image_size": self.hparams.image_size}

    def count_batch(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        """``(images, images x (patches + 1))``: the tokens the encoder processes, [CLS] included."""
        images = batch["pixel_values"].shape[0]
        height, width = self.train_image_size or self.model_image_size
        patch = self.model.config.patch_size
        return images, images * ((height // patch) * (width // patch) + 1)

    def model_inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The data's images ``(B, C, H, W)`` as the model takes them: resized (bilinear) and grey repeated to RGB.

        Unchanged when they already fit (our own models). The data module's standardisation stands in
        for the image processor's normalisation (both give inputs of mean ~0 and spread ~1). In training,
        resized to ``train_image_size`` when it is set (antialiased when shrinking).
        """
        channels = self.model.config.num_channels
        if pixel_values.shape[1] == 1 and channels > 1:
            pixel_values = pixel_values.expand(-1, channels, -1, -1)  # (B, 3, H, W), no copy
        if self.training and self.train_image_size:
            return resize_images(pixel_values, self.train_image_size)
        if tuple(pixel_values.shape[-2:]) != self.model_image_size:
            pixel_values = F.interpolate(pixel_values, size=self.model_image_size, mode="bilinear", align_corners=False)
        return pixel_values

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_labels)`` of images ``(B, C, H, W)`` (adapted by :meth:`model_inputs`)."""
        return self.model(pixel_values=self.model_inputs(pixel_values)).logits

    def importance_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per image, the gradient-norm bound of its loss (for importance sampling)."""
        return cross_entropy_gradient_norms(self(batch["pixel_values"]), batch["labels"])

    def distillation_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits ``(N, num_labels)`` of the batch's images (the loss protocol, rule 4)."""
        return self(batch["pixel_values"])

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
