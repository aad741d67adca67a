"""Open a data source as a Hugging Face ``datasets`` table: a file, a saved dataset, or a hub id.

Every DataModule of the package reads its data through :func:`load_source`, so each accepts the
same sources:

- a local file, by extension: ``.jsonl`` / ``.json``, ``.csv``, ``.tsv``, ``.parquet``, ``.txt``
  (one text per line), each also ``.gz`` compressed;
- a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``;
- any other directory of data files, or a hub id such as ``"stanfordnlp/imdb"`` (with a network),
  through ``datasets.load_dataset``.

A directory or hub id that holds several splits gives the one its role asks for (``train`` for
training files, ``validation`` for validation files, ``test`` for prediction), or the split named
after a ``#``: ``"stanfordnlp/imdb#test"``.

The tables are memory-mapped Arrow files in the cache (:func:`datasets_cache_dir`), so RAM does
not grow with the corpus; ``streaming=True`` reads the source as it goes instead, for a corpus
larger than the disk cache. Bad input fails here, in one line naming the source: a missing or
unreadable file, an unknown extension, an empty file or split, a column that is not there (with
the columns that are).

Examples:
    >>> from lightning_efficient.data.files import embedded_path
    >>> brown = load_source(embedded_path("brown.jsonl.gz"), ["text", "genre"])
    >>> brown.column_names, len(brown) > 50000
    (['text', 'genre'], True)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets

from lightning_efficient.data.files import read_numbered_records
from lightning_efficient.data.tokenizers import cache_root
from lightning_efficient.errors import DataError

__all__ = [
    "FILE_FORMATS",
    "PROGRESS_BYTES",
    "PROGRESS_ROWS",
    "Table",
    "datasets_cache_dir",
    "load_source",
    "quiet_datasets",
    "source_name",
]

#: File extension -> (``datasets`` builder, its options). ``.gz`` may follow any of them.
FILE_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {"na_filter": False}),  # an empty cell is "", as a csv reader gives it
    ".tsv": ("csv", {"delimiter": "\t", "na_filter": False}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}
#: The split each role reads from a source with several splits, in order of preference.
ROLE_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "val", "dev", "valid"),
    "test": ("test",),
}

#: A table opened by :func:`load_source`: memory-mapped, or streamed.
Table = datasets.Dataset | datasets.IterableDataset


def datasets_cache_dir() -> Path:
    """Where ``datasets`` keeps the Arrow tables and the tokenized maps of the package.

    ``$HF_DATASETS_CACHE`` when it is set, else ``datasets`` under the package's cache
    (``$LIGHTNING_EFFICIENT_CACHE``, default ``~/.cache/lightning_efficient``).
    """
    hf_cache = os.environ.get("HF_DATASETS_CACHE")
    return Path(hf_cache) if hf_cache else cache_root() / "datasets"


def _split_spec(spec: str) -> tuple[str, str | None]:
    """``(location, split)`` of ``"location#split"``; a path that exists with a ``#`` in its name is all location."""
    if "#" in spec and not Path(spec).exists():
        location, split = spec.rsplit("#", 1)
        return location, split
    return spec, None


def source_name(spec: str) -> str:
    """``spec`` without its ``#split`` suffix (what error messages quote as the file)."""
    return _split_spec(spec)[0]


#: Rows from which a table's tokenization shows a progress bar (below, it takes a second or two).
PROGRESS_ROWS = 200_000
#: File size from which reading a file into the Arrow cache shows a progress bar.
PROGRESS_BYTES = 100 * 2**20


@contextlib.contextmanager
def quiet_datasets(progress: bool = False) -> Iterator[None]:
    """Hide ``datasets``' log lines (our errors say it in one line) and, unless ``progress``, its progress bars."""
    logger = logging.getLogger("datasets")
    level, bars = logger.level, datasets.utils.logging.is_progress_bar_enabled()
    logger.setLevel(logging.CRITICAL)
    if not progress:
        datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()


def _first_line(err: BaseException) -> str:
    """The first non-empty line of ``err``'s message (of its cause when it says nothing useful)."""
    for candidate in (err, err.__cause__):
        if candidate is not None:
            text = str(candidate).strip().splitlines()
            if text and "error occurred while generating" not in text[0]:
                return text[0]
    return type(err).__name__


def _file_format(path: Path) -> tuple[str, dict[str, Any]]:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    suffix = suffixes[-1].lower() if suffixes else ""
    if suffix not in FILE_FORMATS:
        raise DataError(
            f"data file {str(path)!r} has an unsupported format {suffix or '(no suffix)'!r}; allowed: "
            f"{', '.join(FILE_FORMATS)} (optionally .gz), a directory written by save_to_disk, or a hub dataset id"
        )
    return FILE_FORMATS[suffix]


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _pick_split(available: Sequence[str], spec: str, role: str, explicit: str | None) -> str:
    wanted = (explicit,) if explicit else ROLE_SPLITS.get(role, (role,))
    for split in wanted:
        if split in available:
            return split
    raise DataError(
        f"{source_name(spec)!r} has no split {' or '.join(repr(s) for s in wanted)}; its splits: "
        f"{', '.join(available)} (name one with {source_name(spec)}#SPLIT)"
    )


def _kind(value: Any) -> str:
    """The Arrow-relevant kind of a JSON value: numbers are one kind (a column may mix int and float)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _diagnose(path: Path, text_column: str) -> None:
    """Find why ``datasets`` could not read a json / csv / txt file, and say it with the line.

    Raises:
        DataError: A malformed row (from :func:`~lightning_efficient.data.files.read_numbered_records`),
            or a json column whose values change kind (a string in a column of numbers): Arrow
            holds one type per column.
    """
    records = read_numbered_records(path, text_column)
    first: dict[str, tuple[str, int, Any]] = {}
    for line, record in records:
        for column, value in record.items():
            if value is None:
                continue
            kind = _kind(value)
            seen = first.setdefault(column, (kind, line, value))
            if seen[0] != kind:
                raise DataError(
                    f"data file {str(path)!r}, line {line}: column {column!r} holds a {kind} ({value!r}), but line "
                    f"{seen[1]} holds a {seen[0]} ({seen[2]!r}); give every value of a column one type"
                )


def _load_file(path: Path, streaming: bool, text_column: str) -> Table:
    builder, options = _file_format(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist or is not a file")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"data file {str(path)!r} is empty")
    try:
        with quiet_datasets(progress=not streaming and size >= PROGRESS_BYTES):
            table = datasets.load_dataset(
                builder,
                data_files=[str(path.resolve())],
                split="train",
                cache_dir=str(datasets_cache_dir()),
                streaming=streaming,
                **options,
            )
    except Exception as err:  # datasets and pyarrow raise many types; we name the file
        if builder in ("json", "csv", "text"):
            _diagnose(path, text_column)  # raises the precise error (with its line) when it finds one
        raise DataError(f"data file {str(path)!r} cannot be read as {builder}: {_first_line(err)}") from err
    if builder == "text" and text_column != "text":
        table = table.rename_column("text", text_column)
    return table


def _load_directory_or_hub(spec: str, location: str, role: str, explicit: str | None, streaming: bool) -> Table:
    path = Path(location)
    if path.is_dir() and _is_saved_dataset(path):
        try:
            with quiet_datasets():
                loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # any failure to load: one line
            raise DataError(f"saved dataset {location!r} cannot be loaded: {_first_line(err)}") from err
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[_pick_split(list(loaded), spec, role, explicit)]
        elif explicit:
            raise DataError(f"saved dataset {location!r} holds one split, not several; drop '#{explicit}'")
        return loaded.to_iterable_dataset() if streaming else loaded
    what = "directory" if path.is_dir() else "hub dataset"
    try:
        with quiet_datasets():
            splits = datasets.load_dataset(location, cache_dir=str(datasets_cache_dir()), streaming=streaming)
    except Exception as err:  # no network, unknown id, unreadable files: one line
        hint = "" if path.is_dir() else " (a local file or directory of that name does not exist either)"
        raise DataError(f"{what} {location!r} cannot be loaded{hint}: {_first_line(err)}") from err
    return splits[_pick_split(list(splits), spec, role, explicit)]


def _column_names(table: Table, spec: str) -> list[str]:
    if table.column_names is not None:
        return list(table.column_names)
    first = next(iter(table), None)  # a streamed source without declared features: peek
    if first is None:
        raise DataError(f"{source_name(spec)!r} holds no rows")
    return list(first)


def load_source(
    spec: str | os.PathLike[str],
    columns: Sequence[str],
    role: str = "train",
    streaming: bool = False,
    text_column: str = "text",
    keep_all: bool = False,
) -> Table:
    """Open ``spec`` as a table of ``columns``, in the source's row order.

    Args:
        spec: A file, a directory (``save_to_disk`` or data files) or a hub id; ``#SPLIT``
            picks a split of a source that has several.
        columns: The columns to keep; each must exist.
        role: Which split a multi-split source gives: ``"train"``, ``"validation"`` or ``"test"``.
        streaming: Read as it goes (an ``IterableDataset``) instead of into the Arrow cache.
        text_column: The column a ``.txt`` file's lines go in.
        keep_all: Keep every column of the source, not only ``columns`` (which must still exist).

    Returns:
        A ``datasets.Dataset`` (memory-mapped), or an ``IterableDataset`` when ``streaming``.

    Raises:
        DataError: The source is missing, unreadable, of an unknown type or empty; a split or a
            column is not there (the message lists those that are).

    Examples:
        >>> from lightning_efficient.data.files import embedded_path
        >>> load_source(embedded_path("brown.jsonl.gz"), ["title"])
        Traceback (most recent call last):
          ...
        lightning_efficient.errors.DataError: column 'title' is not in data file ...brown.jsonl.gz'; available columns: doc, genre, tags, text
    """
    spec = str(spec)
    location, explicit = _split_spec(spec)
    path = Path(location)
    if path.is_file() or (not path.is_dir() and path.suffix):  # a file name (maybe a missing one)
        if explicit:
            raise DataError(f"data file {location!r} holds one table; '#{explicit}' names a split only of a dataset")
        table = _load_file(path, streaming, text_column)
    else:
        table = _load_directory_or_hub(spec, location, role, explicit, streaming)
    what = f"data file {location!r}" if path.is_file() else repr(source_name(spec))
    present = _column_names(table, spec)
    missing = [column for column in columns if column not in present]
    if missing:
        raise DataError(f"column {missing[0]!r} is not in {what}; available columns: {', '.join(sorted(present))}")
    if not streaming and len(table) == 0:
        raise DataError(f"{what} holds no rows")
    return table if keep_all else table.select_columns(list(columns))
