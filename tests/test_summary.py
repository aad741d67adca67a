"""The ``efficiency.json`` schema: round trip, files of the previous release, clear errors for bad files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import lightning_efficient.summary as summary_module
from lightning_efficient.compare import format_table, load_summary
from lightning_efficient.errors import ConfigurationError, DataError
from lightning_efficient.summary import (
    HISTORY_KEYS,
    SCHEMA_VERSION,
    SUMMARY_FILE,
    SUMMARY_KEYS,
    format_summary,
    read_summary,
    write_summary,
)

# What the release before summary.py wrote (EfficiencyMonitor._summary at that commit, json.dumps(indent=1)):
# a target that was reached, two validations. Kept literal: this file must keep reading.
PREVIOUS_RELEASE = """{
 "version": 1,
 "run_name": "bert_tiny_mlm",
 "device": "cpu: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz",
 "precision": "32-true",
 "world_size": 1,
 "steps": 4,
 "samples": 8,
 "tokens": 41,
 "wall_time_s": 3.25,
 "train_time_s": 2.5,
 "samples_per_s": 3.2,
 "tokens_per_s": 16.4,
 "flops_per_step": 120000000.0,
 "total_flops": 480000000.0,
 "achieved_flops_per_s": 192000000.0,
 "peak_flops_per_s": 200000000000.0,
 "peak_flops_source": "given",
 "mfu": 0.00096,
 "peak_memory_bytes": 612345856,
 "memory_kind": "process_peak_rss",
 "monitor": "val/loss",
 "mode": "min",
 "target": {
  "value": 3.0,
  "reached": true,
  "step": 4,
  "wall_time_s": 3.1,
  "train_time_s": 2.5,
  "tokens": 41
 },
 "final_metrics": {
  "val/loss": 2.0,
  "efficiency/flops_per_step": 120000000.0
 },
 "history": [
  {
   "step": 2,
   "wall_time_s": 1.6,
   "train_time_s": 1.25,
   "tokens": 20,
   "value": 4.0
  },
  {
   "step": 4,
   "wall_time_s": 3.1,
   "train_time_s": 2.5,
   "tokens": 41,
   "value": 2.0
  }
 ]
}"""


def previous() -> dict[str, Any]:
    return json.loads(PREVIOUS_RELEASE)


def test_round_trip_into_a_directory_and_to_a_named_file(tmp_path: Path) -> None:
    run = {**previous(), "run_name": "round_trip", "target": None, "history": []}
    path = write_summary(tmp_path, run)
    assert path == tmp_path / SUMMARY_FILE == tmp_path / "efficiency.json"
    assert read_summary(path) == run
    assert path.read_text(encoding="utf-8") == json.dumps(run, indent=1)  # the bytes the monitor always wrote
    named = write_summary(tmp_path / "sub" / "eff.json", {**run, "steps": 5})  # parents created, file replaced
    write_summary(named, {**run, "steps": 6})
    assert read_summary(named)["steps"] == 6
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["eff.json", "efficiency.json", "sub"]  # no temporaries


def test_a_file_of_the_previous_release_reads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "efficiency.json"
    path.write_text(PREVIOUS_RELEASE, encoding="utf-8")
    assert set(previous()) == set(SUMMARY_KEYS)  # the schema has exactly the keys the previous release wrote
    summary = read_summary(path)
    assert summary == previous() and summary["version"] == 1 < SCHEMA_VERSION  # nothing filled in
    assert all("flops" not in point for point in summary["history"])
    assert load_summary(path) == summary  # compare reads through the same function
    assert "tokens/s" in format_table([summary, summary])


def test_a_file_without_version_reads_as_version_1(tmp_path: Path) -> None:
    unversioned = {key: value for key, value in previous().items() if key != "version"}
    path = tmp_path / "efficiency.json"
    path.write_text(json.dumps(unversioned), encoding="utf-8")
    assert read_summary(path) == {"version": 1, **unversioned}


def test_a_newer_schema_version_fails_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "future" / "efficiency.json"
    path.parent.mkdir()
    path.write_text(json.dumps({**previous(), "version": SCHEMA_VERSION + 1, "new_key": 1}), encoding="utf-8")
    expected = (
        rf"'{re.escape(str(path))}' has schema version 3; .* reads versions 1 and 2 .*upgrade lightning-efficient"
    )
    with pytest.raises(DataError, match=expected):
        read_summary(path)
    for version in (0, "1", True):
        path.write_text(json.dumps({**previous(), "version": version}), encoding="utf-8")
        with pytest.raises(DataError, match=rf"schema version {re.escape(repr(version))};"):
            read_summary(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (PREVIOUS_RELEASE[: len(PREVIOUS_RELEASE) // 2], r"cannot read efficiency summary '{path}': .*line"),
        ("step,loss\n1,2.0\n", r"cannot read efficiency summary '{path}'"),
        (b"\xff\xfe\x00garbage", r"cannot read efficiency summary '{path}'"),
        ("[1, 2]", r"efficiency summary '{path}' is not a JSON object"),
        ('{"loss": [1, 2]}', r"'{path}' is not an efficiency summary"),
        ('{"version": 1, "run_name": "x"}', r"'{path}' lacks required keys: device, precision, .* and 15 more"),
    ],
    ids=["truncated", "csv", "binary", "list", "other-json", "incomplete"],
)
def test_a_file_that_is_not_a_summary_fails_naming_it(tmp_path: Path, content: str | bytes, message: str) -> None:
    path = tmp_path / "efficiency.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigurationError, match=message.format(path=re.escape(str(path)))):
        read_summary(path)


def test_missing_file_and_malformed_parts_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot read efficiency summary '.*nowhere\.json'"):
        read_summary(tmp_path / "nowhere.json")
    path = tmp_path / "efficiency.json"
    for part, message in (
        ({"target": 3.0}, "'target' must be null or an object"),
        ({"history": {"step": 1}}, "'history' a list"),
        ({"history": [1]}, r"history\[0\] must be an object"),
    ):
        path.write_text(json.dumps({**previous(), **part}), encoding="utf-8")
        with pytest.raises(DataError, match=message):
            read_summary(path)


def test_write_refuses_what_read_would_refuse_and_writes_nothing(tmp_path: Path) -> None:
    incomplete = previous()
    del incomplete["mfu"]
    with pytest.raises(DataError, match=r"lacks required keys: mfu \(schema version 1\)"):
        write_summary(tmp_path, incomplete)
    with pytest.raises(DataError, match="schema version 3"):
        write_summary(tmp_path, {**previous(), "version": SCHEMA_VERSION + 1})
    assert list(tmp_path.iterdir()) == []


def test_format_summary_lines_of_a_reached_and_a_missed_target() -> None:
    summary = previous()
    assert format_summary(summary, "runs/x/efficiency.json").splitlines() == [
        (
            "EfficiencyMonitor summary of 'bert_tiny_mlm' (cpu: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz, 32-true)"
            " -> runs/x/efficiency.json"
        ),
        "  steps 4   samples 8   tokens 41",
        "  wall 3.2 s   training 2.5 s   16.4 tokens/s   3.20 samples/s",
        "  1.2e+08 FLOPs/step   achieved 1.92e+08 FLOP/s   peak 2e+11 (given)   MFU 0.1%",
        "  peak memory 0.61 GB (process_peak_rss)",
        "  target val/loss <= 3: reached at step 4 after 3.1 s wall, 2.5 s training, 41 tokens",
    ]
    missed = {**summary, "mode": "max", "target": {**summary["target"], "reached": False}}
    assert format_summary(missed, "p").splitlines()[-1] == "  target val/loss >= 3: not reached"


def test_the_docstring_tables_list_every_key() -> None:
    rows = re.findall(r"^\| ``(\w+)`` \|", summary_module.__doc__, flags=re.MULTILINE)
    assert rows == list(SUMMARY_KEYS) + list(HISTORY_KEYS)  # the summary's table, then a history point's


def test_version_2_history_points_carry_flops(tmp_path: Path) -> None:
    assert SCHEMA_VERSION == 2 and HISTORY_KEYS[-1] == "flops"
    current = previous()
    current["version"] = SCHEMA_VERSION
    current["history"] = [{**point, "flops": 1.2e8 * point["step"]} for point in current["history"]]
    current["history"][0]["flops"] = None  # a validation restored from a checkpoint written before version 2
    path = write_summary(tmp_path, current)
    assert read_summary(path) == current
    del current["history"][1]["flops"]
    path.write_text(json.dumps(current), encoding="utf-8")
    with pytest.raises(DataError, match=r"lacks required keys: history\[1\]\.flops \(schema version 2\)"):
        read_summary(path)
