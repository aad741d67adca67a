"""Overhead of EfficiencyMonitor on the main job (BERT-small MLM, batch 32 x 128, 30522 vocab).

Claim measured: the monitor (FLOP counting, token counting, timing, logging every step) costs
<= 1% of the main job's training step on this machine.

* Counter, precisely: the FLOP counter is a TorchFunctionMode, so its cost is one Python call per
  torch function call of the step's forward. The script counts those calls in one training
  forward (``BertMLM._step``), measures the extra cost of one call under the counter on tiny
  tensors (interleaved, best of several rounds), and reports calls x cost as a share of the step.
* Counter, directly: the training forward timed with and without the counter, interleaved
  (``--forward-reps`` pairs; medians). On a noisy shared machine this difference is mostly noise.
* Hooks: the time spent inside the monitor's per-step hooks (``on_train_batch_start``,
  ``on_before_backward``, ``on_train_batch_end``: token counting, timing, logging), measured in
  the runs below; median per step. Hooks + counter = the monitor's cost, the verdict's number.
* Whole step: ``benchmarks/harness.py`` runs ``Trainer.fit`` of the main job without and with
  ``EfficiencyMonitor(peak_flops=...)`` (``log_every_n_steps=1``, the worst case), interleaved,
  and prints the ratio of median step times (step = interval between ``on_train_batch_start``).

Command (a few minutes on 2 cores; the machine is noisy: read the whole-step ratio as indicative):

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/monitor_overhead.py --rounds 4 --steps 6
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.overrides import TorchFunctionMode

from benchmarks.harness import LightningJob, Variant, harness_arguments, interleave, report, setup, write_json
from benchmarks.jobs import mlm_arguments, mlm_data, mlm_module
from lightning_efficient import BertMLM
from lightning_efficient.flops import FlopCounter
from lightning_efficient.monitor import EfficiencyMonitor


class CallCounter(TorchFunctionMode):
    """Counts torch function calls (what the FLOP counter intercepts)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


class TimedMonitor(EfficiencyMonitor):
    """EfficiencyMonitor that adds up the time spent in its per-step hooks."""

    def __init__(self, hook_seconds: list[float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hook_seconds = hook_seconds  # per training batch, shared: the monitor itself is not kept

    def on_train_batch_start(self, *args: Any) -> None:
        start = time.perf_counter()
        super().on_train_batch_start(*args)
        self.hook_seconds.append(time.perf_counter() - start)

    def on_before_backward(self, *args: Any) -> None:
        start = time.perf_counter()
        super().on_before_backward(*args)
        self.hook_seconds[-1] += time.perf_counter() - start

    def on_train_batch_end(self, *args: Any) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(*args)
        self.hook_seconds[-1] += time.perf_counter() - start


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
    """Measure, print the table and the verdict; returns the numbers."""
    parser = mlm_arguments(harness_arguments(__doc__, rounds=4, steps=6, warmup=2))
    parser.add_argument("--forward-reps", type=int, default=5, help="interleaved forward pairs")
    parser.add_argument("--target", type=float, default=0.01, help="pass if the overhead <= target")
    args = setup(parser.parse_args(argv))
    torch.manual_seed(args.seed)
    datamodule = mlm_data(args)

    def module() -> BertMLM:
        return mlm_module(datamodule.vocab_size, args)

    model = module().train()
    batch = next(iter(datamodule.train_dataloader()))
    with CallCounter() as calls:
        model._step(batch, torch.Generator().manual_seed(0))
    per_call = per_call_overhead()
    plain, counted = forward_times(model, batch, args.forward_reps)
    del model
    shape = f"batch {args.batch_size} x {args.max_length}, vocab {datamodule.vocab_size}"
    print(f"main job: BERT-{args.preset} MLM, {shape}")
    print(f"torch function calls per training forward: {calls.calls}; extra cost per call under the counter: "
          f"{per_call * 1e6:.2f} us -> {calls.calls * per_call * 1e3:.2f} ms per step")  # fmt: skip
    print(f"training forward, median of {args.forward_reps}: {statistics.median(plain):.4f} s plain, "
          f"{statistics.median(counted):.4f} s counted")  # fmt: skip

    hook_seconds: list[list[float]] = []  # per monitored run
    summaries = tempfile.TemporaryDirectory()  # the monitor's efficiency.json files

    def job(with_monitor: bool) -> LightningJob:
        if with_monitor:
            hook_seconds.append([])
        callbacks = [TimedMonitor(hook_seconds[-1], peak_flops=2e11)] if with_monitor else []
        kwargs = {"accelerator": "cpu", "log_every_n_steps": 1, "default_root_dir": summaries.name}
        return LightningJob(module(), datamodule, callbacks, kwargs)

    variants = [Variant("baseline", lambda: job(False)), Variant("monitor", lambda: job(True))]
    times = interleave(variants, args.rounds, args.steps, args.warmup)
    tokens = args.batch_size * args.max_length
    result = report(times, baseline="baseline", metric="step time", work_per_step=tokens, unit="tokens")
    step = min(statistics.median(t) for per_round in times.values() for t in per_round)  # conservative: fastest
    hooks = statistics.median(t for run in hook_seconds for t in run[args.warmup :])
    counter = calls.calls * per_call
    share = (hooks + counter) / step
    whole_share = result["variants"]["monitor"]["ratio"] - 1
    print(f"\nmonitor cost per step: hooks {hooks * 1e3:.2f} ms (median, logging every step) + counter "
          f"{counter * 1e3:.2f} ms (calls x per-call cost) = {share:.3%} of the {step:.3f} s step "
          "(fastest run's median)")  # fmt: skip
    print(f"whole monitor, interleaved fit step-time ratio - 1 (indicative, noisy): {whole_share:+.2%}")
    passed = share <= args.target
    print(f"{'PASS' if passed else 'FAIL'}: monitor overhead {share:.3%} of the step (target <= {args.target:.0%})")
    numbers = {
        "claim": "EfficiencyMonitor overhead on the main job",
        "calls_per_forward": calls.calls,
        "per_call_overhead_s": per_call,
        "hook_s_per_step": hooks,
        "counter_s_per_step": counter,
        "overhead_share": share,
        "forward_plain_s": statistics.median(plain),
        "forward_counted_s": statistics.median(counted),
        "whole_step": result,
        "passed": passed,
    }
    return write_json(args.json, numbers)


if __name__ == "__main__":
    main()
