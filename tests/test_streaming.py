"""Streaming MLM data: blocks in stream order, exact resume (one process through Lightning, two gloo ranks), errors."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_efficient import BertMLM, ConfigurationError, DataError, MLMDataModule, RandomStates
from lightning_efficient.data.streaming import StreamingDataLoader
from lightning_efficient.testing import quiet_trainer

STREAM = {"streaming": True, "val_fraction": 0.0, "test_fraction": 0.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, brown_rows) -> str:
    """600 Brown sentences, each line made unique (so blocks of different lines never coincide)."""
    path = tmp_path_factory.mktemp("stream") / "corpus.txt"
    path.write_text("".join(f"{row['text']} line{i}\n" for i, row in enumerate(brown_rows)), encoding="utf-8")
    return str(path)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LIGHTNING_EFFICIENT_CACHE", str(tmp_path_factory.getbasetemp() / "stream_cache"))


def streamed(corpus: str, **kwargs) -> MLMDataModule:
    options = {"vocab_size": 300, "max_length": 12, "batch_size": 4, **STREAM, **kwargs}
    return MLMDataModule(train_files=[corpus], **options)


def test_stream_without_shuffle_gives_the_blocks_of_the_whole_corpus_in_order(corpus):
    dm = streamed(corpus, shuffle_buffer=1)
    dm.setup("fit")
    texts = Path(corpus).read_text(encoding="utf-8").splitlines()
    reference = dm.blocks(texts)  # packed at once: 600 texts are one packing batch
    per_pass = len(reference) // 4
    got = torch.cat([batch["input_ids"] for batch in itertools.islice(dm.train_dataloader(), per_pass)])
    assert torch.equal(got, torch.tensor(reference[: 4 * per_pass]))


def test_shuffled_stream_permutes_blocks_and_repeats_without_end(corpus):
    dm = streamed(corpus, shuffle_buffer=32, batch_size=64)
    dm.setup("fit")
    texts = Path(corpus).read_text(encoding="utf-8").splitlines()
    reference = Counter(tuple(block) for block in dm.blocks(texts))
    blocks = [
        tuple(row) for batch in itertools.islice(dm.train_dataloader(), 60) for row in batch["input_ids"].tolist()
    ]
    first_pass = blocks[: len(reference) - 32]  # out before the second pass's first block enters the buffer
    assert not Counter(first_pass) - reference  # blocks of the corpus, each at most as often as it occurs there
    assert blocks[:50] != [tuple(b) for b in dm.blocks(texts)[:50]]  # in a shuffled order
    assert len(blocks) == 60 * 64 > reference.total()  # the second pass follows the first


def test_lightning_resume_mid_stream_equals_the_uninterrupted_run(corpus, tmp_path):
    def fit(steps: int, ckpt_path: str | None = None, root: Path = tmp_path / "run") -> BertMLM:
        torch.manual_seed(0)
        dm = streamed(corpus, shuffle_buffer=24)
        dm.prepare_data()
        model = BertMLM(vocab_size=dm.vocab_size, preset="tiny", max_length=12)
        saver = ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1, filename="{step}")
        trainer = quiet_trainer(
            max_steps=steps,
            limit_val_batches=0,
            enable_checkpointing=True,
            callbacks=[RandomStates(), saver],
            default_root_dir=root,
        )
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model

    uninterrupted = fit(7)
    resumed = fit(7, ckpt_path=str(tmp_path / "run" / "step=3.ckpt"), root=tmp_path / "resumed")
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    state = torch.load(tmp_path / "run" / "step=3.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    position = state["combined_loader"][0]["ranks"][0]
    assert position["buffer"].shape == (24 - 1, 12)  # the shuffle buffer travels in the checkpoint


def test_a_loader_saves_the_position_before_the_batch_lightning_fetched_ahead(corpus):
    dm = streamed(corpus, shuffle_buffer=8)
    dm.setup("fit")
    look = iter(dm.train_dataloader())  # e.g. the plan reads a batch first: the run must still start at the top
    next(look), next(look)
    loader = StreamingDataLoader(dm.stream, trainer_prefetch=True, batch_size=4, collate_fn=torch.tensor)
    batches = iter(loader)
    first, second = next(batches), next(batches)  # Lightning: training on `first`, `second` fetched ahead
    resumed = StreamingDataLoader(dm.stream, batch_size=4, collate_fn=torch.tensor)
    resumed.load_state_dict(loader.state_dict())
    assert torch.equal(next(iter(resumed)), second)  # the position after `first`
    fresh = StreamingDataLoader(dm.stream, trainer_prefetch=True, batch_size=4, collate_fn=torch.tensor)
    again = iter(fresh)
    assert torch.equal(next(again), first)
    restarted = StreamingDataLoader(dm.stream, batch_size=4, collate_fn=torch.tensor)
    restarted.load_state_dict(fresh.state_dict())  # after one batch handed out: the position is the start
    assert torch.equal(next(iter(restarted)), first)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 0.1}, r"cannot hold out val_fraction=0.1 .* give val_files, or set val_fraction: 0"),
        ({"test_fraction": 0.1}, r"cannot hold out test_fraction=0.1 .* set test_fraction: 0"),
        ({"num_workers": 2}, r"num_workers=2 must be 0"),
        ({"shuffle_buffer": 0}, r"shuffle_buffer=0 must be a positive number of blocks"),
        ({"num_proc": 0}, r"num_proc=0 must be a positive number of processes"),
    ],
)
def test_streaming_settings_that_need_the_corpus_length_fail_at_once(corpus, kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        streamed(corpus, **kwargs)


def test_streaming_needs_max_steps_and_validation_in_steps(corpus, tmp_path):
    model = BertMLM(vocab_size=300, preset="tiny", max_length=12)
    with pytest.raises(ConfigurationError, match=r"trainer\.max_steps; set it"):
        quiet_trainer(max_epochs=1, default_root_dir=tmp_path).fit(model, streamed(corpus))
    with pytest.raises(ConfigurationError, match=r"val_check_interval=1\.0 \(a fraction of one\) would never validate"):
        quiet_trainer(max_steps=2, default_root_dir=tmp_path).fit(model, streamed(corpus, val_files=[corpus]))


def test_lightning_ddp_resume_mid_stream_equals_the_uninterrupted_run(corpus, tmp_path):
    dm = streamed(corpus)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(dm.tokenizer.to_str(), encoding="utf-8")
    worker = Path(__file__).with_name("stream_worker.py")
    subprocess.run(
        [sys.executable, str(worker), corpus, str(tokenizer), str(tmp_path)],
        check=True, timeout=600, capture_output=True,
    )  # fmt: skip
    ranks = [torch.load(tmp_path / f"fit_rank{r}.pt", weights_only=True) for r in range(2)]
    for rank in ranks:
        after_three = [(step, batch) for step, batch in rank["whole_batches"] if step >= 3]
        assert [step for step, _ in rank["resumed_batches"]] == [3, 4, 5]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(after_three, rank["resumed_batches"], strict=True))
        for name, value in rank["whole"].items():
            assert torch.equal(value, rank["resumed"][name]), name
    seen = [{tuple(row) for _, batch in rank["whole_batches"] for row in batch.tolist()} for rank in ranks]
    assert not seen[0] & seen[1]  # each rank trains on its own share


def test_a_stream_without_text_fails_instead_of_spinning(corpus, tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(streamed(corpus).tokenizer.to_str(), encoding="utf-8")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\n", encoding="utf-8")
    dm = streamed(str(blank), tokenizer=str(tokenizer))
    dm.setup("fit")
    with pytest.raises(DataError, match="the streamed corpus holds no text for this process"):
        next(iter(dm.train_dataloader()))
