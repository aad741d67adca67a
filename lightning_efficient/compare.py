"""``lightning-efficient compare``: put the efficiency summaries of several runs side by side.

Every run trained with :class:`lightning_efficient.monitor.EfficiencyMonitor` in its callbacks leaves
an ``efficiency.json`` in its log directory (e.g. ``runs/bert_small_mlm/tensorboard/version_3/``).
This module reads those summaries and prints one table (one column per run, ratios to the first
run) and draws one PNG (the monitored metric against wall-clock seconds and against tokens)::

    lightning-efficient compare runs/bert_small_mlm runs/bert_small_mlm_layer_drop --output compare.png

A RUN_DIR may also be a pipeline's directory (``runs/<pipeline>/``, holding the ``report.json`` of
:mod:`lightning_efficient.pipeline.report`): every stage of it that has an efficiency summary is then
one column, labelled by the stage's name.

The functions are pure and usable without the command: :func:`find_summary`, :func:`load_summary`,
:func:`load_runs`, :func:`comparison_rows`, :func:`format_table`, :func:`plot`. The file's schema
(keys, units, version) is :mod:`lightning_efficient.summary`. The module needs only the standard library at import time;
matplotlib is imported inside :func:`plot`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_efficient.errors import ConfigurationError
from lightning_efficient.summary import SCHEMA_VERSION, SUMMARY_FILE, RunSummary, read_summary
from lightning_efficient.summary import _check as _check_summary  # read_summary's checks, for an in-memory summary

__all__ = [
    "SCHEMA_VERSION",
    "SUMMARY_FILE",
    "Row",
    "comparison_rows",
    "find_summary",
    "format_number",
    "format_table",
    "load_runs",
    "load_summary",
    "main",
    "plot",
    "run_labels",
]

_MEMORY_KINDS = {
    "cuda_max_allocated": "CUDA max allocated",
    "process_peak_rss": "process peak RSS",
    "ru_maxrss": "ru_maxrss",
}
_HOW_TO_RECORD = (
    "add lightning_efficient.monitor.EfficiencyMonitor to trainer.callbacks\n"
    "(YAML: `- class_path: lightning_efficient.monitor.EfficiencyMonitor` under trainer.callbacks) and train again"
)
_PIPELINE_REPORT = "report.json"  # lightning_efficient.pipeline.report.REPORT_FILE, imported only for a pipeline
_FIGURE_INCHES = (11.0, 4.2)
_FIGURE_DPI = 100  # -> a 1100 x 420 pixel PNG


# -- finding and reading summaries -----------------------------------------------------------------
def find_summary(run_dir: str | Path) -> Path:
    """The ``efficiency.json`` of a run.

    Args:
        run_dir: A directory holding ``efficiency.json``; or a run root (such as ``runs/bert_small_mlm``)
            under which the newest ``efficiency.json`` by modification time is taken, searched
            recursively (e.g. in ``tensorboard/version_3/``); or the summary file itself.

    Returns:
        The path of the summary file.

    Raises:
        ConfigurationError: ``run_dir`` does not exist or holds no summary.

    Examples:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "tensorboard" / "version_0").mkdir(parents=True)
        >>> _ = (root / "tensorboard" / "version_0" / "efficiency.json").write_text("{}")
        >>> find_summary(root).relative_to(root).as_posix()
        'tensorboard/version_0/efficiency.json'
    """
    path = Path(run_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigurationError(f"run directory {str(run_dir)!r} does not exist")
    if (path / SUMMARY_FILE).is_file():
        return path / SUMMARY_FILE
    found = [p for p in path.rglob(SUMMARY_FILE) if p.is_file()]
    if not found:
        raise ConfigurationError(f"no {SUMMARY_FILE} in {str(run_dir)!r} or below it; to record one, {_HOW_TO_RECORD}")
    return max(found, key=lambda p: (p.stat().st_mtime, str(p)))


def load_summary(path: str | Path) -> RunSummary:
    """Read and check one ``efficiency.json`` (schema version :data:`SCHEMA_VERSION`).

    The same as :func:`lightning_efficient.summary.read_summary`, under the name ``compare`` has
    always had.

    Args:
        path: The summary file (see :func:`find_summary` to locate it from a run directory).

    Returns:
        The summary as a dict, as written (a file without ``version`` gets ``"version": 1``).

    Raises:
        ConfigurationError: (a ``DataError``) The file is not JSON, not a summary, has another
            schema version, or lacks required keys.

    Examples:
        >>> load_summary("no_such_run/efficiency.json")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.DataError: cannot read efficiency summary 'no_such_run/efficiency.json': ...
    """
    return read_summary(path)


def load_runs(run_dir: str | Path) -> list[tuple[str | None, Path, RunSummary]]:
    """The runs a RUN_DIR of ``compare`` stands for: one plain run, or every summarised stage of a pipeline.

    A directory holding a pipeline's ``report.json`` (or that file itself) gives one run per stage
    record with an ``efficiency`` summary, in the report's order, each checked as
    :func:`load_summary` checks a file; anything else is read as :func:`find_summary` finds it.

    Args:
        run_dir: A run directory, a summary file, a pipeline directory or its ``report.json``.

    Returns:
        ``(label, path, summary)`` per run: ``label`` is the stage's name (None for a plain run:
        :func:`run_labels` names it), ``path`` the summary file or the pipeline's ``report.json``.

    Raises:
        ConfigurationError: No summary is found, a summary or the report is malformed, or the
            pipeline has no stage with a summary yet.

    Examples:
        >>> import tempfile
        >>> load_runs(Path(tempfile.mkdtemp()) / "nowhere")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: run directory '...nowhere' does not exist
    """
    path = Path(run_dir)
    report_path = path / _PIPELINE_REPORT if path.is_dir() else path
    if report_path.name != _PIPELINE_REPORT or not report_path.is_file():
        summary_path = find_summary(run_dir)
        return [(None, summary_path, load_summary(summary_path))]
    from lightning_efficient.pipeline.report import read_report  # lazy: only a pipeline needs it

    report = read_report(report_path)
    runs: list[tuple[str | None, Path, RunSummary]] = []
    for record in report["stages"]:
        if record.get("efficiency") is not None:
            where = f"{report_path} (stage {record['name']})"
            runs.append((str(record["name"]), report_path, _check_summary(record["efficiency"], where)))
    if not runs:
        raise ConfigurationError(
            f"pipeline report {str(report_path)!r} has no stage with an efficiency summary yet "
            "(no fit stage has finished, or none ran with EfficiencyMonitor)"
        )
    return runs


# -- the table -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One row of the comparison: raw values, their display text and ratios to the first run.

    Attributes:
        name: Row label, e.g. ``"tokens/s"``.
        values: One raw value per run (number, text, or None where the run has none).
        cells: One display text per run, ratio included, e.g. ``"3,415 (1.00x)"``.
        ratios: Value / first run's value for numeric rows (None where undefined).
    """

    name: str
    values: list[Any]
    cells: list[str]
    ratios: list[float | None]


def run_labels(summaries: Sequence[dict[str, Any]], paths: Sequence[str | Path] | None = None) -> list[str]:
    """Column labels: each run's ``run_name``, disambiguated when several runs share it.

    Equal names get the name of their summary's directory (e.g. ``version_3``) when ``paths`` are
    given and that tells them apart, else ``#1``, ``#2``, ...

    Examples:
        >>> run_labels([{"run_name": "mlm"}, {"run_name": "mlm"}, {"run_name": "drop"}])
        ['mlm #1', 'mlm #2', 'drop']
        >>> run_labels([{"run_name": "mlm"}] * 2, ["v/version_0/efficiency.json", "v/version_3/efficiency.json"])
        ['mlm (version_0)', 'mlm (version_3)']
    """
    names = [str(summary["run_name"]) for summary in summaries]
    counts = Counter(names)
    labels = list(names)
    if paths is not None:
        labels = [f"{n} ({Path(path).parent.name})" if counts[n] > 1 else n for n, path in zip(names, paths)]
    if len(set(labels)) < len(labels):
        seen: Counter[str] = Counter()
        labels = []
        for name in names:
            seen[name] += 1
            labels.append(f"{name} #{seen[name]}" if counts[name] > 1 else name)
    return labels


def format_number(value: float) -> str:
    """A number as the tables show it: thousands separators from 100 up, else four significant digits.

    Examples:
        >>> format_number(1234.5), format_number(26.684), format_number(7), format_number(0.812345)
        ('1,234', '26.68', '7', '0.8123')
    """
    if isinstance(value, int) or abs(value) >= 100:
        return f"{round(value):,}"
    return f"{value:.4g}"


def _percent(value: float) -> str:
    """``0.4 -> '40.0%'``, ``0.00031 -> '0.031%'`` (two significant digits below 1%)."""
    return f"{100 * value:.1f}%" if abs(value) >= 0.01 or value == 0 else f"{100 * value:.2g}%"


def _bytes(value: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def _numeric_row(name: str, values: list[float | None], show: Callable[[float], str] = format_number) -> Row:
    """A row whose cells carry the ratio to the first run where both values exist (blank: no value)."""
    base = values[0]
    ratios: list[float | None] = []
    cells: list[str] = []
    for value in values:
        ratio = value / base if value is not None and base not in (None, 0) else None
        ratios.append(ratio)
        if value is None:
            cells.append("")
        else:
            cells.append(show(value) if ratio is None else f"{show(value)} ({ratio:.2f}x)")
    return Row(name, list(values), cells, ratios)


def _text_row(name: str, values: list[str]) -> Row:
    return Row(name, list(values), list(values), [None] * len(values))


def _target_text(summary: dict[str, Any]) -> str:
    target = summary["target"]
    if target is None:
        return "none"
    return f"{summary['monitor']} {'<=' if summary['mode'] == 'min' else '>='} {format_number(target['value'])}"


def _reached(summary: dict[str, Any], key: str) -> float | None:
    target = summary["target"]
    return target[key] if target is not None and target["reached"] else None


def comparison_rows(summaries: Sequence[dict[str, Any]]) -> list[Row]:
    """The rows of the comparison table, in display order (see :func:`format_table`).

    Args:
        summaries: Summaries as returned by :func:`load_summary`; the first is the reference of the ratios.

    Returns:
        One :class:`Row` per line of the table.

    Examples:
        >>> s = {"device": "cpu", "precision": "32-true", "world_size": 1, "steps": 10, "tokens": 40960,
        ...      "wall_time_s": 12.0, "tokens_per_s": 3415.0, "samples_per_s": 26.68, "mfu": 0.45,
        ...      "peak_memory_bytes": 2**30, "memory_kind": "process_peak_rss", "monitor": "val/loss",
        ...      "mode": "min", "target": None, "final_metrics": {"val/loss": 2.5}}
        >>> rows = comparison_rows([s, {**s, "tokens_per_s": 4098.0}])
        >>> [(row.cells, row.ratios) for row in rows if row.name == "tokens/s"]
        [(['3,415 (1.00x)', '4,098 (1.20x)'], [1.0, 1.2])]
    """
    if not summaries:
        raise ConfigurationError("comparison_rows needs at least one summary")

    def column(key: str) -> list[Any]:
        return [summary[key] for summary in summaries]

    def device(summary: dict[str, Any]) -> str:
        world = f" x{summary['world_size']}" if summary["world_size"] != 1 else ""
        return f"{summary['device']}{world} / {summary['precision']}"

    not_reached = ["no target" if s["target"] is None else "not reached" for s in summaries]
    rows = [
        _text_row("device / precision", [device(s) for s in summaries]),
        _numeric_row("steps", column("steps")),
        _numeric_row("tokens", column("tokens")),
        _numeric_row("wall time (s)", column("wall_time_s")),
        _numeric_row("tokens/s", column("tokens_per_s")),
        _numeric_row("samples/s", column("samples_per_s")),
        _numeric_row("MFU", column("mfu"), _percent),
        _numeric_row("peak memory", column("peak_memory_bytes"), _bytes),
        _text_row("  measured as", [_MEMORY_KINDS.get(kind, kind) for kind in column("memory_kind")]),
        _text_row("target", [_target_text(s) for s in summaries]),
    ]
    for name, key in (("time to target (s)", "wall_time_s"), ("tokens to target", "tokens")):
        row = _numeric_row(name, [_reached(s, key) for s in summaries])
        cells = [cell or text for cell, text in zip(row.cells, not_reached)]
        rows.append(Row(row.name, row.values, cells, row.ratios))
    metric_names = sorted({name for summary in summaries for name in summary["final_metrics"]})
    for metric in metric_names:
        rows.append(_numeric_row(f"final {metric}", [s["final_metrics"].get(metric) for s in summaries]))
    return rows


def _footnote(summaries: Sequence[dict[str, Any]]) -> list[str]:
    directions = sorted({(s["monitor"], s["mode"]) for s in summaries})
    monitored = "; ".join(f"{name} ({'lower' if mode == 'min' else 'higher'} is better)" for name, mode in directions)
    return [
        "Ratios are this run / the first run. Higher is better for tokens/s, samples/s and MFU; lower is better",
        "for wall time, peak memory and time/tokens to target. Monitored metric: " + monitored + ".",
        "MFU is against each run's own peak FLOP/s (measured or given); peak memory as each run measured it.",
    ]


def format_table(summaries: Sequence[dict[str, Any]], labels: Sequence[str] | None = None) -> str:
    """A plain-text table with one column per run and the ratio to the first run in numeric cells.

    Rows: device / precision, steps, tokens, wall time, tokens/s, samples/s, MFU, peak memory,
    target, time and tokens to target (or "not reached"), then the final metrics (``final <name>``,
    the union of their names; blank where a run lacks one), and a footnote saying which direction is better.

    Args:
        summaries: Summaries as returned by :func:`load_summary`; the first is the reference.
        labels: Column labels; default :func:`run_labels`.

    Returns:
        The table, lines joined by newlines (no trailing newline).

    Examples:
        >>> s = {"run_name": "a", "device": "cpu", "precision": "32-true", "world_size": 1, "steps": 10,
        ...      "tokens": 40960, "wall_time_s": 12.0, "tokens_per_s": 3415.0, "samples_per_s": 26.68,
        ...      "mfu": 0.45, "peak_memory_bytes": 2**30, "memory_kind": "process_peak_rss",
        ...      "monitor": "val/loss", "mode": "min", "target": None, "final_metrics": {"val/loss": 2.5}}
        >>> print(format_table([s, {**s, "run_name": "b", "tokens_per_s": 4098.0}]).splitlines()[6])
        tokens/s                3,415 (1.00x)      4,098 (1.20x)
    """
    rows = comparison_rows(summaries)
    header = ["", *(labels if labels is not None else run_labels(summaries))]
    table = [header] + [[row.name, *row.cells] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = []
    for index, line in enumerate(table):
        first = line[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(line[1:], widths[1:]))
        lines.append("   ".join([first, *rest]).rstrip())
        if index == 0:
            lines.append("-" * len("   ".join(" " * w for w in widths)))
    return "\n".join([*lines, "", *_footnote(summaries)])


# -- the plot --------------------------------------------------------------------------------------
def plot(summaries: Sequence[dict[str, Any]], path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Draw the monitored metric against wall-clock seconds and against tokens, one line per run.

    Each run's ``history`` (one point per validation) is a line; the target a dashed horizontal
    line (grey when all runs share it, else one per run in the run's colour). Drawn on a bare
    ``Figure`` with an Agg canvas (no display, no global pyplot state); matplotlib is imported
    here only.

    Args:
        summaries: Summaries as returned by :func:`load_summary`.
        path: The PNG to write (its directory is created).
        labels: Legend labels; default :func:`run_labels`.

    Returns:
        ``path`` as a Path.

    Examples:
        >>> import tempfile
        >>> s = {"run_name": "a", "monitor": "val/loss", "mode": "min", "target": None,
        ...      "history": [{"step": 5, "wall_time_s": 3.0, "train_time_s": 2.5, "tokens": 800, "value": 4.2}]}
        >>> plot([s], Path(tempfile.mkdtemp()) / "compare.png").read_bytes()[:4]
        b'\\x89PNG'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: not needed to import the package
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    labels = list(labels) if labels is not None else run_labels(summaries)
    figure = Figure(figsize=_FIGURE_INCHES, dpi=_FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg whatever the session's default backend
    by_time, by_tokens = figure.subplots(1, 2)
    monitors = ", ".join(sorted({str(summary["monitor"]) for summary in summaries}))
    targets = []  # (value, colour, legend text)
    for index, (summary, label) in enumerate(zip(summaries, labels)):
        color, history = f"C{index % 10}", summary["history"]
        values = [point["value"] for point in history]
        by_time.plot([p["wall_time_s"] for p in history], values, marker="o", markersize=3, color=color, label=label)
        by_tokens.plot([p["tokens"] for p in history], values, marker="o", markersize=3, color=color, label=label)
        if summary["target"] is not None and math.isfinite(summary["target"]["value"]):
            targets.append((summary["target"]["value"], color, f"target of {label}"))
    if len({value for value, _, _ in targets}) == 1:  # one shared target: one grey line
        targets = [(targets[0][0], "0.4", "target")]
    for value, color, text in targets:
        by_time.axhline(value, color=color, linestyle="--", linewidth=1, label=f"{text}: {format_number(value)}")
        by_tokens.axhline(value, color=color, linestyle="--", linewidth=1)
    by_tokens.xaxis.set_major_formatter(EngFormatter())  # 200k, 1M
    for axes, xlabel in ((by_time, "wall-clock time (s)"), (by_tokens, "tokens")):
        axes.set_xlabel(xlabel)
        axes.set_ylabel(monitors)
        axes.grid(True, alpha=0.3)
    by_time.set_title(f"{monitors} vs wall-clock time")
    by_tokens.set_title(f"{monitors} vs tokens")
    by_time.legend(fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


# -- the command -----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-efficient compare",
        description="Compare the efficiency summaries (efficiency.json) of several runs: a side-by-side table\n"
        "with ratios to the first run, and a PNG of the monitored metric against wall-clock time and tokens.",
        epilog=f"To record a run's summary, {_HOW_TO_RECORD}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR",
        help=f"a directory holding {SUMMARY_FILE}, or a run root (e.g. runs/bert_small_mlm) under which the "
        "newest one is taken, or a pipeline directory (holding report.json: one column per stage); "
        "the first run is the reference of the ratios",
    )  # fmt: skip
    parser.add_argument("--output", default="compare.png", metavar="PNG", help="PNG to write (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON instead of the table")
    return parser


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-efficient compare`` (dispatched from :func:`lightning_efficient.cli.main`).

    Prints the table (or JSON with ``--json``) and writes the PNG. Errors (no summary, a malformed
    one) exit with status 2 and a message on stderr, as argparse does.

    Args:
        args: The arguments after ``compare`` (default: ``sys.argv[1:]``).

    Examples:
        >>> import tempfile
        >>> main([tempfile.mkdtemp()])  # an empty run directory: "no efficiency.json in ..." on stderr
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """
    parser = _parser()
    options = parser.parse_args(args)
    try:
        runs = [run for run_dir in options.run_dirs for run in load_runs(run_dir)]
    except ConfigurationError as error:
        parser.error(str(error))
    summaries = [summary for _, _, summary in runs]
    paths = [path for _, path, _ in runs]
    names = [{"run_name": summary["run_name"] if label is None else label} for label, _, summary in runs]
    labels = run_labels(names, paths)
    png = plot(summaries, options.output, labels)
    if options.json:
        rows = comparison_rows(summaries)
        runs = [{"label": label, "summary": str(path)} for label, path in zip(labels, paths)]
        rows_json = [{"row": row.name, "values": row.values, "ratios": row.ratios} for row in rows]
        print(json.dumps({"runs": runs, "rows": rows_json, "plot": str(png)}, indent=2))
        return
    for label, path in zip(labels, paths):
        print(f"{label}: {path}")
    print()
    print(format_table(summaries, labels))
    print(f"\nplot: {png}")


if __name__ == "__main__":
    main()
