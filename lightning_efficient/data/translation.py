"""DataModule for machine translation: verse-aligned English -> French by default.

The default is the embedded World English Bible / Louis Segond 1910 verse pairs; a user's jsonl
or csv files with a source and a target column work the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer

from lightning_efficient.data.base import TextDataModule
from lightning_efficient.data.files import embedded_path
from lightning_efficient.data.sources import load_source
from lightning_efficient.data.text import pad_batch
from lightning_efficient.data.tokenized import TextColumns
from lightning_efficient.data.tokenizers import MT_SPECIAL_TOKENS
from lightning_efficient.errors import ConfigurationError, DataError

_PAD, _EOS = "<pad>", "</s>"

__all__ = ["TranslationDataModule"]


class TranslationDataModule(TextDataModule):
    """Sentence pairs for an encoder-decoder model, with one subword vocabulary for both sides.

    Pairs whose source or target exceeds ``max_length`` tokens are left out of training and
    evaluation (Bible verses are long-tailed); ``predict`` truncates instead. Batches are
    ``{"input_ids", "attention_mask", "labels", "source_text", "target_text"}`` where
    ``labels`` holds the target ids padded with -100 and ``input_ids`` is padded with the
    tokenizer's ``<pad>`` id (:attr:`pad_id`).

    Args:
        train_files: Sources of pairs (files, saved datasets or hub ids, as
            :func:`~lightning_efficient.data.sources.load_source` reads them); default: the embedded en-fr verse pairs.
        source_column: Column of the source sentence.
        target_column: Column of the reference translation.
        val_files: Validation files; default: ``val_fraction`` of the training pairs.
        val_fraction: Share held out for validation when ``val_files`` is not given.
        test_fraction: Share held out for ``test``.
        max_val_samples: Cap on validation / test pairs (BLEU needs generation, which is slow).
        predict_files: Source sentences to translate (txt, jsonl or csv, ``source_column``);
            default: the validation sources.
        tokenizer: A ``tokenizer.json`` with ``<pad>`` and ``</s>`` tokens at any ids that ends every
            text with ``</s>`` (ours: ``<pad> </s> <unk>`` at ids 0..2 and ``text </s>``; a public
            BART's: ``<s> text </s>``, padded with its ``<pad>`` 1) or a checkpoint of ours;
            default: train a shared BPE vocabulary on both sides of the training pairs (cached).
        vocab_size: Target size of a newly trained vocabulary.
        max_length: Longest source or target in tokens, ``</s>`` included.
        batch_size: Pairs per batch.
        num_workers: DataLoader worker processes.
        seed: Seed of the held-out split.

    Examples:
        >>> dm = TranslationDataModule(vocab_size=2000, max_length=32, batch_size=4)
        >>> dm.setup("fit")
        >>> sorted(next(iter(dm.train_dataloader())))
        ['attention_mask', 'input_ids', 'labels', 'source_text', 'target_text']
    """

    tokenizer_kind = "bpe"
    special_tokens = MT_SPECIAL_TOKENS

    def __init__(
        self,
        train_files: list[str] | None = None,
        source_column: str = "en",
        target_column: str = "fr",
        val_files: list[str] | None = None,
        val_fraction: float = 0.02,
        test_fraction: float = 0.02,
        max_val_samples: int | None = 256,
        predict_files: list[str] | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 16000,
        max_length: int = 64,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(tokenizer, vocab_size, batch_size, num_workers, seed)
        self._keep_split_arguments(val_files, val_fraction, test_fraction, predict_files, max_length, min_length=4)
        if max_val_samples is not None and max_val_samples <= 0:
            raise ConfigurationError(f"max_val_samples={max_val_samples} must be positive or None")
        self.train_files = list(train_files) if train_files else [embedded_path("bible_en_fr.jsonl.gz")]
        self.source_column = source_column
        self.target_column = target_column
        self.max_val_samples = max_val_samples
        self._pairs: dict[str, list[tuple[str, str]]] = {}
        self.splits: dict[str, list[tuple[list[int], list[int], str, str]]] = {}

    def check_tokenizer(self, tokenizer: Tokenizer, source: str) -> None:
        """Fail unless ``tokenizer`` has ``<pad>`` and ``</s>`` tokens (at any ids) and ends every text with ``</s>``.

        Raises:
            ConfigurationError: A token is missing, or the tokenizer does not end a text with ``</s>``.
        """
        missing = [token for token in (_PAD, _EOS) if tokenizer.token_to_id(token) is None]
        if missing:
            raise ConfigurationError(
                f"tokenizer from {source!r} has no {' or '.join(repr(t) for t in missing)} token; translation "
                f"needs padding and end tokens named {_PAD!r} and {_EOS!r} (at any ids), as ours "
                f"{list(MT_SPECIAL_TOKENS)} at ids 0..{len(MT_SPECIAL_TOKENS) - 1} or a BART's"
            )
        framed = tokenizer.encode("").ids
        if framed[-1:] != [tokenizer.token_to_id(_EOS)]:
            raise ConfigurationError(
                f"tokenizer from {source!r} encodes an empty text as {framed}, which does not end with {_EOS!r}; "
                "it needs a post-processor that ends every text with its end token"
            )

    @property
    def pad_id(self) -> int:
        """The id batches are padded with: the tokenizer's ``<pad>`` (0 in our own tokenizers)."""
        pad_id = self.tokenizer.token_to_id(_PAD)
        if pad_id is None:  # a trained tokenizer always has one; a given one is checked on load
            raise ConfigurationError(f"the tokenizer from {self.tokenizer_source!r} has no {_PAD!r} token")
        return pad_id

    def _read_pairs(self, files: Sequence[str], role: str = "train") -> list[tuple[str, str]]:
        pairs: list[tuple[str, str]] = []
        for file in files:
            table = load_source(file, [self.source_column, self.target_column], role, text_column=self.source_column)
            sources, targets = table[self.source_column], table[self.target_column]
            pairs.extend((str(s), str(t)) for s, t in zip(sources, targets) if str(s).strip() and str(t).strip())
        return pairs

    def _load_pairs(self) -> None:
        if self._pairs:
            return
        pairs = self._read_pairs(self.train_files)
        self._pairs = {name: [pairs[i] for i in part] for name, part in self.held_out_indices(len(pairs)).items()}
        if self.val_files:
            self._pairs["val"] = self._read_pairs(self.val_files, "validation")

    def tokenizer_training_texts(self) -> list[str]:
        self._load_pairs()
        return [text for pair in self._pairs["train"] for text in pair]

    def setup(self, stage: str) -> None:
        if self.splits or (stage == "predict" and self.predict_files):
            return  # predicting from files needs no training data
        self._load_pairs()
        for name, pairs in self._pairs.items():
            sources = self.tokenizer.encode_batch([s for s, _ in pairs])
            targets = self.tokenizer.encode_batch([t for _, t in pairs])
            kept = [
                (src.ids, tgt.ids, s, t)
                for src, tgt, (s, t) in zip(sources, targets, pairs)
                if len(src.ids) <= self.max_length and len(tgt.ids) <= self.max_length
            ]
            if name != "train" and self.max_val_samples is not None:
                kept = kept[: self.max_val_samples]
            self.splits[name] = kept
        if not self.splits["train"]:
            raise DataError(f"no training pair of {self.train_files} fits max_length={self.max_length} tokens")

    def _collate(self, examples: list[tuple[list[int], list[int], str, str]]) -> dict[str, Any]:
        input_ids, attention_mask = pad_batch([src for src, _, _, _ in examples], self.pad_id)
        targets, target_mask = pad_batch([tgt for _, tgt, _, _ in examples], self.pad_id)
        labels = targets.masked_fill(target_mask == 0, -100)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "source_text": [s for _, _, s, _ in examples],
            "target_text": [t for _, _, _, t in examples],
        }

    def _collate_predict(self, texts: list[str]) -> dict[str, Any]:
        input_ids, attention_mask = pad_batch(self._encode(texts), self.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "source_text": texts}

    def predict_dataloader(self):
        if self.predict_files:
            texts = list(TextColumns.of(self.predict_files, self.source_column, "test"))
        else:
            texts = [s for _, _, s, _ in self.splits["val"]]
        return self._loader(texts, self._collate_predict, shuffle=False)
