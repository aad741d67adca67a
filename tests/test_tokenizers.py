import pytest
import torch

from lightning_efficient import CheckpointMismatchError, ConfigurationError, DataError
from lightning_efficient.data.tokenizers import (
    BERT_SPECIAL_TOKENS,
    CHECKPOINT_KEY,
    MT_SPECIAL_TOKENS,
    cache_dir,
    cached_tokenizer,
    check_special_tokens,
    load_tokenizer,
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
