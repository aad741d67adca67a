"""GPU check (issue 27): AMP runs of every technique, CUDA peak memory, and MFU of the main job, in <= 8 minutes.

What it measures, on one CUDA GPU (``benchmarks/gpu_check.sh`` runs it under ``timeout 480`` and prints
the card; the figures and the card go in the README's performance table):

1. ``mfu``: model FLOPs utilisation of the main job (``configs/bert/small_mlm.yaml``: BERT-small MLM,
   batch 32 x 128, masked-only head) in ``bf16-mixed``. Peak: the best of ``--matmul-repeats`` timings
   of back-to-back bf16 ``torch.mm`` of ``--matmul-size`` squared matrices (8192: about 1.1 TFLOP each).
   FLOPs per step: ``benchmarks/mfu.py``'s count (``FlopCounterMode`` around one step's forward and
   backward); the :class:`~lightning_efficient.EfficiencyMonitor`'s count of the same run is recorded
   beside it. Step time: the median of ``--mfu-steps`` steps of ``Trainer.fit`` after ``--mfu-warmup``
   (``benchmarks/harness.py``'s ``StepTimer``: data loading and all Lightning overhead included).
2. ``memory``: ``torch.cuda.max_memory_allocated`` (reset before each run) of ``--memory-steps`` fp32 steps
   of BERT-base MLM, batch 8 x 512: no checkpointing, ``ActivationCheckpointing(every=1)``,
   ``ActivationCheckpointing(every=1, offload=True)``; then optimizer offload, FSDP2 on one GPU
   (``FullyShardedStrategy()`` vs ``FullyShardedStrategy(offload=True)``), "not available" if the
   strategy cannot be imported.
3. ``techniques``: every fragment of ``configs/techniques/*.yaml`` (new fragments are picked up by
   themselves): its ``trainer.callbacks`` entries (and ``optimizer:``, the way the CLI applies it) are
   instantiated with jsonargparse, as ``lightning-efficient fit -c ... -c <fragment>`` would, and
   trained ``--steps`` steps on a small model of the family it suits (BERT-small MLM, the main job's
   model; ViT on 64x64 Fashion-MNIST for the image-size techniques) in fp32, ``bf16-mixed`` and
   ``16-mixed``, each from the same seed. Recorded: the final loss (mean of the last 5 steps), whether
   any loss or trained weight is NaN/inf, and |loss_amp - loss_fp32| / loss_fp32 against ``--tolerance``
   (5%; below a loss of 1, the absolute difference: see :data:`TOLERANCE`).
   Schedules written for runs of hundreds of steps are shortened to fit (:data:`SHORT_RUN`). A
   fragment that fails records its error; the others go on. Fragments with nothing to run on one
   GPU (a precision, a multi-device strategy) are listed as skipped, with the reason.

The parts run in that order (the timing-sensitive MFU first, before the other runs have used the
GPU; the memory runs before the many short technique runs, whose number the time budget limits); each prints its
progress with timings, and the results are rewritten to ``--out``/``gpu_check.json`` and
``gpu_check.md`` after every part, so a run stopped by the timeout keeps what it measured.
Techniques not started within ``--time-budget`` seconds of the start are recorded as skipped.

Commands::

    bash benchmarks/gpu_check.sh --out runs/gpu_check        # on a CUDA machine, <= 8 minutes on an H100
    python -m benchmarks.gpu_check --device cpu --smoke       # CPU smoke run: tiny models, code paths only

``--smoke`` (for a machine without a GPU): tiny BERT and ViT, 10 steps, fp32 and bf16-mixed only; the
memory part is recorded as "skipped: no CUDA" and the MFU part runs on the CPU at tiny sizes (its
figure means nothing; it checks the code). Without ``--smoke`` the check refuses to run on the CPU.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
import yaml

from benchmarks.harness import LightningJob, Variant, benchmark_trainer, run_variant, setup
from benchmarks.jobs import MAIN_JOB, mlm_arguments, mlm_data, mlm_job_line, mlm_module
from benchmarks.mfu import count_step_flops
from lightning_efficient import (
    EfficiencyMonitor,
    FullyShardedStrategy,
    ImageClassificationDataModule,
    MLMDataModule,
    ViTClassifier,
)
from lightning_efficient.callbacks.activation_checkpointing import ActivationCheckpointing

ROOT = Path(__file__).resolve().parents[1]
FRAGMENTS = ROOT / "configs" / "techniques"
FP32, BF16, FP16 = "32-true", "bf16-mixed", "16-mixed"
GIB = 2**30
NONE, FSDP, FSDP_OFFLOAD = "none", "FSDP2 (1 GPU)", "FSDP2 (1 GPU), CPU offload"  # memory variants
LAST_STEPS = 5  # the final loss is the mean of the last 5 steps' losses (one step's loss is noisier)

# Techniques that act on what only a ViT has (image sizes); every other fragment runs on BERT MLM.
# The same split as the families of their rows in tests/techniques.py (CASES).
VIT_ONLY = frozenset({"ProgressiveResizing", "AutoProg"})

# Tolerance of |loss_amp - loss_fp32| / loss_fp32 after a short run. Both runs start from the same
# weights and see the same batches, masks and dropout draws: only rounding differs (bf16 keeps 8
# significant bits, fp16 11; weights and optimizer state stay fp32), and an fp16 run whose loss scaler
# skips its first step or two lags by that much. Over 20 steps that should move the final loss by a
# percent or two; 5% leaves room for it and still catches what breaks under AMP: a technique that stops
# training (its loss stays near ln(vocab), ~10.3, while the fp32 run's falls) or diverges. The JSON keeps
# every difference: the first GPU run shows the real margins.
TOLERANCE = 0.05
# Below a loss of 1 the difference is taken relative to 1 (absolute): a loss near 0, e.g. distillation's
# MSE to a teacher that starts as a copy of the student, makes a relative difference meaningless.
LOSS_FLOOR = 1.0


@dataclass(frozen=True)
class RunShape:
    """What the short-run schedule overrides depend on: the run's steps, the model's depth, the loader's batch."""

    steps: int
    layers: int
    batch_size: int


def _pruning(shape: RunShape) -> dict[str, Any]:
    """MagnitudePruning's events from 20% to 80% of the run (fragments: steps 20-150, 300-2000)."""
    start = shape.steps // 5
    end = max(start, shape.steps - 1 - shape.steps // 5)  # the last event must come before the run's last step
    return {"start_step": start, "end_step": end, "frequency": max(1, (end - start) // 4)}


# Per callback class: the init_args that replace a fragment's schedule (written for runs of hundreds or
# thousands of steps) so that it plays out within a short run; everything else stays the fragment's.
SHORT_RUN: dict[str, Callable[[RunShape], dict[str, Any]]] = {
    "MagnitudePruning": _pruning,
    "DynamicSparsity": lambda s: {  # RigL/SET: updates every fifth of the run, the last before its end
        "update_every": max(1, s.steps // 5),
        "end_step": max(1, s.steps // 5, s.steps - 1 - s.steps // 5),
    },
    "LotteryTicket": lambda s: {"rewind_step": s.steps // 4},  # fragment: step 20, the whole of a short run
    # ProgressiveStacking: from half the blocks (rounded up: a stage at most doubles) to all at mid-run.
    "ProgressiveStacking": lambda s: {"stages": {0: (s.layers + 1) // 2, max(1, s.steps // 2): s.layers}},
    # AutoProg: one search (1 step per candidate) from step 1, the full model for the last step; the
    # depths end at the model's (the fragment's [2, 4] is small_fashion_64's 4 blocks).
    "AutoProg": lambda s: {
        "stages": [0, 1, s.steps - 1],
        "depths": [max(1, s.layers // 2), s.layers],
        "search_steps": 1,
    },
    "TrustRatioMonitor": lambda s: {"every_n_steps": max(1, s.steps // 4)},  # fragments: every 10 or 50 steps
    # Pools of 3x the trained batch, as in benchmarks/importance_sampling.py (the fragment's 32 is the pool itself).
    "ImportanceSampling": lambda s: {"batch_size": max(1, s.batch_size // 3)},
    # Distillation: the fragments' teacher is a placeholder path to set; "self" copies the student. The
    # cache follows the model (auto): distillation_augmented's cache of one output per example is for
    # classifiers, and BertMLM, whose masked tokens change every step, refuses it.
    "Distillation": lambda s: {"teacher": "self", "cache": "auto"},
}


# -- the fragments -------------------------------------------------------------------------------
@dataclass
class Fragment:
    """What a ``configs/techniques/`` fragment asks for, as this check applies it.

    Attributes:
        name: The file's stem, e.g. ``"layer_drop"``.
        callbacks: Its ``trainer.callbacks+`` entries (``class_path`` / ``init_args``).
        optimizer: Its ``optimizer:`` entry, or None.
        not_applied: Its other settings, which this check leaves out (``"data"``, ``"trainer.precision"``, ...).
    """

    name: str
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    optimizer: dict[str, Any] | None = None
    not_applied: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        """Short class names of its callbacks and optimizer."""
        entries = [*self.callbacks, *([self.optimizer] if self.optimizer else [])]
        return [str(entry["class_path"]).rsplit(".", 1)[-1] for entry in entries]

    @property
    def family(self) -> str:
        """``"vit"`` for a technique on image sizes, else ``"bert"``."""
        return "vit" if VIT_ONLY & set(self.classes) else "bert"

    @property
    def skip_reason(self) -> str | None:
        """Why it has nothing to run on one GPU (no callback, no optimizer), or None."""
        if self.callbacks or self.optimizer:
            return None
        reason = f"skipped: no callback or optimizer to run; it sets {', '.join(self.not_applied)}"
        if self.not_applied == ["trainer.precision"]:
            reason += " (the precision columns of every technique cover it)"
        elif "trainer.strategy" in self.not_applied:
            reason += " (a strategy over several devices; FSDP2's one-GPU offload is in the memory part)"
        return reason


def read_fragment(text: str, name: str) -> Fragment:
    """Parse a fragment's YAML into what this check runs (:class:`Fragment`).

    Examples:
        >>> fragment = read_fragment(
        ...     "optimizer: {class_path: lightning_efficient.optim.Lion}\\n"
        ...     "trainer: {max_steps: 50, callbacks+: [{class_path: lightning_efficient.callbacks.LRScaling}]}",
        ...     "lion",
        ... )
        >>> fragment.classes, fragment.not_applied, fragment.family, fragment.skip_reason
        (['LRScaling', 'Lion'], ['trainer.max_steps'], 'bert', None)
        >>> read_fragment("trainer: {precision: bf16-mixed}", "bf16_mixed").skip_reason
        'skipped: no callback or optimizer to run; it sets trainer.precision (the precision columns of every technique cover it)'
    """
    config = yaml.safe_load(text) or {}
    trainer = dict(config.get("trainer") or {})
    callbacks = list(trainer.pop("callbacks+", None) or []) + list(trainer.pop("callbacks", None) or [])
    optimizer = config.get("optimizer")
    not_applied = [f"trainer.{key}" for key in trainer] + [key for key in config if key not in ("trainer", "optimizer")]
    return Fragment(name, callbacks, optimizer, not_applied)


def fragments(only: list[str] | None = None) -> list[Fragment]:
    """Every fragment of ``configs/techniques/``, by name (``only``: those names)."""
    paths = sorted(FRAGMENTS.glob("*.yaml"))
    if only:
        unknown = sorted(set(only) - {path.stem for path in paths})
        if unknown:
            raise SystemExit(f"--only {' '.join(unknown)}: no such fragment in {FRAGMENTS}")
        paths = [path for path in paths if path.stem in only]
    return [read_fragment(path.read_text(encoding="utf-8"), path.stem) for path in paths]


def with_short_run(entry: dict[str, Any], shape: RunShape) -> dict[str, Any]:
    """A copy of a callback entry with :data:`SHORT_RUN`'s overrides of its class for a run of ``shape``.

    Examples:
        >>> entry = {"class_path": "lightning_efficient.callbacks.LotteryTicket", "init_args": {"rewind_step": 20}}
        >>> with_short_run(entry, RunShape(steps=20, layers=4, batch_size=32))["init_args"]
        {'rewind_step': 5}
    """
    name = str(entry["class_path"]).rsplit(".", 1)[-1]
    init_args = {**(entry.get("init_args") or {}), **(SHORT_RUN[name](shape) if name in SHORT_RUN else {})}
    return {**entry, "init_args": init_args}


def instantiate_callbacks(entries: list[dict[str, Any]]) -> list[pl.Callback]:
    """The callbacks of ``class_path`` / ``init_args`` entries, built by jsonargparse as LightningCLI builds them."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[pl.Callback])
    return list(parser.instantiate(parser.parse_object({"callbacks": entries})).callbacks)


def use_optimizer(module: pl.LightningModule, entry: dict[str, Any]) -> None:
    """Make ``module`` train with the optimizer of a fragment's ``optimizer:``, as ``EfficientCLI`` does.

    LightningCLI builds the optimizer on ``module.parameters()``; EfficientCLI keeps our modules'
    warmup-and-decay schedule when the YAML gives no ``lr_scheduler:``.
    """
    from lightning.pytorch.cli import instantiate_class

    from lightning_efficient.cli import EfficientCLI

    def configure_optimizers() -> Any:
        return EfficientCLI.configure_optimizers(module, instantiate_class(module.parameters(), entry))

    module.configure_optimizers = configure_optimizers  # type: ignore[method-assign]


# -- models and data -----------------------------------------------------------------------------
@dataclass
class Jobs:
    """The data (set up once, shared by every run) and model builders of the check."""

    args: argparse.Namespace
    mlm: MLMDataModule
    images: ImageClassificationDataModule
    bert_shape: dict[str, Any]
    vit_shape: dict[str, Any]

    def bert(self) -> pl.LightningModule:
        """The main job's BertMLM (``--preset``; ``configs/bert/small_mlm.yaml``'s training settings)."""
        return mlm_module(self.mlm.vocab_size, self.args, **MAIN_JOB, **self.bert_shape)

    def vit(self) -> pl.LightningModule:
        """``configs/vit/small_fashion_64.yaml``'s ViT (tiny with ``--smoke``), on 64x64 images."""
        return ViTClassifier(num_labels=10, learning_rate=1e-3, lr_schedule="cosine", **self.vit_shape)

    def build(self, family: str) -> tuple[pl.LightningModule, pl.LightningDataModule]:
        """A fresh model of ``family`` (``"bert"`` or ``"vit"``) and its shared data."""
        return (self.bert(), self.mlm) if family == "bert" else (self.vit(), self.images)


def build_jobs(args: argparse.Namespace) -> Jobs:
    """Set up the MLM data (tokenizer trained or cached) and the 64x64 Fashion-MNIST data."""
    mlm = mlm_data(args)
    images = ImageClassificationDataModule(batch_size=8 if args.smoke else 64, resize_to=64)
    images.setup("fit")
    # --smoke: the tiny preset with an FFN of 64 (the preset's odd 37 is no multiple of qat_int4's groups of 32);
    # the ViT's patches of 8 keep 64 of them (and divide the resizing fragments' sides 32 and 48).
    bert_shape: dict[str, Any] = {"ffn_size": 64} if args.smoke else {}
    vit_shape: dict[str, Any] = {
        "preset": "small",
        "hidden_size": 128,
        "ffn_size": 512,
        "image_size": 64,
        "patch_size": 4,
    }
    if args.smoke:
        vit_shape = {"preset": "tiny", "ffn_size": 64, "image_size": 64, "patch_size": 8}
    return Jobs(args, mlm, images, bert_shape, vit_shape)


def depth(module: pl.LightningModule) -> int:
    """Blocks per stack of one of our modules."""
    from lightning_efficient.blocks import find_block_stacks

    return len(find_block_stacks(module)[0].blocks)


def free_device_memory() -> None:
    """Collect garbage and return cached CUDA blocks, so that one run's leftovers do not count in the next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- part 1: MFU of the main job -----------------------------------------------------------------
def matmul_peak(device: str, dtype: torch.dtype, size: int, repeats: int, calls: int = 10) -> float:
    """Best FLOP/s of ``calls`` back-to-back square ``torch.mm`` of ``size`` (one warmup, ``repeats`` timings).

    Examples:
        >>> matmul_peak("cpu", torch.float32, size=64, repeats=2, calls=2) > 0
        True
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty_like(a)
    best = math.inf
    for attempt in range(repeats + 1):  # the first timing warms up (kernel choice, clocks) and is dropped
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        if attempt:
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 * calls / best


def mfu_part(jobs: Jobs, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """MFU of the main job in bf16-mixed against a measured bf16 matmul peak."""
    size = 256 if args.smoke else args.matmul_size
    peak = matmul_peak(args.device, torch.bfloat16, size, args.matmul_repeats, calls=2 if args.smoke else 10)
    print(f"  bf16 matmul peak ({size}^3): {peak / 1e12:.1f} TFLOP/s")
    batch = next(iter(jobs.mlm.train_dataloader()))
    flops, _ = count_step_flops(jobs.bert(), batch, args.seed)  # benchmarks/mfu.py's count, on the CPU
    monitor = EfficiencyMonitor(peak_flops=peak)
    trainer_kwargs = {"accelerator": args.device, "precision": BF16, "default_root_dir": str(root / "mfu")}
    variant = Variant("main job", lambda: LightningJob(jobs.bert(), jobs.mlm, [monitor], trainer_kwargs), args.seed)
    times = run_variant(variant, args.mfu_steps, args.mfu_warmup)
    step = statistics.median(times)
    monitor_flops = float(monitor.summary["flops_per_step"]) if monitor.summary else None
    tokens = args.batch_size * args.max_length
    result = {
        "job": mlm_job_line(jobs.args, jobs.mlm.vocab_size) + ", bf16-mixed",
        "peak_flops_per_s": peak,
        "peak_matmul_size": size,
        "flops_per_step": flops,
        "monitor_flops_per_step": monitor_flops,
        "median_step_s": step,
        "steps": len(times),
        "tokens_per_s": tokens / step,
        "achieved_flops_per_s": flops / step,
        "mfu": flops / step / peak,
    }
    print(
        f"  FLOPs per step {flops / 1e9:.1f} GFLOP (EfficiencyMonitor: {(monitor_flops or 0) / 1e9:.1f}), "
        f"median step {step * 1e3:.1f} ms, {tokens / step:,.0f} tokens/s: MFU {result['mfu']:.1%}"
    )
    return result


# -- part 2: CUDA peak memory --------------------------------------------------------------------
def peak_memory(name: str, build: Callable[[], LightningJob], steps: int) -> dict[str, Any]:
    """``torch.cuda.max_memory_allocated`` over ``steps`` steps of a fresh job; an error is recorded, not raised."""
    free_device_memory()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        job = build()
        trainer = benchmark_trainer(max_steps=steps, accelerator="cuda", callbacks=job.callbacks, **job.trainer_kwargs)
        trainer.fit(job.module, job.data)
        record: dict[str, Any] = {"peak_bytes": int(torch.cuda.max_memory_allocated())}
    except Exception as error:  # noqa: BLE001  (one failing variant must not stop the others)
        traceback.print_exc()
        record = {"error": _one_line(error)}
    record["seconds"] = time.perf_counter() - start
    shown = f"{record['peak_bytes'] / GIB:.2f} GiB" if "peak_bytes" in record else record["error"]
    print(f"  {name}: {shown} ({record['seconds']:.0f} s)")
    free_device_memory()
    return record


def memory_part(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Peak CUDA memory of BERT-base MLM (8 x 512, fp32): activation checkpointing and optimizer offload."""
    shape = argparse.Namespace(**{**vars(args), "preset": "base", "batch_size": args.memory_batch_size,
                                  "max_length": args.memory_length})  # fmt: skip
    data = mlm_data(shape)
    job = f"BERT-base MLM, batch {shape.batch_size} x {shape.max_length}, fp32, {args.memory_steps} steps"
    print(f"  {job}")

    def build(callbacks: list[pl.Callback], strategy: Callable[[], Any] | None = None) -> Callable[[], LightningJob]:
        def make() -> LightningJob:
            pl.seed_everything(args.seed, verbose=False)
            kwargs: dict[str, Any] = {"default_root_dir": str(root / "memory")}
            if strategy is not None:
                kwargs.update(strategy=strategy(), devices=1)
            return LightningJob(mlm_module(data.vocab_size, shape, **MAIN_JOB), data, callbacks, kwargs)

        return make

    variants = {
        NONE: build([]),
        "checkpointing every=1": build([ActivationCheckpointing(every=1)]),
        "checkpointing every=1, offload": build([ActivationCheckpointing(every=1, offload=True)]),
    }
    # optimizer offload: FSDP2 on one GPU, without and with CPU offload
    variants[FSDP] = build([], FullyShardedStrategy)
    variants[FSDP_OFFLOAD] = build([], functools.partial(FullyShardedStrategy, offload=True))
    runs = {name: peak_memory(name, make, args.memory_steps) for name, make in variants.items()}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # FSDP2's one-process group: the technique runs are single-device
    base = runs[NONE].get("peak_bytes")
    for record in runs.values():
        if base and "peak_bytes" in record:
            record["ratio_to_none"] = record["peak_bytes"] / base
    fsdp, offloaded = runs[FSDP].get("peak_bytes"), runs[FSDP_OFFLOAD].get("peak_bytes")
    if fsdp and offloaded:
        runs[FSDP_OFFLOAD]["ratio_to_fsdp"] = offloaded / fsdp
    return {"job": job, "memory_kind": "torch.cuda.max_memory_allocated", "runs": runs}


# -- part 3: every technique under AMP -----------------------------------------------------------
class LossRecorder(pl.Callback):
    """Records every training step's loss (a float: one device sync per step, fine for a short run)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self.losses.append(float(loss.detach()))


def train_fragment(fragment: Fragment, precision: str, jobs: Jobs, args: argparse.Namespace, root: Path) -> dict:
    """One short fit of ``fragment``'s technique in ``precision``: final loss, NaN/inf, or the error."""
    start = time.perf_counter()
    try:
        pl.seed_everything(args.seed, verbose=False)
        module, data = jobs.build(fragment.family)
        shape = RunShape(args.steps, depth(module), data.batch_size)
        callbacks = instantiate_callbacks([with_short_run(entry, shape) for entry in fragment.callbacks])
        if fragment.optimizer:
            use_optimizer(module, fragment.optimizer)
        recorder = LossRecorder()
        trainer = benchmark_trainer(max_steps=args.steps, accelerator=args.device, precision=precision,
                                    default_root_dir=str(root / fragment.name / precision),
                                    callbacks=[*callbacks, recorder])  # fmt: skip
        pl.seed_everything(args.seed, verbose=False)  # same batches and draws whatever the build consumed
        trainer.fit(module, data)
        losses = recorder.losses
        trained = [p for p in module.parameters() if p.requires_grad]  # a frozen int8 base has no isfinite
        finite_weights = all(bool(torch.isfinite(p).all()) for p in trained)
        last = losses[-LAST_STEPS:]
        record: dict[str, Any] = {
            "final_loss": statistics.fmean(last) if last else None,
            "steps": len(losses),
            "non_finite": not (last and all(math.isfinite(x) for x in losses) and finite_weights),
        }
    except Exception as error:  # noqa: BLE001  (a failing technique must not stop the others)
        traceback.print_exc()
        record = {"error": _one_line(error)}
    record["seconds"] = time.perf_counter() - start
    free_device_memory()
    return record


def compare(runs: dict[str, dict[str, Any]], tolerance: float) -> str:
    """Add each AMP run's relative loss difference to fp32 and its verdict; return the fragment's verdict.

    The difference is ``|loss_amp - loss_fp32| / max(loss_fp32, LOSS_FLOOR)``.

    Examples:
        >>> runs = {"32-true": {"final_loss": 8.0, "non_finite": False},
        ...         "bf16-mixed": {"final_loss": 8.2, "non_finite": False}}
        >>> compare(runs, tolerance=0.05), round(runs["bf16-mixed"]["relative_difference"], 3)
        ('ok', 0.025)
        >>> runs["bf16-mixed"]["final_loss"] = 9.0
        >>> compare(runs, tolerance=0.05)
        'FAIL'
    """
    reference = runs.get(FP32, {})
    for precision, record in runs.items():
        if "error" in record:
            record["verdict"] = "error"
        elif record["non_finite"]:
            record["verdict"] = "NaN/inf"
        elif precision == FP32 or "final_loss" not in reference or reference.get("non_finite"):
            record["verdict"] = "ok" if precision == FP32 else "no fp32 reference"
        else:
            difference = abs(record["final_loss"] - reference["final_loss"])
            record["relative_difference"] = difference / max(abs(reference["final_loss"]), LOSS_FLOOR)
            record["verdict"] = "ok" if record["relative_difference"] <= tolerance else "FAIL"
    return "ok" if all(record["verdict"] == "ok" for record in runs.values()) else "FAIL"


def techniques_part(jobs: Jobs, args: argparse.Namespace, root: Path, started: float) -> dict[str, Any]:
    """Every fragment in every precision (fp32 first, the reference); errors and skips recorded."""
    results: dict[str, Any] = {}
    for fragment in fragments(args.only):
        entry: dict[str, Any] = {"classes": fragment.classes, "family": fragment.family}
        if fragment.not_applied:
            entry["not_applied"] = fragment.not_applied
        if fragment.skip_reason:
            entry["verdict"] = fragment.skip_reason
            results[fragment.name] = entry
            print(f"  {fragment.name}: {fragment.skip_reason}")
            continue
        if time.perf_counter() - started > args.time_budget:
            entry["verdict"] = f"skipped: time budget of {args.time_budget:.0f} s spent"
            results[fragment.name] = entry
            print(f"  {fragment.name}: {entry['verdict']}")
            continue
        runs = {precision: train_fragment(fragment, precision, jobs, args, root) for precision in args.precisions}
        entry["runs"] = runs
        entry["verdict"] = compare(runs, args.tolerance)
        results[fragment.name] = entry
        print(f"  {fragment.name} ({fragment.family}): {entry['verdict']}; " + "; ".join(
            f"{precision} {_cell(record)}" for precision, record in runs.items()
        ))  # fmt: skip
    return {"steps": args.steps, "precisions": args.precisions, "tolerance": args.tolerance, "fragments": results}


# -- output ----------------------------------------------------------------------------------------
def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def _cell(record: dict[str, Any]) -> str:
    if "error" in record:
        return f"error: {record['error']}"
    loss = record.get("final_loss")
    text = f"{loss:.4f}" if loss is not None else "-"
    if "relative_difference" in record:
        text += f" ({record['relative_difference']:.1%})"
    return text + (" NaN/inf" if record.get("non_finite") else "")


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown tables (what goes in the README's performance table)."""
    lines = [f"# GPU check: {result['device_name']}", "",
             f"torch {result['torch']}, {result['date']}, {result['seconds']:.0f} s in all", ""]  # fmt: skip
    mfu = result.get("mfu")
    if isinstance(mfu, dict) and "mfu" in mfu:
        row = (
            f"| {mfu['job']} | {mfu['peak_flops_per_s'] / 1e12:.1f} TFLOP/s | {mfu['flops_per_step'] / 1e9:.1f} | "
            f"{mfu['median_step_s'] * 1e3:.1f} ms | {mfu['tokens_per_s']:,.0f} | {mfu['mfu']:.1%} |"
        )
        header = "| job | bf16 matmul peak | GFLOP/step | step | tokens/s | MFU |"
        lines += ["## MFU of the main job", "", header, "|---|---|---|---|---|---|", row, ""]
    elif mfu is not None:
        lines += ["## MFU of the main job", "", str(mfu), ""]
    memory = result.get("memory")
    if isinstance(memory, dict) and "runs" in memory:
        lines += ["## CUDA peak memory", "", f"{memory['job']}; `{memory['memory_kind']}`", "",
                  "| variant | peak (GiB) | ratio to none |", "|---|---|---|"]  # fmt: skip
        for name, record in memory["runs"].items():
            peak = f"{record['peak_bytes'] / GIB:.2f}" if "peak_bytes" in record else record.get("error", "-")
            ratio = f"{record['ratio_to_none']:.2f}" if "ratio_to_none" in record else "-"
            lines.append(f"| {name} | {peak} | {ratio} |")
        lines.append("")
    elif memory is not None:
        lines += ["## CUDA peak memory", "", str(memory), ""]
    techniques = result.get("techniques")
    if isinstance(techniques, dict):
        precisions = techniques["precisions"]
        note = (
            f"{techniques['steps']} steps each; final loss = mean of the last {LAST_STEPS} steps; "
            f"(x%): |amp - fp32| / fp32, tolerance {techniques['tolerance']:.0%}"
        )
        header = "| fragment | family | " + " | ".join(precisions) + " | verdict |"
        lines += ["## Techniques under AMP", "", note, "", header, "|---|---|" + "---|" * len(precisions) + "---|"]
        for name, entry in techniques["fragments"].items():
            runs = entry.get("runs", {})
            cells = [_cell(runs[p]) if p in runs else "-" for p in precisions]
            lines.append(f"| {name} | {entry['family']} | " + " | ".join(cells) + f" | {entry['verdict']} |")
        lines.append("")
    return "\n".join(lines)


def write_results(out: Path, result: dict[str, Any]) -> None:
    """Write ``gpu_check.json`` and ``gpu_check.md`` to ``out`` (called after every part)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown(result) + "\n", encoding="utf-8")


# -- main --------------------------------------------------------------------------------------------
PARTS = ("mfu", "memory", "techniques")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults fit in 8 minutes on one H100."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu only with --smoke")
    parser.add_argument("--smoke", action="store_true", help="tiny models, few steps, fp32 + bf16: checks the code")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="gpu_check.json and .md go here")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--only", nargs="+", default=None, help="technique fragments (file stems) to run; default all")
    parser.add_argument("--steps", type=int, default=None, help="steps of each technique run (default 20; smoke 10)")
    parser.add_argument("--precisions", nargs="+", default=None, choices=(FP32, BF16, FP16),
                        help=f"default {FP32} {BF16} {FP16}; smoke {FP32} {BF16}; {FP32} is the reference")  # fmt: skip
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="max |loss_amp - loss_fp32| / loss_fp32")
    parser.add_argument("--time-budget", type=float, default=400.0, help="seconds after which no technique starts")
    parser.add_argument("--memory-batch-size", type=int, default=8)
    parser.add_argument("--memory-length", type=int, default=512)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--mfu-steps", type=int, default=30, help="timed steps of the main job")
    parser.add_argument("--mfu-warmup", type=int, default=10, help="untimed steps before them")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the bf16 peak matmuls")
    parser.add_argument("--matmul-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    mlm_arguments(parser)  # the main job's options: --preset small --batch-size 32 --max-length 128 ...
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        parser.error("--device cpu runs only with --smoke: the GPU check measures CUDA (AMP, peak memory, MFU)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run this check on a CUDA GPU, or use --device cpu --smoke to test the code")
    if args.smoke:
        args.preset = "tiny"
        args.steps = args.steps or 10
        args.precisions = args.precisions or [FP32, BF16]
        args.mfu_steps, args.mfu_warmup = min(args.mfu_steps, 2), min(args.mfu_warmup, 1)
    args.steps = args.steps or 20
    args.precisions = args.precisions or [FP32, BF16, FP16]
    if FP32 not in args.precisions:
        args.precisions = [FP32, *args.precisions]  # the reference of every comparison
    args.precisions = sorted(set(args.precisions), key=[FP32, BF16, FP16].index)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the parts in order, printing progress; returns the results (also written to ``--out``)."""
    started = time.perf_counter()
    args = setup(parse_args(argv))
    torch.set_float32_matmul_precision("highest")  # the fp32 reference runs are true fp32, not TF32
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke run)"
    result: dict[str, Any] = {"device": args.device, "device_name": device_name, "torch": torch.__version__,
                              "date": time.strftime("%Y-%m-%d %H:%M"), "smoke": args.smoke, "seconds": 0.0,
                              "part_seconds": {}}  # fmt: skip
    print(f"GPU check on {device_name}, torch {torch.__version__}; parts: {', '.join(args.parts)}")
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        jobs = build_jobs(args)
        print(f"data ready ({time.perf_counter() - started:.0f} s): {mlm_job_line(args, jobs.mlm.vocab_size)}")
        for part in args.parts:
            part_start = time.perf_counter()
            print(f"part {part}:")
            if part == "memory" and args.device != "cuda":
                result[part] = "skipped: no CUDA"
                print(f"  {result[part]}")
            elif part == "memory":
                result[part] = memory_part(args, root)
            elif part == "mfu":
                result[part] = mfu_part(jobs, args, root)
            else:
                result[part] = techniques_part(jobs, args, root, started)
            result["part_seconds"][part] = time.perf_counter() - part_start
            result["seconds"] = time.perf_counter() - started
            print(f"part {part} took {result['part_seconds'][part]:.0f} s ({result['seconds']:.0f} s so far)")
            write_results(args.out, result)
    print(f"results in {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return result


if __name__ == "__main__":
    main()
