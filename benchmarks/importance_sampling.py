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

Where ``tau`` may get large (issue 30), the fashion task has options that change its setting:
``--pretrain-steps N`` trains a uniform model for ``N`` steps first and starts every run from its
weights (a second phase, where most examples are already easy), ``--imbalance r`` keeps only the
fraction ``r`` of the training images of the classes outside ``--majority-classes`` (default the
easy ones: trouser, sandal, sneaker, bag, ankle boot; validation stays balanced), and
``--pool-factor`` sets the pool. Step counts and ``tau`` do not depend on the machine's load, so
each sampled run also prints its steps to the target, its moving-average ``tau`` at every
validation, and a modelled time ratio: the steps to the target, each sampled one costing
``--sampled-cost`` uniform steps (default: the paper's ``1 + B / (3b)``; the measured step time
ratios are printed beside it, but on a shared machine they are noise), over the uniform run's
steps to the target.

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/importance_sampling.py --threads 2   # ~15 min on 2 cores
    python benchmarks/importance_sampling.py --preset tiny --train-steps 4 --val-every 2 --val-batches 1
    # issue 30's settings (tiny ViT: a few minutes each; on a loaded machine --threads 1 is ~30x faster than 2)
    python benchmarks/importance_sampling.py --tasks fashion --preset tiny --image-lr 3e-3 --threads 1 --imbalance 0.05 \
        --image-steps 300 --val-every 20
    python benchmarks/importance_sampling.py --tasks fashion --preset tiny --image-lr 3e-3 --threads 1 \
        --pretrain-steps 400 --image-steps 200 --val-every 10
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
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
from lightning_efficient.callbacks.importance_sampling import tau_threshold
from lightning_efficient.compare import format_table
from lightning_efficient.data import ImageClassificationDataModule, TextClassificationDataModule

TASKS = ("genre", "fashion")
CLAIM = 0.85
EASY_CLASSES = (1, 5, 7, 8, 9)
"""Fashion-MNIST's classes a ViT learns first: trouser, sandal, sneaker, bag, ankle boot."""


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
    fashion.add_argument("--image-lr", type=float, default=1e-3, help="peak learning rate of the fashion runs")
    fashion.add_argument(
        "--pretrain-steps", type=int, default=0, help="a uniform phase 1 of this many steps; every run starts from it"
    )
    fashion.add_argument(
        "--imbalance", type=float, default=1.0, help="keep this fraction of the training images outside the majority"
    )
    fashion.add_argument("--majority-classes", type=int, nargs="+", default=list(EASY_CLASSES))
    parser.add_argument(
        "--sampled-cost", type=float, default=None, help="cost of a sampled step in uniform steps (modelled ratio)"
    )
    return parser.parse_args(argv)


class TauRecorder(pl.Callback):
    """After the technique: the pool tau of every sampled step, and per step whether it sampled and the moving tau."""

    def __init__(self, technique: ImportanceSampling) -> None:
        self.technique = technique
        self.pool_taus: list[float] = []
        self.sampled: list[bool] = []
        self.taus: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.technique._sampled_now:
            self.pool_taus.append(self.technique._pool_tau)
        self.sampled.append(self.technique._sampled_now)
        self.taus.append(float(self.technique.tau or 1.0))


def imbalanced(data: ImageClassificationDataModule, keep: float, majority: list[int]) -> ImageClassificationDataModule:
    """Keep the fraction ``keep`` of the training images whose class is not in ``majority`` (a fixed draw)."""
    images, labels = data.splits["train"]
    chosen = torch.rand(len(labels), generator=torch.Generator().manual_seed(0)) < keep
    kept = torch.isin(labels, torch.tensor(majority)) | chosen
    data.splits["train"] = (images[kept], labels[kept])
    return data


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
    if args.imbalance < 1.0:
        imbalanced(data, args.imbalance, args.majority_classes)
    arguments = data.model_arguments()
    model = ViTClassifier(num_labels=arguments["num_labels"], image_size=arguments["image_size"], patch_size=4,
                          preset=args.preset, learning_rate=args.image_lr, lr_schedule="cosine")  # fmt: skip
    if args.pretrained is not None:
        model.load_state_dict(torch.load(args.pretrained, weights_only=True))
    return model, data


def pretrain(args: argparse.Namespace, root: Path) -> Path:
    """Phase 1: a uniform fashion run of ``--pretrain-steps``; the path of its weights."""
    pl.seed_everything(0, verbose=False)
    args.pretrained = None
    model, data = task_parts("fashion", args, args.image_batch_size)
    trainer = benchmark_trainer(max_steps=args.pretrain_steps, default_root_dir=root / "pretrain")
    start = time.perf_counter()
    trainer.fit(model, data)
    path = root / "pretrained.pt"
    torch.save(model.state_dict(), path)
    print(f"phase 1: {args.pretrain_steps} uniform steps in {time.perf_counter() - start:.0f} s, weights in {path}")
    return path


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
            "sampled_steps": recorder.sampled,
            "tau_trajectory": {p["step"]: round(recorder.taus[p["step"] - 1], 3) for p in history if p["step"] > 0},
            "final_tau": technique.tau,
            "threshold": technique.threshold(pool),
            "sampled_fraction": technique.sampled_steps / max(1, technique.steps),
            "mean_pool_tau": sum(taus) / len(taus) if taus else None,
            "speedup_estimate": (sum(taus) / len(taus)) / break_even if taus else None,
        }
    best = f"{summary['best']:.4f}" if summary["best"] is not None else "not validated"
    shown = {k: v for k, v in summary.get("importance", {}).items() if k != "sampled_steps"}
    extra = "" if technique is None else f", {shown}"
    print(f"{name}: best val/accuracy {best} in {steps} steps, {summary['train_time_s']:.0f} s training, "
          f"{summary['step_s']:.3f} s/step{extra}")  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = setup(parse_args(argv))
    root = Path(tempfile.mkdtemp(prefix="importance_"))
    result: dict[str, Any] = {"tasks": {}, "verdicts": {}}
    args.pretrained = None
    for task in args.tasks:
        if task == "fashion" and args.pretrain_steps > 0:
            args.pretrained = pretrain(args, root)
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
        batch = args.batch_size if task == "genre" else args.image_batch_size
        cost = args.sampled_cost or tau_threshold(batch * args.pool_factor, batch)  # 1 + B / (3b)
        entry: dict[str, Any] = {"target": target, "uniform_best": base["best"],
                                 "uniform_reached": {"step": base_step, "train_time_s": base_time}}  # fmt: skip
        for (kind, _), sampled in zip(runs, summaries[1:]):
            step, seconds = reached(sampled, target, mode="max")
            ratio = None if step is None else seconds / base_time
            flags = sampled["importance"].pop("sampled_steps")
            modelled = None if step is None or not base_step else (step + (cost - 1) * sum(flags[:step])) / base_step
            entry[kind] = {"best": sampled["best"], "reached": {"step": step, "train_time_s": seconds}, "time_ratio": ratio,
                           "step_time_ratio": sampled["step_s"] / base["step_s"], "sampled_cost": cost,
                           "modelled_time_ratio": modelled, **sampled["importance"]}  # fmt: skip
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
            print(f"   steps to target: {step} vs uniform's {base_step}; modelled time ratio (a sampled step costs "
                  f"{cost:.2f} uniform steps): {'n/a' if modelled is None else f'{modelled:.3f}'}; moving tau at "
                  f"each validation: {figures['tau_trajectory']}")  # fmt: skip
        result["tasks"][task] = entry
        result["verdicts"][task] = (
            entry["importance"]["time_ratio"] is not None and entry["importance"]["time_ratio"] <= CLAIM
        )
    return write_json(args.json, result)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
