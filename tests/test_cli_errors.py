"""What a new user hits: one short message for a mistake, readable checkpoint errors, a quiet first screen."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_efficient import BertMLM, MagnitudePruning
from lightning_efficient.callbacks.pruning.masks import BIAS_MASK, MASK
from lightning_efficient.checkpoint import (
    DISTRIBUTED_METADATA,
    PRUNING_MASK_SUFFIXES,
    PRUNING_STATE_KEY,
    checkpoint_tokenizer,
    load_checkpoint,
    read_checkpoint_metadata,
)
from lightning_efficient.cli import check_ckpt_path, main, short_parse_error
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError, CorruptCheckpointError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = str(CONFIGS / "bert/tiny_mlm.yaml")
#: A tiny BertMLM trained 2 steps with MagnitudePruning (see tests/fixtures/README.md).
PRUNED = Path(__file__).parent / "fixtures" / "bert_tiny_mlm_v0.1.0.ckpt"
PRUNING_HINT = "was trained with MagnitudePruning or sparse training"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, as a user runs it (default warning filters, no pytest around it)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONWARNINGS", "LIGHTNING_EFFICIENT_TRACEBACK")
    }
    return subprocess.run(
        [sys.executable, "-m", "lightning_efficient.cli", *args],
        check=False, cwd=cwd, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def error_block(stderr: str) -> list[str]:
    """The lines from the ``error:`` line to the end."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert starts, stderr[-3000:]
    return lines[starts[0] :]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--trainer.max_stepz", "3"], "unknown option 'trainer.max_stepz'; did you mean 'trainer.max_steps'?"),
        (["--model", "lightning_efficient.BertMLMX"], "did you mean 'lightning_efficient.BertMLM'?"),
        (["-c", str(CONFIGS / "techniques/layer_drop.yaml"), "--trainer.callbacks.drop_rate", "1.5"],
         "drop_rate=1.5 must lie in [0.0, 1.0)"),
    ],
    ids=["misspelled_key", "unknown_class_path", "value_out_of_range"],
)  # fmt: skip
def test_a_mistake_prints_one_short_message_and_exits_2(args, expected, tmp_path):
    result = run_cli("fit", "-c", TINY, "--trainer.max_steps", "1", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    block = error_block(result.stderr)
    assert expected in block[0] and len(block) < 6
    assert "Traceback" not in result.stderr + result.stdout and "usage:" not in result.stderr
    assert not (tmp_path / "runs/bert_tiny_mlm/checkpoints").exists()


def test_traceback_flag_and_environment_variable_show_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "-c", TINY, "--trainer.max_stepz", "3"]
    with pytest.raises(ConfigurationError, match=r"did you mean 'trainer\.max_steps'"):
        main([*args, "--traceback"])
    monkeypatch.setenv("LIGHTNING_EFFICIENT_TRACEBACK", "1")
    with pytest.raises(ConfigurationError, match=r"unknown option 'trainer\.max_stepz'"):
        main(args)


def test_an_error_in_a_technique_setup_is_one_message(tmp_path, monkeypatch, capsys):
    """MagnitudePruning checks its schedule against the run in setup, after the Trainer is built."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", TINY, "-c", str(CONFIGS / "techniques/pruning_gradual.yaml"), "--trainer.max_steps", "2"])
    assert exit_info.value.code == 2
    block = error_block(capsys.readouterr().err)
    assert block[0].startswith("error: end_step=150 is never reached") and len(block) < 6


def test_a_non_finite_loss_ends_the_run_with_one_message_and_status_1(tmp_path, monkeypatch, capsys):
    """The config's NonFiniteLossGuard stops the run; the CLI says why in one message (the run failed: status 1)."""
    monkeypatch.chdir(tmp_path)
    training_step = BertMLM.training_step
    monkeypatch.setattr(BertMLM, "training_step", lambda self, *a: training_step(self, *a) * float("nan"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", TINY, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"])
    assert exit_info.value.code == 1
    block = error_block(capsys.readouterr().err)
    assert block[0].startswith("error: loss is nan at step 0") and "learning rate" in block[0] and len(block) < 6


def test_short_parse_errors():
    keys = ["trainer.max_steps", "trainer.max_epochs"]
    assert short_parse_error("Subcommand 'fit' does not accept option 'trainer.max_epoch'", keys) == (
        "unknown option 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?"
    )
    assert short_parse_error("unrecognized arguments: --nothing_like_it 3", keys) == "unknown option 'nothing_like_it'"
    message = "Parser key \"model\":\n  - Problem with given class_path 'lightning_efficient.BertMLM':\n    Option 'presett' is not accepted"
    assert short_parse_error(message) == "lightning_efficient.BertMLM has no argument 'presett'; did you mean 'preset'?"


def test_the_first_screen_has_no_known_noise(tmp_path):
    result = run_cli("fit", "-c", TINY, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Epoch 0" in output and "Epoch 0/-2" not in output  # the progress bar ran, without max_epochs - 1
    assert "Total params" in output and "Total FLOPs" not in output and "Total Flops" not in output
    assert "| FLOPs" not in output and "┃ FLOPs" not in output  # no column of zeros (the monitor measures FLOPs)
    assert "LeafSpec" not in output and "Trainer already configured with model summary" not in output
    assert "Failed to load" not in output and "is an Enum subclass" not in output  # torchao's import (import_noise)
    assert "litlogger" not in output  # Lightning's cloud-logger advert


# -- checkpoints that cannot be loaded ----------------------------------------------------------------------
@pytest.fixture
def broken(tmp_path) -> dict[str, Path]:
    """A truncated copy of a real tiny checkpoint, and a file of random bytes."""
    truncated, noise = tmp_path / "truncated.ckpt", tmp_path / "noise.ckpt"
    data = PRUNED.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    noise.write_bytes(
        torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes()
    )
    return {"truncated": truncated, "noise": noise}  # fmt: skip


@pytest.mark.parametrize("kind", ["truncated", "noise"])
def test_a_broken_checkpoint_says_so(kind, broken):
    path = broken[kind]
    pattern = rf"checkpoint '{path}' is truncated or not a checkpoint \(.+\)"
    for read in (load_checkpoint, read_checkpoint_metadata):
        with pytest.raises(CorruptCheckpointError, match=pattern):
            read(path)
    with pytest.raises(CorruptCheckpointError, match=pattern):
        check_ckpt_path(str(path), "lightning_efficient.BertMLM")


def test_the_cli_reports_a_broken_ckpt_path_in_one_message(broken, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "-c", TINY, "--ckpt_path", str(broken["truncated"])])
    assert exit_info.value.code == 2
    block = error_block(capsys.readouterr().err)
    assert "truncated.ckpt' is truncated or not a checkpoint (" in block[0] and len(block) < 6


# -- a pruned checkpoint without the pruning ------------------------------------------------------------------
def test_the_pruning_key_names_are_those_magnitude_pruning_writes():
    assert PRUNING_STATE_KEY == MagnitudePruning(final_sparsity=0.5).state_key
    assert PRUNING_MASK_SUFFIXES == (f".{MASK}", f".{BIAS_MASK}")
    assert PRUNING_STATE_KEY in torch.load(PRUNED, weights_only=True)["callbacks"]


def test_the_cli_names_the_pruning_fragment_for_a_pruned_checkpoint(tmp_path, monkeypatch, capsys):
    with pytest.raises(CheckpointMismatchError, match=PRUNING_HINT):
        check_ckpt_path(str(PRUNED), "lightning_efficient.BertMLM", callbacks=None)
    check_ckpt_path(
        str(PRUNED), "lightning_efficient.BertMLM", [{"class_path": "lightning_efficient.MagnitudePruning"}]
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "-c", TINY, "--ckpt_path", str(PRUNED)])
    assert exit_info.value.code == 2
    block = error_block(capsys.readouterr().err)
    assert PRUNING_HINT in block[0] and "configs/techniques/pruning_" in block[0] and "export_pruned" in block[0]


def test_a_trainer_without_pruning_names_it_for_a_pruned_checkpoint():
    """The Python API: Lightning's 'Unexpected key(s) ... weight_mask' becomes a hint (strict loading only)."""
    with pytest.raises(CheckpointMismatchError, match=PRUNING_HINT):
        BertMLM.load_from_checkpoint(PRUNED)  # no Trainer, strict: the same hint
    model = BertMLM.load_from_checkpoint(PRUNED, strict=False)  # the caller chose to drop the masks
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    with pytest.raises(CheckpointMismatchError, match=PRUNING_HINT):
        trainer.validate(model, dataloaders=torch.utils.data.DataLoader([0]), ckpt_path=PRUNED, verbose=False)


# -- distributed (tensor-parallel) checkpoints are folders ----------------------------------------------------
def test_a_distributed_checkpoint_folder_is_accepted_and_checked(tmp_path):
    folder = tmp_path / "step=4.ckpt"
    folder.mkdir()
    with pytest.raises(CorruptCheckpointError, match=rf"a folder without {DISTRIBUTED_METADATA}"):
        check_ckpt_path(str(folder), "lightning_efficient.BertMLM")
    meta = torch.load(PRUNED, weights_only=True)
    for key in ("state_dict", "optimizer_states", "callbacks"):  # the shards hold the tensors; no pruning under TP
        meta.pop(key)
    torch.save(meta, folder / DISTRIBUTED_METADATA)
    check_ckpt_path(str(folder), "lightning_efficient.BertMLM")
    assert read_checkpoint_metadata(folder)["module"] == "BertMLM"
    assert checkpoint_tokenizer(folder / DISTRIBUTED_METADATA).get_vocab_size() == 120  # what the CLI gives the data
    with pytest.raises(CheckpointMismatchError, match=r"was written by BertMLM, but this run's model is ViTClassifier"):
        check_ckpt_path(str(folder), "lightning_efficient.ViTClassifier")


def test_a_bad_value_inside_a_nested_class_names_the_class_and_argument(tmp_path: Path) -> None:
    """A wrapper's inner data module: the error names the inner class and argument, not 'cannot be imported'."""
    done = run_cli(
        "fit", "-c", str(CONFIGS / "bilstm/tiny_distil_prose.yaml"),
        "--data.init_args.datamodule.init_args.label_map", "null", "--print_config", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert error_block(done.stderr)[0] == (
        "error: lightning_efficient.TextClassificationDataModule's label_map: the value given is not a "
        "dict[str, str] or NoneType"
    )
