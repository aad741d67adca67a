"""The pipeline's report: Pareto fronts, report.json / report.md / PNGs, the closing text, and its errors."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import pytest

from lightning_efficient.errors import ConfigurationError, DataError
from lightning_efficient.pipeline.report import (
    AXES,
    build_report,
    format_front,
    metric_value,
    pareto_front,
    read_report,
    write_report,
)

METRIC = "val/accuracy"


def reference_front(points: list[tuple[str, Any, Any]], mode: str) -> list[str]:
    """The definition, by brute force: every point that no other point dominates, ordered by cost."""
    kept = [p for p in points if p[1] is not None and p[2] is not None]

    def at_least_as_good(a: float, b: float) -> bool:
        return a >= b if mode == "max" else a <= b

    def dominates(p: tuple[str, Any, Any], q: tuple[str, Any, Any]) -> bool:
        return p[1] <= q[1] and at_least_as_good(p[2], q[2]) and (p[1] < q[1] or p[2] != q[2])

    front = [q for q in kept if not any(dominates(p, q) for p in kept)]
    return [name for name, _, _ in sorted(front, key=lambda p: p[1])]  # stable: equal costs in the given order


@pytest.mark.parametrize("mode", ["max", "min"])
def test_pareto_front_matches_the_brute_force_definition(mode):
    rng = random.Random(22)
    for trial in range(300):
        size = rng.randint(0, 12)
        # Few distinct values: many ties of cost, of metric, and identical points.
        points = [
            (
                f"p{i}",
                None if rng.random() < 0.1 else rng.choice([rng.randint(0, 5), rng.randint(0, 5) + 0.5]),
                None if rng.random() < 0.1 else rng.randint(0, 5) / 4,
            )
            for i in range(size)
        ]
        assert pareto_front(points, mode) == reference_front(points, mode), (trial, points)


def test_pareto_front_leaves_out_missing_values_and_keeps_identical_points():
    points = [("a", 10, 0.8), ("b", 10, 0.8), ("c", None, 0.99), ("d", 5, None), ("e", 20, 0.8), ("f", 30, 0.9)]
    assert pareto_front(points) == ["a", "b", "f"]  # e costs more for the same metric; c, d unmeasured
    assert pareto_front(points, mode="min") == ["a", "b"]
    assert pareto_front([("x", 1.0, float("nan")), ("y", 2, 0.5)]) == ["y"]  # not a number: left out
    assert pareto_front([]) == []


# -- hand-made stage records -----------------------------------------------------------------------
def efficiency(final: float, history: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "steps": 40, "total_flops": 4.0e13, "wall_time_s": 30.0, "monitor": METRIC, "mode": "max",
        "final_metrics": {METRIC: final, "val/loss": 1.0 - final}, "history": history or [], **extra,
    }  # fmt: skip


def measures(params: int, disk: int, latency: float, value: float, exported: list[str]) -> dict[str, Any]:
    return {
        "model_class": "BertClassifier", "exported": exported, "params": params, "nonzero_params": params // 2,
        "disk_bytes": disk, "latency_ms": {"1": latency, "32": latency * 12}, "latency_threads": 2,
        "metrics": {METRIC: value, "val/loss": 1.0 - value},
    }  # fmt: skip


def record(name: str, stage: str, source: str | None, **fields: Any) -> dict[str, Any]:
    return {
        "name": name, "stage": stage, "kind": "fit", "branch": {}, "from": source, "status": "finished",
        "config": f"runs/tiny/{name}/stage.yaml", "config_hash": "0" * 64, "command": "lightning-efficient fit",
        "checkpoint": None, "source_checkpoint": None, "wall_time_s": 12.5, "efficiency": None, "measures": None,
        **fields,
    }  # fmt: skip


HISTORY = [
    {"step": 10, "wall_time_s": 5.0, "train_time_s": 4.0, "tokens": 1000, "value": 0.4, "flops": 1e12},
    {"step": 20, "wall_time_s": 9.0, "train_time_s": 8.0, "tokens": 2000, "value": 0.5, "flops": None},
    {"step": 30, "wall_time_s": 13.0, "train_time_s": 12.0, "tokens": 3000, "value": 0.55},  # no flops key
]
RECORDS = [
    record("data", "data", None, kind="predict"),  # no efficiency, no measures: a stage before any training
    record("pretrain/preset=tiny", "pretrain", None, efficiency=efficiency(0.5, HISTORY)),
    record("pretrain/preset=small", "pretrain", None, efficiency=efficiency(0.6, HISTORY[:2])),
    record(
        "finetune/preset=tiny", "finetune", "pretrain/preset=tiny",
        efficiency=efficiency(0.81, HISTORY), measures=measures(250, 1_000_000, 1.0, 0.80, []),
    ),
    record(
        "finetune/preset=small", "finetune", "pretrain/preset=small",
        efficiency=efficiency(0.86, HISTORY), measures=measures(1000, 4_000_000, 2.0, 0.85, []),
    ),
    record("prune", "prune", "finetune/preset=small", measures=measures(1000, 2_200_000, 2.5, 0.84, ["pruned"])),
    record("int8", "quantize", "prune", kind="export", measures=measures(1000, 1_100_000, 1.5, 0.83, ["int8"])),
]  # fmt: skip
NAMES = [r["name"] for r in RECORDS]


def test_build_report_fronts_metric_fallback_and_default_curves():
    report = build_report("tiny", RECORDS, METRIC)
    assert report["version"] == 1 and report["pipeline"] == "tiny"
    assert report["metric"] == {"name": METRIC, "mode": "max"}
    assert [r["name"] for r in report["stages"]] == NAMES and report["stages"][3] == RECORDS[3]
    # Worked out by hand (metric of the exported model; costs params / latency b1 / disk):
    # finetune/tiny 250 / 1.0 / 1.0 MB -> 0.80; finetune/small 1000 / 2.0 / 4.0 MB -> 0.85;
    # prune 1000 / 2.5 / 2.2 MB -> 0.84; int8 1000 / 1.5 / 1.1 MB -> 0.83.
    assert report["pareto"] == {
        "params": ["finetune/preset=tiny", "finetune/preset=small"],
        "latency_ms": ["finetune/preset=tiny", "int8", "finetune/preset=small"],
        "disk_bytes": ["finetune/preset=tiny", "int8", "prune", "finetune/preset=small"],
    }
    # The first stage with a history is pretrain (data has none): both its branches, not the finetunes.
    assert report["curves"] == ["pretrain/preset=tiny", "pretrain/preset=small"]
    assert build_report("tiny", RECORDS, METRIC, curves=["finetune/preset=tiny"])["curves"] == ["finetune/preset=tiny"]
    assert build_report("tiny", RECORDS[:1] + RECORDS[5:], METRIC)["curves"] == []  # nobody has a history

    # The metric: the exported model's where measured, else the run's final value; the measured one wins.
    assert metric_value(RECORDS[1], METRIC) == 0.5 and metric_value(RECORDS[4], METRIC) == 0.85
    assert metric_value(RECORDS[0], METRIC) is None
    # Only measured records have costs: pretrain, with its fallback metric 0.5, joins no front.
    assert all("pretrain/preset=tiny" not in names for names in report["pareto"].values())

    lower = build_report("tiny", RECORDS, "val/loss", mode="min")  # loss = 1 - accuracy: the same fronts
    assert lower["pareto"] == report["pareto"] and lower["metric"] == {"name": "val/loss", "mode": "min"}
    unmeasured_metric = build_report("tiny", RECORDS, "val/f1")
    assert unmeasured_metric["pareto"] == {axis: [] for axis in AXES}


def test_build_report_rejects_bad_arguments_in_one_line():
    cases = [
        (lambda: build_report("tiny", RECORDS, METRIC, mode="maximum"), r"^mode='maximum' is unknown; .*'max', 'min'"),
        (lambda: pareto_front([("a", 1, 1)], mode="best"), r"^mode='best' is unknown"),
        (lambda: build_report("tiny", RECORDS, METRIC, curves=["nope"]), r"curves=\['nope'\] are not stage records"),
        (lambda: build_report("tiny", [RECORDS[1], RECORDS[1]], METRIC), r"'pretrain/preset=tiny' appears twice"),
        (lambda: build_report("tiny", [{"stage": "x"}], METRIC), r"stage record 0 has no name"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigurationError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


# -- files -----------------------------------------------------------------------------------------
def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def markdown_section(text: str, title: str) -> list[list[str]]:
    """The rows (cells) of the table under ``## title``, header and rule excluded."""
    lines = text.splitlines()
    start = lines.index(f"## {title}") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows[2:]


def test_write_report_writes_four_files_that_read_back(tmp_path):
    report = build_report("tiny", RECORDS, METRIC)
    paths = write_report(tmp_path / "runs" / "tiny", report)
    directory = tmp_path / "runs" / "tiny"
    assert paths == {
        "json": directory / "report.json",
        "markdown": directory / "report.md",
        "curves": directory / "report_curves.png",
        "pareto": directory / "report_pareto.png",
    }
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in paths.values())  # no temporary
    assert read_report(directory) == report == read_report(directory / "report.json")
    assert png_size(paths["curves"]) == (1100, 420) and png_size(paths["pareto"]) == (1500, 440)

    text = paths["markdown"].read_text()
    assert text.startswith("# Pipeline `tiny`")
    stages = markdown_section(text, "Stages")
    assert [row[0] for row in stages] == NAMES
    small = stages[NAMES.index("finetune/preset=small")]
    # name, kind, from, metric, params, nonzero, disk MB, latency b1, b32, total FLOPs, steps, wall-clock s, status
    assert small == [
        "finetune/preset=small", "fit", "pretrain/preset=small", "0.85", "1,000", "500", "4", "2", "24",
        "4e+13", "40", "12.5", "finished",
    ]  # fmt: skip
    assert stages[NAMES.index("pretrain/preset=tiny")][3] == "0.5"  # the fallback metric
    for axis, title in AXES.items():
        front = markdown_section(text, f"Pareto front: {METRIC} against {title}")
        assert [row[0] for row in front] == report["pareto"][axis]
    disk_front = markdown_section(text, f"Pareto front: {METRIC} against {AXES['disk_bytes']}")
    assert disk_front[1] == ["int8", "0.83", "1.1"]  # MB
    assert "(report_curves.png)" in text and "(report_pareto.png)" in text


def test_nothing_to_plot_writes_no_png_and_removes_stale_ones(tmp_path):
    write_report(tmp_path, build_report("tiny", RECORDS, METRIC))
    bare = build_report("tiny", [RECORDS[0]], METRIC)  # no history, nothing measured
    paths = write_report(tmp_path, bare)
    assert sorted(paths) == ["json", "markdown"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
    text = (tmp_path / "report.md").read_text()
    assert ".png" not in text and "No stage has both a measured cost and the metric yet." in text
    # A curve record whose points carry no FLOP counts still draws (the FLOPs panel says so).
    no_flops = [{**point, "flops": None} for point in HISTORY]
    paths = write_report(
        tmp_path, build_report("tiny", [record("p", "p", None, efficiency=efficiency(0.5, no_flops))], METRIC)
    )
    assert sorted(paths) == ["curves", "json", "markdown"] and png_size(paths["curves"]) == (1100, 420)


def test_format_front_names_the_front_and_the_report(tmp_path):
    report = build_report("tiny", RECORDS, METRIC)
    text = format_front(report, tmp_path)
    lines = text.splitlines()
    assert len(lines) <= 15
    assert lines[0] == "Pipeline 'tiny': Pareto front of val/accuracy (higher is better) against parameters"
    assert lines[1].split() == ["stage", METRIC, "params", "latency", "b1", "ms", "disk", "MB"]
    assert lines[2].split() == ["finetune/preset=tiny", "0.8", "250", "1", "1"]
    assert lines[3].split() == ["finetune/preset=small", "0.85", "1,000", "2", "4"]
    assert lines[-1] == f"report: {tmp_path / 'report.md'}"
    assert "no stage has both" in format_front(build_report("tiny", RECORDS[:3], METRIC))


def test_read_report_errors_name_the_file_in_one_line(tmp_path):
    good = build_report("tiny", RECORDS[:2], METRIC)
    cases = {
        "missing": (None, r"cannot read pipeline report '.*missing/report\.json': No such file or directory"),
        "v2": ({**good, "version": 2}, r"'.*v2/report\.json' has schema version 2; .* reads version 1 only \(.*newer"),
        "noversion": ({k: v for k, v in good.items() if k != "version"}, r"has schema version None"),
        "broken": ("{not json", r"cannot read pipeline report '.*broken/report\.json': Expecting property name"),
        "list": ([1, 2], r"is not a JSON object"),
        "nokeys": ({"version": 1, "pipeline": "x"}, r"lacks required keys: metric, stages, pareto, curves"),
        "badmode": ({**good, "metric": {"name": METRIC, "mode": "up"}}, r"'metric' must be"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name / "report.json"
        if content is not None:
            path.parent.mkdir()
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(DataError, match=message) as error:
            read_report(path.parent)
        assert "\n" not in str(error.value), name
    with pytest.raises(DataError, match="lacks required keys"):
        write_report(tmp_path / "out", {"version": 1})  # what is written must read back
