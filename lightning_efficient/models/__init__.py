"""LightningModules for BERT (masked LM, classification), translation and ViT, with size presets; distillation students."""

from lightning_efficient.models.base import EfficientModule
from lightning_efficient.models.bert import BertClassifier, BertMLM, mask_tokens
from lightning_efficient.models.bilstm import BiLSTMClassifier
from lightning_efficient.models.presets import PRESETS, ModelSize, resolve_size
from lightning_efficient.models.students import bert_student, bert_teacher, uniform_layer_map
from lightning_efficient.models.translation import Translation
from lightning_efficient.models.vit import ViTClassifier

__all__ = [
    "PRESETS",
    "BertClassifier",
    "BertMLM",
    "BiLSTMClassifier",
    "EfficientModule",
    "ModelSize",
    "Translation",
    "ViTClassifier",
    "bert_student",
    "bert_teacher",
    "mask_tokens",
    "resolve_size",
    "uniform_layer_map",
]
