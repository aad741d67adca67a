"""Tokenized splits on disk: a cached ``Dataset.map`` and the rows a DataModule's loaders read.

:func:`cached_map` runs a batched function over a memory-mapped table (in ``num_proc`` processes)
and writes the result as an Arrow file in :func:`~lightning_efficient.data.sources.datasets_cache_dir`,
named by a fingerprint of the source table, the tokenizer and the settings. The second run, and
every other process of a DDP run, finds the file and maps nothing. :class:`ArrowRows` reads the
result back row by row (or a batch of rows at once) as the plain Python values the collate
functions of the package take, so RAM does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import datasets
from torch.utils.data import Dataset

from lightning_efficient.data.sources import PROGRESS_ROWS, datasets_cache_dir, load_source, quiet_datasets

__all__ = ["ArrowRows", "TextColumns", "cached_map", "fingerprint"]

_MAP_VERSION = "1"  # part of every map's fingerprint: bump when a map function's output changes


def fingerprint(*parts: object) -> str:
    """A short stable hash of ``parts`` (their ``str``), for cache file names.

    Examples:
        >>> fingerprint("a", 1) == fingerprint("a", 1) != fingerprint("a", 2)
        True
    """
    digest = hashlib.sha256(_MAP_VERSION.encode())
    for part in parts:
        digest.update(b"\x00" + str(part).encode("utf-8"))
    return digest.hexdigest()[:20]


def cached_map(
    table: datasets.Dataset,
    function: Callable[[dict[str, list[Any]]], dict[str, list[Any]]],
    key: Sequence[object],
    features: datasets.Features,
    num_proc: int | None = None,
    desc: str = "Tokenizing",
    batch_size: int = 1000,
) -> datasets.Dataset:
    """``table.map(function, batched=True)``, its output cached on disk under a fingerprint.

    The fingerprint is that of ``table`` (``datasets`` derives it from the source files and the
    operations on them) with ``key`` (the tokenizer's JSON and every setting the function
    reads), so a different source, tokenizer or setting maps again and the same ones never do.

    Args:
        table: A memory-mapped table.
        function: Takes a batch of columns, returns the new columns (any number of rows).
        key: Everything besides the table that decides the output.
        features: The output columns' types.
        num_proc: Processes to map in (``None``: this one).
        desc: The progress bar's label.
        batch_size: Rows per call of ``function``.

    Examples:
        >>> table = datasets.Dataset.from_dict({"text": ["a b", "c"]})
        >>> double = lambda batch: {"n": [len(t) * 2 for t in batch["text"]]}
        >>> list(cached_map(table, double, ["double"], datasets.Features({"n": datasets.Value("int32")}))["n"])
        [6, 2]
    """
    name = fingerprint(table._fingerprint, *key)
    directory = datasets_cache_dir() / "maps"
    directory.mkdir(parents=True, exist_ok=True)
    with quiet_datasets(progress=len(table) >= PROGRESS_ROWS):
        return table.map(
            function,
            batched=True,
            batch_size=batch_size,
            num_proc=num_proc if num_proc and num_proc > 1 else None,
            remove_columns=table.column_names,
            features=features,
            new_fingerprint=name,
            cache_file_name=str(directory / f"{name}.arrow"),
            load_from_cache_file=True,
            desc=desc,
        )


class ArrowRows(Dataset, Sequence):
    """The rows of a memory-mapped table as the plain values a collate function takes.

    With one column each row is that column's value (a list of token ids); with several, a
    tuple of them. ``__getitems__`` reads a whole batch in one Arrow ``take``, which the
    ``DataLoader`` uses for every batch.

    Args:
        table: The table (``datasets.Dataset``), e.g. one split from :func:`cached_map` and ``select``.
        columns: The columns that make a row, in order.

    Examples:
        >>> rows = ArrowRows(datasets.Dataset.from_dict({"ids": [[1, 2], [3]], "label": [0, 1]}), ["ids", "label"])
        >>> len(rows), rows[1], rows.__getitems__([1, 0])
        (2, ([3], 1), [([3], 1), ([1, 2], 0)])
    """

    def __init__(self, table: datasets.Dataset, columns: Sequence[str]) -> None:
        self.table = table.select_columns(list(columns))
        self.columns = list(columns)

    def __len__(self) -> int:
        return len(self.table)

    def _rows(self, batch: dict[str, list[Any]]) -> list[Any]:
        if len(self.columns) == 1:
            return batch[self.columns[0]]
        return list(zip(*(batch[column] for column in self.columns)))

    def __getitem__(self, index: int | slice) -> Any:  # type: ignore[override]
        if isinstance(index, slice):
            return self._rows(self.table[index])
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        return self.__getitems__([index % len(self)])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        return self._rows(self.table[list(indices)])

    def __iter__(self) -> Iterator[Any]:
        for batch in self.table.iter(batch_size=1000):
            yield from self._rows(batch)


class TextColumns(Sequence):
    """One text column of several tables, read lazily in order (tokenizer training, hashing).

    ``len()`` is the number of rows; iteration reads the tables in batches, as strings.

    Examples:
        >>> texts = TextColumns([datasets.Dataset.from_dict({"t": ["a", "b"]}), datasets.Dataset.from_dict({"t": [3]})], "t")
        >>> len(texts), list(texts), texts[2]
        (3, ['a', 'b', '3'], '3')
    """

    def __init__(self, tables: Sequence[datasets.Dataset], column: str) -> None:
        self.tables = list(tables)
        self.column = column

    @classmethod
    def of(cls, sources: Sequence[str], column: str, role: str = "train") -> TextColumns:
        """The ``column`` of every source (:func:`~lightning_efficient.data.sources.load_source`), in order."""
        return cls([load_source(source, [column], role, text_column=column) for source in sources], column)

    @property
    def fingerprint(self) -> str:
        """A hash of the tables' ``datasets`` fingerprints (their sources and operations) and the column."""
        return fingerprint(self.column, *(table._fingerprint for table in self.tables))

    def __len__(self) -> int:
        return sum(len(table) for table in self.tables)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        for table in self.tables:
            if index < len(table):
                return str(table[index][self.column])
            index -= len(table)
        raise IndexError(index)

    def __iter__(self) -> Iterator[str]:
        for table in self.tables:
            for batch in table.select_columns([self.column]).iter(batch_size=10_000):
                yield from (str(text) for text in batch[self.column])
