"""Write ``predict`` results to a JSON-lines file, one object per example."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["JsonlPredictionWriter"]


class JsonlPredictionWriter(BasePredictionWriter):
    """Append each predicted example (a dict returned by ``predict_step``) to a ``.jsonl`` file.

    Args:
        output_path: Target file; default ``<trainer.default_root_dir>/predictions.jsonl``.
            It is truncated at the start of ``predict``.

    Examples:
        >>> writer = JsonlPredictionWriter("predictions.jsonl")
        >>> trainer = pl.Trainer(callbacks=[writer], logger=False)  # then trainer.predict(model, dm)
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self.path: Path | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path = Path(self.output_path or Path(trainer.default_root_dir) / "predictions.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("", encoding="utf-8")

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        assert self.path is not None
        with self.path.open("a", encoding="utf-8") as handle:
            for row in prediction:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        print(f"predictions written to {self.path}")
