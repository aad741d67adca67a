"""Benchmark harness: a baseline and the same job with a technique, interleaved in one process.

Runs a baseline config and the same config with a technique, interleaved in one process to resist
the machine's noise, repeated, and prints the ratios with their spread. Each technique issue adds
its benchmark here: a script in ``benchmarks/`` that builds two (or more) :class:`Variant` s, calls
:func:`interleave` and :func:`report`, and prints a verdict against its claim (the jobs the scripts
share, e.g. the main MLM job, come from :mod:`benchmarks.jobs`)::

    from benchmarks.harness import LightningJob, Variant, harness_arguments, interleave, report, setup, write_json

    parser = harness_arguments(__doc__, rounds=4, steps=10, warmup=3)
    args = setup(parser.parse_args())
    variants = [
        Variant("baseline", lambda: LightningJob(BertMLM(vocab_size=v), datamodule)),
        Variant("layer drop", lambda: LightningJob(BertMLM(vocab_size=v), datamodule, [LayerDrop(0.5)])),
    ]
    times = interleave(variants, args.rounds, args.steps, args.warmup)
    result = report(times, baseline="baseline", metric="throughput", work_per_step=tokens, unit="tokens")
    write_json(args.json, result)

What a step is. For a Lightning variant (``build()`` returns a :class:`LightningJob`), a fresh
``Trainer`` (:func:`benchmark_trainer`) runs ``Trainer.fit`` for ``warmup + steps + 1`` batches and
:class:`StepTimer` records ``time.perf_counter()`` at every ``on_train_batch_start``: step i lasts
from the start of batch i to the start of batch i+1, so it includes every hook, logging, the
optimizer step and fetching the next batch (the one extra batch closes the last timed interval and
is not timed). For a plain variant (``build()`` returns a ``step()`` callable, e.g. a hand-written
PyTorch loop), each call is one step, timed around the call. On CUDA the device is synchronized
before each time stamp.

How runs are ordered. Each round runs every variant once, each with a fresh build; the order
rotates by one every round (A B, B A, A B, ... for two variants), so no variant always goes first;
garbage is collected before every run, and ``torch.manual_seed(variant.seed)`` is set before the
build and again before training, so every variant starts from the same weights and data order.

How ratios are computed. Per round, ratio = median step time of the variant / that of the
baseline (``metric="step time"``, < 1 is faster) or its inverse (``metric="throughput"``, > 1 is
faster); the reported ratio is the median over rounds, with the min-max and the inter-quartile
range of the per-round ratios as its spread. Rounds share the machine's state of the moment, so
per-round ratios cancel slow drifts that pooled medians would not.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_efficient.errors import ConfigurationError
from lightning_efficient.testing import QUIET_TRAINER, quiet_trainer

__all__ = [
    "METRICS",
    "TRAINER_DEFAULTS",
    "Job",
    "LightningJob",
    "StepTimer",
    "Variant",
    "benchmark_trainer",
    "harness_arguments",
    "interleave",
    "report",
    "run_variant",
    "setup",
    "write_json",
]

METRICS = ("step time", "throughput")
"""What a ratio expresses: variant / baseline step time, or variant / baseline throughput."""

TRAINER_DEFAULTS: dict[str, Any] = {**QUIET_TRAINER, "devices": 1, "limit_val_batches": 0, "num_sanity_val_steps": 0}
"""Trainer arguments of every Lightning run: quiet, one device, no validation (``trainer_kwargs`` override them)."""


def benchmark_trainer(**overrides: Any) -> pl.Trainer:
    """A :func:`~lightning_efficient.testing.quiet_trainer` with :data:`TRAINER_DEFAULTS`; ``overrides`` win."""
    return quiet_trainer(**{**TRAINER_DEFAULTS, **overrides})


@dataclass
class LightningJob:
    """What a Lightning variant's ``build()`` returns: the module and data trained by ``Trainer.fit``.

    Attributes:
        module: A fresh LightningModule.
        data: A LightningDataModule or a training DataLoader.
        callbacks: The technique's callbacks (the harness adds its :class:`StepTimer`).
        trainer_kwargs: Extra ``Trainer`` arguments, e.g. ``{"accelerator": "cpu"}``, ``{"precision": "bf16-mixed"}``.
    """

    module: pl.LightningModule
    data: pl.LightningDataModule | DataLoader
    callbacks: list[pl.Callback] = field(default_factory=list)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


Job = LightningJob | Callable[[], object]
"""A built variant: a :class:`LightningJob`, or a ``step()`` callable doing one training step per call."""


@dataclass(frozen=True)
class Variant:
    """One side of a comparison.

    Attributes:
        name: Column label in the report (unique among the compared variants).
        build: Called once per round, under ``torch.manual_seed(seed)``; returns a fresh :data:`Job`.
        seed: Seed set before ``build()`` and again before training.
    """

    name: str
    build: Callable[[], Job]
    seed: int = 0


def _synchronize() -> None:
    """Wait for queued CUDA work, so a time stamp marks finished work (no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepTimer(pl.Callback):
    """Per-step wall time of ``Trainer.fit``: intervals between consecutive ``on_train_batch_start`` calls.

    Args:
        warmup: Leading intervals to drop (compilation, allocator warmup, first-batch costs).

    Attributes:
        starts: ``time.perf_counter()`` at every batch start (after a CUDA synchronize).
    """

    def __init__(self, warmup: int = 0) -> None:
        if warmup < 0:
            raise ConfigurationError(f"warmup={warmup} must be >= 0")
        self.warmup = warmup
        self.starts: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        _synchronize()
        self.starts.append(time.perf_counter())

    @property
    def times(self) -> list[float]:
        """Seconds of each timed step (the intervals after the first ``warmup``)."""
        return [end - start for start, end in zip(self.starts, self.starts[1:])][self.warmup :]


def _fit(job: LightningJob, steps: int, warmup: int) -> list[float]:
    timer = StepTimer(warmup)
    kwargs = {"max_steps": warmup + steps + 1, **job.trainer_kwargs}
    trainer = benchmark_trainer(**kwargs, callbacks=[*job.callbacks, timer])
    if isinstance(job.data, pl.LightningDataModule):
        trainer.fit(job.module, datamodule=job.data)
    else:
        trainer.fit(job.module, train_dataloaders=job.data)
    return timer.times


def _loop(step: Callable[[], object], steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _synchronize()
        start = time.perf_counter()
        step()
        _synchronize()
        times.append(time.perf_counter() - start)
    return times


def run_variant(variant: Variant, steps: int, warmup: int) -> list[float]:
    """Build ``variant`` afresh and time ``steps`` training steps after ``warmup`` untimed ones.

    Returns:
        The ``steps`` step times in seconds.
    """
    torch.manual_seed(variant.seed)
    job = variant.build()
    torch.manual_seed(variant.seed)  # same data order and dropout whatever the build consumed
    times = _fit(job, steps, warmup) if isinstance(job, LightningJob) else _loop(job, steps, warmup)
    if len(times) != steps:
        raise RuntimeError(f"variant {variant.name!r} ran {len(times)} timed steps instead of {steps}")
    return times


def interleave(
    variants: Sequence[Variant], rounds: int, steps: int, warmup: int, verbose: bool = True
) -> dict[str, list[list[float]]]:
    """Run every variant once per round, in an order rotating by one each round, all in this process.

    Args:
        variants: The variants to compare (unique names).
        rounds: Repetitions; with two variants an even number lets each go first equally often.
        steps: Timed steps per run.
        warmup: Untimed steps at the start of every run.
        verbose: Print one line per round (median step of each variant, ratio to the first).

    Returns:
        ``times[name][round]``: the step times (seconds) of that variant in that round.
    """
    names = [variant.name for variant in variants]
    if not variants or len(set(names)) != len(names):
        raise ConfigurationError(f"variants need unique names, got {names}")
    for name, value, low in (("rounds", rounds, 1), ("steps", steps, 1), ("warmup", warmup, 0)):
        if value < low:
            raise ConfigurationError(f"{name}={value} must be >= {low}")
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for variant in [*variants[shift:], *variants[:shift]]:
            gc.collect()  # the previous run's cycles must not be collected while timing this one
            times[variant.name].append(run_variant(variant, steps, warmup))
        if verbose:
            medians = {name: statistics.median(times[name][-1]) for name in names}
            parts = [f"{name} {median:.4f} s" for name, median in medians.items()]
            ratios = [f"{medians[name] / medians[names[0]]:.3f}" for name in names[1:]]
            line = f"round {round_index + 1}/{rounds}: median step " + ", ".join(parts)
            print(line + (f"; step-time ratio to {names[0]}: " + ", ".join(ratios) if ratios else ""))
    return times


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def report(
    times: dict[str, list[list[float]]],
    baseline: str,
    metric: str = "step time",
    work_per_step: float | None = None,
    unit: str = "tokens",
) -> dict[str, Any]:
    """Print the comparison table and return its numbers.

    Args:
        times: ``times[name][round]`` step times, as returned by :func:`interleave` (equal round counts).
        baseline: The variant the ratios are relative to.
        metric: ``"step time"`` (ratio = variant / baseline step time, < 1 is faster) or
            ``"throughput"`` (ratio = baseline / variant step time, > 1 is faster).
        work_per_step: Units of work per step (e.g. tokens per batch); adds a ``<unit>/s`` column.
        unit: Name of the unit of ``work_per_step``.

    Returns:
        ``{"baseline", "metric", "variants": {name: {"median_step_s", "ratio", "ratio_min", "ratio_max",
        "ratio_q1", "ratio_q3", "round_ratios", "rounds", "steps"[, "per_s"]}}}``. The ratio is the
        median of the per-round ratios (each: one round's median step times).
    """
    if metric not in METRICS:
        raise ConfigurationError(f"metric={metric!r} is unknown; choose one of: {', '.join(METRICS)}")
    if baseline not in times:
        raise ConfigurationError(f"baseline={baseline!r} is not a variant; choose one of: {', '.join(times)}")
    rounds = len(times[baseline])
    if rounds == 0 or any(len(per_round) != rounds for per_round in times.values()):
        counts = {name: len(per_round) for name, per_round in times.items()}
        raise ConfigurationError(f"every variant needs the same number (>= 1) of rounds, got {counts}")
    base_medians = [statistics.median(steps) for steps in times[baseline]]
    variants: dict[str, dict[str, Any]] = {}
    for name, per_round in times.items():
        medians = [statistics.median(steps) for steps in per_round]
        if metric == "step time":
            ratios = [m / b for m, b in zip(medians, base_medians)]
        else:
            ratios = [b / m for m, b in zip(medians, base_medians)]
        pooled = [t for steps in per_round for t in steps]
        q1, q3 = _quartiles(ratios)
        numbers: dict[str, Any] = {
            "median_step_s": statistics.median(pooled),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "ratio_q1": q1,
            "ratio_q3": q3,
            "round_ratios": ratios,
            "rounds": rounds,
            "steps": len(pooled),
        }
        if work_per_step is not None:
            numbers["per_s"] = work_per_step / numbers["median_step_s"]
        variants[name] = numbers
    unit_or_none = unit if work_per_step is not None else None
    _print_table(variants, baseline, metric, unit_or_none)
    return {"baseline": baseline, "metric": metric, "unit": unit_or_none, "variants": variants}


def _print_table(variants: dict[str, dict[str, Any]], baseline: str, metric: str, unit: str | None) -> None:
    per_s = [f"{unit}/s"] if unit else []
    header = ["variant", "median step (s)", *per_s, f"ratio ({metric})", "min-max", "IQR", "steps"]
    lines = [header]
    for name, n in sorted(variants.items(), key=lambda item: item[0] != baseline):  # baseline first
        label = f"{name} (baseline)" if name == baseline else name
        line = [label, f"{n['median_step_s']:.4f}", *([f"{n['per_s']:,.1f}"] if unit else [])]
        line += [f"{n['ratio']:.3f}", f"{n['ratio_min']:.3f}-{n['ratio_max']:.3f}"]
        line += [f"{n['ratio_q1']:.3f}-{n['ratio_q3']:.3f}"]
        lines.append([*line, str(n["steps"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print()
    for line in lines:
        print(line[0].ljust(widths[0]) + "".join(cell.rjust(width + 3) for cell, width in zip(line[1:], widths[1:])))
    better = "< 1: faster than" if metric == "step time" else "> 1: faster than"
    rounds = next(iter(variants.values()))["rounds"]
    print(f"ratio: median over {rounds} rounds of the per-round ratio of median step times ({better} the baseline); "
          "min-max and IQR: spread of the per-round ratios")  # fmt: skip


# -- command line ----------------------------------------------------------------------------------
def harness_arguments(description: str, rounds: int = 4, steps: int = 10, warmup: int = 3) -> argparse.ArgumentParser:
    """A parser with the harness options; a script adds its own and calls ``parse_args``.

    Options: ``--rounds``, ``--steps``, ``--warmup``, ``--threads`` (torch intra-op threads; default:
    torch's choice), ``--json OUT`` (write the numbers there). The ``--help`` text is the first
    paragraph of ``description`` (a script passes its ``__doc__``).
    """
    parser = argparse.ArgumentParser(
        description=description.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    group = parser.add_argument_group("harness")
    group.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds (the order rotates each round)")
    group.add_argument("--steps", type=int, default=steps, help="timed steps per run")
    group.add_argument("--warmup", type=int, default=warmup, help="untimed steps at the start of every run")
    group.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    group.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the numbers to this file")
    return parser


def setup(args: argparse.Namespace) -> argparse.Namespace:
    """Apply ``--threads`` and silence Lightning's per-``fit`` banner and hints that are not errors here.

    Returns:
        ``args``, so a script starts with ``args = setup(parse_args(argv))``.
    """
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    return args


def write_json(path: Path | None, data: dict[str, Any]) -> dict[str, Any]:
    """Write ``data`` as indented JSON to ``path`` (nothing when ``path`` is None).

    Returns:
        ``data``, so a script's ``main`` ends with ``return write_json(args.json, result)``.
    """
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"numbers written to {path}")
    return data


def run_parts(
    parts: dict[str, tuple[str, Callable[[Any], dict[str, Any]]]], names: list[str], context: Any
) -> dict[str, Any]:
    """Run a script's parts ``names`` in order, each ``parts[name] = (number, function(context) -> result)``.

    Returns:
        ``{"parts": names, "seconds": {name: duration}, name: result, ...}``; each part's time is printed.
    """
    result: dict[str, Any] = {"parts": names, "seconds": {}}
    for name in names:
        start = time.perf_counter()
        result[name] = parts[name][1](context)
        result["seconds"][name] = time.perf_counter() - start
        print(f"part {parts[name][0]} ({name}) took {result['seconds'][name]:.0f} s")
    return result
