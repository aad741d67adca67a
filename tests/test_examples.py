import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrain_then_finetune(tmp_path):
    metrics = load("pretrain_then_finetune").main(["--preset", "tiny", "--steps", "6", "--vocab-size", "2000", "--root", str(tmp_path)])
    assert {"val/loss", "val/accuracy", "val/f1"} <= set(metrics)
    assert 0.0 <= metrics["val/accuracy"] <= 1.0
    assert (tmp_path / "mlm.ckpt").is_file()


def test_own_model_with_monitor_and_technique(tmp_path):
    summary = load("own_model").main(["--steps", "10", "--target-accuracy", "0.0", "--root", str(tmp_path)])
    assert summary["steps"] == 10 and summary["tokens"] > 0 and summary["flops_per_step"] > 0
    assert summary["target"]["reached"] and summary["target"]["step"] == 2  # first validation, accuracy >= 0
    assert "val/accuracy" in summary["final_metrics"]
    assert 0.5 < summary["final_metrics"]["layer_drop/realised_keep"] < 1.0  # linear 0.2 on 2 blocks: expected 0.85
