"""Residual initialisation schemes on BERT MLM (embedded corpus): ResidualInit vs the default init with warmup.

Claims measured (issue 23):

1. Every scheme of :class:`~lightning_efficient.ResidualInit` (``rezero``, ``skipinit``, ``layerscale``,
   ``t_fixup``, ``deepnorm``): step time <= 1.03x the default init's (the same ``BertMLM`` without it).
2. Warmup-free training: the best scheme, trained without warmup, reaches a target validation MLM
   loss in <= 0.8x the training time of the default init trained with its warmup (the main job's 10%).
3. (reported, no claim) An LR sweep: the final validation loss of the default init and of each
   scheme, all without warmup, at each of ``--lrs``, or "diverged".

Part 1 times training steps with ``harness.py``: the default init and one variant per scheme (the
same module with ``ResidualInit(scheme=...)``, which rewrites the blocks in ``setup``), interleaved
in rounds in one process; with six variants the order rotates through all of them every six rounds.
Part 2 trains the default init with the main job's settings (:data:`~benchmarks.jobs.MAIN_JOB`:
LR 1e-3, warmup over the first 10% of the budget, then decay) for ``--train-steps``, then, without
warmup (``warmup_fraction=0``, otherwise the same settings and budget), the default init (the control:
does it diverge or lag without warmup?) and each scheme, each with an
:class:`~lightning_efficient.EfficiencyMonitor` and validation every ``--val-every`` steps. The
target is the warmed-up default's final validation loss plus ``--tolerance`` (default 1%), or
``--target``; the step and the training time (validation excluded) at which each run first reaches
it come from the validation history. The runs without warmup also carry a
:class:`~lightning_efficient.NonFiniteLossGuard`: a run whose loss becomes ``nan`` or ``inf`` stops
there and is reported as diverged. The runs of part 2 are sequential, so their time ratios carry the
machine's noise; the script also prints the noise-resistant estimate steps-to-target x part 1's
step time. Part 3 (``--skip-sweep`` leaves it out) trains the default init and each scheme without
warmup for ``--sweep-steps`` at each LR of ``--lrs`` (the same decay), validating once at the end.

``--deep-thin`` runs the same parts on a deep, thin BERT (the model of
``configs/bert/deep_thin_mlm.yaml``): 24 blocks of hidden 64, 4 heads, FFN 256, instead of
``--preset``; the depth where warmup matters most and the schemes' depth-dependent constants
(LayerScale's 1e-5, T-Fixup's and DeepNorm's factors) differ most from 1.

The defaults fit BERT-small and the deep, thin model in about 25 minutes on 2 cores (about 0.6 s a
BERT-small step): 80 steps per run in part 2, not the main job's 200, since part 2 trains 7 runs and
part 3 18; validation every 5 steps on 2 batches, so that the step at which a run reaches the target
is known to 1/16 of the budget. ``--skip-timing`` on the deep model leaves out its step-time part
(claim 1 is BERT-small's; it adds about 3 minutes).

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/initialization.py                 # ~14 min on 2 cores
    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/initialization.py --deep-thin --skip-timing  # ~11 min
    python benchmarks/initialization.py --preset tiny --vocab-size 2000 --train-steps 6 --val-every 3 --val-batches 1 \
        --rounds 1 --steps 2 --warmup 1 --sweep-steps 3 --lrs 1e-3
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch

from benchmarks import jobs
from benchmarks.harness import LightningJob, Variant, harness_arguments, setup, write_json
from lightning_efficient import BertMLM, MLMDataModule, NonFiniteLossError, NonFiniteLossGuard, ResidualInit
from lightning_efficient.callbacks.residual_init import SCHEMES
from lightning_efficient.compare import format_table

DEFAULT, NO_WARMUP = "default", "default_no_warmup"
STEP_CLAIM, TIME_CLAIM = 1.03, 0.8
DEEP_THIN = {"hidden_size": 64, "num_layers": 24, "num_heads": 4, "ffn_size": 256}
"""The deep, thin BERT of ``--deep-thin`` (``configs/bert/deep_thin_mlm.yaml``)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness_arguments(__doc__, rounds=6, steps=4, warmup=1)
    jobs.target_arguments(jobs.mlm_arguments(parser))
    parser.set_defaults(train_steps=80, val_every=5, val_batches=2)  # fits ~25 min on 2 cores
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES, help="the schemes compared")
    parser.add_argument(
        "--deep-thin", action="store_true", help="24 blocks of hidden 64 (4 heads, FFN 256) instead of --preset"
    )
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="part 3's learning rates")
    parser.add_argument("--sweep-steps", type=int, default=20, help="part 3's steps per run")
    parser.add_argument("--skip-sweep", action="store_true", help="skip part 3")
    return parser.parse_args(argv)


def module(args: argparse.Namespace, data: MLMDataModule, warmup: bool = True, **overrides: Any) -> BertMLM:
    """The main job's ``BertMLM`` (``--deep-thin``: of that size), without its warmup when ``warmup`` is False."""
    sizes = DEEP_THIN if args.deep_thin else {}
    settings = {**jobs.MAIN_JOB, **({} if warmup else {"warmup_fraction": 0.0}), **sizes, **overrides}
    return jobs.mlm_module(data.vocab_size, args, **settings)


def model_line(args: argparse.Namespace, data: MLMDataModule) -> str:
    size = module(args, data).size
    name = "deep thin BERT" if args.deep_thin else f"BERT-{args.preset}"
    return (f"{name} MLM: {size.num_layers} blocks of hidden {size.hidden_size} ({size.num_heads} heads, FFN "
            f"{size.ffn_size}), batch {args.batch_size} x {args.max_length} tokens, vocab {data.vocab_size}, "
            f"{torch.get_num_threads()} threads")  # fmt: skip


def guarded(
    name: str,
    build: Callable[[], pl.LightningModule],
    data: MLMDataModule,
    callbacks: list[pl.Callback],
    steps: int,
    target: float | None,
    root: Path,
    args: argparse.Namespace,
) -> tuple[dict[str, Any] | None, str | None]:
    """:func:`jobs.converge` with a :class:`NonFiniteLossGuard`: ``(summary, None)``, or ``(None, why)``: diverged."""
    try:
        return jobs.converge(name, build, data, [*callbacks, NonFiniteLossGuard()], steps, target, root, args), None
    except NonFiniteLossError as error:
        reason = str(error).split(":")[0]  # "loss is nan at step 12 (epoch 0, batch 12)"
        print(f"{name}: diverged ({reason})")
        return None, reason


def final_loss(summary: dict[str, Any] | None) -> float | None:
    """The last validation loss, None when the run diverged, was not validated or ended on a non-finite loss."""
    if summary is None or not summary["history"]:
        return None
    value = summary["history"][-1]["value"]
    return value if math.isfinite(value) else None


def sweep_part(args: argparse.Namespace, data: MLMDataModule, root: Path) -> dict[str, dict[str, float | str]]:
    """Part 3: final val/loss of the default init and each scheme, without warmup, at each LR (or "diverged")."""
    print(f"\nPart 3: LR sweep, {args.sweep_steps} steps without warmup per run")
    once = argparse.Namespace(**{**vars(args), "val_every": args.sweep_steps})  # validate at the end only
    table: dict[str, dict[str, float | str]] = {name: {} for name in [NO_WARMUP, *args.schemes]}
    for lr in args.lrs:
        build = functools.partial(module, args, data, warmup=False, learning_rate=lr)
        for name, row in table.items():
            callbacks = [] if name == NO_WARMUP else [ResidualInit(scheme=name)]
            summary, _ = guarded(f"sweep_{name}_lr{lr:g}", build, data, callbacks, args.sweep_steps, None, root, once)
            loss = final_loss(summary)
            row[f"{lr:g}"] = loss if loss is not None else "diverged"
    columns = [f"{lr:g}" for lr in args.lrs]
    width = max(len(name) for name in table) + 2
    print(f"\nfinal val/loss after {args.sweep_steps} steps, no warmup")
    print("LR".ljust(width) + "".join(column.rjust(11) for column in columns))
    for name, row in table.items():
        cells = (f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns)
        print(name.ljust(width) + "".join(cell.rjust(11) for cell in cells))
    return table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = setup(parse_args(argv))
    data = jobs.mlm_data(args)
    line = model_line(args, data)
    print(line)

    variants = [Variant(DEFAULT, lambda: LightningJob(module(args, data), data))]
    variants += [
        Variant(scheme, lambda scheme=scheme: LightningJob(module(args, data), data, [ResidualInit(scheme=scheme)]))
        for scheme in args.schemes
    ]
    timing, step_times = jobs.step_time_part(variants, args)

    print(f"\nPart 2: time to target; {DEFAULT} with warmup, the others without")
    root = Path(tempfile.mkdtemp(prefix="initialization_"))

    def without_warmup() -> BertMLM:
        return module(args, data, warmup=False)

    base, target = jobs.baseline_run(DEFAULT, lambda: module(args, data), data, root, args)
    runs: dict[str, dict[str, Any] | None] = {}
    diverged: dict[str, str] = {}
    for name in [NO_WARMUP, *args.schemes]:
        callbacks = [] if name == NO_WARMUP else [ResidualInit(scheme=name)]
        runs[name], why = guarded(name, without_warmup, data, callbacks, args.train_steps, target, root, args)
        if why is not None:
            diverged[name] = why

    summaries = [base, *(summary for summary in runs.values() if summary is not None)]
    print()
    print(format_table(summaries))
    final = {name: final_loss(summary) for name, summary in [(DEFAULT, base), *runs.items()]}
    result: dict[str, Any] = {"model": line, "target": target, "final": final,
                              "diverged": diverged, "step_times": step_times, "timing": timing}  # fmt: skip
    verdicts: dict[str, bool] = {}
    if step_times:
        print()
        for scheme in args.schemes:
            ratio = timing["variants"][scheme]["ratio"]
            verdicts[f"{scheme}_step_time"] = ratio <= STEP_CLAIM
            print(f"{'PASS' if ratio <= STEP_CLAIM else 'FAIL'}: {scheme} step time {ratio:.3f}x the default init's "
                  f"(claim <= {STEP_CLAIM}x)")  # fmt: skip

    base_step, base_time = jobs.reached(base, target)
    where = f"at step {base_step}, {base_time:.0f} s training" if base_step is not None else "not at all"
    print(f"\ntarget: val/loss {target:.4f} ({DEFAULT} with warmup reaches it {where})")
    ratios: dict[str, float | None] = {}
    for name, summary in runs.items():
        if summary is None:
            ratios[name] = None
            print(f"  {name}: diverged ({diverged[name]})")
            continue
        step, seconds = jobs.reached(summary, target)
        if step is None or base_time is None:
            ratios[name] = None
            shown = f"{final[name]:.4f}" if final[name] is not None else "not finite"
            print(f"  {name}: does not reach the target in {args.train_steps} steps (final {shown})")
            continue
        ratios[name] = seconds / base_time
        estimate = ""
        if step_times and base_step:  # the control's steps are the default init's
            estimated = step * step_times.get(name, step_times[DEFAULT]) / (base_step * step_times[DEFAULT])
            result.setdefault("estimated_ratios", {})[name] = estimated
            estimate = f"; estimate from part 1's step times {estimated:.3f}x"
        control = " (control, no claim)" if name == NO_WARMUP else ""
        print(f"  {name}{control}: step {step}, {seconds:.0f} s training: {ratios[name]:.3f}x the warmed-up "
              f"default's time{estimate}")  # fmt: skip
    result["time_ratios"] = ratios
    reaching = {name: ratio for name, ratio in ratios.items() if name != NO_WARMUP and ratio is not None}
    if reaching:
        best = min(reaching, key=reaching.__getitem__)
        verdicts["best_time_to_target"] = reaching[best] <= TIME_CLAIM
        result["best"] = best
        print(f"{'PASS' if reaching[best] <= TIME_CLAIM else 'FAIL'}: the best scheme without warmup, {best}, "
              f"reaches the target in {reaching[best]:.3f}x the warmed-up default's training time "
              f"(claim <= {TIME_CLAIM}x)")  # fmt: skip
    else:
        verdicts["best_time_to_target"] = False
        result["best"] = None
        print("FAIL: no scheme without warmup reaches the target in its budget")

    if not args.skip_sweep:
        result["sweep"] = sweep_part(args, data, root)
    result.update(verdicts=verdicts, summaries=summaries)
    return write_json(args.json, result)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
