"""Tang et al.'s transfer-set augmentation for distilling a classifier into a smaller student.

Tang, Lu, Liu, Mou, Vechtomova and Lin (2019), "Distilling Task-Specific Knowledge from BERT into
Simple Neural Networks", enlarge the training set with perturbed copies of its sentences, which a
teacher then labels. Each copy draws, for every word, ``u ~ U[0, 1]``: ``u < p_mask`` replaces the
word by the mask token, ``p_mask <= u < p_mask + p_pos`` by another word with the same
part-of-speech tag; then, with probability ``p_ng``, only a random n-gram (``n`` uniform in
``1..5``) of the sentence is kept. Each sentence gets ``n_iter`` draws; duplicates are discarded.

The part-of-speech tags come from a :class:`PosLexicon`: by default the tags of the Brown Corpus
shipped with the package (no spaCy). :class:`TransferSetAugmentation` wraps a
:class:`~lightning_efficient.data.text.TextClassificationDataModule` and trains on the augmented set;
its copies have no gold label (:data:`~lightning_efficient.losses.MISSING_LABEL`), so it needs a
technique that labels them, such as ``lightning_efficient.Distillation``.

Examples:
    >>> import random
    >>> lexicon = PosLexicon({"the": "at", "a": "at", "cat": "nn", "dog": "nn", "sat": "vbd"})
    >>> words = "the cat sat".split()
    >>> augment_words(words, random.Random(0), lexicon, p_mask=0.0, p_pos=1.0, p_ng=0.0, mask_token="[MASK]")
    ['a', 'dog', 'sat']
    >>> build_transfer_set(["the cat sat"], [1], lexicon, p_mask=0.2, p_pos=0.3, p_ng=0.5, n_iter=4, seed=1)
    (['the cat sat', '[MASK] cat sat', 'a cat [MASK]', 'the cat', 'the [MASK] [MASK]'], [1, -100, -100, -100, -100])
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import random
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from tqdm import tqdm

from lightning_efficient.atomic_write import write_atomically
from lightning_efficient.data.files import embedded_path, read_records
from lightning_efficient.data.text import TextClassificationDataModule
from lightning_efficient.data.tokenizers import SpecialIds, cache_root, find_special_ids
from lightning_efficient.errors import ConfigurationError, DataError, check_int, check_range
from lightning_efficient.losses import MISSING_LABEL

__all__ = ["PosLexicon", "TransferSetAugmentation", "augment_words", "build_transfer_set"]

#: Brown's tag modifiers: title (``-tl``), headline (``-hl``), cited word (``-nc``); ``nn-tl`` is ``nn``.
_BROWN_SUFFIXES = ("-tl", "-hl", "-nc")
#: Version of the transfer set's construction, part of its cache key.
_FORMAT_VERSION = "1"


class PosLexicon:
    """Each word's part-of-speech tag, and the words of each tag (for POS-guided replacement).

    Words are lowercase; a word seen with several tags gets its most frequent one (ties: the tag
    first in sorted order), so the lexicon is the same in every run.

    Args:
        tags: Word -> tag (words are lowercased; on a clash the rule above decides).

    Examples:
        >>> lexicon = PosLexicon.from_tagged([("The cat sat", "at nn vbd"), ("a cat", "at nn")])
        >>> lexicon.tag("Cat"), lexicon.words("at"), lexicon.coverage(["the", "cat", "purred"])
        ('nn', ['a', 'the'], 0.6666666666666666)
    """

    def __init__(self, tags: Mapping[str, str]) -> None:
        self._tags = _most_frequent_tags(Counter((str(word).lower(), str(tag)) for word, tag in tags.items()))
        by_tag: dict[str, list[str]] = {}
        for word, tag in self._tags.items():
            by_tag.setdefault(tag, []).append(word)
        self._words = {tag: sorted(words) for tag, words in by_tag.items()}

    @classmethod
    def from_tagged(cls, sentences: Iterable[tuple[str, str]]) -> PosLexicon:
        """Count the tags of every word in ``(text, tags)`` pairs, one tag per space-separated word.

        Raises:
            DataError: A sentence has a different number of words and tags.
        """
        counts: Counter[tuple[str, str]] = Counter()
        for number, (text, tags) in enumerate(sentences, start=1):
            words, word_tags = str(text).split(), str(tags).split()
            if len(words) != len(word_tags):
                raise DataError(
                    f"tagged sentence {number} has {len(words)} words but {len(word_tags)} tags: {str(text)[:60]!r}"
                )
            counts.update((word.lower(), _base_tag(tag)) for word, tag in zip(words, word_tags))
        return cls(_most_frequent_tags(counts))

    @classmethod
    def brown(cls) -> PosLexicon:
        """The lexicon of the embedded Brown Corpus (about 50,000 words, 1.16 million tagged tokens; built once per process)."""
        return _brown_lexicon()

    @classmethod
    def from_file(cls, path: str | Path) -> PosLexicon:
        """Read a lexicon from a jsonl file with ``text`` and ``tags`` columns (as Brown) or a JSON word -> tag object.

        Raises:
            DataError: The file does not exist, or holds neither form.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"pos_lexicon={str(path)!r} does not exist; give a jsonl with text and tags, or a JSON object"
            )
        if path.suffix == ".json":
            try:
                mapping = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise DataError(f"pos_lexicon={str(path)!r} cannot be read as JSON: {err}") from err
            if not isinstance(mapping, dict) or not all(isinstance(tag, str) for tag in mapping.values()):
                raise DataError(f"pos_lexicon={str(path)!r} must be a JSON object mapping each word to its tag")
            return cls(mapping)
        records = read_records(path)
        missing = [column for column in ("text", "tags") if column not in records[0]]
        if missing:
            raise DataError(f"pos_lexicon={str(path)!r} has no column {missing[0]!r}; each row needs 'text' and 'tags'")
        return cls.from_tagged((record["text"], record["tags"]) for record in records)

    def tag(self, word: str) -> str | None:
        """The tag of ``word`` (looked up lowercased), or None when the lexicon does not know it."""
        return self._tags.get(word.lower())

    def words(self, tag: str) -> list[str]:
        """The words whose tag is ``tag``, sorted (empty for an unknown tag)."""
        return self._words.get(tag, [])

    def coverage(self, words: Iterable[str]) -> float:
        """The share of the word tokens ``words`` that have a tag (0 for no words)."""
        total = known = 0
        for word in words:
            total += 1
            known += word.lower() in self._tags
        return known / total if total else 0.0

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the whole lexicon, part of a transfer set's cache key."""
        digest = hashlib.sha256()
        for word, tag in sorted(self._tags.items()):
            digest.update(f"{word}\t{tag}\n".encode())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self._tags)


def _base_tag(tag: str) -> str:
    """``tag`` without Brown's modifiers: ``nn-tl-hl`` -> ``nn``, ``---hl`` -> ``--``."""
    tag = tag.lower()
    while tag.endswith(_BROWN_SUFFIXES) and len(tag) > 3:
        tag = tag[:-3]
    return tag


def _most_frequent_tags(counts: Mapping[tuple[str, str], int]) -> dict[str, str]:
    """Word -> its most frequent tag in ``counts``, ties broken by the tag's sorted order."""
    best: dict[str, tuple[int, str]] = {}
    for (word, tag), count in counts.items():
        current = best.get(word)
        if current is None or (-count, tag) < (-current[0], current[1]):
            best[word] = (count, tag)
    return {word: tag for word, (_, tag) in sorted(best.items())}


@functools.cache
def _brown_lexicon() -> PosLexicon:
    rows = read_records(embedded_path("brown.jsonl.gz"))
    return PosLexicon.from_tagged((row["text"], row["tags"]) for row in rows)


def augment_words(
    words: list[str],
    rng: random.Random,
    lexicon: PosLexicon,
    p_mask: float,
    p_pos: float,
    p_ng: float,
    mask_token: str,
    max_ngram: int = 5,
) -> list[str]:
    """One perturbed copy of a sentence by Tang et al.'s rules (a new list; ``words`` is left as it is).

    Every word draws ``u ~ U[0, 1]``: ``u < p_mask`` gives ``mask_token``; ``p_mask <= u < p_mask +
    p_pos`` gives another word with the same tag (chosen uniformly among the lexicon's words of
    that tag, with the original's capitalisation when it is all lower, Title or all UPPER); a word
    the lexicon does not tag, or the only word of its tag, is kept. Then, with probability
    ``p_ng``, only a random n-gram ``words[i:i + n]`` is kept, ``n`` uniform in ``1..max_ngram``
    (at most the sentence's length), ``i`` uniform: the rest is *dropped*, as in the paper (the
    popular port ``distil-bilstm`` masks the rest instead, which is not what Tang et al. describe).

    Args:
        words: The sentence, split into words.
        rng: The only source of randomness.
        lexicon: The tags for POS-guided replacement.
        p_mask: Probability of masking a word.
        p_pos: Probability of replacing a word by one with the same tag.
        p_ng: Probability of keeping only an n-gram.
        mask_token: The word that masks (the tokenizer's mask token, e.g. ``[MASK]``).
        max_ngram: Longest n-gram kept.

    Examples:
        >>> lexicon = PosLexicon({"cats": "nns", "dogs": "nns"})
        >>> augment_words(["Cats", "purr"], random.Random(1), lexicon, 0.0, 1.0, 0.0, "[MASK]")
        ['Dogs', 'purr']
        >>> augment_words("a b c d e f".split(), random.Random(0), lexicon, 0.0, 0.0, 1.0, "[MASK]")
        ['d', 'e', 'f']
    """
    out: list[str] = []
    for word in words:
        u = rng.random()
        if u < p_mask:
            out.append(mask_token)
        elif u < p_mask + p_pos:
            out.append(_same_tag_word(word, rng, lexicon))
        else:
            out.append(word)
    if out and rng.random() < p_ng:
        n = min(rng.randint(1, max_ngram), len(out))
        start = rng.randint(0, len(out) - n)
        out = out[start : start + n]
    return out


def _same_tag_word(word: str, rng: random.Random, lexicon: PosLexicon) -> str:
    """A word other than ``word`` with its tag, in its capitalisation; ``word`` itself when there is none."""
    lower = word.lower()
    tag = lexicon.tag(lower)
    candidates = lexicon.words(tag) if tag is not None else []
    if len(candidates) < 2:
        return word
    own = bisect.bisect_left(candidates, lower)  # the word is in the list: skip its position
    index = rng.randrange(len(candidates) - 1)
    replacement = candidates[index + (index >= own)]
    if word.isupper() and len(word) > 1:
        return replacement.upper()
    if word[:1].isupper() and word[1:] == word[1:].lower():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def build_transfer_set(
    texts: Sequence[str],
    labels: Sequence[int],
    lexicon: PosLexicon,
    *,
    p_mask: float = 0.1,
    p_pos: float = 0.1,
    p_ng: float = 0.25,
    n_iter: int = 20,
    max_ngram: int = 5,
    seed: int = 0,
    max_size: int | None = None,
    mask_token: str = "[MASK]",
) -> tuple[list[str], list[int]]:
    """The transfer set: the original sentences with their labels, then their augmented copies.

    Copies are drawn in ``n_iter`` rounds, each giving every sentence one draw (:func:`augment_words`
    on its space-separated words), all from one ``random.Random(seed)``. A draw is kept when it is
    not empty and not already in the set (originals included); it gets the label
    :data:`~lightning_efficient.losses.MISSING_LABEL` (-100), for a teacher to fill. ``max_size``
    caps the total: the originals are always kept, then copies in the order drawn, so the copies of
    a capped set are the first ones of the uncapped set, spread evenly over the sentences.

    Args:
        texts: The original sentences.
        labels: Their class indices.
        lexicon: The tags for POS-guided replacement.
        p_mask: Probability of masking a word.
        p_pos: Probability of replacing a word by one with the same tag.
        p_ng: Probability of keeping only an n-gram of a copy.
        n_iter: Draws per sentence.
        max_ngram: Longest n-gram kept.
        seed: Seed of the draws.
        max_size: Largest size of the set; None: no cap.
        mask_token: The word that masks.

    Returns:
        ``(texts, labels)`` of the set, the originals first.

    Examples:
        >>> lexicon = PosLexicon({"good": "jj", "fine": "jj", "film": "nn"})
        >>> texts, labels = build_transfer_set(["a good film", "a bad film"], [1, 0], lexicon, seed=1)
        >>> texts[:2], labels[:2], len(texts) > 2, set(labels[2:])
        (['a good film', 'a bad film'], [1, 0], True, {-100})
    """
    built, built_labels, _ = _build_transfer_set(
        texts, labels, lexicon, p_mask, p_pos, p_ng, n_iter, max_ngram, seed, max_size, mask_token, progress=False
    )
    return built, built_labels


def _build_transfer_set(
    texts: Sequence[str],
    labels: Sequence[int],
    lexicon: PosLexicon,
    p_mask: float,
    p_pos: float,
    p_ng: float,
    n_iter: int,
    max_ngram: int,
    seed: int,
    max_size: int | None,
    mask_token: str,
    progress: bool,
) -> tuple[list[str], list[int], int]:
    """:func:`build_transfer_set`, also returning the number of draws discarded (duplicate or empty)."""
    if len(texts) != len(labels):
        raise DataError(f"{len(texts)} texts but {len(labels)} labels; give one label per text")
    rng = random.Random(seed)
    sentences = [str(text).split() for text in texts]
    out_texts, out_labels = list(texts), list(labels)
    seen = {" ".join(words) for words in sentences}
    room = len(texts) + n_iter * len(texts) if max_size is None else max(max_size, len(texts))
    discarded = 0
    with tqdm(total=n_iter * len(texts), desc="transfer set", unit="draw", disable=not progress) as bar:
        for _ in range(n_iter):
            for words in sentences:
                if len(out_texts) >= room:
                    return out_texts, out_labels, discarded
                text = " ".join(augment_words(words, rng, lexicon, p_mask, p_pos, p_ng, mask_token, max_ngram))
                if text and text not in seen:
                    seen.add(text)
                    out_texts.append(text)
                    out_labels.append(MISSING_LABEL)
                else:
                    discarded += 1
                bar.update()
    return out_texts, out_labels, discarded


class TransferSetAugmentation(pl.LightningDataModule):
    """Train on Tang et al.'s transfer set of a text-classification DataModule (for distillation).

    Before training (``setup("fit")``) the wrapped module's training sentences (a seeded subsample
    of ``max_source_examples`` of them, if given) are augmented by :func:`build_transfer_set`,
    with the tokenizer's own mask token (``[MASK]``, or RoBERTa's ``<mask>``) as the mask word; the
    set is cached under ``$LIGHTNING_EFFICIENT_CACHE/transfer_sets``, keyed by the sentences, the labels, the
    lexicon and every argument here, so a rerun or a resumed run reads the identical set. The
    training loader serves it through the wrapped module's own collate function and resumable
    loader: the originals keep their gold labels, the copies have label
    :data:`~lightning_efficient.losses.MISSING_LABEL` (-100), so training needs a callback that
    fills them, such as ``lightning_efficient.Distillation`` (any callback with the class attribute
    ``fills_missing_labels = True``); ``fit`` without one fails at setup.

    Everything else is the wrapped module's: the tokenizer, ``vocab_size``, ``num_labels``,
    ``label_names``, :meth:`model_arguments` (so the CLI fills the model's arguments as usual),
    the validation, test and predict data, and any other attribute (``batch_size``, ...).

    Args:
        datamodule: The text-classification data to augment (a
            :class:`~lightning_efficient.data.text.TextClassificationDataModule` or subclass).
        p_mask: Probability of masking a word.
        p_pos: Probability of replacing a word by another with the same part-of-speech tag.
        p_ng: Probability of keeping only an n-gram of a copy.
        n_iter: Augmented draws per sentence (duplicates are discarded).
        max_ngram: Longest n-gram kept.
        seed: Seed of the subsample and of the draws.
        max_source_examples: Augment only this many training sentences (a seeded subsample); None: all.
        max_size: Largest size of the transfer set, originals included; None: no cap.
        pos_lexicon: A jsonl with ``text`` and ``tags`` columns, or a JSON word -> tag object
            (:meth:`PosLexicon.from_file`); None: the tags of the embedded Brown Corpus.
        min_coverage: Warn when the lexicon tags a smaller share of the training words.
        cache: Read and write the transfer set in the cache directory.

    Raises:
        ConfigurationError: A bad argument, or ``fit`` without a callback that fills missing labels.
        DataError: ``pos_lexicon`` does not exist, or tags none of the training words.

    Examples:
        >>> from lightning_efficient.data.text import BROWN_PROSE
        >>> inner = TextClassificationDataModule(label_map=BROWN_PROSE, vocab_size=500, max_length=32)
        >>> dm = TransferSetAugmentation(inner, n_iter=2, max_source_examples=50)
        >>> dm.setup("fit")  # without a Trainer: no callback check
        >>> dm.transfer_set_stats["source_examples"], dm.model_arguments() == inner.model_arguments()
        (50, True)
        >>> batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch), bool((batch["labels"] == -100).any())
        (['attention_mask', 'input_ids', 'labels'], True)
    """

    model_argument_names = TextClassificationDataModule.model_argument_names

    def __init__(
        self,
        datamodule: TextClassificationDataModule,
        p_mask: float = 0.1,
        p_pos: float = 0.1,
        p_ng: float = 0.25,
        n_iter: int = 20,
        max_ngram: int = 5,
        seed: int = 0,
        max_source_examples: int | None = None,
        max_size: int | None = None,
        pos_lexicon: str | None = None,
        min_coverage: float = 0.5,
        cache: bool = True,
    ) -> None:
        super().__init__()
        if not hasattr(datamodule, "_rows") or not hasattr(type(datamodule), "label_names"):
            raise ConfigurationError(
                f"datamodule={type(datamodule).__name__} is not text-classification data; "
                "give a TextClassificationDataModule (or a subclass)"
            )
        for name, value in (("p_mask", p_mask), ("p_pos", p_pos), ("p_ng", p_ng), ("min_coverage", min_coverage)):
            check_range(name, value, low=0.0, high=1.0)
        if p_mask + p_pos > 1:
            raise ConfigurationError(f"p_mask + p_pos = {p_mask + p_pos} must be at most 1 (one draw decides both)")
        check_int("n_iter", n_iter, low=1)
        check_int("max_ngram", max_ngram, low=1)
        check_int("max_source_examples", max_source_examples, low=1, optional=True)
        check_int("max_size", max_size, low=1, optional=True)
        if pos_lexicon is not None and not Path(pos_lexicon).is_file():
            raise DataError(
                f"pos_lexicon={pos_lexicon!r} does not exist; give a jsonl with text and tags, "
                "a JSON word -> tag object, or None for the Brown Corpus"
            )
        self.datamodule = datamodule
        self.p_mask, self.p_pos, self.p_ng = p_mask, p_pos, p_ng
        self.n_iter, self.max_ngram, self.seed = n_iter, max_ngram, seed
        self.max_source_examples, self.max_size = max_source_examples, max_size
        self.pos_lexicon, self.min_coverage, self.cache = pos_lexicon, min_coverage, cache
        self._stats: dict[str, int] | None = None

    def __getattr__(self, name: str) -> Any:
        """Any other attribute is the wrapped module's (``batch_size``, ``max_length``, ...)."""
        if name == "datamodule":  # not set yet (unpickling): do not recurse
            raise AttributeError(name)
        return getattr(self.datamodule, name)

    @property
    def tokenizer(self) -> Any:
        """The wrapped module's tokenizer."""
        return self.datamodule.tokenizer

    @property
    def vocab_size(self) -> int:
        """The wrapped module's vocabulary size."""
        return self.datamodule.vocab_size

    @property
    def num_labels(self) -> int:
        """The wrapped module's number of classes."""
        return self.datamodule.num_labels

    @property
    def label_names(self) -> list[str]:
        """The wrapped module's class names."""
        return self.datamodule.label_names

    @property
    def special_ids(self) -> SpecialIds:
        """The wrapped module's special token ids."""
        return self.datamodule.special_ids

    def model_arguments(self) -> dict[str, Any]:
        """The wrapped module's :meth:`~TextClassificationDataModule.model_arguments`."""
        return self.datamodule.model_arguments()

    @property
    def transfer_set_stats(self) -> dict[str, int]:
        """Sizes of the transfer set: ``source_examples``, ``augmented`` (copies kept), ``duplicates`` (draws
        discarded because the set already held them, or empty) and ``total``; empty before ``setup("fit")``."""
        return dict(self._stats or {})

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        """Set up the wrapped module; for ``fit``, check for a labelling callback and build (or read) the transfer set.

        Raises:
            ConfigurationError: ``fit`` with a Trainer none of whose callbacks fills missing labels.
            DataError: The lexicon tags none of the training words.
        """
        labelled = self.trainer is None or any(
            getattr(cb, "fills_missing_labels", False) for cb in self.trainer.callbacks
        )
        augments = self.p_mask > 0 or self.p_pos > 0 or self.p_ng > 0  # else the set is the originals alone
        if stage == "fit" and augments and not labelled:
            raise ConfigurationError(
                "the transfer set's augmented examples have no gold label; add lightning_efficient.Distillation "
                "(which labels them with the teacher) to trainer.callbacks"
            )
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)
        if stage == "fit" and self._stats is None:
            self._use_transfer_set()

    def _use_transfer_set(self) -> None:
        """Build or read the transfer set and make it the wrapped module's training split."""
        inner = self.datamodule
        texts, gold = inner._rows["train"]
        if self.max_source_examples is not None and self.max_source_examples < len(texts):
            chosen = sorted(random.Random(self.seed).sample(range(len(texts)), self.max_source_examples))
            texts, gold = [texts[i] for i in chosen], [gold[i] for i in chosen]
        index = {name: i for i, name in enumerate(inner.label_names)}
        labels = [index[label] for label in gold]
        lexicon = PosLexicon.brown() if self.pos_lexicon is None else PosLexicon.from_file(self.pos_lexicon)
        self._check_coverage(lexicon, texts)
        mask_id = find_special_ids(inner.tokenizer, inner.tokenizer_source or "trained", need_mask=True).mask_id
        arguments = {
            "p_mask": self.p_mask, "p_pos": self.p_pos, "p_ng": self.p_ng, "n_iter": self.n_iter,
            "max_ngram": self.max_ngram, "seed": self.seed, "max_size": self.max_size,
            "mask_token": inner.tokenizer.id_to_token(mask_id),
        }  # fmt: skip
        path = self._cache_path(texts, labels, lexicon, arguments)
        built = self._read_cache(path) if self.cache else None
        if built is None:
            built = _build_transfer_set(texts, labels, lexicon, **arguments, progress=_show_progress())
            if self.cache:
                self._write_cache(path, built)
        set_texts, set_labels, discarded = built
        inner.splits["train"] = list(zip(inner._encode(set_texts), set_labels))
        inner.check_train_batches(len(set_labels), "transfer-set examples")
        self._stats = {
            "source_examples": len(texts),
            "augmented": len(set_texts) - len(texts),
            "duplicates": discarded,
            "total": len(set_texts),
        }
        rank_zero_info(
            f"Transfer set: {len(texts)} source examples + {self._stats['augmented']} augmented "
            f"({discarded} duplicate or empty draws discarded) = {len(set_texts)} training examples"
        )

    def _check_coverage(self, lexicon: PosLexicon, texts: Sequence[str]) -> None:
        coverage = lexicon.coverage(word for text in texts for word in text.split())
        source = self.pos_lexicon or "the Brown Corpus"
        if coverage == 0:
            raise DataError(
                f"the POS lexicon ({source}) tags none of the training words, so POS-guided replacement "
                "would never happen; give a pos_lexicon for this language/vocabulary"
            )
        if coverage < self.min_coverage:
            warnings.warn(
                f"the POS lexicon ({source}) tags {coverage:.1%} of the training words (min_coverage="
                f"{self.min_coverage}); POS-guided replacement leaves the others as they are",
                stacklevel=3,
            )

    def _cache_path(
        self, texts: Sequence[str], labels: Sequence[int], lexicon: PosLexicon, arguments: Mapping[str, Any]
    ) -> Path:
        digest = hashlib.sha256(f"{_FORMAT_VERSION}|{lexicon.fingerprint}|".encode())
        digest.update(json.dumps(arguments, sort_keys=True).encode())
        for text, label in zip(texts, labels):
            digest.update(f"{label}\t{text}\x00".encode())
        return cache_root() / "transfer_sets" / f"transfer-set-{digest.hexdigest()[:24]}.json"

    @staticmethod
    def _read_cache(path: Path) -> tuple[list[str], list[int], int] | None:
        if not path.is_file():
            return None
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
            texts, labels, discarded = content["texts"], content["labels"], int(content["discarded"])
            if len(texts) != len(labels):
                raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        except (OSError, ValueError, KeyError, TypeError) as err:
            warnings.warn(f"cached transfer set {str(path)!r} cannot be read ({err}); building it again", stacklevel=3)
            return None
        return texts, labels, discarded

    @staticmethod
    def _write_cache(path: Path, built: tuple[list[str], list[int], int]) -> None:
        texts, labels, discarded = built
        try:
            write_atomically(path, json.dumps({"texts": texts, "labels": labels, "discarded": discarded}))
        except OSError as err:
            warnings.warn(
                f"cannot write the transfer-set cache {str(path)!r} ({err}); going on without it", stacklevel=3
            )

    def train_dataloader(self) -> Any:
        self.datamodule.trainer = self.trainer
        return self.datamodule.train_dataloader()

    def val_dataloader(self) -> Any:
        self.datamodule.trainer = self.trainer
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        self.datamodule.trainer = self.trainer
        return self.datamodule.test_dataloader()

    def predict_dataloader(self) -> Any:
        self.datamodule.trainer = self.trainer
        return self.datamodule.predict_dataloader()

    def teardown(self, stage: str) -> None:
        self.datamodule.teardown(stage)

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)


def _show_progress() -> bool:
    """Show the building progress bar: on the first process, in a terminal."""
    return rank_zero_only.rank == 0 and sys.stderr.isatty()
