"""LoRA adapters (ParameterEfficientTuning) against full fine-tuning: accuracy, checkpoint, step time, memory, merging.

Parts (``--parts`` picks some, by number or name; all by default). Every part that fine-tunes BERT
starts from one pretrained BERT MLM checkpoint (part 1's, or ``--pretrained-checkpoint``), which the
part trains first when it is needed and was not given.

1. ``pretrain``: the main job's BERT MLM (``jobs.mlm_module``, :data:`~benchmarks.jobs.MAIN_JOB`,
   ``--preset`` small, the embedded corpus or ``--train-files``) for ``--pretrain-steps``; its final
   validation loss, saved (weights only) in ``--work-dir``: reuse it with ``--pretrained-checkpoint``.
   The classifiers below start from it (``BertClassifier(pretrained=...)``: its encoder, a fresh
   head) and their data uses its tokenizer (``TextClassificationDataModule(tokenizer=<checkpoint>)``).

2. ``bert``: Brown's informative vs imaginative prose (``BROWN_PROSE``, or ``--classify-files``),
   full fine-tuning (LR ``--full-lr``) against LoRA (:class:`~lightning_efficient.ParameterEfficientTuning`,
   r ``--lora-r`` = 8, alpha ``--lora-alpha``, on query and value; the classifier head and pooler
   train; LR ``--lora-lr``), ``--finetune-steps`` each from the same weights and batches. Claims
   (issue), each printed PASS/FAIL:

   - accuracy: LoRA's final validation accuracy >= full fine-tuning's - 1 point (the whole validation
     split, in batches of 256: it is ordered by label, so a limit on batches would not do);
   - checkpoint: LoRA's Lightning checkpoint (``trainer.save_checkpoint``: adapter-only, the frozen
     base left out) <= 5% of full fine-tuning's, both as the trainer writes them (weights and
     optimizer state); the weights-only checkpoints and peft's ``save_pretrained`` directory beside them;
   - step time: LoRA's training step <= 0.9x full fine-tuning's, measured with
     :mod:`benchmarks.harness` (the two interleaved in ``--rounds`` rounds of ``--steps`` steps);
   - optimizer state: the bytes of ``optimizer.state`` after training (AdamW's two moments of every
     trainable parameter) and the trainable parameters, side by side (no target).

   And a check: the adapter-only checkpoint applied to a fresh copy of the base
   (``ParameterEfficientTuning(adapter=<checkpoint>)``) gives the trained model's accuracy again.

3. ``vit``: the same comparison on Fashion-MNIST (the embedded 12k images) with ``ViTClassifier`` of
   ``--preset``, patches of 4. There is no pretrained ViT to start from offline, so the base is
   trained here first, fully, for ``--vit-pretrain-steps`` on the images of the first
   ``--vit-pretrain-classes`` classes only (default 5 of 10; 10: the same task), then fine-tuned on all
   10 classes for ``--vit-steps``, fully (``--vit-full-lr``) or with LoRA (``--vit-lora-lr``). The
   classifier head is re-initialised before fine-tuning: ``ViTClassifier(pretrained=<ViTClassifier
   checkpoint>)`` copies the checkpoint's head too, so without it both runs would start from a trained
   head. Same claims as part 2.

4. ``pruned``: a LoRA on a 50%-pruned base. The classifier from the pretrained checkpoint has
   ``--prune-sparsity`` of every block Linear's weights zeroed by magnitude, per layer
   (``MagnitudePruning`` one shot, then ``export_pruned(shrink=False)``: plain zero weights), then
   LoRA trains on it for ``--finetune-steps``. Reported: the zeros of the adapted layers (query,
   value) and of all block Linears before and after :meth:`~lightning_efficient.ParameterEfficientTuning.merge`
   (``keep_zeros=True``), accuracy unmerged against merged, and what a dense merge
   (``keep_zeros=False``, on a second copy with the adapter applied from ``save_pretrained``) does to
   sparsity and accuracy. Claims: the merge keeps exactly the base's zeros (PASS/FAIL); the merged
   model's accuracy is within 1 point of the unmerged one's (the masked merge drops the update at the
   pruned weights, so it is another model). Then LoRA with ``sparse_update=True`` (the update masked
   while training) on a third copy: the merge keeps the zeros and gives the trained model's accuracy.

5. ``int8``: LoRA on an int8 base (``int8_base=True``: torchao int8 weight-only block Linears, frozen;
   QLoRA-style) trained for ``--finetune-steps``. Then three models on the CPU: (a) the int8 base with
   the adapter unmerged, (b) the adapter merged and the weights quantized again (``merge()``), (c) for
   reference the same adapter merged into the float base (fp32). Reported: accuracy of each (and of
   part 2's float LoRA when it ran), the merged int8 model's accuracy within 1 point of the unmerged
   one's (PASS/FAIL), and inference latency at batch 1 and 32 (sentences of the validation split,
   ``torch.inference_mode``, median over ``--latency-rounds`` interleaved rounds of ``--latency-steps``
   forward passes each; ratios to (a)), with each model's weight bytes (``torch.save`` of its state dict).

A summary of every claim with its numbers ends the run; ``--json OUT`` writes all the numbers (each
part under its name, the claims under ``verdicts``). Verdicts are printed, not asserted.

How runs are ordered. Training runs come one after the other; each is seeded (0) before its model is
built, so the compared runs start from the same weights (the same fresh head) and see the same batches.
Step times come from :func:`benchmarks.harness.interleave`, the variants alternating in one process.
One seed: accuracy differences under a point are within a seed's noise at these run lengths.

Time (2 cores, torch's 2 threads), estimated from the repository's calibrations, not yet timed whole: a
BERT-small MLM step (batch 32 x 128) about 0.65 s; a classifier step (batch 32, sentences padded per
batch) about 0.3 s full, less with LoRA; validating the whole prose split about 10 s; a ViT-small step
(batch 64 x 50 tokens) about 0.4 s by its FLOPs. The defaults: part 1, 1,000 MLM steps, about 11
minutes; part 2, 2 runs of 400 steps, 3 validations and the timing (4 rounds x 14 steps x 2), about 6
minutes; part 3, a ViT base of 500 steps and 2 runs of 250 (batch 64) and the timing, about 8 minutes;
part 4, one run of 400 steps and 3 validations, about 3 minutes; part 5, one int8 run of 400 steps, 2
validations and the latencies, about 4 minutes. In all about 32 minutes (21 with ``--pretrained-checkpoint``):

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/adapters.py --threads 2 --json /tmp/adapters.json
    python benchmarks/adapters.py --preset tiny --train-files FILE.txt --vocab-size 300 --max-length 17 \
        --batch-size 4 --classify-files FILE.jsonl --text-column sentence --label-column category --no-label-map \
        --pretrain-steps 4 --finetune-steps 4 --vit-pretrain-steps 4 --vit-steps 4 --image-batch-size 8 \
        --rounds 1 --steps 2 --warmup 1 --latency-rounds 1 --latency-steps 2  # ~10 s
"""

from __future__ import annotations

import argparse
import functools
import io
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
import peft
import torch
from torch import nn

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
    BROWN_PROSE,
    BertClassifier,
    MagnitudePruning,
    ParameterEfficientTuning,
    TextClassificationDataModule,
    ViTClassifier,
    export_pruned,
)
from lightning_efficient.callbacks.parameter_efficient import adapter_layers
from lightning_efficient.data import ImageClassificationDataModule
from lightning_efficient.targets import select_modules

FULL = "full fine-tuning"
ACCURACY_POINTS = 1.0
"""Claims: LoRA's accuracy >= full fine-tuning's minus this many points; a merge changes it by at most this."""
CHECKPOINT_SHARE = 0.05
"""Claim: the adapter checkpoint is at most this share of the full fine-tuning checkpoint."""
STEP_RATIO = 0.9
"""Claim: LoRA's training step takes at most this share of full fine-tuning's."""
VALIDATION_BATCH = 256
"""Text validation batch: the whole split is validated (ordered by label), in as few batches as memory allows."""
IMAGE_VALIDATION_BATCH = 500
LATENCY_BATCHES = (1, 32)
MB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (harness, MLM job, each part's); ``--parts`` comes back as names, in the parts' order."""
    parser = harness_arguments(__doc__, rounds=4, steps=10, warmup=3)
    jobs.mlm_arguments(parser)
    parser.add_argument(
        "--parts",
        nargs="+",
        default=list(PARTS),
        metavar="PART",
        choices=[*PARTS, *(number for number, _ in PARTS.values())],
        help=f"parts to run, by name or number: {', '.join(f'{n}={k}' for k, (n, _) in PARTS.items())}",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="checkpoints and logs (default: a new temp dir)")
    group = parser.add_argument_group("part 1: pretraining")
    group.add_argument("--pretrain-steps", type=int, default=1000, help="MLM steps of the BERT base")
    group.add_argument(
        "--pretrained-checkpoint", default=None, help="a BertMLM checkpoint of ours (of --preset and --max-length)"
    )
    group.add_argument("--val-batches", type=int, default=None, help="MLM validation batches (default: all)")
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    group.add_argument("--lora-alpha", type=float, default=8.0, help="LoRA alpha (scale alpha / r)")
    group.add_argument("--lora-dropout", type=float, default=0.1)
    group.add_argument("--lora-targets", nargs="+", default=["query", "value"],
                       help="ParameterEfficientTuning's targets: parts of every block, or 'linear'")  # fmt: skip
    group = parser.add_argument_group("parts 2, 4, 5: Brown prose")
    group.add_argument("--finetune-steps", type=int, default=400, help="steps of every BERT fine-tuning run")
    group.add_argument("--full-lr", type=float, default=1e-4, help="full fine-tuning's peak LR")
    group.add_argument("--lora-lr", type=float, default=5e-4, help="LoRA's peak LR (adapters and head)")
    group.add_argument("--classify-files", nargs="+", default=None, help="labelled files (default: embedded Brown)")
    group.add_argument("--text-column", default="text")
    group.add_argument("--label-column", default="genre")
    group.add_argument("--no-label-map", action="store_true", help="use the labels as they are (not BROWN_PROSE)")
    group.add_argument("--prune-sparsity", type=float, default=0.5, help="part 4: share of block weights pruned")
    group.add_argument("--latency-rounds", type=int, default=5, help="part 5: interleaved latency rounds")
    group.add_argument("--latency-steps", type=int, default=20, help="part 5: timed forward passes per round")
    group.add_argument("--latency-warmup", type=int, default=3, help="part 5: untimed forward passes per round")
    group = parser.add_argument_group("part 3: ViT on Fashion-MNIST")
    group.add_argument("--vit-pretrain-steps", type=int, default=500, help="steps of the ViT base (full training)")
    group.add_argument("--vit-pretrain-classes", type=int, default=5, help="the base sees the first N classes only")
    group.add_argument("--vit-pretrain-lr", type=float, default=1e-3)
    group.add_argument(
        "--vit-checkpoint", default=None, help="a ViTClassifier checkpoint: skip the ViT base's training"
    )
    group.add_argument("--vit-steps", type=int, default=250, help="steps of every ViT fine-tuning run")
    group.add_argument("--vit-full-lr", type=float, default=2e-4)
    group.add_argument("--vit-lora-lr", type=float, default=1e-3)
    group.add_argument("--image-batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    args.parts = sorted(
        {name for name, (number, _) in PARTS.items() if {name, number} & set(args.parts)},
        key=lambda name: int(PARTS[name][0]),
    )
    if min(args.pretrain_steps, args.finetune_steps, args.vit_pretrain_steps, args.vit_steps) < 1:
        parser.error("every step count must be >= 1")
    if not 1 <= args.vit_pretrain_classes <= 10:
        parser.error(f"--vit-pretrain-classes={args.vit_pretrain_classes} must lie in [1, 10]")
    return args


# -- measuring -------------------------------------------------------------------------------------
def verdict(holds: bool, claim: str, details: str, kind: str = "claim") -> dict[str, Any]:
    """Print ``PASS: claim (details)`` or ``FAIL: ...`` (``kind="info"``: ``info:``); return it as a dict."""
    label = ("PASS" if holds else "FAIL") if kind == "claim" else "info"
    print(f"{label}: {claim} ({details})")
    return {"claim": claim, "holds": bool(holds), "details": details, "kind": kind}


def lora(args: argparse.Namespace, **options: Any) -> ParameterEfficientTuning:
    """A fresh ParameterEfficientTuning: the options' LoRA on ``--lora-targets``; the head trains."""
    config = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    return ParameterEfficientTuning(peft_config=config, targets=args.lora_targets, **options)


def lora_name(args: argparse.Namespace) -> str:
    targets = "" if args.lora_targets == ["query", "value"] else f" on {'/'.join(args.lora_targets)}"
    return f"LoRA r={args.lora_r}{targets}"


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def optimizer_state_bytes(trainer: pl.Trainer) -> int:
    """Bytes of every tensor in the trainer's optimizers' ``state`` (AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``)."""
    return sum(
        value.numel() * value.element_size()
        for optimizer in trainer.optimizers
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what the weights take (int8 ones as torchao stores them)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def zero_masks(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Where each module's weight is exactly zero (an int8 weight dequantized)."""
    return {name: module.weight.detach().dequantize() == 0 for name, module in modules.items()}


def sparsity(masks: dict[str, torch.Tensor]) -> float:
    """The share of zeros over all the masks' weights."""
    zeros = sum(int(mask.sum()) for mask in masks.values())
    return zeros / max(1, sum(mask.numel() for mask in masks.values()))


def same_zeros(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


def accuracy(model: pl.LightningModule, validation: pl.LightningDataModule) -> float:
    """The model's ``val/accuracy`` over the whole validation split (:func:`benchmarks.jobs.validation_accuracy`)."""
    return jobs.validation_accuracy(model, validation, None)


@dataclass
class Run:
    """One fine-tuning run: the trained model and what was measured on it.

    Attributes:
        name: The run's label.
        model: The trained model (its adapters still applied for a LoRA run).
        trainer: The trainer that fitted it (its optimizer state kept).
        technique: The ParameterEfficientTuning of a LoRA run, else None.
        seconds: Wall time of ``fit``.
        accuracy: Final validation accuracy (the whole split).
    """

    name: str
    model: pl.LightningModule
    trainer: pl.Trainer
    technique: ParameterEfficientTuning | None
    seconds: float
    accuracy: float


def finetune(
    name: str,
    build: Callable[[], pl.LightningModule],
    technique: ParameterEfficientTuning | None,
    data: pl.LightningDataModule,
    validation: pl.LightningDataModule,
    steps: int,
) -> Run:
    """Seed 0, build, fit ``steps`` (with ``technique`` when given) and validate on the whole split."""
    pl.seed_everything(0, verbose=False)
    model = build()
    trainer = benchmark_trainer(max_steps=steps, callbacks=[technique] if technique is not None else [])
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    run = Run(name, model, trainer, technique, seconds, accuracy(model, validation))
    print(f"{name}: val/accuracy {run.accuracy:.4f} after {steps} steps, {seconds:.0f} s training "
          f"({seconds / steps:.3f} s/step), {trainable_parameters(model):,} trainable parameters")  # fmt: skip
    return run


def print_rows(header: list[str], rows: list[list[str]]) -> None:
    """A plain table: the first column left-aligned, the others right-aligned."""
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print()
    for line in lines:
        print(line[0].ljust(widths[0]) + "".join(cell.rjust(width + 3) for cell, width in zip(line[1:], widths[1:])))


# -- the shared work -------------------------------------------------------------------------------
@dataclass
class Context:
    """What the parts share.

    Attributes:
        args: The parsed options.
        root: Where checkpoints and logs go.
        results: Numbers one part leaves for another (part 2's float LoRA accuracy for part 5).
    """

    args: argparse.Namespace
    root: Path
    results: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def pretraining(self) -> dict[str, Any]:
        """The BERT base: ``--pretrained-checkpoint``, or part 1's MLM run (trained when first needed)."""
        args = self.args
        if args.pretrained_checkpoint:
            print(f"\nBERT base: {args.pretrained_checkpoint} (given)")
            return {"checkpoint": str(args.pretrained_checkpoint), "trained": False}
        data = jobs.mlm_data(args)
        print(f"\nPretraining the BERT base: {jobs.mlm_job_line(args, data.vocab_size)}, {args.pretrain_steps} steps")
        pl.seed_everything(args.seed, verbose=False)
        model = jobs.mlm_module(data.vocab_size, args, **jobs.MAIN_JOB)
        trainer = benchmark_trainer(max_steps=args.pretrain_steps)
        start = time.perf_counter()
        trainer.fit(model, data)
        seconds = time.perf_counter() - start
        path = self.root / "bert_mlm.ckpt"
        trainer.save_checkpoint(path, weights_only=True)
        limit = args.val_batches if args.val_batches is not None else 1.0
        (metrics,) = benchmark_trainer(limit_val_batches=limit).validate(model, data, verbose=False)
        loss = float(metrics["val/loss"])
        print(f"BERT base: val/loss {loss:.4f} after {args.pretrain_steps} steps, {seconds:.0f} s; saved to {path} "
              f"(reuse: --pretrained-checkpoint {path})")  # fmt: skip
        return {"checkpoint": str(path), "trained": True, "steps": args.pretrain_steps, "val_loss": loss,
                "train_time_s": seconds}  # fmt: skip

    @property
    def checkpoint(self) -> str:
        return self.pretraining["checkpoint"]

    def genre_data(self, batch_size: int) -> TextClassificationDataModule:
        """The labelled prose (or ``--classify-files``), tokenized by the base checkpoint's tokenizer, set up for fit."""
        args = self.args
        data = TextClassificationDataModule(
            train_files=args.classify_files, text_column=args.text_column, label_column=args.label_column,
            label_map=None if args.no_label_map else BROWN_PROSE, tokenizer=self.checkpoint,
            max_length=args.max_length, batch_size=batch_size, seed=args.seed,
        )  # fmt: skip
        data.setup("fit")
        return data

    @functools.cached_property
    def text_train(self) -> TextClassificationDataModule:
        return self.genre_data(self.args.batch_size)

    @functools.cached_property
    def text_validation(self) -> TextClassificationDataModule:
        return self.genre_data(VALIDATION_BATCH)  # the same split, fewer batches

    def classifier(self, learning_rate: float) -> BertClassifier:
        """A ``BertClassifier`` started from the base checkpoint (its encoder; a fresh head)."""
        data, args = self.text_train, self.args
        return BertClassifier(
            pretrained=self.checkpoint, num_labels=data.num_labels, label_names=data.label_names,
            preset=args.preset, max_length=args.max_length, learning_rate=learning_rate,
        )  # fmt: skip

    def text_job_line(self) -> str:
        data = self.text_train
        return (
            f"BertClassifier-{self.args.preset} from {self.checkpoint} on {' vs '.join(data.label_names)}, batch "
            f"{self.args.batch_size}, {torch.get_num_threads()} threads"
        )


# -- part 1: pretraining ---------------------------------------------------------------------------
def pretrain_part(context: Context) -> dict[str, Any]:
    """Part 1: the BERT base the other parts start from."""
    return context.pretraining


# -- parts 2 and 3: full fine-tuning against LoRA --------------------------------------------------
def compare_finetuning(
    context: Context,
    task: str,
    build: Callable[[float], pl.LightningModule],
    data: pl.LightningDataModule,
    validation: pl.LightningDataModule,
    learning_rates: tuple[float, float],
    steps: int,
    batch_size: int,
    unit: str,
) -> dict[str, Any]:
    """Full fine-tuning against LoRA on one task: accuracy, checkpoints, optimizer state, step time; the claims."""
    args, root = context.args, context.root / task
    root.mkdir(parents=True, exist_ok=True)
    full_lr, lora_lr = learning_rates
    name = lora_name(args)
    runs = {
        FULL: finetune(FULL, lambda: build(full_lr), None, data, validation, steps),
        name: finetune(name, lambda: build(lora_lr), lora(args), data, validation, steps),
    }
    numbers: dict[str, dict[str, Any]] = {}
    for label, run in runs.items():
        stem = "full" if run.technique is None else "lora"
        checkpoint, weights = root / f"{stem}.ckpt", root / f"{stem}_weights.ckpt"
        run.model.trainer = run.trainer  # the accuracy's validation trainer took the model: the fit's writes its files
        run.trainer.save_checkpoint(checkpoint)
        run.trainer.save_checkpoint(weights, weights_only=True)
        numbers[label] = {
            "accuracy": run.accuracy,
            "trainable_parameters": trainable_parameters(run.model),
            "parameters": sum(p.numel() for p in run.model.parameters()),
            "optimizer_state_bytes": optimizer_state_bytes(run.trainer),
            "checkpoint_bytes": checkpoint.stat().st_size,
            "weights_only_checkpoint_bytes": weights.stat().st_size,
            "train_time_s": run.seconds,
        }
    lora_run = runs[name]
    peft_dir = lora_run.technique.save_pretrained(lora_run.model, root / "peft_adapter")
    numbers[name]["save_pretrained_bytes"] = directory_bytes(peft_dir)

    # The adapter-only checkpoint on a fresh copy of the base: the trained model again?
    pl.seed_everything(0, verbose=False)
    reloaded = build(lora_lr)
    lora(args, adapter=str(root / "lora.ckpt")).attach(reloaded)
    reloaded_accuracy = accuracy(reloaded, validation)
    print(f"adapter checkpoint ({numbers[name]['checkpoint_bytes'] / MB:.2f} MB) on a fresh base: val/accuracy "
          f"{reloaded_accuracy:.4f} (trained model: {lora_run.accuracy:.4f})")  # fmt: skip
    del runs, lora_run, reloaded

    print(f"\nstep time, {args.rounds} rounds x {args.steps} steps (+{args.warmup} warmup)")
    variants = [
        Variant(FULL, lambda: LightningJob(build(full_lr), data)),
        Variant(name, lambda: LightningJob(build(lora_lr), data, [lora(args)])),
    ]
    timing = report(
        interleave(variants, args.rounds, args.steps, args.warmup), FULL, work_per_step=batch_size, unit=unit
    )
    step_ratio = timing["variants"][name]["ratio"]

    full, ours = numbers[FULL], numbers[name]

    def ratio(key: str) -> float:
        return ours[key] / max(1, full[key])

    rows = [
        ["trainable parameters", f"{full['trainable_parameters']:,}", f"{ours['trainable_parameters']:,}"],
        ["optimizer state (MB)", f"{full['optimizer_state_bytes'] / MB:.2f}", f"{ours['optimizer_state_bytes'] / MB:.2f}"],
        ["checkpoint (MB)", f"{full['checkpoint_bytes'] / MB:.2f}", f"{ours['checkpoint_bytes'] / MB:.2f}"],
        ["checkpoint, weights_only=True (MB)", f"{full['weights_only_checkpoint_bytes'] / MB:.2f}",
         f"{ours['weights_only_checkpoint_bytes'] / MB:.2f}"],
        ["median training step (s)", f"{timing['variants'][FULL]['median_step_s']:.4f}",
         f"{timing['variants'][name]['median_step_s']:.4f}"],
        ["final val/accuracy", f"{full['accuracy']:.4f}", f"{ours['accuracy']:.4f}"],
    ]  # fmt: skip
    ratios = [ratio("trainable_parameters"), ratio("optimizer_state_bytes"), ratio("checkpoint_bytes"),
              ratio("weights_only_checkpoint_bytes"), step_ratio]  # fmt: skip
    for row, value in zip(rows, ratios):
        row.append(f"{value:.4f}")
    rows[-1].append(f"{100 * (ours['accuracy'] - full['accuracy']):+.2f} points")
    print_rows(["", FULL, name, f"{name} / full"], rows)
    print(f"peft save_pretrained directory: {ours['save_pretrained_bytes'] / MB:.2f} MB")
    print()

    points = 100 * (ours["accuracy"] - full["accuracy"])
    verdicts = {
        "accuracy": verdict(
            points >= -ACCURACY_POINTS,
            f"{task}: {name}'s accuracy within {ACCURACY_POINTS:g} point of full fine-tuning's",
            f"{ours['accuracy']:.4f} vs {full['accuracy']:.4f}: {points:+.2f} points, {steps} steps each",
        ),
        "checkpoint": verdict(
            ratio("checkpoint_bytes") <= CHECKPOINT_SHARE,
            f"{task}: the adapter checkpoint <= {CHECKPOINT_SHARE:.0%} of the full checkpoint",
            f"{ours['checkpoint_bytes'] / MB:.2f} MB vs {full['checkpoint_bytes'] / MB:.2f} MB: "
            f"{ratio('checkpoint_bytes'):.2%}; with weights_only=True {ratio('weights_only_checkpoint_bytes'):.2%}",
        ),
        "step_time": verdict(
            step_ratio <= STEP_RATIO,
            f"{task}: {name}'s training step <= {STEP_RATIO:g}x full fine-tuning's",
            f"{step_ratio:.3f}x (rounds {timing['variants'][name]['ratio_min']:.3f}-"
            f"{timing['variants'][name]['ratio_max']:.3f})",
        ),
        "optimizer_state": verdict(
            True,
            f"{task}: optimizer state, {name} vs full fine-tuning",
            f"{ours['optimizer_state_bytes'] / MB:.2f} MB vs {full['optimizer_state_bytes'] / MB:.2f} MB: "
            f"{ratio('optimizer_state_bytes'):.2%}",
            kind="info",
        ),
        "adapter_reloads": verdict(
            reloaded_accuracy == ours["accuracy"],
            f"{task}: the adapter-only checkpoint on a fresh base gives the trained model's accuracy",
            f"{reloaded_accuracy:.4f} vs {ours['accuracy']:.4f}",
        ),
    }
    return {"steps": steps, "learning_rates": {FULL: full_lr, name: lora_lr}, "runs": numbers,
            "reloaded_accuracy": reloaded_accuracy, "step_time_ratio": step_ratio, "timing": timing,
            "verdicts": verdicts}  # fmt: skip


def bert_part(context: Context) -> dict[str, Any]:
    """Part 2: full fine-tuning against LoRA on Brown prose, from the pretrained BERT."""
    args = context.args
    print(f"\nPart 2: {context.text_job_line()}; {FULL} (LR {args.full_lr:g}) vs {lora_name(args)} "
          f"(alpha {args.lora_alpha:g}, LR {args.lora_lr:g}), {args.finetune_steps} steps each")  # fmt: skip
    result = compare_finetuning(
        context, "bert", context.classifier, context.text_train, context.text_validation,
        (args.full_lr, args.lora_lr), args.finetune_steps, args.batch_size, "sentences",
    )  # fmt: skip
    context.results["bert_lora_accuracy"] = result["runs"][lora_name(args)]["accuracy"]
    return result


def reset_head(model: ViTClassifier) -> ViTClassifier:
    """Re-initialise the classifier head as transformers initialises it (normal(0, initializer_range), zero bias)."""
    head = model.model.classifier
    with torch.no_grad():
        head.weight.normal_(0.0, model.model.config.initializer_range)
        head.bias.zero_()
    return model


def vit_part(context: Context) -> dict[str, Any]:
    """Part 3: a ViT base trained on some Fashion-MNIST classes, fine-tuned on all, fully and with LoRA."""
    args = context.args
    data = ImageClassificationDataModule(batch_size=args.image_batch_size, seed=args.seed)
    data.setup("fit")
    validation = ImageClassificationDataModule(batch_size=IMAGE_VALIDATION_BATCH, seed=args.seed)
    validation.setup("fit")
    arguments = data.model_arguments()
    shape = {"image_size": arguments["image_size"], "patch_size": 4, "preset": args.preset}
    labels = {"num_labels": arguments["num_labels"], "label_names": arguments["label_names"]}
    classes = args.vit_pretrain_classes
    base_info: dict[str, Any] = {"classes": classes}
    if args.vit_checkpoint:
        base = str(args.vit_checkpoint)
        print(f"\nPart 3: ViT base {base} (given)")
    else:
        subset = ImageClassificationDataModule(batch_size=args.image_batch_size, seed=args.seed)
        subset.setup("fit")
        subset_validation = ImageClassificationDataModule(batch_size=IMAGE_VALIDATION_BATCH, seed=args.seed)
        subset_validation.setup("fit")
        for module in (subset, subset_validation):  # the images of the first classes only (same normalisation)
            for split, (images, targets) in list(module.splits.items()):
                keep = targets < classes
                module.splits[split] = (images[keep], targets[keep])
        print(f"\nPart 3: ViT-{args.preset} base, trained on the {len(subset.splits['train'][1])} training images of "
              f"{', '.join(labels['label_names'][:classes])} for {args.vit_pretrain_steps} steps (batch "
              f"{args.image_batch_size}, LR {args.vit_pretrain_lr:g})")  # fmt: skip
        run = finetune(
            "ViT base",
            lambda: ViTClassifier(**labels, **shape, learning_rate=args.vit_pretrain_lr),
            None, subset, subset_validation, args.vit_pretrain_steps,
        )  # fmt: skip
        base = str(context.root / "vit_base.ckpt")
        run.trainer.save_checkpoint(base, weights_only=True)
        base_info.update({"steps": args.vit_pretrain_steps, "accuracy_on_its_classes": run.accuracy})
        del run
    base_info["checkpoint"] = base

    def build(learning_rate: float) -> ViTClassifier:
        return reset_head(ViTClassifier(pretrained=base, **labels, **shape, learning_rate=learning_rate))

    print(f"fine-tuning on all {labels['num_labels']} classes: {FULL} (LR {args.vit_full_lr:g}) vs {lora_name(args)} "
          f"(LR {args.vit_lora_lr:g}), {args.vit_steps} steps each, the head re-initialised")  # fmt: skip
    result = compare_finetuning(
        context, "vit", build, data, validation, (args.vit_full_lr, args.vit_lora_lr), args.vit_steps,
        args.image_batch_size, "images",
    )  # fmt: skip
    return {"base": base_info, **result}


# -- part 4: merging into a pruned base ------------------------------------------------------------
def pruned_classifier(context: Context, sparsity_: float) -> tuple[BertClassifier, dict[str, nn.Module]]:
    """Seed 0, a classifier from the base with ``sparsity_`` of each block Linear's weights zeroed by magnitude.

    Returns:
        The model and its block Linears by name (the modules themselves: an adapted layer's base stays the same object).
    """
    pl.seed_everything(0, verbose=False)
    model = context.classifier(context.args.lora_lr)
    pruning = MagnitudePruning(final_sparsity=sparsity_)
    pruning.attach(model)
    pruning.prune_now(model, sparsity_)
    export_pruned(model, shrink=False)  # the masks multiplied into the weights and deleted: plain zeros
    return model, dict(select_modules(model, None, None, ("Linear",)))


def pruned_part(context: Context) -> dict[str, Any]:
    """Part 4: LoRA on a pruned base; the zeros and the accuracy before and after merging."""
    args = context.args
    validation = context.text_validation
    print(f"\nPart 4: {lora_name(args)} on a base with {args.prune_sparsity:.0%} of every block Linear's weights "
          f"pruned by magnitude; {context.text_job_line()}, {args.finetune_steps} steps")  # fmt: skip
    model, linears = pruned_classifier(context, args.prune_sparsity)
    technique = lora(args)
    run = finetune(f"{lora_name(args)} on the pruned base", lambda: model, technique, context.text_train,
                   validation, args.finetune_steps)  # fmt: skip
    adapted = {name: linears[name] for name in adapter_layers(model)}
    before_all, before_adapted = zero_masks(linears), zero_masks(adapted)
    peft_dir = technique.save_pretrained(model, context.root / "pruned_adapter")
    sample = next(iter(validation.val_dataloader()))
    model.eval()
    with torch.inference_mode():
        unmerged_logits = model(sample["input_ids"], sample["attention_mask"])
    merge_report = technique.merge(model)
    with torch.inference_mode():
        merged_logits = model(sample["input_ids"], sample["attention_mask"])
    after_all, after_adapted = zero_masks(linears), zero_masks(adapted)
    merged_accuracy = accuracy(model, validation)
    kept = same_zeros(before_all, after_all)

    # A dense merge on a second copy: the same pruned base, the adapter from save_pretrained.
    dense_model, dense_linears = pruned_classifier(context, args.prune_sparsity)
    dense_base_same = same_zeros(before_all, zero_masks(dense_linears))
    dense_technique = lora(args, adapter=str(peft_dir))
    dense_technique.attach(dense_model)
    reapplied_accuracy = accuracy(dense_model, validation)
    dense_technique.merge(dense_model, keep_zeros=False)
    dense_adapted = zero_masks({name: dense_linears[name] for name in adapted})
    dense_all = zero_masks(dense_linears)
    dense_accuracy = accuracy(dense_model, validation)

    # sparse_update=True on a third copy: the update masked while training, so the merge is the trained model.
    sparse_model, sparse_linears = pruned_classifier(context, args.prune_sparsity)
    sparse_technique = lora(args, sparse_update=True)
    sparse_run = finetune(f"{lora_name(args)}, sparse_update=True, on the pruned base", lambda: sparse_model,
                          sparse_technique, context.text_train, validation, args.finetune_steps)  # fmt: skip
    sparse_technique.merge(sparse_model)
    sparse_merged_accuracy = accuracy(sparse_model, validation)
    sparse_kept = same_zeros(before_all, zero_masks(sparse_linears))

    numbers = {
        "sparsity_before": {"adapted": sparsity(before_adapted), "block_linears": sparsity(before_all)},
        "sparsity_after_merge": {"adapted": sparsity(after_adapted), "block_linears": sparsity(after_all)},
        "sparsity_after_dense_merge": {"adapted": sparsity(dense_adapted), "block_linears": sparsity(dense_all)},
        "accuracy_unmerged": run.accuracy,
        "accuracy_merged": merged_accuracy,
        "accuracy_reapplied_from_save_pretrained": reapplied_accuracy,
        "accuracy_dense_merged": dense_accuracy,
        "max_logit_difference_merged": float((merged_logits - unmerged_logits).abs().max()),
        "merge_report": merge_report,
        "adapted_layers": len(adapted),
        "zeros_kept": kept,
        "second_copy_same_zeros": dense_base_same,
        "sparse_update": {
            "accuracy_unmerged": sparse_run.accuracy,
            "accuracy_merged": sparse_merged_accuracy,
            "zeros_kept": sparse_kept,
            "seconds_per_step": sparse_run.seconds / args.finetune_steps,
            "plain_seconds_per_step": run.seconds / args.finetune_steps,
        },
    }
    rows = [
        ["unmerged (adapters on the pruned base)", f"{sparsity(before_adapted):.4f}", f"{sparsity(before_all):.4f}",
         f"{run.accuracy:.4f}"],
        ["merged, keep_zeros=True", f"{sparsity(after_adapted):.4f}", f"{sparsity(after_all):.4f}",
         f"{merged_accuracy:.4f}"],
        ["merged, keep_zeros=False (dense update)", f"{sparsity(dense_adapted):.4f}", f"{sparsity(dense_all):.4f}",
         f"{dense_accuracy:.4f}"],
        ["sparse_update=True, unmerged", f"{sparsity(before_adapted):.4f}", f"{sparsity(before_all):.4f}",
         f"{sparse_run.accuracy:.4f}"],
        ["sparse_update=True, merged", f"{sparsity(before_adapted):.4f}" if sparse_kept else "changed",
         f"{sparsity(zero_masks(sparse_linears)):.4f}", f"{sparse_merged_accuracy:.4f}"],
    ]  # fmt: skip
    print_rows(["", f"sparsity, {len(adapted)} adapted layers", "sparsity, all block Linears", "val/accuracy"], rows)
    print(f"max |logit difference| merged vs unmerged on one validation batch: "
          f"{numbers['max_logit_difference_merged']:.2e}; the adapter applied again from save_pretrained: val/accuracy "
          f"{reapplied_accuracy:.4f}")  # fmt: skip
    print(f"training step, from the runs (not interleaved): plain LoRA {run.seconds / args.finetune_steps:.3f} s, "
          f"sparse_update {sparse_run.seconds / args.finetune_steps:.3f} s")  # fmt: skip
    print()
    points = 100 * (merged_accuracy - run.accuracy)
    sparse_points = 100 * (sparse_merged_accuracy - sparse_run.accuracy)
    verdicts = {
        "zeros_kept": verdict(
            kept,
            "pruned: merging keeps exactly the base's zeros",
            f"sparsity of the adapted layers {sparsity(before_adapted):.4f} -> {sparsity(after_adapted):.4f}, of all "
            f"block Linears {sparsity(before_all):.4f} -> {sparsity(after_all):.4f}; zero positions "
            f"{'identical' if kept else 'changed'}; a dense merge leaves {sparsity(dense_adapted):.4f} in the adapted layers",
        ),
        "merged_accuracy": verdict(
            abs(points) <= ACCURACY_POINTS,
            f"pruned: the merged model's accuracy within {ACCURACY_POINTS:g} point of the unmerged one's",
            f"{merged_accuracy:.4f} vs {run.accuracy:.4f}: {points:+.2f} points; dense merge {dense_accuracy:.4f}",
        ),
        "sparse_update": verdict(
            sparse_kept and abs(sparse_points) <= ACCURACY_POINTS,
            "pruned: with sparse_update=True the merge keeps the zeros and the trained model's accuracy",
            f"{sparse_merged_accuracy:.4f} merged vs {sparse_run.accuracy:.4f} trained ({sparse_points:+.2f} points); "
            f"zero positions {'identical' if sparse_kept else 'changed'}",
        ),
    }
    return {**numbers, "steps": args.finetune_steps, "sparsity": args.prune_sparsity, "verdicts": verdicts}


# -- part 5: int8 base -----------------------------------------------------------------------------
def latencies(
    models: dict[str, nn.Module], sample: dict[str, torch.Tensor], args: argparse.Namespace
) -> dict[str, Any]:
    """Interleaved forward-pass times of each model at batch 1 and 32 (the first model is the baseline)."""
    results: dict[str, Any] = {}
    for model in models.values():
        model.eval()
    for size in LATENCY_BATCHES:
        ids, mask = sample["input_ids"][:size], sample["attention_mask"][:size]

        def forward(model: nn.Module, ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> Callable[[], None]:
            def step() -> None:
                with torch.inference_mode():
                    model(ids, mask)

            return step

        variants = [Variant(name, functools.partial(forward, model)) for name, model in models.items()]
        print(f"\ninference latency, batch {len(ids)} x {ids.shape[1]} tokens:")
        times = interleave(variants, args.latency_rounds, args.latency_steps, args.latency_warmup, verbose=False)
        results[f"batch_{size}"] = report(times, baseline=next(iter(models)), metric="step time")
    return results


def int8_part(context: Context) -> dict[str, Any]:
    """Part 5: LoRA on an int8 base; accuracy and latency unmerged, merged and re-quantized, and in float."""
    args = context.args
    validation = context.text_validation
    name = lora_name(args)
    print(f"\nPart 5: {name} on an int8 base (torchao int8 weight-only block Linears); {context.text_job_line()}, "
          f"{args.finetune_steps} steps (LR {args.lora_lr:g})")  # fmt: skip
    technique = lora(args, int8_base=True)
    run = finetune(f"{name}, int8 base", lambda: context.classifier(args.lora_lr), technique, context.text_train,
                   validation, args.finetune_steps)  # fmt: skip
    peft_dir = technique.save_pretrained(run.model, context.root / "int8_adapter")

    def applied(int8_base: bool) -> BertClassifier:
        pl.seed_everything(0, verbose=False)
        model = context.classifier(args.lora_lr)
        merger = lora(args, adapter=str(peft_dir), int8_base=int8_base)
        merger.attach(model)
        merger.merge(model)
        return model

    unmerged, merged, floating = "int8 base + adapter (unmerged)", "int8, merged and re-quantized", "fp32, merged"
    models = {unmerged: run.model, merged: applied(True), floating: applied(False)}
    accuracies = {unmerged: run.accuracy, merged: accuracy(models[merged], validation),
                  floating: accuracy(models[floating], validation)}  # fmt: skip
    sizes = {label: weight_bytes(model) for label, model in models.items()}
    timing = latencies(models, next(iter(validation.val_dataloader())), args)
    rows = []
    for label in models:
        cells = [f"{accuracies[label]:.4f}", f"{sizes[label] / MB:.2f}"]
        for size in LATENCY_BATCHES:
            numbers = timing[f"batch_{size}"]["variants"][label]
            cells += [f"{numbers['median_step_s'] * 1e3:.2f}", f"{numbers['ratio']:.3f}"]
        rows.append([label, *cells])
    header = ["", "val/accuracy", "weights (MB)"]
    for size in LATENCY_BATCHES:
        header += [f"batch {size} (ms)", "ratio"]
    print_rows(header, rows)
    float_lora = context.results.get("bert_lora_accuracy")
    if float_lora is not None:
        print(f"part 2's {name} on the float base: val/accuracy {float_lora:.4f}")
    print()
    points = 100 * (accuracies[merged] - accuracies[unmerged])
    speed = {size: timing[f"batch_{size}"]["variants"][merged]["ratio"] for size in LATENCY_BATCHES}
    verdicts = {
        "merged_accuracy": verdict(
            abs(points) <= ACCURACY_POINTS,
            f"int8: the merged and re-quantized model's accuracy within {ACCURACY_POINTS:g} point of the unmerged one's",
            f"{accuracies[merged]:.4f} vs {accuracies[unmerged]:.4f}: {points:+.2f} points; fp32 merged "
            f"{accuracies[floating]:.4f}"
            + (f"; float-base LoRA (part 2) {float_lora:.4f}" if float_lora is not None else ""),
        ),
        "latency": verdict(
            True,
            "int8: inference latency, merged and re-quantized vs the unmerged adapter",
            "; ".join(f"batch {size}: {ratio:.3f}x" for size, ratio in speed.items())
            + "; fp32: "
            + "; ".join(
                f"batch {size}: {timing[f'batch_{size}']['variants'][floating]['ratio']:.3f}x"
                for size in LATENCY_BATCHES
            ),
            kind="info",
        ),
    }
    return {"steps": args.finetune_steps, "train_time_s": run.seconds, "accuracy": accuracies,
            "float_base_lora_accuracy": float_lora, "weight_bytes": sizes, "latency": timing,
            "latency_ratio_merged": {str(size): ratio for size, ratio in speed.items()}, "verdicts": verdicts}  # fmt: skip


PARTS: dict[str, tuple[str, Callable[[Context], dict[str, Any]]]] = {
    "pretrain": ("1", pretrain_part),
    "bert": ("2", bert_part),
    "vit": ("3", vit_part),
    "pruned": ("4", pruned_part),
    "int8": ("5", int8_part),
}
"""The parts, by name: their number and function (each returns its result, stored under its name)."""


def print_summary(verdicts: dict[str, dict[str, Any]]) -> None:
    """Every claim's verdict with its numbers, part by part."""
    print("\nSummary")
    for entry in verdicts.values():
        label = ("PASS" if entry["holds"] else "FAIL") if entry["kind"] == "claim" else "info"
        print(f"  {label}: {entry['claim']} ({entry['details']})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected parts; their results by part name, with each part's duration and every verdict, also in ``--json``."""
    args = setup(parse_args(argv))
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="adapters_"))
    root.mkdir(parents=True, exist_ok=True)
    context = Context(args, root)
    result = run_parts(PARTS, args.parts, context)
    result["verdicts"] = {
        f"{name}/{key}": entry for name in args.parts for key, entry in result[name].get("verdicts", {}).items()
    }
    if "pretrain" not in args.parts and "pretraining" in vars(context):  # trained for a later part
        result["pretrain"] = context.pretraining
    print_summary(result["verdicts"])
    print(f"total {sum(result['seconds'].values()):.0f} s; checkpoints in {root}")
    return write_json(args.json, result)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
