"""The pipeline end to end: configs/pipelines/tiny.yaml once, its rerun, and a stage killed mid-fit that resumes."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_efficient.errors import ConfigurationError
from lightning_efficient.pipeline import command
from lightning_efficient.pipeline.command import run_pipeline
from lightning_efficient.pipeline.spec import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pipelines" / "tiny.yaml"
BUDGET = 2.0e10  # tiny.yaml's pretraining budget


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny.yaml run once, from the repository root (its config paths are relative to it)."""
    root = tmp_path_factory.mktemp("pipelines")
    here = os.getcwd()
    os.chdir(ROOT)
    try:
        spec = load_pipeline(TINY, root=root)
        lines: list[str] = []
        report = run_pipeline(spec, say=lines.append)
    finally:
        os.chdir(here)
    return spec, report, lines


def records(report):
    return {record["name"]: record for record in report["stages"]}


def test_every_stage_runs_in_its_own_directory_and_is_recorded(tiny):
    spec, report, _ = tiny
    stages = records(report)
    assert sorted(stages) == sorted(
        f"{stage}/hidden_size={size}" for stage in ("pretrain", "finetune", "compress") for size in (32, 48)
    )
    for name, record in stages.items():
        directory = spec.directory / name
        assert record["status"] == "finished" and Path(record["checkpoint"]).is_file()
        assert Path(record["checkpoint"]).parent.parent == directory
        assert json.loads((directory / "record.json").read_text())["config_hash"] == record["config_hash"]
        assert record["efficiency"]["steps"] > 0
    for size in (32, 48):
        finetune = stages[f"finetune/hidden_size={size}"]
        assert finetune["source_checkpoint"] == stages[f"pretrain/hidden_size={size}"]["checkpoint"]
        assert f"hidden_size: {size}" in Path(finetune["config"]).read_text()  # the source's shape


def test_the_flop_budget_stops_each_size_within_one_step_and_the_larger_runs_fewer_steps(tiny):
    _, report, _ = tiny
    stages = records(report)
    small, large = stages["pretrain/hidden_size=32"]["efficiency"], stages["pretrain/hidden_size=48"]["efficiency"]
    for summary in (small, large):
        per_step = summary["total_flops"] / summary["steps"]
        assert BUDGET <= summary["total_flops"] < BUDGET + 1.05 * per_step
    assert large["steps"] < small["steps"]


def test_compressed_models_are_measured_smaller_and_the_report_marks_the_front(tiny):
    spec, report, _ = tiny
    stages = records(report)
    for size in (32, 48):
        dense, compressed = stages[f"finetune/hidden_size={size}"], stages[f"compress/hidden_size={size}"]
        assert compressed["measures"]["exported"] == ["pruned", "int8"]
        assert compressed["measures"]["params"] < dense["measures"]["params"]
        assert compressed["measures"]["disk_bytes"] < dense["measures"]["disk_bytes"]
        assert stages[f"pretrain/hidden_size={size}"]["measures"] is None  # measure: false
    measured = {name for name, record in stages.items() if record["measures"]}
    for axis in ("params", "latency_ms", "disk_bytes"):
        assert report["pareto"][axis] and set(report["pareto"][axis]) <= measured
    for file in ("report.json", "report.md", "report_curves.png", "report_pareto.png"):
        assert (spec.directory / file).is_file()


def test_a_rerun_skips_every_stage_and_measures_nothing_again(tiny, monkeypatch):
    spec, report, _ = tiny

    def no_process(argv, what):
        raise AssertionError(f"a finished stage ran again: {what}")

    monkeypatch.setattr(command, "_run", no_process)
    here = os.getcwd()
    os.chdir(ROOT)
    try:
        lines: list[str] = []
        again = run_pipeline(load_pipeline(TINY, root=spec.root), say=lines.append)
    finally:
        os.chdir(here)
    assert sum("skipped" in line for line in lines) == 6
    assert records(again) == records(report)


def test_stage_must_name_a_stage_and_its_input_must_have_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_pipeline(TINY, root=tmp_path)
    with pytest.raises(
        ConfigurationError, match="--stage 'compres' names no stage; stages: pretrain, finetune, compress"
    ):
        run_pipeline(spec, stage="compres")
    with pytest.raises(ConfigurationError, match="starts from 'pretrain/hidden_size=32', which has not finished"):
        run_pipeline(spec, stage="finetune")


def test_a_stage_killed_mid_fit_resumes_from_its_last_checkpoint_and_ends_as_an_uninterrupted_run(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    fragment = tmp_path / "fail.yaml"
    fragment.write_text("trainer:\n  callbacks+:\n    - class_path: pipeline_failure.FailAtStep\n")
    file = tmp_path / "killed.yaml"
    file.write_text(
        textwrap.dedent(
            f"""
            name: killed
            stages:
              - name: pretrain
                config: configs/bert/tiny_mlm.yaml
                fragments: [{fragment}]
                measure: false
                overrides:
                  trainer.max_steps: 10
                  trainer.val_check_interval: 5
                  trainer.limit_val_batches: 1
                  trainer.callbacks[LastCheckpoint].init_args.every_n_train_steps: 5
            """
        )
    )
    interrupted, uninterrupted = load_pipeline(file, root=tmp_path / "a"), load_pipeline(file, root=tmp_path / "b")
    monkeypatch.setenv("PIPELINE_TEST_FAIL_AT_STEP", "7")
    with pytest.raises(ConfigurationError, match="stage 'pretrain' failed .* this one resumes from its last.ckpt"):
        run_pipeline(interrupted, say=lambda line: None)
    monkeypatch.delenv("PIPELINE_TEST_FAIL_AT_STEP")
    lines: list[str] = []
    report = run_pipeline(interrupted, say=lines.append)
    assert any("resuming from" in line for line in lines)
    assert report["stages"][0]["resumed"] is True
    run_pipeline(uninterrupted, say=lambda line: None)
    weights = [
        torch.load(spec.directory / "pretrain" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for spec in (interrupted, uninterrupted)
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
