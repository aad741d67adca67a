"""The report of a pipeline ("train large, then compress"): Pareto fronts, training curves and tables.

After every stage the pipeline runner hands the stage records it holds (one dict per stage branch,
the schema of ``record.json``: ``name``, ``stage``, ``kind``, ``from``, ``status``, ``wall_time_s``,
``efficiency`` -- the run's ``efficiency.json``, :mod:`lightning_efficient.summary` -- and
``measures`` -- what ``lightning_efficient.pipeline.measure`` measured of the exported model) to
:func:`build_report`, writes the result with :func:`write_report` and prints :func:`format_front`.

A stage's *metric* is the exported model's (``measures.metrics[name]``), or, for a stage that
measures nothing, the training run's final value (``efficiency.final_metrics[name]``). Its *costs*
are the three Pareto axes of :data:`AXES`: parameters (``measures.params``), CPU latency at batch 1
(``measures.latency_ms["1"]``) and bytes on disk (``measures.disk_bytes``). A stage is on the front
of an axis when no other stage costs at most as much with a metric at least as good, one of the two
strictly better (:func:`pareto_front`).

``report.json`` (:data:`REPORT_VERSION`)::

    {"version": 1, "pipeline": "tiny", "metric": {"name": "val/accuracy", "mode": "max"},
     "stages": [record, ...],
     "pareto": {"params": [names], "latency_ms": [names], "disk_bytes": [names]},
     "curves": ["pretrain/preset=tiny", ...]}

Beside it :func:`write_report` writes ``report.md`` (tables), ``report_curves.png`` (the validation
metric of the ``curves`` stages against wall-clock seconds and counted FLOPs) and
``report_pareto.png`` (the metric against each axis, the fronts as step lines). Every function is
pure except :func:`write_report` and :func:`read_report`; the module needs only the standard library
at import time (matplotlib is imported when a PNG is drawn).

Examples:
    >>> measured = {"params": 1000, "disk_bytes": 4000, "latency_ms": {"1": 2.0}, "metrics": {"acc": 0.8}}
    >>> small = {**measured, "params": 250, "disk_bytes": 1000, "latency_ms": {"1": 1.0}, "metrics": {"acc": 0.7}}
    >>> records = [{"name": "dense", "stage": "finetune", "measures": measured},
    ...            {"name": "pruned", "stage": "prune", "measures": small}]
    >>> build_report("tiny", records, "acc")["pareto"]
    {'params': ['pruned', 'dense'], 'latency_ms': ['pruned', 'dense'], 'disk_bytes': ['pruned', 'dense']}
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_efficient.atomic_write import write_atomically
from lightning_efficient.compare import format_number
from lightning_efficient.errors import ConfigurationError, DataError, check_choice

__all__ = [
    "AXES",
    "CURVES_FILE",
    "MARKDOWN_FILE",
    "MODES",
    "PARETO_FILE",
    "REPORT_FILE",
    "REPORT_VERSION",
    "axis_value",
    "build_report",
    "format_front",
    "metric_value",
    "pareto_front",
    "plot_curves",
    "plot_pareto",
    "read_report",
    "write_report",
]

REPORT_VERSION = 1
"""The ``version`` of the ``report.json`` schema written and read here."""

REPORT_FILE = "report.json"
"""The report's file name in the pipeline's directory (``runs/<pipeline>/``)."""

MARKDOWN_FILE = "report.md"
"""The human-readable report beside :data:`REPORT_FILE`."""

CURVES_FILE = "report_curves.png"
"""The training-curves figure beside :data:`REPORT_FILE`."""

PARETO_FILE = "report_pareto.png"
"""The Pareto figure beside :data:`REPORT_FILE`."""

MODES = ("max", "min")
"""``mode`` of the metric: ``"max"`` (higher is better) or ``"min"`` (lower is better)."""

AXES: dict[str, str] = {
    "params": "parameters",
    "latency_ms": "latency at batch 1 (ms)",
    "disk_bytes": "disk size (MB)",
}
"""The Pareto axes (cost keys of ``report["pareto"]``) and how the report names them."""

_REQUIRED_KEYS = ("pipeline", "metric", "stages", "pareto", "curves")
_COLUMNS = {"params": "params", "latency_ms": "latency b1 ms", "disk_bytes": "disk MB"}  # table headers
_MEGABYTE = 1e6  # disk sizes are shown in decimal MB
_CURVES_INCHES = (11.0, 4.2)
_PARETO_INCHES = (15.0, 4.4)
_FIGURE_DPI = 100


# -- reading the records ---------------------------------------------------------------------------
def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _mapping(record: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``record[key]`` when it is a mapping, else an empty one (a stage that measured or summarised nothing)."""
    value = record.get(key)
    return value if isinstance(value, Mapping) else {}


def metric_value(record: Mapping[str, Any], metric: str) -> float | None:
    """The metric of one stage record: the exported model's, else the training run's final value.

    Args:
        record: A stage record.
        metric: The metric's name, e.g. ``"val/accuracy"``.

    Returns:
        ``measures.metrics[metric]`` when the record has ``measures``; otherwise
        ``efficiency.final_metrics[metric]``; None where that is missing or not a finite number.

    Examples:
        >>> metric_value({"measures": {"metrics": {"acc": 0.8}}, "efficiency": {"final_metrics": {"acc": 0.9}}}, "acc")
        0.8
        >>> metric_value({"measures": None, "efficiency": {"final_metrics": {"acc": 0.9}}}, "acc")
        0.9
    """
    measures = _mapping(record, "measures")
    if measures:
        return _finite(_mapping(measures, "metrics").get(metric))
    return _finite(_mapping(_mapping(record, "efficiency"), "final_metrics").get(metric))


def axis_value(record: Mapping[str, Any], axis: str) -> float | None:
    """The cost of one stage record on a Pareto axis (see :data:`AXES`), None where it was not measured.

    Args:
        record: A stage record.
        axis: ``"params"``, ``"latency_ms"`` (batch 1) or ``"disk_bytes"``.

    Returns:
        The cost as a float, or None.

    Raises:
        ConfigurationError: ``axis`` is not one of :data:`AXES`.

    Examples:
        >>> axis_value({"measures": {"params": 10, "latency_ms": {"1": 2.5, "32": 9.0}}}, "latency_ms")
        2.5
        >>> axis_value({"measures": None}, "params") is None
        True
    """
    check_choice("axis", axis, AXES)
    measures = _mapping(record, "measures")
    if axis == "latency_ms":
        return _finite(_mapping(measures, "latency_ms").get("1"))
    return _finite(measures.get(axis))


def _history(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    history = _mapping(record, "efficiency").get("history")
    return [point for point in history if isinstance(point, Mapping)] if isinstance(history, list) else []


# -- the front -------------------------------------------------------------------------------------
def pareto_front(points: Sequence[tuple[str, float | None, float | None]], mode: str = "max") -> list[str]:
    """The names of the points on the Pareto front of cost (lower is better) against a metric.

    A point is on the front when no other point has a cost ``<=`` and a metric at least as good
    with one of the two strictly better. Identical points are all on the front; a point whose cost
    or metric is None (or not a finite number) is left out.

    Args:
        points: ``(name, cost, metric)`` per point.
        mode: ``"max"`` (a higher metric is better) or ``"min"``.

    Returns:
        The names on the front ordered by cost (equal costs: in the order given).

    Raises:
        ConfigurationError: ``mode`` is neither ``"max"`` nor ``"min"``.

    Examples:
        >>> points = [("base", 100, 0.90), ("small", 10, 0.85), ("worse", 50, 0.80), ("unmeasured", None, 0.99)]
        >>> pareto_front(points)
        ['small', 'base']
        >>> pareto_front([("a", 1, 3.0), ("b", 2, 2.0), ("c", 2, 4.0)], mode="min")
        ['a', 'b']
    """
    check_choice("mode", mode, MODES)
    sign = 1.0 if mode == "max" else -1.0  # compare sign * metric: larger is better
    kept: list[tuple[str, float, float]] = []
    for name, cost, metric in points:
        cost_value, metric_number = _finite(cost), _finite(metric)
        if cost_value is not None and metric_number is not None:
            kept.append((name, cost_value, sign * metric_number))
    kept.sort(key=lambda point: point[1])  # stable: equal costs stay in the order given
    front: list[str] = []
    best: float | None = None  # the best metric of every cheaper point
    for _, group in itertools.groupby(kept, key=lambda point: point[1]):
        same_cost = list(group)
        top = max(point[2] for point in same_cost)
        if best is None or top > best:  # equal to a cheaper point's metric: dominated by it
            front.extend(name for name, _, value in same_cost if value == top)
            best = top
    return front


# -- the report ------------------------------------------------------------------------------------
def _default_curves(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The records of the first stage (in the records' order) of which some record has a history."""
    stages = list(dict.fromkeys(record.get("stage") for record in records))
    for stage in stages:
        names = [str(record["name"]) for record in records if record.get("stage") == stage and _history(record)]
        if names:
            return names
    return []


def build_report(
    pipeline: str,
    records: Sequence[Mapping[str, Any]],
    metric: str,
    mode: str = "max",
    curves: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The ``report.json`` dict of a pipeline: its stage records, the Pareto fronts and the curve stages.

    Args:
        pipeline: The pipeline's name.
        records: The stage records, in the order the report lists them (each has a unique ``name``).
        metric: The metric of the fronts, e.g. ``"val/accuracy"`` (see :func:`metric_value`).
        mode: ``"max"`` when a higher metric is better, ``"min"`` when lower is.
        curves: The names of the records whose validation history the curves figure shows; default:
            the records with a history of the first stage (by ``stage``, in the records' order) that
            has any.

    Returns:
        ``{"version", "pipeline", "metric": {"name", "mode"}, "stages", "pareto": {axis: names}, "curves"}``.

    Raises:
        ConfigurationError: ``mode`` is unknown, a record has no ``name`` or shares it, or ``curves``
            names an unknown record.

    Examples:
        >>> history = [{"step": 10, "wall_time_s": 5.0, "value": 0.6, "flops": 1e12}]
        >>> records = [{"name": "pretrain", "stage": "pretrain", "efficiency": {"history": history}},
        ...            {"name": "int8", "stage": "quantize", "measures": {"params": 9, "metrics": {"acc": 0.7}}}]
        >>> report = build_report("tiny", records, "acc")
        >>> report["pareto"]["params"], report["pareto"]["disk_bytes"], report["curves"]
        (['int8'], [], ['pretrain'])
    """
    check_choice("mode", mode, MODES)
    names: list[str] = []
    for index, record in enumerate(records):
        name = record.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"stage record {index} has no name (got {name!r})")
        if name in names:
            raise ConfigurationError(f"stage record name {name!r} appears twice; each stage branch needs its own")
        names.append(name)
    if curves is None:
        curves = _default_curves(records)
    unknown = [name for name in curves if name not in names]
    if unknown:
        raise ConfigurationError(f"curves={list(unknown)!r} are not stage records; known: {', '.join(names)}")
    pareto = {
        axis: pareto_front([(r["name"], axis_value(r, axis), metric_value(r, metric)) for r in records], mode)
        for axis in AXES
    }
    return {
        "version": REPORT_VERSION,
        "pipeline": pipeline,
        "metric": {"name": metric, "mode": mode},
        "stages": [dict(record) for record in records],
        "pareto": pareto,
        "curves": list(curves),
    }


def _check_report(data: Any, where: str) -> dict[str, Any]:
    """``data`` if it is a report of :data:`REPORT_VERSION`, else a DataError naming ``where``."""
    if not isinstance(data, dict):
        raise DataError(f"pipeline report {where!r} is not a JSON object")
    version = data.get("version")
    if isinstance(version, bool) or version != REPORT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > REPORT_VERSION
        hint = " (written by a newer release: upgrade lightning-efficient to read it)" if newer else ""
        raise DataError(
            f"pipeline report {where!r} has schema version {version!r}; this version of "
            f"lightning-efficient reads version {REPORT_VERSION} only{hint}"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        raise DataError(f"pipeline report {where!r} lacks required keys: {', '.join(missing)}")
    metric, stages = data["metric"], data["stages"]
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str) or metric.get("mode") not in MODES:
        raise DataError(f'pipeline report {where!r}: \'metric\' must be {{"name": ..., "mode": "max"|"min"}}')
    if not isinstance(stages, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in stages):
        raise DataError(f"pipeline report {where!r}: 'stages' must be a list of stage records, each with a name")
    if not isinstance(data["pareto"], dict) or not isinstance(data["curves"], list):
        raise DataError(f"pipeline report {where!r}: 'pareto' must be an object and 'curves' a list")
    return data


def read_report(path: str | Path) -> dict[str, Any]:
    """Read and check a pipeline's ``report.json``.

    Args:
        path: The report file, or the pipeline directory holding :data:`REPORT_FILE`.

    Returns:
        The report as written by :func:`write_report`.

    Raises:
        DataError: (a ``ConfigurationError``) naming the file: it is missing, unreadable or not
            JSON, has another schema version, or lacks required keys.

    Examples:
        >>> read_report("runs/no_such_pipeline")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.DataError: cannot read pipeline report 'runs/no_such_pipeline/report.json': ...
    """
    path = Path(path)
    if path.is_dir() or (path.suffix != ".json" and not path.exists()):
        path = path / REPORT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise DataError(f"cannot read pipeline report {str(path)!r}: {reason}") from error
    return _check_report(data, str(path))


# -- text ------------------------------------------------------------------------------------------
def _show(value: Any, show: Callable[[float], str] = format_number) -> str:
    number = _finite(value)
    return "" if number is None else show(number)


def _megabytes(value: Any) -> str:
    number = _finite(value)
    return "" if number is None else format_number(number / _MEGABYTE)


def _cell(value: Any) -> str:
    """Text for a markdown table cell (pipes escaped, None blank)."""
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _better(mode: str) -> str:
    return "higher is better" if mode == "max" else "lower is better"


def _stage_row(record: Mapping[str, Any], metric: str) -> list[str]:
    measures, efficiency = _mapping(record, "measures"), _mapping(record, "efficiency")
    latency = _mapping(measures, "latency_ms")
    return [
        str(record["name"]),
        str(record.get("kind") or ""),
        str(record.get("from") or ""),
        _show(metric_value(record, metric)),
        _show(measures.get("params")),
        _show(measures.get("nonzero_params")),
        _megabytes(measures.get("disk_bytes")),
        _show(latency.get("1")),
        _show(latency.get("32")),
        _show(efficiency.get("total_flops"), lambda x: f"{x:.3g}"),
        _show(efficiency.get("steps")),
        _show(record.get("wall_time_s")),
        str(record.get("status") or ""),
    ]


def _axis_cell(record: Mapping[str, Any], axis: str) -> str:
    value = axis_value(record, axis)
    return _megabytes(value) if axis == "disk_bytes" else _show(value)


def _markdown(report: Mapping[str, Any], pictures: Sequence[tuple[str, str]]) -> str:
    metric, mode = report["metric"]["name"], report["metric"]["mode"]
    by_name = {record["name"]: record for record in report["stages"]}
    lines = [
        f"# Pipeline `{report['pipeline']}`",
        "",
        f"Metric: `{metric}` ({_better(mode)}) of the exported model where the stage measured one, else the",
        "training run's final value. Disk sizes in MB (10^6 bytes); latency is the median CPU forward pass.",
        "",
        "## Stages",
        "",
    ]
    header = ["stage", "kind", "from", metric, "params", "nonzero params", "disk MB", "latency b1 ms"]
    header += ["latency b32 ms", "total FLOPs", "steps", "wall-clock s", "status"]
    lines += _markdown_table(header, [_stage_row(record, metric) for record in report["stages"]])
    for axis, title in AXES.items():
        lines += ["", f"## Pareto front: {metric} against {title}", ""]
        front = [by_name[name] for name in report["pareto"].get(axis, []) if name in by_name]
        if not front:
            lines.append("No stage has both a measured cost and the metric yet.")
            continue
        rows = [[r["name"], _show(metric_value(r, metric)), _axis_cell(r, axis)] for r in front]
        lines += _markdown_table(["stage", metric, _COLUMNS[axis]], rows)
    if pictures:
        lines += ["", "## Plots", ""]
        for text, file in pictures:
            lines += [f"![{text}]({file})", ""]
    return "\n".join(lines).rstrip() + "\n"


def format_front(report: Mapping[str, Any], directory: str | Path | None = None) -> str:
    """The lines the pipeline prints at its end: the front on the parameters axis and where the report is.

    Args:
        report: A report of :func:`build_report`.
        directory: The pipeline's directory, to name ``report.md`` in it (None: no such line).

    Returns:
        A fixed-width table (stage, metric, params, latency at batch 1, disk MB), lines joined by newlines.

    Examples:
        >>> measures = {"params": 4_400_000, "disk_bytes": 17_600_000, "latency_ms": {"1": 3.2},
        ...             "metrics": {"acc": 0.81}}
        >>> report = build_report("tiny", [{"name": "finetune", "stage": "finetune", "measures": measures}], "acc")
        >>> print(format_front(report, "runs/tiny"))
        Pipeline 'tiny': Pareto front of acc (higher is better) against parameters
          stage       acc      params   latency b1 ms   disk MB
          finetune   0.81   4,400,000             3.2      17.6
        report: runs/tiny/report.md
    """
    metric, mode = report["metric"]["name"], report["metric"]["mode"]
    by_name = {record["name"]: record for record in report["stages"]}
    front = [by_name[name] for name in report["pareto"].get("params", []) if name in by_name]
    lines = [f"Pipeline {report['pipeline']!r}: Pareto front of {metric} ({_better(mode)}) against parameters"]
    if front:
        table = [["stage", metric, *_COLUMNS.values()]]
        for record in front:
            row = [str(record["name"]), _show(metric_value(record, metric)), _axis_cell(record, "params")]
            table.append([*row, _axis_cell(record, "latency_ms"), _axis_cell(record, "disk_bytes")])
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            cells = [row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(row[1:], widths[1:]))]
            lines.append("  " + "   ".join(cells).rstrip())
    else:
        lines.append("  (no stage has both a parameter count and the metric yet)")
    if directory is not None:
        lines.append(f"report: {Path(directory) / MARKDOWN_FILE}")
    return "\n".join(lines)


# -- figures ---------------------------------------------------------------------------------------
def _figure(inches: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: only figures need matplotlib
    from matplotlib.figure import Figure

    figure = Figure(figsize=inches, dpi=_FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg whatever the session's default backend
    return figure


def _save(figure: Any, path: Path) -> Path:
    write_atomically(path, lambda file: figure.savefig(file, format="png"))
    return path


def plot_curves(report: Mapping[str, Any], path: str | Path) -> Path | None:
    """Draw the validation metric of the ``curves`` stages against wall-clock seconds and counted FLOPs.

    One line per record (legend: its name), from its ``efficiency.history``; a point without
    ``flops`` (None or missing) is left out of the FLOPs panel only.

    Args:
        report: A report of :func:`build_report`.
        path: The PNG to write (atomically; its directory is created).

    Returns:
        ``path``, or None when no curve record has a history point (nothing is written then).
    """
    by_name = {record["name"]: record for record in report["stages"]}
    lines = [(name, _history(by_name[name])) for name in report["curves"] if name in by_name]
    lines = [(name, history) for name, history in lines if history]
    if not lines:
        return None
    from matplotlib.ticker import EngFormatter

    figure = _figure(_CURVES_INCHES)
    by_time, by_flops = figure.subplots(1, 2)
    monitors = sorted({str(_mapping(by_name[name], "efficiency").get("monitor") or "metric") for name, _ in lines})
    ylabel = ", ".join(monitors)
    for index, (name, history) in enumerate(lines):
        color = f"C{index % 10}"
        timed = [(_finite(p.get("wall_time_s")), _finite(p.get("value"))) for p in history]
        timed = [(x, y) for x, y in timed if x is not None and y is not None]
        counted = [(_finite(p.get("flops")), _finite(p.get("value"))) for p in history]
        counted = [(x, y) for x, y in counted if x is not None and y is not None]
        for axes, xy in ((by_time, timed), (by_flops, counted)):
            if xy:
                axes.plot(*zip(*xy), marker="o", markersize=3, color=color, label=name)
    by_flops.xaxis.set_major_formatter(EngFormatter())
    for axes, xlabel, title in (
        (by_time, "wall-clock time (s)", "vs wall-clock time"),
        (by_flops, "counted training FLOPs (FLOP)", "vs counted FLOPs"),
    ):
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.set_title(f"{ylabel} {title}")
        axes.grid(True, alpha=0.3)
    if not by_flops.lines:
        by_flops.text(0.5, 0.5, "no FLOP counts recorded", ha="center", va="center", transform=by_flops.transAxes)
    by_time.legend(fontsize="small")
    return _save(figure, Path(path))


def plot_pareto(report: Mapping[str, Any], path: str | Path) -> Path | None:
    """Draw the metric against parameters, latency at batch 1 (ms) and disk size (MB), one panel each.

    Every record with the cost and the metric is a point labelled by its name; the front of the
    axis (``report["pareto"]``) is a step line with its points marked.

    Args:
        report: A report of :func:`build_report`.
        path: The PNG to write (atomically; its directory is created).

    Returns:
        ``path``, or None when no record has both a cost and the metric (nothing is written then).
    """
    metric, mode = report["metric"]["name"], report["metric"]["mode"]
    records = report["stages"]
    points = {axis: [(r["name"], axis_value(r, axis), metric_value(r, metric)) for r in records] for axis in AXES}
    points = {axis: [(n, x, y) for n, x, y in xys if x is not None and y is not None] for axis, xys in points.items()}
    if not any(points.values()):
        return None
    figure = _figure(_PARETO_INCHES)
    for axes, (axis, title) in zip(figure.subplots(1, len(AXES)), AXES.items()):
        scale = 1 / _MEGABYTE if axis == "disk_bytes" else 1.0
        xys = [(name, x * scale, y) for name, x, y in points[axis]]
        if xys:
            axes.scatter([x for _, x, _ in xys], [y for _, _, y in xys], s=18, color="0.55", zorder=2)
            for name, x, y in xys:
                axes.annotate(name, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
            where = {name: (x, y) for name, x, y in xys}
            front = [where[name] for name in report["pareto"].get(axis, []) if name in where]
            if front:
                axes.step(*zip(*front), where="post", color="C3", linewidth=1.5, zorder=3, label="Pareto front")
                axes.scatter(*zip(*front), s=40, facecolors="none", edgecolors="C3", linewidths=1.5, zorder=4)
                axes.legend(fontsize="small", loc="best")
            axes.margins(x=0.2)  # room for the names of the rightmost points
            costs = [x for _, x, _ in xys]
            if min(costs) > 0 and max(costs) / min(costs) >= 20:
                axes.set_xscale("log")
        else:
            axes.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axes.transAxes)
        axes.set_xlabel(title)
        axes.set_ylabel(f"{metric} ({_better(mode)})")
        axes.set_title(f"{metric} vs {title.split(' (')[0]}")
        axes.grid(True, alpha=0.3)
    return _save(figure, Path(path))


# -- writing ---------------------------------------------------------------------------------------
def write_report(directory: str | Path, report: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the two PNGs into ``directory``, each atomically.

    A PNG with nothing to draw (no history among the ``curves`` records; no measured record with
    the metric) is not written, and one left by an earlier refresh is removed, so the files always
    describe this report.

    Args:
        directory: The pipeline's directory (created if missing).
        report: A report of :func:`build_report`.

    Returns:
        The paths written, under the keys ``"json"``, ``"markdown"`` and, when drawn, ``"curves"``
        and ``"pareto"``.

    Raises:
        DataError: ``report`` is not a report of :data:`REPORT_VERSION`.

    Examples:
        >>> import tempfile
        >>> report = build_report("tiny", [{"name": "a", "stage": "a", "measures": None}], "acc")
        >>> sorted(write_report(tempfile.mkdtemp(), report))  # nothing to plot: no PNG
        ['json', 'markdown']
    """
    directory = Path(directory)
    report = _check_report(dict(report), "report")
    paths = {"json": directory / REPORT_FILE}
    write_atomically(paths["json"], json.dumps(report, indent=1) + "\n")
    pictures = []
    for key, file, text, draw in (
        ("curves", CURVES_FILE, "training curves", plot_curves),
        ("pareto", PARETO_FILE, "Pareto fronts", plot_pareto),
    ):
        drawn = draw(report, directory / file)
        if drawn is None:
            (directory / file).unlink(missing_ok=True)
        else:
            paths[key] = drawn
            pictures.append((text, file))
    paths["markdown"] = directory / MARKDOWN_FILE
    write_atomically(paths["markdown"], _markdown(report, pictures))
    return paths
