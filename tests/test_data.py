import json

import numpy as np
import pytest
import torch

from lightning_efficient import (
    BROWN_PROSE,
    ConfigurationError,
    DataError,
    ImageClassificationDataModule,
    MLMDataModule,
    TextClassificationDataModule,
    TranslationDataModule,
)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv"])
def test_mlm_blocks_from_user_files(user_files, fmt):
    dm = MLMDataModule(
        train_files=[user_files[fmt]], text_column="sentence", vocab_size=400, max_length=33, batch_size=4
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 33)
    assert (batch["input_ids"][:, 0] == 2).all() and (batch["input_ids"][:, -1] == 3).all()  # [CLS] ... [SEP]
    assert batch["attention_mask"].all()
    sizes = {name: len(part) for name, part in dm.splits.items()}
    assert sizes["val"] >= 1 and sizes["test"] >= 1 and sizes["train"] > sizes["val"]


def test_mlm_blocks_cover_the_stream_in_order(user_files):
    dm = MLMDataModule(train_files=[user_files["txt"]], text_column="sentence", vocab_size=400, max_length=20)
    texts = dm.tokenizer_training_texts()
    stream = [i for e in dm.tokenizer.encode_batch(texts, add_special_tokens=False) for i in e.ids]
    blocks = dm.blocks(texts)
    assert [i for b in blocks for i in b[1:-1]] == stream[: 18 * len(blocks)]
    assert len(stream) - 18 * len(blocks) < 18


def test_mlm_missing_column(user_files):
    dm = MLMDataModule(train_files=[user_files["csv"]], text_column="body", vocab_size=400)
    with pytest.raises(DataError, match=r"column 'body' is not in data file .*sentences\.csv"):
        dm.setup("fit")


def test_mlm_missing_file(tmp_path):
    dm = MLMDataModule(train_files=[str(tmp_path / "corpus.txt")])
    with pytest.raises(DataError, match=r"corpus\.txt' does not exist"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, r"batch_size=0 must be a positive integer"),
        ({"val_fraction": 0.7}, r"val_fraction=0.7 must lie in \[0, 0.5\)"),
        ({"max_length": 4}, r"max_length=4 must be at least 8"),
        ({"vocab_size": 3}, r"vocab_size=3 must be larger than the 5 special tokens"),
    ],
)
def test_mlm_bad_arguments(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        MLMDataModule(**kwargs)


def test_classification_user_csv_with_label_map(user_files):
    dm = TextClassificationDataModule(
        train_files=[user_files["csv"]], text_column="sentence", label_column="category", label_map=BROWN_PROSE,
        group_column="source_doc", vocab_size=500, max_length=17, batch_size=8,
    )  # fmt: skip
    assert dm.label_names == ["imaginative", "informative"]
    assert dm.model_arguments()["num_labels"] == 2
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 17
    assert set(batch["labels"].tolist()) <= {0, 1}
    # Texts longer than max_length keep their closing [SEP].
    lengths = batch["attention_mask"].sum(1)
    assert all(batch["input_ids"][row, int(n) - 1] == 3 for row, n in enumerate(lengths))


def test_classification_split_keeps_documents_apart(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [
        f'{{"text": "doc{d} sentence {i}", "label": "{d % 3}", "doc": "d{d}"}}' for d in range(30) for i in range(5)
    ]
    path.write_text("\n".join(rows) + "\n")
    dm = TextClassificationDataModule(
        train_files=[str(path)],
        label_column="label",
        group_column="doc",
        vocab_size=200,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    dm.tokenizer_training_texts()
    docs = {name: {text.split()[0] for text in dm._rows[name][0]} for name in ("train", "val", "test")}
    assert len(docs["val"]) == len(docs["test"]) == 6 and len(docs["train"]) == 18
    assert not docs["train"] & docs["val"] and not docs["train"] & docs["test"] and not docs["val"] & docs["test"]
    assert all(len(dm._rows[name][0]) == 5 * len(docs[name]) for name in docs)  # whole documents


def test_classification_label_not_in_map(user_files):
    dm = TextClassificationDataModule(
        train_files=[user_files["jsonl"]], text_column="sentence", label_column="category", label_map={"news": "a"}
    )
    with pytest.raises(
        DataError, match=r"labels \['fiction', 'learned'\] of column 'category' .* are not keys of label_map"
    ):
        _ = dm.label_names


def test_classification_single_label_is_rejected(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text("".join(f'{{"text": "sentence {i}", "genre": "news"}}\n' for i in range(50)))
    dm = TextClassificationDataModule(train_files=[str(path)])
    with pytest.raises(
        DataError, match=r"has 1 distinct label\(s\) in the training split; classification needs at least 2"
    ):
        _ = dm.num_labels


def test_translation_pairs_filtered_and_labels_padded(user_files):
    dm = TranslationDataModule(
        train_files=[user_files["pairs"]], source_column="src", target_column="tgt", vocab_size=600, max_length=40,
        batch_size=6, val_fraction=0.1, test_fraction=0.1,
    )  # fmt: skip
    dm.setup("fit")
    kept = sum(len(part) for part in dm.splits.values())
    assert 0 < kept < 400  # long verses are left out
    for src, tgt, _, _ in dm.splits["train"]:
        assert len(src) <= 40 and len(tgt) <= 40
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].shape[0] == 6 and len(batch["target_text"]) == 6
    padded = batch["labels"] == -100
    assert padded.any() and ((batch["labels"] >= 0) | padded).all()
    assert dm.tokenizer.decode(batch["input_ids"][0].tolist()) == batch["source_text"][0]


def test_translation_missing_target_column(user_files):
    dm = TranslationDataModule(train_files=[user_files["pairs"]], source_column="src", target_column="fr")
    with pytest.raises(DataError, match=r"column 'fr' is not in data file .*available columns: src, tgt"):
        dm.setup("fit")


def test_images_default_fashion_mnist():
    dm = ImageClassificationDataModule(batch_size=16)
    assert dm.model_arguments() == {"num_labels": 10, "image_size": 28, "label_names": dm.label_names}
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (16, 1, 28, 28) and batch["pixel_values"].dtype == torch.float32
    train_pixels = dm.splits["train"][0]
    assert abs(float(train_pixels.mean())) < 0.05 and abs(float(train_pixels.std()) - 1) < 0.05
    assert len(dm.splits["test"][0]) == 2000 and len(dm.splits["val"][0]) == 1000


def test_images_from_user_csv(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "digits.csv"
    header = "label," + ",".join(f"pixel{i}" for i in range(36))
    rows = [f"{['cat', 'dog'][i % 2]}," + ",".join(str(v) for v in rng.integers(0, 256, 36)) for i in range(40)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    dm = ImageClassificationDataModule(train_file=str(path), batch_size=5)
    assert dm.model_arguments() == {"num_labels": 2, "image_size": 6, "label_names": ["cat", "dog"]}
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape == (5, 1, 6, 6)


def test_images_non_square_csv(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("label,a,b,c\n1,0,0,0\n")
    with pytest.raises(DataError, match=r"has 3 pixel columns besides 'label'; expected a square image"):
        ImageClassificationDataModule(train_file=str(path)).setup("fit")


def test_images_npz_missing_arrays(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((4, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError, match=r"lacks arrays \['train_images', 'train_labels'\]"):
        ImageClassificationDataModule(train_file=str(tmp_path / "x.npz")).setup("fit")


# -- bad data is caught before training, naming the file and the line -----------------------------
def write_jsonl(path, labels) -> str:
    """One row per label (``MISSING``: no label key), with a blank line after the first row."""
    rows = []
    for i, label in enumerate(labels):
        row = {"text": f"sentence number {i} about {'cats' if i % 2 else 'dogs'}"}
        if label is not MISSING:
            row["label"] = label
        rows.append(json.dumps(row))
    path.write_text(rows[0] + "\n\n" + "\n".join(rows[1:]) + "\n")  # row i + 1 is on line i + 2
    return str(path)


MISSING = object()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        # A json column whose values change kind cannot be one Arrow column: the reader names the line.
        ("1", r"line 5: column 'label' holds a string \('1'\), but line 1 holds a number \(0\)"),
        ([1], r"line 5: column 'label' holds a list \(\[1\]\), but line 1 holds a number"),
        ("", r"line 5: column 'label' holds a string \(''\), but line 1 holds a number"),
        (None, r"row 4: label None in column 'label' is empty"),
        (MISSING, r"row 4: label None in column 'label' is empty"),  # a row without the column reads as None
    ],
)
def test_classification_bad_label_names_file_line_and_value(tmp_path, bad, message):
    labels = [0, 1, 0, bad, 1, 0, 1, 0, 1, 0]
    dm = TextClassificationDataModule(train_files=[write_jsonl(tmp_path / "mixed.jsonl", labels)], label_column="label")
    with pytest.raises(DataError, match=r"data file .*mixed\.jsonl', " + message):
        _ = dm.label_names


def test_classification_int_and_float_labels_are_one_numeric_column(tmp_path):
    dm = TextClassificationDataModule(
        train_files=[write_jsonl(tmp_path / "numbers.jsonl", [0, 1, 0, 1.0, 1, 0, 1, 0, 1, 0])], label_column="label"
    )
    assert dm.label_names == ["0.0", "1.0"]  # Arrow reads the column as float64: two classes, not three


def test_classification_label_type_is_fixed_across_files(tmp_path):
    ints = write_jsonl(tmp_path / "ints.jsonl", [0, 1] * 10)
    strings = write_jsonl(tmp_path / "strings.jsonl", ["0", "1"] * 10)
    dm = TextClassificationDataModule(train_files=[ints], val_files=[strings], label_column="label")
    with pytest.raises(DataError, match=r"strings\.jsonl', row 1: label '0' .* is a str, but the first label \(row 1 of .*ints"):
        _ = dm.label_names


def test_classification_explicit_label_names_are_compared_as_text_in_their_order(tmp_path):
    path = write_jsonl(tmp_path / "ints.jsonl", [1, 0, 1, 0] * 5)  # odd rows: cats, label 0
    dm = TextClassificationDataModule(
        train_files=[path], label_column="label", label_names=["1", "0"], vocab_size=100, batch_size=4
    )
    assert dm.label_names == ["1", "0"] and dm.num_labels == 2
    dm.setup("fit")
    texts, labels = dm._rows["train"]
    assert {label for _, label in dm.splits["train"]} == {0, 1}
    assert all(label == ("0" if "cats" in text else "1") for text, label in zip(texts, labels))
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [1, 0, 2, 1] * 5)
    with pytest.raises(DataError, match=r"unknown\.jsonl', row 3: label '2' is not one of label_names \['1', '0'\]"):
        _ = TextClassificationDataModule(
            train_files=[unknown], label_column="label", label_names=["1", "0"]
        ).label_names
    with pytest.raises(ConfigurationError, match=r"label_names=\['a', 'a'\] must hold at least 2 distinct names"):
        TextClassificationDataModule(label_names=["a", "a"])


def test_mlm_fewer_blocks_than_one_batch_names_the_counts(user_files):
    dm = MLMDataModule(train_files=[user_files["txt"]], vocab_size=400, max_length=128, batch_size=512)
    with pytest.raises(
        DataError,
        match=r"the training split holds \d+ blocks of 128 tokens from \[.*sentences\.txt'\], "
        r"fewer than one batch of batch_size=512",
    ):
        dm.setup("fit")


def write_npz(path, train_images, train_labels, **test) -> str:
    np.savez(path, train_images=train_images, train_labels=train_labels, **test)
    return str(path)


def images(n: int, side: int = 6) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, side, side)).astype(np.uint8)


def test_images_label_count_must_match_image_count(tmp_path):
    path = write_npz(tmp_path / "x.npz", images(10), np.arange(9) % 2)
    with pytest.raises(DataError, match=r"x\.npz' holds 10 train images but 9 train labels"):
        ImageClassificationDataModule(train_file=path).setup("fit")
    path = write_npz(tmp_path / "y.npz", images(10), np.arange(10) % 2, test_images=images(4), test_labels=[0, 1])
    with pytest.raises(DataError, match=r"y\.npz' holds 4 test images but 2 test labels"):
        ImageClassificationDataModule(train_file=path).setup("fit")


def test_images_label_outside_the_classes(tmp_path):
    labels = np.array([0, 1, 0, -1, 1, 0, 1, 0, 1, 0])
    path = write_npz(tmp_path / "x.npz", images(10), labels)
    with pytest.raises(DataError, match=r"train label -1 \(image 3\) of '.*x\.npz' lies outside \[0, 2\)"):
        ImageClassificationDataModule(train_file=path, label_names=["cat", "dog"]).setup("fit")
    test_labels = np.array([0, 1, 2, 1])
    path = write_npz(tmp_path / "y.npz", images(10), labels.clip(0), test_images=images(4), test_labels=test_labels)
    with pytest.raises(DataError, match=r"test label 2 \(image 2\) of '.*y\.npz' lies outside \[0, 2\)"):
        ImageClassificationDataModule(train_file=path, label_names=["cat", "dog"]).setup("fit")


def test_images_test_size_must_match_training(tmp_path):
    path = write_npz(
        tmp_path / "x.npz", images(10), np.arange(10) % 2, test_images=images(4, 8), test_labels=[0, 1] * 2
    )
    with pytest.raises(DataError, match=r"test images of '.*x\.npz' are \(8, 8\) pixels, training images .* \(6, 6\)"):
        ImageClassificationDataModule(train_file=path).setup("fit")


def test_images_non_finite_pixel_is_named(tmp_path):
    pixels = images(10).astype(np.float32)
    pixels[7, 2, 3] = np.inf
    path = write_npz(tmp_path / "x.npz", pixels, np.arange(10) % 2)
    with pytest.raises(DataError, match=r"train image 7 of '.*x\.npz' holds a non-finite pixel \(inf\)"):
        ImageClassificationDataModule(train_file=path).setup("fit")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("cat,1,2,3,", r"bad\.csv', line 3: pixel column 'pixel3' holds '', not a number"),
        ("cat,1,2,nan,4", r"train image 1 of '.*bad\.csv' holds a non-finite pixel \(nan\)"),
        (",1,2,3,4", r"bad\.csv', line 3: label '' in column 'label' is empty"),
    ],
)
def test_images_bad_csv_row_is_named(tmp_path, row, message):
    path = tmp_path / "bad.csv"
    path.write_text("label,pixel0,pixel1,pixel2,pixel3\ndog,0,1,2,3\n" + row + "\n" + "cat,4,5,6,7\n" * 8)
    with pytest.raises(DataError, match=message):
        ImageClassificationDataModule(train_file=str(path)).setup("fit")
