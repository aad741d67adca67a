"""DataModules over the embedded corpora (or a user's files) and the tokenizers they train."""

from lightning_efficient.data.augmentation import PosLexicon, TransferSetAugmentation
from lightning_efficient.data.base import EfficientDataModule, TextDataModule
from lightning_efficient.data.images import FASHION_MNIST_LABELS, ImageClassificationDataModule
from lightning_efficient.data.sampling import ResumableDataLoader, ResumableSampler
from lightning_efficient.data.text import BROWN_PROSE, MLMDataModule, TextClassificationDataModule
from lightning_efficient.data.translation import TranslationDataModule

__all__ = [
    "BROWN_PROSE",
    "FASHION_MNIST_LABELS",
    "EfficientDataModule",
    "ImageClassificationDataModule",
    "MLMDataModule",
    "PosLexicon",
    "ResumableDataLoader",
    "ResumableSampler",
    "TextClassificationDataModule",
    "TextDataModule",
    "TransferSetAugmentation",
    "TranslationDataModule",
]
