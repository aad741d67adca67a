"""The work the benchmark scripts share: the main MLM job, Brown-prose classification, runs to a target.

:mod:`benchmarks.harness` times and compares; this module builds what is timed and trained, so a
script states only its claim:

- the main job (``configs/bert/small_mlm.yaml``): its options (:func:`mlm_arguments`), its data
  (:func:`mlm_data`), a ``BertMLM`` of the options' size (:func:`mlm_module`, with :data:`MAIN_JOB`
  for the main job's training settings) and the line that describes it (:func:`mlm_job_line`);
- Brown-prose classification (``TextClassificationDataModule(label_map=BROWN_PROSE)``, or a user's
  labelled files): :func:`prose_arguments`, :func:`prose_data`, :func:`prose_classifier`, and
  :func:`validation_accuracy`;
- time to a target validation loss, baseline then technique, one run after the other:
  :func:`target_arguments`, :func:`step_time_part`, :func:`baseline_run`, :func:`converge`,
  :func:`reached`.

Example::

    args = mlm_arguments(harness_arguments("demo")).parse_args(["--preset", "tiny", "--vocab-size", "300"])
    data = mlm_data(args)
    module = mlm_module(data.vocab_size, args, **MAIN_JOB)
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks.harness import Variant, benchmark_trainer, interleave, report
from lightning_efficient import (
    BROWN_PROSE,
    BertClassifier,
    BertMLM,
    EfficiencyMonitor,
    MLMDataModule,
    TextClassificationDataModule,
)
from lightning_efficient.errors import check_choice
from lightning_efficient.models.presets import PRESETS

__all__ = [
    "MAIN_JOB",
    "baseline_run",
    "converge",
    "counted_flops",
    "mlm_arguments",
    "mlm_data",
    "mlm_job_line",
    "mlm_module",
    "prose_arguments",
    "prose_classifier",
    "prose_data",
    "reached",
    "step_time_part",
    "target_arguments",
    "validation_accuracy",
]

MAIN_JOB: dict[str, Any] = {
    "mlm_probability": 0.15,
    "head_on_masked_only": True,
    "dropout": 0.1,
    "learning_rate": 1e-3,
    "weight_decay": 0.01,
    "warmup_fraction": 0.1,
}
"""``BertMLM`` training settings of ``configs/bert/small_mlm.yaml`` (the main job); size and length are options."""


# -- the main job: BERT MLM on the embedded corpus -------------------------------------------------
def mlm_arguments(
    parser: argparse.ArgumentParser, preset: str = "small", batch_size: int = 32, max_length: int = 128
) -> argparse.ArgumentParser:
    """Add the MLM job's options: ``--preset --train-files --batch-size --max-length --vocab-size --seed``.

    Args:
        parser: A parser from :func:`~benchmarks.harness.harness_arguments`.
        preset: Default model size (the main job's: small).
        batch_size: Default blocks per batch.
        max_length: Default tokens per packed block.

    Returns:
        ``parser``, for chaining.
    """
    group = parser.add_argument_group("MLM job")
    group.add_argument("--preset", default=preset, choices=sorted(PRESETS), help="model size (main job: small)")
    group.add_argument("--train-files", nargs="+", default=None, help="text files (default: embedded Austen + Brown)")
    group.add_argument("--batch-size", type=int, default=batch_size)
    group.add_argument(
        "--max-length", type=int, default=max_length, help="tokens per packed block (every batch is full)"
    )
    group.add_argument("--vocab-size", type=int, default=30522, help="target WordPiece size (cached after first run)")
    group.add_argument("--seed", type=int, default=0)
    return parser


def mlm_data(args: argparse.Namespace) -> MLMDataModule:
    """``MLMDataModule`` from the options of :func:`mlm_arguments`, set up for ``fit`` (tokenizer trained or cached)."""
    datamodule = MLMDataModule(
        train_files=args.train_files, vocab_size=args.vocab_size, max_length=args.max_length, batch_size=args.batch_size
    )
    datamodule.setup("fit")
    return datamodule


def mlm_module(vocab_size: int, args: argparse.Namespace, **overrides: Any) -> BertMLM:
    """A ``BertMLM`` of the options' ``--preset``, ``--max-length`` and ``--seed``; ``overrides``: its other arguments.

    Pass ``**MAIN_JOB`` for the main job's training settings (``BertMLM``'s defaults otherwise).
    """
    return BertMLM(vocab_size=vocab_size, preset=args.preset, max_length=args.max_length, seed=args.seed, **overrides)


def mlm_job_line(args: argparse.Namespace, vocab_size: int) -> str:
    """``"BERT-small MLM, batch 32 x 128 tokens, vocab 30522, 2 threads"``: what a script prints first."""
    return (
        f"BERT-{args.preset} MLM, batch {args.batch_size} x {args.max_length} tokens, vocab {vocab_size}, "
        f"{torch.get_num_threads()} threads"
    )


# -- Brown-prose classification ---------------------------------------------------------------------
def prose_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the labelled data's options: ``--train-files --text-column --label-column --no-label-map``."""
    group = parser.add_argument_group("classification data")
    group.add_argument("--train-files", nargs="+", default=None, help="labelled files (default: embedded Brown)")
    group.add_argument("--text-column", default="text")
    group.add_argument("--label-column", default="genre")
    group.add_argument("--no-label-map", action="store_true", help="use the labels as they are (not BROWN_PROSE)")
    return parser


def prose_data(args: argparse.Namespace, batch_size: int) -> TextClassificationDataModule:
    """Brown's informative vs imaginative prose (or the ``--train-files`` labels), set up for ``fit``."""
    datamodule = TextClassificationDataModule(
        train_files=args.train_files, text_column=args.text_column, label_column=args.label_column,
        label_map=None if args.no_label_map else BROWN_PROSE, vocab_size=args.vocab_size, max_length=args.max_length,
        batch_size=batch_size, seed=args.seed,
    )  # fmt: skip
    datamodule.setup("fit")
    return datamodule


def prose_classifier(
    datamodule: TextClassificationDataModule, preset: str, max_length: int, **overrides: Any
) -> BertClassifier:
    """A fresh ``BertClassifier`` of ``preset`` for ``datamodule``'s vocabulary and labels."""
    return BertClassifier(
        vocab_size=datamodule.vocab_size, num_labels=len(datamodule.label_names), label_names=datamodule.label_names,
        preset=preset, max_length=max_length, **overrides,
    )  # fmt: skip


def validation_accuracy(
    model: pl.LightningModule, datamodule: pl.LightningDataModule, val_batches: int | None
) -> float:
    """The model's own ``val/accuracy`` on the CPU over ``val_batches`` batches (None: all)."""
    limit = val_batches if val_batches is not None else 1.0
    validator = benchmark_trainer(accelerator="cpu", limit_val_batches=limit)
    (metrics,) = validator.validate(model, datamodule, verbose=False)
    return float(metrics["val/accuracy"])


# -- time to a target validation loss ---------------------------------------------------------------
def target_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of a time-to-target comparison (part 1: step times; part 2: runs to the target).

    ``--train-steps --val-every --val-batches --target --tolerance --skip-timing``.
    """
    group = parser.add_argument_group("time to target")
    group.add_argument("--train-steps", type=int, default=200, help="baseline's steps (the main job's)")
    group.add_argument("--val-every", type=int, default=20)
    group.add_argument("--val-batches", type=int, default=8)
    group.add_argument(
        "--target", type=float, default=None, help="val/loss target (default: baseline's final + tolerance)"
    )
    group.add_argument("--tolerance", type=float, default=0.01, help="default target: baseline's final x (1 + this)")
    group.add_argument("--skip-timing", action="store_true", help="skip part 1")
    return parser


def counted_flops(
    build: Callable[[], pl.LightningModule], data: MLMDataModule, callbacks: list[pl.Callback], steps: int = 2
) -> float:
    """Model FLOPs per training step that an ``EfficiencyMonitor`` counts over ``steps`` steps of ``build()``."""
    torch.manual_seed(0)
    monitor = EfficiencyMonitor(peak_flops=1.0)  # a given peak: none is measured (MFU is not read)
    with tempfile.TemporaryDirectory() as root:
        benchmark_trainer(max_steps=steps, default_root_dir=root, callbacks=[*callbacks, monitor]).fit(build(), data)
    return float(monitor.summary["flops_per_step"])


def step_time_part(
    variants: Sequence[Variant], args: argparse.Namespace
) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """Part 1: the variants' step times, interleaved (the first is the baseline); nothing with ``--skip-timing``.

    Returns:
        The :func:`~benchmarks.harness.report` (None when skipped) and each variant's median step time.
    """
    if args.skip_timing:
        return None, {}
    print(f"Part 1: step time, {args.rounds} rounds x {args.steps} steps (+{args.warmup} warmup)")
    times = interleave(variants, args.rounds, args.steps, args.warmup)
    timing = report(times, baseline=variants[0].name, work_per_step=args.batch_size * args.max_length)
    return timing, {name: numbers["median_step_s"] for name, numbers in timing["variants"].items()}


def converge(
    name: str,
    build: Callable[[], pl.LightningModule],
    data: pl.LightningDataModule,
    callbacks: list[pl.Callback],
    steps: int,
    target: float | None,
    root: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Train ``build()`` for ``steps``, validating every ``--val-every``; its ``EfficiencyMonitor`` summary.

    Seeds everything with 0 before building, so every run starts from the same weights and data order.
    The summary's ``run_name`` is ``name``; the monitor records when ``val/loss`` first reaches ``target``.
    """
    pl.seed_everything(0, verbose=False)
    monitor = EfficiencyMonitor(monitor="val/loss", target=target)
    trainer = benchmark_trainer(max_steps=steps, val_check_interval=args.val_every, limit_val_batches=args.val_batches,
                                default_root_dir=root / name, callbacks=[*callbacks, monitor])  # fmt: skip
    trainer.fit(build(), data)
    summary = dict(monitor.summary or {})
    summary["run_name"] = name
    final = f"{summary['history'][-1]['value']:.4f}" if summary["history"] else "not validated"
    print(f"{name}: final val/loss {final} after {steps} steps, {summary['train_time_s']:.0f} s training")
    return summary


def baseline_run(
    name: str,
    build: Callable[[], pl.LightningModule],
    data: pl.LightningDataModule,
    root: Path,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], float]:
    """Part 2's start: a discarded 2-step warmup run, then the baseline's run of ``--train-steps``; with the target.

    The target of the other runs is ``--target``, else the baseline's final val/loss x (1 + ``--tolerance``).
    Where the baseline first reached it is recorded in its summary's ``target`` (its own monitor had
    none), for the comparison table.

    Returns:
        The baseline's summary (:func:`converge`) and the target.
    """
    converge("warmup", build, data, [], 2, None, root, args)  # first-run costs (threads, caches): discarded
    base = converge(name, build, data, [], args.train_steps, args.target, root, args)
    target = args.target if args.target is not None else base["history"][-1]["value"] * (1 + args.tolerance)
    first = next((p for p in base["history"] if p["value"] <= target), None)
    where = {key: first[key] if first else None for key in ("step", "wall_time_s", "train_time_s", "tokens")}
    base["target"] = {"value": target, "reached": first is not None, **where}
    return base, target


def reached(summary: dict[str, Any], target: float, mode: str = "min") -> tuple[int | None, float | None]:
    """Step and training time of the first validation at or below (``mode="max"``: above) ``target``.

    Returns:
        ``(None, None)`` when no validation reached it.
    """
    check_choice("mode", mode, ("min", "max"))
    for point in summary["history"]:
        if (point["value"] <= target) if mode == "min" else (point["value"] >= target):
            return point["step"], point["train_time_s"]
    return None, None
