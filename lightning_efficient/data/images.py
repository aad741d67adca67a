"""DataModule for image classification: Fashion-MNIST (28x28 grayscale) by default.

Reads the embedded 12k-image Fashion-MNIST subset, a user's ``.npz`` with the same keys, or a
csv / jsonl with a label column and one column per pixel (the Kaggle Fashion-MNIST layout).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lightning_efficient.data.base import EfficientDataModule
from lightning_efficient.data.files import embedded_path, read_column, read_numbered_records, split_indices
from lightning_efficient.errors import ConfigurationError, DataError

__all__ = ["FASHION_MNIST_LABELS", "ImageClassificationDataModule", "resize_images"]

FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_NPZ_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def resize_images(pixel_values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images ``(B, C, H, W)`` resized to ``size``: bilinear, antialiased when shrinking (as torchvision's ``Resize``).

    Returned as they are when they already have that size.

    Examples:
        >>> resize_images(torch.ones(2, 1, 28, 28), (16, 16)).shape
        torch.Size([2, 1, 16, 16])
    """
    if tuple(pixel_values.shape[-2:]) == tuple(size):
        return pixel_values
    shrink = size[0] < pixel_values.shape[-2] or size[1] < pixel_values.shape[-1]
    return F.interpolate(pixel_values, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    if not Path(path).is_file():
        raise DataError(f"data file {path!r} does not exist or is not a file")
    try:
        with np.load(path) as archive:
            missing = [k for k in _NPZ_KEYS[:2] if k not in archive.files]
            if missing:
                raise DataError(
                    f"npz file {path!r} lacks arrays {missing}; it has {archive.files}, needs {list(_NPZ_KEYS)}"
                )
            return {k: archive[k] for k in _NPZ_KEYS if k in archive.files}
    except (OSError, ValueError) as err:
        raise DataError(f"data file {path!r} cannot be read as .npz: {err}") from err


def _load_table(path: str, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    numbered = read_numbered_records(path)
    lines = [line for line, _ in numbered]
    records = [record for _, record in numbered]
    labels = read_column(records, label_column, path, lines)
    for label, line in zip(labels, lines):
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"data file {path!r}, line {line}: label {label!r} in column {label_column!r} is empty")
    pixel_columns = [c for c in records[0] if c != label_column]
    side = math.isqrt(len(pixel_columns))
    if side * side != len(pixel_columns) or side == 0:
        raise DataError(
            f"data file {path!r} has {len(pixel_columns)} pixel columns besides {label_column!r}; "
            "expected a square image (e.g. 784 = 28x28)"
        )
    images = np.empty((len(records), len(pixel_columns)), dtype=np.float32)
    for row, (record, line) in enumerate(zip(records, lines)):
        for col, column in enumerate(pixel_columns):
            try:
                images[row, col] = float(record.get(column))
            except (TypeError, ValueError) as err:
                raise DataError(
                    f"data file {path!r}, line {line}: pixel column {column!r} holds {record.get(column)!r}, "
                    "not a number"
                ) from err
    return images.reshape(-1, side, side), np.asarray(labels)


def _check_images(images: np.ndarray, labels: np.ndarray, source: str, split: str) -> None:
    """Fail unless ``images`` are ``(N, H, H)`` finite numbers with one label each."""
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise DataError(f"{split} images of {source!r} have shape {images.shape}; expected (N, H, H)")
    if len(labels) != len(images):
        raise DataError(f"{source!r} holds {len(images)} {split} images but {len(labels)} {split} labels")
    if images.dtype.kind == "f":
        finite = torch.isfinite(torch.as_tensor(images))
        if not bool(finite.all()):
            index = int((~finite).flatten(1).any(1).nonzero()[0])
            bad = images[index][~finite[index].numpy()][0]
            raise DataError(f"{split} image {index} of {source!r} holds a non-finite pixel ({bad}); fix or drop it")


class ImageClassificationDataModule(EfficientDataModule):
    """Square grayscale images with integer or string labels, for the ViT classifier.

    Pixels are scaled to [0, 1] and standardised with the training set's mean and std.
    Batches are ``{"pixel_values": (B, 1, H, W) float32, "labels": (B,) int64}``.

    Args:
        train_file: ``.npz`` with ``train_images`` / ``train_labels`` (and optionally
            ``test_images`` / ``test_labels``), or a csv / jsonl with ``label_column`` and one
            column per pixel; default: the embedded Fashion-MNIST subset (10k train, 2k test).
        test_file: A csv / jsonl test set; an ``.npz`` train file supplies its own test arrays.
        label_column: Label column of csv / jsonl files.
        label_names: Class names in label order; default: Fashion-MNIST's names for the
            embedded data, the sorted distinct labels otherwise.
        val_fraction: Share of the training images held out for validation.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes.
        seed: Seed of the validation split.
        resize_to: Side to resize every image to once, at ``setup`` (bilinear; e.g. 64 to give a ViT
            with patches of 4 a grid of 16x16 from 28x28 Fashion-MNIST); None keeps the files' size.

    Examples:
        >>> dm = ImageClassificationDataModule(batch_size=8)
        >>> dm.setup("fit"); next(iter(dm.train_dataloader()))["pixel_values"].shape
        torch.Size([8, 1, 28, 28])
    """

    def __init__(
        self,
        train_file: str | None = None,
        test_file: str | None = None,
        label_column: str = "label",
        label_names: list[str] | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        resize_to: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if not 0.0 < val_fraction < 0.5:
            raise ConfigurationError(f"val_fraction={val_fraction} must lie in (0, 0.5)")
        if resize_to is not None and (isinstance(resize_to, bool) or not isinstance(resize_to, int) or resize_to < 1):
            raise ConfigurationError(f"resize_to={resize_to!r} must be an image side >= 1 in pixels, or None")
        self.resize_to = resize_to
        self.train_file = train_file or embedded_path("fashion_mnist_12k.npz")
        self.test_file = test_file
        self.label_column = label_column
        self.val_fraction = val_fraction
        self._label_names = label_names if label_names is not None else (None if train_file else FASHION_MNIST_LABELS)
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._raw: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def _source(self, split: str) -> str:
        """The file that holds ``split``'s images (``test``: ``test_file`` when given)."""
        return self.test_file if split == "test" and self.test_file else self.train_file

    def _load(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if self._raw is None:
            if self.train_file.endswith(".npz"):
                arrays = _load_npz(self.train_file)
                raw = {"train": (arrays["train_images"], arrays["train_labels"])}
                if "test_images" in arrays and "test_labels" in arrays:
                    raw["test"] = (arrays["test_images"], arrays["test_labels"])
            else:
                raw = {"train": _load_table(self.train_file, self.label_column)}
            if self.test_file:
                raw["test"] = _load_table(self.test_file, self.label_column)
            for split, (images, labels) in raw.items():
                _check_images(images, labels, self._source(split), split)
            if "test" in raw and raw["test"][0].shape[1:] != raw["train"][0].shape[1:]:
                raise DataError(
                    f"test images of {self._source('test')!r} are {raw['test'][0].shape[1:]} pixels, "
                    f"training images of {self.train_file!r} are {raw['train'][0].shape[1:]}; they must match"
                )
            self._raw = raw
        return self._raw

    @property
    def label_names(self) -> list[str]:
        """Class names; index ``i`` is class ``i``."""
        if self._label_names is None:
            self._label_names = [str(v) for v in sorted(set(self._load()["train"][1].tolist()))]
        return self._label_names

    @property
    def image_size(self) -> int:
        """Side of the square images in pixels (``resize_to`` when given)."""
        return self.resize_to or int(self._load()["train"][0].shape[-1])

    model_argument_names = ("num_labels", "image_size", "label_names")

    def model_arguments(self) -> dict[str, Any]:
        return {"num_labels": len(self.label_names), "image_size": self.image_size, "label_names": self.label_names}

    def _label_ids(self, labels: np.ndarray, split: str) -> torch.Tensor:
        names = self.label_names
        if labels.dtype.kind in "iu" and self._label_names is not None:
            outside = np.flatnonzero((labels < 0) | (labels >= len(names)))
            if len(outside):
                index = int(outside[0])
                raise DataError(
                    f"{split} label {labels[index]} (image {index}) of {self._source(split)!r} lies outside "
                    f"[0, {len(names)}): there are {len(names)} label names {names}"
                )
            return torch.as_tensor(labels, dtype=torch.long)
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted({str(v) for v in labels.tolist()} - set(index))
        if unknown:
            raise DataError(
                f"{split} labels {unknown[:10]} of {self._source(split)!r} are not among the label names {names}"
            )
        return torch.tensor([index[str(v)] for v in labels.tolist()], dtype=torch.long)

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        raw = self._load()
        images, labels = raw["train"]
        scale = 255.0 if images.dtype == np.uint8 or images.max() > 1.0 else 1.0
        pixels = torch.as_tensor(images, dtype=torch.float32) / scale
        mean, std = pixels.mean(), pixels.std().clamp_min(1e-6)
        label_ids = self._label_ids(labels, "train")
        train, val = split_indices(len(pixels), [self.val_fraction], self.seed)

        def normalise(x: torch.Tensor) -> torch.Tensor:
            x = ((x - mean) / std).unsqueeze(1)  # (N, 1, H, W)
            return resize_images(x, (self.resize_to, self.resize_to)) if self.resize_to else x

        self.splits = {
            "train": (normalise(pixels[train]), label_ids[train]),
            "val": (normalise(pixels[val]), label_ids[val]),
        }
        if "test" in raw:
            test_images, test_labels = raw["test"]
            test_pixels = torch.as_tensor(test_images, dtype=torch.float32) / scale
            self.splits["test"] = (normalise(test_pixels), self._label_ids(test_labels, "test"))
        else:
            self.splits["test"] = self.splits["val"]

    @staticmethod
    def _collate(examples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.stack([x for x, _ in examples]),
            "labels": torch.stack([y for _, y in examples]),
        }

    def split_items(self, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.splits[split]
        return list(zip(images, labels))

    def predict_dataloader(self):
        return self._loader(self.split_items("test"), self._collate, shuffle=False)
