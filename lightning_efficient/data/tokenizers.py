"""Train, cache and load the subword tokenizers of the package (HF ``tokenizers``, Rust-fast).

- BERT models use a lower-cased WordPiece vocabulary with ``[PAD] [UNK] [CLS] [SEP] [MASK]`` at
  ids 0..4 and ``[CLS] text [SEP]`` framing.
- Translation models use one BPE vocabulary shared by source and target (Metaspace
  pre-tokenisation, as in SentencePiece), with ``<pad> </s> <unk>`` at ids 0..2 and ``text </s>``
  framing.

A trained tokenizer is cached under ``$LIGHTNING_EFFICIENT_CACHE`` (default
``~/.cache/lightning_efficient``) keyed by a hash of its training texts and settings, and it is
written into every checkpoint by the LightningModules, so ``predict`` needs only the checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lightning_efficient.checkpoint import CHECKPOINT_KEY, checkpoint_tokenizer
from lightning_efficient.errors import ConfigurationError, DataError

__all__ = [
    "BERT_SPECIAL_TOKENS",
    "CHECKPOINT_KEY",
    "MT_SPECIAL_TOKENS",
    "cached_tokenizer",
    "check_special_tokens",
    "load_tokenizer",
    "train_shared_bpe",
    "train_wordpiece",
]

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MT_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
_FORMAT_VERSION = "1"


def train_wordpiece(texts: Sequence[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
    """Train a BERT-style lower-cased WordPiece tokenizer on ``texts``.

    Examples:
        >>> tok = train_wordpiece(["the cat sat on the mat"] * 10, vocab_size=60, show_progress=False)
        >>> tok.encode("the cat").tokens
        ['[CLS]', 'the', 'cat', '[SEP]']
    """
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(BERT_SPECIAL_TOKENS), show_progress=show_progress
    )
    return _train_and_frame(
        tokenizer, trainer, texts, ("[CLS]", "[SEP]"), single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1"
    )


def train_shared_bpe(texts: Sequence[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
    """Train one BPE vocabulary for source and target sentences together (translation).

    Examples:
        >>> tok = train_shared_bpe(["le chat", "the cat"] * 10, vocab_size=40, show_progress=False)
        >>> tok.encode("the cat").tokens[-1]
        '</s>'
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(MT_SPECIAL_TOKENS), show_progress=show_progress
    )
    return _train_and_frame(tokenizer, trainer, texts, ("</s>",), single="$A </s>")


def _train_and_frame(
    tokenizer: Tokenizer, trainer: trainers.Trainer, texts: Sequence[str], framing: Sequence[str], **templates: str
) -> Tokenizer:
    """Train ``tokenizer`` on ``texts``, then frame its encodings with ``templates`` (``single``, ``pair``).

    ``framing`` names the special tokens the templates use; they get their ids in the trained vocabulary.
    """
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    special_tokens = [(token, tokenizer.token_to_id(token)) for token in framing]
    tokenizer.post_processor = processors.TemplateProcessing(**templates, special_tokens=special_tokens)
    return tokenizer


_TRAINERS = {"wordpiece": train_wordpiece, "bpe": train_shared_bpe}


def cache_dir() -> Path:
    """Directory of cached tokenizers (``$LIGHTNING_EFFICIENT_CACHE`` or ``~/.cache/lightning_efficient``)."""
    default = Path.home() / ".cache" / "lightning_efficient"
    return Path(os.environ.get("LIGHTNING_EFFICIENT_CACHE", default)) / "tokenizers"


def cached_tokenizer(kind: str, texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Return a tokenizer of ``kind`` trained on ``texts``, from the cache when it was trained before.

    Args:
        kind: ``"wordpiece"`` (BERT) or ``"bpe"`` (shared translation vocabulary).
        texts: Training texts; their content is part of the cache key.
        vocab_size: Target vocabulary size (the trained one can be smaller on a small corpus).

    Raises:
        ConfigurationError: Unknown ``kind`` or a ``vocab_size`` too small for the special tokens.
    """
    if kind not in _TRAINERS:
        raise ConfigurationError(f"tokenizer kind={kind!r} is unknown; choose one of: {', '.join(_TRAINERS)}")
    specials = BERT_SPECIAL_TOKENS if kind == "wordpiece" else MT_SPECIAL_TOKENS
    if vocab_size <= len(specials):
        raise ConfigurationError(f"vocab_size={vocab_size} must be larger than the {len(specials)} special tokens")
    digest = hashlib.sha256(f"{_FORMAT_VERSION}|{kind}|{vocab_size}|".encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    path = cache_dir() / f"{kind}-{vocab_size}-{digest.hexdigest()[:20]}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tokenizer = _TRAINERS[kind](texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp.write(tokenizer.to_str())
    os.replace(tmp.name, path)  # atomic: a concurrent process never reads half a file
    return tokenizer


def load_tokenizer(source: str | Path) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.json`` file or from one of our checkpoints.

    Args:
        source: Path of a ``.json`` tokenizer file or of a ``.ckpt`` written by a module of
            this package.

    Raises:
        DataError: The file does not exist or cannot be parsed.
        CheckpointMismatchError: The checkpoint holds no tokenizer (e.g. a ViT checkpoint).
    """
    path = Path(source)
    if not path.is_file():
        raise DataError(f"tokenizer source {str(path)!r} does not exist; give a tokenizer .json or a .ckpt")
    if path.suffix == ".json":
        try:
            return Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a plain Exception on bad JSON
            raise DataError(f"tokenizer file {str(path)!r} cannot be parsed: {err}") from err
    return checkpoint_tokenizer(path)


def check_special_tokens(tokenizer: Tokenizer, specials: Sequence[str], source: str) -> None:
    """Fail unless ``specials`` sit at ids ``0..len(specials)-1`` of ``tokenizer``.

    Raises:
        ConfigurationError: A special token is missing or at another id.
    """
    for expected_id, token in enumerate(specials):
        actual = tokenizer.token_to_id(token)
        if actual != expected_id:
            raise ConfigurationError(
                f"tokenizer from {source!r} has {token!r} at id {actual}, expected {expected_id}; "
                f"this model family needs special tokens {list(specials)} at ids 0..{len(specials) - 1}"
            )
