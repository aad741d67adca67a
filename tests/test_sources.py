"""Data sources through Hugging Face ``datasets``: every file format, saved datasets, splits, the map cache, errors."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import datasets
import huggingface_hub
import pytest

from lightning_efficient import DataError, MLMDataModule, TextClassificationDataModule, TranslationDataModule
from lightning_efficient.data.sources import load_source
from lightning_efficient.data.text import PackBlocks
from lightning_efficient.data.tokenized import TextColumns


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_EFFICIENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network in tests: the hub answers at once
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture()
def rows(brown_rows) -> list[dict]:
    return [{"sentence": r["text"], "category": r["genre"], "source_doc": r["doc"]} for r in brown_rows]


def write_formats(root, rows) -> dict[str, str]:
    """The same rows as parquet, tsv, gzipped csv, a json array, a saved Dataset and a DatasetDict."""
    table = datasets.Dataset.from_list(rows)
    paths = {name: root / name for name in ("rows.parquet", "rows.tsv", "rows.csv.gz", "rows.json", "saved", "dict")}
    table.to_parquet(str(paths["rows.parquet"]))
    table.to_csv(str(paths["rows.tsv"]), sep="\t", index=False)
    with gzip.open(paths["rows.csv.gz"], "wt", encoding="utf-8") as handle:
        table.to_pandas().to_csv(handle, index=False)
    paths["rows.json"].write_text(json.dumps(rows), encoding="utf-8")
    table.save_to_disk(str(paths["saved"]))
    datasets.DatasetDict({"train": table, "validation": table.select(range(50))}).save_to_disk(str(paths["dict"]))
    return {name: str(path) for name, path in paths.items()}


def test_every_source_gives_the_same_rows(tmp_path, rows, user_files):
    paths = write_formats(tmp_path, rows)
    expected = [r["sentence"] for r in rows]
    for spec in [*paths.values(), user_files["jsonl"], user_files["jsonl_gz"], user_files["csv"]]:
        table = load_source(spec, ["sentence", "category"])
        assert table.column_names == ["sentence", "category"], spec
        assert table["sentence"] == expected, spec
    assert load_source(user_files["txt"], ["sentence"], text_column="sentence")["sentence"] == expected
    assert len(load_source(paths["dict"], ["sentence"], role="validation")) == 50  # the role picks the split
    assert len(load_source(paths["dict"] + "#validation", ["sentence"])) == 50  # or '#split' does
    folder = tmp_path / "folder"  # a directory of data files: datasets.load_dataset, as for a hub id
    folder.mkdir()
    (folder / "train.jsonl").write_text(Path(user_files["jsonl"]).read_text(encoding="utf-8"), encoding="utf-8")
    assert load_source(str(folder), ["sentence"])["sentence"] == expected


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "rows.xlsx", r"unsupported format '\.xlsx'; allowed: \.jsonl, \.json, \.csv, \.tsv, \.parquet"),
        (lambda p: p / "missing.parquet", r"missing\.parquet' does not exist"),
        (lambda p: (p / "empty.jsonl").write_text("") or p / "empty.jsonl", r"empty\.jsonl' is empty"),
        (lambda p: (p / "head.csv").write_text("sentence,category\n") and p / "head.csv", r"head\.csv' holds no rows"),
        (lambda p: "nobody/no-such-dataset", r"hub dataset 'nobody/no-such-dataset' cannot be loaded \(a local file"),
    ],
)
def test_bad_sources_fail_in_one_line_naming_them(tmp_path, make, message):
    spec = make(tmp_path)
    with pytest.raises(DataError, match=message) as caught:
        load_source(str(spec), ["sentence"])
    assert "\n" not in str(caught.value)


def test_missing_columns_and_splits_list_what_is_there(tmp_path, rows):
    paths = write_formats(tmp_path, rows)
    with pytest.raises(DataError, match=r"column 'text' is not in data file .*rows\.parquet'; available columns: "
                       r"category, sentence, source_doc"):  # fmt: skip
        load_source(paths["rows.parquet"], ["text"])
    with pytest.raises(DataError, match=r"'.*dict' has no split 'test'; its splits: train, validation"):
        load_source(paths["dict"], ["sentence"], role="test")
    with pytest.raises(DataError, match=r"rows\.parquet' holds one table; '#train' names a split only of a dataset"):
        load_source(paths["rows.parquet"] + "#train", ["sentence"])


def test_a_json_column_that_changes_type_is_named_with_its_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": "x"}\n')
    with pytest.raises(DataError, match=r"mixed\.jsonl', line 3: column 'label' holds a string \('x'\), but line 1"):
        load_source(str(path), ["text", "label"])


def test_the_second_setup_reads_the_cache_and_maps_nothing(tmp_path, user_files, monkeypatch):
    calls = []
    original = PackBlocks.__call__
    monkeypatch.setattr(PackBlocks, "__call__", lambda self, batch: calls.append(1) or original(self, batch))
    first = MLMDataModule(train_files=[user_files["txt"]], vocab_size=300, max_length=17, batch_size=4)
    first.setup("fit")
    assert calls
    calls.clear()
    second = MLMDataModule(train_files=[user_files["txt"]], vocab_size=300, max_length=17, batch_size=4)
    second.setup("fit")
    assert not calls  # the blocks came from the Arrow cache
    assert [second.splits["train"][i] for i in range(5)] == [first.splits["train"][i] for i in range(5)]
    third = MLMDataModule(train_files=[user_files["txt"]], vocab_size=300, max_length=21, batch_size=4)
    third.setup("fit")
    assert calls  # another setting maps again


def test_mlm_blocks_are_the_same_from_any_format_and_in_two_processes(tmp_path, rows, user_files):
    paths = write_formats(tmp_path, rows)
    options = {"text_column": "sentence", "vocab_size": 300, "max_length": 17, "batch_size": 4}
    reference = MLMDataModule(train_files=[user_files["txt"]], **options)
    reference.setup("fit")
    saved = MLMDataModule(train_files=[paths["saved"]], **options)
    saved.setup("fit")
    assert list(saved.splits["train"]) == list(reference.splits["train"])
    texts = [row["sentence"] for row in rows]
    two = MLMDataModule(train_files=[paths["rows.parquet"]], num_proc=2, **options)
    blocks = two.block_table([paths["rows.parquet"]])["input_ids"]
    halves = reference.blocks(texts[:300]) + reference.blocks(texts[300:])  # each process packs its half
    assert blocks == halves


def test_classification_and_translation_read_parquet_and_saved_datasets(tmp_path, rows, user_files):
    paths = write_formats(tmp_path, rows)
    dm = TextClassificationDataModule(
        train_files=[paths["saved"]], text_column="sentence", label_column="category", vocab_size=200, batch_size=8
    )
    assert dm.label_names == ["fiction", "learned", "news"]
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["labels"].shape == (8,)
    pairs = datasets.Dataset.from_json(user_files["pairs"])
    pairs.to_parquet(str(tmp_path / "pairs.parquet"))
    mt = TranslationDataModule(
        train_files=[str(tmp_path / "pairs.parquet")], source_column="src", target_column="tgt", vocab_size=300,
        max_length=48, batch_size=4,
    )  # fmt: skip
    mt.setup("fit")
    assert next(iter(mt.train_dataloader()))["input_ids"].shape[0] == 4


def test_a_tokenizer_trained_on_a_source_is_cached_by_its_fingerprint(tmp_path, rows, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(row["sentence"] for row in rows[:300]) + "\n", encoding="utf-8")
    options = {"train_files": [str(path)], "vocab_size": 200}
    first = MLMDataModule(**options).tokenizer
    with monkeypatch.context() as patch:  # the second run does not read the corpus again to hash it
        patch.setattr(TextColumns, "__iter__", lambda self: pytest.fail("the corpus was read again"))
        assert MLMDataModule(**options).tokenizer.to_str() == first.to_str()
    path.write_text("\n".join(row["sentence"] for row in rows[300:]) + "\n", encoding="utf-8")
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 10))  # a new version of the file
    assert MLMDataModule(**options).tokenizer.to_str() != first.to_str()
