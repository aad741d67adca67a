"""Sparse training on BERT: RigL and SET against gradual magnitude pruning and pruning at initialisation.

Parts (``--parts`` picks some, by number or name; all by default):

1. ``mlm``: BERT MLM, the main job's model and settings (:data:`~benchmarks.jobs.MAIN_JOB`, ``--preset``
   small, the embedded corpus), ``--train-steps`` per run. At each of ``--sparsities`` the final
   validation loss of :class:`~lightning_efficient.DynamicSparsity` ``rigl`` and ``set``, gradual
   magnitude pruning (:class:`~lightning_efficient.MagnitudePruning`, Zhu & Gupta's cubic schedule) and
   :class:`~lightning_efficient.PruneAtInit` ``snip``, ``grasp`` (each also with ``shuffle=True``, the
   control of Frankle et al. 2021) and ``random``, next to one dense run shared by all sparsities.
   Claims (reported as HOLDS / DOES NOT HOLD, not asserted):

   - RigL matches or beats gradual magnitude pruning at the same sparsity: RigL's loss <= pruning's
     x (1 + ``--tolerance``, default 1%), at every sparsity; SET likewise;
   - SNIP and GraSP beat their shuffled control, and beat ``random``: the method's loss x (1 +
     tolerance) < the other's. When the shuffled mask does as well, the method found a layer-wise
     density, not a ticket, and the script says so.

2. ``classify``: Brown's informative vs imaginative prose (``jobs.prose_data``; a ``BertClassifier``
   of ``--preset`` trained from scratch, LR ``--classify-lr``) for ``--classify-steps`` at
   ``--classify-sparsity`` (90%): dense, RigL, SET and gradual pruning, with the same schedules as
   part 1 for their length; the final validation accuracy of each (``jobs.validation_accuracy``, masks
   in place) on the whole validation split, in batches of 256 (the split is ordered by label: its
   first batches hold one class only, so a ``--val-batches`` limit would not do). Claim: RigL's (SET's)
   accuracy >= gradual pruning's x (1 - tolerance).

3. ``overhead``: RigL's update overhead, with :mod:`benchmarks.harness` (dense, and two RigL
   variants at 90% sparsity interleaved in rounds in one process, the order rotating). The RigL
   paper updates every 100 steps (``--overhead-update-every`` U); timing runs of 2U steps would take
   minutes each, so the two costs are measured apart: ``rigl masked`` (update_every=U: the timed steps
   come before the first update, so they are the ordinary masked steps: masking gradients and
   weights, logging the sparsity) and ``rigl every step`` (update_every=1, end_step far away: every
   step keeps the dense gradient's magnitude and drops and grows 30% of each layer's weights). With
   m and u their step-time ratios to dense (medians over rounds of the per-round ratios), the
   amortised overhead of updating every U steps is ``m + (u - m) / U - 1``. Claim: <= 5%.

4. ``inference``: CPU inference at 90% unstructured sparsity: the FFN input Linear of ``--preset``
   (small: 256 -> 1024) with 90% of its weights zero (at random), as a dense weight
   (``torch.nn.functional.linear(x, W, b)``) and as CSR (``torch.sparse.addmm(b, W_csr, x.T).T``, the
   fastest of the CSR forms tried; the result is left a transposed view), at batch 1 and 32 of
   ``--max-length`` tokens, under ``torch.inference_mode``; median over ``--inference-repeats``
   repeats, the two alternating in order, each timing enough calls to last about 20 ms. Reported: the
   CSR / dense time ratio (and the largest difference of their outputs), and whether unstructured
   sparsity makes CPU inference faster here (CSR at <= 0.95x the dense time); structured pruning does
   (``benchmarks/pruning_export.py``).

5. ``lottery``: a lottery ticket (:class:`~lightning_efficient.LotteryTicket`) on part 1's MLM job at
   ``--lottery-sparsity`` (80%): the dense round (``--train-steps``, keeping the weights of step
   ``--rewind-step``, default a tenth of the run), then one pruned round from its checkpoint (global
   magnitude pruning of the trained weights to 80%, one shot, rewound to that step) and the same mask
   on a fresh initialisation (``start="reinit"``, the model built with seed 1; the data order is the
   other runs'), each ``--train-steps``. Claim (Frankle & Carbin 2019): the rewound ticket beats the
   re-initialised one: its loss x (1 + tolerance) < the other's. One round, not iterative pruning over
   several (each round is a run of ``--train-steps``; ``configs/pipelines/lottery_ticket.yaml`` runs two).

Each part is a function of the shared :class:`Context` that prints its tables and verdicts and returns
its numbers; :data:`PARTS` names and numbers them, ``main`` runs those that ``--parts`` selects and
stores each result under the part's name in the ``--json`` output.

How runs are ordered. Parts 1 and 2 train one run after the other; :func:`benchmarks.jobs.converge`
seeds everything with 0 before each build, so every run starts from the same weights and sees the same
batches in the same order (the sparse techniques' masks come from their own generators, seed 0).
Only the final validation loss is compared, so the runs' order does not bias the comparison; the
validation batches and their MLM masks are the same for every run. One difference remains: the
scoring pass of SNIP and GraSP (one and three forward-backward passes of the first batch) draws MLM
masks from the module's masking generator, so their training batches are masked differently.

Schedules, from the run's length S (printed): RigL and SET update every ``max(1, S // 10)`` steps
until ``int(0.75 S)`` (cosine-decayed drop fraction 0.3, RigL's); gradual pruning prunes every
``max(1, S // 20)`` steps from ``S // 10`` to ``int(0.75 S)``, so both masks are final at the same
step with a quarter of the run left. RigL, SET, gradual pruning and ``random`` give every layer the
same sparsity; SNIP and GraSP rank weights across layers.

Calibration (2 cores, torch's 2 threads, quiet machine): a BERT-small MLM step (batch 32 x 128) takes
about 0.61 s (0.65 s inside a monitored run), a RigL update about 0.3 s more; each run adds about 4 s
(trainer, validation on all 11 batches of the embedded corpus). A classifier step (batch 32, sentences
padded per batch) takes about 0.25 s, the validation of the whole split about 10 s; a classifier
learns past the majority class (77%) in 100-200 steps (85% at step 200). The defaults: part 1, 17 runs
of 200 steps (dense, then 8 methods x 2 sparsities), validation at the end only: about 38 minutes;
part 2, 4 runs of 300 steps: about 6 minutes; part 3, 6 rounds x 6 steps (+2 warmup) of 3 variants:
about 2.5 minutes; part 4: seconds; part 5, 3 runs of 200 steps: about 7 minutes. In all about 55 minutes:

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/sparse_training.py  # ~55 min on 2 cores
    python benchmarks/sparse_training.py --preset tiny --vocab-size 2000 --train-steps 6 --classify-steps 4 \
        --val-batches 1 --rounds 1 --steps 2 --warmup 1 --overhead-update-every 3  # ~35 s
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch

from benchmarks import jobs
from benchmarks.harness import (
    LightningJob,
    Variant,
    benchmark_trainer,
    harness_arguments,
    interleave,
    report,
    run_parts,
    setup,
    write_json,
)
from lightning_efficient import (
    BertMLM,
    DynamicSparsity,
    LotteryTicket,
    MagnitudePruning,
    MLMDataModule,
    PruneAtInit,
)
from lightning_efficient.compare import format_table
from lightning_efficient.models.presets import PRESETS

DENSE = "dense"
METHODS = ("rigl", "set", "pruning", "snip", "snip_shuffled", "grasp", "grasp_shuffled", "random")
"""The sparse methods of part 1 (``--methods``); the dense run always runs."""
LABELS = {
    "rigl": "RigL",
    "set": "SET",
    "pruning": "gradual magnitude pruning",
    "snip": "SNIP",
    "snip_shuffled": "SNIP shuffled",
    "grasp": "GraSP",
    "grasp_shuffled": "GraSP shuffled",
    "random": "random at init",
}
CLASSIFY_METHODS = (DENSE, "rigl", "set", "pruning")
OVERHEAD_SPARSITY, OVERHEAD_CLAIM = 0.9, 0.05
EVERY_STEP_END = 1_000_000
"""``end_step`` of the update-every-step variant: far beyond the run, so each update moves about 30%."""
INFERENCE_SPARSITY, INFERENCE_BATCHES, CALL_SECONDS = 0.9, (1, 32), 0.02
FASTER = 0.95
"""Part 4 calls CSR faster when it takes at most this share of the dense time (a margin over timing noise)."""
VALIDATION_BATCH = 256
"""Part 2's validation batch size: the whole split is validated, in as few batches as memory allows."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (harness, MLM job, each part's); ``--parts`` comes back as names, in the parts' order."""
    parser = harness_arguments(__doc__, rounds=6, steps=6, warmup=2)
    jobs.mlm_arguments(parser)
    parser.add_argument(
        "--parts",
        nargs="+",
        default=list(PARTS),
        metavar="PART",
        choices=[*PARTS, *(number for number, _ in PARTS.values())],
        help=f"parts to run, by name or number: {', '.join(f'{n}={k}' for k, (n, _) in PARTS.items())}",
    )
    group = parser.add_argument_group("part 1: MLM")
    group.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9], help="sparsities compared")
    group.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="sparse methods run")
    group.add_argument("--train-steps", type=int, default=200, help="steps of every MLM run")
    group.add_argument("--val-every", type=int, default=None, help="validate every N steps (default: at the end)")
    group.add_argument("--val-batches", type=int, default=None, help="MLM validation batches (default: all)")
    group.add_argument("--tolerance", type=float, default=0.01, help="relative tolerance of the claims")
    group = parser.add_argument_group("part 2: classification")
    group.add_argument("--classify-steps", type=int, default=300, help="steps of every classification run")
    group.add_argument("--classify-sparsity", type=float, default=0.9, help="sparsity of part 2's sparse runs")
    group.add_argument("--classify-lr", type=float, default=3e-4, help="classifier LR (trained from scratch)")
    group.add_argument("--classify-files", nargs="+", default=None, help="labelled files (default: embedded Brown)")
    group.add_argument("--text-column", default="text")
    group.add_argument("--label-column", default="genre")
    group.add_argument("--no-label-map", action="store_true", help="use the labels as they are (not BROWN_PROSE)")
    group = parser.add_argument_group("part 5: lottery ticket")
    group.add_argument("--lottery-sparsity", type=float, default=0.8, help="the ticket's sparsity")
    group.add_argument("--rewind-step", type=int, default=None, help="step rewound to (default: a tenth of the run)")
    group = parser.add_argument_group("parts 3 and 4: overhead and inference")
    group.add_argument("--overhead-update-every", type=int, default=100, help="RigL's update interval (paper: 100)")
    group.add_argument("--inference-repeats", type=int, default=15, help="interleaved repeats per inference timing")
    args = parser.parse_args(argv)
    args.parts = sorted(
        {name for name, (number, _) in PARTS.items() if {name, number} & set(args.parts)},
        key=lambda name: int(PARTS[name][0]),
    )
    args.val_every = args.val_every or args.train_steps
    if min(args.train_steps, args.classify_steps) < 2:
        parser.error("--train-steps and --classify-steps must be >= 2 (the first mask update comes at step 1 or later)")
    if args.warmup + args.steps > args.overhead_update_every:
        parser.error(
            f"--warmup + --steps must be <= --overhead-update-every ({args.overhead_update_every}), so the "
            "timed steps of 'rigl masked' come before its first update"
        )
    return args


@dataclass(frozen=True)
class Schedule:
    """The sparse techniques' schedules for a run of ``steps`` optimizer steps.

    Attributes:
        steps: The run's length.
    """

    steps: int

    @property
    def update_every(self) -> int:
        """RigL's and SET's steps between mask updates: a tenth of the run."""
        return max(1, self.steps // 10)

    @property
    def end_step(self) -> int:
        """The last mask update and the last pruning event: three quarters into the run."""
        return max(self.update_every, int(0.75 * self.steps))

    @property
    def prune_start(self) -> int:
        """Gradual pruning's first event: a tenth into the run."""
        return self.steps // 10

    @property
    def prune_every(self) -> int:
        """Gradual pruning's steps between events: a twentieth of the run."""
        return max(1, self.steps // 20)

    def as_dict(self) -> dict[str, int]:
        """The schedule's numbers, for the JSON."""
        names = ("steps", "update_every", "end_step", "prune_start", "prune_every")
        return {name: getattr(self, name) for name in names}

    def describe(self) -> str:
        """One line: the run's length and the techniques' steps."""
        return (
            f"{self.steps} steps; RigL/SET update every {self.update_every} steps until step {self.end_step}; "
            f"gradual pruning every {self.prune_every} steps from step {self.prune_start} to {self.end_step}"
        )


def sparse_callback(method: str, sparsity: float, schedule: Schedule) -> pl.Callback:
    """The callback of one of :data:`METHODS` at ``sparsity``, with ``schedule``'s steps."""
    if method in ("rigl", "set"):
        return DynamicSparsity(
            method=method, sparsity=sparsity, update_every=schedule.update_every, end_step=schedule.end_step
        )
    if method == "pruning":
        return MagnitudePruning(
            final_sparsity=sparsity,
            start_step=schedule.prune_start,
            end_step=schedule.end_step,
            frequency=schedule.prune_every,
        )
    name, _, shuffled = method.partition("_")
    return PruneAtInit(method=name, sparsity=sparsity, shuffle=bool(shuffled))


@dataclass
class Context:
    """What the parts share.

    Attributes:
        args: The parsed options.
        root: Scratch directory of the runs' logs.
    """

    args: argparse.Namespace
    root: Path

    @functools.cached_property
    def mlm_data(self) -> MLMDataModule:
        """The main job's data (parts 1 and 3), loaded when first needed."""
        return jobs.mlm_data(self.args)

    def mlm_module(self) -> BertMLM:
        """A fresh ``BertMLM`` of ``--preset`` with the main job's settings."""
        return jobs.mlm_module(self.mlm_data.vocab_size, self.args, **jobs.MAIN_JOB)


def verdict(holds: bool, claim: str, details: str) -> bool:
    """Print ``HOLDS: claim (details)`` or ``DOES NOT HOLD: ...``; return ``holds``."""
    print(f"{'HOLDS' if holds else 'DOES NOT HOLD'}: {claim} ({details})")
    return holds


# -- part 1: MLM -----------------------------------------------------------------------------------
def final_loss(summary: dict[str, Any]) -> float:
    """The run's last validation loss (nan when it was not validated)."""
    return summary["history"][-1]["value"] if summary["history"] else math.nan


def compare_losses(
    losses: dict[str, dict[str, float]], method: str, other: str, tolerance: float, strict: bool
) -> tuple[bool, str]:
    """Whether ``method``'s loss is <= (``strict``: < by more than ``tolerance``) ``other``'s at every sparsity.

    Returns:
        The outcome, and the losses compared at each sparsity (``"0.9: 6.1234 vs 6.2345"``).
    """
    shared = [s for s in losses[method] if s in losses[other]]
    if strict:
        outcome = all(losses[method][s] * (1 + tolerance) < losses[other][s] for s in shared)
    else:
        outcome = all(losses[method][s] <= losses[other][s] * (1 + tolerance) for s in shared)
    details = "; ".join(f"{s}: {losses[method][s]:.4f} vs {losses[other][s]:.4f}" for s in shared)
    return outcome, details


def mlm_verdicts(losses: dict[str, dict[str, float]], tolerance: float) -> dict[str, bool]:
    """Part 1's claims among the methods that ran (see the module docstring)."""
    verdicts: dict[str, bool] = {}
    for method in ("rigl", "set"):
        if method in losses and "pruning" in losses:
            holds, details = compare_losses(losses, method, "pruning", tolerance, strict=False)
            claim = f"{LABELS[method]} matches or beats gradual magnitude pruning at the same sparsity"
            rule = f"val/loss <= {1 + tolerance:g} x pruning's"
            verdicts[f"{method}_vs_pruning"] = verdict(holds, claim, f"{rule}; {details}")
    for method in ("snip", "grasp"):
        for other in (f"{method}_shuffled", "random"):
            if method not in losses or other not in losses:
                continue
            holds, details = compare_losses(losses, method, other, tolerance, strict=True)
            claim = f"{LABELS[method]} beats {LABELS[other]}"
            rule = f"{1 + tolerance:g} x val/loss < the other's"
            verdicts[f"{method}_vs_{other}"] = verdict(holds, claim, f"{rule}; {details}")
            if other.endswith("_shuffled") and not holds:
                print(f"  the shuffled mask does as well: {LABELS[method]} found a layer-wise density, not a ticket")
    return verdicts


def print_loss_table(losses: dict[str, dict[str, float]], dense: float, sparsities: list[str], steps: int) -> None:
    """Rows: methods; columns: sparsities; cells: final val/loss (the dense run's in every column)."""
    rows = {f"{DENSE} (shared)": {s: dense for s in sparsities}, **{LABELS[m]: row for m, row in losses.items()}}
    width = max(len(name) for name in rows) + 2
    print(f"\nfinal val/loss after {steps} steps (lower is better)")
    print("sparsity".ljust(width) + "".join(s.rjust(10) for s in sparsities))
    for name, row in rows.items():
        print(name.ljust(width) + "".join(f"{row[s]:.4f}".rjust(10) for s in sparsities))


def mlm_part(context: Context) -> dict[str, Any]:
    """Part 1: final val/loss of every method at every sparsity, next to the dense run's."""
    args = context.args
    schedule = Schedule(args.train_steps)
    batches = "all" if args.val_batches is None else args.val_batches
    print(f"\nPart 1: {jobs.mlm_job_line(args, context.mlm_data.vocab_size)}")
    print(f"{schedule.describe()}; validation every {args.val_every} steps on {batches} batches")
    build = context.mlm_module
    dense = jobs.converge(DENSE, build, context.mlm_data, [], args.train_steps, None, context.root, args)
    summaries: dict[str, dict[str, Any]] = {DENSE: dense}
    losses: dict[str, dict[str, float]] = {method: {} for method in args.methods}
    for sparsity in args.sparsities:
        for method in args.methods:
            name = f"{method}_{sparsity:g}"
            callback = sparse_callback(method, sparsity, schedule)
            summary = jobs.converge(
                name, build, context.mlm_data, [callback], args.train_steps, None, context.root, args
            )
            summaries[name] = summary
            losses[method][f"{sparsity:g}"] = final_loss(summary)
    for sparsity in args.sparsities:
        names = [DENSE, *(f"{method}_{sparsity:g}" for method in args.methods)]
        print(f"\nsparsity {sparsity:g}, against the dense run\n{format_table([summaries[n] for n in names])}")
    print_loss_table(losses, final_loss(dense), [f"{s:g}" for s in args.sparsities], args.train_steps)
    print()
    verdicts = mlm_verdicts(losses, args.tolerance)
    return {
        "schedule": schedule.as_dict(),
        "dense": final_loss(dense),
        "final": losses,
        "verdicts": verdicts,
        "summaries": list(summaries.values()),
    }


# -- part 2: classification ------------------------------------------------------------------------
def classify_part(context: Context) -> dict[str, Any]:
    """Part 2: validation accuracy of dense, RigL, SET and gradual pruning on Brown prose."""
    args = context.args
    schedule = Schedule(args.classify_steps)
    prose_options = argparse.Namespace(**{**vars(args), "train_files": args.classify_files})
    data = jobs.prose_data(prose_options, batch_size=args.batch_size)
    validation = jobs.prose_data(prose_options, batch_size=VALIDATION_BATCH)  # the same split, fewer batches
    print(
        f"\nPart 2: BertClassifier-{args.preset} on {' vs '.join(data.label_names)}, at sparsity "
        f"{args.classify_sparsity:g}; {schedule.describe()}"
    )
    accuracies: dict[str, float] = {}
    times: dict[str, float] = {}
    for method in CLASSIFY_METHODS:
        callbacks = [] if method == DENSE else [sparse_callback(method, args.classify_sparsity, schedule)]
        pl.seed_everything(0, verbose=False)
        model = jobs.prose_classifier(data, args.preset, args.max_length, learning_rate=args.classify_lr)
        trainer = benchmark_trainer(max_steps=args.classify_steps, callbacks=callbacks)
        start = time.perf_counter()
        trainer.fit(model, data)
        times[method] = time.perf_counter() - start
        accuracies[method] = jobs.validation_accuracy(model, validation, None)  # all: the split is ordered by label
        print(
            f"{method}: val/accuracy {accuracies[method]:.4f} after {args.classify_steps} steps, "
            f"{times[method]:.0f} s training"
        )
    print(f"\n{'method'.ljust(28)}{'val/accuracy'.rjust(14)}{'train s'.rjust(10)}")
    for method in CLASSIFY_METHODS:
        label = DENSE if method == DENSE else LABELS[method]
        print(f"{label.ljust(28)}{accuracies[method]:14.4f}{times[method]:10.0f}")
    print()
    verdicts = {}
    for method in ("rigl", "set"):
        holds = accuracies[method] >= accuracies["pruning"] * (1 - args.tolerance)
        details = (
            f"accuracy >= {1 - args.tolerance:g} x pruning's; {accuracies[method]:.4f} vs {accuracies['pruning']:.4f}"
        )
        claim = f"{LABELS[method]}'s accuracy matches or beats gradual magnitude pruning's"
        verdicts[f"{method}_vs_pruning"] = verdict(holds, claim, details)
    return {
        "sparsity": args.classify_sparsity,
        "steps": args.classify_steps,
        "accuracy": accuracies,
        "train_time_s": times,
        "verdicts": verdicts,
    }


# -- part 3: RigL's update overhead ----------------------------------------------------------------
def overhead_part(context: Context) -> dict[str, Any]:
    """Part 3: amortised step-time overhead of RigL updating every ``--overhead-update-every`` steps."""
    args = context.args
    every = args.overhead_update_every
    masked, updating = f"rigl masked (update every {every})", "rigl every step"

    def job(callbacks: list[pl.Callback]) -> LightningJob:
        return LightningJob(context.mlm_module(), context.mlm_data, callbacks)

    def rigl(update_every: int, end_step: int) -> list[pl.Callback]:
        return [
            DynamicSparsity(
                method="rigl",
                sparsity=OVERHEAD_SPARSITY,
                update_every=update_every,
                end_step=end_step,
                strict_schedule=False,
            )
        ]

    variants = [
        Variant(DENSE, lambda: job([])),
        Variant(masked, lambda: job(rigl(every, every))),
        Variant(updating, lambda: job(rigl(1, EVERY_STEP_END))),
    ]
    print(
        f"\nPart 3: RigL update overhead at sparsity {OVERHEAD_SPARSITY:g}, {args.rounds} rounds x {args.steps} "
        f"steps (+{args.warmup} warmup); {jobs.mlm_job_line(args, context.mlm_data.vocab_size)}"
    )
    with warnings.catch_warnings():  # the masked variant's run ends before its first update, on purpose
        warnings.filterwarnings("ignore", message=r".*is never reached.*")
        times = interleave(variants, args.rounds, args.steps, args.warmup)
    timing = report(times, baseline=DENSE, work_per_step=args.batch_size * args.max_length)
    masked_ratio, update_ratio = (timing["variants"][name]["ratio"] for name in (masked, updating))
    overhead = masked_ratio + (update_ratio - masked_ratio) / every - 1
    print(
        f"\nmasked step {masked_ratio:.3f}x dense, update step {update_ratio:.3f}x dense: amortised over {every} "
        f"steps {masked_ratio:.3f} + ({update_ratio:.3f} - {masked_ratio:.3f}) / {every} - 1 = {overhead:+.2%}"
    )
    passed = overhead <= OVERHEAD_CLAIM
    print(
        f"{'PASS' if passed else 'FAIL'}: RigL's amortised step-time overhead {overhead:+.2%} "
        f"(claim <= {OVERHEAD_CLAIM:.0%})"
    )
    return {
        "update_every": every,
        "masked_ratio": masked_ratio,
        "update_ratio": update_ratio,
        "overhead": overhead,
        "passed": passed,
        "timing": timing,
    }


# -- part 4: CPU inference -------------------------------------------------------------------------
def median_call_seconds(calls: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each callable: ``repeats`` interleaved repeats (order alternating) of ~20 ms."""
    for call in calls.values():  # warmup
        call()
    first = next(iter(calls.values()))
    start = time.perf_counter()
    first()
    number = max(1, round(CALL_SECONDS / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for repeat in range(repeats):
        for name in list(calls)[:: 1 if repeat % 2 == 0 else -1]:
            start = time.perf_counter()
            for _ in range(number):
                calls[name]()
            samples[name].append((time.perf_counter() - start) / number)
    return {name: statistics.median(values) for name, values in samples.items()}


def inference_part(context: Context) -> dict[str, Any]:
    """Part 4: a 90%-sparse FFN Linear on the CPU: dense weights vs CSR, at batch 1 and 32."""
    args = context.args
    size = PRESETS[args.preset]
    generator = torch.Generator().manual_seed(0)
    shape = (size.ffn_size, size.hidden_size)
    keep = torch.rand(shape, generator=generator) >= INFERENCE_SPARSITY
    weight = torch.randn(shape, generator=generator) / math.sqrt(size.hidden_size) * keep
    bias = torch.randn(size.ffn_size, generator=generator) / math.sqrt(size.hidden_size)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": known, and what is measured
        warnings.filterwarnings("ignore", message=r".*Sparse CSR tensor support is in beta.*")
        sparse = weight.to_sparse_csr()
    column = bias.unsqueeze(1)
    print(
        f"\nPart 4: CPU inference, Linear {size.hidden_size} -> {size.ffn_size} (the FFN of BERT-{args.preset}) with "
        f"{1 - keep.float().mean():.1%} of its weights zero, {torch.get_num_threads()} threads"
    )
    results: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for batch in INFERENCE_BATCHES:
            inputs = torch.randn(batch * args.max_length, size.hidden_size, generator=generator)
            calls = {
                "dense": lambda inputs=inputs: torch.nn.functional.linear(inputs, weight, bias),
                "csr": lambda inputs=inputs: torch.sparse.addmm(column.expand(-1, len(inputs)), sparse, inputs.T).T,
            }
            difference = float((calls["dense"]() - calls["csr"]()).abs().max())
            seconds = median_call_seconds(calls, args.inference_repeats)
            ratio = seconds["csr"] / seconds["dense"]
            results[f"batch_{batch}"] = {
                **{f"{name}_s": value for name, value in seconds.items()},
                "ratio": ratio,
                "max_difference": difference,
            }
            print(
                f"batch {batch} x {args.max_length}: dense {seconds['dense'] * 1e3:.3f} ms, CSR "
                f"{seconds['csr'] * 1e3:.3f} ms: {ratio:.2f}x the dense time (max |difference| {difference:.1e})"
            )
    faster = [batch for batch in INFERENCE_BATCHES if results[f"batch_{batch}"]["ratio"] <= FASTER]
    if len(faster) == len(INFERENCE_BATCHES):
        how = "does make CPU inference faster here"
    elif faster:
        slower = [batch for batch in INFERENCE_BATCHES if batch not in faster]
        how = (
            f"makes CPU inference faster here only at batch {', '.join(map(str, faster))}, not at batch "
            f"{', '.join(map(str, slower))}"
        )
    else:
        how = "does not make CPU inference faster here"
    print(
        f"unstructured sparsity at {INFERENCE_SPARSITY:.0%} {how} (faster: CSR <= {FASTER}x the dense time); "
        "structured pruning (MagnitudePruning(structure='heads_and_neurons') + export) does, see "
        "benchmarks/pruning_export.py"
    )
    return {"sparsity": INFERENCE_SPARSITY, "shape": list(shape), "batches": results, "faster_at_batches": faster}


# -- part 5: lottery ticket ------------------------------------------------------------------------
class SaveAtEnd(pl.Callback):
    """Write the run's checkpoint (its techniques' states included) to ``path`` when training ends."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


def lottery_part(context: Context) -> dict[str, Any]:
    """Part 5: a rewound lottery ticket against the same mask on a fresh initialisation."""
    args = context.args
    steps, sparsity = args.train_steps, args.lottery_sparsity
    rewind = args.rewind_step if args.rewind_step is not None else steps // 10
    data, build, root = context.mlm_data, context.mlm_module, context.root
    print(
        f"\nPart 5: lottery ticket at sparsity {sparsity:g}, rewound to step {rewind}; "
        f"{jobs.mlm_job_line(args, data.vocab_size)}; {steps} steps a round"
    )
    ticket = root / "lottery_dense.ckpt"
    keep = [LotteryTicket(rewind_step=rewind), SaveAtEnd(ticket)]
    dense = jobs.converge("lottery_dense", build, data, keep, steps, None, root, args)

    def reinitialised() -> BertMLM:
        build()  # the draws the other runs' builds make, so the data order that follows is theirs
        with torch.random.fork_rng():
            torch.manual_seed(1)  # another initialisation than the dense round's (seed 0)
            return build()

    rounds = {
        "rewound": (build, LotteryTicket(sparsity=sparsity, ticket=ticket)),
        "reinit": (reinitialised, LotteryTicket(sparsity=sparsity, ticket=ticket, start="reinit")),
    }
    summaries = {"lottery_dense": dense}
    for name, (builder, technique) in rounds.items():
        summaries[f"ticket_{name}"] = jobs.converge(
            f"ticket_{name}", builder, data, [technique], steps, None, root, args
        )
    print(f"\n{format_table(list(summaries.values()))}")
    final = {name: final_loss(summary) for name, summary in summaries.items()}
    holds = final["ticket_rewound"] * (1 + args.tolerance) < final["ticket_reinit"]
    claim = "the rewound ticket beats the same mask on a fresh initialisation"
    details = (
        f"{1 + args.tolerance:g} x val/loss < the other's; rewound {final['ticket_rewound']:.4f} vs reinit "
        f"{final['ticket_reinit']:.4f}; dense {final['lottery_dense']:.4f}"
    )
    verdict(holds, claim, details)
    return {"sparsity": sparsity, "rewind_step": rewind, "final": final, "holds": holds,
            "summaries": list(summaries.values())}  # fmt: skip


PARTS: dict[str, tuple[str, Callable[[Context], dict[str, Any]]]] = {
    "mlm": ("1", mlm_part),
    "classify": ("2", classify_part),
    "overhead": ("3", overhead_part),
    "inference": ("4", inference_part),
    "lottery": ("5", lottery_part),
}
"""The parts, by name: their number and function (each returns its result, stored under its name)."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected parts; their results by part name, with each part's duration, also in ``--json``."""
    args = setup(parse_args(argv))
    context = Context(args, Path(tempfile.mkdtemp(prefix="sparse_training_")))
    return write_json(args.json, run_parts(PARTS, args.parts, context))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
