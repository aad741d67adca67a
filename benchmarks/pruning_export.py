"""Structured pruning of half the heads and FFN neurons of a BERT classifier, exported: CPU inference >= 1.6x.

What is run, in one process:

1. ``dense``: a ``BertClassifier`` (``--preset``, default small) trained from scratch on Brown's
   informative vs imaginative prose (``TextClassificationDataModule(label_map=BROWN_PROSE)``) for
   ``--dense-steps`` optimizer steps; its validation accuracy is measured.
2. ``dense, longer``: the same model trained ``--prune-steps`` more steps without pruning (the
   accuracy reference at equal training steps).
3. ``pruned``: the step-1 model trained ``--prune-steps`` more steps with
   ``MagnitudePruning(structure="heads_and_neurons", final_sparsity=--sparsity, scope="per_layer")``:
   cubic schedule with events every ``--frequency`` steps over the first 60% of those steps, then
   recovery. Validation accuracy with the masks, then after :func:`export` (the pruned heads and
   neurons sliced out); the exported logits are checked against the masked model's.
4. Inference timing, on two batches of ``--infer-batch`` rows: the validation batch as the loader
   gives it (rows padded to the batch's longest, about 24 tokens per Brown example), and full rows
   of ``--max-length`` real tokens with no padding (the same examples' tokens, each example whole,
   concatenated in turn and cut into rows: what a longer document would give). On each, the dense
   and the exported model classify it (``torch.inference_mode``), interleaved in rounds by
   ``benchmarks/harness.py``; the speedup is the median over rounds of the per-round ratio of
   median batch times. The exported logits are checked against the masked model's on both
   batches. The exported model is also saved with ``save_pretrained`` and read back with
   ``load_pruned`` (same logits).

Reported: the speedup on each batch shape (verdict: both >= ``--min-speedup``, default 1.6, and
the exported logits equal to the masked model's to 1e-4), parameter counts of the blocks before
and after (about halved), accuracies and the accuracy drop against ``dense, longer``.

Command (about 25 minutes on 2 cores; training dominates):

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/pruning_export.py --dense-steps 1000 --prune-steps 600
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch

from benchmarks.harness import Variant, benchmark_trainer, harness_arguments, interleave, report, setup, write_json
from benchmarks.jobs import prose_arguments, prose_classifier, prose_data, validation_accuracy
from lightning_efficient import BertClassifier
from lightning_efficient.blocks import find_block_stacks
from lightning_efficient.callbacks.pruning import MagnitudePruning, load_pruned
from lightning_efficient.models.presets import PRESETS

__all__ = ["full_length_batch", "main", "parse_args"]

DENSE, EXPORTED = "dense", "exported (pruned)"
SHAPES = ("padded", "full_length")  # the two timed batches: the loader's rows, and rows of max_length tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness_arguments(__doc__, rounds=6, steps=10, warmup=2)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model size")
    prose_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--dense-steps", type=int, default=1000, help="training steps before pruning")
    parser.add_argument("--prune-steps", type=int, default=600, help="training steps with pruning (and recovery)")
    parser.add_argument("--frequency", type=int, default=50, help="steps between pruning events")
    parser.add_argument("--sparsity", type=float, default=0.5, help="share of heads and of FFN neurons removed")
    parser.add_argument("--infer-batch", type=int, default=32, help="examples per timed inference batch")
    parser.add_argument("--val-batches", type=int, default=None, help="limit validation batches (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-speedup", type=float, default=1.6, help="pass if exported inference is >= this x faster")
    return parser.parse_args(argv)


def trainer(steps: int, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    return benchmark_trainer(accelerator="cpu", max_steps=steps, callbacks=callbacks or [])


def block_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for stack in find_block_stacks(model) for p in stack.blocks.parameters())


def full_length_batch(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """As many rows as ``batch`` of ``length`` real tokens, no padding: its examples' tokens in turn, cut into rows.

    Each example's unpadded ids (its ``[CLS]`` and ``[SEP]`` included) follow the previous one's,
    the examples repeating as often as needed; the stream is cut into rows of ``length``.

    Examples:
        >>> batch = {"input_ids": torch.tensor([[2, 7, 3, 0], [2, 8, 9, 3]]),
        ...          "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
        >>> full = full_length_batch(batch, 5)
        >>> full["input_ids"].tolist(), bool(full["attention_mask"].all())
        ([[2, 7, 3, 2, 8], [9, 3, 2, 7, 3]], True)
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    stream = torch.cat([row[row_mask.bool()] for row, row_mask in zip(ids, mask)])
    rows = ids.shape[0]
    repeats = -(-rows * length // stream.numel())  # ceiling division
    full = stream.repeat(repeats)[: rows * length].view(rows, length)
    return {"input_ids": full, "attention_mask": torch.ones_like(full)}


def inference_step(model: BertClassifier, batch: dict[str, torch.Tensor]) -> Any:
    """A step callable for the harness: classify ``batch`` once."""
    model.eval()

    def step() -> None:
        with torch.inference_mode():
            model(batch["input_ids"], batch["attention_mask"])

    return step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, prune, export, time; print the table and the verdict; returns the numbers."""
    args = setup(parse_args(argv))
    pl.seed_everything(args.seed, verbose=False)
    datamodule = prose_data(args, args.batch_size)
    model = prose_classifier(datamodule, args.preset, args.max_length, learning_rate=args.learning_rate)
    print(f"BERT-{args.preset} classifier, {len(datamodule.label_names)} classes, batch {args.batch_size} x "
          f"{args.max_length}, {torch.get_num_threads()} threads")  # fmt: skip

    # 1-3. Dense training, then longer dense and pruned continuations from the same weights.
    trainer(args.dense_steps).fit(model, datamodule)
    dense_accuracy = validation_accuracy(model, datamodule, args.val_batches)
    longer, pruned = copy.deepcopy(model), copy.deepcopy(model)
    trainer(args.prune_steps).fit(longer, datamodule)
    longer_accuracy = validation_accuracy(longer, datamodule, args.val_batches)
    end = max(1, int(0.6 * args.prune_steps))
    pruning = MagnitudePruning(
        final_sparsity=args.sparsity, start_step=0, end_step=end, frequency=max(1, min(args.frequency, end)),
        structure="heads_and_neurons", scope="per_layer",
    )  # fmt: skip
    trainer(args.prune_steps + 1, [pruning]).fit(pruned, datamodule)  # the extra step runs the last event
    masked_accuracy = validation_accuracy(pruned, datamodule, args.val_batches)
    batch = next(iter(datamodule.val_dataloader()))
    batch = {k: v[: args.infer_batch] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    batches = {"padded": batch, "full_length": full_length_batch(batch, args.max_length)}
    pruned.eval()
    with torch.inference_mode():
        masked_logits = {shape: pruned(b["input_ids"], b["attention_mask"]) for shape, b in batches.items()}
    before = block_parameters(pruned)
    exported = pruning.export(pruned)
    after = block_parameters(pruned)
    with torch.inference_mode():
        exported_logits = {shape: pruned(b["input_ids"], b["attention_mask"]) for shape, b in batches.items()}
    max_difference = max(float((exported_logits[s] - masked_logits[s]).abs().max()) for s in SHAPES)
    exported_accuracy = validation_accuracy(pruned, datamodule, args.val_batches)
    with tempfile.TemporaryDirectory() as directory:
        pruned.model.save_pretrained(directory)
        reloaded = load_pruned(directory)
        with torch.inference_mode():
            reloaded_logits = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reload_difference = float((reloaded_logits - exported_logits["padded"]).abs().max())
    print(f"export: {exported['heads_removed']} heads and {exported['neurons_removed']} FFN neurons removed; "
          f"block parameters {before:,} -> {after:,} ({after / before:.2f}x); max |logit difference| masked vs "
          f"exported {max_difference:.1e} (both batches), exported vs reloaded {reload_difference:.1e}")  # fmt: skip
    print(f"validation accuracy: dense {dense_accuracy:.4f} ({args.dense_steps} steps), dense longer "
          f"{longer_accuracy:.4f} (+{args.prune_steps}), pruned masked {masked_accuracy:.4f}, exported "
          f"{exported_accuracy:.4f}")  # fmt: skip

    # 4. Interleaved inference timing on each batch (fresh closures each round over the same two models).
    dense_model = longer
    timings: dict[str, dict[str, Any]] = {}
    for shape, timed in batches.items():
        rows, length = timed["input_ids"].shape
        tokens = int(timed["attention_mask"].sum())
        print(f"\n{shape} batch: {rows} rows x {length} positions, {tokens / rows:.1f} real tokens per row")
        variants = [
            Variant(DENSE, lambda timed=timed: inference_step(dense_model, timed), seed=args.seed),
            Variant(EXPORTED, lambda timed=timed: inference_step(pruned, timed), seed=args.seed),
        ]
        times = interleave(variants, args.rounds, args.steps, args.warmup)
        timings[shape] = report(times, baseline=DENSE, metric="throughput", work_per_step=tokens, unit="tokens")
        timings[shape].update(rows=rows, positions=length, tokens=tokens)
    speedups = {shape: timings[shape]["variants"][EXPORTED]["ratio"] for shape in SHAPES}
    passed_shapes = {shape: speedup >= args.min_speedup for shape, speedup in speedups.items()}
    passed = all(passed_shapes.values()) and max_difference < 1e-4
    print()
    for shape in SHAPES:
        variant = timings[shape]["variants"][EXPORTED]
        print(f"{'PASS' if passed_shapes[shape] else 'FAIL'} ({shape} batch, {timings[shape]['positions']} "
              f"positions): exported model infers {speedups[shape]:.2f}x faster on CPU (rounds "
              f"{variant['ratio_min']:.2f}-{variant['ratio_max']:.2f}; target >= {args.min_speedup:.2f}x)")  # fmt: skip
    print(f"{'PASS' if passed else 'FAIL'}: both batch shapes >= {args.min_speedup:.2f}x, logits exact to 1e-4; "
          f"block parameters x{after / before:.2f}; accuracy {exported_accuracy:.4f} vs dense {longer_accuracy:.4f} "
          f"(drop {longer_accuracy - exported_accuracy:+.4f})")  # fmt: skip
    result = {
        "claim": "CPU inference speedup of the exported structured-pruned BERT classifier",
        "target": args.min_speedup,
        "passed": passed,
        "speedup": speedups,
        "passed_shapes": passed_shapes,
        "timing": timings,
        "block_parameters_before": before,
        "block_parameters_after": after,
        "heads_removed": exported["heads_removed"],
        "neurons_removed": exported["neurons_removed"],
        "accuracy_dense": dense_accuracy,
        "accuracy_dense_longer": longer_accuracy,
        "accuracy_masked": masked_accuracy,
        "accuracy_exported": exported_accuracy,
        "accuracy_drop": longer_accuracy - exported_accuracy,
        "max_logit_difference": max_difference,
        "reload_logit_difference": reload_difference,
    }
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
