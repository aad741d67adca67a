"""The ``efficiency.json`` schema: one training run's efficiency summary, in one place.

:class:`~lightning_efficient.monitor.EfficiencyMonitor` writes one summary at the end of every
``fit`` with :func:`write_summary`; ``lightning-efficient compare`` (:mod:`lightning_efficient.compare`)
reads them with :func:`read_summary`. A summary is a JSON object; in Python it is a plain dict typed
:class:`RunSummary`. Counts and times are rank zero's share of the run (each process counts its own
batches on its own device): global throughput is about ``tokens_per_s x world_size``, MFU is per device.

| key | unit | meaning |
|---|---|---|
| ``version`` | | schema version, :data:`SCHEMA_VERSION` (2); a file without it is read as version 1 |
| ``run_name`` | | last component of ``trainer.default_root_dir`` |
| ``device`` | | ``"cuda: <GPU name>"``, ``"cpu: <CPU model>"`` or the device type |
| ``precision`` | | ``trainer.precision``, e.g. ``"32-true"``, ``"bf16-mixed"`` |
| ``world_size`` | processes | ``trainer.world_size`` |
| ``steps`` | optimizer steps | steps trained, across resumes (fewer than batches with accumulation) |
| ``samples`` | samples | samples trained on |
| ``tokens`` | tokens | real tokens trained on (padding excluded when the batch has an attention mask) |
| ``wall_time_s`` | s | wall-clock time of ``fit``, across resumes |
| ``train_time_s`` | s | training time: ``wall_time_s`` less validation and setup |
| ``samples_per_s`` | samples/s | ``samples / train_time_s`` |
| ``tokens_per_s`` | tokens/s | ``tokens / train_time_s`` |
| ``flops_per_step`` | FLOP | ``total_flops / steps`` |
| ``total_flops`` | FLOP | model FLOPs of what ran, forward and backward (:mod:`lightning_efficient.flops`) |
| ``achieved_flops_per_s`` | FLOP/s | ``total_flops / train_time_s`` |
| ``peak_flops_per_s`` | FLOP/s | peak of one device, given or measured |
| ``peak_flops_source`` | | ``"given"`` or ``"measured"`` |
| ``mfu`` | fraction | model FLOPs utilisation: ``achieved_flops_per_s / peak_flops_per_s`` |
| ``peak_memory_bytes`` | bytes | peak memory of the run, measured as ``memory_kind`` says |
| ``memory_kind`` | | ``"cuda_max_allocated"``, ``"process_peak_rss"`` or ``"ru_maxrss"`` |
| ``monitor`` | | the validation metric followed, e.g. ``"val/loss"`` |
| ``mode`` | | ``"min"`` (lower is better) or ``"max"`` |
| ``target`` | object or null | null without a target, else :class:`TargetRecord` |
| ``final_metrics`` | object | ``trainer.callback_metrics`` at the end of ``fit``: name -> number |
| ``history`` | list | one :class:`HistoryPoint` per validation |

A :class:`TargetRecord` holds ``value`` (the target), ``reached`` (bool) and, when first reached,
``step``, ``wall_time_s``, ``train_time_s`` and ``tokens`` (all null when not reached). A
:class:`HistoryPoint` holds, at that validation:

| key | unit | meaning |
|---|---|---|
| ``step`` | optimizer steps | ``trainer.global_step`` |
| ``wall_time_s`` | s | wall-clock time of ``fit`` so far, across resumes |
| ``train_time_s`` | s | training time so far |
| ``tokens`` | tokens | real tokens trained on so far |
| ``value`` | | the ``monitor`` metric |
| ``flops`` | FLOP | model FLOPs counted so far, as ``total_flops`` (since version 2; null for validations restored from a checkpoint written before it) |

Versions: 2 added ``history[].flops`` (validation loss against compute). Version-1 files (and
files without ``version``) still read, unchanged: their history points have no ``flops``.

Examples:
    >>> import tempfile
    >>> run = {"version": SCHEMA_VERSION, "run_name": "tiny", "device": "cpu", "precision": "32-true",
    ...        "world_size": 1, "steps": 2, "samples": 4, "tokens": 32, "wall_time_s": 1.5, "train_time_s": 1.0,
    ...        "samples_per_s": 4.0, "tokens_per_s": 32.0, "flops_per_step": 1e9, "total_flops": 2e9,
    ...        "achieved_flops_per_s": 2e9, "peak_flops_per_s": 1e11, "peak_flops_source": "given", "mfu": 0.02,
    ...        "peak_memory_bytes": 2**28, "memory_kind": "process_peak_rss", "monitor": "val/loss",
    ...        "mode": "min", "target": None, "final_metrics": {"val/loss": 3.2}, "history": []}
    >>> path = write_summary(tempfile.mkdtemp(), run)  # a directory: efficiency.json in it
    >>> path.name, read_summary(path) == run
    ('efficiency.json', True)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

from lightning_efficient.atomic_write import write_atomically
from lightning_efficient.errors import DataError

__all__ = [
    "HISTORY_KEYS",
    "SCHEMA_VERSION",
    "SUMMARY_FILE",
    "SUMMARY_KEYS",
    "TARGET_KEYS",
    "HistoryPoint",
    "RunSummary",
    "TargetRecord",
    "format_summary",
    "read_summary",
    "write_summary",
]

SCHEMA_VERSION = 2
"""The ``version`` of the ``efficiency.json`` schema written here; versions 1 and 2 are read."""

SUMMARY_FILE = "efficiency.json"
"""File name that ``EfficiencyMonitor`` writes into the run's log directory."""


class TargetRecord(TypedDict):
    """The ``target`` of a summary: its value and when it was first reached (None: not reached)."""

    value: float
    reached: bool
    step: int | None
    wall_time_s: float | None
    train_time_s: float | None
    tokens: int | None


class HistoryPoint(TypedDict):
    """One validation: the ``monitor`` metric's ``value`` and where the run stood then.

    ``flops`` is absent from version-1 files, and None for a validation restored from a
    checkpoint written before version 2.
    """

    step: int
    wall_time_s: float
    train_time_s: float
    tokens: int
    value: float
    flops: float | None


class RunSummary(TypedDict):
    """One run's ``efficiency.json``: the keys, units and meanings are in the module's table."""

    version: int
    run_name: str
    device: str
    precision: str
    world_size: int
    steps: int
    samples: int
    tokens: int
    wall_time_s: float
    train_time_s: float
    samples_per_s: float
    tokens_per_s: float
    flops_per_step: float
    total_flops: float
    achieved_flops_per_s: float
    peak_flops_per_s: float
    peak_flops_source: str
    mfu: float
    peak_memory_bytes: int
    memory_kind: str
    monitor: str
    mode: str
    target: TargetRecord | None
    final_metrics: dict[str, float]
    history: list[HistoryPoint]


SUMMARY_KEYS: tuple[str, ...] = tuple(RunSummary.__annotations__)
"""The keys of a summary, in the order the monitor writes them."""

TARGET_KEYS: tuple[str, ...] = tuple(TargetRecord.__annotations__)
"""The keys of a summary's ``target`` object."""

HISTORY_KEYS: tuple[str, ...] = tuple(HistoryPoint.__annotations__)
"""The keys of each point of a summary's ``history``."""

_PREVIOUS_VERSION = 1  # files without a "version" key are read as this version
_HISTORY_KEYS_OF: dict[int, tuple[str, ...]] = {  # the versions read (and written back unchanged)
    1: tuple(key for key in HISTORY_KEYS if key != "flops"),
    2: HISTORY_KEYS,
}
_SHOWN_MISSING = 8  # missing keys named in an error; the rest are counted


def _check(data: Any, where: str) -> RunSummary:
    """``data`` as a :class:`RunSummary` (a missing ``version`` filled in), or a DataError naming ``where``."""
    if not isinstance(data, dict):
        raise DataError(f"efficiency summary {where!r} is not a JSON object")
    version = data.get("version", _PREVIOUS_VERSION)
    if isinstance(version, bool) or not isinstance(version, (int, float)) or version not in _HISTORY_KEYS_OF:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION
        hint = " (written by a newer release: upgrade lightning-efficient to read it)" if newer else ""
        raise DataError(
            f"efficiency summary {where!r} has schema version {version!r}; this version of "
            f"lightning-efficient reads versions {' and '.join(map(str, _HISTORY_KEYS_OF))}{hint}"
        )
    missing = [key for key in SUMMARY_KEYS if key not in data and key != "version"]
    if len(missing) == len(SUMMARY_KEYS) - 1:
        raise DataError(
            f"{where!r} is not an efficiency summary: it has none of the keys run_name, device, steps, tokens, ... "
            "(see lightning_efficient.summary)"
        )
    target = data.get("target")
    if isinstance(target, dict):
        missing += [f"target.{key}" for key in TARGET_KEYS if key not in target]
    elif target is not None:
        raise DataError(f"efficiency summary {where!r}: 'target' must be null or an object")
    history = data.get("history", [])
    if not isinstance(data.get("final_metrics", {}), dict) or not isinstance(history, list):
        raise DataError(f"efficiency summary {where!r}: 'final_metrics' must be an object and 'history' a list")
    for index, point in enumerate(history):
        if not isinstance(point, dict):
            raise DataError(f"efficiency summary {where!r}: history[{index}] must be an object")
        missing += [f"history[{index}].{key}" for key in _HISTORY_KEYS_OF[version] if key not in point]
    if missing:
        shown = ", ".join(missing[:_SHOWN_MISSING])
        more = f" and {len(missing) - _SHOWN_MISSING} more" if len(missing) > _SHOWN_MISSING else ""
        raise DataError(f"efficiency summary {where!r} lacks required keys: {shown}{more} (schema version {version})")
    return data if "version" in data else {"version": _PREVIOUS_VERSION, **data}  # type: ignore[return-value]


def read_summary(path: str | Path) -> RunSummary:
    """Read and check one ``efficiency.json``.

    A file of the previous release (version 1) reads unchanged: its ``history`` points have no
    ``flops`` (check ``summary["version"]`` or use ``point.get("flops")``). One without a ``version``
    key is read as version 1 (the returned dict then has ``"version": 1``). Keys beyond the schema are kept.

    Args:
        path: The summary file (``lightning_efficient.compare.find_summary`` locates it from a run directory).

    Returns:
        The summary, a dict with every key of :class:`RunSummary`.

    Raises:
        DataError: (a ``ConfigurationError``) naming ``path``: the file is unreadable or not JSON, is
            not a summary, has a schema version other than 1 or 2 (e.g. a newer one), or lacks
            required keys (those of its version).

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "efficiency.json"
        >>> _ = path.write_text('{"version": 3}')
        >>> read_summary(path)
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.DataError: ... has schema version 3; ... reads versions 1 and 2 (written by a newer release: ...)
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read efficiency summary {str(path)!r}: {error}") from error
    return _check(data, str(path))


def write_summary(path_or_dir: str | Path, summary: Mapping[str, Any]) -> Path:
    """Write ``summary`` as JSON, atomically (a temporary file, then ``os.replace``).

    The summary is checked first, as :func:`read_summary` checks it, so what is written reads back.

    Args:
        path_or_dir: The file to write, or an existing directory to write :data:`SUMMARY_FILE` into
            (missing parent directories are created).
        summary: A :class:`RunSummary` (its ``version`` :data:`SCHEMA_VERSION`; a version-1 summary read
            from an older file is written back as it is).

    Returns:
        The path written.

    Raises:
        DataError: The summary lacks required keys or has a version that is not read.

    Examples:
        >>> import tempfile
        >>> write_summary(Path(tempfile.mkdtemp()) / "run.json", {"version": SCHEMA_VERSION, "run_name": "x"})
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.DataError: efficiency summary ... lacks required keys: device, precision, ...
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / SUMMARY_FILE
    text = json.dumps(_check(dict(summary), str(path)), indent=1)
    write_atomically(path, text)
    return path


def format_summary(summary: Mapping[str, Any], path: str | Path) -> str:
    """The few lines :class:`~lightning_efficient.monitor.EfficiencyMonitor` logs at the end of ``fit``.

    Args:
        summary: A :class:`RunSummary`.
        path: Where the summary was written (shown in the first line).

    Returns:
        The lines, joined by newlines.

    Examples:
        >>> s = {"run_name": "tiny", "device": "cpu", "precision": "32-true", "steps": 2, "samples": 4,
        ...      "tokens": 32, "wall_time_s": 1.5, "train_time_s": 1.0, "tokens_per_s": 32.0, "samples_per_s": 4.0,
        ...      "flops_per_step": 1e9, "achieved_flops_per_s": 2e9, "peak_flops_per_s": 1e11,
        ...      "peak_flops_source": "given", "mfu": 0.02, "peak_memory_bytes": 2**28,
        ...      "memory_kind": "process_peak_rss", "monitor": "val/loss", "mode": "min", "target": None}
        >>> print(format_summary(s, "runs/tiny/efficiency.json"))
        EfficiencyMonitor summary of 'tiny' (cpu, 32-true) -> runs/tiny/efficiency.json
          steps 2   samples 4   tokens 32
          wall 1.5 s   training 1.0 s   32.0 tokens/s   4.00 samples/s
          1e+09 FLOPs/step   achieved 2e+09 FLOP/s   peak 1e+11 (given)   MFU 2.0%
          peak memory 0.27 GB (process_peak_rss)
    """
    s = summary
    lines = [
        f"EfficiencyMonitor summary of {s['run_name']!r} ({s['device']}, {s['precision']}) -> {path}",
        f"  steps {s['steps']:,}   samples {s['samples']:,}   tokens {s['tokens']:,}",
        (
            f"  wall {s['wall_time_s']:.1f} s   training {s['train_time_s']:.1f} s   "
            f"{s['tokens_per_s']:,.1f} tokens/s   {s['samples_per_s']:,.2f} samples/s"
        ),
        (
            f"  {s['flops_per_step']:.3g} FLOPs/step   achieved {s['achieved_flops_per_s']:.3g} FLOP/s   "
            f"peak {s['peak_flops_per_s']:.3g} ({s['peak_flops_source']})   MFU {s['mfu']:.1%}"
        ),
        f"  peak memory {s['peak_memory_bytes'] / 1e9:.2f} GB ({s['memory_kind']})",
    ]
    target = s["target"]
    if target is not None:
        relation = "<=" if s["mode"] == "min" else ">="
        if target["reached"]:
            lines.append(
                f"  target {s['monitor']} {relation} {target['value']:g}: reached at step {target['step']} after "
                f"{target['wall_time_s']:.1f} s wall, {target['train_time_s']:.1f} s training, "
                f"{target['tokens']:,} tokens"
            )
        else:
            lines.append(f"  target {s['monitor']} {relation} {target['value']:g}: not reached")
    return "\n".join(lines)
