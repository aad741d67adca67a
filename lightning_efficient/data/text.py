"""DataModules for BERT: masked-LM pretraining and sequence classification.

Defaults are the embedded corpora (Jane Austen's novels and the Brown Corpus); every module also
reads a user's jsonl / csv / txt files with the column names given as arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_efficient.data.base import TextDataModule
from lightning_efficient.data.files import embedded_path, read_column, read_records, read_texts
from lightning_efficient.data.tokenizers import BERT_SPECIAL_TOKENS
from lightning_efficient.errors import DataError

__all__ = ["BROWN_PROSE", "MLMDataModule", "TextClassificationDataModule", "pad_batch"]

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


class MLMDataModule(TextDataModule):
    """Text for masked-LM pretraining, packed into full blocks of ``max_length`` tokens.

    All training texts are tokenized, concatenated and cut into blocks ``[CLS] ... [SEP]``; a
    seeded random share of blocks is held out for validation and test. Masking (15%, 80/10/10)
    happens in :class:`~lightning_efficient.models.bert.BertMLM`, on a generator it checkpoints.
    Batches are ``{"input_ids", "attention_mask"}``, each ``(B, max_length)``.

    Args:
        train_files: jsonl / csv / txt files (``.gz`` allowed); default: the embedded Austen
            novels and Brown Corpus.
        text_column: Column holding the text (txt files: one text per non-empty line).
        val_files: Validation files; default: ``val_fraction`` of the training blocks.
        val_fraction: Share of blocks held out for validation when ``val_files`` is not given.
        test_fraction: Share of blocks held out for ``test``.
        predict_files: Texts for ``predict`` (``[MASK]`` marks the tokens to fill); default: the
            validation texts.
        tokenizer: A ``tokenizer.json`` or a checkpoint of ours; default: train WordPiece on the
            training texts (cached).
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

    tokenizer_kind = "wordpiece"
    special_tokens = BERT_SPECIAL_TOKENS
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
        tok = self.tokenizer
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        stream: list[int] = []
        for encoding in tok.encode_batch(list(texts), add_special_tokens=False):
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

    def _collate(self, blocks: list[list[int]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_batch(blocks)
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


class TextClassificationDataModule(TextDataModule):
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
        group_column: Column whose values are kept together when splitting; default ``"doc"``
            for the embedded Brown Corpus, none for user files.
        val_files: Validation files; default: ``val_fraction`` of the training groups.
        val_fraction: Share held out for validation when ``val_files`` is not given.
        test_fraction: Share held out for ``test``.
        predict_files: Texts to classify in ``predict`` (txt, jsonl or csv); default: validation.
        tokenizer: A ``tokenizer.json`` or a checkpoint of ours (a ``BertMLM`` checkpoint for
            the pretrain -> fine-tune path); default: train WordPiece on the training texts.
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

    tokenizer_kind = "wordpiece"
    special_tokens = BERT_SPECIAL_TOKENS

    def __init__(
        self,
        train_files: list[str] | None = None,
        text_column: str = "text",
        label_column: str = "genre",
        label_map: dict[str, str] | None = None,
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
        self._label_names: list[str] | None = None
        self.splits: dict[str, list[tuple[list[int], int]]] = {}

    def _read_labelled(self, files: Sequence[str], with_groups: bool) -> tuple[list[str], list[str], list[Any] | None]:
        texts: list[str] = []
        labels: list[str] = []
        groups: list[Any] = []
        for file in files:
            records = read_records(file, self.text_column)
            texts.extend(str(t) for t in read_column(records, self.text_column, file))
            raw = [str(label) for label in read_column(records, self.label_column, file)]
            if self.label_map is not None:
                unknown = sorted(set(raw) - set(self.label_map))
                if unknown:
                    raise DataError(
                        f"labels {unknown} of column {self.label_column!r} in {file!r} are not keys of label_map; "
                        f"label_map keys: {sorted(self.label_map)}"
                    )
                raw = [self.label_map[label] for label in raw]
            labels.extend(raw)
            if with_groups and self.group_column:
                groups.extend(f"{file}:{g}" for g in read_column(records, self.group_column, file))
        return texts, labels, (groups if with_groups and self.group_column else None)

    def _load_rows(self) -> None:
        if self._rows:
            return
        texts, labels, groups = self._read_labelled(self.train_files, with_groups=True)
        parts = self.held_out_indices(len(texts), groups)
        self._rows = {name: ([texts[i] for i in part], [labels[i] for i in part]) for name, part in parts.items()}
        if self.val_files:
            val_texts, val_labels, _ = self._read_labelled(self.val_files, with_groups=False)
            self._rows["val"] = (val_texts, val_labels)
        self._label_names = sorted(set(self._rows["train"][1]))
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
        """Sorted distinct labels of the training split; index ``i`` is class ``i``."""
        self._load_rows()
        assert self._label_names is not None
        return self._label_names

    @property
    def num_labels(self) -> int:
        """Number of classes in the training split."""
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
        input_ids, attention_mask = pad_batch([ids for ids, _ in examples])
        labels = torch.tensor([label for _, label in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _collate_predict(self, texts: list[str]) -> dict[str, Any]:
        input_ids, attention_mask = pad_batch(self._encode(texts))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "text": texts}

    def predict_dataloader(self):
        texts = read_texts(self.predict_files, self.text_column) if self.predict_files else self._rows["val"][0]
        return self._loader(texts, self._collate_predict, shuffle=False)
