"""Per-step overhead of MagnitudePruning's masks on BERT-small MLM training: <= 5% (torch's prune hooks cost 7-12%).

What is timed. Three Lightning variants of the main job's step (``BertMLM`` + ``MLMDataModule``
through ``Trainer.fit``; ``benchmarks/harness.py`` times ``on_train_batch_start`` to the next, so
hooks, the optimizer step and logging all count), same model, data and seed:

- ``dense``: no pruning (the baseline).
- ``masks (ours)``: ``MagnitudePruning(final_sparsity=0.5, start_step=0)``: a one-shot event at
  step 0 (an untimed warmup step), then every timed step multiplies the gradients and the weights
  of the 24 Linear layers of the blocks by their masks (one foreach multiply each).
- ``torch prune hooks``: ``torch.nn.utils.prune.l1_unstructured`` on the same layers at the same
  sparsity, set up before the optimizer: a forward pre-hook recomputes ``weight = weight_orig *
  weight_mask`` every forward (what Lightning's ``ModelPruning`` uses).

Ratios are the median over interleaved rounds (order rotated each round) of per-round median step
times. The verdict asks the masks' step-time ratio to be <= ``--max-overhead`` (default 1.05).

Command (about 10 minutes on 2 cores):

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/pruning_overhead.py --rounds 6 --steps 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.utils import prune

from benchmarks.harness import LightningJob, Variant, harness_arguments, interleave, report, setup, write_json
from benchmarks.jobs import mlm_arguments, mlm_data, mlm_module
from lightning_efficient.blocks import find_block_stacks
from lightning_efficient.callbacks.pruning import MagnitudePruning

DENSE, OURS, TORCH = "dense", "masks (ours)", "torch prune hooks"


class TorchPruneHooks(pl.Callback):
    """``torch.nn.utils.prune.l1_unstructured`` on the Linear layers of the blocks, before the optimizer is built."""

    def __init__(self, amount: float) -> None:
        self.amount = amount

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for module in block_linears(pl_module):
            prune.l1_unstructured(module, "weight", amount=self.amount)


def block_linears(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers inside the Transformer blocks (MagnitudePruning's default targets)."""
    blocks = [block for stack in find_block_stacks(model) for block in stack.blocks]
    return [m for block in blocks for m in block.modules() if isinstance(m, nn.Linear)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = mlm_arguments(harness_arguments(__doc__, rounds=6, steps=8, warmup=2))
    parser.add_argument("--sparsity", type=float, default=0.5, help="share of the blocks' Linear weights pruned")
    parser.add_argument("--max-overhead", type=float, default=1.05, help="pass if masks / dense step time <= this")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time the three variants interleaved, print the table and the verdict; returns the numbers."""
    args = setup(parse_args(argv))
    datamodule = mlm_data(args)

    def job(callbacks: list[pl.Callback]) -> LightningJob:
        return LightningJob(mlm_module(datamodule.vocab_size, args), datamodule, callbacks, {"accelerator": "cpu"})

    variants = [
        Variant(DENSE, lambda: job([]), seed=args.seed),
        Variant(OURS, lambda: job([MagnitudePruning(final_sparsity=args.sparsity, start_step=0)]), seed=args.seed),
        Variant(TORCH, lambda: job([TorchPruneHooks(args.sparsity)]), seed=args.seed),
    ]
    print(f"BERT-{args.preset} MLM, batch {args.batch_size} x {args.max_length}, {args.sparsity:.0%} of the blocks' "
          f"Linear weights pruned, {torch.get_num_threads()} threads")  # fmt: skip
    times = interleave(variants, args.rounds, args.steps, args.warmup)
    result = report(times, baseline=DENSE, metric="step time", work_per_step=args.batch_size * args.max_length)
    ours, hooks = result["variants"][OURS]["ratio"], result["variants"][TORCH]["ratio"]
    passed = ours <= args.max_overhead
    print(f"\n{'PASS' if passed else 'FAIL'}: masks cost {ours - 1:+.1%} per training step (target <= "
          f"{args.max_overhead - 1:+.0%}); torch's prune hooks {hooks - 1:+.1%}")  # fmt: skip
    result.update(claim="per-step overhead of the pruning masks", target=args.max_overhead, passed=passed)
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
