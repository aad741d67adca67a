"""``lightning-efficient compare``: summaries found, checked, tabulated with ratios, and plotted."""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from lightning_efficient.cli import main as cli_main
from lightning_efficient.compare import (
    comparison_rows,
    find_summary,
    format_table,
    load_summary,
    plot,
    run_labels,
)
from lightning_efficient.errors import ConfigurationError


def summary(**overrides: Any) -> dict[str, Any]:
    """A version-1 efficiency summary with known numbers (run "base")."""
    base = {
        "version": 1, "run_name": "base", "device": "cpu", "precision": "32-true", "world_size": 1,
        "steps": 200, "samples": 6400, "tokens": 819200, "wall_time_s": 300.0, "train_time_s": 240.0,
        "samples_per_s": 26.68, "tokens_per_s": 3415.0, "flops_per_step": 2.0e11, "total_flops": 4.0e13,
        "achieved_flops_per_s": 1.0e11, "peak_flops_per_s": 2.5e11, "peak_flops_source": "measured", "mfu": 0.4,
        "peak_memory_bytes": 2 * 2**30, "memory_kind": "process_peak_rss", "monitor": "val/loss", "mode": "min",
        "target": {
            "value": 5.0, "reached": True, "step": 100, "wall_time_s": 160.0, "train_time_s": 120.0, "tokens": 409600
        },
        "final_metrics": {"val/loss": 4.0, "val/perplexity": 54.6},
        "history": [
            {"step": 50, "wall_time_s": 80.0, "train_time_s": 60.0, "tokens": 204800, "value": 6.0},
            {"step": 100, "wall_time_s": 160.0, "train_time_s": 120.0, "tokens": 409600, "value": 5.0},
            {"step": 200, "wall_time_s": 300.0, "train_time_s": 240.0, "tokens": 819200, "value": 4.0},
        ],
    }  # fmt: skip
    return {**base, **overrides}


FAST = summary(
    run_name="layer_drop",
    steps=300,
    tokens_per_s=4098.0,
    samples_per_s=32.0,
    mfu=0.3,
    peak_memory_bytes=3 * 2**29,
    target={"value": 5.0, "reached": True, "step": 150, "wall_time_s": 120.0, "train_time_s": 90.0, "tokens": 327680},
    final_metrics={"val/loss": 4.2},  # no val/perplexity: blank cell
)
NEVER = summary(
    run_name="never",
    target={"value": 5.0, "reached": False, "step": None, "wall_time_s": None, "train_time_s": None, "tokens": None},
    final_metrics={"val/loss": 5.5, "val/accuracy": 0.25},
)  # fmt: skip


def write(directory: Path, content: dict[str, Any] | str, mtime: float | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "efficiency.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def table_cells(table: str, row: str) -> list[str]:
    """The cells of one table row (columns are separated by >= 3 spaces, label left-aligned)."""
    line = next(line for line in table.splitlines() if line.startswith(row + "  ") or line == row)
    return re.split(r"\s{3,}", line[len(row) :].strip())


def test_table_shows_values_and_ratios_to_the_first_run():
    summaries = [summary(), FAST, NEVER]
    table = format_table(summaries)
    assert table.splitlines()[0].split() == ["base", "layer_drop", "never"]
    # Ratios worked out by hand: 300/200, 4098/3415 = 1.2, 32/26.68 = 1.1994, 0.3/0.4, 1.5 GiB / 2 GiB,
    # time to target 120/160 s, tokens to target 327680/409600, final loss 4.2/4.0 and 5.5/4.0.
    assert table_cells(table, "device / precision") == ["cpu / 32-true"] * 3
    assert table_cells(table, "steps") == ["200 (1.00x)", "300 (1.50x)", "200 (1.00x)"]
    assert table_cells(table, "tokens") == ["819,200 (1.00x)"] * 3
    assert table_cells(table, "tokens/s") == ["3,415 (1.00x)", "4,098 (1.20x)", "3,415 (1.00x)"]
    assert table_cells(table, "samples/s") == ["26.68 (1.00x)", "32 (1.20x)", "26.68 (1.00x)"]
    assert table_cells(table, "MFU") == ["40.0% (1.00x)", "30.0% (0.75x)", "40.0% (1.00x)"]
    assert table_cells(table, "peak memory") == ["2.00 GiB (1.00x)", "1.50 GiB (0.75x)", "2.00 GiB (1.00x)"]
    assert table_cells(table, "target") == ["val/loss <= 5"] * 3
    assert table_cells(table, "time to target (s)") == ["160 (1.00x)", "120 (0.75x)", "not reached"]
    assert table_cells(table, "tokens to target") == ["409,600 (1.00x)", "327,680 (0.80x)", "not reached"]
    assert table_cells(table, "final val/loss") == ["4 (1.00x)", "4.2 (1.05x)", "5.5 (1.38x)"]
    # Union of the final metrics, blank where missing: the cell sits under its own column.
    lines = table.splitlines()
    header, accuracy = lines[0], next(line for line in lines if line.startswith("final val/accuracy"))
    assert accuracy.endswith("0.25") and len(accuracy) == len(header)  # last column only (right-aligned)
    perplexity = next(line for line in lines if line.startswith("final val/perplexity"))
    assert perplexity.rstrip().endswith("54.6 (1.00x)") and len(perplexity) == header.index("base") + len("base")
    assert "lower is better" in table and "val/loss (lower is better)" in table

    rows = {row.name: row for row in comparison_rows(summaries)}
    assert rows["tokens/s"].ratios == [1.0, 4098.0 / 3415.0, 1.0]
    assert rows["time to target (s)"].values == [160.0, 120.0, None]
    assert rows["time to target (s)"].ratios == [1.0, 120.0 / 160.0, None]
    assert rows["final val/accuracy"].ratios == [None, None, None]  # the first run lacks it: no reference


def test_no_target_and_world_size_and_mode_max():
    plain = summary(
        target=None, world_size=4, device="cuda", precision="bf16-mixed", mode="max", monitor="val/accuracy"
    )
    table = format_table([plain])
    assert table_cells(table, "device / precision") == ["cuda x4 / bf16-mixed"]
    assert table_cells(table, "target") == ["none"]
    assert table_cells(table, "time to target (s)") == ["no target"]
    assert "val/accuracy (higher is better)" in table


def test_equal_run_names_are_disambiguated(tmp_path):
    summaries = [summary(), summary(), summary(run_name="other")]
    assert run_labels(summaries) == ["base #1", "base #2", "other"]
    paths = [tmp_path / "version_0" / "efficiency.json", tmp_path / "version_3" / "efficiency.json", tmp_path / "x"]
    assert run_labels(summaries, paths) == ["base (version_0)", "base (version_3)", "other"]
    same_parent = [tmp_path / "a" / "v" / "efficiency.json", tmp_path / "b" / "v" / "efficiency.json", tmp_path / "x"]
    assert run_labels(summaries, same_parent) == ["base #1", "base #2", "other"]
    assert format_table(summaries).splitlines()[0].split() == ["base", "#1", "base", "#2", "other"]


def test_find_summary_picks_the_newest_below_a_run_root(tmp_path):
    root = tmp_path / "runs" / "bert_small_mlm"
    newest = write(root / "tensorboard" / "version_0", summary(steps=2), mtime=2_000_000_000)
    write(root / "tensorboard" / "version_3", summary(steps=1), mtime=1_000_000_000)  # higher version, older file
    assert find_summary(root) == newest
    assert load_summary(find_summary(root))["steps"] == 2
    direct = write(root / "direct", summary())
    assert find_summary(root / "direct") == direct  # a directory holding the file
    assert find_summary(direct) == direct  # or the file itself


def test_missing_summary_names_the_directory_and_the_fix(tmp_path):
    empty = tmp_path / "runs" / "empty"
    (empty / "tensorboard" / "version_0").mkdir(parents=True)
    expected = r"no efficiency\.json in .*runs/empty.*, add lightning_efficient\.monitor\.EfficiencyMonitor to trainer"
    with pytest.raises(ConfigurationError, match=expected):
        find_summary(empty)
    with pytest.raises(ConfigurationError, match=r"run directory .*nowhere.* does not exist"):
        find_summary(tmp_path / "nowhere")


def test_load_summary_rejects_other_versions_and_malformed_files(tmp_path):
    with pytest.raises(ConfigurationError, match=r"schema version 3; .* reads versions 1 and 2"):
        load_summary(write(tmp_path / "v3", summary(version=3)))
    with pytest.raises(ConfigurationError, match=r"noversion.* lacks required keys: device, precision"):
        load_summary(write(tmp_path / "noversion", {"run_name": "x"}))  # read as version 1: incomplete
    unversioned = {key: value for key, value in summary().items() if key != "version"}
    assert load_summary(write(tmp_path / "unversioned", unversioned)) == summary()  # version 1 assumed
    incomplete = summary()
    del incomplete["mfu"], incomplete["target"]["tokens"], incomplete["history"][1]["value"]
    with pytest.raises(ConfigurationError, match=r"lacks required keys: mfu, target\.tokens, history\[1\]\.value"):
        load_summary(write(tmp_path / "incomplete", incomplete))
    with pytest.raises(ConfigurationError, match=r"cannot read efficiency summary .*broken"):
        load_summary(write(tmp_path / "broken", "{not json"))
    with pytest.raises(ConfigurationError, match=r"not a JSON object"):
        load_summary(write(tmp_path / "list", "[1, 2]"))
    assert load_summary(write(tmp_path / "good", summary())) == summary()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_of_the_expected_size(tmp_path):
    empty_history = summary(run_name="fresh", history=[], target=None)
    path = plot([summary(), FAST, empty_history], tmp_path / "out" / "compare.png")
    assert path == tmp_path / "out" / "compare.png" and path.stat().st_size > 10_000
    assert png_size(path) == (1100, 420)  # figsize 11 x 4.2 inches at 100 dpi


def test_console_entry_point(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-efficient"])  # as the console script sees it
    write(tmp_path / "runs" / "base" / "tensorboard" / "version_0", summary())
    write(tmp_path / "runs" / "drop", FAST)
    cli_main(["compare", "runs/base", "runs/drop"])
    out = capsys.readouterr().out
    assert "runs/base/tensorboard/version_0/efficiency.json" in out
    assert table_cells(out, "tokens/s") == ["3,415 (1.00x)", "4,098 (1.20x)"]
    assert png_size(tmp_path / "compare.png") == (1100, 420)  # default: compare.png in the working directory

    cli_main(["compare", "runs/base", "runs/drop", "--json", "--output", "plots/cmp.png"])
    result = json.loads(capsys.readouterr().out)
    assert [run["label"] for run in result["runs"]] == ["base", "layer_drop"]
    rows = {row["row"]: row for row in result["rows"]}
    assert rows["steps"] == {"row": "steps", "values": [200, 300], "ratios": [1.0, 1.5]}
    assert result["plot"] == "plots/cmp.png" and png_size(tmp_path / "plots" / "cmp.png") == (1100, 420)

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["compare", "runs/base", "runs/missing"])
    assert exit_info.value.code == 2
    assert "run directory 'runs/missing' does not exist" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])  # LightningCLI's own help mentions compare
    assert exit_info.value.code == 0
    assert "lightning-efficient compare RUN_DIR RUN_DIR" in " ".join(capsys.readouterr().out.split())


def write_pipeline(directory: Path, records: list[dict[str, Any]]) -> Path:
    """A pipeline directory holding report.json with these stage records (no PNGs: nothing measured)."""
    from lightning_efficient.pipeline.report import build_report, write_report

    return write_report(directory, build_report(directory.name, records, "val/loss", mode="min"))["json"]


def stage(name: str, efficiency: dict[str, Any] | None) -> dict[str, Any]:
    return {"name": name, "stage": name.split("/")[0], "kind": "fit", "from": None, "efficiency": efficiency}


def test_compare_reads_every_summarised_stage_of_a_pipeline(tmp_path, monkeypatch, capsys):
    from lightning_efficient import compare
    from lightning_efficient.pipeline.report import REPORT_FILE

    assert compare._PIPELINE_REPORT == REPORT_FILE  # compare knows the name without importing the pipeline
    monkeypatch.chdir(tmp_path)
    records = [
        stage("pretrain/preset=small", summary(run_name="pretrain")),
        stage("finetune/preset=small", FAST),
        stage("int8", None),  # measured only: no summary, no column
    ]
    report = write_pipeline(tmp_path / "runs" / "tiny", records)
    write(tmp_path / "runs" / "base", summary())
    runs = compare.load_runs("runs/tiny")
    assert [(label, path) for label, path, _ in runs] == [
        ("pretrain/preset=small", Path("runs/tiny/report.json")),
        ("finetune/preset=small", Path("runs/tiny/report.json")),
    ]
    assert [s["steps"] for _, _, s in runs] == [200, 300]
    assert [label for label, _, _ in compare.load_runs(report)] == [label for label, _, _ in runs]  # the file itself
    assert compare.load_runs("runs/base")[0][0] is None  # a plain run: unchanged

    cli_main(["compare", "runs/tiny", "runs/base"])
    out = capsys.readouterr().out
    assert "pretrain/preset=small: runs/tiny/report.json" in out and "runs/base/efficiency.json" in out
    assert out.split("\n\n")[1].splitlines()[0].split() == ["pretrain/preset=small", "finetune/preset=small", "base"]
    assert table_cells(out, "steps") == ["200 (1.00x)", "300 (1.50x)", "200 (1.00x)"]
    assert png_size(tmp_path / "compare.png") == (1100, 420)

    write_pipeline(tmp_path / "runs" / "other", records[:1])  # two pipelines sharing a stage name
    cli_main(["compare", "runs/tiny", "runs/other", "--json"])
    labels = [run["label"] for run in json.loads(capsys.readouterr().out)["runs"]]
    assert labels == ["pretrain/preset=small (tiny)", "finetune/preset=small", "pretrain/preset=small (other)"]


def test_compare_on_a_pipeline_without_summaries_or_with_a_broken_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_pipeline(tmp_path / "runs" / "fresh", [stage("int8", None)])
    broken = summary()
    del broken["mfu"]
    write_pipeline(tmp_path / "runs" / "broken", [stage("pretrain", broken)])
    (tmp_path / "runs" / "future").mkdir()
    (tmp_path / "runs" / "future" / "report.json").write_text(json.dumps({"version": 2}))
    expected = {
        "fresh": "pipeline report 'runs/fresh/report.json' has no stage with an efficiency summary yet",
        "broken": "efficiency summary 'runs/broken/report.json (stage pretrain)' lacks required keys: mfu",
        "future": "pipeline report 'runs/future/report.json' has schema version 2",
    }
    for name, message in expected.items():
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["compare", f"runs/{name}"])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
