"""Shared fixtures: small user data files in every supported format, and a tiny MLM DataModule over them."""

from __future__ import annotations

import csv
import gzip
import json
import sys
import warnings
from pathlib import Path

import pytest

from lightning_efficient import BertMLM, MLMDataModule
from lightning_efficient.data.files import embedded_path, read_records
from lightning_efficient.testing import quiet_trainer

# Shared test helpers (``techniques.py``: the contract suite's table) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


@pytest.fixture(scope="session")
def brown_rows() -> list[dict]:
    """600 real Brown sentences: 20 from each of 10 documents of three genres."""
    rows = read_records(embedded_path("brown.jsonl.gz"))
    by_doc: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_doc.setdefault((row["genre"], row["doc"]), []).append(row)
    chosen = []
    for genre in ("news", "fiction", "learned"):
        docs = [rows for (g, _), rows in by_doc.items() if g == genre][:10]
        chosen.extend(row for doc in docs for row in doc[:20])
    return chosen


@pytest.fixture(scope="session")
def user_files(tmp_path_factory: pytest.TempPathFactory, brown_rows: list[dict]) -> dict[str, str]:
    """A user's own data in jsonl, gzipped jsonl, csv and txt, with non-default column names."""
    root = tmp_path_factory.mktemp("user_data")
    paths = {
        "jsonl": root / "sentences.jsonl",
        "jsonl_gz": root / "sentences.jsonl.gz",
        "csv": root / "sentences.csv",
        "txt": root / "sentences.txt",
        "pairs": root / "pairs.jsonl",
    }
    rows = [{"sentence": r["text"], "category": r["genre"], "source_doc": r["doc"]} for r in brown_rows]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    paths["jsonl"].write_text(lines, encoding="utf-8")
    with gzip.open(paths["jsonl_gz"], "wt", encoding="utf-8") as handle:
        handle.write(lines)
    with open(paths["csv"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sentence", "category", "source_doc"])
        writer.writeheader()
        writer.writerows(rows)
    paths["txt"].write_text("\n".join(r["sentence"] for r in rows) + "\n", encoding="utf-8")
    bible = read_records(embedded_path("bible_en_fr.jsonl.gz"))[:400]
    paths["pairs"].write_text(
        "".join(json.dumps({"src": b["en"], "tgt": b["fr"]}) + "\n" for b in bible), encoding="utf-8"
    )
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def mlm_data(user_files: dict[str, str]) -> MLMDataModule:
    """The user's txt file as MLM data (vocab 300, blocks of 17 tokens, batch 4), set up for ``fit``; one per test module."""
    dm = MLMDataModule(train_files=[user_files["txt"]], vocab_size=300, max_length=17, batch_size=4)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def mlm_checkpoint(mlm_data: MLMDataModule, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, BertMLM]:
    """A tiny ``BertMLM`` (max_length 64) trained 2 steps on ``mlm_data`` (the module's own, where it has one), and its checkpoint path."""
    model = BertMLM(vocab_size=mlm_data.vocab_size, preset="tiny", max_length=64)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, mlm_data)
    path = tmp_path_factory.mktemp("ckpt") / "mlm.ckpt"
    trainer.save_checkpoint(path)
    return str(path), model


@pytest.fixture
def root(tmp_path: Path) -> str:
    """A run directory for Trainer outputs."""
    return str(tmp_path / "run")
