"""EfficiencyMonitor: throughput, model FLOPs, MFU, peak memory and time-to-target of a training run.

Every training step the monitor counts the batch's samples and tokens, the model FLOPs of what
actually ran (:class:`~lightning_efficient.flops.FlopCounter` over the step's forward) and the
step's wall time. It logs rolling figures under ``efficiency/``, records when the monitored
validation metric first reaches a target, and at the end of ``fit`` logs a summary table and writes
it as JSON (the schema of :mod:`lightning_efficient.summary`, read by ``lightning-efficient compare``).

With several processes each process counts its own share (its batches, its device); the
summary is rank zero's, with ``world_size`` recorded: global throughput is about
``tokens_per_s x world_size``, and MFU is per device.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_efficient.errors import ConfigurationError
from lightning_efficient.flops import FlopCounter, _synchronize, device_name, measure_peak_flops
from lightning_efficient.summary import SCHEMA_VERSION, SUMMARY_FILE, RunSummary, format_summary, write_summary

__all__ = ["EfficiencyMonitor", "batch_counts", "measure_peak_flops", "process_memory"]

MODES = ("min", "max")
SUMMARY_VERSION = SCHEMA_VERSION  # the name before summary.py held the schema


def batch_counts(batch: Any) -> tuple[int, int | torch.Tensor]:
    """``(samples, tokens)`` of a batch, guessed from its structure.

    A mapping with ``attention_mask`` gives (rows, real tokens); with ``input_ids`` (rows,
    numel); otherwise, and for a tensor, tuple or list, the first tensor gives the samples (its
    first dimension) and, when it is a 2-D integer tensor, the tokens (its numel); else one token
    per sample. A token count read from a tensor on an accelerator stays a 0-d tensor, so
    counting never waits for the device.

    Examples:
        >>> ids = torch.ones(2, 5, dtype=torch.long)
        >>> mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
        >>> samples, tokens = batch_counts({"input_ids": ids, "attention_mask": mask})
        >>> samples, int(tokens)
        (2, 8)
        >>> batch_counts((torch.zeros(4, 1, 28, 28), torch.zeros(4)))
        (4, 4)
    """
    if isinstance(batch, Mapping):
        if isinstance(batch.get("attention_mask"), torch.Tensor):
            mask = batch["attention_mask"]
            return mask.shape[0], _count(mask.sum())
        if isinstance(batch.get("input_ids"), torch.Tensor):
            return batch["input_ids"].shape[0], batch["input_ids"].numel()
        items: Sequence[Any] = list(batch.values())
    elif isinstance(batch, torch.Tensor):
        items = [batch]
    elif isinstance(batch, (list, tuple)):
        items = batch
    else:
        return 0, 0
    first = next((t for t in items if isinstance(t, torch.Tensor)), None)
    if first is None:
        return 0, 0
    samples = first.shape[0] if first.dim() else 1
    integer = not (first.is_floating_point() or first.is_complex() or first.dtype == torch.bool)
    return samples, first.numel() if first.dim() == 2 and integer else samples


def _count(value: torch.Tensor) -> int | torch.Tensor:
    """An int for a CPU tensor; a 0-d tensor left on an accelerator (read later, without a sync)."""
    return int(value) if value.device.type == "cpu" else value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _autocast_dtype(precision: str) -> torch.dtype:
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


class _Stopwatch:
    """Accumulates running time between ``start`` and ``stop``; ``read`` works while running."""

    def __init__(self, elapsed: float = 0.0) -> None:
        self.elapsed = elapsed
        self._since: float | None = None

    def start(self) -> None:
        if self._since is None:
            self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self.elapsed += time.perf_counter() - self._since
            self._since = None

    def read(self) -> float:
        return self.elapsed + (time.perf_counter() - self._since if self._since is not None else 0.0)


def process_memory(field: str = "VmRSS") -> int | None:
    """A memory figure of this process in bytes, read from ``/proc/self/status``.

    Args:
        field: The status line's name: ``VmRSS`` (resident now), ``VmHWM`` (peak resident), ...

    Returns:
        The figure in bytes, or None where ``/proc`` or the field is missing (not Linux).

    Examples:
        >>> rss = process_memory("VmRSS")
        >>> rss is None or rss > 0
        True
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _ProcessMemory:
    """Peak memory of the run: CUDA max allocated, or the process's peak RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.kind = "cuda_max_allocated"
        elif self._reset_rss() and self._vm_hwm() is not None:
            self.kind = "process_peak_rss"
        else:
            self.kind = "ru_maxrss"

    @staticmethod
    def _reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")  # resets VmHWM to the current RSS
            return True
        except OSError:
            return False

    @staticmethod
    def _vm_hwm() -> int | None:
        return process_memory("VmHWM")

    def peak_bytes(self) -> int:
        if self.kind == "cuda_max_allocated":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "process_peak_rss":
            return self._vm_hwm() or 0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)


class EfficiencyMonitor(pl.Callback):
    """Logs throughput, model FLOPs, MFU and peak memory; records time-to-target; writes a summary.

    Per training step it counts the batch's samples and tokens (``pl_module.count_batch(batch)``
    when the module has it, else :func:`batch_counts`; tokens may be a 0-d tensor, read only on
    logging steps so that counting never waits for an accelerator), the model FLOPs of the step (the forward
    is counted by a :class:`~lightning_efficient.flops.FlopCounter` from ``on_train_batch_start``
    to ``on_before_backward``, and the backward is charged from it), and the step's time (between
    consecutive ``on_train_batch_start``, validation excluded). Techniques whose work the counter
    cannot see (e.g. a scoring pass in a data loader) report it with a callback method
    ``adjust_step_flops(trainer, pl_module, flops) -> flops``, applied in callback order. Work in
    other callbacks' ``on_train_batch_start`` is counted when they come after the monitor.

    Logged on logging steps (``log_every_n_steps``), over the last ``window`` steps:
    ``efficiency/tokens_per_s``, ``samples_per_s``, ``flops_per_step``, ``mfu``,
    ``peak_memory_gb`` (10^9 bytes), and once reached ``efficiency/target_wall_s`` and
    ``efficiency/target_tokens``. After each validation the ``monitor`` metric joins the history,
    with the step, times, tokens and model FLOPs of the run so far; the first value that reaches
    ``target`` fixes the time-to-target (wall time since fit start, training time, tokens, step).
    Totals, history and time-to-target are checkpointed and continue across a resume. At the end
    of ``fit`` a summary table is logged (rank zero, Lightning's INFO logger) and written as JSON
    to ``<trainer.log_dir or default_root_dir>/<summary_file>``.

    Args:
        monitor: Validation metric followed for time-to-target and the history.
        target: Value of ``monitor`` to reach (None: only the history is recorded).
        mode: ``min``: reached when ``monitor <= target``; ``max``: when ``>=``.
        peak_flops: Peak FLOP/s of one device for MFU; None measures it once (best of a few
            matmuls in the training dtype, about 1 s, cached in ``$LIGHTNING_EFFICIENT_CACHE``).
        window: Steps of the rolling throughput and MFU.
        summary_file: Name of the JSON summary written at the end of ``fit``.

    Attributes:
        summary: The summary of the last ``fit`` (the dict written as JSON, a
            :class:`~lightning_efficient.summary.RunSummary`); None before one ends.
        last_step: ``samples``, ``tokens`` and ``flops`` of the latest training batch.
        counter: The :class:`~lightning_efficient.flops.FlopCounter` of the step's forward.
        total_flops: Model FLOPs counted so far in this fit (read-only; resumed runs included).

    Examples:
        >>> import tempfile
        >>> import lightning.pytorch as pl
        >>> from lightning_efficient import BertMLM
        >>> texts = [{"input_ids": torch.randint(5, 50, (8,)), "attention_mask": torch.ones(8, dtype=torch.long)}] * 4
        >>> loader = torch.utils.data.DataLoader(texts, batch_size=2)
        >>> monitor = EfficiencyMonitor(peak_flops=1e11)
        >>> trainer = pl.Trainer(max_steps=2, callbacks=[monitor], default_root_dir=tempfile.mkdtemp(), logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(BertMLM(vocab_size=50, preset="tiny"), loader)  # logs a summary table, writes efficiency.json
        >>> summary = monitor.summary
        >>> summary["steps"], summary["samples"], summary["tokens"], summary["flops_per_step"] > 0
        (2, 4, 32, True)
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        target: float | None = None,
        mode: str = "min",
        peak_flops: float | None = None,
        window: int = 20,
        summary_file: str = SUMMARY_FILE,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ConfigurationError(f"monitor={monitor!r} must be a metric name, e.g. 'val/loss'")
        if mode not in MODES:
            raise ConfigurationError(f"mode={mode!r} is unknown; choose one of: {', '.join(MODES)}")
        if target is not None and not (_is_number(target) and math.isfinite(target)):
            raise ConfigurationError(f"target={target!r} must be a finite number or None")
        if peak_flops is not None and not (_is_number(peak_flops) and 0 < peak_flops < math.inf):
            raise ConfigurationError(f"peak_flops={peak_flops!r} must be a positive finite FLOP/s value or None")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigurationError(f"window={window!r} must be an integer >= 1")
        if not isinstance(summary_file, str) or not summary_file.strip():
            raise ConfigurationError(f"summary_file={summary_file!r} must be a non-empty file name")
        self.monitor = monitor
        self.target = None if target is None else float(target)
        self.mode = mode
        self.peak_flops = None if peak_flops is None else float(peak_flops)
        self.window = window
        self.summary_file = summary_file
        self.counter = FlopCounter()
        self.summary: RunSummary | None = None
        self.last_step: dict[str, Any] = {}
        self._counting = False
        # Set again for every fit in on_fit_start:
        self._device = torch.device("cpu")
        self._peak = self.peak_flops or 0.0
        self._peak_source = "given" if self.peak_flops is not None else "measured"
        self._memory: _ProcessMemory | None = None
        self._adjusters: list[pl.Callback] = []
        self._window: deque[tuple[float, int, int | torch.Tensor, float]] = deque(maxlen=window)
        self._step_start = 0.0
        self._warned_missing = False
        self._reset_totals()

    # -- state ----------------------------------------------------------------------------------
    def _reset_totals(self) -> None:
        self._steps = self._samples = self._tokens = 0
        self._flops = 0.0
        self._pending_tokens: torch.Tensor | None = None  # device token counts not yet read
        self._wall_before = 0.0  # wall time of earlier (resumed-from) runs
        self._train_clock = _Stopwatch()
        self._peak_memory_before = 0
        self._history: list[dict[str, Any]] = []
        self._reached: dict[str, Any] | None = None
        self._fit_start: float | None = None
        self._fit_wall: float | None = None  # frozen at fit end
        self._global_step = 0  # trainer.global_step when the steps were last added up

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self._steps,
            "samples": self._samples,
            "tokens": self._total_tokens(),
            "flops": self._flops,
            "wall_time_s": self._wall_time(),
            "train_time_s": self._train_clock.read(),
            "peak_memory_bytes": max(self._peak_memory_before, self._memory_peak()),
            "history": [dict(point) for point in self._history],
            "reached": None if self._reached is None else dict(self._reached),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps = int(state_dict["steps"])
        self._samples = int(state_dict["samples"])
        self._tokens = int(state_dict["tokens"])
        self._flops = float(state_dict["flops"])
        self._wall_before = float(state_dict["wall_time_s"])
        self._train_clock = _Stopwatch(float(state_dict["train_time_s"]))
        self._peak_memory_before = int(state_dict["peak_memory_bytes"])
        # A checkpoint written before history points had "flops": those validations' counts are unknown.
        self._history = [{**point, "flops": point.get("flops")} for point in state_dict["history"]]
        self._reached = None if state_dict["reached"] is None else dict(state_dict["reached"])

    # -- counting -------------------------------------------------------------------------------
    def _start_counting(self) -> None:
        if not self._counting:
            self.counter.reset()
            self.counter.__enter__()
            self._counting = True

    def _stop_counting(self) -> None:
        if self._counting:
            self._counting = False
            self.counter.__exit__(None, None, None)

    def _total_tokens(self) -> int:
        if self._pending_tokens is not None:
            self._tokens += int(self._pending_tokens)
            self._pending_tokens = None
        return self._tokens

    def _wall_time(self) -> float:
        if self._fit_wall is not None:
            return self._fit_wall
        running = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return self._wall_before + running

    def _memory_peak(self) -> int:
        return self._memory.peak_bytes() if self._memory is not None else 0

    @property
    def total_flops(self) -> float:
        """Model FLOPs counted so far in this fit, those restored from a checkpoint on resume included.

        Grows at the end of every training batch (``on_train_batch_end``), so a callback after the
        monitor in ``trainer.callbacks`` reads the count with the batch just trained; with several
        processes it is this process's share. :class:`~lightning_efficient.pipeline.budget.FlopBudget`
        stops a fit on it.

        Examples:
            >>> EfficiencyMonitor(peak_flops=1e11).total_flops
            0.0
        """
        return self._flops

    # -- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._reset_totals()  # a resumed run loads its totals after this

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._device = pl_module.device
        if self.peak_flops is None:
            dtype = _autocast_dtype(str(trainer.precision))
            self._peak, self._peak_source = measure_peak_flops(self._device, dtype), "measured"
        self._memory = _ProcessMemory(self._device)
        self._adjusters = [cb for cb in trainer.callbacks if callable(getattr(cb, "adjust_step_flops", None))]
        self._window.clear()
        self._warned_missing = False
        self.summary = None
        self._fit_wall = None
        self._fit_start = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._global_step = trainer.global_step
        self._train_clock.start()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_start = self._train_clock.read()
        self._start_counting()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._stop_counting()  # backward FLOPs were charged with the forward; recomputation is not model FLOPs

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_counting()
        counter = getattr(pl_module, "count_batch", None)
        samples, tokens = counter(batch) if callable(counter) else batch_counts(batch)
        if isinstance(tokens, torch.Tensor) and tokens.device.type == "cpu":
            tokens = int(tokens)
        flops = self.counter.flops
        for callback in self._adjusters:
            flops = float(callback.adjust_step_flops(trainer, pl_module, flops))
        self._steps += trainer.global_step - self._global_step  # optimizer steps (accumulation: fewer than batches)
        self._global_step = trainer.global_step
        self._samples += int(samples)
        if isinstance(tokens, torch.Tensor):
            self._pending_tokens = tokens if self._pending_tokens is None else self._pending_tokens + tokens
        else:
            self._tokens += tokens
        self._flops += flops
        self._window.append((self._step_start, int(samples), tokens, flops))
        self.last_step = {"samples": int(samples), "tokens": tokens, "flops": flops}
        if trainer._logger_connector.should_update_logs:
            self._log_step(pl_module, flops)

    def _log_step(self, pl_module: pl.LightningModule, flops: float) -> None:
        _synchronize(self._device)
        elapsed = self._train_clock.read() - self._window[0][0]
        metrics = {"efficiency/flops_per_step": flops, "efficiency/peak_memory_gb": self._memory_peak() / 1e9}
        if elapsed > 0:
            window_flops = sum(entry[3] for entry in self._window)
            metrics["efficiency/samples_per_s"] = sum(entry[1] for entry in self._window) / elapsed
            metrics["efficiency/tokens_per_s"] = float(sum(entry[2] for entry in self._window)) / elapsed
            metrics["efficiency/mfu"] = window_flops / elapsed / self._peak
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_counting()
        self._train_clock.stop()  # validation is not training time

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._train_clock.start()
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            if not self._warned_missing:
                rank_zero_warn(
                    f"EfficiencyMonitor: monitor={self.monitor!r} is not among the validation metrics "
                    f"({', '.join(sorted(trainer.callback_metrics)) or 'none'}); no history or time-to-target"
                )
                self._warned_missing = True
            return
        point = {
            "step": trainer.global_step,
            "wall_time_s": self._wall_time(),
            "train_time_s": self._train_clock.read(),
            "tokens": self._total_tokens(),
            "value": float(value),
            "flops": self._flops,
        }
        self._history.append(point)
        if self.target is None or self._reached is not None:
            return
        if (point["value"] <= self.target) if self.mode == "min" else (point["value"] >= self.target):
            self._reached = {key: point[key] for key in ("step", "wall_time_s", "train_time_s", "tokens")}
            for logger in trainer.loggers:
                logger.log_metrics(
                    {"efficiency/target_wall_s": point["wall_time_s"], "efficiency/target_tokens": point["tokens"]},
                    step=trainer.global_step,
                )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_counting()  # a batch skipped by on_train_batch_start returning -1 never reaches batch end

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_counting()
        _synchronize(self._device)
        self._train_clock.stop()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_counting()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_counting()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_wall = self._wall_time()
        directory = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: every rank calls it
        self.summary = self._summary(trainer)
        if trainer.is_global_zero:
            path = write_summary(Path(directory) / self.summary_file, self.summary)
            rank_zero_info(format_summary(self.summary, path))

    # -- summary --------------------------------------------------------------------------------
    def _summary(self, trainer: pl.Trainer) -> RunSummary:
        steps, tokens = self._steps, self._total_tokens()
        train_time = self._train_clock.read()
        achieved = self._flops / train_time if train_time > 0 else 0.0
        target = None
        if self.target is not None:
            reached = self._reached or {}
            target = {
                "value": self.target,
                "reached": self._reached is not None,
                **{key: reached.get(key) for key in ("step", "wall_time_s", "train_time_s", "tokens")},
            }
        final_metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)
        }
        return {
            "version": SCHEMA_VERSION,
            "run_name": os.path.basename(os.path.normpath(trainer.default_root_dir)),
            "device": device_name(self._device),
            "precision": str(trainer.precision),
            "world_size": int(trainer.world_size),
            "steps": steps,
            "samples": self._samples,
            "tokens": tokens,
            "wall_time_s": self._fit_wall,
            "train_time_s": train_time,
            "samples_per_s": self._samples / train_time if train_time > 0 else 0.0,
            "tokens_per_s": tokens / train_time if train_time > 0 else 0.0,
            "flops_per_step": self._flops / steps if steps else 0.0,
            "total_flops": self._flops,
            "achieved_flops_per_s": achieved,
            "peak_flops_per_s": self._peak,
            "peak_flops_source": self._peak_source,
            "mfu": achieved / self._peak,
            "peak_memory_bytes": max(self._peak_memory_before, self._memory_peak()),
            "memory_kind": self._memory.kind if self._memory is not None else "ru_maxrss",
            "monitor": self.monitor,
            "mode": self.mode,
            "target": target,
            "final_metrics": final_metrics,
            "history": [dict(point) for point in self._history],
        }
