"""``compile: true`` on the main job: step time compiled (Inductor) vs eager, alone and with three techniques.

Claim measured: the main job (``configs/bert/small_mlm.yaml``: ``BertMLM`` preset small, masked-only
MLM head, ``MLMDataModule`` batch 32 x 128, fp32, CPU) with ``compile=True`` takes <= 0.87x the step
time of the same job eager (>= 1.15x the speed), excluding the compile warm-up steps. Beside it, the
same comparison with ``MagnitudePruning`` masks (50%, one-shot at step 0), ``QuantizationAwareTraining``
fake quantization (int8, from step 0) and ``ActivationCheckpointing`` (every block), each compiled vs
the same technique eager.

Eight variants of one Lightning job (``eager``, ``compiled``, and ``<technique> eager`` /
``<technique> compiled`` for each technique), each a fresh model from the same seed, interleaved in
rounds in this process by ``benchmarks/harness.py`` (the order rotates every round); a step lasts from
one ``on_train_batch_start`` to the next, so it includes the optimizer step, hooks and data loading;
the first ``--warmup`` steps of every run (the compilation: a first graph, then the head's graph again
with a dynamic number of masked positions) are not timed. Dynamo's caches are reset before every build,
so every compiled run compiles its own graphs (Inductor's on-disk cache makes the later compiles of
one graph faster; the warm-up seconds are printed). A ratio is the median over rounds of (variant
median step time / partner median step time); < 1 is faster.

When the compiled main job misses the target (or with ``--profile always``), one compiled step and one
eager step, after the warm-up, are profiled with ``torch.profiler`` and the top operators by self
CPU time are printed (and written to the JSON), with the share of the step spent in matrix
products, in Inductor's compiled graphs (their kernels) and in everything else.

Command (about 4 minutes on 2 cores, 3 rounds x 8 variants x (3 warm-up + 6 timed steps), plus a minute or
two when Inductor's on-disk cache is cold):

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/compile.py --json runs/bench/compile.json

Smoke run: ``--preset tiny --train-files FILE --vocab-size 300 --max-length 17 --batch-size 4
--rounds 1 --steps 1 --warmup 2 --backend aot_eager --techniques pruning --profile always``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
import torch._dynamo
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import (
    LightningJob,
    StepTimer,
    Variant,
    benchmark_trainer,
    harness_arguments,
    interleave,
    report,
    setup,
    write_json,
)
from benchmarks.jobs import MAIN_JOB, mlm_arguments, mlm_data, mlm_job_line, mlm_module
from lightning_efficient import MLMDataModule
from lightning_efficient.callbacks import ActivationCheckpointing, MagnitudePruning, QuantizationAwareTraining

#: The techniques compiled beside the plain job: name -> a fresh callback.
TECHNIQUES: dict[str, Callable[[], pl.Callback]] = {
    "pruning": lambda: MagnitudePruning(final_sparsity=0.5, start_step=0),
    "QAT": lambda: QuantizationAwareTraining(start_step=0),
    "checkpointing": lambda: ActivationCheckpointing(every=1),
}
#: Operators counted as matrix products in the profile summary (attention's fused kernels included).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")
#: Prefixes of what Inductor's compiled graphs run (their kernels are timed as the graph call's own time).
GENERATED = ("## Call CompiledFxGraph", "cpp_fused", "graph_")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the claim's setting (BERT-small, 32 x 128, Inductor)."""
    parser = mlm_arguments(harness_arguments(__doc__, rounds=3, steps=6, warmup=3))
    parser.add_argument("--backend", default="inductor", help="the modules' compile backend (True = inductor)")
    parser.add_argument("--techniques", nargs="*", default=list(TECHNIQUES), choices=list(TECHNIQUES),
                        help="techniques compared compiled vs eager besides the plain job")  # fmt: skip
    parser.add_argument("--target", type=float, default=0.87, help="pass if compiled step <= this x eager")
    parser.add_argument("--profile", default="auto", choices=("auto", "always", "never"),
                        help="profile a compiled and an eager step: when the target is missed, always, or never")  # fmt: skip
    parser.add_argument("--profile-rows", type=int, default=15, help="operators listed in each profile table")
    args = parser.parse_args(argv)
    if args.warmup < 2:
        parser.error(f"--warmup {args.warmup} must be >= 2: the first two steps compile")
    return args


def variant_names(techniques: list[str]) -> list[tuple[str, str]]:
    """``(eager name, compiled name)`` of each compared pair, the plain job first."""
    pairs = [("eager", "compiled")]
    return pairs + [(f"{name} eager", f"{name} compiled") for name in techniques]


class ProfileStep(pl.Callback):
    """Profiles the training step ``step`` (from its batch start to the next one) with ``torch.profiler``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.profiler: profile | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.__enter__()
        elif trainer.global_step == self.step + 1 and self.profiler is not None:
            self.profiler.__exit__(None, None, None)


class CompileRecord(pl.Callback):
    """At the end of a run: its warm-up seconds (appended to ``warmups[name]``) and Dynamo's graph counts."""

    def __init__(
        self,
        name: str,
        timer: StepTimer,
        warmup: int,
        warmups: dict[str, list[float]],
        graphs: dict[str, dict[str, int]],
    ) -> None:
        self.name, self.timer, self.warmup, self.warmups, self.graphs = name, timer, warmup, warmups, graphs

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.warmups.setdefault(self.name, []).append(sum(self.timer.times[: self.warmup]))
        counters = torch._dynamo.utils.counters
        self.graphs[self.name] = {
            "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
        }


def profile_step(datamodule: MLMDataModule, args: argparse.Namespace, compile: bool | str, rows: int) -> dict[str, Any]:
    """Profile one training step after the warm-up; the top operators by self CPU time and a summary."""
    torch._dynamo.reset()
    torch.manual_seed(args.seed)
    module = mlm_module(datamodule.vocab_size, args, **MAIN_JOB, compile=compile)
    profiler = ProfileStep(args.warmup)
    trainer = benchmark_trainer(max_steps=args.warmup + 2, accelerator="cpu", callbacks=[profiler])
    trainer.fit(module, datamodule)
    averages = profiler.profiler.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=rows)
    total = sum(event.self_cpu_time_total for event in averages)
    matmul = sum(
        e.self_cpu_time_total for e in averages if e.key in MATMUL_OPS or e.key.startswith("aten::_scaled_dot_product")
    )
    generated = sum(e.self_cpu_time_total for e in averages if e.key.startswith(GENERATED))
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    summary = {
        "self_cpu_total_s": total / 1e6,
        "matmul_share": matmul / total,
        "generated_kernel_share": generated / total,
        "other_share": 1 - (matmul + generated) / total,
        "top": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in top],
    }
    label = "compiled" if compile else "eager"
    print(f"\nprofile of one {label} step (step {args.warmup}), top {rows} operators by self CPU time:\n{table}")
    print(f"{label}: {total / 1e6:.3f} s of self CPU time; matrix products {summary['matmul_share']:.1%}, "
          f"Inductor's compiled graphs {summary['generated_kernel_share']:.1%}, "
          f"everything else {summary['other_share']:.1%}")  # fmt: skip
    return summary


def pair_ratio(times: dict[str, list[list[float]]], name: str, partner: str) -> dict[str, Any]:
    """Median over rounds of (``name``'s median step / ``partner``'s), with its range."""
    ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(times[name], times[partner])]
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": ratios}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time the pairs interleaved, print the ratios and the verdict (and profiles); returns the numbers."""
    args = setup(parse_args(argv))
    torch.manual_seed(args.seed)
    datamodule = mlm_data(args)
    compile_value: bool | str = True if args.backend == "inductor" else args.backend
    pairs = variant_names(args.techniques)
    warmups: dict[str, list[float]] = {}
    graphs: dict[str, dict[str, int]] = {}

    def build(name: str) -> LightningJob:
        torch._dynamo.reset()  # a fresh compile in every run (no cache limit reached across rounds)
        torch._dynamo.utils.counters.clear()
        technique = name.rsplit(" ", 1)[0] if " " in name else None
        compiled = name.endswith("compiled")
        module = mlm_module(datamodule.vocab_size, args, **MAIN_JOB, compile=compile_value if compiled else False)
        timer = StepTimer(0)  # every interval, the warm-up steps' too
        callbacks: list[pl.Callback] = [TECHNIQUES[technique]()] if technique else []
        record = CompileRecord(name, timer, args.warmup, warmups, graphs)
        return LightningJob(module, datamodule, [*callbacks, timer, record], {"accelerator": "cpu"})

    print(
        f"{mlm_job_line(args, datamodule.vocab_size)}, fp32; compile backend {args.backend}; {args.rounds} rounds x "
        f"{args.steps} timed steps (+{args.warmup} warm-up) x {2 * len(pairs)} variants"
    )
    variants = [
        Variant(name, lambda name=name: build(name), seed=args.seed) for pair in pairs for name in pair
    ]  # fmt: skip
    times = interleave(variants, args.rounds, args.steps, args.warmup)
    tokens = args.batch_size * args.max_length
    result = report(times, baseline="eager", metric="step time", work_per_step=tokens, unit="tokens")

    print(f"\n{'compiled vs eager':<26}{'step-time ratio':>16}{'min-max':>16}{'warm-up (s)':>13}{'graphs':>8}"
          f"{'breaks':>8}")  # fmt: skip
    comparisons = {}
    for eager_name, compiled_name in pairs:
        numbers = pair_ratio(times, compiled_name, eager_name)
        numbers.update(warmup_s=statistics.median(warmups[compiled_name]), **graphs[compiled_name])
        comparisons[compiled_name] = numbers
        print(f"{compiled_name:<26}{numbers['ratio']:>16.3f}"
              f"{numbers['ratio_min']:>8.3f}-{numbers['ratio_max']:.3f}{numbers['warmup_s']:>13.1f}"
              f"{numbers['graphs']:>8}{numbers['graph_breaks']:>8}")  # fmt: skip
    print(f"ratio: median over rounds of compiled / eager median step time (< 1: faster); warm-up: the first "
          f"{args.warmup} steps of a compiled run (compilation), median over rounds; graphs and breaks: Dynamo's")  # fmt: skip

    main_ratio = comparisons["compiled"]["ratio"]
    passed = main_ratio <= args.target
    profiles = None
    if args.profile == "always" or (args.profile == "auto" and not passed):
        profiles = {
            "compiled": profile_step(datamodule, args, compile_value, args.profile_rows),
            "eager": profile_step(datamodule, args, False, args.profile_rows),
        }
    print(f"\n{'PASS' if passed else 'FAIL'}: compiled step {main_ratio:.3f}x eager ({1 / main_ratio:.2f}x speed; "
          f"target <= {args.target}x) on BERT-{args.preset}, batch {args.batch_size} x {args.max_length}, "
          f"backend {args.backend}")  # fmt: skip
    result.update(
        claim="compile: true step time vs eager, alone and with pruning masks, QAT and activation checkpointing",
        backend=args.backend,
        comparisons=comparisons,
        target=args.target,
        passed=passed,
        profiles=profiles,
    )
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
