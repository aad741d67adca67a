"""DataModules for BERT: masked-LM pretraining and sequence classification.

Defaults are the embedded corpora (Jane Austen's novels and the Brown Corpus); every module also
reads a user's data through Hugging Face ``datasets`` (files, saved datasets, hub ids:
:func:`~lightning_efficient.data.sources.load_source`) with the column names given as arguments. The tokenizer is
trained on the data (our WordPiece, special tokens at ids 0..4) or given as a ``tokenizer.json``,
such as a public BERT's or RoBERTa's, whose special tokens are found by name at any ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from lightning_efficient.data.base import TextDataModule
from lightning_efficient.data.files import embedded_path
from lightning_efficient.data.sources import load_source, source_name
from lightning_efficient.data.streaming import (
    STREAM_TOKENIZER_TEXTS,
    PackedStream,
    StreamingDataLoader,
    check_streaming,
    check_streaming_trainer,
    stream_sample,
)
from lightning_efficient.data.tokenized import ArrowRows, TextColumns, cached_map
from lightning_efficient.data.tokenizers import BERT_SPECIAL_TOKENS, SpecialIds, find_special_ids
from lightning_efficient.errors import ConfigurationError, DataError

__all__ = [
    "BROWN_PROSE",
    "PACK_BATCH",
    "BertTextDataModule",
    "MLMDataModule",
    "PackBlocks",
    "TextClassificationDataModule",
    "pad_batch",
]

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


class PackBlocks:
    """The batched map that turns texts into ``[CLS] ... [SEP]`` blocks of ``max_length`` tokens.

    Each batch of texts is tokenized, concatenated and cut into blocks; the tail of a batch that
    does not fill a block is dropped (as Hugging Face's ``run_mlm`` ``group_texts``), under one
    block per :data:`PACK_BATCH` texts. A picklable class, so ``num_proc`` processes can run it.

    Examples:
        >>> from lightning_efficient.data.tokenizers import train_wordpiece
        >>> tok = train_wordpiece(["the cat sat on the mat"] * 10, vocab_size=60, show_progress=False)
        >>> blocks = PackBlocks(tok, "text", cls_id=2, sep_id=3, max_length=5)({"text": ["the cat sat", "on the mat"]})
        >>> [[tok.id_to_token(i) for i in block] for block in blocks["input_ids"]]
        [['[CLS]', 'the', 'cat', 'sat', '[SEP]'], ['[CLS]', 'on', 'the', 'mat', '[SEP]']]
    """

    def __init__(self, tokenizer: Tokenizer, column: str, cls_id: int, sep_id: int, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.column = column
        self.cls_id, self.sep_id = cls_id, sep_id
        self.width = max_length - 2

    def ids(self, texts: Sequence[Any]) -> list[int]:
        """The token ids of ``texts`` one after another, without special tokens."""
        encodings = self.tokenizer.encode_batch([str(t) for t in texts], add_special_tokens=False)
        return [i for encoding in encodings for i in encoding.ids]

    def cut(self, stream: list[int]) -> tuple[list[list[int]], list[int]]:
        """``stream`` cut into full ``[CLS] ... [SEP]`` blocks, and the tail that does not fill one."""
        width, full = self.width, len(stream) // self.width
        blocks = [[self.cls_id, *stream[k * width : (k + 1) * width], self.sep_id] for k in range(full)]
        return blocks, stream[full * width :]

    def blocks(self, texts: Sequence[str]) -> list[list[int]]:
        """``texts`` tokenized, concatenated and cut into full blocks (the tail is dropped)."""
        return self.cut(self.ids(texts))[0]

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        return {"input_ids": self.blocks(batch[self.column])}


#: Texts packed together by :class:`PackBlocks` (the map's batch): the tail of each is dropped.
PACK_BATCH = 10_000
_BLOCK_FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})


class MLMDataModule(BertTextDataModule):
    """Text for masked-LM pretraining, packed into full blocks of ``max_length`` tokens.

    The training texts are read through Hugging Face ``datasets``
    (:func:`~lightning_efficient.data.sources.load_source`: files, saved datasets, hub ids),
    tokenized and packed into blocks ``[CLS] ... [SEP]`` (``<s> ... </s>`` with a RoBERTa
    tokenizer) by a batched ``Dataset.map`` in ``num_proc`` processes, and cached on disk as
    memory-mapped Arrow: RAM stays flat with the corpus size, and the second run (and every DDP
    rank after the first) reads the cache instead of tokenizing. A seeded random share of blocks
    is held out for validation and test. Masking (15%, 80/10/10) happens in
    :class:`~lightning_efficient.models.bert.BertMLM`, on a generator it checkpoints.
    Batches are ``{"input_ids", "attention_mask"}``, each ``(B, max_length)``.

    With ``streaming=True`` the corpus is read as training goes, never cached
    (:class:`~lightning_efficient.data.streaming.PackedStream`): each data-parallel process reads
    its own share, packs blocks on the fly and shuffles them in a buffer of ``shuffle_buffer``
    blocks, and a checkpoint holds the exact position (buffer included). The stream repeats
    without end, so ``trainer.max_steps`` sets the run's length and ``val_check_interval`` must
    count steps; validation comes from ``val_files``.

    Args:
        train_files: Sources (:func:`~lightning_efficient.data.sources.load_source`: jsonl / json,
            csv / tsv, parquet, txt, each ``.gz`` allowed; a ``save_to_disk`` directory; a hub id);
            default: the embedded Austen novels and Brown Corpus.
        text_column: Column holding the text (txt files: one text per line).
        val_files: Validation sources; default: ``val_fraction`` of the training blocks.
        val_fraction: Share of blocks held out for validation when ``val_files`` is not given.
        test_fraction: Share of blocks held out for ``test``.
        predict_files: Texts for ``predict`` (the tokenizer's mask token, ``[MASK]`` or ``<mask>``,
            marks the tokens to fill); default: the validation texts.
        tokenizer: A ``tokenizer.json`` (ours, or e.g. a public BERT's or RoBERTa's: it needs
            padding, start, end and mask tokens with BERT's or RoBERTa's names, at any ids) or a
            checkpoint of ours; default: train WordPiece on the training texts (cached; when
            streaming, on the first :data:`STREAM_TOKENIZER_TEXTS` texts).
        vocab_size: Target size of a newly trained WordPiece vocabulary.
        max_length: Tokens per block, ``[CLS]`` and ``[SEP]`` included.
        batch_size: Blocks per batch.
        num_workers: DataLoader worker processes (0 when streaming).
        seed: Seed of the held-out split and of the stream's shuffle.
        num_proc: Processes that tokenize (``Dataset.map``); default: this one.
        streaming: Read the training corpus as training goes instead of caching it.
        shuffle_buffer: Blocks in the streaming shuffle buffer.

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
        num_proc: int | None = None,
        streaming: bool = False,
        shuffle_buffer: int = 2000,
    ) -> None:
        super().__init__(tokenizer, vocab_size, batch_size, num_workers, seed)
        self._keep_split_arguments(val_files, val_fraction, test_fraction, predict_files, max_length, min_length=8)
        if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
            raise ConfigurationError(f"num_proc={num_proc!r} must be a positive number of processes, or None")
        if not isinstance(shuffle_buffer, int) or isinstance(shuffle_buffer, bool) or shuffle_buffer < 1:
            raise ConfigurationError(f"shuffle_buffer={shuffle_buffer!r} must be a positive number of blocks")
        if streaming:
            check_streaming(self, val_files, val_fraction, test_fraction, num_workers)
        self.train_files = (
            list(train_files) if train_files else [embedded_path("austen.txt.gz"), embedded_path("brown.jsonl.gz")]
        )
        self.text_column = text_column
        self.num_proc = num_proc
        self.streaming = streaming
        self.shuffle_buffer = shuffle_buffer
        self._texts: TextColumns | list[str] | None = None
        self._opened: dict[tuple[tuple[str, ...], str], list[datasets.Dataset]] = {}
        self._blocks: dict[tuple[tuple[str, ...], str], datasets.Dataset] = {}
        self.splits: dict[str, Sequence[list[int]]] = {}

    def _tables(self, files: Sequence[str], role: str) -> list[datasets.Dataset]:
        """The text column of each of ``files``, opened once (the tokenizer and the blocks read the same tables)."""
        if (tuple(files), role) not in self._opened:
            self._opened[tuple(files), role] = [
                load_source(file, [self.text_column], role, text_column=self.text_column) for file in files
            ]
        return self._opened[tuple(files), role]

    def tokenizer_training_texts(self) -> Sequence[str]:
        if self._texts is None:
            if self.streaming:
                self._texts = stream_sample(self._streams(), self.text_column, STREAM_TOKENIZER_TEXTS)
            else:
                self._texts = TextColumns(self._tables(self.train_files, "train"), self.text_column)
        return self._texts

    def _packer(self) -> PackBlocks:
        ids = self.special_ids
        return PackBlocks(self.tokenizer, self.text_column, ids.cls_id, ids.sep_id, self.max_length)

    def blocks(self, texts: Sequence[str]) -> list[list[int]]:
        """Tokenize ``texts`` in :data:`PACK_BATCH` texts at a time, and cut each into ``[CLS] ... [SEP]`` blocks."""
        packer, texts = self._packer(), list(texts)
        return [block for i in range(0, len(texts), PACK_BATCH) for block in packer.blocks(texts[i : i + PACK_BATCH])]

    def block_table(self, files: Sequence[str], role: str = "train") -> datasets.Dataset:
        """The blocks of ``files``' texts as one memory-mapped table (column ``input_ids``), mapped once and cached.

        Kept for this DataModule's life: ``prepare_data`` and ``setup`` of one process build it once.
        """
        if (tuple(files), role) not in self._blocks:
            self._blocks[tuple(files), role] = self._block_table(files, role)
        return self._blocks[tuple(files), role]

    def _block_table(self, files: Sequence[str], role: str) -> datasets.Dataset:
        packer = self._packer()
        # num_proc decides where the packing batches start, so it is part of the key too
        key = ("mlm-blocks", self.tokenizer.to_str(), self.text_column, self.max_length, PACK_BATCH, self.num_proc or 1)
        tables = [
            cached_map(
                table,
                packer,
                key,
                _BLOCK_FEATURES,
                self.num_proc,
                f"Packing {Path(source_name(file)).name}",
                PACK_BATCH,
            )
            for table, file in zip(self._tables(files, role), files)
        ]
        return tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)

    def prepare_data(self) -> None:
        """Train (or load) the tokenizer and tokenize the corpus into the cache, once per machine.

        Lightning calls this on local rank 0 only; the other ranks' ``setup`` then finds both in
        the cache, so no rank tokenizes twice.
        """
        super().prepare_data()
        if not self.streaming:
            self.block_table(self.train_files)
            if self.val_files:
                self.block_table(self.val_files, "validation")

    def setup(self, stage: str) -> None:
        if self.splits or (stage == "predict" and self.predict_files):
            return  # predicting from files needs no training data
        if self.streaming:
            self._setup_streaming()
            return
        blocks = self.block_table(self.train_files)
        parts = self.held_out_indices(len(blocks))
        self.splits = {  # an index array, kept in memory: a list of millions of ints takes seconds to select
            name: ArrowRows(blocks.select(np.asarray(part, dtype=np.int64), keep_in_memory=True), ["input_ids"])
            for name, part in parts.items()
        }
        if self.val_files:
            self.splits["val"] = ArrowRows(self.block_table(self.val_files, "validation"), ["input_ids"])
        if not self.splits["train"]:
            raise DataError(f"training files {self.train_files} hold fewer than one block of {self.max_length} tokens")
        self.check_train_batches(
            len(self.splits["train"]), f"blocks of {self.max_length} tokens from {self.train_files}"
        )

    def _streams(self) -> list[datasets.IterableDataset]:
        """The training sources as new streams (a stream read once, e.g. for the tokenizer, keeps its position)."""
        return [
            load_source(file, [self.text_column], "train", streaming=True, text_column=self.text_column)
            for file in self.train_files
        ]

    def _setup_streaming(self) -> None:
        check_streaming_trainer(self.trainer)
        ranks = self._data_parallel_ranks()
        self.stream = PackedStream(
            self._streams(), self.text_column, self._packer(), self.shuffle_buffer, self.seed,
            rank=ranks.get("rank", 0), world_size=ranks.get("num_replicas", 1),
        )  # fmt: skip
        self.splits = {"test": []}
        if self.val_files:
            self.splits["val"] = ArrowRows(self.block_table(self.val_files, "validation"), ["input_ids"])
        else:
            self.splits["val"] = []

    def train_dataloader(self) -> DataLoader:
        if not self.streaming:
            return super().train_dataloader()
        return StreamingDataLoader(
            self.stream, batch_size=self.batch_size, collate_fn=self._collate, trainer_prefetch=self.trainer is not None
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
            texts = list(TextColumns.of(self.predict_files, self.text_column, "test"))
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
        train_files: Sources with a text and a label column (files, saved datasets or hub ids, as
            :func:`~lightning_efficient.data.sources.load_source` reads them); default: embedded Brown.
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
        self._first_label: tuple[type, str, int] | None = None  # type, file and row of the first label read
        self.splits: dict[str, list[tuple[list[int], int]]] = {}

    def _read_labelled(
        self, files: Sequence[str], with_groups: bool, role: str = "train"
    ) -> tuple[list[str], list[str], list[Any] | None]:
        texts: list[str] = []
        labels: list[str] = []
        groups: list[Any] = []
        grouped = with_groups and self.group_column
        for file in files:
            columns = [self.text_column, self.label_column, *([self.group_column] if grouped else [])]
            table = load_source(file, list(dict.fromkeys(columns)), role, text_column=self.text_column)
            texts.extend(str(t) for t in table[self.text_column])
            rows = range(1, len(table) + 1)
            raw = [self._checked_label(value, file, row) for value, row in zip(table[self.label_column], rows)]
            if self.label_map is not None:
                unknown = sorted(set(raw) - set(self.label_map))
                if unknown:
                    raise DataError(
                        f"labels {unknown} of column {self.label_column!r} in {file!r} are not keys of label_map; "
                        f"label_map keys: {sorted(self.label_map)}"
                    )
                raw = [self.label_map[label] for label in raw]
            if self.given_label_names is not None:
                for label, row in zip(raw, rows):
                    if label not in self.given_label_names:
                        raise DataError(
                            f"data file {file!r}, row {row}: label {label!r} is not one of "
                            f"label_names {self.given_label_names}"
                        )
            labels.extend(raw)
            if grouped:
                groups.extend(f"{file}:{g}" for g in table[self.group_column])
        return texts, labels, (groups if grouped else None)

    def _checked_label(self, value: Any, file: str, row: int) -> str:
        """``value`` as a class name, failing on an empty label or, without ``label_names``, a change of type.

        ``row`` counts the data rows of ``file`` from 1 (a csv header is not a row).
        """
        where = f"data file {file!r}, row {row}: label {value!r} in column {self.label_column!r}"
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where} is empty")
        if not isinstance(value, (str, int, float)):
            raise DataError(f"{where} must be a string or a number, not a {type(value).__name__}")
        if self.given_label_names is None:
            if self._first_label is None:
                self._first_label = (type(value), file, row)
            first_type, first_file, first_row = self._first_label
            if type(value) is not first_type:
                raise DataError(
                    f"{where} is a {type(value).__name__}, but the first label (row {first_row} of {first_file!r}) "
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
            val_texts, val_labels, _ = self._read_labelled(self.val_files, with_groups=False, role="validation")
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
        texts = (
            list(TextColumns.of(self.predict_files, self.text_column, "test"))
            if self.predict_files
            else self._rows["val"][0]
        )
        return self._loader(texts, self._collate_predict, shuffle=False)
