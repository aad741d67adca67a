"""Benchmark harness (``benchmarks/harness.py``) and smoke runs of the benchmark scripts, tiny settings.

No timing is asserted: the ratio arithmetic is checked on injected fake times, the real runs only
for their structure, ordering, seeding and step counts.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_efficient import BertMLM, ConfigurationError

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the ``benchmarks`` package lives in the repository root, not in the installed package
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def harness() -> ModuleType:
    return importlib.import_module("benchmarks.harness")


def run_script(name: str, argv: list[str]) -> dict[str, Any]:
    """``benchmarks.<name>.main(argv)``, restoring the process-wide settings that the script's ``setup()`` changes."""
    threads, level = torch.get_num_threads(), logging.getLogger("lightning.pytorch").level
    try:
        return importlib.import_module(f"benchmarks.{name}").main(argv)
    finally:
        torch.set_num_threads(threads)
        logging.getLogger("lightning.pytorch").setLevel(level)


# -- ratio arithmetic on injected times ------------------------------------------------------------
FAKE = {  # times[name][round] = step times (s)
    "base": [[1.0, 1.2, 0.8], [1.0, 1.0, 1.0], [3.0, 3.0, 3.0]],
    "tech": [[2.0, 2.0, 2.0], [3.0, 2.0, 4.0], [3.0, 3.0, 3.0]],
    "copy": [[1.0, 1.2, 0.8], [1.0, 1.0, 1.0], [3.0, 3.0, 3.0]],
}


def test_ratio_is_the_median_of_per_round_ratios(harness, capsys):
    result = harness.report(FAKE, baseline="base", metric="step time", work_per_step=100, unit="tokens")
    tech, base, copy = (result["variants"][name] for name in ("tech", "base", "copy"))
    # Per-round medians: base 1, 1, 3; tech 2, 3, 3 -> per-round ratios 2/1, 3/1, 3/3 = 2, 3, 1.
    assert tech["round_ratios"] == [2.0, 3.0, 1.0]
    assert tech["ratio"] == 2.0  # median of (2, 3, 1); the ratio of pooled medians would be 3 / 1 = 3
    assert (tech["ratio_min"], tech["ratio_max"]) == (1.0, 3.0)
    assert (tech["ratio_q1"], tech["ratio_q3"]) == (1.5, 2.5)  # inclusive quartiles of (1, 2, 3)
    assert tech["median_step_s"] == statistics.median([2, 2, 2, 3, 2, 4, 3, 3, 3]) == 3.0
    assert tech["per_s"] == 100 / 3.0 and tech["steps"] == 9 and tech["rounds"] == 3
    for same in (base, copy):  # a variant against itself (or identical times): exactly 1, no spread
        assert same["round_ratios"] == [1.0, 1.0, 1.0]
        assert [same[key] for key in ("ratio", "ratio_min", "ratio_max", "ratio_q1", "ratio_q3")] == [1.0] * 5
    assert result["baseline"] == "base" and result["metric"] == "step time" and result["unit"] == "tokens"
    table = capsys.readouterr().out
    assert "base (baseline)" in table and "tokens/s" in table and "ratio (step time)" in table
    lines = [line for line in table.splitlines() if line.startswith("tech")]
    assert lines and lines[0].split()[-5:] == ["33.3", "2.000", "1.000-3.000", "1.500-2.500", "9"]

    throughput = harness.report(FAKE, baseline="base", metric="throughput")["variants"]["tech"]
    assert throughput["round_ratios"] == [0.5, 1 / 3, 1.0] and throughput["ratio"] == 0.5
    assert "per_s" not in throughput


def test_report_rejects_bad_arguments(harness):
    with pytest.raises(ConfigurationError, match=r"metric='speed' is unknown; choose one of: step time, throughput"):
        harness.report(FAKE, baseline="base", metric="speed")
    with pytest.raises(ConfigurationError, match=r"baseline='nope' is not a variant"):
        harness.report(FAKE, baseline="nope")
    with pytest.raises(ConfigurationError, match=r"same number"):
        harness.report({"a": [[1.0]], "b": [[1.0], [1.0]]}, baseline="a")
    with pytest.raises(ConfigurationError, match=r"rounds=0 must be >= 1"):
        harness.interleave([harness.Variant("a", lambda: lambda: None)], rounds=0, steps=1, warmup=0)
    with pytest.raises(ConfigurationError, match=r"unique names"):
        harness.interleave([harness.Variant("a", lambda: lambda: None)] * 2, rounds=1, steps=1, warmup=0)


def test_step_timer_measures_batch_start_intervals_after_warmup(harness):
    timer = harness.StepTimer(warmup=1)
    timer.starts = [10.0, 11.0, 13.0, 16.0]
    assert timer.times == [2.0, 3.0]  # intervals 1, 2, 3; the first is warmup
    with pytest.raises(ConfigurationError, match=r"warmup=-1"):
        harness.StepTimer(warmup=-1)


# -- real runs: tiny BERT through Trainer.fit and a plain loop -------------------------------------
class Probe(pl.Callback):
    """Records the first loss and batch checksum of a run, and how many batches it trained."""

    def __init__(self, log: list[dict[str, Any]]) -> None:
        self.entry: dict[str, Any] = {"batches": 0}
        log.append(self.entry)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.entry["batches"] == 0:
            self.entry.update(loss=float(outputs["loss"]), batch_sum=int(batch["input_ids"].sum()))
        self.entry["batches"] += 1


def test_interleave_tiny_bert_variants(harness, mlm_data, capsys):
    order: list[str] = []
    log: dict[str, list[dict[str, Any]]] = {"masked head": [], "full head": []}
    calls: list[int] = []

    def lightning(name: str, masked_only: bool) -> Any:
        order.append(name)
        module = BertMLM(vocab_size=mlm_data.vocab_size, preset="tiny", max_length=17, head_on_masked_only=masked_only)
        return harness.LightningJob(module, mlm_data, [Probe(log[name])], {"accelerator": "cpu"})

    def plain() -> Any:
        order.append("plain")
        calls.append(0)
        weight = torch.randn(8, 8)

        def step() -> None:
            calls[-1] += 1
            weight.mul_(0.5)

        return step

    variants = [
        harness.Variant("masked head", lambda: lightning("masked head", True)),
        harness.Variant("full head", lambda: lightning("full head", False)),
        harness.Variant("plain", plain),
    ]
    times = harness.interleave(variants, rounds=2, steps=2, warmup=1)
    assert set(times) == {"masked head", "full head", "plain"}
    assert all(len(per_round) == 2 and all(len(steps) == 2 for steps in per_round) for per_round in times.values())
    assert all(t > 0 for per_round in times.values() for steps in per_round for t in steps)
    assert order == ["masked head", "full head", "plain", "full head", "plain", "masked head"]  # rotated per round
    assert calls == [3, 3]  # warmup + steps per plain run
    runs = log["masked head"] + log["full head"]
    assert [run["batches"] for run in runs] == [4] * 4  # warmup + steps + 1 (the extra start closes the last step)
    # Same seed for every run: same first batch and weights, so both heads give the same first loss every round.
    assert len({run["batch_sum"] for run in runs}) == 1
    assert all(abs(run["loss"] - runs[0]["loss"]) < 1e-5 for run in runs)
    assert capsys.readouterr().out.count("round ") == 2

    result = harness.report(times, baseline="full head", metric="throughput")
    assert set(result["variants"]) == {"masked head", "full head", "plain"}
    expected = {"median_step_s", "ratio", "ratio_min", "ratio_max", "ratio_q1", "ratio_q3", "round_ratios", "rounds"}
    expected.add("steps")
    assert all(set(numbers) == expected for numbers in result["variants"].values())
    assert result["variants"]["full head"]["ratio"] == 1.0 and result["variants"]["plain"]["steps"] == 4


def test_harness_arguments_and_json(harness, tmp_path):
    parser = harness.harness_arguments(
        "demo: the claim\n\nDetails that --help leaves out.", rounds=2, steps=5, warmup=1
    )
    assert parser.description == "demo: the claim"  # a script passes its __doc__; --help shows the first paragraph
    args = parser.parse_args(["--json", str(tmp_path / "out" / "r.json")])
    assert (args.rounds, args.steps, args.warmup, args.threads) == (2, 5, 1, None)
    harness.write_json(args.json, {"ratio": 1.5})
    assert json.loads((tmp_path / "out" / "r.json").read_text()) == {"ratio": 1.5}
    harness.write_json(None, {"ratio": 1.5})  # no --json: nothing written, no error


def test_reached_finds_the_first_validation_at_the_target() -> None:
    jobs = importlib.import_module("benchmarks.jobs")
    summary = {
        "history": [{"step": s, "value": v, "train_time_s": 10.0 * s} for s, v in ((2, 5.0), (4, 3.0), (6, 2.0))]
    }
    assert jobs.reached(summary, 3.5) == (4, 40.0)  # loss: first at or below
    assert jobs.reached(summary, 1.0) == (None, None)
    assert jobs.reached(summary, 4.0, mode="max") == (2, 20.0)  # accuracy: first at or above
    with pytest.raises(ConfigurationError, match=r"mode='up' is unknown"):
        jobs.reached(summary, 1.0, mode="up")


# -- the scripts, smallest settings -----------------------------------------------------------------
SCRIPTS = {
    "activation_checkpointing": (["--memory", "in-process"], {"variants", "passed", "checks"}),
    "depth": (
        ["--train-steps", "4", "--val-every", "2", "--val-batches", "1"],
        {"timing", "final", "verdicts", "realised_keep"},
    ),
    "lightning_overhead": ([], {"variants", "passed", "target"}),
    "mfu": (["--sizes", "32", "--matmul-repeats", "1"], {"mfu", "flops_per_step", "peak_flops_per_s", "passed"}),
    "mlm_head": (["--check-batches", "2"], {"variants", "passed", "max_loss_difference"}),
    "pruning_overhead": ([], {"variants", "passed"}),
    "pruning_vs_lightning": (
        [
            "--epoch-steps",
            "2",
            "--train-steps",
            "4",
            "--val-batches",
            "1",
            "--after-resume",
            "1",
            "--sparsities",
            "0.5",
        ],
        {"resume", "overhead", "accuracy", "passed", "lightning_loses"},
    ),
    "sparse_training": (
        [
            "--train-steps",
            "4",
            "--classify-steps",
            "2",
            "--val-batches",
            "1",
            "--sparsities",
            "0.5",
            "--overhead-update-every",
            "2",
            "--inference-repeats",
            "1",
        ],
        {"parts", "mlm", "classify", "overhead", "inference", "lottery"},
    ),
    "token_dropping": (
        ["--train-steps", "4", "--val-every", "2", "--val-batches", "1"],
        {"timing", "final", "verdicts", "flops_ratio", "layers"},
    ),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_smoke_run(name, harness, user_files, tmp_path):
    extra, keys = SCRIPTS[name]
    tiny = ["--preset", "tiny", "--train-files", user_files["txt"], "--vocab-size", "300", "--max-length", "17",
            "--batch-size", "4", "--rounds", "1", "--steps", "1", "--warmup", "0"]  # fmt: skip
    result = run_script(name, [*tiny, *extra, "--json", str(tmp_path / "result.json")])
    assert keys <= set(result)
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))


def test_data_scale_script_smoke_run(harness, user_files, tmp_path, monkeypatch):
    """The training tokens/s part in this process; the corpus, memory and today's-path parts run processes of minutes."""
    monkeypatch.setenv("LIGHTNING_EFFICIENT_CACHE", str(tmp_path / "cache"))
    tiny = ["--preset", "tiny", "--train-files", user_files["txt"], "--vocab-size", "300", "--max-length", "17",
            "--batch-size", "4", "--rounds", "1", "--steps", "1", "--warmup", "0", "--loader-batches", "2"]  # fmt: skip
    argv = [*tiny, "--parts", "throughput", "--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "r.json")]
    result = run_script("data_scale", argv)
    assert {"throughput", "verdicts"} <= set(result)
    assert set(result["throughput"]["variants"]) == {"today's path (list)", "new path (Arrow rows)"}


def test_quantization_script_smoke_run(harness, user_files, tmp_path):
    args = ["--presets", "tiny", "--preset", "tiny", "--vocab-size", "300", "--max-length", "17", "--batch-size", "4",
            "--rounds", "1", "--steps", "1", "--warmup", "0", "--prefix-steps", "2", "--qat-steps", "2", "--val-batches", "1",
            "--train-files", user_files["jsonl"], "--text-column", "sentence", "--label-column", "category", "--no-label-map",
            "--json", str(tmp_path / "result.json")]  # fmt: skip
    result = run_script("quantization", args)
    tiny = result["inference"]["tiny"]
    assert set(tiny["variants"]) == {"fp32", "fp32, compiled", "ours int8", "ours int8, eager", "ours int8 per token",
                                     "ours Intx (asymmetric per token)", "torch.ao quantize_dynamic"}  # fmt: skip
    assert max(tiny["max_logit_differences"].values()) <= 1e-4  # converted equals fake-quantized, compiled eager
    assert tiny["sizes"]["ours int8"] < tiny["sizes"]["fp32"]
    assert set(result["accuracy"]) >= {"accuracy_fp32", "accuracy_qat_int8", "accuracy_ptq_int8", "qat_drop_points"}


def test_importance_sampling_script_smoke_run(harness, user_files, tmp_path):
    args = ["--preset", "tiny", "--train-steps", "3", "--val-every", "2", "--val-batches", "1", "--vocab-size", "300",
            "--max-length", "17", "--batch-size", "4", "--image-batch-size", "8", "--train-files", user_files["jsonl"],
            "--text-column", "sentence", "--label-column", "category", "--json", str(tmp_path / "result.json")]  # fmt: skip
    result = run_script("importance_sampling", args)
    assert set(result["tasks"]) == {"genre", "fashion"}
    for entry in result["tasks"].values():
        assert entry["always"]["sampled_fraction"] == 1.0  # tau_threshold 0: every step sampled
        assert (
            entry["always"]["speedup_estimate"] is not None and entry["importance"]["threshold"] == 2.0
        )  # (3b + 3b) / 3b
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))


def test_distillation_script_smoke_run(harness, user_files, tmp_path, monkeypatch):
    # transfer sets and logits of this run only
    monkeypatch.setenv("LIGHTNING_EFFICIENT_CACHE", str(tmp_path / "cache"))
    args = ["--teacher-preset", "tiny", "--teacher-steps", "3", "--vocab-size", "300", "--max-length", "17",
            "--sources", "40", "--n-iter", "2", "--student-steps", "3", "--student-batch", "8", "--val-every", "2",
            "--seeds", "0", "--rules", "labels only", "KD + all", "--rounds", "1", "--steps", "1", "--warmup", "0",
            "--train-files", user_files["jsonl"], "--text-column", "sentence", "--label-column", "category",
            "--no-label-map", "--json", str(tmp_path / "result.json")]  # fmt: skip
    result = run_script("distillation", args)
    assert set(result["students"]) == {"labels only", "KD + all"}
    assert result["students"]["KD + all"]["examples"] > result["students"]["labels only"]["examples"] == 40
    assert result["cache"]["first_epoch_s"] > 0 and set(result["inference"]) == {"batch_1", "batch_32", "parameters"}
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))


def test_sequence_distillation_script_smoke_run(harness, user_files, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_EFFICIENT_CACHE", str(tmp_path / "cache"))
    args = ["--preset", "tiny", "--teacher-layers", "2", "--teacher-steps", "2", "--student-steps", "2",
            "--train-pairs", "12", "--vocab-size", "300", "--max-length", "32", "--batch-size", "4", "--num-beams", "2",
            "--test-batches", "1", "--train-file", user_files["pairs"], "--source-column", "src", "--target-column", "tgt",
            "--json", str(tmp_path / "result.json")]  # fmt: skip
    result = run_script("sequence_distillation", args)
    assert result["teacher"]["layers"] == 2 and result["sequence_kd"]["layers"] == result["references"]["layers"] == 1
    assert set(result["verdicts"]) == {"kept_fraction", "kept_pass", "beats_references"}
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))


@pytest.mark.parametrize("command", [["benchmarks/pruning_overhead.py"], ["-m", "benchmarks.pruning_overhead"]])
def test_scripts_run_as_files_and_as_modules(command: list[str]) -> None:
    """``python benchmarks/x.py`` (the README's commands) and ``python -m benchmarks.x`` both import the package."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, *command, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--max-overhead" in done.stdout and "--rounds" in done.stdout and "--train-files" in done.stdout


def test_pipeline_overhead_script_smoke_run(tmp_path):
    """One round on a one-stage pipeline of a few steps: both timings, their ratio, the JSON."""
    from benchmarks import pipeline_overhead

    pipeline = tmp_path / "one.yaml"
    pipeline.write_text(
        f"name: one\nstages:\n  - name: a\n    config: {ROOT / 'configs/bert/tiny_mlm.yaml'}\n    measure: false\n"
        "    overrides: {trainer.max_steps: 2, trainer.limit_val_batches: 1, trainer.val_check_interval: 2}\n"
    )
    result = pipeline_overhead.main(["--pipeline", str(pipeline), "--rounds", "1", "--json", str(tmp_path / "r.json")])
    (round_,) = result["rounds"]
    assert round_["pipeline"] > 0 and round_["by hand"] > 0
    assert result["ratio"] == pytest.approx(round_["pipeline"] / round_["by hand"])
    assert json.loads((tmp_path / "r.json").read_text())["ratio"] == pytest.approx(result["ratio"])


def test_initialization_script_smoke_run(harness, user_files, tmp_path):
    """Two schemes through the three parts; an LR of 1e30 makes every sweep run diverge (the guard stops it)."""
    args = ["--preset", "tiny", "--train-files", user_files["txt"], "--vocab-size", "300", "--max-length", "17",
            "--batch-size", "4", "--rounds", "1", "--steps", "1", "--warmup", "0", "--train-steps", "4", "--val-every",
            "2", "--val-batches", "1", "--schemes", "rezero", "deepnorm", "--sweep-steps", "2", "--lrs", "1e-3", "1e30",
            "--json", str(tmp_path / "result.json")]  # fmt: skip
    result = run_script("initialization", args)
    assert set(result["timing"]["variants"]) == {"default", "rezero", "deepnorm"}
    assert set(result["final"]) == {"default", "default_no_warmup", "rezero", "deepnorm"}
    assert not result["diverged"] and all(isinstance(loss, float) for loss in result["final"].values())
    assert [s["run_name"] for s in result["summaries"]] == ["default", "default_no_warmup", "rezero", "deepnorm"]
    assert {"rezero_step_time", "deepnorm_step_time", "best_time_to_target"} <= set(result["verdicts"])
    assert set(result["sweep"]) == {"default_no_warmup", "rezero", "deepnorm"}
    for row in result["sweep"].values():
        assert isinstance(row["0.001"], float) and row["1e+30"] == "diverged"
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))


def test_initialization_translation_script_smoke_run(harness, user_files, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_EFFICIENT_CACHE", str(tmp_path / "cache"))
    args = ["--preset", "tiny", "--steps", "3", "--test-batches", "1", "--vocab-size", "300",
            "--max-length", "32", "--batch-size", "4", "--train-file", user_files["pairs"], "--source-column", "src",
            "--target-column", "tgt", "--json", str(tmp_path / "result.json")]  # fmt: skip
    result = run_script("initialization_translation", args)
    assert set(result["runs"]) == {"default with warmup", "default without warmup", "t_fixup without warmup"}
    for numbers in result["runs"].values():
        assert math.isfinite(numbers["test_loss"]) and 0 <= numbers["bleu"] <= 100
    assert result["pass"] is None  # 3 steps: BLEU below 1, so no verdict
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))


def test_adapters_script_smoke_run(harness, user_files, tmp_path):
    """Every part at the smallest settings: LoRA's checkpoint reloads, a merge keeps a pruned base's zeros exactly."""
    args = ["--preset", "tiny", "--train-files", user_files["txt"], "--vocab-size", "300", "--max-length", "17",
            "--batch-size", "4", "--rounds", "1", "--steps", "1", "--warmup", "0", "--pretrain-steps", "2",
            "--finetune-steps", "2", "--vit-pretrain-steps", "2", "--vit-steps", "2", "--image-batch-size", "8",
            "--latency-rounds", "1", "--latency-steps", "1", "--latency-warmup", "0",
            "--classify-files", user_files["jsonl"], "--text-column", "sentence", "--label-column", "category",
            "--no-label-map", "--work-dir", str(tmp_path / "work"), "--json", str(tmp_path / "result.json")]  # fmt: skip
    result = run_script("adapters", args)
    assert result["parts"] == ["pretrain", "bert", "vit", "pruned", "int8"]
    for task in ("bert", "vit"):
        full, lora = result[task]["runs"]["full fine-tuning"], result[task]["runs"]["LoRA r=8"]
        assert lora["trainable_parameters"] < full["trainable_parameters"]
        assert lora["optimizer_state_bytes"] < full["optimizer_state_bytes"]
        assert lora["checkpoint_bytes"] < full["checkpoint_bytes"]
        assert result[task]["reloaded_accuracy"] == lora["accuracy"]  # the adapter-only checkpoint is the whole model
    pruned = result["pruned"]
    assert pruned["zeros_kept"] and pruned["sparsity_after_merge"] == pruned["sparsity_before"]
    assert pruned["sparsity_before"]["adapted"] == pytest.approx(0.5, abs=0.01)
    assert pruned["sparsity_after_dense_merge"]["adapted"] < pruned["sparsity_before"]["adapted"]  # the dense update
    assert pruned["sparse_update"]["zeros_kept"]
    assert pruned["sparse_update"]["accuracy_merged"] == pruned["sparse_update"]["accuracy_unmerged"]
    assert result["int8"]["accuracy"].keys() == {
        "int8 base + adapter (unmerged)", "int8, merged and re-quantized", "fp32, merged"
    }  # fmt: skip
    assert set(result["int8"]["latency"]) == {"batch_1", "batch_32"}
    assert {"bert/accuracy", "vit/checkpoint", "pruned/zeros_kept", "int8/latency"} <= set(result["verdicts"])
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))


def test_vit_progressive_script_smoke_run(harness, tmp_path):
    """Every part at the smallest settings: the ratios are real numbers, the counted FLOPs match the analytic ones."""
    args = ["--threads", "1", "--train-steps", "28", "--val-every", "2", "--val-batches", "1", "--batch-size", "8",
            "--hidden-size", "32", "--ffn-size", "37", "--num-layers", "2", "--image-size", "32", "--search-steps", "1",
            "--mogrow-steps", "6", "--work-dir", str(tmp_path / "work"), "--json", str(tmp_path / "result.json")]  # fmt: skip
    result = run_script("vit_progressive", args)
    assert result["parts"] == ["resolution", "native", "mogrow", "flops"]
    resolution = result["resolution"]
    assert set(resolution["runs"]) == {"baseline", "progressive_resizing", "autoprog", "progressive_resizing_equal_time",
                                       "autoprog_equal_time"}  # fmt: skip
    for name in ("progressive_resizing", "autoprog"):
        numbers = resolution["results"][name]
        for key in ("wall_clock_ratio", "throughput_ratio", "flops_ratio"):
            assert math.isfinite(numbers[key]) and numbers[key] > 0
        assert numbers["flops_ratio"] < 1  # smaller images (and, for AutoProg, fewer blocks) part of the run
        equal = numbers["equal_time"]
        assert equal["steps"] == resolution["runs"][f"{name}_equal_time"]["steps"] >= 1
        assert math.isfinite(equal["time_ratio"]) and equal["time_ratio"] > 0
        assert isinstance(result["verdicts"][f"{name}/time_to_target"], bool)
        assert isinstance(result["verdicts"][f"{name}/equal_time_accuracy"], bool)
    choices = resolution["autoprog_choices"]["autoprog"]
    assert choices and all(0 <= entry["chosen"] < len(entry["candidates"]) for entry in choices)
    native = result["native"]["results"]
    assert all(math.isfinite(native[key]) and native[key] > 0 for key in ("wall_clock_ratio", "throughput_ratio"))
    mogrow = result["mogrow"]
    assert set(mogrow["runs"]) == {"copy", "momentum"}
    copy, momentum = mogrow["runs"]["copy"], mogrow["runs"]["momentum"]
    for key in ("loss", "accuracy"):  # the inits differ only from the growth on
        assert copy["val_before_growth"][key] == momentum["val_before_growth"][key]
    assert copy["loss_before_growth"] == momentum["loss_before_growth"]
    assert math.isfinite(momentum["loss_first_step_after_growth"]) and math.isfinite(momentum["loss_mean_after_growth"])
    sides = result["flops"]["sides"]
    assert set(sides) == {"16", "24", "32"} and all(numbers["ratio"] == 1.0 for numbers in sides.values())
    assert result["flops"]["exact"]
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))


def test_gpu_check_script_smoke_run(harness, user_files, tmp_path):
    """``--device cpu --smoke`` on a few fragments: a callback, an optimizer, a ViT schedule shortened to fit, a skip."""
    with pytest.raises(SystemExit):  # without --smoke the check refuses the CPU
        run_script("gpu_check", ["--device", "cpu"])
    only = ["activation_checkpointing", "lion", "autoprog", "bf16_mixed"]
    args = ["--device", "cpu", "--smoke", "--only", *only, "--train-files", user_files["txt"], "--vocab-size", "300",
            "--max-length", "17", "--batch-size", "4", "--out", str(tmp_path)]  # fmt: skip
    result = run_script("gpu_check", args)
    assert result["memory"] == "skipped: no CUDA" and result["smoke"]
    assert 0 < result["mfu"]["mfu"] < math.inf and result["mfu"]["flops_per_step"] > 0
    fragments = result["techniques"]["fragments"]
    assert set(fragments) == set(only) and fragments["bf16_mixed"]["verdict"].startswith("skipped: no callback")
    assert fragments["lion"]["classes"] == ["Lion"] and fragments["autoprog"]["family"] == "vit"
    for name in ("activation_checkpointing", "lion", "autoprog"):
        runs = fragments[name]["runs"]
        assert fragments[name]["verdict"] == "ok" and set(runs) == {"32-true", "bf16-mixed"}, runs
        assert all(run["steps"] == 10 and math.isfinite(run["final_loss"]) for run in runs.values())
        assert runs["bf16-mixed"]["relative_difference"] <= result["techniques"]["tolerance"]
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == json.loads(json.dumps(result))
    assert "| autoprog | vit |" in (tmp_path / "gpu_check.md").read_text()


def test_compile_script_smoke_run(harness, user_files, tmp_path):
    args = ["--preset", "tiny", "--train-files", user_files["txt"], "--vocab-size", "300", "--max-length", "17",
            "--batch-size", "4", "--rounds", "1", "--steps", "1", "--warmup", "2", "--backend", "aot_eager",
            "--techniques", "pruning", "--profile", "always", "--profile-rows", "5",
            "--json", str(tmp_path / "result.json")]  # fmt: skip
    result = run_script("compile", args)
    assert set(result["variants"]) == {"eager", "compiled", "pruning eager", "pruning compiled"}
    for numbers in result["comparisons"].values():
        assert math.isfinite(numbers["ratio"]) and numbers["ratio"] > 0 and numbers["graphs"] > 0
    assert set(result["profiles"]) == {"compiled", "eager"} and len(result["profiles"]["compiled"]["top"]) == 5
    assert isinstance(result["passed"], bool) and result["backend"] == "aot_eager"
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))


# -- pruning_export.py: the speedup on padded and on full-length rows --------------------------------
def test_full_length_batch_packs_the_examples_real_tokens_into_full_rows():
    from benchmarks.pruning_export import full_length_batch

    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    ids = torch.arange(1, 16).view(3, 5) * mask  # padding ids 0
    full = full_length_batch({"input_ids": ids, "attention_mask": mask}, 7)
    stream = [1, 2, 3, 6, 7, 8, 9, 10, 11, 12]  # each example's unpadded ids, in turn, then again
    expected = (stream * 3)[:21]
    assert full["input_ids"].tolist() == [expected[0:7], expected[7:14], expected[14:21]]
    assert full["attention_mask"].shape == (3, 7) and bool(full["attention_mask"].all())


def test_pruning_export_script_smoke_run(harness, user_files, tmp_path):
    args = ["--preset", "tiny", "--vocab-size", "300", "--max-length", "96", "--batch-size", "4", "--infer-batch", "3",
            "--rounds", "1", "--steps", "1", "--warmup", "0", "--dense-steps", "2", "--prune-steps", "2",
            "--frequency", "1", "--val-batches", "1", "--train-files", user_files["jsonl"], "--text-column", "sentence",
            "--label-column", "category", "--no-label-map", "--json", str(tmp_path / "result.json")]  # fmt: skip
    result = run_script("pruning_export", args)
    timing = result["timing"]
    assert set(timing) == set(result["speedup"]) == set(result["passed_shapes"]) == {"padded", "full_length"}
    assert timing["full_length"]["rows"] == timing["padded"]["rows"] == 3
    assert timing["full_length"]["positions"] == 96 and timing["full_length"]["tokens"] == 3 * 96  # no padding
    assert timing["padded"]["tokens"] < 3 * timing["padded"]["positions"] < 3 * 96  # the loader's padded rows
    for shape, numbers in timing.items():
        assert numbers["variants"]["exported (pruned)"]["ratio"] == result["speedup"][shape] > 0
    assert (
        result["max_logit_difference"] < 1e-4 and result["block_parameters_after"] < result["block_parameters_before"]
    )
    assert result["passed"] == (all(result["passed_shapes"].values()) and result["max_logit_difference"] < 1e-4)
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))


# -- monitor_overhead.py: the monitor on and off within one fit ---------------------------------------
def test_monitor_schedule_balances_the_arms_in_a_b_b_a_rounds():
    from benchmarks.monitor_overhead import monitor_on, round_ratios

    warmup, segment, rounds = 3, 2, 4
    pattern = [monitor_on(b, warmup, segment) for b in range(warmup + 4 * segment * rounds)]
    assert pattern[:warmup] == [True, False, True]
    a, b = [True] * segment, [False] * segment
    assert pattern[warmup:] == [*a, *b, *b, *a, *b, *a, *a, *b] * 2
    times = [float(i % 7 + 1) for i in range(len(pattern))]
    ratios = round_ratios(times, warmup, segment, rounds)
    for r, ratio in enumerate(ratios):  # monitor-on time / monitor-off time over each round
        batches = range(warmup + 8 * r, warmup + 8 * (r + 1))
        on = sum(times[i] for i in batches if pattern[i])
        assert ratio == pytest.approx(on / (sum(times[i] for i in batches) - on))


def test_bootstrap_interval_brackets_the_median():
    from benchmarks.monitor_overhead import bootstrap_interval

    values = [1.0 + 0.01 * ((7 * i) % 11 - 5) for i in range(40)]
    low, high = bootstrap_interval(values)
    assert low < statistics.median(values) < high and min(values) < low and high < max(values)
    assert bootstrap_interval([1.02] * 5) == (1.02, 1.02)


def test_monitor_overhead_script_smoke_run(harness, user_files, tmp_path):
    tiny = ["--preset", "tiny", "--train-files", user_files["txt"], "--vocab-size", "300", "--max-length", "17",
            "--batch-size", "4", "--warmup", "1", "--forward-reps", "1"]  # fmt: skip
    with pytest.raises(ConfigurationError, match="multiple of --log-every"):
        run_script("monitor_overhead", [*tiny, "--rounds", "1", "--steps", "3", "--log-every", "2"])
    argv = [*tiny, "--rounds", "3", "--steps", "2", "--log-every", "2", "--json", str(tmp_path / "result.json")]
    result = run_script("monitor_overhead", argv)
    for name in ("wall", "cpu"):  # the wall-clock verdict, the process CPU time beside it
        measure = result[name]
        assert len(measure["round_ratios"]) == 3 and measure["ratio"] == statistics.median(measure["round_ratios"])
        assert min(measure["round_ratios"]) <= measure["low"] <= measure["ratio"] <= measure["high"]
        assert measure["on_s"] > 0 and measure["off_s"] > 0
    assert (result["ratio"], result["ratio_low"], result["ratio_high"]) == tuple(
        result["wall"][key] for key in ("ratio", "low", "high")
    )
    assert result["passed"] == (result["ratio_high"] - 1 <= 0.01) and result["verdict"] in {"PASS", "FAIL", "UNDECIDED"}
    assert result["log_every_n_steps"] == 2 and result["logger"] == "tensorboard" and result["calls_per_forward"] > 0
    assert result["estimate_share"] == pytest.approx(
        (result["hook_s_per_step"] + result["counter_s_per_step"]) / result["wall"]["off_s"]
    )
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))


def test_alternating_monitor_counts_and_logs_only_on_its_steps(harness, tmp_path):
    """Off steps run no monitor work and log none of its metrics (Lightning would re-log the last values)."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from benchmarks.monitor_overhead import AlternatingMonitor, monitor_on

    rows = [{"input_ids": torch.randint(5, 50, (8,)), "attention_mask": torch.ones(8, dtype=torch.long)}] * 16
    loader = torch.utils.data.DataLoader(rows, batch_size=2)
    monitor = AlternatingMonitor(lambda b: monitor_on(b, 0, 1), peak_flops=1e11)
    trainer = harness.benchmark_trainer(
        accelerator="cpu", max_steps=8, log_every_n_steps=1, logger=CSVLogger(tmp_path), callbacks=[monitor]
    )
    trainer.fit(BertMLM(vocab_size=50, preset="tiny"), loader)
    on = [b for b in range(8) if monitor_on(b, 0, 1)]
    assert on == [0, 3, 5, 6] and sorted(monitor.hook_seconds) == on
    assert all(seconds > 0 for seconds in monitor.hook_seconds.values())
    assert monitor.summary["samples"] == 2 * len(on) and monitor.summary["tokens"] == 16 * len(on)  # its steps only
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv", encoding="utf-8") as handle:
        logged = [int(row["step"]) for row in csv.DictReader(handle) if row["efficiency/mfu"]]
    assert logged == on
