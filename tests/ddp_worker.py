"""Run one contract row on DDP with 2 CPU processes (gloo); ``test_contract.py`` starts it.

Usage: ``python tests/ddp_worker.py CASE_ID FILES_JSON OUT_DIR``. Lightning's DDP launcher starts
the second rank by running this script again. Each rank writes ``OUT_DIR/rank<r>.pt`` with its
weights, the technique's state and a hash of the batches it saw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from techniques import CASES, tiny_family


class BatchHash(Callback):
    def __init__(self) -> None:
        self.hash = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.hash = hash((self.hash, tuple(batch["input_ids"].flatten().tolist())))


def main() -> None:
    case_id, files, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    (case,) = [c for c in CASES if c.id == case_id]
    pl.seed_everything(0, verbose=False)
    model, dm = tiny_family("bert", files)
    technique, batches = case.build(), BatchHash()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=case.extra.get("ddp_strategy", "ddp"), max_steps=3, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out, callbacks=[technique, batches],
    )  # fmt: skip
    trainer.fit(model, dm)
    torch.save(
        {
            "world_size": trainer.world_size,
            "steps": trainer.global_step,
            "technique": technique.state_dict(),
            "weights": model.state_dict(),
            "batch_hash": str(batches.hash),
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
