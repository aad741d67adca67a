"""Bring your own Transformer: a hand-written ``nn.TransformerEncoder`` LightningModule (no HF).

A user with an existing Lightning project keeps their module and their ``Trainer`` and adds our
callbacks. Here the module is a small sentence classifier (informative vs imaginative prose from
the embedded Brown Corpus); the callbacks are the :class:`EfficiencyMonitor` (throughput, FLOPs,
MFU, peak memory, time to a target accuracy) and :class:`LayerDrop` (stochastic depth: the
deeper of the encoder's blocks are skipped more often during training), which finds the
``nn.TransformerEncoder``'s blocks by itself. Each technique issue adds its callback here.

    python examples/own_model.py                      # a minute or two on 2 cores
    python examples/own_model.py --steps 20           # seconds
    lightning-efficient compare runs/example_own_model   # the efficiency summary as a table + plot
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_efficient import BROWN_PROSE, EfficiencyMonitor, LayerDrop, TextClassificationDataModule
from lightning_efficient.summary import SUMMARY_FILE, read_summary


class SentenceClassifier(pl.LightningModule):
    """Token embeddings + learned positions -> ``nn.TransformerEncoder`` -> mean pool -> labels."""

    def __init__(self, vocab_size: int, num_labels: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                 max_length: int = 64, learning_rate: float = 1e-3) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(1, max_length, hidden))
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids) + self.position[:, : input_ids.shape[1]]  # (B, T, C)
        hidden = self.encoder(hidden, src_key_padding_mask=attention_mask == 0)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * weights).sum(1) / weights.sum(1))  # (B, labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        self.log("val/loss", F.cross_entropy(logits, batch["labels"]), prog_bar=True)
        self.log("val/accuracy", (logits.argmax(-1) == batch["labels"]).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.learning_rate)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the classifier with the monitor and the technique; returns the efficiency summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--target-accuracy", type=float, default=0.8)
    parser.add_argument("--root", default="runs/example_own_model")
    args = parser.parse_args(argv)
    pl.seed_everything(0)

    data = TextClassificationDataModule(label_map=BROWN_PROSE, vocab_size=4000, max_length=64, batch_size=32)
    model = SentenceClassifier(vocab_size=data.vocab_size, num_labels=2)
    monitor = EfficiencyMonitor(monitor="val/accuracy", target=args.target_accuracy, mode="max")
    trainer = pl.Trainer(
        max_steps=args.steps,
        val_check_interval=max(1, args.steps // 5),
        limit_val_batches=10,
        default_root_dir=args.root,
        callbacks=[LayerDrop(drop_rate=0.2, schedule="linear"), monitor],
    )
    trainer.fit(model, data)
    return dict(read_summary(Path(trainer.log_dir or args.root) / SUMMARY_FILE))


if __name__ == "__main__":
    main()
