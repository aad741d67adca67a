"""Train, cache and load the subword tokenizers of the package (HF ``tokenizers``, Rust-fast).

- BERT models use a lower-cased WordPiece vocabulary with ``[PAD] [UNK] [CLS] [SEP] [MASK]`` at
  ids 0..4 and ``[CLS] text [SEP]`` framing. A ``tokenizer.json`` given by the user (e.g. a public
  BERT's or RoBERTa's) may have its special tokens at any ids: :func:`find_special_ids` finds them
  by name (BERT's or RoBERTa's ``<s> <pad> </s> <unk> <mask>``).
- Translation models use one BPE vocabulary shared by source and target (Metaspace
  pre-tokenisation, as in SentencePiece), with ``<pad> </s> <unk>`` at ids 0..2 and ``text </s>``
  framing.

Training is deterministic: the same texts give the same vocabulary and ids in every process
(see :func:`train_wordpiece` for the one source of run-to-run differences in the ``tokenizers``
trainer, and how it is removed). A trained tokenizer is cached under ``$LIGHTNING_EFFICIENT_CACHE``
(default ``~/.cache/lightning_efficient``) keyed by a hash of its training texts and settings, and
it is written into every checkpoint by the LightningModules, so ``predict`` needs only the
checkpoint. A cache file that cannot be loaded is rebuilt; a cache that cannot be written is
skipped with a warning (training then goes on: every process trains the same tokenizer).
"""

from __future__ import annotations

import hashlib
import os
import string
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lightning_efficient.atomic_write import write_atomically
from lightning_efficient.checkpoint import CHECKPOINT_KEY, checkpoint_tokenizer
from lightning_efficient.errors import ConfigurationError, DataError

__all__ = [
    "BERT_SPECIAL_IDS",
    "BERT_SPECIAL_TOKENS",
    "CHECKPOINT_KEY",
    "MT_SPECIAL_TOKENS",
    "SPECIAL_TOKEN_NAMES",
    "SpecialIds",
    "cached_tokenizer",
    "check_special_tokens",
    "find_special_ids",
    "load_tokenizer",
    "train_shared_bpe",
    "train_wordpiece",
]

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MT_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
#: The names each special token of an encoder tokenizer may have, first BERT's, then RoBERTa's.
SPECIAL_TOKEN_NAMES: dict[str, tuple[str, ...]] = {
    "pad": ("[PAD]", "<pad>"),
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "mask": ("[MASK]", "<mask>"),
    "unk": ("[UNK]", "<unk>"),
}
_FORMAT_VERSION = "2"  # 2: deterministic WordPiece ids (0.3.0)
_CACHE_ENV = "LIGHTNING_EFFICIENT_CACHE"
_DIR_MODE = 0o755


def train_wordpiece(texts: Sequence[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
    """Train a BERT-style lower-cased WordPiece tokenizer on ``texts``, deterministically.

    The ``tokenizers`` trainer gives the continuation symbols (``##a``, ``##b``, ...) their ids in
    the iteration order of a Rust ``HashMap`` of the corpus's words, which is seeded at random in
    every process (``PYTHONHASHSEED`` plays no part); equally frequent pairs are then merged in the
    order of those ids, so both the ids and the learned vocabulary changed from run to run. Here
    every continuation symbol the corpus can produce is handed to the trainer first, sorted, as a
    leading "special" token, which fixes its id; it becomes an ordinary vocabulary entry again
    afterwards. Ids: the 5 special tokens, the continuation symbols, the alphabet, the merges.

    Examples:
        >>> tok = train_wordpiece(["the cat sat on the mat"] * 10, vocab_size=60, show_progress=False)
        >>> tok.encode("the cat").tokens
        ['[CLS]', 'the', 'cat', '[SEP]']
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    continuation = _continuation_symbols(texts, normalizer)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=[*BERT_SPECIAL_TOKENS, *continuation], show_progress=show_progress
    )
    trained = _bert_tokenizer(models.WordPiece(unk_token="[UNK]"), normalizer)
    trained.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # The same vocabulary, with only the real special tokens marked special.
    tokenizer = _bert_tokenizer(models.WordPiece(trained.get_vocab(), unk_token="[UNK]"), normalizer)
    tokenizer.add_special_tokens(list(BERT_SPECIAL_TOKENS))
    return _frame(tokenizer, ("[CLS]", "[SEP]"), single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1")


def _bert_tokenizer(model: models.Model, normalizer: normalizers.Normalizer) -> Tokenizer:
    """A tokenizer over ``model`` with BERT's normalizer, pre-tokenizer and decoder."""
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def _continuation_symbols(texts: Sequence[str], normalizer: normalizers.Normalizer) -> list[str]:
    """``##c`` for every character ``c`` that can follow another inside a word of ``texts``, sorted.

    ``BertNormalizer`` maps each character on its own, so the normalized characters are those of
    the distinct raw ones; ``BertPreTokenizer`` splits at whitespace and makes every punctuation
    character a word of its own, so neither is ever a continuation. A character that happens to
    occur only at the start of words still gets its (unused) ``##c``, which keeps this cheap.
    """
    raw: set[str] = set()
    for text in texts:  # one text at a time: ``texts`` may be a corpus read lazily from disk
        raw.update(text)
    chars = {c for r in raw for c in normalizer.normalize_str(r)}
    return sorted(f"##{c}" for c in chars if not c.isspace() and not _is_punctuation(c))


def _is_punctuation(char: str) -> bool:
    """BERT's punctuation: ASCII punctuation or a Unicode ``P*`` category (as ``BertPreTokenizer``)."""
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def train_shared_bpe(texts: Sequence[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
    """Train one BPE vocabulary for source and target sentences together (translation).

    Deterministic as it is: without a continuation prefix every initial symbol is a character of
    the alphabet, which the trainer sorts, and ties between merges are broken by those ids.

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
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return _frame(tokenizer, ("</s>",), single="$A </s>")


def _frame(tokenizer: Tokenizer, framing: Sequence[str], **templates: str) -> Tokenizer:
    """Frame the encodings of a trained ``tokenizer`` with ``templates`` (``single``, ``pair``).

    ``framing`` names the special tokens the templates use; they get their ids in the trained vocabulary.
    """
    special_tokens = [(token, tokenizer.token_to_id(token)) for token in framing]
    tokenizer.post_processor = processors.TemplateProcessing(**templates, special_tokens=special_tokens)
    return tokenizer


_TRAINERS = {"wordpiece": train_wordpiece, "bpe": train_shared_bpe}


def cache_root() -> Path:
    """The package's cache directory: ``$LIGHTNING_EFFICIENT_CACHE``, or ``~/.cache/lightning_efficient``.

    Each kind of cached file has a folder in it (``tokenizers``, ``transfer_sets``, ``teacher_outputs``, ...).
    """
    return Path(os.environ.get(_CACHE_ENV, Path.home() / ".cache" / "lightning_efficient"))


def cache_dir() -> Path:
    """Directory of cached tokenizers: ``cache_root() / "tokenizers"``."""
    return cache_root() / "tokenizers"


def cached_tokenizer(kind: str, texts: Sequence[str], vocab_size: int, key: str | None = None) -> Tokenizer:
    """Return a tokenizer of ``kind`` trained on ``texts``, from the cache when it was trained before.

    A cached file that cannot be loaded (truncated, corrupt, special tokens out of place) is
    trained again and replaced, with a warning naming it. A cache that cannot be written (no
    permission, read-only disk, a file where the directory should be) only costs the caching: the
    tokenizer is returned with a warning naming the directory and ``$LIGHTNING_EFFICIENT_CACHE``.
    Training is deterministic, so every process that trains it instead of reading it gets the
    same vocabulary.

    Args:
        kind: ``"wordpiece"`` (BERT) or ``"bpe"`` (shared translation vocabulary).
        texts: Training texts; their content is part of the cache key.
        vocab_size: Target vocabulary size (the trained one can be smaller on a small corpus).
        key: Stands for the texts' content in the cache key when given (e.g. the fingerprint of
            the tables they are read from), so a large corpus is not read once more to hash it.

    Raises:
        ConfigurationError: Unknown ``kind`` or a ``vocab_size`` too small for the special tokens.
    """
    if kind not in _TRAINERS:
        raise ConfigurationError(f"tokenizer kind={kind!r} is unknown; choose one of: {', '.join(_TRAINERS)}")
    specials = BERT_SPECIAL_TOKENS if kind == "wordpiece" else MT_SPECIAL_TOKENS
    if vocab_size <= len(specials):
        raise ConfigurationError(f"vocab_size={vocab_size} must be larger than the {len(specials)} special tokens")
    digest = hashlib.sha256(f"{_FORMAT_VERSION}|{kind}|{vocab_size}|".encode())
    if key is not None:
        digest.update(f"key|{key}".encode())
    else:
        for text in texts:
            digest.update(text.encode("utf-8"))
            digest.update(b"\x00")
    path = cache_dir() / f"{kind}-{vocab_size}-{digest.hexdigest()[:20]}.json"
    if path.is_file():
        try:
            cached = Tokenizer.from_file(str(path))
            check_special_tokens(cached, specials, str(path))
            return cached
        except Exception as err:  # noqa: BLE001 - tokenizers raises a plain Exception on a bad file
            warnings.warn(f"cached tokenizer {str(path)!r} cannot be loaded ({err}); training it again", stacklevel=2)
    tokenizer = _TRAINERS[kind](texts, vocab_size)
    try:
        _make_dirs(path.parent)
        write_atomically(path, tokenizer.to_str())
    except OSError as err:
        warnings.warn(
            f"cannot write the tokenizer cache in {str(path.parent)!r} ({err}); going on without caching. "
            f"Set {_CACHE_ENV} to a writable directory to cache tokenizers",
            stacklevel=2,
        )
    return tokenizer


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each with mode 0755 whatever the umask."""
    if directory.is_dir():
        return
    _make_dirs(directory.parent)
    try:
        directory.mkdir()
    except FileExistsError:
        if not directory.is_dir():
            raise
        return  # created by a concurrent process
    os.chmod(directory, _DIR_MODE)


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


@dataclass(frozen=True)
class SpecialIds:
    """The ids of an encoder tokenizer's special tokens, which the data and the masked LM need.

    Attributes:
        pad_id: Padding (``[PAD]`` / ``<pad>``); batches are padded with it.
        cls_id: The token that starts a text (``[CLS]`` / ``<s>``).
        sep_id: The token that ends a text (``[SEP]`` / ``</s>``).
        mask_id: The mask token (``[MASK]`` / ``<mask>``), or None when the tokenizer has none.
        ids: Every special id (the above, the unknown token, and every token the tokenizer marks
            special): never masked, never drawn as a random replacement.

    Examples:
        >>> BERT_SPECIAL_IDS.mask_id, sorted(BERT_SPECIAL_IDS.ids)
        (4, [0, 1, 2, 3, 4])
    """

    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int | None
    ids: frozenset[int]


#: The special ids of the package's own WordPiece tokenizers (:data:`BERT_SPECIAL_TOKENS` at ids 0..4).
BERT_SPECIAL_IDS = SpecialIds(pad_id=0, cls_id=2, sep_id=3, mask_id=4, ids=frozenset(range(5)))


def find_special_ids(tokenizer: Tokenizer, source: str, need_mask: bool = False) -> SpecialIds:
    """The ids of ``tokenizer``'s special tokens, found by name (:data:`SPECIAL_TOKEN_NAMES`), at any ids.

    Our WordPiece tokenizers give :data:`BERT_SPECIAL_IDS`; a public BERT's ``tokenizer.json`` has
    ``[PAD]`` 0, ``[UNK]`` 100, ``[CLS]`` 101, ``[SEP]`` 102, ``[MASK]`` 103; RoBERTa's ``<s>`` 0,
    ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3 and ``<mask>`` last.

    Args:
        tokenizer: The tokenizer.
        source: Where it comes from, for messages.
        need_mask: Fail when it has no mask token (masked-LM data).

    Raises:
        ConfigurationError: The padding, start or end token (or a needed mask token) is missing.

    Examples:
        >>> tok = train_wordpiece(["the cat sat on the mat"] * 10, vocab_size=60, show_progress=False)
        >>> find_special_ids(tok, "trained") == BERT_SPECIAL_IDS
        True
    """
    found: dict[str, int | None] = {}
    for role, names in SPECIAL_TOKEN_NAMES.items():
        ids = [tokenizer.token_to_id(name) for name in names]
        found[role] = next((i for i in ids if i is not None), None)
    required = ["pad", "cls", "sep", *(["mask"] if need_mask else [])]
    missing = [role for role in required if found[role] is None]
    if missing:
        wanted = ", ".join(" or ".join(repr(n) for n in SPECIAL_TOKEN_NAMES[role]) for role in missing)
        raise ConfigurationError(
            f"tokenizer from {source!r} has no {wanted} token; it needs padding, start and end tokens"
            f"{' and a mask token' if need_mask else ''} with BERT's names {list(BERT_SPECIAL_TOKENS)} "
            "or RoBERTa's ['<s>', '<pad>', '</s>', '<unk>', '<mask>'] (at any ids)"
        )
    marked = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    named = {i for i in found.values() if i is not None}
    return SpecialIds(
        pad_id=found["pad"], cls_id=found["cls"], sep_id=found["sep"], mask_id=found["mask"],
        ids=frozenset(marked | named),
    )  # fmt: skip
