"""DataModule for image classification: Fashion-MNIST (28x28 grayscale) by default.

Reads the embedded 12k-image Fashion-MNIST subset, a user's ``.npz`` with the same keys, or any
source :func:`~lightning_efficient.data.sources.load_source` opens (a csv / tsv / jsonl / parquet
file, ``.gz`` allowed, a ``save_to_disk`` directory, a hub id) holding a label column and either
an image column (``datasets.Image`` or arrays, as the hub's Fashion-MNIST) or one column per pixel
(the Kaggle Fashion-MNIST layout).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from lightning_efficient.data.base import EfficientDataModule
from lightning_efficient.data.files import embedded_path, read_numbered_records, split_indices
from lightning_efficient.data.sources import load_source
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


def _place(spec: str, row: int) -> str:
    """Where row ``row`` (0-based) of ``spec`` is, for a message: the line of a csv / jsonl file, else the row."""
    path = Path(spec)
    if path.is_file():
        try:
            numbered = read_numbered_records(path)  # only on the error path: the line a user can look up
        except DataError:
            numbered = []
        if len(numbered) > row:
            return f"data file {spec!r}, line {numbered[row][0]}"
        return f"data file {spec!r}, row {row} (0-based)"
    return f"{spec!r}, row {row} (0-based)"


def _read_labels(table: datasets.Dataset, label_column: str, spec: str) -> np.ndarray:
    """The label column as numpy (strings as ``str``), failing on the first empty label."""
    column = table.with_format("arrow")[:].column(label_column)
    empty = column.is_null()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        empty = pc.or_kleene(empty, pc.equal(pc.utf8_trim_whitespace(column), ""))
    bad = np.flatnonzero(empty.fill_null(True).to_numpy(zero_copy_only=False))
    if len(bad):
        row = int(bad[0])
        raise DataError(f"{_place(spec, row)}: label {column[row].as_py()!r} in column {label_column!r} is empty")
    labels = column.to_numpy(zero_copy_only=False)
    return labels.astype(str) if labels.dtype == object else labels.copy()  # a writable copy of Arrow's buffer


def _pixel_column(column: pa.ChunkedArray, name: str, spec: str) -> np.ndarray:
    """One pixel column as float32, failing on the first cell that is not a number."""
    if column.null_count == 0:
        try:
            return pc.cast(column, pa.float32()).to_numpy(zero_copy_only=False)
        except pa.ArrowException:
            pass  # e.g. a csv cell "" or "dark": find it, or accept what Python's float() reads
    values = column.to_pylist()
    converted = np.empty(len(values), dtype=np.float32)
    for row, value in enumerate(values):  # only for a column Arrow could not cast
        try:
            converted[row] = float(value)
        except (TypeError, ValueError) as err:
            raise DataError(f"{_place(spec, row)}: pixel column {name!r} holds {value!r}, not a number") from err
    return converted


def _read_pixel_table(table: datasets.Dataset, spec: str, label_column: str) -> np.ndarray:
    """Images ``(N, H, H)`` float32 from a table with one column per pixel (all but ``label_column``)."""
    pixel_columns = [c for c in table.column_names if c != label_column]
    side = math.isqrt(len(pixel_columns))
    if side * side != len(pixel_columns) or side == 0:
        what = "data file " if Path(spec).is_file() else ""
        raise DataError(
            f"{what}{spec!r} has {len(pixel_columns)} pixel columns besides {label_column!r}; "
            "expected a square image (e.g. 784 = 28x28)"
        )
    pixels = table.select_columns(pixel_columns).with_format("arrow")[:]
    images = np.empty((pixels.num_rows, len(pixel_columns)), dtype=np.float32)
    for index, name in enumerate(pixel_columns):  # column by column, each one vectorised
        images[:, index] = _pixel_column(pixels.column(name), name, spec)
    return images.reshape(-1, side, side)


def _grayscale(batch: np.ndarray, image_column: str, spec: str) -> np.ndarray:
    """Arrays ``(B, H, W)``, ``(B, H, W, 1)`` or RGB(A) ``(B, H, W, 3|4)`` as grayscale ``(B, H, W)``.

    Integers (0..255) come back as uint8, other numbers as float32.
    """
    if batch.dtype.kind in "iub":
        if batch.size and (batch.min() < 0 or batch.max() > 255):
            raise DataError(
                f"images in column {image_column!r} of {spec!r} hold integer pixels outside [0, 255] "
                f"({batch.min()}..{batch.max()})"
            )
        batch = batch.astype(np.uint8)
    else:
        batch = batch.astype(np.float32)
    if batch.ndim == 4 and batch.shape[-1] == 1:
        return batch[..., 0]
    if batch.ndim == 4 and batch.shape[-1] in (3, 4):
        if batch.dtype == np.uint8:  # ITU-R 601-2 luma in PIL's fixed point: what convert("L") gives
            rgb = batch[..., :3].astype(np.int32)
            return ((rgb @ np.array([19595, 38470, 7471], dtype=np.int32) + 0x8000) >> 16).astype(np.uint8)
        return batch[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return batch


def _read_image_column(table: datasets.Dataset, image_column: str, spec: str) -> np.ndarray:
    """Images ``(N, H, H)`` of ``image_column`` (``datasets.Image``: grayscale uint8; arrays: as stored)."""
    feature = table.features[image_column]
    if isinstance(feature, datasets.Image):
        table = table.cast_column(image_column, datasets.Image(mode="L"))  # PIL's convert("L") as it decodes
    elif isinstance(feature, datasets.Value):
        raise DataError(
            f"column {image_column!r} of {spec!r} holds {feature.dtype} values, not images (a datasets.Image "
            "or arrays); name the image column with image_column, or image_column=None for one column per pixel"
        )
    parts: list[np.ndarray] = []
    shape: tuple[int, ...] | None = None
    offset = 0
    for batch in table.with_format("numpy").iter(batch_size=1024):
        images = batch[image_column]
        ragged = images.dtype == object  # the formatter stacks equal shapes only
        if ragged:
            each = [_grayscale(np.asarray(image)[None], image_column, spec)[0] for image in images]
            shapes = [tuple(image.shape) for image in each]
        else:
            images = _grayscale(images, image_column, spec)
            shapes = [tuple(images.shape[1:])]
        shape = shape or shapes[0]
        if len(shape) != 2 or shape[0] != shape[1]:
            raise DataError(
                f"images in column {image_column!r} of {spec!r} have shape {shape}; expected square grayscale "
                "images (H, H)"
            )
        odd = next((i for i, s in enumerate(shapes) if s != shape), None)
        if odd is not None:
            index = offset + odd  # a stacked batch has one shape: its image 0 is the odd one
            raise DataError(
                f"image {index} in column {image_column!r} of {spec!r} has shape {shapes[odd]}, image 0 has "
                f"{shape}; all images must be the same size"
            )
        parts.append(np.stack(each) if ragged else images)
        offset += len(images)
    return np.concatenate(parts)


def _load_source(
    spec: str, label_column: str, image_column: str | None, role: str
) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """``(images (N, H, H), labels (N,), ClassLabel names or None)`` of a source ``load_source`` opens."""
    table = load_source(spec, [label_column], role=role, keep_all=True)  # fails on a missing source or label column
    labels = _read_labels(table.select_columns([label_column]), label_column, spec)
    label_feature = table.features[label_column]
    names = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
    if image_column and image_column in table.column_names and image_column != label_column:
        images = _read_image_column(table.select_columns([image_column]), image_column, spec)
    else:
        images = _read_pixel_table(table, spec, label_column)  # every other column is a pixel
    return images, labels, names


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

    Besides an ``.npz``, every source :func:`~lightning_efficient.data.sources.load_source` opens
    is read: a csv / tsv / jsonl / parquet file (``.gz`` allowed), a ``save_to_disk`` directory
    (``"dir#test"`` picks a split), a directory of data files or a hub id. It holds
    ``label_column`` and either ``image_column`` (a ``datasets.Image``, decoded to grayscale
    uint8, or arrays ``(H, W)``, ``(H, W, 1)``, RGB ``(H, W, 3)``) or, when that column is not
    there, one column per pixel (every other column, in order; e.g. 784 for 28x28).

    Args:
        train_file: ``.npz`` with ``train_images`` / ``train_labels`` (and optionally
            ``test_images`` / ``test_labels``), or any source above (a split source gives its
            ``train`` split); default: the embedded Fashion-MNIST subset (10k train, 2k test).
        test_file: A test set, any source above but ``.npz`` (a split source gives its ``test``
            split); an ``.npz`` train file supplies its own test arrays. Default: the validation
            split is the test split.
        label_column: The label column of a source other than ``.npz``.
        label_names: Class names in label order; default: Fashion-MNIST's names for the
            embedded data, the names of a ``datasets.ClassLabel`` label column, the sorted
            distinct labels otherwise.
        val_fraction: Share of the training images held out for validation.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes.
        seed: Seed of the validation split.
        resize_to: Side to resize every image to once, at ``setup`` (bilinear; e.g. 64 to give a ViT
            with patches of 4 a grid of 16x16 from 28x28 Fashion-MNIST); None keeps the files' size.
        image_column: The image column of a source other than ``.npz``; None: always read one
            column per pixel.

    Raises:
        DataError: At ``setup`` (or at ``label_names`` / ``image_size``), naming the source: it
            is missing or unreadable, the label column is missing (the message lists the columns)
            or holds an empty label, the images are not square or not all of one size, a pixel is
            not a number (its column and line or row) or not finite.

    Examples:
        >>> dm = ImageClassificationDataModule(batch_size=8)
        >>> dm.setup("fit"); next(iter(dm.train_dataloader()))["pixel_values"].shape
        torch.Size([8, 1, 28, 28])

        A ``datasets.Dataset`` saved to disk, with an image column and ``ClassLabel`` labels:

        >>> import datasets, tempfile
        >>> features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["no", "yes"])})
        >>> pixels = np.arange(4 * 36, dtype=np.uint8).reshape(4, 6, 6)
        >>> saved = datasets.Dataset.from_dict({"image": list(pixels), "label": [0, 1, 1, 0]}, features=features)
        >>> folder = tempfile.mkdtemp()
        >>> saved.save_to_disk(folder)
        >>> dm = ImageClassificationDataModule(train_file=folder)
        >>> dm.label_names, dm.image_size
        (['no', 'yes'], 6)
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
        image_column: str | None = "image",
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
        self.image_column = image_column
        self.val_fraction = val_fraction
        self._label_names = label_names if label_names is not None else (None if train_file else FASHION_MNIST_LABELS)
        self._names_inferred = False  # label_names: the sorted distinct labels of the training split
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
                images, labels, class_names = _load_source(
                    self.train_file, self.label_column, self.image_column, "train"
                )
                raw = {"train": (images, labels)}
                if self._label_names is None and class_names is not None:
                    self._label_names = class_names
            if self.test_file:
                images, labels, _ = _load_source(self.test_file, self.label_column, self.image_column, "test")
                raw["test"] = (images, labels)
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
            train_labels = self._load()["train"][1]  # a ClassLabel label column sets the names
            if self._label_names is None:
                self._label_names = [str(v) for v in sorted(set(train_labels.tolist()))]
                self._names_inferred = True
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
        # Integers are class ids, unless the names are the distinct labels and not 0..n-1 (e.g. 1, 2): then names.
        by_id = not self._names_inferred or names == [str(i) for i in range(len(names))]
        if labels.dtype.kind in "iu" and by_id:
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
