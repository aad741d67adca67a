"""Read a user's (or the embedded) data files: jsonl, csv and txt, optionally gzipped.

These readers are deliberately plain: they load a few hundred thousand rows in well under a
second, raise a :class:`~lightning_efficient.errors.DataError` naming the file and the column
that is wrong, and never touch a hub or a cache directory.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from lightning_efficient.errors import DataError

__all__ = [
    "SUPPORTED_SUFFIXES",
    "embedded_path",
    "read_column",
    "read_numbered_records",
    "read_records",
    "read_texts",
    "split_indices",
]

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")


def embedded_path(name: str) -> str:
    """Return the path of a data file shipped inside the package.

    Args:
        name: File name under ``lightning_efficient/data/embedded`` (e.g. ``"brown.jsonl.gz"``).

    Examples:
        >>> embedded_path("austen.txt.gz").endswith("austen.txt.gz")
        True
    """
    return str(resources.files("lightning_efficient.data").joinpath("embedded", name))


def _format_of(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    suffix = suffixes[-1] if suffixes else ""
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"data file {str(path)!r} has an unsupported format {suffix or '(no suffix)'!r}; "
            f"allowed: {', '.join(SUPPORTED_SUFFIXES)} (optionally .gz)"
        )
    return ".jsonl" if suffix == ".json" else suffix


def _open_text(path: Path) -> io.TextIOBase:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist or is not a file")
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
        return open(path, encoding="utf-8")
    except OSError as err:
        raise DataError(f"data file {str(path)!r} cannot be read: {err}") from err


def read_records(path: str | Path, text_column: str = "text") -> list[dict[str, Any]]:
    """Read every row of a jsonl / csv / txt file (``.gz`` allowed) as a list of dicts.

    A ``.txt`` file gives one record per non-empty line, under the key ``text_column``.

    Args:
        path: The file to read.
        text_column: Key under which a txt file's lines are stored.

    Raises:
        DataError: Missing, unreadable or empty file, unsupported format, or a malformed row.

    Examples:
        >>> rows = read_records(embedded_path("brown.jsonl.gz"))
        >>> sorted(rows[0])
        ['doc', 'genre', 'tags', 'text']
    """
    return [record for _, record in read_numbered_records(path, text_column)]


def read_numbered_records(path: str | Path, text_column: str = "text") -> list[tuple[int, dict[str, Any]]]:
    """As :func:`read_records`, each row with its 1-based line number in the file (for error messages).

    Blank lines of jsonl and txt files are skipped but counted; a csv row's number is that of its
    last line (the header is line 1).

    Examples:
        >>> [line for line, _ in read_numbered_records(embedded_path("brown.jsonl.gz"))[:3]]
        [1, 2, 3]
    """
    path = Path(path)
    fmt = _format_of(path)
    records: list[tuple[int, dict[str, Any]]] = []
    try:
        with _open_text(path) as handle:
            if fmt == ".txt":
                records = [(n, {text_column: line.strip()}) for n, line in enumerate(handle, start=1) if line.strip()]
            elif fmt == ".csv":
                reader = csv.DictReader(handle)
                records = [(reader.line_num, row) for row in reader]
            else:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"data file {str(path)!r}, line {number}: not valid JSON ({err})") from err
                    if not isinstance(row, dict):
                        raise DataError(f"data file {str(path)!r}, line {number}: expected a JSON object per line")
                    records.append((number, row))
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as err:
        raise DataError(f"data file {str(path)!r} cannot be read: {err}") from err
    if not records:
        raise DataError(f"data file {str(path)!r} holds no rows")
    return records


def read_column(
    records: Sequence[dict[str, Any]], column: str, source: str, lines: Sequence[int] | None = None
) -> list[Any]:
    """Return one column of ``records``, failing with the available columns if it is absent.

    Args:
        records: Rows from :func:`read_records`.
        column: The column to take.
        source: The file name, quoted in the error message.
        lines: Line number of each row (from :func:`read_numbered_records`), for the message;
            default: the row's position.

    Raises:
        DataError: ``column`` is missing from a row.
    """
    values = []
    for index, row in enumerate(records):
        if column not in row:
            where = f"line {lines[index]}" if lines is not None else f"row {index + 1}"
            raise DataError(
                f"column {column!r} is not in data file {source!r} ({where}); "
                f"available columns: {', '.join(sorted(row))}"
            )
        values.append(row[column])
    return values


def read_texts(files: Sequence[str | Path], column: str) -> list[str]:
    """The ``column`` of every row of ``files``, in order, as strings (a txt file: its non-empty lines).

    Args:
        files: jsonl / csv / txt files (``.gz`` allowed).
        column: The column to take; a txt file's lines are stored under it.

    Raises:
        DataError: As :func:`read_records` and :func:`read_column`.

    Examples:
        >>> texts = read_texts([embedded_path("brown.jsonl.gz")], "text")
        >>> len(texts) > 50000, isinstance(texts[0], str)
        (True, True)
    """
    texts: list[str] = []
    for file in files:
        texts.extend(str(t) for t in read_column(read_records(file, column), column, str(file)))
    return texts


def split_indices(
    n: int, fractions: Sequence[float], seed: int, groups: Sequence[Any] | None = None
) -> list[list[int]]:
    """Split ``range(n)`` into held-out parts of the given fractions plus the rest.

    The split is a seeded permutation, of whole groups when ``groups`` is given (so, e.g., all
    sentences of one document land on the same side).

    Args:
        n: Number of items.
        fractions: Fraction of items for each held-out part (e.g. ``[0.05, 0.05]``).
        seed: Seed of the permutation; the same seed gives the same split.
        groups: Optional group key of each item.

    Returns:
        ``[rest, part_0, part_1, ...]`` as lists of indices in increasing order.

    Examples:
        >>> rest, val = split_indices(10, [0.2], seed=0)
        >>> len(rest), len(val)
        (8, 2)
    """
    import torch

    if any(not 0.0 <= f < 1.0 for f in fractions) or sum(fractions) >= 1.0:
        raise DataError(f"split fractions {list(fractions)} must each lie in [0, 1) and sum to less than 1")
    if groups is None:  # one item per key: vectorised, so a corpus of millions of blocks splits in a moment
        order_tensor = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        part_of = torch.zeros(n, dtype=torch.int64)
        start = 0
        for part, fraction in enumerate(fractions, start=1):
            count = max(1, round(fraction * n)) if fraction > 0 else 0
            part_of[order_tensor[start : start + count]] = part
            start += count
        if start >= n:
            raise DataError(f"{n} items are too few to hold out fractions {list(fractions)}")
        return [torch.nonzero(part_of == part).flatten().tolist() for part in range(len(fractions) + 1)]
    keys = list(dict.fromkeys(groups))
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    part_of_key: dict[Any, int] = {}
    start = 0
    for part, fraction in enumerate(fractions, start=1):
        count = max(1, round(fraction * len(keys))) if fraction > 0 else 0
        for position in order[start : start + count]:
            part_of_key[keys[position]] = part
        start += count
    if start >= len(keys):
        raise DataError(f"{len(keys)} items are too few to hold out fractions {list(fractions)}")
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for index in range(n):
        parts[part_of_key.get(groups[index], 0)].append(index)
    return parts
