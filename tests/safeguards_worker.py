"""Run the safeguards on DDP with 2 CPU processes (gloo); ``test_checkpointing_runs.py`` starts it.

Usage: ``python tests/safeguards_worker.py OUT_DIR``. Lightning's DDP launcher starts the second
rank by running this script again; the later fits reuse the two processes. Each rank seeds its own
random streams (``100 + rank``), so its dropout masks differ from the other rank's. Fits, in turn:

1. ``whole``: 8 steps with :class:`RandomStates`.
2. ``broken``: the same run stopped at step 3 (``last.ckpt`` written there).
3. ``resumed``: from that checkpoint to step 8, after reseeding every rank elsewhere.
4. ``one_state``: the same resume from a copy of the checkpoint holding rank 0's random states only.
5. ``nan``: a loss that is ``nan`` on rank 1 only at step 2, with :class:`NonFiniteLossGuard`.

Each rank writes ``OUT_DIR/<fit>_rank<r>.pt`` with its weights (or the error it stopped with).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from test_checkpointing_runs import DropoutRegressor

from lightning_efficient import LastCheckpoint, NonFiniteLossError, NonFiniteLossGuard, RandomStates
from lightning_efficient.checkpoint import AtomicCheckpointIO
from lightning_efficient.testing import quiet_trainer

NAN_STEP = 2


class SeedPerRank(pl.Callback):
    """Seed every global random stream with ``base + rank`` when the fit starts (a new process)."""

    def __init__(self, base: int) -> None:
        self.base = base

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl.seed_everything(self.base + trainer.global_rank, verbose=False)


class NanOnRankOne(DropoutRegressor):
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        bad = self.global_rank == 1 and self.global_step == NAN_STEP
        return loss * float("nan") if bad else loss


def ddp_trainer(root: Path, steps: int, seed: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return quiet_trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, limit_val_batches=0, enable_checkpointing=True,
        default_root_dir=str(root), plugins=[AtomicCheckpointIO()], callbacks=[*callbacks, SeedPerRank(seed)],
    )  # fmt: skip


def fit(
    root: Path, steps: int, seed: int, callbacks: list[pl.Callback], ckpt_path: str | None = None
) -> tuple[pl.Trainer, pl.LightningModule]:
    pl.seed_everything(0, verbose=False)  # the same initial weights on every rank and in every fit
    model, trainer = DropoutRegressor(), ddp_trainer(root, steps, seed, callbacks)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def save(out: Path, name: str, trainer: pl.Trainer, result: dict) -> None:
    torch.save(
        {"rank": trainer.global_rank, "world_size": trainer.world_size, **result},
        out / f"{name}_rank{trainer.global_rank}.pt",
    )


def main() -> None:
    out = Path(sys.argv[1])

    def last(name: str) -> LastCheckpoint:
        return LastCheckpoint(dirpath=out / name, every_n_train_steps=3)

    trainer, model = fit(out, 8, 100, [RandomStates(), last("whole")])
    save(out, "whole", trainer, {"steps": trainer.global_step, "weights": model.state_dict()})
    trainer, model = fit(out, 3, 100, [RandomStates(), last("broken")])
    save(out, "broken", trainer, {"steps": trainer.global_step, "weights": model.state_dict()})
    rank, checkpoint = trainer.global_rank, out / "broken" / "last.ckpt"

    # a copy of the checkpoint for this rank alone, holding rank 0's random states only
    one_state = torch.load(checkpoint, weights_only=True)
    one_state["callbacks"]["RandomStates"]["ranks"] = one_state["callbacks"]["RandomStates"]["ranks"][:1]
    torch.save(one_state, out / f"one_state_rank{rank}.ckpt")

    trainer, model = fit(out, 8, 200, [RandomStates(), last("resumed")], ckpt_path=str(checkpoint))
    save(out, "resumed", trainer, {"steps": trainer.global_step, "weights": model.state_dict()})
    trainer, model = fit(out, 8, 200, [RandomStates(), last("one")], ckpt_path=str(out / f"one_state_rank{rank}.ckpt"))
    save(out, "one_state", trainer, {"steps": trainer.global_step, "weights": model.state_dict()})

    pl.seed_everything(0, verbose=False)
    model, trainer = NanOnRankOne(), ddp_trainer(out, 8, 100, [NonFiniteLossGuard()])
    try:
        trainer.fit(model)
        error = None
    except NonFiniteLossError as err:
        error = str(err)
    save(out, "nan", trainer, {"steps": trainer.global_step, "training_steps": model.steps, "error": error})

    # Both ranks leave the process group together: without it, the rank that exits last could abort at
    # interpreter exit ("terminate called without an active exception") while gloo still held its peer.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
