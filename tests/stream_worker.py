"""Two gloo processes train on one streamed corpus; ``test_streaming.py`` starts it.

``python tests/stream_worker.py CORPUS TOKENIZER_JSON OUT_DIR``: a Lightning DDP run of 6 steps
(a checkpoint every 3, which gathers both ranks' stream positions), then, in the same two
processes (Lightning's launcher reruns this script for rank 1), a run resumed from its step-3
checkpoint; ``OUT_DIR/fit_rank<r>.pt`` holds both runs' weights and the batches each rank trained on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_efficient import BertMLM, MLMDataModule, RandomStates


class Batches(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.global_step, batch["input_ids"].clone()))


def fit(corpus: str, tokenizer_json: str, root: Path, ckpt_path: str | None) -> tuple[BertMLM, Batches, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    data = MLMDataModule(
        train_files=[corpus], tokenizer=tokenizer_json, max_length=12, batch_size=4, shuffle_buffer=16,
        streaming=True, val_fraction=0.0, test_fraction=0.0,
    )  # fmt: skip
    model = BertMLM(vocab_size=data.vocab_size, preset="tiny", max_length=12)
    batches = Batches()
    saver = ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=6, limit_val_batches=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=[RandomStates(), saver, batches],
    )  # fmt: skip
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, batches, trainer


def fit_twice(corpus: str, tokenizer_json: str, out: str) -> None:
    whole, whole_batches, trainer = fit(corpus, tokenizer_json, Path(out) / "whole", None)
    resumed, resumed_batches, _ = fit(corpus, tokenizer_json, Path(out) / "resumed", f"{out}/whole/step=3.ckpt")
    result = {
        "whole": whole.state_dict(), "resumed": resumed.state_dict(),
        "whole_batches": whole_batches.seen, "resumed_batches": resumed_batches.seen,
    }  # fmt: skip
    torch.save(result, Path(out) / f"fit_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    fit_twice(*sys.argv[1:4])
