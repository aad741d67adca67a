"""``lightning-efficient plan`` against real runs: FLOPs, peak memory, step time and the plan's own wall-clock.

Claim measured: for BERT-small MLM (``configs/bert/small_mlm.yaml``) alone, with
``configs/techniques/layer_drop.yaml`` and with ``configs/techniques/activation_checkpointing.yaml``,
:func:`lightning_efficient.plan.build_plan` (a) counts the FLOPs the ``EfficiencyMonitor`` counts on
the real steps (within 5%), (b) estimates the peak memory within 25% and (c) the step time, and (d)
``lightning-efficient plan`` (Python, imports, config, plan) takes <= 15 s.

Each variant runs in fresh Python processes, one per measurement, so that memory peaks do not mix
(``--trainer.max_steps`` is ``--steps`` everywhere, the run writes into a temporary directory):

1. plan: ``EfficientCLI(args=[...], run=False)`` builds the run (timed: "config s"), then
   ``build_plan`` (timed: "plan s", data setup included); records its figures. "process s" is the
   whole process, as ``lightning-efficient plan`` would take it.
2. fit: the same build, then ``trainer.fit``: the monitor's FLOPs of every step (read after its
   ``on_train_batch_end``), the step times (between consecutive ``on_train_batch_start``; the first
   ``--warmup`` steps dropped, median) and the monitor's ``peak_memory_bytes`` (the process's peak
   RSS since ``fit`` started).
3. fit, working set: the same fit with ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment, so that
   glibc returns freed memory instead of keeping it in a fragmenting heap: the peak RSS is then the
   run's working set, the quantity the plan estimates. With glibc's default the RSS keeps growing
   over a run (BERT-small: ~2.5 GB after 20 steps, ~3.8 GB after 200, for a ~1.6 GB working set),
   so the default-allocator peak depends on the run's length; both are reported.

Ratios are plan / measured. FLOPs: the run's total (the plan's schedule summed over ``--steps``
steps against the monitor's sum: LayerDrop's drops are random, so its ratio moves by a few percent)
and step 0 (exact for all three: PLD keeps every block at step 0). Time: the plan's mean step
time against the measured median step time (noisy machine: +-20%).

Command (about 5 minutes on 2 cores; nothing else heavy should run meanwhile):

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/plan.py --json /tmp/plan_benchmark.json

Measured (Xeon, 2 cores, 393 GFLOP/s fp32 peak; 20 steps; ratios plan / measured)::

    variant                     FLOPs total  step 0  peak RSS  ratio  working set  ratio  step s  ratio  process s
    bert small mlm                    0.996   1.000   2.48 GB   0.68      1.63 GB   1.03   0.999   0.91       11.5
    + layer_drop                      0.994   1.000   2.27 GB   0.74      1.63 GB   1.03   0.778   1.31       11.5
    + activation_checkpointing        0.996   1.000   2.07 GB   0.62      1.25 GB   1.03   1.060   0.99       11.6

FLOPs and the working set are met; the default-allocator peak RSS after 20 steps is not (it grows
with the run's length, see 3.); step times move by +-30% between processes on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl

from benchmarks.harness import write_json

ROOT = Path(__file__).resolve().parents[1]
RECORD_TAG = "PLAN-BENCHMARK-RECORD "  # prefix of the line a worker process prints its record on
VARIANTS: dict[str, list[str]] = {
    "bert small mlm": [],
    "+ layer_drop": ["configs/techniques/layer_drop.yaml"],
    "+ activation_checkpointing": ["configs/techniques/activation_checkpointing.yaml"],
}
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc: every allocation over 128 KiB is mmapped and returned


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the claim's setting."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--config", default="configs/bert/small_mlm.yaml", help="the base config")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of every run (and of the plan)")
    parser.add_argument("--warmup", type=int, default=3, help="leading steps left out of the measured step time")
    parser.add_argument("--no-working-set", action="store_true", help="skip the fits with a fixed mmap threshold")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--worker", choices=("plan", "fit"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fragments", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    return args


# -- worker processes ----------------------------------------------------------------------------
def build_run(args: argparse.Namespace) -> Any:
    """The run of ``--config`` + ``--fragments`` as ``lightning-efficient fit`` builds it, writing under ``--root``."""
    from lightning_efficient.cli import EfficientCLI

    files = [str(ROOT / path) for path in [args.config, *args.fragments]]
    cli_args = [arg for path in files for arg in ("-c", path)]
    cli_args += ["--trainer.default_root_dir", str(Path(args.root) / "run"), "--trainer.max_steps", str(args.steps)]
    cli_args += ["--trainer.enable_progress_bar", "false"]
    return EfficientCLI(args=cli_args, run=False)


def plan_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build the run and its plan; the plan's figures and both wall-clocks."""
    started = time.perf_counter()
    cli = build_run(args)
    built = time.perf_counter()
    from lightning_efficient.plan import build_plan

    run = {"name": "run", "directory": str(Path(args.root) / "run"), "writes": {}, "existing_checkpoint": None}
    plan = build_plan(cli.trainer, cli.model, cli.datamodule, run, [], [])
    print(plan.text(), file=sys.stderr)
    return {"config_s": built - started, "plan_s": plan.seconds, "plan": plan.to_dict()}


class StepRecorder(pl.Callback):
    """After the monitor: its FLOPs of every step, and the time at every batch start."""

    def __init__(self, monitor: pl.Callback) -> None:
        self.monitor = monitor
        self.flops: list[float] = []
        self.starts: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.flops.append(float(self.monitor.last_step["flops"]))
        if trainer.global_step >= trainer.max_steps:  # close the last step's interval
            self.starts.append(time.perf_counter())


def fit_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build the run and train it: the monitor's per-step FLOPs and peak memory, and the step times."""
    from lightning_efficient.monitor import EfficiencyMonitor, process_memory

    cli = build_run(args)
    monitor = next(cb for cb in cli.trainer.callbacks if isinstance(cb, EfficiencyMonitor))
    recorder = StepRecorder(monitor)
    cli.trainer.callbacks.append(recorder)
    cli.datamodule.setup("fit")
    before = process_memory("VmRSS") or 0
    cli.trainer.fit(cli.model, cli.datamodule)
    times = [end - start for start, end in zip(recorder.starts, recorder.starts[1:])]
    summary = monitor.summary
    return {
        "rss_before_fit": before,
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "memory_kind": summary["memory_kind"],
        "step_flops": recorder.flops,
        "step_times": times,
    }


def run_worker(kind: str, fragments: list[str], args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """Run a ``--worker`` process; its record."""
    with tempfile.TemporaryDirectory() as root:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--root", root]
        command += ["--config", args.config, "--steps", str(args.steps), "--fragments", *fragments]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, **env})
        wall = time.perf_counter() - started
    records = [line[len(RECORD_TAG) :] for line in done.stdout.splitlines() if line.startswith(RECORD_TAG)]
    if done.returncode != 0 or not records:
        raise RuntimeError(f"the {kind} process of {fragments or 'the base config'} failed:\n{done.stderr[-3000:]}")
    if kind == "plan":
        print(done.stderr[done.stderr.rfind("Run run") :].rstrip())
    return {**json.loads(records[-1]), "process_s": wall}


# -- comparison ----------------------------------------------------------------------------------
def compare(plan: dict[str, Any], fit: dict[str, Any], working: dict[str, Any] | None, warmup: int) -> dict[str, Any]:
    """The plan's figures against the measured ones (ratios are plan / measured)."""
    figures = plan["plan"]
    steps = len(fit["step_flops"])
    measured_step = statistics.median(fit["step_times"][warmup:])
    planned_step = figures["time"]["total_s"] / figures["total_steps"]
    estimate = figures["memory"]["estimate_bytes"]
    numbers = {
        "config_s": plan["config_s"],
        "plan_s": plan["plan_s"],
        "plan_process_s": plan["process_s"],
        "flops_total_plan": figures["flops"]["total"],
        "flops_total_monitor": sum(fit["step_flops"]),
        "flops_total_ratio": figures["flops"]["total"] / sum(fit["step_flops"]),
        "flops_step0_ratio": figures["flops"]["schedule"][0]["flops"] / fit["step_flops"][0],
        "memory_estimate_bytes": estimate,
        "memory_parts": figures["memory"]["parts"],
        "peak_rss_bytes": fit["peak_memory_bytes"],
        "memory_ratio": estimate / fit["peak_memory_bytes"],
        "step_s_plan": planned_step,
        "step_s_measured": measured_step,
        "step_s_lower_bound": figures["time"]["total_lower_bound_s"] / figures["total_steps"],
        "time_ratio": planned_step / measured_step,
        "steps": steps,
    }
    if working is not None:
        numbers["working_set_peak_bytes"] = working["peak_memory_bytes"]
        numbers["working_set_ratio"] = estimate / working["peak_memory_bytes"]
        numbers["working_set_step_s"] = statistics.median(working["step_times"][warmup:])
    return numbers


def print_table(results: dict[str, dict[str, Any]]) -> None:
    header = ["variant", "FLOPs total", "step 0", "mem est GB", "peak RSS", "ratio", "working set", "ratio"]
    header += ["step s plan", "measured", "ratio", "lower bd", "config s", "plan s", "process s"]
    rows = [header]
    for name, n in results.items():
        working = n.get("working_set_peak_bytes")
        rows.append(
            [
                name,
                f"{n['flops_total_ratio']:.3f}",
                f"{n['flops_step0_ratio']:.3f}",
                f"{n['memory_estimate_bytes'] / 1e9:.2f}",
                f"{n['peak_rss_bytes'] / 1e9:.2f}",
                f"{n['memory_ratio']:.2f}",
                f"{working / 1e9:.2f}" if working else "-",
                f"{n['working_set_ratio']:.2f}" if working else "-",
                f"{n['step_s_plan']:.3f}",
                f"{n['step_s_measured']:.3f}",
                f"{n['time_ratio']:.2f}",
                f"{n['step_s_lower_bound']:.3f}",
                f"{n['config_s']:.1f}",
                f"{n['plan_s']:.1f}",
                f"{n['plan_process_s']:.1f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    steps = [f"{name} {n['working_set_step_s']:.3f} s" for name, n in results.items() if "working_set_step_s" in n]
    print()
    for row in rows:
        print(row[0].ljust(widths[0]) + "".join(cell.rjust(width + 2) for cell, width in zip(row[1:], widths[1:])))
    print(
        "FLOPs: plan / monitor (total over the run, and step 0); memory: plan estimate against the monitor's peak RSS "
        "(glibc default) and against the working set (MALLOC_MMAP_THRESHOLD_=131072); step s: the plan's mean step "
        "against the measured median (warmup dropped); lower bd: FLOPs / peak; config s: building the run, plan s: "
        "build_plan (data setup included), process s: the whole plan process (Python, imports, config, plan)"
    )
    if steps:
        print("median step with the fixed mmap threshold (the working-set fits): " + ", ".join(steps))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every variant's plan and fits in fresh processes; print the table; returns the numbers."""
    args = parse_args(argv)
    if args.worker:
        record = plan_worker(args) if args.worker == "plan" else fit_worker(args)
        print(RECORD_TAG + json.dumps(record))
        return record
    results: dict[str, dict[str, Any]] = {}
    for name in args.variants:
        fragments = VARIANTS[name]
        print(f"== {name}: plan, fit ({args.steps} steps), fit with a fixed mmap threshold", flush=True)
        plan = run_worker("plan", fragments, args, {})
        fit = run_worker("fit", fragments, args, {})
        working = None if args.no_working_set else run_worker("fit", fragments, args, FIXED_MMAP)
        results[name] = compare(plan, fit, working, args.warmup)
    print_table(results)
    limits = {"flops": 0.05, "memory": 0.25}
    verdict = {
        name: {
            "flops_within_5%": abs(n["flops_step0_ratio"] - 1) <= limits["flops"],
            "memory_within_25%_of_peak_rss": abs(n["memory_ratio"] - 1) <= limits["memory"],
            "memory_within_25%_of_working_set": abs(n.get("working_set_ratio", 0) - 1) <= limits["memory"],
            "plan_process_within_15_s": n["plan_process_s"] <= 15,
        }
        for name, n in results.items()
    }
    for name, checks in verdict.items():
        print(f"{name}: " + ", ".join(f"{check} {'yes' if ok else 'NO'}" for check, ok in checks.items()))
    return write_json(args.json, {"steps": args.steps, "variants": results, "verdict": verdict})


if __name__ == "__main__":
    main()
