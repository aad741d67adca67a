"""Lightning overhead: our LightningModule + DataModule vs a hand-written PyTorch loop.

Claim measured: ``BertMLM`` + ``MLMDataModule`` trained through ``Trainer.fit`` (BERT-small,
batch 32 x 128 tokens, 30522-token WordPiece, masked-only MLM head) reaches >= 0.95x the
tokens/s of a hand-written PyTorch loop doing the same work on the same HF model:

* the same ``transformers.BertForMaskedLM``, built from the same config with the same seed;
* the same masking (``mask_tokens`` on a generator with the same seed) and the same masked-only
  head (hidden states gathered at the masked positions before ``model.cls``, as in
  ``BertMLM.masked_logits``), fp32 cross-entropy;
* the same batches from ``MLMDataModule.train_dataloader()``;
* the same optimizer as ``EfficientModule.configure_optimizers``: AdamW over
  ``decay_parameter_groups`` with betas (0.9, 0.98), eps 1e-6, and a ``LambdaLR`` warmup/decay
  stepped every batch.

What is timed, on both sides, is the interval from the start of batch i to the start of batch
i+1: it includes fetching the next batch and, on the Lightning side, every hook, the
``self.log`` calls, the training accuracy (on logged steps) and the loop machinery. Lightning records it with a
Callback at ``on_train_batch_start``; the hand loop records it right after ``next(iterator)``.
The first ``--warmup`` batches of every run are dropped. Runs are interleaved in one process
(Lightning, hand loop, hand loop, Lightning, ...: the side that goes first alternates, and
garbage is collected before every run), each with a fresh model from the same seed; the verdict
uses the median step time over all timed steps of each side.

Command (defaults: 4 rounds x (3 warmup + 10 timed steps) per side, about 3 minutes on 2 cores):

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/lightning_overhead.py --rounds 4 --steps 10
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from transformers import BertForMaskedLM

from lightning_efficient import BertMLM, MLMDataModule
from lightning_efficient.models.base import decay_parameter_groups, warmup_schedule
from lightning_efficient.models.bert import bert_config, mask_tokens
from lightning_efficient.models.presets import resolve_size

# Settings of configs/bert/small_mlm.yaml (the main job).
PRESET = "small"
LEARNING_RATE = 1e-3
WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.01
DROPOUT = 0.1
MLM_PROBABILITY = 0.15


def parse_args() -> argparse.Namespace:
    """Command-line options; the defaults finish in a few minutes on 2 CPU cores."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (even: each side goes first equally)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches at the start of every run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=30522, help="target WordPiece size (cached after first run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.95, help="pass if Lightning tokens/s >= target x hand loop")
    return parser.parse_args()


class BatchStartTimer(pl.Callback):
    """Records ``time.perf_counter()`` at every ``on_train_batch_start``, and the first batch's loss."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.first_loss: float | None = None
        self.first_batch_sum: int | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.starts.append(time.perf_counter())
        if self.first_batch_sum is None:
            self.first_batch_sum = int(batch["input_ids"].sum())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.first_loss is None:
            self.first_loss = float(outputs["loss"].detach())


def lightning_run(datamodule: MLMDataModule, args: argparse.Namespace) -> tuple[list[float], float, int]:
    """Train ``BertMLM`` with ``Trainer.fit`` for ``warmup + steps + 1`` batches.

    Returns:
        The ``steps`` timed batch-to-batch intervals (seconds), the first batch's loss and a
        checksum of the first batch's token ids (to check both sides see the same data).
    """
    torch.manual_seed(args.seed)
    model = BertMLM(
        vocab_size=datamodule.vocab_size,
        preset=PRESET,
        max_length=args.max_length,
        mlm_probability=MLM_PROBABILITY,
        head_on_masked_only=True,
        dropout=DROPOUT,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        warmup_fraction=WARMUP_FRACTION,
        seed=args.seed,
    )
    timer = BatchStartTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.warmup + args.steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=datamodule)
    intervals = [b - a for a, b in zip(timer.starts, timer.starts[1:])]
    assert timer.first_loss is not None and timer.first_batch_sum is not None
    return intervals[args.warmup :], timer.first_loss, timer.first_batch_sum


def hand_run(datamodule: MLMDataModule, args: argparse.Namespace) -> tuple[list[float], float, int]:
    """The same training as :func:`lightning_run`, written as a plain PyTorch loop.

    Returns:
        The ``steps`` timed batch-to-batch intervals (seconds), the first batch's loss and a
        checksum of the first batch's token ids.
    """
    torch.manual_seed(args.seed)
    vocab_size = datamodule.vocab_size
    config = bert_config(resolve_size(PRESET), vocab_size, args.max_length, DROPOUT)
    model = BertForMaskedLM(config)
    model.train()
    total = args.warmup + args.steps + 1
    warmup_steps = int(WARMUP_FRACTION * total)
    optimizer = torch.optim.AdamW(
        decay_parameter_groups(model, WEIGHT_DECAY), lr=LEARNING_RATE, betas=(0.9, 0.98), eps=1e-6
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_schedule(step, warmup_steps, total, "linear")
    )
    generator = torch.Generator().manual_seed(args.seed)
    iterator = iter(datamodule.train_dataloader())
    starts: list[float] = []
    first_loss, first_batch_sum = 0.0, 0
    for step in range(total):
        batch = next(iterator)
        starts.append(time.perf_counter())
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        masked, labels = mask_tokens(input_ids, attention_mask, generator, vocab_size, MLM_PROBABILITY)
        hidden = model.bert(input_ids=masked, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        keep = labels != -100
        logits = model.cls(hidden[keep])  # (M, V): masked positions only
        loss = F.cross_entropy(logits.float(), labels[keep])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step == 0:
            first_loss, first_batch_sum = float(loss.detach()), int(input_ids.sum())
    intervals = [b - a for a, b in zip(starts, starts[1:])]
    return intervals[args.warmup :], first_loss, first_batch_sum


def quiet_lightning() -> None:
    """Silence Lightning's per-``fit`` banner and the few-workers hint (they are not errors here)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def main() -> None:
    """Interleave Lightning and hand-loop runs, then print the table and the verdict."""
    args = parse_args()
    quiet_lightning()
    datamodule = MLMDataModule(vocab_size=args.vocab_size, max_length=args.max_length, batch_size=args.batch_size)
    datamodule.setup("fit")
    tokens = args.batch_size * args.max_length
    print(
        f"BERT-{PRESET} MLM, batch {args.batch_size} x {args.max_length} tokens, vocab {datamodule.vocab_size}, "
        f"{torch.get_num_threads()} threads; {args.rounds} rounds x {args.steps} timed steps "
        f"(+{args.warmup} warmup) per side"
    )

    times: dict[str, list[float]] = {"lightning": [], "hand": []}
    runners = {"lightning": lightning_run, "hand": hand_run}
    for round_index in range(args.rounds):
        results: dict[str, tuple[list[float], float, int]] = {}
        order = ["lightning", "hand"] if round_index % 2 == 0 else ["hand", "lightning"]  # neither always first
        for name in order:
            gc.collect()  # the previous run's Trainer/model cycles must not be collected while timing this one
            results[name] = runners[name](datamodule, args)
        (light, light_loss, light_sum), (hand, hand_loss, hand_sum) = results["lightning"], results["hand"]
        times["lightning"] += light
        times["hand"] += hand
        same = "same first batch" if light_sum == hand_sum else "DIFFERENT first batch"
        light_step, hand_step = statistics.median(light), statistics.median(hand)
        print(
            f"round {round_index + 1}: median step lightning {light_step:.3f} s, hand {hand_step:.3f} s, "
            f"ratio (tokens/s) {hand_step / light_step:.3f}; first loss {light_loss:.5f} vs {hand_loss:.5f} ({same})"
        )

    light_step, hand_step = statistics.median(times["lightning"]), statistics.median(times["hand"])
    ratio = hand_step / light_step  # = lightning tokens/s / hand tokens/s
    print()
    print(f"{'':28}{'hand loop (baseline)':>22}{'Lightning (ours)':>20}{'ratio ours/base':>18}")
    print(f"{'median step time (s)':28}{hand_step:>22.4f}{light_step:>20.4f}{light_step / hand_step:>18.3f}")
    print(f"{'tokens/s':28}{tokens / hand_step:>22.1f}{tokens / light_step:>20.1f}{ratio:>18.3f}")
    print(f"{'timed steps':28}{len(times['hand']):>22}{len(times['lightning']):>20}")
    verdict = "PASS" if ratio >= args.target else "FAIL"
    print(f"\n{verdict}: Lightning reaches {ratio:.3f}x the hand loop's tokens/s (target >= {args.target:.2f}x)")


if __name__ == "__main__":
    main()
