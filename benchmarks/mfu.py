"""Model FLOPs utilisation (MFU) of the main job, against this machine's measured fp32 matmul peak.

Claim measured: training the main job (``configs/bert/small_mlm.yaml``: ``BertMLM`` preset small,
hidden 256, 4 layers, 4 heads, FFN 1024, masked-only MLM head, 30522-token WordPiece,
``MLMDataModule`` batch 32 x 128) through ``Trainer.fit`` reaches an MFU >= 45% of the fp32
matmul peak measured on this machine.

* Peak: square fp32 ``torch.mm`` of a few sizes (default 1024, 2048, 4096), each timed
  ``--matmul-repeats`` times (default 5) after a warmup; GFLOP/s = 2 n^3 / t; the best over all
  sizes and all probes is the peak.
* FLOPs per step: ``torch.utils.flop_counter.FlopCounterMode`` around one training step
  (``BertMLM._step`` forward + ``backward``) on one real batch. With the masked-only head this
  counts the vocabulary projection at the masked positions only: the work actually done. The
  full-sequence head's count is printed for reference. The AdamW step is not counted (about a
  dozen element-wise FLOPs per parameter, well under 1% of the step; the estimate is printed).
  FlopCounterMode counts matmuls and attention only; layer norms, GELU, softmax and dropout
  cost time but count no FLOPs, as is usual for MFU.
* Step time: steady-state ``Trainer.fit`` (``logger=False``, no checkpointing, progress bar,
  model summary or validation), run and timed by ``benchmarks/harness.py`` (``StepTimer``: the
  interval between consecutive ``on_train_batch_start`` calls, so data loading and all Lightning
  overhead are included), first ``--warmup`` batches of each run dropped. Achieved FLOP/s =
  FLOPs per step / median step time; MFU = achieved / peak.

Peak probes and training runs alternate in one process (probe, run, probe, run, ..., probe), so
both see the same machine conditions; the peak is the best probe, the step time the median over
all runs.

Command (defaults: 2 rounds x (3 warmup + 8 timed steps), a few minutes on 2 cores):

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/mfu.py --rounds 2 --steps 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import LightningJob, Variant, harness_arguments, interleave, setup, write_json
from benchmarks.jobs import MAIN_JOB, mlm_arguments, mlm_data, mlm_job_line, mlm_module
from lightning_efficient import BertMLM

ADAMW_FLOPS_PER_PARAMETER = 12  # rough count of the element-wise work of one AdamW update


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults finish in a few minutes on 2 CPU cores."""
    parser = mlm_arguments(harness_arguments(__doc__, rounds=2, steps=8, warmup=3))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096], help="square matmul sizes")
    parser.add_argument("--matmul-repeats", type=int, default=5, help="timed matmuls per size and probe")
    parser.add_argument("--target", type=float, default=0.45, help="pass if MFU >= target")
    return parser.parse_args(argv)


def matmul_peak(sizes: list[int], repeats: int) -> dict[int, float]:
    """Best fp32 GFLOP/s of square ``torch.mm`` for each size (one warmup, then ``repeats`` timed)."""
    best: dict[int, float] = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warmup
        fastest = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            fastest = min(fastest, time.perf_counter() - start)
        best[n] = 2 * n**3 / fastest / 1e9
    return best


def build_module(vocab_size: int, args: argparse.Namespace, masked_only: bool = True) -> BertMLM:
    """The main job's ``BertMLM`` (head variant selectable, for the reference FLOP count)."""
    return mlm_module(vocab_size, args, **{**MAIN_JOB, "head_on_masked_only": masked_only})


def count_step_flops(module: BertMLM, batch: dict[str, torch.Tensor], seed: int) -> tuple[int, dict[str, int]]:
    """FLOPs of one training step's forward + backward (``_step`` + ``backward``), and per-op counts."""
    module.train()
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = module._step(batch, torch.Generator().manual_seed(seed))
        loss.backward()
    module.zero_grad(set_to_none=True)
    per_op = {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), per_op


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Count FLOPs, alternate peak probes and training runs, print the table and the verdict; returns the numbers."""
    args = setup(parse_args(argv))
    torch.manual_seed(args.seed)
    datamodule = mlm_data(args)
    vocab_size = datamodule.vocab_size
    tokens = args.batch_size * args.max_length
    print(f"main job: {mlm_job_line(args, vocab_size)}")

    # FLOPs of one step, on one real batch (same masks for both head variants).
    batch = next(iter(datamodule.train_dataloader()))
    model = build_module(vocab_size, args)
    flops, per_op = count_step_flops(model, batch, args.seed)
    full_flops, _ = count_step_flops(build_module(vocab_size, args, masked_only=False), batch, args.seed)
    parameters = sum(p.numel() for p in model.parameters())
    adamw_flops = ADAMW_FLOPS_PER_PARAMETER * parameters
    del model
    print(
        f"FLOPs per step (forward + backward, masked-only head): {flops / 1e9:.1f} GFLOP "
        f"({', '.join(f'{op} {n / 1e9:.1f}' for op, n in per_op.items())})"
    )
    print(
        f"  reference, full-sequence head: {full_flops / 1e9:.1f} GFLOP; AdamW step (not counted): "
        f"~{adamw_flops / 1e9:.2f} GFLOP for {parameters / 1e6:.1f}M parameters ({adamw_flops / flops:.2%})"
    )

    # Alternate peak probes and training runs (each run: one harness round of the main job on CPU).
    def job() -> LightningJob:
        return LightningJob(build_module(vocab_size, args), datamodule, trainer_kwargs={"accelerator": "cpu"})

    main_job = Variant("main job", job, seed=args.seed)
    peaks: dict[int, float] = {}
    step_times: list[float] = []
    for round_index in range(args.rounds + 1):
        probe = matmul_peak(args.sizes, args.matmul_repeats)
        for n, gflops in probe.items():
            peaks[n] = max(peaks.get(n, 0.0), gflops)
        line = f"probe {round_index + 1}: matmul GFLOP/s " + ", ".join(f"{n}: {g:.1f}" for n, g in probe.items())
        if round_index < args.rounds:
            times = interleave([main_job], rounds=1, steps=args.steps, warmup=args.warmup, verbose=False)["main job"][0]
            step_times += times
            line += f"; run {round_index + 1}: median step {statistics.median(times):.3f} s"
        print(line)

    peak_size = max(peaks, key=peaks.__getitem__)
    peak = peaks[peak_size] * 1e9
    step = statistics.median(step_times)
    achieved = flops / step
    mfu = achieved / peak
    print()
    print(f"{'fp32 matmul peak (best of sizes)':40}{peak / 1e9:>14.1f} GFLOP/s  (n = {peak_size})")
    print(f"{'FLOPs per step (masked-only head)':40}{flops / 1e9:>14.1f} GFLOP")
    print(f"{'  reference: full-sequence head':40}{full_flops / 1e9:>14.1f} GFLOP  (not computed by the main job)")
    print(f"{'median step time (Trainer.fit)':40}{step:>14.4f} s  ({len(step_times)} steps)")
    print(f"{'tokens/s':40}{tokens / step:>14.1f}")
    print(f"{'achieved':40}{achieved / 1e9:>14.1f} GFLOP/s")
    print(f"{'MFU':40}{mfu:>14.1%}")
    passed = mfu >= args.target
    verdict = "PASS" if passed else "FAIL"
    print(f"\n{verdict}: MFU {mfu:.1%} of the measured fp32 peak (target >= {args.target:.0%})")
    result = {
        "claim": "MFU of the main job against the measured fp32 matmul peak",
        "peak_flops_per_s": peak,
        "peak_size": peak_size,
        "flops_per_step": flops,
        "full_head_flops_per_step": full_flops,
        "median_step_s": step,
        "steps": len(step_times),
        "tokens_per_s": tokens / step,
        "achieved_flops_per_s": achieved,
        "mfu": mfu,
        "target": args.target,
        "passed": passed,
    }
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
