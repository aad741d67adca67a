"""Run safeguards: checkpoints that hold the latest state, exact random streams on resume, a stop on a non-finite loss.

Three callbacks that any LightningModule can use and that every shipped config turns on (with
:class:`~lightning_efficient.checkpoint.AtomicCheckpointIO` as ``trainer.plugins``):

- :class:`LastCheckpoint` keeps ``last.ckpt`` the latest state of the run: written every
  ``every_n_train_steps`` optimizer steps and at the last step, whatever a monitored
  ``ModelCheckpoint`` decides (Lightning's ``save_last`` rewrites ``last.ckpt`` only when that
  callback saves, i.e. on an improvement). A killed run resumes from at most
  ``every_n_train_steps`` steps back. Before the first step it checks that every checkpoint
  directory of the run can be written, instead of failing at the first save hours later.
- :class:`RandomStates` saves the global random states (torch CPU and CUDA, Python ``random``,
  NumPy) in each checkpoint and restores them on resume just before the first training batch, so
  dropout draws the same masks as in the uninterrupted run. Lightning 2.6 saves no random state.
- :class:`NonFiniteLossGuard` stops the run when the loss is ``nan`` or ``inf`` (before the
  backward pass, so before the optimizer step and before any checkpoint), naming the step and the
  likely cause, and refuses to write a checkpoint whose weights are not finite: the last
  checkpoint on disk keeps the last finite weights, and the command exits non-zero.

These guarantees are not a technique's, so the module stands beside ``checkpoint.py`` rather
than in ``callbacks/`` (one module per technique).

Examples:
    >>> import tempfile
    >>> import lightning.pytorch as pl
    >>> from lightning.pytorch.demos.boring_classes import BoringModel
    >>> from lightning_efficient.checkpoint import AtomicCheckpointIO
    >>> root = tempfile.mkdtemp()
    >>> last = LastCheckpoint(dirpath=f"{root}/checkpoints", every_n_train_steps=2)
    >>> trainer = pl.Trainer(max_steps=5, callbacks=[RandomStates(), NonFiniteLossGuard(), last],
    ...                      plugins=[AtomicCheckpointIO()], default_root_dir=root, logger=False,
    ...                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    >>> trainer.fit(BoringModel())
    >>> torch.load(last.last_model_path, weights_only=True)["global_step"]  # the last step, not step 4
    5
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_efficient.errors import ConfigurationError, NonFiniteLossError, check_int

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy comes with torch in practice
    np = None

__all__ = [
    "LastCheckpoint",
    "NonFiniteLossGuard",
    "RandomStates",
    "capture_random_states",
    "check_checkpoint_directories",
    "check_writable_directory",
    "restore_random_states",
]


# -- checkpoint directories --------------------------------------------------------------------
def check_writable_directory(path: str | Path) -> Path:
    """Create ``path`` if needed and write (then remove) a file in it; return it.

    Raises:
        ConfigurationError: The directory cannot be created or written, naming it and the reason.

    Examples:
        >>> import tempfile
        >>> file = Path(tempfile.mkdtemp()) / "a_file"
        >>> _ = file.write_text("")
        >>> check_writable_directory(file / "checkpoints")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: checkpoint directory '.../a_file/checkpoints' cannot be written ...
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write_check.", dir=path)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        raise ConfigurationError(
            f"checkpoint directory {str(path)!r} cannot be written ({type(err).__name__}: {err.strerror or err}); "
            "no checkpoint could be saved. Choose another dirpath for the checkpoint callbacks (or another "
            "trainer.default_root_dir), or make it writable"
        ) from err
    return path


def check_checkpoint_directories(trainer: pl.Trainer) -> None:
    """Check, on rank zero, that the directory of every ``ModelCheckpoint`` of ``trainer`` can be written.

    Every rank raises the same error, so no process waits for another in a collective.

    Raises:
        ConfigurationError: A local checkpoint directory cannot be created or written.
    """
    message = None
    if trainer.is_global_zero:
        for callback in trainer.checkpoint_callbacks:
            dirpath = getattr(callback, "dirpath", None)
            if dirpath and _is_local_file_protocol(dirpath):
                try:
                    check_writable_directory(dirpath)
                except ConfigurationError as err:
                    message = str(err)
                    break
    message = trainer.strategy.broadcast(message)
    if message is not None:
        raise ConfigurationError(message)


class LastCheckpoint(ModelCheckpoint):
    """Write ``last.ckpt`` every ``every_n_train_steps`` optimizer steps and at the last step.

    A ``ModelCheckpoint`` that keeps only ``last.ckpt`` (``save_last=True, save_top_k=0``): it is
    rewritten every ``every_n_train_steps`` steps, at ``max_steps``, and when training ends for any
    other reason (end of the last epoch, early stopping, ``max_time``), so it always holds the
    latest state and a run killed at any moment resumes from at most ``every_n_train_steps`` steps
    back. Saves inside training (every N steps, at ``max_steps``) are taken mid-epoch and resume
    exactly. Keep a monitored ``ModelCheckpoint`` beside it for the best model, with
    ``save_last: false`` so that only this callback writes ``last.ckpt``.

    Before the first step (``on_fit_start``) it checks that every checkpoint directory of the run
    can be written (:func:`check_checkpoint_directories`).

    Args:
        dirpath: Directory of ``last.ckpt`` (None: Lightning's default, ``<log dir>/checkpoints``).
        every_n_train_steps: Optimizer steps between two writes.

    Examples:
        >>> LastCheckpoint(dirpath="runs/demo/checkpoints", every_n_train_steps=50).save_top_k
        0
    """

    def __init__(self, dirpath: str | Path | None = None, every_n_train_steps: int = 100) -> None:
        check_int("every_n_train_steps", every_n_train_steps, low=1)
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_checkpoint_directories(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        at_max_steps = 0 < trainer.max_steps <= trainer.global_step
        if at_max_steps and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # stopped elsewhere than at a save
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# -- random states -----------------------------------------------------------------------------
def capture_random_states() -> dict[str, Any]:
    """The global random states: torch CPU (and CUDA when initialised), Python ``random``, NumPy.

    Only tensors and plain values, so a checkpoint holding them loads with
    ``torch.load(weights_only=True)``.

    Examples:
        >>> states = capture_random_states()
        >>> a, b = torch.rand(2), random.random()
        >>> restore_random_states(states)
        >>> torch.equal(a, torch.rand(2)), b == random.random()
        (True, True)
    """
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if np is not None:
        kind, keys, position, has_gauss, cached = np.random.get_state()
        states["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    """Restore what :func:`capture_random_states` captured (states absent from ``states`` are left alone)."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states and np is not None:
        kind, keys, position, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class RandomStates(pl.Callback):
    """Save the global random states in every checkpoint; restore them when training resumes.

    Dropout (and anything else drawing from torch's, Python's or NumPy's global generators)
    continues on resume exactly where the checkpoint left it, on any LightningModule. The states
    are restored just before the first training batch after the resume (``on_train_batch_start``),
    so draws made while the run restarts (a sanity check, building data loaders, measuring the
    device) do not shift them. With several processes each rank's states are gathered into the
    checkpoint and each rank gets its own back; a checkpoint from another number of processes
    gives every rank the states of rank 0, with a warning.

    Put it first in ``trainer.callbacks``: callbacks before it that draw from the global
    generators in ``on_train_batch_start`` would draw before the restore.

    Examples:
        >>> callback = RandomStates()
        >>> state = callback.state_dict()
        >>> sorted(state["ranks"][0])[:2]
        ['numpy', 'python']
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pending = None  # a resumed run loads its states after this

    def state_dict(self) -> dict[str, Any]:
        states = capture_random_states()
        if _distributed() and torch.distributed.get_world_size() > 1:
            ranks: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, states)
            return {"ranks": ranks}
        return {"ranks": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = list(state_dict["ranks"])

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        ranks, self._pending = self._pending, None
        if len(ranks) != trainer.world_size:
            rank_zero_warn(
                f"RandomStates: the checkpoint holds the random states of {len(ranks)} processes, this run has "
                f"{trainer.world_size}; every process continues from rank 0's states, so random draws (dropout) "
                "will not match the uninterrupted run"
            )
        restore_random_states(ranks[trainer.global_rank] if len(ranks) == trainer.world_size else ranks[0])

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pending = None


# -- non-finite loss ---------------------------------------------------------------------------
def _learning_rates(trainer: pl.Trainer) -> list[float]:
    return [float(group["lr"]) for optimizer in trainer.optimizers for group in optimizer.param_groups if "lr" in group]


def _first_non_finite(tensors: dict[str, Any]) -> str | None:
    """Name of the first floating tensor in ``tensors`` holding ``nan`` or ``inf`` (None if all are finite).

    One check per tensor is queued and read once, so an accelerator is waited for a single time.
    """
    names, checks = [], []
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and (tensor.is_floating_point() or tensor.is_complex()):
            local = getattr(tensor, "_local_tensor", tensor)  # a DTensor's shard on this process
            names.append(name)
            checks.append(torch.isfinite(local).all().cpu())
    if not checks:
        return None
    finite = torch.stack(checks)
    return None if bool(finite.all()) else names[int((~finite).nonzero()[0])]


class NonFiniteLossGuard(pl.Callback):
    """Stop training at the first ``nan`` or ``inf`` loss, before it reaches the weights or a checkpoint.

    Each step costs one ``isfinite`` check of the loss, made in ``on_before_backward``: before
    the backward pass, the optimizer step and any checkpoint save of that step. The run stops with
    :class:`~lightning_efficient.errors.NonFiniteLossError` naming the step, the loss and the
    learning rate, so the command exits non-zero. Before a checkpoint is written, the weights are
    checked too (a finite loss can still leave ``inf`` weights after a huge step): a checkpoint of
    non-finite weights is never written, so ``last.ckpt`` keeps the last finite state to resume
    from with a lower learning rate. With several processes the decision is taken by all of them
    together, so every rank stops at the same step.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> class Broken(BoringModel):
        ...     def training_step(self, batch, batch_idx):
        ...         return {"loss": super().training_step(batch, batch_idx)["loss"] * float("nan")}
        >>> trainer = pl.Trainer(max_steps=3, callbacks=[NonFiniteLossGuard()], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Broken())
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.NonFiniteLossError: loss is nan at step 0 (epoch 0, batch 0): ...
    """

    def __init__(self) -> None:
        self._batch_idx = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        finite = trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss.detach()).all()), all=True)
        if finite:
            return
        value = loss.detach().float()
        shown = (
            "nan" if bool(value.isnan().any()) else "inf" if bool(value.isinf().any()) else "not finite on another rank"
        )
        rates = _learning_rates(trainer)
        rate = f"the learning rate ({max(rates)})" if rates else "the learning rate"
        raise NonFiniteLossError(
            f"loss is {shown} at step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx}): "
            f"{rate} may be too high, or the data "
            "holds non-finite values. Training stopped before this step changed the weights; the last checkpoint "
            "saved before it is kept: resume from it with a lower learning rate (or gradient clipping)"
        )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        bad = _first_non_finite(checkpoint.get("state_dict", {}))
        if trainer.strategy.reduce_boolean_decision(bad is None, all=True):
            return
        raise NonFiniteLossError(
            f"the weights hold non-finite values at step {trainer.global_step} ({bad or 'on another rank'}); "
            "not writing a checkpoint over the last finite one. The learning rate may be too high, or the data "
            "holds non-finite values"
        )
