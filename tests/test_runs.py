"""Run names and directories: two combinations never share one; a rerun stops with the three ways on."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_efficient.cli import EfficientCLI, main
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.runs import check_run_directory, check_run_name, default_run_name, move_outputs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_MLM = str(CONFIGS / "bert/tiny_mlm.yaml")
LAYER_DROP = str(CONFIGS / "techniques/layer_drop.yaml")
QUICK = ["--data.init_args.vocab_size", "300", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2"]


def built(*args: str) -> EfficientCLI:
    return EfficientCLI(args=[*args, "--data.init_args.vocab_size", "300"], run=False)


def test_default_names_follow_the_fragments():
    assert default_run_name("runs/bert_small_mlm", []) == "bert_small_mlm"
    assert default_run_name("runs/bert_small_mlm", ["a/layer_drop.yaml", "qat_int8.yaml"]) == (
        "bert_small_mlm+layer_drop+qat_int8"
    )
    assert default_run_name(None, ["layer_drop.yaml"]) is None


@pytest.mark.parametrize(
    ("name", "why"), [("a/b", "path separator"), ("a\\b", "path separator"), ("", "non-empty"), ("..", "non-empty")]
)
def test_a_bad_run_name_says_why(name, why):
    with pytest.raises(ConfigurationError, match=why):
        check_run_name(name)


def test_two_combinations_get_two_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    alone, combined = built("-c", TINY_MLM), built("-c", TINY_MLM, "-c", LAYER_DROP)
    assert alone.run_directory == "runs/bert_tiny_mlm"
    assert combined.run_directory == "runs/bert_tiny_mlm+layer_drop"
    for cli in (alone, combined):
        root = Path(cli.run_directory).resolve()
        trainer = cli.trainer
        assert Path(trainer.default_root_dir).resolve() == root
        assert {Path(c.dirpath) for c in trainer.checkpoint_callbacks} == {root / "checkpoints"}
        assert Path(trainer.logger.log_dir).resolve() == root / "tensorboard" / root.name  # the version is the run name


def test_run_name_and_a_root_dir_given_on_the_command_line_name_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    named = built("-c", TINY_MLM, "-c", LAYER_DROP, "--run_name", "shallow")
    assert named.run_directory == "runs/shallow" and named.config["run_name"] == "shallow"
    assert {Path(c.dirpath) for c in named.trainer.checkpoint_callbacks} == {(tmp_path / "runs/shallow/checkpoints")}
    elsewhere = built("-c", TINY_MLM, "-c", LAYER_DROP, "--trainer.default_root_dir", str(tmp_path / "exp/mine"))
    assert elsewhere.run_directory == str(tmp_path / "exp/mine")  # as given: no fragment suffix
    assert {Path(c.dirpath) for c in elsewhere.trainer.checkpoint_callbacks} == {tmp_path / "exp/mine/checkpoints"}


def test_run_name_in_yaml_names_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "named.yaml").write_text("run_name: ablation_a\n")
    cli = built("-c", TINY_MLM, "-c", LAYER_DROP, "-c", str(tmp_path / "named.yaml"))
    assert cli.run_directory == "runs/ablation_a" and Path(cli.trainer.logger.log_dir).name == "ablation_a"


def test_only_output_locations_move():
    trainer = {
        "default_root_dir": "runs/a",
        "callbacks": [
            {"class_path": "x.Distillation", "init_args": {"teacher": "runs/a/checkpoints/last.ckpt"}},
            {"class_path": "x.ModelCheckpoint", "init_args": {"dirpath": "runs/a/checkpoints"}},
            {"class_path": "x.Writer", "init_args": {"dirpath": "/elsewhere/out"}},
        ],
        "logger": [{"init_args": {"save_dir": "runs/a", "version": "v1"}}],
    }
    move_outputs(trainer, ["runs/a"], "runs/a+b", version="a+b")
    assert trainer["default_root_dir"] == "runs/a+b"
    assert trainer["callbacks"][0]["init_args"]["teacher"] == "runs/a/checkpoints/last.ckpt"  # an input
    assert trainer["callbacks"][1]["init_args"]["dirpath"] == "runs/a+b/checkpoints"
    assert trainer["callbacks"][2]["init_args"]["dirpath"] == "/elsewhere/out"
    assert trainer["logger"][0]["init_args"] == {"save_dir": "runs/a+b", "version": "v1"}  # a version given is kept


def test_check_run_directory_ways_on(tmp_path):
    run = tmp_path / "run"
    assert check_run_directory(run) is None  # nothing there: a new run
    (run / "checkpoints").mkdir(parents=True)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    with pytest.raises(ConfigurationError) as error:
        check_run_directory(run)
    message = str(error.value)
    assert "\n" not in message and all(way in message for way in ("--resume", "--overwrite", "--run_name"))
    assert check_run_directory(run, [run / "checkpoints"], resume=True) == last
    with pytest.raises(ConfigurationError, match="contradict"):
        check_run_directory(run, resume=True, overwrite=True)
    assert check_run_directory(run, overwrite=True) is None and not run.exists()


def test_a_rerun_stops_before_anything_is_built(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "runs/bert_tiny_mlm+layer_drop/checkpoints/last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not read")
    monkeypatch.setenv("LIGHTNING_EFFICIENT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", TINY_MLM, "-c", LAYER_DROP])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == (
        "error: runs/bert_tiny_mlm+layer_drop already holds a run (runs/bert_tiny_mlm+layer_drop/checkpoints/last.ckpt): "
        "add --resume to continue from its last.ckpt, --overwrite to delete it and start over, or --run_name NAME "
        "to start a new run beside it"
    )
    assert not (tmp_path / "cache").exists()  # no tokenizer was trained: nothing was built


def test_readme_compare_example_runs_as_written_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    """Both runs of the README's `compare` example (shortened by overrides that do not change the run names)."""
    monkeypatch.chdir(tmp_path)
    small = str(CONFIGS / "bert/small_mlm.yaml")
    shorter = [*QUICK, "--model.init_args.preset", "tiny", "--trainer.max_steps", "2"]
    main(["fit", "-c", small, *shorter])
    main(["fit", "-c", small, "-c", LAYER_DROP, *shorter])
    capsys.readouterr()
    main(["compare", "runs/bert_small_mlm", "runs/bert_small_mlm+layer_drop", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [run["label"] for run in rows["runs"]] == ["bert_small_mlm", "bert_small_mlm+layer_drop"]
    with pytest.raises(SystemExit):  # the same combination again: the one-line choice
        main(["fit", "-c", small, "-c", LAYER_DROP, *shorter])
    assert "--resume" in capsys.readouterr().err
    main(["fit", "-c", small, "-c", LAYER_DROP, *shorter[:-1], "3", "--resume"])  # one more step
    last = torch.load("runs/bert_small_mlm+layer_drop/checkpoints/last.ckpt", weights_only=True, mmap=True)
    assert last["global_step"] == 3
    main(["fit", "-c", small, "-c", LAYER_DROP, *shorter, "--overwrite"])
    last = torch.load("runs/bert_small_mlm+layer_drop/checkpoints/last.ckpt", weights_only=True, mmap=True)
    assert last["global_step"] == 2
    saved = yaml.safe_load(
        Path("runs/bert_small_mlm+layer_drop/tensorboard/bert_small_mlm+layer_drop/config.yaml").read_text()
    )
    assert saved["run_name"] == "bert_small_mlm+layer_drop" and not saved["overwrite"] and not saved["resume"]


def test_plan_trains_nothing_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["plan", "-c", TINY_MLM, "-c", LAYER_DROP, "--data.init_args.vocab_size", "300"])
    text = capsys.readouterr().out
    assert "runs/bert_tiny_mlm+layer_drop" in text and "layer_drop" in text
    assert not (tmp_path / "runs").exists()
    main(["plan", "-c", TINY_MLM, "-c", LAYER_DROP, "--data.init_args.vocab_size", "300", "--format", "json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["run"]["name"] == "bert_tiny_mlm+layer_drop"
    assert [t["name"] for t in plan["techniques"]] == ["layer_drop"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--run_name", "a/b"], "error: run_name='a/b' must not contain a path separator"),
        (["--run_name", ""], "error: run_name='' must be a non-empty directory name"),
        (["--model.init_args.preset", "medium"], "error: preset='medium' is unknown; choose one of: tiny, small, base"),
        (["--resume", "--overwrite"], "error: --resume and --overwrite contradict each other; give one"),
    ],
)
def test_plan_and_fit_stop_on_bad_input_with_one_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in ("plan", "fit"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "-c", TINY_MLM, "--data.init_args.vocab_size", "300", *args])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith(message), command
    assert not (tmp_path / "runs").exists()
