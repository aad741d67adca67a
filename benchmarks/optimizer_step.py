"""Optimizer step time on BERT-small: LAMB and Lion each <= 1.10x torch.optim.AdamW(foreach=True).

Claim measured: one ``optimizer.step()`` of :class:`lightning_efficient.optim.LAMB` and of
:class:`lightning_efficient.optim.Lion` on BERT-small's parameters (``BertMLM(vocab_size=30522,
preset="small")``: hidden 256, 4 layers, 74 tensors, 11.2M values, on the CPU) takes at most ``--max-ratio``
(1.10x, issue 30; 1.15x before) the time of ``torch.optim.AdamW(foreach=True)`` on the same parameters.

Reference row, not a claim: ``torch.optim.AdamW(fused=True)`` (one ``aten::_fused_adamw_`` kernel per
group), timed alongside so that readers see how far a single fused pass goes. LAMB runs its moments and
update direction on that same kernel, then adds two norms and the trust-ratio update, so it cannot
reach the fused AdamW's time; Lion stays on ``torch._foreach_*`` calls.

What is timed: ``optimizer.step()`` alone. Each round builds, for every variant, a fresh model
from the same seed whose parameters all hold the same fixed random gradient (so every step does its
full work), and the optimizer (each on the BERT no-decay groups, weight decay 0.01, the recipes'
other defaults); after ``--warmup`` untimed steps each (state allocation), the variants take turns
*step by step* (A B C, B C A, ...: the order rotates every step) for ``--steps`` timed steps each.
A step lasts 10-50 ms, so turns of single steps put the variants within milliseconds of each other
and a burst of load from other processes hits them alike (turns of whole runs, as
``harness.interleave`` takes, left 0.1x-60x spreads on this shared machine). ``harness.report``
gives the ratio: the median over rounds of (variant median step / AdamW median step), with its
spread. ``--pytorch-optimizer`` adds pytorch-optimizer's ``Lamb`` / ``Lion`` (when importable) for
the comparison behind the build-or-adopt decision in the CHANGELOG.

Command (defaults: 4 rounds x (3 warmup + 30 timed steps) per variant, about a minute on 2 cores):

    python benchmarks/optimizer_step.py --rounds 4 --steps 30

On a machine that other processes keep busy, add ``--threads 1``: two OpenMP threads on two busy
cores wait for each other at every op, stretching steps 10-80x and unevenly between variants.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.harness import harness_arguments, report, setup, write_json
from lightning_efficient import BertMLM
from lightning_efficient.models.base import decay_parameter_groups
from lightning_efficient.models.presets import PRESETS
from lightning_efficient.optim import LAMB, Lion

WEIGHT_DECAY = 0.01
ADAMW = "AdamW(foreach=True)"
ADAMW_FUSED = "AdamW(fused=True)"  # a reference row, not a claim


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults finish in about a minute on 2 CPU cores."""
    parser = harness_arguments(__doc__, rounds=4, steps=30, warmup=3)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model size (claim: small)")
    parser.add_argument("--vocab-size", type=int, default=30522, help="vocabulary (claim: 30522, BERT's WordPiece)")
    parser.add_argument("--max-ratio", type=float, default=1.10, help="pass if step time / AdamW's <= this")
    parser.add_argument("--pytorch-optimizer", action="store_true", help="also time pytorch-optimizer's Lamb and Lion")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def optimizers(with_pytorch_optimizer: bool) -> dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]]:
    """The compared optimizers by name, each built on the model's no-decay groups; AdamW(foreach=True) first."""
    builders: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
        ADAMW: lambda m: torch.optim.AdamW(decay_parameter_groups(m, WEIGHT_DECAY), lr=1e-3, foreach=True),
        ADAMW_FUSED: lambda m: torch.optim.AdamW(decay_parameter_groups(m, WEIGHT_DECAY), lr=1e-3, fused=True),
        "LAMB (ours)": lambda m: LAMB(decay_parameter_groups(m, WEIGHT_DECAY), lr=1e-3),
        "Lion (ours)": lambda m: Lion(decay_parameter_groups(m, WEIGHT_DECAY), lr=1e-4),
    }
    if with_pytorch_optimizer:
        import pytorch_optimizer  # optional: only for the comparison

        builders["pytorch-optimizer Lamb"] = lambda m: pytorch_optimizer.Lamb(
            decay_parameter_groups(m, WEIGHT_DECAY), lr=1e-3, foreach=True
        )
        builders["pytorch-optimizer Lion"] = lambda m: pytorch_optimizer.Lion(
            decay_parameter_groups(m, WEIGHT_DECAY), lr=1e-4, foreach=True
        )
    return builders


def optimizer_step(
    args: argparse.Namespace, build: Callable[[torch.nn.Module], torch.optim.Optimizer]
) -> Callable[[], None]:
    """A fresh model (seed ``args.seed``) with fixed random gradients and its optimizer; returns its ``step``."""
    torch.manual_seed(args.seed)
    model = BertMLM(vocab_size=args.vocab_size, preset=args.preset)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    return build(model).step


def interleave_steps(
    builders: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]], args: argparse.Namespace
) -> dict[str, list[list[float]]]:
    """``times[name][round]``: step times of each optimizer, taking turns step by step in a rotating order."""
    names = list(builders)
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        steps = {name: optimizer_step(args, build) for name, build in builders.items()}
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        for name in names:
            times[name].append([])
        for index in range(args.steps):
            shift = (round_index * args.steps + index) % len(names)
            for name in [*names[shift:], *names[:shift]]:
                start = time.perf_counter()
                steps[name]()
                times[name][-1].append(time.perf_counter() - start)
        del steps
        gc.collect()
        medians = {name: statistics.median(times[name][-1]) for name in names}
        ratios = ", ".join(f"{medians[name] / medians[names[0]]:.3f}" for name in names[1:])
        print(f"round {round_index + 1}/{args.rounds}: step-time ratio to {names[0]}: {ratios}")
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time the interleaved optimizer steps, print the table and the verdict; returns the numbers."""
    args = setup(parse_args(argv))
    torch.manual_seed(args.seed)
    probe = BertMLM(vocab_size=args.vocab_size, preset=args.preset)
    tensors = sum(1 for _ in probe.parameters())
    values = sum(p.numel() for p in probe.parameters())
    del probe
    threads = torch.get_num_threads()
    print(f"BERT-{args.preset} parameters: {tensors} tensors, {values / 1e6:.1f}M values, {threads} threads")

    times = interleave_steps(optimizers(args.pytorch_optimizer), args)
    result = report(times, baseline=ADAMW, metric="step time")
    verdicts = {}
    for name in ("LAMB (ours)", "Lion (ours)"):
        ratio = result["variants"][name]["ratio"]
        verdicts[name] = ratio <= args.max_ratio
        verdict = "PASS" if verdicts[name] else "FAIL"
        print(f"{verdict}: {name} step = {ratio:.3f}x AdamW(foreach=True) (target <= {args.max_ratio:.2f}x)")
    fused = result["variants"][ADAMW_FUSED]["ratio"]
    print(f"reference (no claim): {ADAMW_FUSED} step = {fused:.3f}x {ADAMW}")
    result.update(claim="optimizer step time relative to AdamW(foreach=True)", target=args.max_ratio, passed=verdicts)
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
