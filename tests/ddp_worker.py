"""Run contract rows on DDP with 2 CPU processes (gloo), one after another; ``test_contract.py`` starts it.

Usage: ``python tests/ddp_worker.py CASE_ID[,CASE_ID...] FILES_JSON OUT_DIR``. Lightning's DDP
launcher starts the second rank by running this script again (once: the later fits reuse the two
processes and their process group, which saves a start-up of ~8 s per row). For each row, each rank
writes ``OUT_DIR/<case id>/rank<r>.pt`` with its weights, the technique's state and a hash of the
batches it saw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from techniques import CASES, TechniqueCase, tiny_family

from lightning_efficient.testing import quiet_trainer


class BatchHash(Callback):
    def __init__(self) -> None:
        self.hash = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        inputs = batch["input_ids"] if "input_ids" in batch else batch["pixel_values"]
        self.hash = hash((self.hash, tuple(inputs.flatten().tolist())))


def main() -> None:
    case_ids, files, out = sys.argv[1].split(","), json.loads(sys.argv[2]), Path(sys.argv[3])
    rows = {c.id: c for c in CASES}
    for case_id in case_ids:
        (out / case_id).mkdir(parents=True, exist_ok=True)
        run(rows[case_id], files, out / case_id)


def run(case: TechniqueCase, files: dict[str, str], out: Path) -> None:
    """Train the row's tiny base-family model with its technique for 3 steps on 2 ranks; save this rank's results."""
    pl.seed_everything(0, verbose=False)
    model, dm = tiny_family(case.base_family, files)
    technique, batches = case.build(), BatchHash()
    trainer = quiet_trainer(
        accelerator="cpu", devices=2, strategy=case.extra.get("ddp_strategy", "ddp"), max_steps=3, limit_val_batches=0,
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
