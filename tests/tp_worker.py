"""Tensor-parallel runs on 2 CPU processes (gloo); ``test_tensor_parallel.py`` starts it.

Usage: ``python tests/tp_worker.py SPEC_JSON OUT_DIR``. ``SPEC_JSON`` holds ``files`` (the test's
data files) and ``runs`` (see :func:`train`); all runs share one pair of processes (Lightning's
launcher starts the second rank by running this script again). Each rank writes
``OUT_DIR/rank<r>.pt`` with, per run, its losses, gradient norms, full parameters (DTensors
gathered) and a hash of its batches; a run that raises writes ``OUT_DIR/error_rank<r>.txt``.
The single-process reference runs :func:`train` in the test's own process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from own_block import OwnBlock, OwnModel, registered_own_block
from techniques import CASES, tiny_family
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_efficient import LAMB, BertClassifier, Lion, TextClassificationDataModule
from lightning_efficient.data.translation import TranslationDataModule
from lightning_efficient.strategies import FullyShardedStrategy, TensorParallelStrategy, clip_grad_norm_
from lightning_efficient.testing import quiet_trainer

warnings.filterwarnings("ignore")
#: Odd per-rank sizes at tp=2: 3 heads of width 6, 19 FFN neurons.
SHAPE = {"preset": "tiny", "hidden_size": 36, "num_heads": 6, "ffn_size": 38, "dropout": 0.0}


class EvenTranslationData(TranslationDataModule):
    """Source and target lengths padded to even numbers: sequence parallelism at tp=2 needs them."""

    def _collate(self, examples: list[Any]) -> dict[str, Any]:
        batch = super()._collate(examples)
        for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
            tensor = batch[key]
            if tensor.shape[1] % 2:
                batch[key] = torch.cat([tensor, torch.full((tensor.shape[0], 1), fill, dtype=tensor.dtype)], dim=1)
        return batch


def build(family: str, files: dict[str, str], **shape: Any) -> tuple[pl.LightningModule, pl.LightningDataModule | None]:
    """A tiny model of ``family`` without dropout (a single process and TP ranks draw it differently).

    ``own``: the user's block of ``own_block.py`` (FFN 38, 2 heads per rank), with its own loader;
    ``classify``: a BERT classifier of the genres of the test's jsonl sentences (batches of 16)."""
    if family == "own":
        model = OwnModel(depth=2)
        model.blocks = nn.ModuleList(OwnBlock(ffn=38) for _ in range(2))
        return model, None
    if family == "classify":
        dm = TextClassificationDataModule(
            train_files=[files["jsonl"]], text_column="sentence", label_column="category", vocab_size=300,
            max_length=32, batch_size=BATCH,
        )  # fmt: skip
        model = BertClassifier(vocab_size=300, num_labels=3, max_length=32, **{**SHAPE, **shape})
        return model, dm
    return tiny_family(family, files, mlm_length=32, translation_data=EvenTranslationData, **{**SHAPE, **shape})


# -- the FSDP2 and 2D parity runs (tests/test_fully_sharded.py and benchmarks/scale.py) -----------
#: Optimizer steps of a parity run, and the step after which its sharded checkpoint is written.
PARITY_STEPS, SAVE_AT = 6, 3
#: Batch of each data-parallel rank (ViT's DataModule default, the classifier's): one process takes twice as many.
BATCH = 16
TWO_D = {"data_parallel_size": 2, "tensor_parallel_size": 2}
#: Families whose loss is a mean over examples: data-parallel ranks together are one process with 2 x BATCH.
ONE_PROCESS = ("vit", "classify")
#: BERT MLM's and MT's losses are means over tokens, whose counts differ between ranks: DDP is their reference.
FAMILIES = (*ONE_PROCESS, "bert", "mt")
#: Gradient-clipping thresholds below each family's gradient norms: clipping acts on every step.
CLIPS = {"vit": 0.25, "classify": 0.02, "bert": 0.25, "mt": 0.25}


def parity_runs(out: Path, kind: str, strategy: dict[str, Any]) -> list[dict[str, Any]]:
    """Every family under ``kind`` (``fsdp``, or ``2d`` with ``strategy``): checkpointed after step 3, resumed from it.

    Under 2D, BERT's tied MLM decoder is sharded over the vocabulary too."""
    runs = []
    for family in FAMILIES:
        name = f"{family}_{kind}"
        options = {**strategy, "vocab_parallel": True} if kind == "2d" and family == "bert" else strategy
        common = {"family": family, "steps": PARITY_STEPS, "clip": CLIPS[family], "strategy": options,
                  "kind": "fsdp" if kind == "fsdp" else "tp"}  # fmt: skip
        runs.append({"name": name, **common, "save_at": SAVE_AT})
        runs.append({"name": f"{name}_resumed", **common, "resume": str(out / name / f"step={SAVE_AT}.ckpt")})
    return runs


def reference_runs() -> list[dict[str, Any]]:
    """The references of :func:`parity_runs`: one process with 2 x BATCH (run here), DDP on 2 ranks (launched)."""
    one = [
        {"name": f, "family": f, "steps": PARITY_STEPS, "clip": CLIPS[f], "batch_size": 2 * BATCH} for f in ONE_PROCESS
    ]
    ddp = [
        {"name": f"{f}_ddp", "family": f, "steps": PARITY_STEPS, "clip": CLIPS[f], "kind": "ddp"}
        for f in ("bert", "mt")
    ]
    return one + ddp


def replica_losses(*ranks: dict[str, Any]) -> dict[int, float]:
    """The loss of the whole data-parallel batch: the mean of one rank per replica's (equal-sized) batch losses."""
    return {step: sum(rank["losses"][step] for rank in ranks) / len(ranks) for step in ranks[0]["losses"]}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


class Record(Callback):
    """Per-step loss and (pre-clipping) global gradient norm, the first step's gradients, a batch hash."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.grad_norms: dict[int, float] = {}
        self.first_grads: dict[str, torch.Tensor] = {}
        self.batch_hash = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
        self.batch_hash = hash((self.batch_hash, tuple(first.flatten().tolist())))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        params = [p for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms[trainer.global_step] = float(clip_grad_norm_(params, math.inf))  # measures only
        if trainer.global_step == 0:
            self.first_grads = {n: _full(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


#: The contract rows' techniques, by row id.
ROWS = {case.id: case.build for case in CASES}


def _strategy(run: dict[str, Any], devices: int) -> Any:
    kind, kwargs = run.get("kind", "tp"), run.get("strategy", {})
    if devices == 1:
        return "auto"
    if kind == "ddp":
        return "ddp_find_unused_parameters_true" if kwargs.get("find_unused_parameters") else "ddp"
    return {"tp": TensorParallelStrategy, "fsdp": FullyShardedStrategy}[kind](**kwargs)


def train(run: dict[str, Any], files: dict[str, str], root: Path, devices: int) -> dict[str, Any]:
    """One run: ``family``, ``steps``, ``clip`` (gradient_clip_val or None), ``save_at`` (a step to
    checkpoint at), ``resume`` (a checkpoint path), ``kind`` (``tp``: TensorParallelStrategy, the
    default; ``fsdp``: FullyShardedStrategy; ``ddp``), ``strategy`` (the strategy's kwargs),
    ``techniques`` (contract rows' ids, built with the rows' arguments), ``optimizer`` (``lamb``/``lion``),
    ``shape`` (model overrides), ``batch_size`` (the DataModule's), ``precision``;
    ``expect_error``: the run must fail (its message is recorded). ``devices=1``: the reference."""
    with registered_own_block() if run["family"] == "own" else contextlib.nullcontext():
        return _train(run, files, root, devices)


def _train(run: dict[str, Any], files: dict[str, str], root: Path, devices: int) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model, dm = build(run["family"], files, **run.get("shape", {}))
    record = Record()
    callbacks: list[Callback] = [record]
    if run.get("batch_size"):
        dm.batch_size = run["batch_size"]
    for name in run.get("techniques", []):
        callbacks.insert(0, ROWS[name]())
    if run.get("optimizer"):  # another optimizer instead of the module's own (constant LR)
        optimizer_class = {"lamb": LAMB, "lion": Lion, "adamw": torch.optim.AdamW}[run["optimizer"]]
        if run.get("optimizer_from_yaml"):  # as LightningCLI does for an `optimizer:` block: built before fit
            optimizer = optimizer_class(model.parameters(), lr=1e-3)
            model.configure_optimizers = lambda: optimizer
        else:
            model.configure_optimizers = lambda: optimizer_class(model.parameters(), lr=1e-3)
    if run.get("save_at"):
        callbacks.append(
            ModelCheckpoint(
                dirpath=root / run["name"], filename="{step}", every_n_train_steps=run["save_at"], save_top_k=-1
            )
        )
    trainer = quiet_trainer(
        accelerator="cpu", devices=devices, strategy=_strategy(run, devices), max_steps=run["steps"], limit_val_batches=0,
        precision=run.get("precision", "32-true"),
        gradient_clip_val=run.get("clip"), use_distributed_sampler=False, enable_checkpointing=bool(run.get("save_at")),
        default_root_dir=root / run["name"], callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, dm, ckpt_path=run.get("resume"))
    return {
        "losses": record.losses,
        "grad_norms": record.grad_norms,
        "first_grads": record.first_grads,
        "params": {n: _full(p) for n, p in model.named_parameters()},
        "batch_hash": str(record.batch_hash),
        "steps": trainer.global_step,
        "world_size": trainer.world_size,
        "tied": _tied_names(model),
        "placements": {n: str(p.placements) for n, p in model.named_parameters() if isinstance(p, DTensor)},
    }


def _tied_names(model: nn.Module) -> list[list[str]]:
    """Names of the parameters that are one tensor (e.g. BERT's word embedding and MLM decoder)."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return sorted(names for names in by_id.values() if len(names) > 1)


def main() -> None:
    spec, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)  # two processes on a small machine: more threads only contend
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    results = {}
    for run in spec["runs"]:
        try:
            results[run["name"]] = train(run, spec["files"], out, devices=spec.get("devices", 2))
        except Exception as error:  # reported to the test
            message = f"{type(error).__name__}: {error}"
            if run.get("expect_error"):  # recorded; the next run goes on in the same process group
                results[run["name"]] = {"error": message}
                continue
            (out / f"error_rank{rank}.txt").write_text(message)
            raise
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
