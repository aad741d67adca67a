"""MLM head on masked positions only vs the full-sequence head: same loss, much less time.

Claim measured: for BERT-small (hidden 256, 4 layers, 4 heads, FFN 1024) with the 30522-token
WordPiece vocabulary, batch 32 x 128, ``BertMLM(head_on_masked_only=True)`` (hidden states
gathered at the ~15% masked positions before the vocabulary projection) trains much faster per
step than ``head_on_masked_only=False`` (the textbook head over all B x T positions), and gives
the same loss on the masked positions.

1. Equality: the two modules get identical weights (``load_state_dict``) and identical masks (a
   generator with the same seed); their ``_step`` losses on a few real batches must agree to
   ``--tolerance`` (1e-5), in eval mode and in train mode (same dropout seed). The script prints
   the max abs difference and exits with an error if it is larger.
2. Speed: one training step = the package's own ``BertMLM._step`` (masking, ``masked_logits``,
   fp32 cross-entropy) + ``backward`` + AdamW step (the optimizer settings of
   ``EfficientModule.configure_optimizers``, without the LR schedule). Plain PyTorch, no Trainer,
   batches pre-loaded so only the step is timed. ``benchmarks/harness.py`` interleaves the two
   variants in rounds (AB, BA, AB, ...), each run a fresh model from the same seed with
   ``--warmup`` untimed steps then ``--steps`` timed ones on the same batches; the speedup is the
   median over rounds of (full-head median step time / masked-head median step time), with its
   spread. The verdict asks for at least ``--min-speedup`` (default 1.5x).

Command (defaults: 4 rounds x (1 warmup + 3 timed steps) per variant, a few minutes on 2 cores):

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/mlm_head.py --rounds 4 --steps 3
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.harness import Variant, harness_arguments, interleave, report, setup, write_json
from benchmarks.jobs import MAIN_JOB, mlm_arguments, mlm_data, mlm_job_line, mlm_module
from lightning_efficient import BertMLM
from lightning_efficient.models.base import decay_parameter_groups

MASKED, FULL = "masked-only head (ours)", "full-sequence head"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults finish in a few minutes on 2 CPU cores."""
    parser = mlm_arguments(harness_arguments(__doc__, rounds=4, steps=3, warmup=1))
    parser.add_argument("--check-batches", type=int, default=3, help="batches on which the losses are compared")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max allowed |loss difference|")
    parser.add_argument(
        "--min-speedup", type=float, default=1.5, help="pass if full-head step time / masked-head step time >= this"
    )
    return parser.parse_args(argv)


def build_module(vocab_size: int, args: argparse.Namespace, masked_only: bool) -> BertMLM:
    """A ``BertMLM`` of the main job's shape with the given head variant."""
    return mlm_module(vocab_size, args, **{**MAIN_JOB, "head_on_masked_only": masked_only})


def max_loss_difference(
    masked: BertMLM, full: BertMLM, batches: list[dict[str, torch.Tensor]], seed: int, train_mode: bool
) -> tuple[float, list[float]]:
    """Max |loss_masked - loss_full| over ``batches`` with identical masks (and dropout in train mode).

    Returns:
        The max abs difference and the masked-only variant's losses.
    """
    masked.train(train_mode)
    full.train(train_mode)
    worst, losses = 0.0, []
    with torch.no_grad():
        for index, batch in enumerate(batches):
            torch.manual_seed(seed + index)  # same dropout masks for both variants
            loss_masked, _, _ = masked._step(batch, torch.Generator().manual_seed(seed + index))
            torch.manual_seed(seed + index)
            loss_full, _, _ = full._step(batch, torch.Generator().manual_seed(seed + index))
            worst = max(worst, abs(float(loss_masked) - float(loss_full)))
            losses.append(float(loss_masked))
    masked.train()
    full.train()
    return worst, losses


def make_optimizer(module: BertMLM) -> torch.optim.Optimizer:
    """AdamW as in ``EfficientModule.configure_optimizers`` (decay groups, betas, eps)."""
    groups = decay_parameter_groups(module, MAIN_JOB["weight_decay"])
    return torch.optim.AdamW(groups, lr=MAIN_JOB["learning_rate"], betas=(0.9, 0.98), eps=1e-6)


def training_step(
    vocab_size: int, args: argparse.Namespace, masked_only: bool, batches: list[dict[str, torch.Tensor]]
) -> Callable[[], None]:
    """A fresh module, optimizer and mask generator; each call of the result trains on the next batch."""
    module = build_module(vocab_size, args, masked_only)
    optimizer = make_optimizer(module)
    generator = torch.Generator().manual_seed(args.seed)
    iterator = iter(batches)

    def step() -> None:
        loss, _, _ = module._step(next(iterator), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Check loss equality, time interleaved training steps, print the table and the verdict; returns the numbers."""
    args = setup(parse_args(argv))
    torch.manual_seed(args.seed)
    datamodule = mlm_data(args)
    loader = iter(datamodule.train_dataloader())
    batches = [next(loader) for _ in range(max(args.warmup + args.steps, args.check_batches))]
    vocab_size = datamodule.vocab_size
    print(mlm_job_line(args, vocab_size))

    # 1. Same loss on the masked positions.
    torch.manual_seed(args.seed)
    masked = build_module(vocab_size, args, masked_only=True)
    full = build_module(vocab_size, args, masked_only=False)
    full.load_state_dict(masked.state_dict())
    check = batches[: args.check_batches]
    eval_diff, eval_losses = max_loss_difference(masked, full, check, args.seed, train_mode=False)
    train_diff, _ = max_loss_difference(masked, full, check, args.seed, train_mode=True)
    del masked, full
    print(f"loss equality on {len(check)} batches (losses {', '.join(f'{x:.5f}' for x in eval_losses)}):")
    print(
        f"  max |loss difference|: eval mode {eval_diff:.2e}, train mode (same dropout) {train_diff:.2e}"
        f" (tolerance {args.tolerance:.0e})"
    )
    if max(eval_diff, train_diff) > args.tolerance:
        sys.exit(f"FAIL: the two heads give different losses ({max(eval_diff, train_diff):.2e} > {args.tolerance:.0e})")

    # 2. Interleaved training-step timing (same seed: both variants start from the same weights and masks).
    variants = [
        Variant(FULL, lambda: training_step(vocab_size, args, False, batches), seed=args.seed),
        Variant(MASKED, lambda: training_step(vocab_size, args, True, batches), seed=args.seed),
    ]
    times = interleave(variants, args.rounds, args.steps, args.warmup)
    tokens = args.batch_size * args.max_length
    result = report(times, baseline=FULL, metric="throughput", work_per_step=tokens, unit="tokens")
    speedup = result["variants"][MASKED]["ratio"]
    passed = speedup >= args.min_speedup
    verdict = "PASS" if passed else "FAIL"
    print(
        f"\n{verdict}: masked-only head is {speedup:.2f}x faster per training step ({1 - 1 / speedup:.0%} less time; "
        f"target >= {args.min_speedup:.2f}x), losses equal to {max(eval_diff, train_diff):.1e}"
    )
    result.update(
        claim="masked-only head speedup over the full-sequence head", target=args.min_speedup, passed=passed,
        max_loss_difference=max(eval_diff, train_diff),
    )  # fmt: skip
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
