"""Large-batch optimizers on BERT-small MLM (embedded corpus): LAMB and Lion against AdamW.

Claims measured (issue 5):

1. LAMB at 8x the base batch (LR scaled by the square-root rule) reaches the validation loss that
   AdamW reaches at the base batch after ``--base-steps`` steps in <= 1/4 of those optimizer steps.
2. AdamW at 8x the batch with the same LR scaling does worse than LAMB in the same steps.
3. Lion (LR 3x smaller, weight decay 10x larger than AdamW's, as its paper advises) vs AdamW at the
   base batch for the same steps: final validation loss and wall-clock side by side.

The 8x batch is built with ``accumulate_grad_batches=8`` over the base batch of 32 x 128 tokens,
so every run uses the same memory and the same validation batches. Each run has the module's
warmup-then-linear-decay schedule over its own length. Every run carries an
:class:`~lightning_efficient.EfficiencyMonitor` whose target is the base run's final validation
loss: it records the first optimizer step, wall-clock time and tokens at which a run reaches it.
Steps to the target do not depend on the machine's speed; wall-clock does.

LAMB's learning rate is not on AdamW's scale: the trust ratio makes each step move a weight matrix
by about ``lr x ||w||``, so LAMB's LR is a relative step per layer. Its base LR (``--lamb-base-lr``,
0.035 at batch 32, 0.099 at 8x) comes from a sweep at 8x: 0.05, 0.1 and 0.2 reached the target at
steps 35, 30 and 30 (final 6.710, 6.709, 6.712), AdamW's scaled 2.8e-3 never did (9.71 after 40).

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/large_batch.py            # ~30 min on 2 cores
    python benchmarks/large_batch.py --preset tiny --vocab-size 2000 --base-steps 16    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_efficient import BertMLM, EfficiencyMonitor, MLMDataModule
from lightning_efficient.compare import format_table, plot
from lightning_efficient.models.base import warmup_schedule
from lightning_efficient.optim import LAMB, Lion
from lightning_efficient.testing import quiet_trainer

OPTIMIZERS = {"adamw": torch.optim.AdamW, "lamb": LAMB, "lion": Lion}


class MLMWith(BertMLM):
    """``BertMLM`` whose optimizer is chosen by name (same warmup-then-decay schedule for all)."""

    def __init__(self, optimizer: str, lr: float, weight_decay: float, **kwargs: Any) -> None:
        super().__init__(learning_rate=lr, weight_decay=weight_decay, **kwargs)
        self.optimizer_name = optimizer

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if self.optimizer_name == "adamw":
            from lightning_efficient.models.base import decay_parameter_groups

            optimizer = torch.optim.AdamW(decay_parameter_groups(self, hp.weight_decay), lr=hp.learning_rate,
                                          betas=(0.9, 0.98), eps=1e-6)  # fmt: skip
        else:  # LAMB and Lion split biases and norm weights out of the decay themselves
            optimizer = OPTIMIZERS[self.optimizer_name](
                self.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay
            )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_fraction * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_schedule(step, warmup, total, "linear")
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def run(name: str, args: argparse.Namespace, data: MLMDataModule, optimizer: str, lr: float, weight_decay: float,
        accumulate: int, steps: int, target: float | None, root: Path) -> dict[str, Any]:  # fmt: skip
    """Train one configuration; return its EfficiencyMonitor summary (with its validation history)."""
    pl.seed_everything(0, verbose=False)
    model = MLMWith(optimizer, lr, weight_decay, vocab_size=data.vocab_size, preset=args.preset, max_length=128)
    monitor = EfficiencyMonitor(monitor="val/loss", target=target)
    validations = args.validations
    trainer = quiet_trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        val_check_interval=max(1, steps // validations) * accumulate,
        limit_val_batches=args.val_batches,
        num_sanity_val_steps=0,
        default_root_dir=root / name,
        callbacks=[monitor],
    )
    trainer.fit(model, data)
    summary = dict(monitor.summary or {})
    summary["run_name"] = name
    print(f"{name}: final val/loss {summary['history'][-1]['value']:.4f} after {summary['steps']} steps, "
          f"{summary['train_time_s']:.0f} s training")  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--base-steps", type=int, default=160, help="AdamW steps at the base batch")
    parser.add_argument("--scale", type=int, default=8, help="batch multiple of the large-batch runs")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW's LR at the base batch (the main job's)")
    parser.add_argument("--validations", type=int, default=8, help="validations per run")
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--lamb-base-lr", type=float, default=0.035,
                        help="LAMB's LR at the base batch, scaled by sqrt(--scale) like AdamW's")  # fmt: skip
    parser.add_argument(
        "--lamb-lr", type=float, default=None, help="LAMB's LR at --scale x (overrides the scaled base LR)"
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="skip the AdamW base run and use this val/loss as the target (from an earlier run)",
    )
    parser.add_argument("--only-lamb", action="store_true", help="run only LAMB (with --target): an LR sweep point")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--output", default="large_batch.png", help="PNG of val/loss against wall-clock and tokens")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = MLMDataModule(vocab_size=args.vocab_size, max_length=128, batch_size=32)
    root = Path(tempfile.mkdtemp(prefix="large_batch_"))
    large_steps = max(1, args.base_steps // 4)
    scaled_lr = args.lr * math.sqrt(args.scale)

    run("warmup", args, data, "adamw", args.lr, 0.01, 1, 2, None, root)  # first-run costs (threads, caches): discarded
    lamb_lr = args.lamb_lr or args.lamb_base_lr * math.sqrt(args.scale)
    if args.only_lamb:
        if args.target is None:
            parser.error("--only-lamb needs --target")
        lamb = run(f"lamb_{args.scale}x", args, data, "lamb", lamb_lr, 0.01, args.scale, large_steps, args.target, root)
        step = lamb["target"]["step"] if lamb["target"]["reached"] else None
        print(
            f"LAMB lr {lamb_lr:g}: final val/loss {lamb['history'][-1]['value']:.4f}; target {args.target} reached at step {step}"
        )
        return {"lamb": lamb}
    base = run("adamw_base", args, data, "adamw", args.lr, 0.01, 1, args.base_steps, None, root)
    target = base["history"][-1]["value"]
    lamb = run(f"lamb_{args.scale}x", args, data, "lamb", lamb_lr, 0.01, args.scale, large_steps, target, root)
    adamw_large = run(
        f"adamw_{args.scale}x", args, data, "adamw", scaled_lr, 0.01, args.scale, large_steps, target, root
    )
    lion = run("lion_base", args, data, "lion", args.lr / 3, 0.1, 1, args.base_steps, target, root)
    print(f"LRs: AdamW {args.lr:g} at batch 32, {scaled_lr:g} at {args.scale}x; LAMB {lamb_lr:g}; Lion {args.lr / 3:g}")

    summaries = [base, lamb, adamw_large, lion]
    print()
    print(format_table(summaries))
    plot(summaries, args.output)
    lamb_step = lamb["target"]["step"] if lamb["target"]["reached"] else None
    final = {s["run_name"]: s["history"][-1]["value"] for s in summaries}
    verdicts = {
        "lamb_reaches_base_loss_in_quarter_steps": lamb_step is not None and lamb_step <= large_steps,
        "adamw_large_worse_than_lamb": final[adamw_large["run_name"]] > final[lamb["run_name"]],
    }
    print()
    print(f"target: AdamW's val/loss after {args.base_steps} steps at batch 32 = {target:.4f}")
    print(f"{'PASS' if verdicts['lamb_reaches_base_loss_in_quarter_steps'] else 'FAIL'}: LAMB at {args.scale}x batch "
          f"reaches it at step {lamb_step} (budget {large_steps} = 1/4 of {args.base_steps})")  # fmt: skip
    print(f"{'PASS' if verdicts['adamw_large_worse_than_lamb'] else 'FAIL'}: after {large_steps} steps at {args.scale}x batch, "
          f"AdamW {final[adamw_large['run_name']]:.4f} vs LAMB {final[lamb['run_name']]:.4f} (lower is better)")  # fmt: skip
    print(f"Lion vs AdamW at batch 32, {args.base_steps} steps: val/loss {final['lion_base']:.4f} vs {target:.4f}; "
          f"training time {lion['train_time_s']:.0f} s vs {base['train_time_s']:.0f} s")  # fmt: skip
    result = {"target": target, "large_steps": large_steps, "final": final, "lamb_step": lamb_step, "verdicts": verdicts,
              "summaries": summaries}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
