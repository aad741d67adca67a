"""Progressive ViT training (issue 26): ProgressiveResizing and AutoProg against fixed-size training, MoGrow, FLOPs.

Parts (``--parts`` picks some, by number or name; all by default):

1. ``resolution`` (the main part). A small ViT (``ViTClassifier``: hidden ``--hidden-size`` 128, FFN
   ``--ffn-size`` 512, ``--num-layers`` 4 blocks, ``--num-heads`` 4, patches of ``--patch-size`` 4) on
   Fashion-MNIST upsampled once to ``--image-size`` 64 (``ImageClassificationDataModule(resize_to=64)``:
   256 patches), batch ``--batch-size`` 64, ``--train-steps`` 400, AdamW at LR 1e-3 with 10% warmup
   then cosine decay over each run's own length; validation every ``--val-every`` 50 steps on
   ``--val-batches`` 8 batches. Three runs, each seeded alike (``pl.seed_everything(0)`` before its
   model is built: same weights, same batches), after a discarded 2-step warmup run:

   - ``baseline``: every step at the full size;
   - ``progressive_resizing``: ``ProgressiveResizing([(0, S/2), (0.4, 3S/4), (0.8, S)])`` (S = the
     image size, sides rounded to multiples of the patch: 32, 48, 64);
   - ``autoprog``: ``AutoProg(stages=[0, 0.25, 0.5, 0.75], image_sizes=[S/2, 3S/4, S],
     depths=[L/2, L], search_steps=--search-steps 4, tolerance=0.02, init="momentum",
     ema_decay=--ema-decay 0.95)``; its choices (step, chosen depth and side, every candidate's score and cost)
     are printed.

   Every run has an ``EfficiencyMonitor(monitor="val/accuracy", mode="max", peak_flops=1e11)`` (a
   fixed peak: nothing is measured) and records its final validation accuracy (a validation after
   ``fit`` over the same batches), its training time (``train_time_s``: validation excluded), its
   images/s over training, its counted FLOPs and its validation history. For each technique against
   the baseline: (a) the wall-clock ratio (training time / the baseline's); (b) the throughput ratio
   (images/s / the baseline's; AutoProg's "85.1%" is such a gain, 1.851x, on ImageNet); (c) the
   training time at which its history first reaches the baseline's final accuracy, over the
   baseline's training time (claim: <= 0.7x); (d) at equal wall-clock: a second run of the technique
   of ``round(--train-steps / ratio (a))`` steps (same schedule fractions, so its training time
   roughly equals the baseline's), its final accuracy minus the baseline's in points (claim: >= -0.5)
   and the time ratio it actually got. Claims (c) and (d) are printed MET / NOT MET.

2. ``native``: baseline against ``progressive_resizing`` at the data's own 28x28 (49 patches of 4),
   schedule ``[(0, 16), (0.4, 20), (0.8, 28)]``, the same steps: wall-clock and throughput ratios and
   the final accuracy difference (reference, no claim).

3. ``mogrow``: ``ProgressiveStacking(stages={0: L/2, G: L}, rule="stack")`` on the same ViT at 28x28
   for ``--mogrow-steps`` 300, G = 40% of them, ``init="copy"`` against ``init="momentum"``
   (``ema_decay=--mogrow-decay`` 0.95: AutoProg's 0.998-0.9996 average over thousands of steps, our stages
   are 100-200 steps long, and the average starts at the initial weights). For both: the training loss of the first step after the
   growth and its mean over the 10 steps after it (each step's ``outputs["loss"]``); the validation
   loss and accuracy just before and just after the growth (computed by hand at step G, on the first
   ``--val-batches`` x ``--batch-size`` validation images, before and after the callback grows the
   model; the seconds this takes are taken off the training times after G); and the training time to
   the copy run's final accuracy, momentum's over copy's.

4. ``flops``: the monitor's counted FLOPs per training step at each side S/2, 3S/4, S of the
   S-pixel model (``ProgressiveResizing`` with an int-step schedule, ``--flops-steps`` steps per
   side, ``monitor.last_step["flops"]`` read after each step) against the analytic count written out
   here (:func:`analytic_train_flops`): per image, the patch convolution ``2 P (p^2 C) h`` twice (its
   input needs no gradient: forward and weight gradient), and 3x the forward of the blocks
   ``L (2 n (4 h^2 + 2 h f) + 4 n^2 h)`` (n = P + 1 tokens) and of the head ``2 h labels``. The ratio
   measured / analytic should be 1.000 at every side.

``--json OUT`` writes every number (each part under its name; the claims as booleans under
``verdicts``). The harness's ``--rounds --steps --warmup`` are unused (the runs are trained one after
the other, not interleaved); ``--threads`` sets torch's threads. One seed: accuracy differences of a
few tenths of a point are within a seed's noise at these run lengths; the runs are sequential, so
their time ratios carry the machine's noise.

Time: 37 minutes on 2 idle cores (part 1: 34 min, the baseline's 400 steps at 64x64 took 512 s of
training; part 2: 83 s; part 3: 71 s; part 4: 4 s). The full run, then a smoke run (on a machine that
other work shares, add ``--threads 1``):

    python benchmarks/vit_progressive.py --json runs/bench/vit_progressive.json
    python benchmarks/vit_progressive.py --threads 1 --train-steps 28 --val-every 2 --val-batches 1 --batch-size 8 \
        --hidden-size 32 --ffn-size 37 --num-layers 2 --image-size 32 --search-steps 1 --mogrow-steps 6  # ~7 s
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from benchmarks import jobs
from benchmarks.harness import benchmark_trainer, harness_arguments, run_parts, setup, write_json
from lightning_efficient import (
    AutoProg,
    EfficiencyMonitor,
    ImageClassificationDataModule,
    ProgressiveResizing,
    ProgressiveStacking,
    ViTClassifier,
)
from lightning_efficient.callbacks.autoprog import candidate_cost

PEAK_FLOPS = 1e11
"""The monitors' peak FLOP/s: a fixed number, so that no run measures the machine (MFU is not reported)."""
TIME_CLAIM = 0.7
"""Claim (c): a technique reaches the baseline's final accuracy in at most this share of its training time."""
ACCURACY_CLAIM = -0.5
"""Claim (d): at equal wall-clock a technique's final accuracy is at least the baseline's plus this many points."""
PAPER_THROUGHPUT = 1.851
"""AutoProg's reported training-throughput gain on ImageNet ("85.1%"), for reference."""
SIDE_FRACTIONS = (0.5, 0.75, 1.0)
"""The sides of resizing and AutoProg, as shares of the full side (rounded to multiples of the patch)."""
RESIZE_STARTS = (0, 0.4, 0.8)
"""ProgressiveResizing's schedule: where each side starts (step 0, then shares of the run)."""
AUTOPROG_STAGES = [0, 0.25, 0.5, 0.75]
GROW_AT = 0.4
"""MoGrow: the growth step as a share of ``--mogrow-steps``."""
AFTER_GROWTH = 10
"""MoGrow: training steps after the growth whose mean loss is reported."""
NATIVE_SIZE = 28
"""Fashion-MNIST's own side."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (harness, model, each part's); ``--parts`` comes back as names, in the parts' order."""
    parser = harness_arguments(__doc__, rounds=1, steps=1, warmup=0)
    parser.add_argument(
        "--parts",
        nargs="+",
        default=list(PARTS),
        metavar="PART",
        choices=[*PARTS, *(number for number, _ in PARTS.values())],
        help=f"parts to run, by name or number: {', '.join(f'{n}={k}' for k, (n, _) in PARTS.items())}",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="efficiency.json files (default: a new temp dir)")
    group = parser.add_argument_group("model and training")
    group.add_argument("--image-size", type=int, default=64, help="side the images are upsampled to (parts 1, 4)")
    group.add_argument("--patch-size", type=int, default=4)
    group.add_argument("--hidden-size", type=int, default=128)
    group.add_argument("--ffn-size", type=int, default=512)
    group.add_argument("--num-layers", type=int, default=4)
    group.add_argument("--num-heads", type=int, default=4)
    group.add_argument("--batch-size", type=int, default=64)
    group.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW's peak LR")
    group.add_argument("--warmup-fraction", type=float, default=0.1, help="share of linear LR warmup (then cosine)")
    group.add_argument("--train-steps", type=int, default=400, help="steps of the baseline and of each technique")
    group.add_argument("--val-every", type=int, default=50, help="validate every this many steps")
    group.add_argument("--val-batches", type=int, default=8, help="validation batches (of --batch-size images)")
    group = parser.add_argument_group("part 1: AutoProg")
    group.add_argument("--search-steps", type=int, default=4, help="AutoProg: steps of each candidate per search")
    group.add_argument("--tolerance", type=float, default=0.02, help="AutoProg: relative loss tolerance of a choice")
    group.add_argument(
        "--ema-decay",
        type=float,
        default=0.95,
        help="AutoProg: MoGrow's moving-average decay (horizon ~20 steps: well below a stage)",
    )
    group = parser.add_argument_group("part 3: MoGrow")
    group.add_argument("--mogrow-steps", type=int, default=300, help="steps of each ProgressiveStacking run")
    group.add_argument(
        "--mogrow-decay",
        type=float,
        default=0.95,
        help="ema_decay of init='momentum' (horizon ~20 steps: well below a stage)",
    )
    group = parser.add_argument_group("part 4: FLOPs")
    group.add_argument("--flops-steps", type=int, default=2, help="steps trained at each side")
    args = parser.parse_args(argv)
    args.parts = sorted(
        {name for name, (number, _) in PARTS.items() if {name, number} & set(args.parts)},
        key=lambda name: int(PARTS[name][0]),
    )
    counts = ("train_steps", "val_every", "val_batches", "batch_size", "mogrow_steps", "flops_steps", "search_steps")
    for name in counts:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.num_layers < 2:
        parser.error(f"--num-layers={args.num_layers} must be >= 2 (the techniques grow from half the depth)")
    for side in (args.image_size, NATIVE_SIZE):
        if side % args.patch_size or len(sides(side, args.patch_size)) < 3:
            parser.error(f"--patch-size={args.patch_size} must divide {side} into a grid of at least 3 sides")
    if args.mogrow_steps < 2:
        parser.error(f"--mogrow-steps={args.mogrow_steps} must be >= 2 (training before and after the growth)")
    if "resolution" in args.parts:
        least = autoprog_min_steps(args)
        if args.train_steps < least:
            parser.error(
                f"--train-steps={args.train_steps} is too short for AutoProg's searches (each stage must hold "
                f"{2 * len(sides(args.image_size, args.patch_size))} candidates x --search-steps={args.search_steps} "
                "steps + 1): "
                f"give at least {least}, or lower --search-steps"
            )
    return args


# -- sizes and schedules ---------------------------------------------------------------------------
def sides(size: int, patch: int) -> list[int]:
    """The sides ``SIDE_FRACTIONS`` of ``size``, each rounded to a multiple of ``patch`` (distinct, increasing).

    Examples:
        >>> sides(64, 4), sides(28, 4), sides(32, 4)
        ([32, 48, 64], [16, 20, 28], [16, 24, 32])
    """
    found = sorted({max(patch, math.floor(size * share / patch + 0.5) * patch) for share in SIDE_FRACTIONS})
    return [side for side in found if side <= size]


def resize_schedule(size: int, patch: int) -> list[tuple[int | float, int]]:
    """ProgressiveResizing's schedule for a ``size``-pixel model: ``[(0, S/2), (0.4, 3S/4), (0.8, S)]``."""
    return list(zip(RESIZE_STARTS, sides(size, patch)))


def shallow(args: argparse.Namespace) -> int:
    """The depth the depth-growing runs start from: half the blocks (rounded up, so one growth reaches all)."""
    return (args.num_layers + 1) // 2


def autoprog(args: argparse.Namespace) -> AutoProg:
    """A fresh AutoProg of the options (the issue's arguments, ``--search-steps`` and ``--tolerance`` aside)."""
    return AutoProg(
        stages=AUTOPROG_STAGES, image_sizes=sides(args.image_size, args.patch_size),
        depths=[shallow(args), args.num_layers], search_steps=args.search_steps, tolerance=args.tolerance,
        init="momentum", ema_decay=args.ema_decay, rule="stack",
    )  # fmt: skip


def autoprog_min_steps(args: argparse.Namespace) -> int:
    """The fewest steps whose AutoProg stages each hold the longest search and one more step."""
    candidates = 2 * len(sides(args.image_size, args.patch_size))  # the first search: both depths x every side
    need = candidates * args.search_steps
    steps = 1
    while True:
        starts = [round(share * steps) if isinstance(share, float) else share for share in AUTOPROG_STAGES]
        if all(end - start > need for start, end in itertools.pairwise(starts[1:])):
            return steps
        steps += 1


def analytic_train_flops(
    side: int, patch: int, channels: int, hidden: int, ffn: int, layers: int, labels: int
) -> float:
    """Model FLOPs of one image's training step (forward + backward) at ``side x side``, by the counter's rules.

    ``P = (side / patch)^2`` patches, ``n = P + 1`` tokens. The patch convolution (a matmul of
    ``P x (patch^2 C)`` by ``(patch^2 C) x h``) is counted twice, its forward and its weight gradient
    (the pixels need no gradient); the blocks (four projections, two FFN layers, the attention scores
    and their product with the values) and the head three times (forward, input and weight gradients).

    Examples:
        >>> analytic_train_flops(side=8, patch=4, channels=1, hidden=2, ffn=4, layers=1, labels=3)  # P = 4, n = 5
        2108.0
    """
    patches = (side // patch) ** 2
    tokens = patches + 1
    embedding = 2 * patches * (patch * patch * channels) * hidden
    blocks = layers * (2 * tokens * (4 * hidden**2 + 2 * hidden * ffn) + 4 * tokens**2 * hidden)
    head = 2 * hidden * labels
    return float(2 * embedding + 3 * (blocks + head))


# -- training --------------------------------------------------------------------------------------
def verdict(holds: bool, claim: str, details: str) -> bool:
    """Print ``MET: claim (details)`` or ``NOT MET: ...``; return ``holds``."""
    print(f"{'MET' if holds else 'NOT MET'}: {claim} ({details})")
    return bool(holds)


class StepLosses(pl.Callback):
    """Each training step's loss, by the optimizer step it trained at (``losses[step]``)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self._step = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses[self._step] = float(outputs["loss"])


class ValidateAt(pl.Callback):
    """At the start of the batch of optimizer step ``step``, the validation loss and accuracy, computed by hand.

    Placed before a growing callback it sees the model before the growth, after it the grown model.
    It reads the first ``images`` validation images straight from the data module's tensors (no
    DataLoader: no random numbers drawn), in eval mode under ``torch.no_grad``.

    Attributes:
        result: ``{"loss", "accuracy", "seconds"}`` once done, else None.
    """

    def __init__(self, step: int, data: ImageClassificationDataModule, images: int, batch_size: int) -> None:
        self.step, self.data, self.images, self.batch_size = step, data, images, batch_size
        self.result: dict[str, float] | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step or self.result is not None:
            return
        start = time.perf_counter()
        pixels, labels = (tensor[: self.images] for tensor in self.data.splits["val"])
        loss = correct = 0.0
        pl_module.eval()
        with torch.no_grad():
            for first in range(0, len(labels), self.batch_size):
                x = pixels[first : first + self.batch_size].to(pl_module.device)
                y = labels[first : first + self.batch_size].to(pl_module.device)
                logits = pl_module(x).float()
                loss += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += float((logits.argmax(-1) == y).sum())
        pl_module.train()
        seconds = time.perf_counter() - start
        self.result = {"loss": loss / len(labels), "accuracy": correct / len(labels), "seconds": seconds}


class FlopsReader(pl.Callback):
    """After each training step, the monitor's ``last_step`` with the side that step trained at.

    Put it after the monitor in the trainer's callbacks (its ``on_train_batch_end`` runs after the monitor's).
    """

    def __init__(self, monitor: EfficiencyMonitor, resize: ProgressiveResizing) -> None:
        self.monitor, self.resize = monitor, resize
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        last = self.monitor.last_step
        self.steps.append({"side": self.resize.size, "samples": last["samples"], "flops": last["flops"]})


def warmup(build: Callable[[], pl.LightningModule], data: pl.LightningDataModule) -> None:
    """A discarded 2-step run: first-run costs (threads, allocator, caches) stay out of the measured runs."""
    pl.seed_everything(0, verbose=False)
    benchmark_trainer(max_steps=2).fit(build(), data)


def train(
    name: str,
    build: Callable[[], pl.LightningModule],
    data: pl.LightningDataModule,
    callbacks: list[pl.Callback],
    steps: int,
    root: Path,
    args: argparse.Namespace,
    after: list[pl.Callback] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Seed 0, build, fit ``steps`` validating every ``--val-every``, then validate once more.

    ``callbacks`` come before the run's ``EfficiencyMonitor`` in the trainer, ``after`` after it.

    Returns:
        The run's record (steps, final accuracy, training time, images/s, FLOPs, history) and the
        monitor's whole summary.
    """
    pl.seed_everything(0, verbose=False)
    model = build()
    monitor = EfficiencyMonitor(monitor="val/accuracy", mode="max", peak_flops=PEAK_FLOPS)
    trainer = benchmark_trainer(
        max_steps=steps, val_check_interval=args.val_every, check_val_every_n_epoch=None,
        limit_val_batches=args.val_batches, default_root_dir=root / name,
        callbacks=[*callbacks, monitor, *(after or [])],
    )  # fmt: skip
    trainer.fit(model, data)
    (metrics,) = trainer.validate(model, data, verbose=False)
    summary = dict(monitor.summary or {})
    seconds = summary["train_time_s"]
    record = {
        "steps": steps,
        "final_accuracy": float(metrics["val/accuracy"]),
        "final_loss": float(metrics["val/loss"]),
        "train_time_s": seconds,
        "images_per_s": summary["samples"] / seconds,
        "samples": summary["samples"],
        "total_flops": summary["total_flops"],
        "history": [{key: point[key] for key in ("step", "value", "train_time_s", "flops")} for point in summary["history"]],
    }  # fmt: skip
    print(f"{name}: val/accuracy {record['final_accuracy']:.4f} after {steps} steps, {seconds:.1f} s training "
          f"({record['images_per_s']:.1f} images/s, {record['total_flops'] / 1e12:.3f} TFLOPs)")  # fmt: skip
    return record, summary


def print_rows(header: list[str], rows: list[list[str]]) -> None:
    """A plain table: the first column left-aligned, the others right-aligned."""
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print()
    for line in lines:
        print(line[0].ljust(widths[0]) + "".join(cell.rjust(width + 3) for cell, width in zip(line[1:], widths[1:])))


def ratio_text(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# -- the shared work -------------------------------------------------------------------------------
@dataclass
class Context:
    """What the parts share.

    Attributes:
        args: The parsed options.
        root: Where the runs' efficiency.json files go.
        data: Data modules by image side, set up for ``fit`` when first asked for.
    """

    args: argparse.Namespace
    root: Path
    data: dict[int, ImageClassificationDataModule] = field(default_factory=dict)

    def images(self, size: int) -> ImageClassificationDataModule:
        """Fashion-MNIST at ``size`` pixels (upsampled once at setup unless it is the native 28)."""
        if size not in self.data:
            resize = None if size == NATIVE_SIZE else size
            data = ImageClassificationDataModule(batch_size=self.args.batch_size, resize_to=resize)
            data.setup("fit")
            self.data[size] = data
        return self.data[size]

    def model(self, size: int) -> ViTClassifier:
        """A fresh ViT of the options for ``size``-pixel images."""
        args, arguments = self.args, self.images(size).model_arguments()
        return ViTClassifier(
            num_labels=arguments["num_labels"], label_names=arguments["label_names"], image_size=size,
            patch_size=args.patch_size, preset="small", hidden_size=args.hidden_size, num_layers=args.num_layers,
            num_heads=args.num_heads, ffn_size=args.ffn_size, learning_rate=args.learning_rate,
            warmup_fraction=args.warmup_fraction, lr_schedule="cosine",
        )  # fmt: skip

    def job_line(self, size: int) -> str:
        args = self.args
        patches = (size // args.patch_size) ** 2
        return (
            f"ViT hidden {args.hidden_size}, FFN {args.ffn_size}, {args.num_layers} blocks, {args.num_heads} heads, "
            f"{size}x{size} images ({patches} patches of {args.patch_size}), batch {args.batch_size}, "
            f"{torch.get_num_threads()} thread(s)"
        )


def compare(base: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """A technique's run against the baseline's: time and throughput ratios, time to the baseline's final accuracy."""
    target = base["final_accuracy"]
    step, seconds = jobs.reached(run, target, mode="max")
    return {
        "wall_clock_ratio": run["train_time_s"] / base["train_time_s"],
        "throughput_ratio": run["images_per_s"] / base["images_per_s"],
        "flops_ratio": run["total_flops"] / base["total_flops"],
        "accuracy_difference_points": 100 * (run["final_accuracy"] - target),
        "target_step": step,
        "time_to_target_ratio": None if seconds is None else seconds / base["train_time_s"],
    }


# -- part 1: resolution ----------------------------------------------------------------------------
def resolution_part(context: Context) -> dict[str, Any]:
    """Part 1: baseline, ProgressiveResizing and AutoProg at the full size; then each at the baseline's time."""
    args, size = context.args, context.args.image_size
    data, root = context.images(size), context.root / "resolution"
    schedule = resize_schedule(size, args.patch_size)
    print(f"\nPart 1: {context.job_line(size)}; {args.train_steps} steps, validation every {args.val_every} on "
          f"{args.val_batches} batches")  # fmt: skip
    print(f"ProgressiveResizing schedule {schedule}; AutoProg stages {AUTOPROG_STAGES}, sides "
          f"{sides(size, args.patch_size)}, depths {[shallow(args), args.num_layers]}, search_steps "
          f"{args.search_steps}")  # fmt: skip

    def build() -> ViTClassifier:
        return context.model(size)

    def technique(name: str) -> pl.Callback:
        return ProgressiveResizing(schedule) if name == "progressive_resizing" else autoprog(args)

    warmup(build, data)
    base, _ = train("baseline", build, data, [], args.train_steps, root, args)
    runs: dict[str, dict[str, Any]] = {"baseline": base}
    results: dict[str, dict[str, Any]] = {}
    choices: dict[str, list[dict[str, Any]]] = {}
    for name in ("progressive_resizing", "autoprog"):
        callback = technique(name)
        runs[name], _ = train(name, build, data, [callback], args.train_steps, root, args)
        results[name] = compare(base, runs[name])
        if isinstance(callback, AutoProg):
            choices[name] = callback.choices
    print("\nAt the baseline's wall-clock:")
    least = autoprog_min_steps(args)
    for name in ("progressive_resizing", "autoprog"):
        steps = round(args.train_steps / results[name]["wall_clock_ratio"])
        if name == "autoprog" and steps < least:
            print(f"autoprog: {steps} steps are too few for its searches; trained {least}")
            steps = least
        callback = technique(name)
        label = f"{name}_equal_time"
        runs[label], _ = train(label, build, data, [callback], steps, root, args)
        results[name]["equal_time"] = {
            "steps": steps,
            "time_ratio": runs[label]["train_time_s"] / base["train_time_s"],
            "accuracy_difference_points": 100 * (runs[label]["final_accuracy"] - base["final_accuracy"]),
        }
        if isinstance(callback, AutoProg):
            choices[label] = callback.choices

    base_step, base_seconds = jobs.reached(base, base["final_accuracy"], mode="max")
    header = ["run", "steps", "val acc", "train s", "images/s", "time ratio", "throughput", "FLOPs ratio", "to target"]
    rows = [["baseline", str(base["steps"]), f"{base['final_accuracy']:.4f}", f"{base['train_time_s']:.1f}",
             f"{base['images_per_s']:.1f}", "1.000", "1.000", "1.000",
             ratio_text(None if base_seconds is None else base_seconds / base["train_time_s"])]]  # fmt: skip
    for name in ("progressive_resizing", "autoprog"):
        run, numbers = runs[name], results[name]
        rows.append([name, str(run["steps"]), f"{run['final_accuracy']:.4f}", f"{run['train_time_s']:.1f}",
                     f"{run['images_per_s']:.1f}", f"{numbers['wall_clock_ratio']:.3f}",
                     f"{numbers['throughput_ratio']:.3f}", f"{numbers['flops_ratio']:.3f}",
                     ratio_text(numbers["time_to_target_ratio"])])  # fmt: skip
        equal = runs[f"{name}_equal_time"]
        rows.append([f"{name}, equal time", str(equal["steps"]), f"{equal['final_accuracy']:.4f}",
                     f"{equal['train_time_s']:.1f}", f"{equal['images_per_s']:.1f}",
                     f"{numbers['equal_time']['time_ratio']:.3f}", f"{equal['images_per_s'] / base['images_per_s']:.3f}",
                     f"{equal['total_flops'] / base['total_flops']:.3f}", "-"])  # fmt: skip
    print_rows(header, rows)
    print("time ratio: training time / the baseline's; throughput: images/s / the baseline's; to target: training "
          f"time to the baseline's final accuracy {base['final_accuracy']:.4f} / the baseline's training time "
          f"(the baseline reaches it at step {base_step})")  # fmt: skip

    for name, entries in choices.items():
        print(f"\n{name}'s choices:")
        for entry in entries:
            depth, side = entry["candidates"][entry["chosen"]]
            scores = ", ".join(f"{d}x{s}: {score:.4f}" for (d, s), score in zip(entry["candidates"], entry["scores"]))
            print(f"  step {entry['step']}: depth {depth}, side {side} (depth x side: mean search loss: {scores})")

    print()
    verdicts: dict[str, bool] = {}
    for name in ("progressive_resizing", "autoprog"):
        numbers = results[name]
        print(f"{name}: wall-clock {numbers['wall_clock_ratio']:.3f}x the baseline's, throughput "
              f"{numbers['throughput_ratio']:.3f}x" + (f" (AutoProg's paper: {PAPER_THROUGHPUT}x on ImageNet)"
                                                       if name == "autoprog" else ""))  # fmt: skip
        ratio = numbers["time_to_target_ratio"]
        if ratio is None:
            details = f"never reaches {base['final_accuracy']:.4f}; final {runs[name]['final_accuracy']:.4f}"
        else:
            details = f"{ratio:.3f}x the baseline's training time, at step {numbers['target_step']}"
        verdicts[f"{name}/time_to_target"] = verdict(
            ratio is not None and ratio <= TIME_CLAIM,
            f"{name} reaches the baseline's final accuracy in <= {TIME_CLAIM}x its time", details,
        )  # fmt: skip
        equal = numbers["equal_time"]
        verdicts[f"{name}/equal_time_accuracy"] = verdict(
            equal["accuracy_difference_points"] >= ACCURACY_CLAIM,
            f"{name} at equal wall-clock: final accuracy within {-ACCURACY_CLAIM} points of the baseline's",
            f"{equal['accuracy_difference_points']:+.2f} points in {equal['steps']} steps, time ratio "
            f"{equal['time_ratio']:.3f}",
        )  # fmt: skip
    return {"image_size": size, "schedule": [list(pair) for pair in schedule], "runs": runs, "results": results,
            "autoprog_choices": choices, "verdicts": verdicts}  # fmt: skip


# -- part 2: native 28x28 ----------------------------------------------------------------------------
def native_part(context: Context) -> dict[str, Any]:
    """Part 2: baseline against ProgressiveResizing at the data's own 28x28 (reference)."""
    args = context.args
    data, root = context.images(NATIVE_SIZE), context.root / "native"
    schedule = resize_schedule(NATIVE_SIZE, args.patch_size)
    print(f"\nPart 2: {context.job_line(NATIVE_SIZE)}; ProgressiveResizing {schedule}, {args.train_steps} steps")

    def build() -> ViTClassifier:
        return context.model(NATIVE_SIZE)

    warmup(build, data)
    base, _ = train("baseline", build, data, [], args.train_steps, root, args)
    run, _ = train("progressive_resizing", build, data, [ProgressiveResizing(schedule)], args.train_steps, root, args)
    numbers = compare(base, run)
    print(f"info: at {NATIVE_SIZE}x{NATIVE_SIZE} ProgressiveResizing's wall-clock is {numbers['wall_clock_ratio']:.3f}x "
          f"the baseline's, throughput {numbers['throughput_ratio']:.3f}x, final accuracy "
          f"{numbers['accuracy_difference_points']:+.2f} points, time to the baseline's final accuracy "
          f"{ratio_text(numbers['time_to_target_ratio'])}x")  # fmt: skip
    return {"image_size": NATIVE_SIZE, "schedule": [list(pair) for pair in schedule],
            "runs": {"baseline": base, "progressive_resizing": run}, "results": numbers}  # fmt: skip


# -- part 3: MoGrow ----------------------------------------------------------------------------------
def mogrow_part(context: Context) -> dict[str, Any]:
    """Part 3: ProgressiveStacking's copy against momentum (MoGrow) initialisation of the new blocks."""
    args = context.args
    data, root = context.images(NATIVE_SIZE), context.root / "mogrow"
    steps = args.mogrow_steps
    grow = min(steps - 1, max(1, round(GROW_AT * steps)))
    stages = {0: shallow(args), grow: args.num_layers}
    images = args.val_batches * args.batch_size
    print(f"\nPart 3: {context.job_line(NATIVE_SIZE)}; ProgressiveStacking {stages}, {steps} steps, copy vs momentum "
          f"(ema_decay {args.mogrow_decay})")  # fmt: skip

    def build() -> ViTClassifier:
        return context.model(NATIVE_SIZE)

    warmup(build, data)
    runs: dict[str, dict[str, Any]] = {}
    for init in ("copy", "momentum"):
        stacking = ProgressiveStacking(stages, rule="stack", init=init, ema_decay=args.mogrow_decay)
        before, after = (ValidateAt(grow, data, images, args.batch_size) for _ in range(2))
        losses = StepLosses()
        record, _ = train(f"{init}", build, data, [before, stacking, after, losses], steps, root, args)
        probe = sum(check.result["seconds"] for check in (before, after) if check.result)
        for point in record["history"]:  # the hand validations at the growth step are not training
            if point["step"] > grow:
                point["train_time_s"] -= probe
        record["train_time_s"] -= probe
        record["images_per_s"] = record["samples"] / record["train_time_s"]
        following = [losses.losses[step] for step in range(grow, min(steps, grow + AFTER_GROWTH))]
        record.update(
            loss_before_growth=losses.losses.get(grow - 1),
            loss_first_step_after_growth=losses.losses[grow],
            loss_mean_after_growth=sum(following) / len(following),
            loss_steps_averaged=len(following),
            val_before_growth=before.result,
            val_after_growth=after.result,
            validation_probe_s=probe,
        )
        runs[init] = record
    target = runs["copy"]["final_accuracy"]
    times = {}
    for init, record in runs.items():
        step, seconds = jobs.reached(record, target, mode="max")
        times[init] = record["train_time_s"] if seconds is None else seconds
        record.update(target_step=step, time_to_target_s=seconds)
    ratio = None if runs["momentum"]["time_to_target_s"] is None else times["momentum"] / times["copy"]

    header = ["init", "loss before", "1st after", f"mean {AFTER_GROWTH} after", "val loss before", "val loss after",
              "val acc after", "final acc", "to target s"]  # fmt: skip
    rows = [[init, ratio_text(r["loss_before_growth"], 4), f"{r['loss_first_step_after_growth']:.4f}",
             f"{r['loss_mean_after_growth']:.4f}", f"{r['val_before_growth']['loss']:.4f}",
             f"{r['val_after_growth']['loss']:.4f}", f"{r['val_after_growth']['accuracy']:.4f}",
             f"{r['final_accuracy']:.4f}", ratio_text(r["time_to_target_s"], 1)] for init, r in runs.items()]  # fmt: skip
    print_rows(header, rows)
    print(
        f"growth at step {grow} ({stages}); losses are training losses by step; val: the first {images} "
        f"validation images just before and after the growth; target: copy's final accuracy {target:.4f}"
    )
    print(f"info: momentum's training time to copy's final accuracy is {ratio_text(ratio)}x copy's; its first "
          f"loss after growth {runs['momentum']['loss_first_step_after_growth']:.4f} vs copy's "
          f"{runs['copy']['loss_first_step_after_growth']:.4f}")  # fmt: skip
    return {"grow_step": grow, "stages": {str(k): v for k, v in stages.items()}, "target": target, "runs": runs,
            "time_to_target_ratio": ratio}  # fmt: skip


# -- part 4: FLOPs ------------------------------------------------------------------------------------
def flops_part(context: Context) -> dict[str, Any]:
    """Part 4: the monitor's FLOPs per step at each side against the analytic count."""
    args, size = context.args, context.args.image_size
    data = context.images(size)
    each = args.flops_steps
    grid = sides(size, args.patch_size)
    schedule = [(i * each, side) for i, side in enumerate(grid)]
    print(f"\nPart 4: {context.job_line(size)}; counted FLOPs per training step at sides {grid} "
          f"({each} steps each: ProgressiveResizing {schedule})")  # fmt: skip
    pl.seed_everything(0, verbose=False)
    model = context.model(size)
    resize = ProgressiveResizing(schedule)
    monitor = EfficiencyMonitor(monitor="val/accuracy", mode="max", peak_flops=PEAK_FLOPS)
    reader = FlopsReader(monitor, resize)
    trainer = benchmark_trainer(max_steps=each * len(grid), default_root_dir=context.root / "flops",
                                callbacks=[resize, monitor, reader])  # fmt: skip
    trainer.fit(model, data)
    labels = data.model_arguments()["num_labels"]
    per_side: dict[str, dict[str, Any]] = {}
    for side in grid:
        steps = [step for step in reader.steps if step["side"] == side]
        per_image = analytic_train_flops(side, args.patch_size, 1, args.hidden_size, args.ffn_size,
                                         args.num_layers, labels)  # fmt: skip
        ratios = [step["flops"] / (step["samples"] * per_image) for step in steps]
        per_side[str(side)] = {
            "steps": len(steps),
            "measured_per_step": [step["flops"] for step in steps],
            "analytic_per_step": [step["samples"] * per_image for step in steps],
            "analytic_per_image": per_image,
            "blocks_forward_per_image": candidate_cost(
                args.num_layers, side, args.patch_size, args.hidden_size, args.ffn_size
            ),
            "ratio": ratios[0] if ratios and max(ratios) == min(ratios) else ratios,
        }
    full = per_side[str(size)]["analytic_per_image"]
    header = ["side", "patches", "measured / step", "analytic / step", "measured / analytic", "vs full size"]
    rows = []
    for side, numbers in per_side.items():
        ratio = numbers["ratio"]
        shown = f"{ratio:.6f}" if isinstance(ratio, float) else ", ".join(f"{r:.6f}" for r in ratio)
        rows.append([side, str((int(side) // args.patch_size) ** 2), f"{numbers['measured_per_step'][0]:.4g}",
                     f"{numbers['analytic_per_step'][0]:.4g}", shown,
                     f"{numbers['analytic_per_image'] / full:.3f}"])  # fmt: skip
    print_rows(header, rows)
    exact = all(numbers["ratio"] == 1.0 for numbers in per_side.values())
    print(f"{'exact' if exact else 'NOT exact'}: the counted FLOPs {'equal' if exact else 'differ from'} the analytic "
          "count at every side")  # fmt: skip
    return {"sides": per_side, "exact": exact}


PARTS: dict[str, tuple[str, Callable[[Context], dict[str, Any]]]] = {
    "resolution": ("1", resolution_part),
    "native": ("2", native_part),
    "mogrow": ("3", mogrow_part),
    "flops": ("4", flops_part),
}
"""The parts, by name: their number and function (each returns its result, stored under its name)."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected parts; their results by part name, with each part's duration and the claims, also in ``--json``."""
    args = setup(parse_args(argv))
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="vit_progressive_"))
    root.mkdir(parents=True, exist_ok=True)
    result = run_parts(PARTS, args.parts, Context(args, root))
    result["verdicts"] = {key: holds for name in args.parts for key, holds in result[name].get("verdicts", {}).items()}
    if result["verdicts"]:
        print("\nSummary")
        for key, holds in result["verdicts"].items():
            print(f"  {'MET' if holds else 'NOT MET'}: {key}")
    print(f"total {sum(result['seconds'].values()):.0f} s; efficiency.json files in {root}")
    return write_json(args.json, result)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
