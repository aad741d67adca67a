"""DataModules for BERT: masked-LM pretraining and sequence classification.

Defaults are the embedded corpora (Jane Austen's novels and the Brown Corpus); every module also
reads a user's jsonl / csv / txt files with the column names given as arguments. The tokenizer is
trained on the data (our WordPiece, special tokens at ids 0..4) or given as a ``tokenizer.json``,
such as a public BERT's or RoBERTa's, whose special tokens are found by name at any ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch
from tokenizers import Tokenizer

from lightning_efficient.data.base import TextDataModule
from lightning_efficient.data.files import embedded_path, read_column, read_numbered_records, read_texts
from lightning_efficient.data.tokenizers import BERT_SPECIAL_TOKENS, SpecialIds, find_special_ids
from lightning_efficient.errors import ConfigurationError, DataError

__all__ = ["BROWN_PROSE", "BertTextDataModule", "MLMDataModule", "TextClassificationDataModule", "pad_batch"]

#: Brown's own division of its 15 genres into informative and imaginative prose, a natural
#: binary task: pass as ``label_map`` to :class:`TextClassificationDataModule`.
BROWN_PROSE: dict[str, str] = {
    **dict.fromkeys(
        ["news", "editorial", "reviews", "religion", "hobbies", "lore", "belles_lettres", "government", "learned"],
        "informative",
    ),
    **dict.fromkeys(["fiction", "mystery", "science_fiction", "adventure", "romance", "humor"], "imaginative"),
}


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``(input_ids, attention_mask)``, both ``(B, T)`` int64.

    Examples:
        >>> ids, mask = pad_batch([[5, 6, 7], [8]])
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


class BertTextDataModule(TextDataModule):
    """Base of the BERT DataModules: the special tokens are found by name, at any ids.

    A tokenizer trained here has ``[PAD] [UNK] [CLS] [SEP] [MASK]`` at ids 0..4. A given one (a
    ``tokenizer.json``, e.g. a public BERT's or RoBERTa's) needs padding, start and end tokens, and
    for masked-LM data a mask token, named as BERT's or RoBERTa's
    (:func:`~lightning_efficient.data.tokenizers.find_special_ids`), and it must frame a text as
    ``start ... end`` (its post-processor). Batches are padded with its padding id. The model reads
    the ids it needs (mask, special tokens) from the same tokenizer, which it receives in ``setup``.
    """

    tokenizer_kind = "wordpiece"
    special_tokens = BERT_SPECIAL_TOKENS
    #: Whether the data needs a mask token (masked-LM pretraining).
    needs_mask_token: bool = False

    def check_tokenizer(self, tokenizer: Tokenizer, source: str) -> None:
        """Fail unless ``tokenizer`` has the special tokens this data needs and frames a text with them.

        Raises:
            ConfigurationError: A special token is missing, or the tokenizer does not add the start
                and end tokens to a text.
        """
        ids = find_special_ids(tokenizer, source, need_mask=self.needs_mask_token)
        framed = tokenizer.encode("").ids
        if framed[:1] != [ids.cls_id] or framed[-1:] != [ids.sep_id]:
            start, end = tokenizer.id_to_token(ids.cls_id), tokenizer.id_to_token(ids.sep_id)
            raise ConfigurationError(
                f"tokenizer from {source!r} encodes an empty text as {framed}, not [{start!r}, {end!r}]; "
                "it needs a post-processor that frames every text with its start and end tokens"
            )

    @cached_property
    def special_ids(self) -> SpecialIds:
        """The ids of the tokenizer's padding, start, end and mask tokens, and the set of all special ids."""
        return find_special_ids(self.tokenizer, self.tokenizer_source or "trained", need_mask=self.needs_mask_token)


class MLMDataModule(BertTextDataModule):
    """Text for masked-LM pretraining, packed into full blocks of ``max_length`` tokens.

    All training texts are tokenized, concatenated and cut into blocks ``[CLS] ... [SEP]`` (``<s>
    ... </s>`` with a RoBERTa tokenizer); a seeded random share of blocks is held out for
    validation and test. Masking (15%, 80/10/10)
    happens in :class:`~lightning_efficient.models.bert.BertMLM`, on a generator it checkpoints.
    Batches are ``{"input_ids", "attention_mask"}``, each ``(B, max_length)``.

    Args:
        train_files: jsonl / csv / txt files (``.gz`` allowed); default: the embedded Austen
            novels and Brown Corpus.
        text_column: Column holding the text (txt files: one text per non-empty line).
        val_files: Validation files; default: ``val_fraction`` of the training blocks.
        val_fraction: Share of blocks held out for validation when ``val_files`` is not given.
        test_fraction: Share of blocks held out for ``test``.
        predict_files: Texts for ``predict`` (the tokenizer's mask token, ``[MASK]`` or ``<mask>``,
            marks the tokens to fill); default: the validation texts.
        tokenizer: A ``tokenizer.json`` (ours, or e.g. a public BERT's or RoBERTa's: it needs
            padding, start, end and mask tokens with BERT's or RoBERTa's names, at any ids) or a
            checkpoint of ours; default: train WordPiece on the training texts (cached).
        vocab_size: Target size of a newly trained WordPiece vocabulary.
        max_length: Tokens per block, ``[CLS]`` and ``[SEP]`` included.
        batch_size: Blocks per batch.
        num_workers: DataLoader worker processes.
        seed: Seed of the held-out split.

    Examples:
        >>> dm = MLMDataModule(max_length=64, batch_size=4, vocab_size=2000)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader()))["input_ids"].shape
        torch.Size([4, 64])
    """

    needs_mask_token = True
    drop_last_train = True

    def __init__(
        self,
        train_files: list[str] | None = None,
        text_column: str = "text",
        val_files: list[str] | None = None,
        val_fraction: float = 0.02,
        test_fraction: float = 0.02,
        predict_files: list[str] | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 30522,
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(tokenizer, vocab_size, batch_size, num_workers, seed)
        self._keep_split_arguments(val_files, val_fraction, test_fraction, predict_files, max_length, min_length=8)
        self.train_files = (
            list(train_files) if train_files else [embedded_path("austen.txt.gz"), embedded_path("brown.jsonl.gz")]
        )
        self.text_column = text_column
        self._texts: list[str] | None = None
        self.splits: dict[str, list[list[int]]] = {}

    def tokenizer_training_texts(self) -> list[str]:
        if self._texts is None:
            self._texts = read_texts(self.train_files, self.text_column)
        return self._texts

    def blocks(self, texts: Sequence[str]) -> list[list[int]]:
        """Tokenize ``texts``, concatenate them and cut the stream into ``[CLS] ... [SEP]`` blocks."""
        cls_id, sep_id = self.special_ids.cls_id, self.special_ids.sep_id
        stream: list[int] = []
        for encoding in self.tokenizer.encode_batch(list(texts), add_special_tokens=False):
            stream.extend(encoding.ids)
        width = self.max_length - 2
        return [[cls_id, *stream[i : i + width], sep_id] for i in range(0, len(stream) - width + 1, width)]

    def setup(self, stage: str) -> None:
        if self.splits or (stage == "predict" and self.predict_files):
            return  # predicting from files needs no training data
        blocks = self.blocks(self.tokenizer_training_texts())
        self.splits = {name: [blocks[i] for i in part] for name, part in self.held_out_indices(len(blocks)).items()}
        if self.val_files:
            self.splits["val"] = self.blocks(read_texts(self.val_files, self.text_column))
        if not self.splits["train"]:
            raise DataError(f"training files {self.train_files} hold fewer than one block of {self.max_length} tokens")
        self.check_train_batches(
            len(self.splits["train"]), f"blocks of {self.max_length} tokens from {self.train_files}"
        )

    def _collate(self, blocks: list[list[int]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_batch(blocks, self.special_ids.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _collate_predict(self, texts: list[str]) -> dict[str, Any]:
        encodings = self.tokenizer.encode_batch(texts)
        batch: dict[str, Any] = self._collate([e.ids[: self.max_length] for e in encodings])
        batch["text"] = texts
        return batch

    def predict_dataloader(self):
        if self.predict_files:
            texts = read_texts(self.predict_files, self.text_column)
        else:
            texts = [self.tokenizer.decode(block) for block in self.splits["val"]]
        return self._loader(texts, self._collate_predict, shuffle=False)


class TextClassificationDataModule(BertTextDataModule):
    """Sentences with a label, for :class:`~lightning_efficient.models.bert.BertClassifier`.

    The default is the embedded Brown Corpus, one sentence per row, labelled by its genre (15
    classes, ``label_column="genre"``), or by informative vs imaginative prose with
    ``label_map=BROWN_PROSE``. Held-out sentences are chosen by whole groups (Brown: by
    document) so no document is on both sides. Batches are ``{"input_ids", "attention_mask",
    "labels"}``.

    Args:
        train_files: jsonl / csv files with a text and a label column; default: embedded Brown.
        text_column: Column holding the text.
        label_column: Column holding the label.
        label_map: Maps raw labels to task labels (every raw label must be a key).
        label_names: The classes in class-index order; every label (after ``label_map``) must be
            one of them, compared as text. Default: the sorted distinct training labels, which
            must then all be of one type, that of the first row (``1`` and ``"1"`` in one file
            fail instead of becoming two classes).
        group_column: Column whose values are kept together when splitting; default ``"doc"``
            for the embedded Brown Corpus, none for user files.
        val_files: Validation files; default: ``val_fraction`` of the training groups.
        val_fraction: Share held out for validation when ``val_files`` is not given.
        test_fraction: Share held out for ``test``.
        predict_files: Texts to classify in ``predict`` (txt, jsonl or csv); default: validation.
        tokenizer: A ``tokenizer.json`` (ours, or e.g. a public BERT's or RoBERTa's: it needs
            padding, start and end tokens with BERT's or RoBERTa's names, at any ids) or a
            checkpoint of ours (a ``BertMLM`` checkpoint for the pretrain -> fine-tune path);
            default: train WordPiece on the training texts.
        vocab_size: Target size of a newly trained vocabulary.
        max_length: Longest sequence in tokens (longer texts are truncated).
        batch_size: Examples per batch.
        num_workers: DataLoader worker processes.
        seed: Seed of the held-out split.

    Examples:
        >>> dm = TextClassificationDataModule(label_map=BROWN_PROSE)
        >>> dm.label_names
        ['imaginative', 'informative']
    """

    def __init__(
        self,
        train_files: list[str] | None = None,
        text_column: str = "text",
        label_column: str = "genre",
        label_map: dict[str, str] | None = None,
        label_names: list[str] | None = None,
        group_column: str | None = None,
        val_files: list[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        predict_files: list[str] | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 30522,
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(tokenizer, vocab_size, batch_size, num_workers, seed)
        self._keep_split_arguments(val_files, val_fraction, test_fraction, predict_files, max_length, min_length=3)
        if label_names is not None and (len(set(label_names)) < 2 or len(set(label_names)) != len(label_names)):
            raise ConfigurationError(f"label_names={label_names!r} must hold at least 2 distinct names, each once")
        if train_files:
            self.train_files = list(train_files)
        else:
            self.train_files = [embedded_path("brown.jsonl.gz")]
            group_column = group_column or "doc"
        self.text_column = text_column
        self.label_column = label_column
        self.label_map = label_map
        self.group_column = group_column
        self._rows: dict[str, tuple[list[str], list[str]]] = {}
        self.given_label_names = [str(name) for name in label_names] if label_names is not None else None
        self._label_names: list[str] | None = None
        self._first_label: tuple[type, str, int] | None = None  # type, file and line of the first label read
        self.splits: dict[str, list[tuple[list[int], int]]] = {}

    def _read_labelled(self, files: Sequence[str], with_groups: bool) -> tuple[list[str], list[str], list[Any] | None]:
        texts: list[str] = []
        labels: list[str] = []
        groups: list[Any] = []
        for file in files:
            numbered = read_numbered_records(file, self.text_column)
            lines = [line for line, _ in numbered]
            records = [record for _, record in numbered]
            texts.extend(str(t) for t in read_column(records, self.text_column, file, lines))
            values = read_column(records, self.label_column, file, lines)
            raw = [self._checked_label(value, file, line) for value, line in zip(values, lines)]
            if self.label_map is not None:
                unknown = sorted(set(raw) - set(self.label_map))
                if unknown:
                    raise DataError(
                        f"labels {unknown} of column {self.label_column!r} in {file!r} are not keys of label_map; "
                        f"label_map keys: {sorted(self.label_map)}"
                    )
                raw = [self.label_map[label] for label in raw]
            if self.given_label_names is not None:
                for label, line in zip(raw, lines):
                    if label not in self.given_label_names:
                        raise DataError(
                            f"data file {file!r}, line {line}: label {label!r} is not one of "
                            f"label_names {self.given_label_names}"
                        )
            labels.extend(raw)
            if with_groups and self.group_column:
                groups.extend(f"{file}:{g}" for g in read_column(records, self.group_column, file, lines))
        return texts, labels, (groups if with_groups and self.group_column else None)

    def _checked_label(self, value: Any, file: str, line: int) -> str:
        """``value`` as a class name, failing on an empty label or, without ``label_names``, a change of type."""
        where = f"data file {file!r}, line {line}: label {value!r} in column {self.label_column!r}"
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where} is empty")
        if not isinstance(value, (str, int, float)):
            raise DataError(f"{where} must be a string or a number, not a {type(value).__name__}")
        if self.given_label_names is None:
            if self._first_label is None:
                self._first_label = (type(value), file, line)
            first_type, first_file, first_line = self._first_label
            if type(value) is not first_type:
                raise DataError(
                    f"{where} is a {type(value).__name__}, but the first label (line {first_line} of {first_file!r}) "
                    f"is a {first_type.__name__}; give every label the same type, or list the classes in label_names"
                )
        return str(value)

    def _load_rows(self) -> None:
        if self._rows:
            return
        texts, labels, groups = self._read_labelled(self.train_files, with_groups=True)
        parts = self.held_out_indices(len(texts), groups)
        self._rows = {name: ([texts[i] for i in part], [labels[i] for i in part]) for name, part in parts.items()}
        if self.val_files:
            val_texts, val_labels, _ = self._read_labelled(self.val_files, with_groups=False)
            self._rows["val"] = (val_texts, val_labels)
        given = self.given_label_names
        self._label_names = list(given) if given is not None else sorted(set(self._rows["train"][1]))
        if len(self._label_names) < 2:
            raise DataError(
                f"column {self.label_column!r} of {self.train_files} has {len(self._label_names)} distinct "
                "label(s) in the training split; classification needs at least 2"
            )
        for name in ("val", "test"):
            unseen = sorted(set(self._rows[name][1]) - set(self._label_names))
            if unseen:
                raise DataError(f"{name} labels {unseen} never occur in the training split {self._label_names}")

    def tokenizer_training_texts(self) -> list[str]:
        self._load_rows()
        return self._rows["train"][0]

    @property
    def label_names(self) -> list[str]:
        """``label_names`` if given, else the sorted distinct labels of the training split; index ``i`` is class ``i``."""
        self._load_rows()
        assert self._label_names is not None
        return self._label_names

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    model_argument_names = ("vocab_size", "num_labels", "label_names")

    def model_arguments(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "num_labels": self.num_labels, "label_names": self.label_names}

    def setup(self, stage: str) -> None:
        if self.splits or (stage == "predict" and self.predict_files):
            return  # predicting from files needs no training data
        self._load_rows()
        index = {name: i for i, name in enumerate(self.label_names)}
        for name, (texts, labels) in self._rows.items():
            self.splits[name] = [(ids, index[label]) for ids, label in zip(self._encode(texts), labels)]

    def _collate(self, examples: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_batch([ids for ids, _ in examples], self.special_ids.pad_id)
        labels = torch.tensor([label for _, label in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _collate_predict(self, texts: list[str]) -> dict[str, Any]:
        input_ids, attention_mask = pad_batch(self._encode(texts), self.special_ids.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "text": texts}

    def predict_dataloader(self):
        texts = read_texts(self.predict_files, self.text_column) if self.predict_files else self._rows["val"][0]
        return self._loader(texts, self._collate_predict, shuffle=False)
