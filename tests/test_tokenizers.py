import json
import os
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from lightning_efficient import CheckpointMismatchError, ConfigurationError, DataError
from lightning_efficient.data.tokenizers import (
    BERT_SPECIAL_TOKENS,
    CHECKPOINT_KEY,
    MT_SPECIAL_TOKENS,
    cache_dir,
    cached_tokenizer,
    check_special_tokens,
    load_tokenizer,
    train_wordpiece,
)

TEXTS = ["The quick brown fox jumps over the lazy dog .", "Le renard brun saute par-dessus le chien paresseux ."] * 20


def test_wordpiece_special_ids_and_framing():
    tok = cached_tokenizer("wordpiece", TEXTS, vocab_size=120)
    assert [tok.token_to_id(t) for t in BERT_SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    ids = tok.encode("The quick dog").ids
    assert ids[0] == tok.token_to_id("[CLS]") and ids[-1] == tok.token_to_id("[SEP]")
    assert tok.decode(ids) == "the quick dog"  # lower-cased WordPiece


def test_bpe_special_ids_and_round_trip():
    tok = cached_tokenizer("bpe", TEXTS, vocab_size=150)
    assert [tok.token_to_id(t) for t in MT_SPECIAL_TOKENS] == [0, 1, 2]
    ids = tok.encode("Le renard brun").ids
    assert ids[-1] == tok.token_to_id("</s>")
    assert tok.decode(ids) == "Le renard brun"


def test_cache_is_reused_and_keyed_by_texts():
    first = cached_tokenizer("wordpiece", TEXTS, vocab_size=121)
    files = sorted(cache_dir().glob("wordpiece-121-*.json"))
    assert len(files) == 1
    files[0].write_text(files[0].read_text().replace('"[MASK]"', '"[MASK]"'))  # same content, touched
    again = cached_tokenizer("wordpiece", TEXTS, vocab_size=121)
    assert again.get_vocab() == first.get_vocab()
    cached_tokenizer("wordpiece", TEXTS + ["another text entirely"], vocab_size=121)
    assert len(sorted(cache_dir().glob("wordpiece-121-*.json"))) == 2


def test_unknown_kind_and_too_small_vocab():
    with pytest.raises(ConfigurationError, match=r"kind='sentencepiece' is unknown; choose one of: wordpiece, bpe"):
        cached_tokenizer("sentencepiece", TEXTS, 100)
    with pytest.raises(ConfigurationError, match=r"vocab_size=5 must be larger than the 5 special tokens"):
        cached_tokenizer("wordpiece", TEXTS, 5)


def test_load_from_json_and_checkpoint(tmp_path):
    tok = cached_tokenizer("wordpiece", TEXTS, vocab_size=122)
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path / "tokenizer.json").get_vocab() == tok.get_vocab()
    torch.save({CHECKPOINT_KEY: {"module": "BertMLM", "tokenizer": tok.to_str()}}, tmp_path / "a.ckpt")
    assert load_tokenizer(tmp_path / "a.ckpt").get_vocab() == tok.get_vocab()


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.json' does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot be parsed"):
        load_tokenizer(tmp_path / "bad.json")
    torch.save({CHECKPOINT_KEY: {"module": "ViTClassifier"}}, tmp_path / "vit.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"holds no tokenizer \(written by ViTClassifier\)"):
        load_tokenizer(tmp_path / "vit.ckpt")


def test_special_token_check_names_the_problem():
    tok = cached_tokenizer("bpe", TEXTS, vocab_size=150)
    with pytest.raises(ConfigurationError, match=r"has '\[PAD\]' at id None, expected 0"):
        check_special_tokens(tok, BERT_SPECIAL_TOKENS, "x.json")


# -- deterministic training ---------------------------------------------------------------------
_TRAIN_IN_A_FRESH_PROCESS = """
import json, sys
from lightning_efficient.data.tokenizers import train_shared_bpe, train_wordpiece
texts = json.load(open(sys.argv[1], encoding="utf-8"))
print(json.dumps([train_wordpiece(texts, 300, show_progress=False).to_str(),
                  train_shared_bpe(texts, 300, show_progress=False).to_str()]))
"""


def test_training_gives_the_same_ids_in_processes_with_different_hash_seeds(tmp_path, brown_rows):
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps([row["text"] for row in brown_rows]), encoding="utf-8")
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _TRAIN_IN_A_FRESH_PROCESS, str(corpus)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in ("1", "2")
    ]
    (wordpiece_1, bpe_1), (wordpiece_2, bpe_2) = [json.loads(run.communicate(timeout=300)[0]) for run in runs]
    assert wordpiece_1 == wordpiece_2  # vocabulary, ids, normalizer, framing: the whole tokenizer
    assert bpe_1 == bpe_2


def test_wordpiece_continuation_symbols_are_ordinary_tokens():
    texts = ["Café au lait, naïve façade!", "東京 is big; 3.5 km — über-cool.", "the cat sat on the mat"] * 5
    tok = train_wordpiece(texts, vocab_size=200, show_progress=False)
    assert sorted(tok.get_added_tokens_decoder()) == [0, 1, 2, 3, 4]  # only the real specials are special
    vocab = tok.get_vocab()
    trained_symbols = {t for t in vocab if t.startswith("##") and len(t) == 3}
    assert {"##a", "##f", "##e", "##5"} <= trained_symbols and not {"##.", "##,", "##;", "##—"} & trained_symbols
    assert max(vocab[t] for t in trained_symbols) < min(vocab[t] for t in ("a", "c", "t"))  # before the alphabet
    assert tok.encode("café naïve").tokens[1:-1] == ["cafe", "naive"]
    assert tok.encode("[MASK] cat").tokens == ["[CLS]", "[MASK]", "cat", "[SEP]"]


# -- the cache ------------------------------------------------------------------------------------
@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LIGHTNING_EFFICIENT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenizers"


def test_corrupt_cache_file_is_rebuilt_with_a_warning(own_cache):
    first = cached_tokenizer("wordpiece", TEXTS, vocab_size=123)
    (path,) = own_cache.glob("wordpiece-123-*.json")
    path.write_text(path.read_text()[:100])  # truncated, as by a full disk
    with pytest.warns(UserWarning, match=rf"cached tokenizer '{re.escape(str(path))}' cannot be loaded"):
        again = cached_tokenizer("wordpiece", TEXTS, vocab_size=123)
    assert again.get_vocab() == first.get_vocab()
    assert Tokenizer.from_file(str(path)).get_vocab() == first.get_vocab()  # the file was written again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached_tokenizer("wordpiece", TEXTS, vocab_size=123)  # and is read without complaint


def test_cache_files_are_readable_by_all_and_written_atomically(own_cache):
    old_umask = os.umask(0o077)
    try:
        cached_tokenizer("bpe", TEXTS, vocab_size=151)
    finally:
        os.umask(old_umask)
    (path,) = own_cache.glob("bpe-151-*.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(own_cache.stat().st_mode) == stat.S_IMODE(own_cache.parent.stat().st_mode) == 0o755
    assert [p.name for p in own_cache.iterdir()] == [path.name]  # no temporary file left behind


def test_failed_cache_write_leaves_no_temporary_file(own_cache, monkeypatch):
    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.warns(UserWarning, match="No space left on device"):
        tok = cached_tokenizer("bpe", TEXTS, vocab_size=152)
    assert tok.token_to_id("</s>") == 1
    assert list(own_cache.iterdir()) == []


@pytest.mark.parametrize("blocked_by", ["a file", "no permission"])
def test_unwritable_cache_warns_naming_the_directory_and_variable(tmp_path, monkeypatch, blocked_by):
    if blocked_by == "a file":
        (tmp_path / "cache").write_text("not a directory")
    else:

        def refuse(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "mkdir", refuse)
    monkeypatch.setenv("LIGHTNING_EFFICIENT_CACHE", str(tmp_path / "cache"))
    where = re.escape(str(tmp_path / "cache" / "tokenizers"))
    with pytest.warns(UserWarning, match=rf"cannot write the tokenizer cache in '{where}'.*LIGHTNING_EFFICIENT_CACHE"):
        tok = cached_tokenizer("wordpiece", TEXTS, vocab_size=124)
    assert tok.encode("the dog").tokens == ["[CLS]", "the", "dog", "[SEP]"]  # training went on
