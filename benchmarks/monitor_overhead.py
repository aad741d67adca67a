"""Overhead of EfficiencyMonitor on the main job (BERT-small MLM, batch 32 x 128, 30522 vocab).

Claim measured: the monitor (FLOP counting, token counting, timing, logging every step) costs
<= 1% of the main job's training step on this machine.

What the monitor does every training step: its ``on_train_batch_start`` reads a clock and enters
its FLOP counter (a ``TorchFunctionMode``: one Python call per torch function call of the forward),
``on_before_backward`` leaves it, ``on_train_batch_end`` counts the batch's samples and tokens and
adds up the step; on a logging step (``log_every_n_steps``) it also sums its window and logs five
``efficiency/`` metrics, which the logger then writes. Every step counts FLOPs; only logging steps
log. The verdict's measure keeps both kinds of step in their real proportion.

* Direct measure (the verdict): ONE ``Trainer.fit`` of the main job, with a TensorBoard logger as
  the main job has (``--logger none``: without), in which the monitor's per-step hooks run on some
  steps only. The steps after ``--warmup`` form ``--rounds`` rounds of four segments of
  ``--steps`` consecutive steps each, monitor on/off as A B B A (even rounds) or B A A B (odd
  rounds), so both arms see the same machine state seconds apart and a linear drift within a round
  cancels. A step is the interval between consecutive ``on_train_batch_start`` (stamped before the
  monitor's own hook): hooks, forward, backward, optimizer step, Lightning's and the logger's work
  with the monitor's metrics, and the next batch's loading all count. Per round, ratio = time of
  the monitor's steps / time of the others (sums: every kind of step weighs what it weighs); the
  ratio is the median over rounds, with a 95% bootstrap interval over rounds (resampled with
  replacement). ``--log-every N`` (default 1: the claim's worst case; the main job logs every 10)
  needs ``--steps`` to be a multiple of N, so that each segment holds the same share of logging
  steps. Noise kept out: the garbage collector's existing objects are frozen before the fit (a full
  collection over the corpus's objects would land on one random step), the first ``--warmup`` steps
  are dropped, and when the monitor goes off its stale metrics are dropped from Lightning's results
  (else the monitor-off steps would process and log them). Not in the measure: Lightning calling
  the monitor's other (empty) hooks, a few microseconds per step, and the per-fit work (summary).
  Beside it, the same ratio in the process's CPU time (all its threads), which hardly counts the
  time other processes hold the cores: the steadier figure on a shared machine, not the verdict's.
* Estimate (second line): the time inside the monitor's hooks on its steps (median) + the counter's
  calls per forward x the extra cost of one call under it (tiny ops, best of several rounds), as a
  share of the monitor-off steps' median.
* Counter alone, directly: the training forward timed with and without the counter, interleaved
  (``--forward-reps`` pairs; medians; mostly noise on a shared machine).

Command (about 8 minutes on 2 cores, 400 timed steps; run it on an otherwise idle machine):

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/monitor_overhead.py --rounds 100 --steps 1
"""

from __future__ import annotations

import gc
import itertools
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.overrides import TorchFunctionMode

from benchmarks.harness import benchmark_trainer, harness_arguments, setup, write_json
from benchmarks.jobs import MAIN_JOB, mlm_arguments, mlm_data, mlm_job_line, mlm_module
from lightning_efficient import BertMLM
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.flops import FlopCounter
from lightning_efficient.monitor import EfficiencyMonitor

__all__ = [
    "AlternatingMonitor",
    "CallCounter",
    "StepClock",
    "bootstrap_interval",
    "direct_measure",
    "forward_times",
    "main",
    "monitor_on",
    "per_call_overhead",
    "round_ratios",
]

METRIC_PREFIX = "efficiency/"  # the monitor's logged metrics


class CallCounter(TorchFunctionMode):
    """Counts torch function calls (what the FLOP counter intercepts)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def monitor_on(batch: int, warmup: int, segment: int) -> bool:
    """Whether the monitor runs on training batch ``batch`` (0-based, counted over the fit).

    Warmup batches alternate; then rounds of four ``segment``-long segments go on, off, off, on
    (even rounds) or off, on, on, off (odd rounds).

    Examples:
        >>> [monitor_on(b, warmup=2, segment=1) for b in range(10)]
        [True, False, True, False, False, True, False, True, True, False]
        >>> [monitor_on(b, warmup=0, segment=2) for b in range(8)]
        [True, True, False, False, False, False, True, True]
    """
    if batch < warmup:
        return batch % 2 == 0
    step = batch - warmup
    round_index, position = divmod(step // segment, 4)
    return (position in (0, 3)) == (round_index % 2 == 0)


def round_ratios(times: list[float], warmup: int, segment: int, rounds: int) -> list[float]:
    """Per round: the summed times of the monitor's steps / those of the others (``times[b]``: batch b's step).

    Examples:
        >>> round_ratios([9.0, 1.1, 1.0, 1.0, 1.1, 2.0, 2.2, 2.2, 2.0], warmup=1, segment=1, rounds=2)
        [1.1, 1.1]
    """
    ratios = []
    for round_index in range(rounds):
        start = warmup + 4 * segment * round_index
        batches = range(start, start + 4 * segment)
        on = sum(times[b] for b in batches if monitor_on(b, warmup, segment))
        off = sum(times[b] for b in batches if not monitor_on(b, warmup, segment))
        ratios.append(on / off)
    return ratios


def bootstrap_interval(
    values: list[float], statistic: Callable[[list[float]], float] = statistics.median, resamples: int = 2000
) -> tuple[float, float]:
    """95% percentile bootstrap interval of ``statistic`` over ``values`` (resampled with replacement, seeded).

    Examples:
        >>> bootstrap_interval([1.0, 1.0, 1.0])
        (1.0, 1.0)
        >>> low, high = bootstrap_interval([0.99, 1.0, 1.01, 1.02, 1.0, 0.98])
        >>> 0.98 <= low <= 1.0 <= high <= 1.02
        True
    """
    generator = random.Random(0)
    estimates = sorted(statistic(generator.choices(values, k=len(values))) for _ in range(resamples))
    return estimates[int(0.025 * resamples)], estimates[int(0.975 * resamples) - 1]


def direct_measure(times: list[float], warmup: int, segment: int, rounds: int) -> dict[str, Any]:
    """The monitor-on / monitor-off ratio of ``times`` (``times[b]``: batch b's step): median over rounds, interval.

    Returns:
        ``{"ratio", "low", "high"`` (95% bootstrap interval), ``"q1", "q3", "round_ratios"``,
        ``"mean_ratio"`` (all on-steps' time / all off-steps'), ``"on_s", "off_s"`` (median steps)``}``.
    """
    ratios = round_ratios(times, warmup, segment, rounds)
    ratio = statistics.median(ratios)
    low, high = bootstrap_interval(ratios)
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratio,) * 3
    timed = range(warmup, warmup + 4 * segment * rounds)
    on = [times[b] for b in timed if monitor_on(b, warmup, segment)]
    off = [times[b] for b in timed if not monitor_on(b, warmup, segment)]
    return {
        "ratio": ratio,
        "low": low,
        "high": high,
        "q1": q1,
        "q3": q3,
        "round_ratios": ratios,
        "mean_ratio": sum(on) / sum(off),
        "on_s": statistics.median(on),
        "off_s": statistics.median(off),
    }


class StepClock(pl.Callback):
    """Wall-clock and process CPU time at every ``on_train_batch_start``; a step lasts until the next.

    The process's CPU time (all its threads) hardly counts the time other processes hold the
    cores, which the wall clock does: on a shared machine it is the steadier of the two.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    @staticmethod
    def steps(stamps: list[float]) -> list[float]:
        """The intervals between consecutive stamps."""
        return [end - start for start, end in itertools.pairwise(stamps)]


class AlternatingMonitor(EfficiencyMonitor):
    """EfficiencyMonitor whose per-step hooks run only on the batches ``active(batch)`` picks; times them.

    ``batch`` counts the fit's training batches from 0. On the others its per-step hooks return at
    once, and on the first of them the metrics it logged are dropped from Lightning's results, so
    that those steps do the work of a run without the monitor.

    Attributes:
        hook_seconds: Seconds spent in the three per-step hooks, per active batch.
    """

    def __init__(self, active: Callable[[int], bool], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.active = active
        self.hook_seconds: dict[int, float] = {}
        self._batch = -1
        self._on = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        start = time.perf_counter()
        self._batch += 1
        was_on, self._on = self._on, self.active(self._batch)
        if not self._on:
            if was_on:
                self._forget_metrics(trainer)
            return
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.hook_seconds[self._batch] = time.perf_counter() - start

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._on:
            start = time.perf_counter()
            super().on_before_backward(trainer, pl_module, loss)
            self.hook_seconds[self._batch] += time.perf_counter() - start

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._on:
            start = time.perf_counter()
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self.hook_seconds[self._batch] += time.perf_counter() - start

    @staticmethod
    def _forget_metrics(trainer: pl.Trainer) -> None:
        """Lightning keeps a step's logged values until they are logged again: drop the monitor's."""
        for result in trainer._results.values():
            if result.meta.name.startswith(METRIC_PREFIX):
                result.reset()


def per_call_overhead(rounds: int = 5, reps: int = 3000) -> float:
    """Extra seconds per torch function call under FlopCounter (tiny ops; best round of each)."""
    x, layer = torch.randn(4, 4), torch.nn.Linear(4, 4)

    def ops() -> None:
        for _ in range(reps):
            x.view(16)
            layer(x)  # a counted call (F.linear) and its Tensor.shape reads

    plain, counted = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        ops()
        plain.append(time.perf_counter() - start)
        with CallCounter() as calls:
            ops()
        start = time.perf_counter()
        with FlopCounter():
            ops()
        counted.append(time.perf_counter() - start)
    return (min(counted) - min(plain)) / calls.calls


def forward_times(model: BertMLM, batch: dict[str, torch.Tensor], reps: int) -> tuple[list[float], list[float]]:
    """Training forward (``_step``) times without and with the counter, interleaved."""
    plain, counted = [], []
    for _ in range(reps):
        start = time.perf_counter()
        model._step(batch, torch.Generator().manual_seed(0))
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        with FlopCounter():
            model._step(batch, torch.Generator().manual_seed(0))
        counted.append(time.perf_counter() - start)
    return plain, counted


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, print the figures and the verdict; returns the numbers."""
    parser = mlm_arguments(harness_arguments(__doc__, rounds=100, steps=1, warmup=10))
    parser.add_argument("--log-every", type=int, default=1, help="log_every_n_steps (the main job's: 10)")
    parser.add_argument("--logger", choices=("tensorboard", "none"), default="tensorboard", help="the fit's logger")
    parser.add_argument("--forward-reps", type=int, default=5, help="interleaved forward pairs")
    parser.add_argument("--target", type=float, default=0.01, help="pass if the overhead <= target")
    args = setup(parser.parse_args(argv))
    if args.rounds < 1 or args.warmup < 0 or args.log_every < 1 or args.steps < 1 or args.steps % args.log_every:
        raise ConfigurationError(
            f"need --rounds >= 1, --warmup >= 0 and --steps a multiple of --log-every >= 1; got --rounds "
            f"{args.rounds} --warmup {args.warmup} --steps {args.steps} --log-every {args.log_every}"
        )
    torch.manual_seed(args.seed)
    datamodule = mlm_data(args)

    def module() -> BertMLM:
        return mlm_module(datamodule.vocab_size, args, **MAIN_JOB)

    model = module().train()
    batch = next(iter(datamodule.train_dataloader()))
    with CallCounter() as calls:
        model._step(batch, torch.Generator().manual_seed(0))
    per_call = per_call_overhead()
    plain, counted = forward_times(model, batch, args.forward_reps)
    del model
    print(f"main job: {mlm_job_line(args, datamodule.vocab_size)}")
    print(f"torch function calls per training forward: {calls.calls}; extra cost per call under the counter: "
          f"{per_call * 1e6:.2f} us -> {calls.calls * per_call * 1e3:.2f} ms per step")  # fmt: skip
    print(f"training forward, median of {args.forward_reps}: {statistics.median(plain):.4f} s plain, "
          f"{statistics.median(counted):.4f} s counted")  # fmt: skip

    # The direct measure: one fit, the monitor on and off in A B B A rounds.
    segment, batches = args.steps, args.warmup + 4 * args.steps * args.rounds
    clock = StepClock()
    monitor = AlternatingMonitor(lambda b: monitor_on(b, args.warmup, segment), peak_flops=2e11)
    print(f"one fit of {batches + 1} batches: {args.warmup} warmup, then {args.rounds} rounds of 4 segments x "
          f"{segment} steps (monitor on/off: A B B A, B A A B, ...), log_every_n_steps {args.log_every}, "
          f"logger {args.logger}")  # fmt: skip
    with tempfile.TemporaryDirectory() as directory:
        logger = TensorBoardLogger(directory, name="monitor_overhead") if args.logger == "tensorboard" else False
        trainer = benchmark_trainer(
            accelerator="cpu", max_steps=batches + 1, log_every_n_steps=args.log_every, logger=logger,
            default_root_dir=directory, callbacks=[clock, monitor],  # the clock's stamp comes before the monitor
        )  # fmt: skip
        torch.manual_seed(args.seed)
        gc.collect()
        gc.freeze()  # the objects alive now (corpus, model) are never scanned again by a collection
        try:
            trainer.fit(module(), datamodule=datamodule)
        finally:
            gc.unfreeze()
    wall, cpu = clock.steps(clock.wall), clock.steps(clock.cpu)  # [b]: training batch b's step
    if len(wall) != batches:
        raise RuntimeError(f"the fit timed {len(wall)} steps instead of {batches}")
    measures = {name: direct_measure(times, args.warmup, segment, args.rounds) for name, times in
                (("wall", wall), ("cpu", cpu))}  # fmt: skip
    for name, label in (("wall", "wall-clock"), ("cpu", "process CPU time")):
        m = measures[name]
        print(f"{label}: median step monitor on {m['on_s']:.4f} s, off {m['off_s']:.4f} s ({2 * segment * args.rounds} "
              f"steps each); per-round ratios: IQR {m['q1']:.4f}-{m['q3']:.4f}, min-max {min(m['round_ratios']):.4f}-"
              f"{max(m['round_ratios']):.4f}; all on-steps' / all off-steps' {m['mean_ratio']:.4f}")  # fmt: skip

    measure = measures["wall"]
    ratio, low, high, step = measure["ratio"], measure["low"], measure["high"], measure["off_s"]
    hooks = statistics.median(seconds for b, seconds in monitor.hook_seconds.items() if b >= args.warmup)
    counter = calls.calls * per_call
    share = (hooks + counter) / step
    cpu = measures["cpu"]
    print(f"\ndirect: monitor-on / monitor-off step time, median of {args.rounds} per-round ratios: {ratio:.4f} "
          f"({ratio - 1:+.2%}; 95% bootstrap interval {low - 1:+.2%} to {high - 1:+.2%}); in process CPU time "
          f"{cpu['ratio'] - 1:+.2%} ({cpu['low'] - 1:+.2%} to {cpu['high'] - 1:+.2%})")  # fmt: skip
    print(f"estimate: hooks {hooks * 1e3:.2f} ms (median) + counter {counter * 1e3:.2f} ms (calls x per-call cost) "
          f"= {share:.3%} of the {step:.3f} s monitor-off step")  # fmt: skip
    passed = high - 1 <= args.target
    if passed:
        verdict = "PASS"
    elif low - 1 > args.target:
        verdict = "FAIL"
    else:
        verdict = "UNDECIDED (the interval straddles the target: more rounds or a quieter machine)"
    print(f"{verdict}: monitor overhead {ratio - 1:+.2%} of the step, 95% interval up to {high - 1:+.2%} "
          f"(target <= {args.target:.0%})")  # fmt: skip
    numbers = {
        "claim": "EfficiencyMonitor overhead on the main job",
        "target": args.target,
        "log_every_n_steps": args.log_every,
        "logger": args.logger,
        "ratio": ratio,
        "ratio_low": low,
        "ratio_high": high,
        "wall": measure,
        "cpu": cpu,
        "calls_per_forward": calls.calls,
        "per_call_overhead_s": per_call,
        "hook_s_per_step": hooks,
        "counter_s_per_step": counter,
        "estimate_share": share,
        "forward_plain_s": statistics.median(plain),
        "forward_counted_s": statistics.median(counted),
        "verdict": verdict.split(" ")[0],
        "passed": passed,
    }
    return write_json(args.json, numbers)


if __name__ == "__main__":
    main()
