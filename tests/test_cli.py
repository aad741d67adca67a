import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_efficient import BertClassifier, BertMLM, CheckpointMismatchError, MLMDataModule
from lightning_efficient.cli import EfficientCLI, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Whole run configs; the fragments in configs/techniques/ are loaded on top of one by the contract
# suite (tests/techniques.py) and by the tests of their technique; configs/pipelines/ are pipelines
# (tests/test_pipeline.py checks each).
ALL_CONFIGS = sorted(
    str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("techniques", "pipelines")
)


@pytest.fixture(scope="module")
def small_mlm_checkpoint(user_files, tmp_path_factory) -> str:
    """A BertMLM checkpoint of the shape that configs/bert/small_finetune_prose.yaml expects."""
    dm = MLMDataModule(train_files=[user_files["txt"]], text_column="sentence", vocab_size=400, max_length=128, batch_size=2)
    model = BertMLM(vocab_size=dm.vocab_size, preset="small", max_length=128)
    trainer = pl.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, dm)
    path = tmp_path_factory.mktemp("pretrained") / "mlm.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def test_every_config_has_a_runnable_header_and_root_dir():
    assert len(ALL_CONFIGS) >= 10
    for name in ALL_CONFIGS:
        text = (CONFIGS / name).read_text()
        assert f"lightning-efficient fit -c configs/{name}" in text.split("seed_everything")[0], name
        assert "default_root_dir: runs/" in text, name


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_parses_and_instantiates(name, small_mlm_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["-c", str(CONFIGS / name)]
    if "finetune" in name:
        args += ["--model.init_args.pretrained", small_mlm_checkpoint]
    if name.startswith("bilstm/"):  # a distilled student: its embeddings and tokenizer come from the teacher (step 1)
        args += ["--model.init_args.embeddings_from", small_mlm_checkpoint]
    elif not name.startswith("vit/") and "finetune" not in name:
        args += ["--data.init_args.vocab_size", "1000"]  # quick tokenizer training; shapes still come from the config
    cli = EfficientCLI(args=args, run=False)
    assert isinstance(cli.model, pl.LightningModule) and isinstance(cli.datamodule, pl.LightningDataModule)
    assert os.path.abspath(cli.trainer.default_root_dir) == str(tmp_path / cli.config["trainer"]["default_root_dir"])
    expected = cli.datamodule.model_arguments()
    for key, value in expected.items():  # the CLI filled the data-decided arguments
        if key in cli.model.hparams:
            assert cli.model.hparams[key] == value, key
    if "finetune" in name:
        assert cli.model.initialised_from == small_mlm_checkpoint
        pretrained = torch.load(small_mlm_checkpoint, weights_only=True)["state_dict"]
        assert torch.equal(cli.model.model.bert.embeddings.word_embeddings.weight, pretrained["model.bert.embeddings.word_embeddings.weight"])


TINY = [
    ("bert/tiny_mlm.yaml", {"text", "masked", "prediction"}),
    ("bert/tiny_classify_prose.yaml", {"text", "label", "probabilities"}),
    ("mt/tiny_en_fr.yaml", {"source", "translation"}),
    ("vit/tiny_fashion.yaml", {"label", "probability", "true_label"}),
]


@pytest.mark.parametrize(("name", "keys"), TINY)
def test_cli_fit_then_predict_from_checkpoint(name, keys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(CONFIGS / name)
    root = tmp_path / "runs" / name.replace("/", "_").removesuffix(".yaml")
    main(["fit", "-c", config, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1"])
    checkpoint = root / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    assert list((root / "tensorboard").rglob("events.out.tfevents.*"))
    assert (root / "tensorboard" / root.name / "config.yaml").is_file()  # the logger version is the run name
    main(["predict", "-c", config, "--ckpt_path", str(checkpoint), "--trainer.limit_predict_batches", "1"])
    rows = [json.loads(line) for line in (root / "predictions.jsonl").read_text().splitlines()]
    assert rows and keys <= set(rows[0])


def test_predict_tokenizer_comes_from_the_checkpoint(tmp_path, monkeypatch):
    """predict must not train a tokenizer: it reads the checkpoint's, even if the cache is gone."""
    monkeypatch.chdir(tmp_path)
    config = str(CONFIGS / "bert/tiny_mlm.yaml")
    main(["fit", "-c", config, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    monkeypatch.setenv("LIGHTNING_EFFICIENT_CACHE", str(tmp_path / "empty_cache"))
    checkpoint = "runs/bert_tiny_mlm/checkpoints/last.ckpt"
    main(["predict", "-c", config, "--ckpt_path", checkpoint, "--trainer.limit_predict_batches", "1"])
    assert not (tmp_path / "empty_cache" / "tokenizers").exists()  # (datasets' Arrow cache of the data may be there)
    saved = torch.load(checkpoint, weights_only=True)["lightning_efficient"]["tokenizer"]
    rows = (tmp_path / "runs/bert_tiny_mlm/predictions.jsonl").read_text().splitlines()
    assert rows and saved


def test_predict_with_another_model_types_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["fit", "-c", str(CONFIGS / "bert/tiny_mlm.yaml"), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    args = ["predict", "-c", str(CONFIGS / "vit/tiny_fashion.yaml"), "--ckpt_path", "runs/bert_tiny_mlm/checkpoints/last.ckpt"]
    with pytest.raises(SystemExit) as exit_info:  # the console script: one line, status 2
        main(args)
    assert exit_info.value.code == 2
    assert "was written by BertMLM, but this run's model is ViTClassifier" in capsys.readouterr().err
    with pytest.raises(CheckpointMismatchError, match=r"was written by BertMLM, but this run's model is ViTClassifier"):
        main([*args, "--traceback"])


def test_console_script_runs_fit(tmp_path):
    """The installed `lightning-efficient` entry point itself (a fresh process, as a user runs it)."""
    script = Path(sys.executable).with_name("lightning-efficient")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_efficient.cli"]
    result = subprocess.run(
        [*command, "fit", "-c", str(CONFIGS / "vit/tiny_fashion.yaml"), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs/vit_tiny_fashion/checkpoints/last.ckpt").is_file()


def test_cli_bad_preset_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(CONFIGS / "vit/tiny_fashion.yaml"), "--model.init_args.preset", "medium"])
    assert exit_info.value.code == 2
    assert "error: preset='medium' is unknown; choose one of: tiny, small, base" in capsys.readouterr().err
    assert not (tmp_path / "runs/vit_tiny_fashion/checkpoints").exists()


def test_finetune_config_takes_tokenizer_from_pretrained_checkpoint(small_mlm_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = EfficientCLI(
        args=["-c", str(CONFIGS / "bert/small_finetune_prose.yaml"), "--model.init_args.pretrained", small_mlm_checkpoint],
        run=False,
    )
    assert cli.datamodule.tokenizer_source == small_mlm_checkpoint
    assert isinstance(cli.model, BertClassifier) and cli.model.hparams.vocab_size == cli.datamodule.vocab_size


def test_optimizer_from_the_command_line_replaces_the_default_and_keeps_the_schedule(tmp_path, monkeypatch):
    from lightning_efficient.models.base import warmup_schedule

    monkeypatch.chdir(tmp_path)
    args = ["fit", "-c", str(CONFIGS / "vit/tiny_fashion.yaml"), "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.05",
            "--optimizer.momentum", "0.9", "--trainer.max_steps", "10", "--trainer.limit_train_batches", "3",
            "--trainer.max_epochs", "5", "--trainer.limit_val_batches", "0", "--model.init_args.warmup_fraction", "0.2"]  # fmt: skip
    cli = EfficientCLI(args=args)
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    (config,) = cli.trainer.lr_scheduler_configs  # the module's warmup + cosine decay, per optimizer step
    assert config.interval == "step" and config.scheduler.last_epoch == 10
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * warmup_schedule(10, 2, 10, "cosine"))
    assert config.scheduler.get_last_lr()[0] == 0.05 * warmup_schedule(10, 2, 10, "cosine")


def test_optimizer_and_lr_scheduler_from_yaml_replace_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["-c", str(CONFIGS / "vit/tiny_fashion.yaml"), "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.05",
            "--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "4"]  # fmt: skip
    optimizers, schedulers = EfficientCLI(args=args, run=False).model.configure_optimizers()
    assert isinstance(optimizers[0], torch.optim.SGD) and isinstance(schedulers[0], torch.optim.lr_scheduler.StepLR)


def test_model_argument_names_match_model_arguments(user_files):
    from lightning_efficient import ImageClassificationDataModule, TextClassificationDataModule, TranslationDataModule

    modules = [
        MLMDataModule(train_files=[user_files["txt"]], text_column="sentence", vocab_size=300),
        TextClassificationDataModule(train_files=[user_files["jsonl"]], text_column="sentence", label_column="category", vocab_size=300),
        TranslationDataModule(train_files=[user_files["pairs"]], source_column="src", target_column="tgt", vocab_size=300),
        ImageClassificationDataModule(),
    ]
    for dm in modules:
        assert tuple(dm.model_arguments()) == type(dm).model_argument_names, type(dm).__name__


def test_predict_from_checkpoint_reads_no_training_data(tmp_path, monkeypatch, user_files):
    """With --ckpt_path and predict_files, the training files are never opened (they may be gone)."""
    monkeypatch.chdir(tmp_path)
    config = str(CONFIGS / "bert/tiny_classify_prose.yaml")
    train = tmp_path / "train.jsonl"
    train.write_text(Path(user_files["jsonl"]).read_text())
    data_args = ["--data.init_args.train_files", f"[{train}]", "--data.init_args.text_column", "sentence",
                 "--data.init_args.label_column", "category", "--data.init_args.group_column", "source_doc"]  # fmt: skip
    main(["fit", "-c", config, *data_args, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    train.unlink()
    (tmp_path / "new.txt").write_text("The jury said the election was fair .\nShe smiled and left the room .\n")
    main(["predict", "-c", config, *data_args, "--data.init_args.predict_files", f"[{tmp_path / 'new.txt'}]",
          "--ckpt_path", "runs/bert_tiny_classify_prose/checkpoints/last.ckpt"])  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "runs/bert_tiny_classify_prose/predictions.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["The jury said the election was fair .", "She smiled and left the room ."]
    assert {r["label"] for r in rows} <= {"imaginative", "informative"}
