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

What is timed, on both sides, is one whole step including fetching its batch: on the Lightning
side the interval from the start of batch i to the start of batch i+1 (every hook, the
``self.log`` calls, the training accuracy on logged steps and the loop machinery included;
``harness.StepTimer``), on the hand side one call of the loop body (``next(iterator)`` + step).
The first ``--warmup`` steps of every run are dropped. Runs are interleaved in one process by
``benchmarks/harness.py`` (Lightning, hand loop, hand loop, Lightning, ...: the side that goes
first alternates, garbage is collected before every run), each with a fresh model from the same
seed; both sides must see the same first batch and give the same first loss (printed per round).
The verdict uses the harness's ratio: the median over rounds of (hand median step time /
Lightning median step time) = Lightning tokens/s / hand tokens/s.

Command (defaults: 4 rounds x (3 warmup + 10 timed steps) per side, about 3 minutes on 2 cores):

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/lightning_overhead.py --rounds 4 --steps 10
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from transformers import BertForMaskedLM

from benchmarks.harness import LightningJob, Variant, harness_arguments, interleave, report, setup, write_json
from benchmarks.jobs import MAIN_JOB, mlm_arguments, mlm_data, mlm_job_line, mlm_module
from lightning_efficient import MLMDataModule
from lightning_efficient.models.base import decay_parameter_groups, warmup_schedule
from lightning_efficient.models.bert import bert_config, mask_tokens
from lightning_efficient.models.presets import resolve_size

LIGHTNING, HAND = "Lightning (ours)", "hand loop"


class FirstBatchProbe(pl.Callback):
    """Appends ``(first loss, checksum of the first batch's token ids)`` of a run to ``record``."""

    def __init__(self, record: list[tuple[float, int]]) -> None:
        self.record = record

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            self.record.append((float(outputs["loss"].detach()), int(batch["input_ids"].sum())))


def lightning_job(datamodule: MLMDataModule, args: argparse.Namespace, record: list[tuple[float, int]]) -> LightningJob:
    """``BertMLM`` of the main job, trained by ``Trainer.fit`` on CPU (the hand loop's device)."""
    model = mlm_module(datamodule.vocab_size, args, **MAIN_JOB)
    return LightningJob(model, datamodule, [FirstBatchProbe(record)], {"accelerator": "cpu"})


def hand_step(
    datamodule: MLMDataModule, args: argparse.Namespace, record: list[tuple[float, int]]
) -> Callable[[], None]:
    """The same training as :func:`lightning_job`, as a plain PyTorch loop body: one call = one step."""
    vocab_size = datamodule.vocab_size
    model = BertForMaskedLM(bert_config(resolve_size(args.preset), vocab_size, args.max_length, MAIN_JOB["dropout"]))
    model.train()
    total = args.warmup + args.steps + 1  # = the Lightning side's max_steps, so the LR schedules match
    warmup_steps = int(MAIN_JOB["warmup_fraction"] * total)
    groups = decay_parameter_groups(model, MAIN_JOB["weight_decay"])
    optimizer = torch.optim.AdamW(groups, lr=MAIN_JOB["learning_rate"], betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_schedule(step, warmup_steps, total, "linear")
    )
    generator = torch.Generator().manual_seed(args.seed)
    iterator = iter(datamodule.train_dataloader())
    recorded = False

    def step() -> None:
        nonlocal recorded
        batch = next(iterator)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        masked, labels = mask_tokens(input_ids, attention_mask, generator, vocab_size, MAIN_JOB["mlm_probability"])
        hidden = model.bert(input_ids=masked, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        keep = labels != -100
        logits = model.cls(hidden[keep])  # (M, V): masked positions only
        loss = F.cross_entropy(logits.float(), labels[keep])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if not recorded:  # first step of this run
            record.append((float(loss.detach()), int(input_ids.sum())))
            recorded = True

    return step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Interleave Lightning and hand-loop runs, then print the table and the verdict; returns the numbers."""
    parser = mlm_arguments(harness_arguments(__doc__, rounds=4, steps=10, warmup=3))  # a few minutes on 2 cores
    parser.add_argument("--target", type=float, default=0.95, help="pass if Lightning tokens/s >= target x hand loop")
    args = setup(parser.parse_args(argv))
    datamodule = mlm_data(args)
    tokens = args.batch_size * args.max_length
    print(
        f"{mlm_job_line(args, datamodule.vocab_size)}; {args.rounds} rounds x {args.steps} timed steps "
        f"(+{args.warmup} warmup) per side"
    )
    first: dict[str, list[tuple[float, int]]] = {LIGHTNING: [], HAND: []}
    variants = [
        Variant(LIGHTNING, lambda: lightning_job(datamodule, args, first[LIGHTNING]), seed=args.seed),
        Variant(HAND, lambda: hand_step(datamodule, args, first[HAND]), seed=args.seed),
    ]
    times = interleave(variants, args.rounds, args.steps, args.warmup)
    for index, ((light_loss, light_sum), (hand_loss, hand_sum)) in enumerate(zip(first[LIGHTNING], first[HAND])):
        same = "same first batch" if light_sum == hand_sum else "DIFFERENT first batch"
        print(f"round {index + 1}: first loss Lightning {light_loss:.5f}, hand {hand_loss:.5f} ({same})")

    result = report(times, baseline=HAND, metric="throughput", work_per_step=tokens, unit="tokens")
    ratio = result["variants"][LIGHTNING]["ratio"]
    passed = ratio >= args.target
    verdict = "PASS" if passed else "FAIL"
    print(f"\n{verdict}: Lightning reaches {ratio:.3f}x the hand loop's tokens/s (target >= {args.target:.2f}x)")
    result.update(claim="Lightning tokens/s / hand-loop tokens/s", target=args.target, passed=passed)
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
