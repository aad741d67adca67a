"""Activation checkpointing: peak memory and step time, ours (every block, every 2nd block) vs none vs HF's.

Claim measured: BERT-base shape (hidden 768, 12 layers, 12 heads, FFN 3072, 30522-token WordPiece),
MLM, batch 8 x 512 tokens, fp32, CPU: with ``ActivationCheckpointing(every=1)`` the training
process's peak memory is <= 0.5x that of the same job without checkpointing, and a step takes
<= 1.4x as long; ``every=2`` gives a point in between; and ours is at least as good as HF's own
``activation_checkpointing_enable()`` (``gradient_checkpointing_enable()`` before transformers 5)
on the same model in both memory and time (within ``--tie``, for noise: the mechanism is the same).

Four variants of one Lightning job (``BertMLM`` + ``MLMDataModule`` through ``Trainer.fit``, the
package's masked-only MLM head, AdamW), each a fresh model from the same seed:
``none`` (baseline), ``ours every block``, ``ours every 2nd block``, ``HF checkpointing``.
Every run carries an ``EfficiencyMonitor``, the package's memory report: it resets the process's
peak RSS (``VmHWM``, through ``/proc/self/clear_refs``) when ``fit`` starts and reports the peak
(model, gradients, AdamW state, activations, data) at its end; with CUDA it reports the
allocator's peak (``torch.cuda.max_memory_allocated``) instead.

1. Memory (``--memory subprocess``, the default): each variant trains ``--memory-steps`` steps in a
   fresh Python process of its own, so that no variant inherits another's freed-but-resident
   memory; the ratio is variant peak / baseline peak (with ``--memory-repeats N``, the median of N
   processes each). ``--memory in-process`` reads the monitors
   of the timed runs instead (cheaper, for smoke runs): each build first collects garbage and
   returns the C allocator's free pages to the OS (``malloc_trim``), but memory the first run
   leaves resident still inflates later runs' peaks a little (the RSS at build is printed per
   run), which pushes the ratios towards 1. "Added" is the peak minus the RSS when the build
   started. The table gives each variant's median peak RSS and its range over the processes.
2. Live tensors (``--live-repeats``, subprocess mode): the peak RSS of identical processes varies
   by up to ~20% (where glibc's allocator places and returns freed blocks, which also depends on
   the intra-op threads: HF's variant gave 3.87, 4.25 and 4.62 GiB in three identical processes),
   so each variant also runs in ``--live-repeats`` fresh processes under ``torch.profiler`` with
   ``profile_memory=True``: every allocation and free of PyTorch's CPU allocator, whose running
   sum is the bytes held by live tensors (model, gradients, AdamW state, activations, the
   recompute's transients, the batch). Its peak over the process is what checkpointing controls
   and barely varies (two identical processes of 4 BERT-base layers agreed to the byte, tiny ones
   to 60 KB); the comparison with HF uses it, with 1 MiB of slack. It runs in processes
   of its own: running under the profiler raises the peak RSS (by ~0.4 GiB at 4 layers, 8 x 512).
3. Time: ``benchmarks/harness.py`` interleaves the four in rounds in this process (the order
   rotates every round); a step lasts from one ``on_train_batch_start`` to the next; the ratio is
   the median over rounds of (variant median step time / baseline median step time).

Command (the lead's real measurement: a base step is ~20 s on 2 CPU cores; with these options:
3 x 4 memory processes and 4 live-tensor processes of 2 steps each, then 2 rounds x (1 warmup +
2 timed steps) x 4 variants; about 40 minutes and ~11 GiB of RAM):

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/activation_checkpointing.py \
        --rounds 2 --steps 2 --memory-repeats 3

Smoke run: ``--preset tiny --max-length 64 --batch-size 4 --vocab-size 300 --rounds 1 --steps 1
--warmup 0 --memory in-process``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Self

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import (
    LightningJob,
    Variant,
    harness_arguments,
    interleave,
    report,
    run_variant,
    setup,
    write_json,
)
from benchmarks.jobs import mlm_arguments, mlm_data, mlm_job_line, mlm_module
from lightning_efficient import EfficiencyMonitor, MLMDataModule
from lightning_efficient.callbacks.activation_checkpointing import ActivationCheckpointing
from lightning_efficient.monitor import process_memory

NONE, EVERY, EVERY_2, HF = "none", "ours every block", "ours every 2nd block", "HF checkpointing"
VARIANTS = (NONE, EVERY, EVERY_2, HF)
MEMORY_TAG = "MEMORY-RECORD "  # prefix of the line a memory process prints its record on
GIB = 2**30
# Slack of the live-tensor comparison with HF: ours logs checkpointed_blocks (scalar tensors, 24 bytes, that HF's
# variant does not hold), and small tensors freed at varying times move a tiny run's peak by up to ~60 KB.
LIVE_SLACK = 2**20
CPU = torch.autograd.DeviceType.CPU  # the device of the profiler's memory events that LiveTensorPeak sums


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the claim's setting (BERT-base, 8 x 512, fp32)."""
    parser = harness_arguments(__doc__, rounds=2, steps=2, warmup=1)
    mlm_arguments(parser, preset="base", batch_size=8, max_length=512)  # the claim's BERT-base, 8 x 512
    parser.add_argument("--memory", default="subprocess", choices=("subprocess", "in-process"),
                        help="measure peak memory in a fresh process per variant, or in the timed runs")  # fmt: skip
    parser.add_argument("--memory-steps", type=int, default=2, help="training steps of each memory process")
    parser.add_argument(
        "--memory-repeats",
        type=int,
        default=1,
        help="memory processes per variant (the peak RSS varies by up to ~20%% between identical runs)",
    )
    parser.add_argument(
        "--live-repeats",
        type=int,
        default=1,
        help="live-tensor processes per variant (profiler; --memory subprocess only; 0: none)",
    )
    parser.add_argument("--max-memory", type=float, default=0.5, help="pass if every-block peak <= this x baseline")
    parser.add_argument("--max-time", type=float, default=1.4, help="pass if every-block step time <= this x baseline")
    parser.add_argument("--tie", type=float, default=0.05, help="ours counts as at least as good as HF within this")
    parser.add_argument("--measure-memory", choices=VARIANTS, default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--live", action="store_true", help=argparse.SUPPRESS)  # child mode: under the profiler
    args = parser.parse_args(argv)
    for name in ("memory_steps", "memory_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.live_repeats < 0:
        parser.error(f"--live-repeats {args.live_repeats} must be >= 0")
    return args


# -- memory ------------------------------------------------------------------------------------
def resident_bytes() -> int:
    """The process's resident memory now (``VmRSS``; 0 where ``/proc`` is missing)."""
    return process_memory("VmRSS") or 0


def release_free_memory() -> None:
    """Collect garbage and hand the C allocator's free pages back to the OS (glibc ``malloc_trim``)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


class LiveTensorPeak:
    """Context manager: the peak of the bytes held by live tensors while it is entered (``.peak_bytes``).

    ``torch.profiler`` with ``profile_memory=True`` reports every allocation and free of PyTorch's CPU
    allocator with its size; their running sum in time order is the bytes live tensors hold. Unlike
    the peak RSS it does not depend on how the C allocator places freed blocks or returns them to the
    OS, so identical runs give (nearly) the same peak. Blocks allocated before it is entered are not counted
    (the profiler ignores their frees).
    """

    def __init__(self) -> None:
        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.peak_bytes = 0

    def __enter__(self) -> Self:
        self.profiler.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.profiler.__exit__(kind, error, trace)
        events = self.profiler.profiler.kineto_results.events()
        changes = sorted(
            ((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == CPU),
            key=lambda change: change[0],  # stable: same-time events keep the profiler's order
        )
        live = 0
        for _, change in changes:
            live += change
            self.peak_bytes = max(self.peak_bytes, live)


def keep_summaries(runs: dict[str, list[dict]]) -> None:
    """Replace each finished run's monitor by its memory figures (a monitor keeps its whole run alive)."""
    for record in (r for per_variant in runs.values() for r in per_variant if "monitor" in r):
        summary = record.pop("monitor").summary
        record.update(peak_bytes=summary["peak_memory_bytes"], memory_kind=summary["memory_kind"])


def build(
    variant: str, datamodule: MLMDataModule, args: argparse.Namespace, runs: dict[str, list[dict]], root: str
) -> LightningJob:
    """A fresh job of ``variant`` with an ``EfficiencyMonitor``; its run record is appended to ``runs``."""
    keep_summaries(runs)
    release_free_memory()
    start = resident_bytes()
    module = mlm_module(datamodule.vocab_size, args)
    callbacks: list[Any] = []
    if variant == EVERY:
        callbacks.append(ActivationCheckpointing(every=1))
    elif variant == EVERY_2:
        callbacks.append(ActivationCheckpointing(every=2))
    elif variant == HF:
        hf = module.model
        enable = getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable
        enable()  # every layer, non-reentrant (transformers >= 4.35 default), like ours
    monitor = EfficiencyMonitor(peak_flops=1e12)  # peak FLOP/s only scales MFU, unused here: skip measuring it
    runs[variant].append({"start_bytes": start, "monitor": monitor})
    return LightningJob(module, datamodule, [*callbacks, monitor], {"accelerator": "cpu", "default_root_dir": root})


def child_arguments(args: argparse.Namespace) -> list[str]:
    """The options a memory process needs to build the same job."""
    options = ["--preset", args.preset, "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--vocab-size", str(args.vocab_size), "--seed", str(args.seed)]  # fmt: skip
    if args.threads is not None:
        options += ["--threads", str(args.threads)]
    if args.train_files:
        options += ["--train-files", *args.train_files]
    return options


def measure_in_subprocess(variant: str, args: argparse.Namespace, live: bool = False) -> dict[str, Any]:
    """Run ``variant`` for ``--memory-steps`` steps in a fresh Python process; return its memory record.

    With ``live`` the process runs under :class:`LiveTensorPeak` (its record's ``live_peak_bytes``; its
    peak RSS, raised by the profiler, is not used).
    """
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--measure-memory",
        variant,
        *child_arguments(args),
        "--steps",
        str(args.memory_steps - 1),
        "--warmup",
        "0",
        *(["--live"] if live else []),
    ]  # fmt: skip  (the harness adds one batch)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    records = [line[len(MEMORY_TAG) :] for line in done.stdout.splitlines() if line.startswith(MEMORY_TAG)]
    if done.returncode != 0 or not records:
        raise RuntimeError(f"the memory process of {variant!r} failed:\n{done.stderr[-3000:]}")
    record = json.loads(records[-1])
    if live:
        print(f"live-tensor process {variant}: peak of live tensors {record['live_peak_bytes'] / GIB:.3f} GiB "
              f"({record['live_peak_bytes']} bytes)")  # fmt: skip
    else:
        print(f"memory process {variant}: RSS at build {record['start_bytes'] / GIB:.2f} GiB, "
              f"peak {record['peak_bytes'] / GIB:.2f} GiB")  # fmt: skip
    return record


def measure_child(args: argparse.Namespace) -> dict[str, Any]:
    """Child mode (``--measure-memory VARIANT``): one run of the variant; prints its record after ``MEMORY_TAG``.

    With ``--live`` everything from the data module on runs under :class:`LiveTensorPeak`.
    """
    name = args.measure_memory
    runs: dict[str, list[dict]] = {name: []}
    live = LiveTensorPeak() if args.live else contextlib.nullcontext()
    with live, tempfile.TemporaryDirectory() as root:
        torch.manual_seed(args.seed)
        datamodule = mlm_data(args)
        variant = Variant(name, lambda: build(name, datamodule, args, runs, root), seed=args.seed)
        run_variant(variant, args.steps, warmup=0)
        keep_summaries(runs)
    record = runs[name][0]
    if isinstance(live, LiveTensorPeak):
        record["live_peak_bytes"] = live.peak_bytes
    print(MEMORY_TAG + json.dumps(record))
    return record


def memory_table(runs: dict[str, list[dict]], live: dict[str, list[int]] | None = None) -> dict[str, dict[str, Any]]:
    """Per variant: median and range of the peak, start and added memory over its runs, the ratios to the baseline.

    ``live``: per variant, the live-tensor peaks of its :class:`LiveTensorPeak` processes (median, range
    and ratio of the medians are added).
    """
    numbers = {}
    base_peaks = [r["peak_bytes"] for r in runs[NONE]]
    base_added = [r["peak_bytes"] - r["start_bytes"] for r in runs[NONE]]
    for name, per_run in runs.items():
        peaks = [r["peak_bytes"] for r in per_run]
        added = [r["peak_bytes"] - r["start_bytes"] for r in per_run]
        numbers[name] = {
            "memory_kind": per_run[0]["memory_kind"],
            "peak_bytes": statistics.median(peaks),
            "peak_min_bytes": min(peaks),
            "peak_max_bytes": max(peaks),
            "added_bytes": statistics.median(added),
            "peak_ratio": statistics.median(p / b for p, b in zip(peaks, base_peaks)),
            "added_ratio": statistics.median(a / b for a, b in zip(added, base_added)) if min(base_added) > 0 else None,
            "run_peaks": peaks,
            "run_starts": [r["start_bytes"] for r in per_run],
        }
        if live:
            numbers[name].update(live_peak_bytes=statistics.median(live[name]), live_run_peaks=live[name])
    if live:
        for n in numbers.values():
            n["live_ratio"] = n["live_peak_bytes"] / numbers[NONE]["live_peak_bytes"]
    print(f"\n{'variant':<22}{'peak RSS (GiB)':>15}{'range':>13}{'ratio':>8}{'RSS at build, per run (GiB)':>30}"
          f"{'added (GiB)':>13}{'added ratio':>13}{'live peak (GiB)':>17}{'range':>13}{'ratio':>8}")  # fmt: skip
    for name, n in numbers.items():
        starts = ", ".join(f"{s / GIB:.2f}" for s in n["run_starts"])
        spread = f"{n['peak_min_bytes'] / GIB:.2f}-{n['peak_max_bytes'] / GIB:.2f}"
        added_ratio = f"{n['added_ratio']:.3f}" if n["added_ratio"] is not None else "-"
        line = (f"{name:<22}{n['peak_bytes'] / GIB:>15.2f}{spread:>13}{n['peak_ratio']:>8.3f}{starts:>30}"
                f"{n['added_bytes'] / GIB:>13.2f}{added_ratio:>13}")  # fmt: skip
        if live:
            runs_live = n["live_run_peaks"]
            live_spread = f"{min(runs_live) / GIB:.3f}-{max(runs_live) / GIB:.3f}"
            line += f"{n['live_peak_bytes'] / GIB:>17.3f}{live_spread:>13}{n['live_ratio']:>8.3f}"
        print(line)
    kind = numbers[NONE]["memory_kind"]
    print(
        f"peak RSS: EfficiencyMonitor's peak_memory_bytes ({kind}), reset when each fit starts; median and range "
        "over the runs; ratio: median of peak / baseline peak over runs; added: peak - RSS when the build started"
    )
    if live:
        print(
            "live peak: the peak of the bytes live tensors hold (torch.profiler's allocator events, whole process "
            "from the data module on), median and range over its processes; ratio: to the baseline's median"
        )
    return numbers


# -- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure memory, time the four variants interleaved, print the tables and the verdict; returns the numbers."""
    args = setup(parse_args(argv))
    if args.measure_memory:  # child mode: one variant, one run, print the record
        return measure_child(args)
    torch.manual_seed(args.seed)
    datamodule = mlm_data(args)
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    root = tempfile.TemporaryDirectory()  # the monitors' efficiency.json files
    print(
        f"{mlm_job_line(args, datamodule.vocab_size)}, fp32; {args.rounds} rounds x {args.steps} timed steps "
        f"(+{args.warmup} warmup) per variant; memory: {args.memory}"
    )
    memory_runs = runs  # --memory in-process: the timed runs' monitors
    live: dict[str, list[int]] | None = None
    if args.memory == "subprocess":  # first, while this process holds no model
        memory_runs = {name: [] for name in VARIANTS}
        for _ in range(args.memory_repeats):  # one fresh process per variant and repeat; the table takes medians
            for name in VARIANTS:
                memory_runs[name].append(measure_in_subprocess(name, args))
        if args.live_repeats:
            live = {name: [] for name in VARIANTS}
            for _ in range(args.live_repeats):
                for name in VARIANTS:
                    live[name].append(measure_in_subprocess(name, args, live=True)["live_peak_bytes"])
    variants = [
        Variant(name, lambda name=name: build(name, datamodule, args, runs, root.name), seed=args.seed)
        for name in VARIANTS
    ]
    times = interleave(variants, args.rounds, args.steps, args.warmup)
    keep_summaries(runs)
    root.cleanup()
    tokens = args.batch_size * args.max_length
    result = report(times, baseline=NONE, metric="step time", work_per_step=tokens, unit="tokens")
    memory = memory_table(memory_runs, live)
    for name, numbers in memory.items():
        result["variants"][name]["memory"] = numbers

    ours_time, hf_time = result["variants"][EVERY]["ratio"], result["variants"][HF]["ratio"]
    ours_memory, hf_memory, half_memory = (memory[name]["peak_ratio"] for name in (EVERY, HF, EVERY_2))
    checks = {
        f"every-block peak memory {ours_memory:.3f}x <= {args.max_memory}x": ours_memory <= args.max_memory,
        f"every-block step time {ours_time:.3f}x <= {args.max_time}x": ours_time <= args.max_time,
        f"every-2nd-block memory {half_memory:.3f}x between every block and none": ours_memory <= half_memory <= 1.0,
    }
    if live:  # the exact measure decides; the peak RSS of identical processes varies too much for a 5% tie
        ours_live, hf_live = (memory[name]["live_peak_bytes"] for name in (EVERY, HF))
        checks[f"memory vs HF: live-tensor peak {ours_live / GIB:.4f} <= {hf_live / GIB:.4f} GiB (+1 MiB)"] = (
            ours_live <= hf_live + LIVE_SLACK
        )
        ours_range, hf_range = (
            f"{memory[name]['peak_min_bytes'] / GIB:.2f}-{memory[name]['peak_max_bytes'] / GIB:.2f} GiB"
            for name in (EVERY, HF)
        )
        print(
            f"\npeak RSS vs HF (not a check, allocator noise): ours {ours_memory:.3f}x ({ours_range}), "
            f"HF {hf_memory:.3f}x ({hf_range})"
        )
    else:
        checks[f"memory vs HF: {ours_memory:.3f}x <= {hf_memory:.3f}x (+{args.tie:.0%})"] = ours_memory <= hf_memory * (
            1 + args.tie
        )
    checks[f"time vs HF: {ours_time:.3f}x <= {hf_time:.3f}x (+{args.tie:.0%})"] = ours_time <= hf_time * (1 + args.tie)
    print()
    for claim, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {claim}")
    passed = all(checks.values())
    print(f"{'PASS' if passed else 'FAIL'}: activation checkpointing claims on BERT-{args.preset}, "
          f"batch {args.batch_size} x {args.max_length}, memory measured {args.memory}")  # fmt: skip
    result.update(claim="activation checkpointing memory and time vs none and HF", checks=checks, passed=passed)
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
