"""lightning_efficient: cheaper Transformer training and compression for PyTorch Lightning.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_efficient import MLMDataModule, BertMLM
    >>> dm = MLMDataModule(vocab_size=3000, max_length=32, batch_size=8)  # doctest: +SKIP
    >>> model = BertMLM(vocab_size=dm.vocab_size, preset="tiny")  # doctest: +SKIP
    >>> pl.Trainer(max_steps=10).fit(model, dm)  # doctest: +SKIP
"""

from lightning_efficient.data import (
    BROWN_PROSE,
    ImageClassificationDataModule,
    MLMDataModule,
    TextClassificationDataModule,
    TranslationDataModule,
)
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError, DataError
from lightning_efficient.models import PRESETS, BertClassifier, BertMLM, Translation, ViTClassifier
from lightning_efficient.predictions import JsonlPredictionWriter

__version__ = "0.1.0"

__all__ = [
    "BROWN_PROSE",
    "PRESETS",
    "BertClassifier",
    "BertMLM",
    "CheckpointMismatchError",
    "ConfigurationError",
    "DataError",
    "ImageClassificationDataModule",
    "JsonlPredictionWriter",
    "MLMDataModule",
    "TextClassificationDataModule",
    "Translation",
    "TranslationDataModule",
    "ViTClassifier",
    "__version__",
]
