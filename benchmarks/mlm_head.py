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
   batches pre-loaded so only the step is timed. The two variants alternate step by step
   (ABBA... order), after ``--warmup`` untimed steps each; the median step time of each is
   reported with the ratio. The verdict asks for at least ``--min-speedup`` (default 1.5x).

Command (defaults: 2 warmup + 12 timed steps per variant, a few minutes on 2 cores):

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/mlm_head.py --steps 12
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from lightning_efficient import BertMLM, MLMDataModule
from lightning_efficient.models.base import decay_parameter_groups

# Settings of configs/bert/small_mlm.yaml (the main job).
PRESET = "small"
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01


def parse_args() -> argparse.Namespace:
    """Command-line options; the defaults finish in a few minutes on 2 CPU cores."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    parser.add_argument("--check-batches", type=int, default=3, help="batches on which the losses are compared")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=30522, help="target WordPiece size (cached after first run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max allowed |loss difference|")
    parser.add_argument(
        "--min-speedup", type=float, default=1.5, help="pass if full-head step time / masked-head step time >= this"
    )
    return parser.parse_args()


def build_module(vocab_size: int, max_length: int, masked_only: bool, seed: int) -> BertMLM:
    """A ``BertMLM`` of the main job's shape with the given head variant."""
    return BertMLM(
        vocab_size=vocab_size,
        preset=PRESET,
        max_length=max_length,
        head_on_masked_only=masked_only,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        seed=seed,
    )


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
    return torch.optim.AdamW(
        decay_parameter_groups(module, WEIGHT_DECAY), lr=LEARNING_RATE, betas=(0.9, 0.98), eps=1e-6
    )


def train_step(
    module: BertMLM, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], generator: torch.Generator
) -> float:
    """One training step through the module's own ``_step``; returns its wall time in seconds."""
    start = time.perf_counter()
    loss, _, _ = module._step(batch, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    """Check loss equality, time interleaved training steps, print the table and the verdict."""
    args = parse_args()
    torch.manual_seed(args.seed)
    datamodule = MLMDataModule(vocab_size=args.vocab_size, max_length=args.max_length, batch_size=args.batch_size)
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    batches = [next(loader) for _ in range(args.warmup + args.steps)]
    vocab_size = datamodule.vocab_size
    print(
        f"BERT-{PRESET} MLM, batch {args.batch_size} x {args.max_length} tokens, vocab {vocab_size}, "
        f"{torch.get_num_threads()} threads"
    )

    torch.manual_seed(args.seed)
    variants = {
        "masked-only head (ours)": build_module(vocab_size, args.max_length, True, args.seed),
        "full-sequence head (baseline)": build_module(vocab_size, args.max_length, False, args.seed),
    }
    masked, full = variants.values()
    full.load_state_dict(masked.state_dict())

    # 1. Same loss on the masked positions.
    check = batches[: args.check_batches]
    eval_diff, eval_losses = max_loss_difference(masked, full, check, args.seed, train_mode=False)
    train_diff, _ = max_loss_difference(masked, full, check, args.seed, train_mode=True)
    print(f"loss equality on {len(check)} batches (losses {', '.join(f'{x:.5f}' for x in eval_losses)}):")
    print(f"  max |loss difference|: eval mode {eval_diff:.2e}, train mode (same dropout) {train_diff:.2e}"
          f" (tolerance {args.tolerance:.0e})")
    if max(eval_diff, train_diff) > args.tolerance:
        sys.exit(f"FAIL: the two heads give different losses ({max(eval_diff, train_diff):.2e} > {args.tolerance:.0e})")

    # 2. Interleaved training-step timing (each variant has its own optimizer and mask generator).
    optimizers = {name: make_optimizer(module) for name, module in variants.items()}
    generators = {name: torch.Generator().manual_seed(args.seed) for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for index, batch in enumerate(batches):
        order = names if index % 2 == 0 else names[::-1]  # ABBA: neither variant always goes first
        for name in order:
            elapsed = train_step(variants[name], optimizers[name], batch, generators[name])
            if index >= args.warmup:
                times[name].append(elapsed)

    ours, base = (statistics.median(times[name]) for name in names)
    tokens = args.batch_size * args.max_length
    speedup = base / ours
    print()
    print(f"{'':26}{'full head (baseline)':>22}{'masked-only (ours)':>20}{'ratio ours/base':>18}")
    print(f"{'median step time (s)':26}{base:>22.4f}{ours:>20.4f}{ours / base:>18.3f}")
    print(f"{'tokens/s':26}{tokens / base:>22.1f}{tokens / ours:>20.1f}{speedup:>18.3f}")
    print(f"{'timed steps':26}{len(times[names[1]]):>22}{len(times[names[0]]):>20}")
    verdict = "PASS" if speedup >= args.min_speedup else "FAIL"
    print(
        f"\n{verdict}: masked-only head is {speedup:.2f}x faster per training step ({1 - ours / base:.0%} less time; "
        f"target >= {args.min_speedup:.2f}x), losses equal to {max(eval_diff, train_diff):.1e}"
    )


if __name__ == "__main__":
    main()
