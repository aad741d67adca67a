"""Pretrain a BERT with masked-LM on the embedded corpus, then fine-tune it as a classifier.

The Python route through the package, as a user with an existing Lightning project writes it:
plain ``Trainer`` objects, our LightningModules and DataModules. The classifier's tokenizer and
encoder weights both come from the pretraining checkpoint.

    python examples/pretrain_then_finetune.py                 # BERT-small, a few minutes on 2 cores
    python examples/pretrain_then_finetune.py --preset tiny --steps 20 --vocab-size 2000   # seconds
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl

from lightning_efficient import BROWN_PROSE, BertClassifier, BertMLM, MLMDataModule, TextClassificationDataModule


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run both stages; returns the classifier's validation metrics."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of each stage")
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--root", default="runs/example_pretrain_then_finetune")
    args = parser.parse_args(argv)
    root = Path(args.root)
    pl.seed_everything(0)

    # Stage 1: masked-LM pretraining on Austen + Brown.
    mlm_data = MLMDataModule(vocab_size=args.vocab_size, max_length=128, batch_size=32)
    mlm = BertMLM(vocab_size=mlm_data.vocab_size, preset=args.preset, max_length=128)
    pretrain = pl.Trainer(
        max_steps=args.steps, limit_val_batches=5, val_check_interval=args.steps, default_root_dir=root / "mlm"
    )
    pretrain.fit(mlm, mlm_data)
    checkpoint = root / "mlm.ckpt"
    pretrain.save_checkpoint(checkpoint)

    # Stage 2: informative vs imaginative prose, encoder and tokenizer from the checkpoint.
    cls_data = TextClassificationDataModule(
        label_map=BROWN_PROSE, tokenizer=str(checkpoint), max_length=128, batch_size=32
    )
    classifier = BertClassifier(
        vocab_size=cls_data.vocab_size,
        num_labels=cls_data.num_labels,
        label_names=cls_data.label_names,
        preset=args.preset,
        max_length=128,
        pretrained=str(checkpoint),
    )
    finetune = pl.Trainer(
        max_steps=args.steps, limit_val_batches=20, val_check_interval=args.steps, default_root_dir=root / "classifier"
    )
    finetune.fit(classifier, cls_data)
    metrics = {k: float(v) for k, v in finetune.callback_metrics.items() if k.startswith("val/")}
    print({k: round(v, 4) for k, v in metrics.items()})
    return metrics


if __name__ == "__main__":
    main()
