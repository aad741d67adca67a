"""measure_checkpoint: a run's final checkpoint exported (dense, structured-pruned, int8), saved, evaluated and timed.

Four tiny BERT classifiers are trained once for the module (6 steps of configs/bert/tiny_classify_prose.yaml,
on 600 sentences, through ``lightning-efficient fit``): dense; with structured MagnitudePruning reaching half
of the heads and neurons at step 4; with QuantizationAwareTraining (embeddings too); with both, the weight
scales held from step 5.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_efficient.callbacks.pruning import load_pruned
from lightning_efficient.callbacks.quantization import load_quantized
from lightning_efficient.cli import EfficientCLI
from lightning_efficient.cli import main as cli_main
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError
from lightning_efficient.pipeline.measure import MEASURES_FILE, main, measure_checkpoint

CONFIG = Path(__file__).parents[1] / "configs" / "bert" / "tiny_classify_prose.yaml"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
PRUNING = {
    "class_path": "lightning_efficient.callbacks.MagnitudePruning",
    "init_args": {
        "final_sparsity": 0.5,
        "start_step": 1,
        "end_step": 4,
        "frequency": 1,
        "structure": "heads_and_neurons",
    },
}
QAT = {"class_path": "lightning_efficient.callbacks.QuantizationAwareTraining", "init_args": {"embeddings": True}}
#: Sparse training: 60% of the blocks' Linear weights masked before step 1.
SPARSE = {
    "class_path": "lightning_efficient.callbacks.PruneAtInit",
    "init_args": {"method": "magnitude", "sparsity": 0.6},
}
HELD_QAT = {**QAT, "init_args": {**QAT["init_args"], "freeze_step": 5}}  # weight scales held from step 5
#: The technique callbacks of each run.
TECHNIQUES: dict[str, list[dict[str, Any]]] = {
    "dense": [],
    "pruned": [PRUNING],
    "qat": [QAT],
    "both": [PRUNING, HELD_QAT],
    "sparse": [SPARSE],
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: two cores are shared with other work, and OpenMP threads that wait for each other crawl."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, user_files: dict[str, str]) -> dict[str, tuple[Path, Path]]:
    """Per technique: the run's full config (the base with the technique's callback) and its last checkpoint.

    The base is configs/bert/tiny_classify_prose.yaml on 600 Brown sentences of three genres (conftest's
    ``user_files``) in 32-token sequences, for speed.
    """
    root = tmp_path_factory.mktemp("runs")
    found = {}
    for name, callbacks in TECHNIQUES.items():
        config = yaml.safe_load(CONFIG.read_text().replace("runs/bert_tiny_classify_prose", str(root / name)))
        config["trainer"].update(max_steps=6, limit_val_batches=2, num_sanity_val_steps=0)
        config["model"]["init_args"]["max_length"] = 32
        config["data"]["init_args"].update(
            train_files=[user_files["jsonl"]],
            text_column="sentence",
            label_column="category",
            label_map={"news": "informative", "learned": "informative", "fiction": "imaginative"},
            group_column="source_doc",
            val_fraction=0.2,
            max_length=32,
        )
        config["trainer"]["callbacks"] += callbacks
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        cli_main(["fit", "-c", str(path), *QUIET])
        found[name] = (path, root / name / "checkpoints" / "last.ckpt")
    return found


def validate_checkpoint(config: Path, checkpoint: Path) -> tuple[dict[str, float], int]:
    """What ``lightning-efficient validate -c config --ckpt_path checkpoint`` logs, and its model's parameter count."""
    args = ["validate", "-c", str(config), "--ckpt_path", str(checkpoint), "--trainer.logger", "false", *QUIET]
    cli = EfficientCLI(args=args, save_config_callback=None)
    metrics = {name: float(value) for name, value in cli.trainer.callback_metrics.items()}
    return metrics, sum(p.numel() for p in cli.model.parameters())


def model_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file() and f.name != MEASURES_FILE)


@pytest.fixture(scope="module")
def dense(runs: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    """The dense run measured through the command line: its measures.json, output directory and printed output."""
    config, checkpoint = runs["dense"]
    output = tmp_path_factory.mktemp("dense_measure")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["--config", str(config), "--checkpoint", str(checkpoint), "--output", str(output), "--threads", "1"])
    return json.loads((output / MEASURES_FILE).read_text()), output, printed.getvalue()


def test_dense_classifier_is_measured_as_the_validate_run_sees_it(
    runs: dict[str, tuple[Path, Path]], dense: tuple[dict, Path, str]
) -> None:
    measures, output, printed = dense
    expected, parameters = validate_checkpoint(*runs["dense"])
    assert measures["model_class"] == "BertClassifier" and measures["exported"] == []
    assert measures["params"] == parameters and 0.9 * parameters < measures["nonzero_params"] <= parameters
    assert measures["metrics"].keys() == expected.keys() == {"val/loss", "val/accuracy", "val/f1"}
    for name, value in expected.items():  # the same weights on the same validation batches
        assert measures["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert set(measures["latency_ms"]) == {"1", "32"} and all(v > 0 for v in measures["latency_ms"].values())
    assert measures["latency_threads"] == 1
    assert measures["disk_bytes"] == model_bytes(output)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in output.iterdir()}
    reloaded = load_pruned(output)  # the saved model is a plain transformers model
    assert sum(p.numel() for p in reloaded.parameters()) == parameters
    lines = printed.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("BertClassifier: ") and MEASURES_FILE in lines[0]


def test_a_sparse_trained_model_keeps_its_shapes_with_its_masked_weights_zero(
    runs: dict[str, tuple[Path, Path]], dense: tuple[dict, Path, str], tmp_path: Path
) -> None:
    config, checkpoint = runs["sparse"]
    measures = measure_checkpoint(config, checkpoint, tmp_path, batch_sizes=(1,), repeats=1, threads=1)
    assert measures["exported"] == ["sparse"] and measures["params"] == dense[0]["params"]
    masks = [v for k, v in torch.load(checkpoint, weights_only=True)["state_dict"].items() if k.endswith("weight_mask")]
    masked = sum(int((m == 0).sum()) for m in masks)
    assert masked == round(0.6 * sum(m.numel() for m in masks))
    assert measures["nonzero_params"] <= measures["params"] - masked  # every masked weight saved as an exact zero


def test_structured_pruning_exports_a_smaller_model_with_the_masked_models_metrics(
    runs: dict[str, tuple[Path, Path]], dense: tuple[dict, Path, str], tmp_path: Path
) -> None:
    config, checkpoint = runs["pruned"]
    measures = measure_checkpoint(config, checkpoint, tmp_path, batch_sizes=(1,), repeats=2, threads=2)
    assert measures["latency_threads"] == 2 and torch.get_num_threads() == 1  # set while timing, then restored
    assert measures["exported"] == ["pruned"]
    assert measures["params"] < 0.95 * dense[0]["params"]  # half the heads and FFN neurons of every block
    masked, _ = validate_checkpoint(config, checkpoint)  # the masked model, as the run validated it
    assert measures["metrics"].keys() == masked.keys()
    for name, value in masked.items():  # pruned units added exactly zero
        assert measures["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-5)
    layer = load_pruned(tmp_path).bert.encoder.layer[0]
    assert layer.attention.self.num_attention_heads == 2 and layer.intermediate.dense.out_features < 37
    assert measures["disk_bytes"] == model_bytes(tmp_path) < dense[0]["disk_bytes"]
    assert json.loads((tmp_path / MEASURES_FILE).read_text()) == measures


def test_quantization_aware_training_exports_an_int8_model(
    runs: dict[str, tuple[Path, Path]], dense: tuple[dict, Path, str], tmp_path: Path
) -> None:
    config, checkpoint = runs["qat"]
    measures = measure_checkpoint(config, checkpoint, tmp_path, batch_sizes=(2,), repeats=2, threads=1)
    assert measures["exported"] == ["int8"] and (tmp_path / "quantization.json").is_file()
    assert measures["params"] == dense[0]["params"]  # an int8 weight counts the elements it stands for
    assert measures["disk_bytes"] == model_bytes(tmp_path) < 0.6 * dense[0]["disk_bytes"]
    assert measures["metrics"].keys() == dense[0]["metrics"].keys() and set(measures["latency_ms"]) == {"2"}
    fake_quantized, _ = validate_checkpoint(config, checkpoint)  # the validate run fake-quantizes
    assert measures["metrics"]["val/loss"] == pytest.approx(fake_quantized["val/loss"], rel=1e-3)


def test_pruned_then_quantized_model_keeps_the_held_scales_of_the_rows_it_kept(
    runs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    config, checkpoint = runs["both"]
    measures = measure_checkpoint(config, checkpoint, tmp_path, batch_sizes=(1,), repeats=1, compile=False)
    assert measures["exported"] == ["pruned", "int8"] and measures["metrics"]["val/loss"] > 0
    held = torch.load(checkpoint, weights_only=True)["callbacks"]["lightning_efficient.qat"]["frozen_scales"]
    model = load_quantized(tmp_path, compile=False)  # the pruned shapes are recorded in its config
    assert sum(p.numel() for p in model.parameters()) == measures["params"]
    for name in ("attention.self.query", "intermediate.dense", "output.dense"):  # rows sliced, rows sliced, columns
        scale = model.get_submodule(f"bert.encoder.layer.0.{name}").weight.scale.flatten()
        saved = held[f"model.bert.encoder.layer.0.{name}"]["scale"].flatten()
        assert len(scale) <= len(saved) and torch.isin(scale, saved).all(), name


def test_missing_or_unfit_inputs_fail_in_one_line_naming_the_path(
    runs: dict[str, tuple[Path, Path]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config, checkpoint = runs["dense"]
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint '.*nowhere\.ckpt' does not exist"):
        measure_checkpoint(config, tmp_path / "nowhere.ckpt", tmp_path / "out")
    with pytest.raises(ConfigurationError, match=r"config '.*nowhere\.yaml' does not exist"):
        measure_checkpoint(tmp_path / "nowhere.yaml", checkpoint, tmp_path / "out")
    cases = [
        (config, tmp_path / "nowhere.ckpt", "nowhere.ckpt"),
        (config, runs["pruned"][1], "trained with MagnitudePruning"),  # a pruned checkpoint, a run without pruning
    ]
    for run_config, run_checkpoint, named in cases:
        with pytest.raises(SystemExit) as exited:
            main(["--config", str(run_config), "--checkpoint", str(run_checkpoint), "--output", str(tmp_path / "out")])
        error = capsys.readouterr().err.strip().splitlines()
        assert exited.value.code == 2 and len(error) == 1 and error[0].startswith("error: ") and named in error[0]
    assert not (tmp_path / "out").exists()
