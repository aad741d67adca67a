"""LightningModules for BERT (masked LM, classification), translation and ViT, with size presets."""

from lightning_efficient.models.base import EfficientModule
from lightning_efficient.models.bert import BertClassifier, BertMLM, mask_tokens
from lightning_efficient.models.presets import PRESETS, ModelSize, resolve_size
from lightning_efficient.models.translation import Translation
from lightning_efficient.models.vit import ViTClassifier

__all__ = [
    "PRESETS",
    "BertClassifier",
    "BertMLM",
    "EfficientModule",
    "ModelSize",
    "Translation",
    "ViTClassifier",
    "mask_tokens",
    "resolve_size",
]
