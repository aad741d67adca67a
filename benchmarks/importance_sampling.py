"""Importance sampling vs uniform sampling: wall-clock to a target validation accuracy, BERT and ViT.

Claim measured (issue 8): with ImportanceSampling, BERT-small trained on Brown genre classification
(15 genres, the embedded corpus) and ViT-small on Fashion-MNIST (the embedded 12k images) reach a
target validation accuracy in <= 0.85x the training time of uniform sampling; the paper-style
variance-reduction estimate is reported beside it.

For each task the script trains, one after the other in this process, the uniform baseline (batch
``b``) and the same model with :class:`~lightning_efficient.callbacks.ImportanceSampling` drawing
``b`` from pools of ``B = --pool-factor x b`` (the data loader's batch size), for the same number
of steps and the same warmup-then-decay schedule, with an
:class:`~lightning_efficient.EfficiencyMonitor` before the technique (so the scoring pass is
counted in the FLOPs) and validation every ``--val-every`` steps (the genre task on a fixed random
subset of ``--val-examples`` of its validation split, which is ordered by document and genre).
The target is the baseline's best validation accuracy minus ``--tolerance`` (default 1 point), or
``--target``; the training time (validation excluded) at which each run first reaches it comes
from the monitor's validation history. A third run samples on every step (``tau_threshold=0``),
to show what sampling does where the tau rule keeps it off. Reported beside each: the run's final
``tau`` (moving average), the fraction of steps sampled, the mean of the pool ``tau`` over sampled
steps and the paper's speed-up estimate ``tau / ((B + 3b) / (3b))``, and each run's mean step
time. The runs are sequential, so their wall-clock ratios carry the machine's noise: run it on a
quiet machine.

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/importance_sampling.py --threads 2   # ~15 min on 2 cores
    python benchmarks/importance_sampling.py --preset tiny --train-steps 4 --val-every 2 --val-batches 1
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

from benchmarks.harness import benchmark_trainer, harness_arguments, setup, write_json
from benchmarks.jobs import reached
from lightning_efficient import BertClassifier, EfficiencyMonitor, ViTClassifier
from lightning_efficient.callbacks import ImportanceSampling
from lightning_efficient.compare import format_table
from lightning_efficient.data import ImageClassificationDataModule, TextClassificationDataModule

TASKS = ("genre", "fashion")
CLAIM = 0.85


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness_arguments(__doc__, rounds=1, steps=1, warmup=0)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--preset", default="small", help="model size of both tasks")
    parser.add_argument("--pool-factor", type=int, default=3, help="pool B = this x the batch b (the paper: 3 to 5)")
    parser.add_argument("--tau-threshold", type=float, default=None, help="None: the break-even (B + 3b) / (3b)")
    parser.add_argument("--skip-always", action="store_true", help="skip the run that samples on every step")
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument(
        "--target", type=float, default=None, help="val/accuracy target (default: baseline's best - tolerance)"
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.01, help="default target: baseline's best accuracy minus this"
    )
    genre = parser.add_argument_group("genre (BERT on Brown)")
    genre.add_argument("--train-files", nargs="+", default=None, help="text files (default: embedded Brown)")
    genre.add_argument("--text-column", default="text")
    genre.add_argument("--label-column", default="genre")
    genre.add_argument("--vocab-size", type=int, default=30522)
    genre.add_argument("--max-length", type=int, default=128)
    genre.add_argument("--batch-size", type=int, default=32, help="b of the genre task")
    genre.add_argument("--train-steps", type=int, default=400, help="steps of each run (both tasks)")
    genre.add_argument(
        "--val-examples", type=int, default=1024, help="a fixed random subset of the genre validation split"
    )
    genre.add_argument(
        "--val-batches", type=int, default=None, help="limit on validation batches (both tasks; default: all)"
    )
    fashion = parser.add_argument_group("fashion (ViT on Fashion-MNIST)")
    fashion.add_argument("--image-batch-size", type=int, default=64, help="b of the fashion task")
    fashion.add_argument(
        "--image-steps", type=int, default=None, help="steps of each fashion run (default: --train-steps)"
    )
    return parser.parse_args(argv)


class TauRecorder(pl.Callback):
    """After the technique: the pool tau of every sampled step."""

    def __init__(self, technique: ImportanceSampling) -> None:
        self.technique = technique
        self.pool_taus: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.technique._sampled_now:
            self.pool_taus.append(self.technique._pool_tau)


def task_parts(
    task: str, args: argparse.Namespace, batch_size: int
) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """A fresh model and its data, the data's batch size ``batch_size``."""
    if task == "genre":
        data = TextClassificationDataModule(
            train_files=args.train_files, text_column=args.text_column, label_column=args.label_column,
            group_column=None if args.train_files else "doc", vocab_size=args.vocab_size, max_length=args.max_length,
            batch_size=batch_size,
        )  # fmt: skip
        data.setup("fit")
        val = data.splits["val"]  # ordered by document and genre: a fixed random subset, so every genre is in it
        order = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[: args.val_examples]
        data.splits["val"] = [val[i] for i in sorted(order.tolist())]
        model = BertClassifier(vocab_size=data.vocab_size, num_labels=data.num_labels, label_names=data.label_names,
                               preset=args.preset, max_length=args.max_length, learning_rate=3e-4)  # fmt: skip
        return model, data
    data = ImageClassificationDataModule(batch_size=batch_size)
    data.setup("fit")
    arguments = data.model_arguments()
    model = ViTClassifier(num_labels=arguments["num_labels"], image_size=arguments["image_size"], patch_size=4,
                          preset=args.preset, learning_rate=1e-3, lr_schedule="cosine")  # fmt: skip
    return model, data


def train(task: str, name: str, args: argparse.Namespace, sampled: bool, steps: int, target: float | None, root: Path,
          threshold: float | None = None) -> dict[str, Any]:  # fmt: skip
    """One run (``sampled``: with ImportanceSampling at ``threshold``); its EfficiencyMonitor summary and the technique's figures."""
    batch = args.batch_size if task == "genre" else args.image_batch_size
    pl.seed_everything(0, verbose=False)
    model, data = task_parts(task, args, batch * args.pool_factor if sampled else batch)
    monitor = EfficiencyMonitor(monitor="val/accuracy", target=target, mode="max")
    callbacks: list[pl.Callback] = [monitor]
    technique = None
    if sampled:
        technique = ImportanceSampling(batch_size=batch, tau_threshold=threshold)
        recorder = TauRecorder(technique)
        callbacks += [technique, recorder]
    limit_val = args.val_batches if args.val_batches is not None else 1.0
    trainer = benchmark_trainer(max_steps=steps, val_check_interval=args.val_every, check_val_every_n_epoch=None,
                                default_root_dir=root / name, callbacks=callbacks, limit_val_batches=limit_val)  # fmt: skip
    trainer.fit(model, data)
    summary = dict(monitor.summary or {})
    summary["run_name"] = name
    history = summary["history"]
    summary["best"] = max((p["value"] for p in history), default=None)
    summary["step_s"] = summary["train_time_s"] / max(1, summary["steps"])
    if technique is not None:
        pool, b = batch * args.pool_factor, batch
        break_even = (pool + 3 * b) / (3 * b)
        taus = recorder.pool_taus
        summary["importance"] = {
            "final_tau": technique.tau,
            "threshold": technique.threshold(pool),
            "sampled_fraction": technique.sampled_steps / max(1, technique.steps),
            "mean_pool_tau": sum(taus) / len(taus) if taus else None,
            "speedup_estimate": (sum(taus) / len(taus)) / break_even if taus else None,
        }
    best = f"{summary['best']:.4f}" if summary["best"] is not None else "not validated"
    extra = "" if technique is None else f", {summary['importance']}"
    print(f"{name}: best val/accuracy {best} in {steps} steps, {summary['train_time_s']:.0f} s training, "
          f"{summary['step_s']:.3f} s/step{extra}")  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = setup(parse_args(argv))
    root = Path(tempfile.mkdtemp(prefix="importance_"))
    result: dict[str, Any] = {"tasks": {}, "verdicts": {}}
    for task in args.tasks:
        steps = args.train_steps if task == "genre" else (args.image_steps or args.train_steps)
        print(f"\n{task}: {steps} steps each, pools of {args.pool_factor}x the batch")
        train(task, f"{task}_warmup", args, False, 2, None, root)  # first-run costs (threads, caches): discarded
        base = train(task, f"{task}_uniform", args, False, steps, args.target, root)
        if base["best"] is None:
            raise SystemExit(f"{task}: the baseline was never validated; lower --val-every")
        target = args.target if args.target is not None else base["best"] - args.tolerance
        runs = [("importance", args.tau_threshold)] + ([] if args.skip_always else [("always", 0.0)])
        summaries = [base] + [
            train(task, f"{task}_{kind}", args, True, steps, target, root, threshold) for kind, threshold in runs
        ]
        print(format_table(summaries))
        base_step, base_time = reached(base, target, mode="max")
        entry: dict[str, Any] = {"target": target, "uniform_best": base["best"],
                                 "uniform_reached": {"step": base_step, "train_time_s": base_time}}  # fmt: skip
        for (kind, _), sampled in zip(runs, summaries[1:]):
            step, seconds = reached(sampled, target, mode="max")
            ratio = None if step is None else seconds / base_time
            entry[kind] = {"best": sampled["best"], "reached": {"step": step, "train_time_s": seconds}, "time_ratio": ratio,
                           "step_time_ratio": sampled["step_s"] / base["step_s"], **sampled["importance"]}  # fmt: skip
            label = "importance sampling (tau rule)" if kind == "importance" else "importance sampling on every step"
            if step is None:
                print(f"{'FAIL' if kind == 'importance' else 'info'}: {task}: {label} does not reach val/accuracy {target:.4f} "
                      f"in {steps} steps (best {sampled['best']:.4f}; uniform reaches it at step {base_step}, {base_time:.0f} s)")  # fmt: skip
            else:
                verdict = ("PASS" if ratio <= CLAIM else "FAIL") if kind == "importance" else "info"
                print(f"{verdict}: {task}: {label} reaches val/accuracy {target:.4f} at step {step} after {seconds:.0f} s vs "
                      f"uniform's step {base_step} after {base_time:.0f} s: {ratio:.3f}x (claim <= {CLAIM}x)")  # fmt: skip
            figures = sampled["importance"]
            estimate = figures["speedup_estimate"]
            print(f"   tau: final {figures['final_tau']:.3f} vs threshold {figures['threshold']:.3f}; sampled "
                  f"{figures['sampled_fraction']:.0%} of steps; step time {entry[kind]['step_time_ratio']:.2f}x uniform's; "
                  f"paper's speed-up estimate on sampled steps: {'n/a' if estimate is None else f'{estimate:.3f}'}")  # fmt: skip
        result["tasks"][task] = entry
        result["verdicts"][task] = (
            entry["importance"]["time_ratio"] is not None and entry["importance"]["time_ratio"] <= CLAIM
        )
    return write_json(args.json, result)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
