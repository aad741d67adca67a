"""MagnitudePruning side by side with Lightning's ModelPruning: sparsity after a resume, step overhead, accuracy.

Both prune the same targets (the ``nn.Linear`` layers of the blocks of a ``BertMLM``, by global
magnitude) at the same moment: Lightning's ``ModelPruning`` at the end of epoch 0 (its only
schedule is per epoch; epochs are ``--epoch-steps`` optimizer steps), ours with a one-shot event at
``start_step = --epoch-steps`` (the same point: after that many steps). Three parts, one process:

1. Resume. Each callback prunes ``--resume-sparsity`` at the end of epoch 0; a checkpoint is
   written one step later; a new ``fit`` resumes from it. The share of zero target weights is
   reported right after the resume (``on_train_start``) and after each of the next steps.
   ``ModelPruning`` saves the pruned weights but no masks, and re-prunes only when its epoch rule
   says so: the weights come back dense one step after the resume. Ours keeps the masks in the
   checkpoint and stays exactly at its sparsity.
2. Step overhead. ``benchmarks/harness.py`` times the training step (interleaved rounds) of the
   dense model, of ours and of ``ModelPruning`` after pruning (torch's prune forward pre-hooks).
3. Accuracy. For each of ``--sparsities`` (default 50%, 80%, 90%), both train ``--train-steps``
   steps from the same initial weights and data, pruning at the end of epoch 0; the MLM
   validation loss and accuracy and the final sparsity are reported, with the dense model's.

Command (about 30 minutes on 2 cores):

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/pruning_vs_lightning.py --rounds 4 --steps 6
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelPruning
from torch import nn

from benchmarks.harness import LightningJob, Variant, harness_arguments, interleave, report, setup, write_json
from benchmarks.jobs import mlm_arguments, mlm_data, mlm_job_line, mlm_module
from benchmarks.pruning_overhead import block_linears
from lightning_efficient import BertMLM, MLMDataModule
from lightning_efficient.callbacks.pruning import MagnitudePruning
from lightning_efficient.testing import quiet_trainer

DENSE, OURS, LIGHTNING = "dense", "MagnitudePruning (ours)", "Lightning ModelPruning"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = mlm_arguments(harness_arguments(__doc__, rounds=4, steps=6, warmup=2))
    parser.add_argument("--epoch-steps", type=int, default=50, help="optimizer steps per epoch; pruning after epoch 0")
    parser.add_argument("--train-steps", type=int, default=150, help="steps of each accuracy run")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument("--resume-sparsity", type=float, default=0.8)
    parser.add_argument("--after-resume", type=int, default=3, help="steps recorded after the resume")
    parser.add_argument("--val-batches", type=int, default=20)
    return parser.parse_args(argv)


def target_sparsity(model: nn.Module) -> float:
    """Share of zeros among the blocks' Linear weights (under torch prune: ``weight_orig * weight_mask``)."""
    zeros = total = 0
    for m in block_linears(model):
        weight = m.weight_orig * m.weight_mask if hasattr(m, "weight_orig") else m.weight
        zeros, total = zeros + int((weight == 0).sum()), total + weight.numel()
    return zeros / total


def pruning_callback(kind: str, model: nn.Module, sparsity: float, epoch_steps: int) -> pl.Callback:
    """Ours or Lightning's, both pruning ``sparsity`` of the blocks' Linear weights (global magnitude) after epoch 0."""
    if kind == OURS:
        return MagnitudePruning(final_sparsity=sparsity, start_step=epoch_steps, scope="global", strict_schedule=False)
    return ModelPruning(
        "l1_unstructured", parameters_to_prune=[(m, "weight") for m in block_linears(model)], amount=sparsity,
        use_global_unstructured=True, apply_pruning=lambda epoch: epoch == 0, use_lottery_ticket_hypothesis=False,
        make_pruning_permanent=True, verbose=0,
    )  # fmt: skip


class SparsityProbe(pl.Callback):
    """Records the target sparsity right after (re)start and after every optimizer step."""

    def __init__(self) -> None:
        self.at_start: float | None = None
        self.after_step: dict[int, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_start = target_sparsity(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.after_step[trainer.global_step] = target_sparsity(pl_module)


def trainer(args: argparse.Namespace, steps: int, callbacks: list[pl.Callback], root: str | None = None) -> pl.Trainer:
    return quiet_trainer(
        accelerator="cpu", max_steps=steps, limit_train_batches=args.epoch_steps, limit_val_batches=args.val_batches,
        val_check_interval=None, check_val_every_n_epoch=10**6, num_sanity_val_steps=0,
        enable_checkpointing=root is not None, default_root_dir=root, callbacks=callbacks,
    )  # fmt: skip


def new_model(args: argparse.Namespace, vocab_size: int) -> BertMLM:
    torch.manual_seed(args.seed)
    # A constant LR after warmup: with a decay to zero at max_steps, the short first fit of part 1 would end
    # (and resume) at LR 0, hiding for one step what the resume does to the weights.
    return mlm_module(vocab_size, args, lr_schedule="constant")


def resume_part(args: argparse.Namespace, datamodule: MLMDataModule) -> dict[str, Any]:
    """Prune after epoch 0, checkpoint one step later, resume: the sparsity right after and a few steps on."""
    save_at = args.epoch_steps + 1
    results = {}
    for kind in (OURS, LIGHTNING):
        with tempfile.TemporaryDirectory() as root:
            pl.seed_everything(args.seed, verbose=False)
            model = new_model(args, datamodule.vocab_size)
            saver = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=save_at, save_top_k=-1)
            first = SparsityProbe()
            callbacks = [pruning_callback(kind, model, args.resume_sparsity, args.epoch_steps), first, saver]
            trainer(args, save_at, callbacks, root).fit(model, datamodule)
            pl.seed_everything(args.seed, verbose=False)
            model = new_model(args, datamodule.vocab_size)
            probe = SparsityProbe()
            callbacks = [pruning_callback(kind, model, args.resume_sparsity, args.epoch_steps), probe]
            steps = save_at + args.after_resume
            checkpoint = str(Path(root) / f"step={save_at}.ckpt")
            trainer(args, steps, callbacks, root).fit(model, datamodule, ckpt_path=checkpoint)
        results[kind] = {"before_checkpoint": first.after_step[save_at], "right_after_resume": probe.at_start,
                         "after_resume_steps": probe.after_step}  # fmt: skip
    print(f"\n1. sparsity of the blocks' Linear weights, pruned to {args.resume_sparsity:.0%} after step "
          f"{args.epoch_steps}, checkpoint after step {save_at}, resumed:")  # fmt: skip
    for kind, r in results.items():
        later = ", ".join(f"step {s}: {v:.4f}" for s, v in sorted(r["after_resume_steps"].items()))
        print(f"  {kind:<26} at checkpoint {r['before_checkpoint']:.4f}; right after resume "
              f"{r['right_after_resume']:.4f}; {later}")  # fmt: skip
    return results


def overhead_part(args: argparse.Namespace, datamodule: MLMDataModule) -> dict[str, Any]:
    """Interleaved step times: dense, ours and ModelPruning, both pruned after the untimed warmup epoch."""
    epoch = max(1, args.warmup)

    def job(kind: str) -> LightningJob:
        model = new_model(args, datamodule.vocab_size)
        callbacks = [] if kind == DENSE else [pruning_callback(kind, model, 0.5, epoch)]
        return LightningJob(model, datamodule, callbacks, {"accelerator": "cpu", "limit_train_batches": epoch})

    variants = [Variant(kind, lambda kind=kind: job(kind), seed=args.seed) for kind in (DENSE, OURS, LIGHTNING)]
    print(f"\n2. training step time, 50% pruned (epochs of {epoch} steps; pruning after the first, untimed):")
    times = interleave(variants, args.rounds, args.steps, epoch)
    return report(times, baseline=DENSE, metric="step time", work_per_step=args.batch_size * args.max_length)


def accuracy_part(args: argparse.Namespace, datamodule: MLMDataModule) -> dict[str, Any]:
    """Validation loss/accuracy after ``--train-steps`` for dense and both callbacks at each sparsity."""
    rows: dict[str, Any] = {}
    for sparsity in [0.0, *args.sparsities]:
        for kind in [DENSE] if sparsity == 0.0 else [OURS, LIGHTNING]:
            pl.seed_everything(args.seed, verbose=False)
            model = new_model(args, datamodule.vocab_size)
            callbacks = [] if kind == DENSE else [pruning_callback(kind, model, sparsity, args.epoch_steps)]
            fit = trainer(args, args.train_steps, callbacks)
            fit.fit(model, datamodule)
            (metrics,) = fit.validate(model, datamodule, verbose=False)
            rows[f"{kind} @ {sparsity:.0%}"] = {
                "sparsity_target": sparsity, "sparsity_final": target_sparsity(model),
                "val_loss": float(metrics["val/loss"]), "val_accuracy": float(metrics["val/accuracy"]),
            }  # fmt: skip
    print(f"\n3. MLM validation after {args.train_steps} steps (pruned after step {args.epoch_steps}):")
    print(f"  {'run':<36} {'final sparsity':>15} {'val loss':>10} {'val accuracy':>13}")
    for name, r in rows.items():
        print(f"  {name:<36} {r['sparsity_final']:>15.4f} {r['val_loss']:>10.4f} {r['val_accuracy']:>13.4f}")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = setup(parse_args(argv))
    datamodule = mlm_data(args)
    print(mlm_job_line(args, datamodule.vocab_size))
    resume = resume_part(args, datamodule)
    overhead = overhead_part(args, datamodule)
    accuracy = accuracy_part(args, datamodule)
    ours, theirs = resume[OURS], resume[LIGHTNING]
    kept = abs(ours["right_after_resume"] - ours["before_checkpoint"]) < 1e-9 and all(
        abs(v - ours["before_checkpoint"]) < 1e-9 for v in ours["after_resume_steps"].values()
    )
    lost = min(theirs["after_resume_steps"].values()) < 0.5 * theirs["before_checkpoint"]
    lowest = min(theirs["after_resume_steps"].values())
    print(f"\n{'PASS' if kept else 'FAIL'}: ours keeps its sparsity exactly across the resume; Lightning's "
          f"ModelPruning {'loses it' if lost else 'keeps it'} (min {lowest:.4f} after resume); step "
          f"overhead ours {overhead['variants'][OURS]['ratio'] - 1:+.1%}, ModelPruning "
          f"{overhead['variants'][LIGHTNING]['ratio'] - 1:+.1%}")  # fmt: skip
    result = {"resume": resume, "overhead": overhead, "accuracy": accuracy, "passed": kept, "lightning_loses": lost}
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
