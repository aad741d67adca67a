"""ImageClassificationDataModule over load_source: pixel-column tables of every format, saved datasets with an
image column (datasets.Image, ClassLabel), DatasetDict splits, and the errors that name the source."""

from __future__ import annotations

import gzip
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image as PILImage

from lightning_efficient import DataError, ImageClassificationDataModule

NAMES = ["cat", "dog", "owl"]


@pytest.fixture(autouse=True)
def _caches_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_EFFICIENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the repository's working directory


def random_images(n: int, side: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side), dtype=np.uint8)


def expected(images: np.ndarray, train_images: np.ndarray) -> torch.Tensor:
    """(x / 255 - mean) / std, mean and std of the whole training source as the module computes them."""
    train = torch.as_tensor(train_images, dtype=torch.float32) / 255.0
    mean, std = train.mean(), train.std().clamp_min(1e-6)
    return ((torch.as_tensor(images, dtype=torch.float32) / 255.0 - mean) / std).unsqueeze(1)


def assert_batches_match(dm: ImageClassificationDataModule, images: np.ndarray, labels: list[int], train_images):
    """The test loader gives ``images`` in order, normalised with the training source's mean and std."""
    want = expected(images, train_images)
    batch = next(iter(dm.test_dataloader()))
    n = len(batch["labels"])
    torch.testing.assert_close(batch["pixel_values"], want[:n])
    assert batch["labels"].tolist() == labels[:n]


def pixel_rows(images: np.ndarray, labels: list) -> list[dict]:
    return [
        {"label": label, **{f"p{i}": int(v) for i, v in enumerate(image.ravel())}}
        for image, label in zip(images, labels)
    ]


def write_table(path, rows: list[dict]) -> str:
    name = str(path)
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), name)
        return name
    if ".jsonl" in name:
        text = "".join(json.dumps(row) + "\n" for row in rows)
    else:
        sep = "\t" if ".tsv" in name else ","
        text = sep.join(rows[0]) + "\n" + "".join(sep.join(str(v) for v in row.values()) + "\n" for row in rows)
    if name.endswith(".gz"):
        with gzip.open(name, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return name


@pytest.mark.parametrize("suffix", [".parquet", ".tsv", ".csv.gz", ".jsonl.gz", ".tsv.gz"])
def test_pixel_column_tables_of_every_format(tmp_path, suffix):
    train, test = random_images(30, 6, seed=1), random_images(7, 6, seed=2)
    train_labels = [NAMES[i % 3] for i in range(30)]
    test_labels = [NAMES[(i + 1) % 3] for i in range(7)]
    dm = ImageClassificationDataModule(
        train_file=write_table(tmp_path / f"train{suffix}", pixel_rows(train, train_labels)),
        test_file=write_table(tmp_path / f"test{suffix}", pixel_rows(test, test_labels)),
        batch_size=7,
    )
    assert dm.model_arguments() == {"num_labels": 3, "image_size": 6, "label_names": NAMES}
    dm.setup("fit")
    assert_batches_match(dm, test, [NAMES.index(label) for label in test_labels], train)
    assert len(dm.splits["train"][0]) + len(dm.splits["val"][0]) == 30


def test_table_with_integer_labels_that_do_not_start_at_zero(tmp_path):
    labels = [1, 2] * 10
    path = write_table(tmp_path / "x.csv", pixel_rows(random_images(20, 4), labels))
    dm = ImageClassificationDataModule(train_file=path, test_file=path, batch_size=20)
    assert dm.label_names == ["1", "2"]
    dm.setup("fit")
    assert next(iter(dm.test_dataloader()))["labels"].tolist() == [label - 1 for label in labels]


def test_tsv_pixel_that_is_not_a_number_names_column_and_row(tmp_path):
    rows = pixel_rows(random_images(5, 2), [0, 1, 0, 1, 0])
    rows[3]["p2"] = "dark"
    path = write_table(tmp_path / "bad.tsv", rows)
    with pytest.raises(DataError, match=r"bad\.tsv', row 3 \(0-based\): pixel column 'p2' holds 'dark', not a number"):
        ImageClassificationDataModule(train_file=path).setup("fit")


def test_jsonl_missing_pixel_names_the_line(tmp_path):
    rows = pixel_rows(random_images(5, 2), [0, 1, 0, 1, 0])
    del rows[2]["p1"]
    path = write_table(tmp_path / "gap.jsonl", rows)
    with pytest.raises(DataError, match=r"gap\.jsonl', line 3: pixel column 'p1' holds None, not a number"):
        ImageClassificationDataModule(train_file=path).setup("fit")


def image_dataset(images, labels, names=NAMES, image_feature=None) -> datasets.Dataset:
    features = datasets.Features(
        {"image": image_feature or datasets.Image(), "label": datasets.ClassLabel(names=names)}
    )
    return datasets.Dataset.from_dict({"image": list(images), "label": labels}, features=features)


def test_saved_dataset_with_image_column_and_class_label(tmp_path):
    images, labels = random_images(40), [i % 3 for i in range(40)]
    image_dataset(images, labels).save_to_disk(str(tmp_path / "saved"))
    dm = ImageClassificationDataModule(train_file=str(tmp_path / "saved"), batch_size=8, val_fraction=0.25)
    assert dm.label_names == NAMES and dm.image_size == 8
    dm.setup("fit")
    want = expected(images, images)
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 1, 8, 8)
    for pixels, label in zip(batch["pixel_values"], batch["labels"]):  # shuffled: find each one among the images
        matches = [i for i in range(40) if torch.allclose(want[i], pixels)]
        assert len(matches) == 1 and labels[matches[0]] == int(label)
    assert len(dm.splits["val"][0]) == 10 and dm.splits["test"] is dm.splits["val"]
    renamed = ImageClassificationDataModule(train_file=str(tmp_path / "saved"), label_names=["a", "b", "c"])
    assert renamed.label_names == ["a", "b", "c"]


def test_dataset_dict_splits_as_train_and_test(tmp_path):
    train, test = random_images(20, seed=3), random_images(6, seed=4)
    splits = datasets.DatasetDict(
        {"train": image_dataset(train, [i % 3 for i in range(20)]), "test": image_dataset(test, [2, 1, 0, 2, 1, 0])}
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    root = str(tmp_path / "dd")
    dm = ImageClassificationDataModule(train_file=root, test_file=root + "#test", batch_size=6)
    assert dm.model_arguments() == {"num_labels": 3, "image_size": 8, "label_names": NAMES}
    dm.setup("fit")
    assert len(dm.splits["train"][0]) + len(dm.splits["val"][0]) == 20
    assert_batches_match(dm, test, [2, 1, 0, 2, 1, 0], train)


def test_rgb_images_become_grayscale_as_pil_converts_them(tmp_path):
    rgb = np.random.default_rng(5).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    gray = np.stack([np.asarray(PILImage.fromarray(x).convert("L")) for x in rgb])
    image_dataset(rgb, [0, 1, 2] * 2).save_to_disk(str(tmp_path / "rgb"))
    array_feature = datasets.Array3D((8, 8, 3), "uint8")
    image_dataset(rgb, [0, 1, 2] * 2, image_feature=array_feature).save_to_disk(str(tmp_path / "arrays"))
    for name in ("rgb", "arrays"):
        path = str(tmp_path / name)
        dm = ImageClassificationDataModule(train_file=path, test_file=path, batch_size=6)
        dm.setup("fit")
        assert_batches_match(dm, gray, [0, 1, 2] * 2, gray)


def test_missing_label_column_lists_the_columns(tmp_path):
    dataset = image_dataset(random_images(4), [0, 1, 2, 0]).rename_column("label", "target")
    dataset.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"column 'label' is not in .*saved'; (its|available) columns: image, target"):
        ImageClassificationDataModule(train_file=str(tmp_path / "saved")).setup("fit")
    path = write_table(tmp_path / "x.parquet", pixel_rows(random_images(3, 2), [0, 1, 0]))
    with pytest.raises(
        DataError, match=r"column 'kind' is not in .*x\.parquet'; (its|available) columns: label, p0, p1, p2, p3"
    ):
        ImageClassificationDataModule(train_file=path, label_column="kind").setup("fit")


def test_non_square_images_are_refused(tmp_path):
    images = np.zeros((4, 8, 6), dtype=np.uint8)
    image_dataset(images, [0, 1, 2, 0]).save_to_disk(str(tmp_path / "wide"))
    with pytest.raises(DataError, match=r"images in column 'image' of '.*wide' have shape \(8, 6\); expected square"):
        ImageClassificationDataModule(train_file=str(tmp_path / "wide")).setup("fit")


@pytest.mark.parametrize("image_feature", [None, datasets.List(datasets.List(datasets.Value("uint8")))])
def test_mixed_image_sizes_name_the_first_odd_one(tmp_path, image_feature):
    images = [np.zeros((8, 8), dtype=np.uint8)] * 3 + [np.zeros((6, 6), dtype=np.uint8)] + [np.zeros((5, 5))] * 2
    image_dataset(images, [0, 1, 2, 0, 1, 2], image_feature=image_feature).save_to_disk(str(tmp_path / "mixed"))
    with pytest.raises(
        DataError, match=r"image 3 in column 'image' of '.*mixed' has shape \(6, 6\), image 0 has \(8, 8\); all images"
    ):
        ImageClassificationDataModule(train_file=str(tmp_path / "mixed")).setup("fit")


def test_a_size_change_between_decoded_batches_is_found(tmp_path):
    images = [np.full((4, 4), 7, dtype=np.uint8)] * 1024 + [np.zeros((3, 3), dtype=np.uint8)]  # batches of 1024
    feature = datasets.List(datasets.List(datasets.Value("uint8")))
    image_dataset(images, [0, 1] * 512 + [2], image_feature=feature).save_to_disk(str(tmp_path / "late"))
    with pytest.raises(DataError, match=r"image 1024 in column 'image' of '.*late' has shape \(3, 3\), image 0 has"):
        ImageClassificationDataModule(train_file=str(tmp_path / "late")).setup("fit")


def test_empty_label_of_a_parquet_table_names_the_row(tmp_path):
    path = write_table(tmp_path / "x.parquet", pixel_rows(random_images(4, 2), ["cat", "dog", " ", "cat"]))
    with pytest.raises(DataError, match=r"x\.parquet', row 2 \(0-based\): label ' ' in column 'label' is empty"):
        ImageClassificationDataModule(train_file=path).setup("fit")
