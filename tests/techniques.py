"""The technique table that the contract suite (``test_contract.py``) runs, one row per technique.

A technique issue registers its callback by appending a :class:`TechniqueCase` to :data:`CASES`
(and its YAML fragment to ``configs/techniques/``); ``test_contract.py`` fails while a technique
exported by the package has no row. The suite then checks, for every row: it fits on the tiny
BERT, MT and ViT models; the YAML fragment instantiates it through the CLI; it deep-copies and
pickles; a run interrupted at each of ``interrupt_at`` and resumed equals the uninterrupted run
exactly (weights, optimizer, LR schedule, technique state, RNG, losses); it refuses a model it
cannot act on; it stays finite under bf16 and fp16 mixed precision; it composes with every other
row (or fails with a clear error if they declare a conflict); and rows whose technique is
``distributed_safe`` run on DDP with 2 CPU processes.

The first two rows are the reference technique of :mod:`lightning_efficient.testing` and a
variant of it, so that the pairwise tests always have a pair.
"""

# -- test-time budget (issue 19; every later technique issue keeps it) -------------------------
# The README's test command (the whole suite) stays under 30 minutes on 2 cores; a technique issue
# adds at most ~2 minutes in all. Its contract row should cost at most ~5 s in test_contract.py on
# an idle 2-core machine (rows measured ~3 s each at issue 19: whole file 40 s, of which 10 s is
# the shared DDP start-up). What keeps the contract suite linear in the rows:
# - Train + resume for pairs only on a fixed set: every row with ``layer_drop`` and with
#   ``pruning`` (test_contract.FIXED_PAIR_PARTNERS), and every row under ``bf16-mixed``. All other
#   pairs get the cheap composition check (``check_composition``, attach both, forward/backward,
#   detach both; no Trainer): ~0.02 s a pair.
# - All DDP rows share one 2-process run (``ddp_worker.py``); each row adds one 3-step fit to it.
# - Models are the ``tiny`` preset (hidden 32, 3 layers, FFN 37), sequences of 33-40 tokens,
#   epochs of 4 steps, runs of at most 8 steps. A new row should not raise ``steps`` or add
#   families or ``interrupt_at`` points beyond its schedule's transitions.
# Check on an idle machine (under CPU contention torch's threads slow these fits 5-10x):
# ``pytest -p no:cacheprovider tests/test_contract.py --durations=25 -q``; no test of one row over
# ~2 s, and the file's total before and after your row.

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import peft
import torch
from torch import nn

from lightning_efficient import (
    BertMLM,
    ConfigurationError,
    ImageClassificationDataModule,
    MLMDataModule,
    Technique,
    Translation,
    TranslationDataModule,
    ViTClassifier,
    callbacks,
)
from lightning_efficient.testing import BlockOutputNoise

FAMILIES = ("bert", "mt", "vit")
TECHNIQUE_CONFIGS = Path(__file__).parents[1] / "configs" / "techniques"


class FirstBlockNoise(BlockOutputNoise):
    """A second reference technique (noise on the first block of each stack only)."""

    name = "first_block_noise"

    def apply(self, pl_module: nn.Module) -> list[Any]:
        from lightning_efficient.blocks import find_block_stacks

        return [
            stack.blocks[0].register_forward_hook(self._hook)
            for stack in find_block_stacks(pl_module, self.block_paths)
        ]


class BlocklessModule(pl.LightningModule):
    """A model with no Transformer block stack: techniques acting on blocks must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).pow(2).mean()

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@dataclass(frozen=True)
class TechniqueCase:
    """One row of the contract suite.

    Attributes:
        id: The row's name in test ids.
        build: Returns a fresh technique with the row's arguments.
        yaml: A LightningCLI config fragment that appends the technique to ``trainer.callbacks``
            (``trainer: {callbacks+: [...]}``): the content of its ``configs/techniques/`` file.
        families: Model families it must fit on (``bert``, ``mt``, ``vit``).
        resume_family: The family the interrupt/resume runs use.
        (The pairwise, precision, copy and DDP tests run on :attr:`base_family`: BERT, or the first of
        ``families`` for a technique that acts on what only another family has, e.g. image sizes.)
        interrupt_at: Optimizer steps after which a run is interrupted and resumed: include a
            mid-epoch step and each schedule transition (the suite's epochs are 4 steps long).
        steps: Length of the uninterrupted run.
        unsupported: Builds a model the technique must refuse (None: it works on any model).
        expected_error: The error type raised on ``unsupported``.
        strategies: The sharded strategies the technique is declared to compose with, of ``tp``
            (:class:`~lightning_efficient.strategies.TensorParallelStrategy`), ``fsdp``
            (:class:`~lightning_efficient.strategies.FullyShardedStrategy`) and ``2d`` (both at once);
            ``test_fully_sharded.py`` checks the declaration against the strategies' ``composes_with``
            and trains the ``fsdp`` and ``2d`` rows there against DDP on gloo (DDP itself:
            ``Technique.distributed_safe``).
        extra: Anything else a test needs: ``ddp_strategy`` (the DDP strategy string, default ``"ddp"``).
    """

    id: str
    build: Callable[[], Technique]
    yaml: str
    families: tuple[str, ...] = FAMILIES
    resume_family: str = "bert"
    interrupt_at: tuple[int, ...] = (3, 4, 6)
    steps: int = 8
    unsupported: Callable[[], pl.LightningModule] | None = BlocklessModule
    expected_error: type[Exception] = ValueError
    strategies: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_family(self) -> str:
        """The family of the pairwise, precision, copy and DDP tests: ``bert`` when the row runs on it."""
        return "bert" if "bert" in self.families else self.families[0]


def common_family(a: TechniqueCase, b: TechniqueCase) -> str | None:
    """The family two rows are tested together on: ``bert`` when both run on it, else one both run on, or None."""
    shared = [family for family in FAMILIES if family in a.families and family in b.families]
    return "bert" if "bert" in shared else (shared[-1] if shared else None)


def noise_yaml(class_path: str, std: float, start_step: int) -> str:
    """The CLI fragment of a reference-noise row: the technique appended to ``trainer.callbacks``."""
    return f"""
trainer:
  callbacks+:
    - class_path: {class_path}
      init_args:
        std: {std}
        start_step: {start_step}
"""


CASES: list[TechniqueCase] = [
    TechniqueCase(
        id="block_noise",
        build=lambda: BlockOutputNoise(std=0.05, start_step=3, seed=1),
        yaml=noise_yaml("lightning_efficient.testing.BlockOutputNoise", std=0.05, start_step=3),
        strategies=("fsdp",),
    ),
    TechniqueCase(
        id="first_block_noise",
        build=lambda: FirstBlockNoise(std=0.1, start_step=5, seed=2),
        yaml=noise_yaml("techniques.FirstBlockNoise", std=0.1, start_step=5),
        families=("bert",),
        interrupt_at=(5,),
    ),
    TechniqueCase(
        id="lr_scaling",  # batch 8 (ViT: 16) vs reference 4, sqrt rule; warmup over steps 0-2
        build=lambda: callbacks.LRScaling(reference_batch_size=4, rule="sqrt", warmup_steps=3),
        yaml=(TECHNIQUE_CONFIGS / "lr_scaling.yaml").read_text(),
        interrupt_at=(2, 3, 6),  # mid-warmup, at its end, mid-epoch after it
        unsupported=None,
        strategies=("tp", "fsdp", "2d"),
    ),
    TechniqueCase(
        id="trust_ratio",  # reports after optimizer steps 2, 4, 6, 8
        build=lambda: callbacks.TrustRatioMonitor(every_n_steps=2, include_1d=True),
        yaml=(TECHNIQUE_CONFIGS / "trust_ratio_monitor.yaml").read_text(),
        interrupt_at=(3, 4, 6),  # between reports (mid-epoch), right after one (epoch end)
        unsupported=None,
        strategies=("tp", "fsdp", "2d"),
    ),
    TechniqueCase(
        id="layer_drop",  # PLD: theta falls from 1 towards 0.6 (gamma 0.3), rescaled residuals
        build=lambda: callbacks.LayerDrop(drop_rate=0.4, schedule="progressive", gamma=0.3, rescale=True, seed=5),
        yaml=(TECHNIQUE_CONFIGS / "layer_drop.yaml").read_text(),
        strategies=("fsdp",),  # skipped blocks are skipped on every rank; tensor parallelism is not verified
        extra={"ddp_strategy": "ddp_find_unused_parameters_true"},
    ),
    TechniqueCase(
        id="progressive_stacking",  # 2 of the tiny models' 3 blocks, the third grown at step 2 from a moving average (MoGrow)
        build=lambda: callbacks.ProgressiveStacking(
            stages={0: 2, 2: 3}, rule="interleave", init="momentum", ema_decay=0.9
        ),
        yaml=(TECHNIQUE_CONFIGS / "progressive_stacking.yaml").read_text(),
        interrupt_at=(1, 2, 3, 6),  # before the growth, right before it (it runs at step 2's batch), after it
        extra={"ddp_strategy": "ddp_find_unused_parameters_true"},
    ),
    TechniqueCase(
        id="activation_checkpointing",  # blocks 0 and 2 of each stack recomputed, block 1 not
        build=lambda: callbacks.ActivationCheckpointing(every=2),
        yaml=(TECHNIQUE_CONFIGS / "activation_checkpointing.yaml").read_text(),
        strategies=("tp", "fsdp", "2d"),
    ),
    TechniqueCase(
        id="pruning",  # gradual unstructured, global ranking: events at steps 2, 4, 6 raise the sparsity to 0.2, 0.64, 0.7
        build=lambda: callbacks.MagnitudePruning(
            final_sparsity=0.7,
            initial_sparsity=0.2,
            start_step=2,
            end_step=6,
            frequency=2,
            scope="global",
            strict_schedule=False,  # the suite also runs 2-, 3- and 6-step fits, which end before step 6
        ),
        yaml=(TECHNIQUE_CONFIGS / "pruning_gradual.yaml").read_text(),
        # before the first event, between two (masks from the checkpoint), at one, after the last
        interrupt_at=(1, 3, 4, 7),
    ),
    TechniqueCase(
        id="qat",  # int8 fake quantization of the blocks' Linears from step 3, weight scales held from step 5
        build=lambda: callbacks.QuantizationAwareTraining(start_step=3, freeze_step=5, strict_schedule=False),
        yaml=(TECHNIQUE_CONFIGS / "qat_int8.yaml").read_text(),
        interrupt_at=(2, 3, 5, 6),  # before the switch, at it, at the freeze (scales from the checkpoint), after
    ),
    TechniqueCase(
        id="importance_sampling",  # 3 of each pool of 8 (ViT: 16), sampled on every step (the tiny models' tau is ~1.00)
        build=lambda: callbacks.ImportanceSampling(batch_size=3, tau_threshold=0.5, seed=3),
        yaml=(TECHNIQUE_CONFIGS / "importance_sampling.yaml").read_text(),
        interrupt_at=(1, 3, 4, 6),
    ),
    TechniqueCase(
        id="token_dropping",  # tiny BERT's block 1 on 40% -> 80% of the 33 tokens (14 -> 27), linearly over steps 0-6
        build=lambda: callbacks.TokenDropping(keep_fraction=0.4, final_keep_fraction=0.8, schedule_steps=6, seed=3),
        yaml=(TECHNIQUE_CONFIGS / "token_dropping.yaml").read_text(),
        families=("bert",),  # only BertMLM reports its predicted positions
        interrupt_at=(3, 4, 6, 7),  # mid-schedule (mid-epoch, epoch end), at its end, after it
        unsupported=lambda: Translation(vocab_size=500, preset="tiny", max_length=40),
        expected_error=ConfigurationError,
        strategies=("fsdp",),
    ),
    TechniqueCase(
        id="distillation",  # the student's own start as a frozen teacher ("self"), KL at T=2 mixed half with the labels
        build=lambda: callbacks.Distillation(teacher="self", loss="kl", temperature=2.0, alpha=0.5),
        yaml=(TECHNIQUE_CONFIGS / "distillation.yaml").read_text(),  # its placeholder teacher is only read at fit
        interrupt_at=(3, 4),  # mid-epoch, epoch end (the teacher is copied again from the restarted student)
        expected_error=ConfigurationError,  # a model without distillation_logits
        strategies=("fsdp",),  # the teacher stays a whole, unsharded copy on every rank
    ),
    TechniqueCase(
        id="dynamic_sparsity",  # RigL at 70%: masks rewired after steps 2 and 4 (moments of grown weights reset)
        build=lambda: callbacks.DynamicSparsity(
            method="rigl", sparsity=0.7, update_every=2, end_step=5, strict_schedule=False
        ),
        yaml=(TECHNIQUE_CONFIGS / "rigl.yaml").read_text(),
        interrupt_at=(2, 3, 5),  # right before an update (its gradient is taken on the next step), after it, at the end
    ),
    TechniqueCase(
        id="prune_at_init",  # SNIP at 60% on the first batch, then fixed masks
        build=lambda: callbacks.PruneAtInit(method="snip", sparsity=0.6),
        yaml=(TECHNIQUE_CONFIGS / "snip.yaml").read_text(),
        interrupt_at=(1, 4),  # after the scoring step (the masks come from the checkpoint), at an epoch end
    ),
    TechniqueCase(
        id="lottery_ticket",  # the dense round: keeps every weight of step 1 for the rounds after it
        build=lambda: callbacks.LotteryTicket(rewind_step=1),
        yaml=(TECHNIQUE_CONFIGS / "lottery_ticket.yaml").read_text(),
        interrupt_at=(1, 4),  # before the rewind step (taken after the resume), after it (restored from the checkpoint)
    ),
    TechniqueCase(
        id="parameter_efficient",  # LoRA r=4 on query/value, the base frozen; full checkpoints (see below)
        build=lambda: callbacks.ParameterEfficientTuning(
            peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1), adapter_only=False
        ),  # the resumed runs build their model with another seed: an adapter-only checkpoint would (rightly) be
        # refused there for its other base; tests/test_parameter_efficient.py resumes adapter-only from a pretrained base
        yaml=(TECHNIQUE_CONFIGS / "lora.yaml").read_text(),
        interrupt_at=(3, 4),  # mid-epoch, epoch end: the adapters are weights, restored with the model
    ),
    TechniqueCase(
        id="progressive_resizing",  # tiny ViT (28x28, patches of 4): 16x16 at steps 0-2, 20x20 at 3-4, then 28x28
        build=lambda: callbacks.ProgressiveResizing(schedule=[(0, 16), (3, 20), (5, 28)]),
        yaml=(TECHNIQUE_CONFIGS / "progressive_resizing.yaml").read_text(),
        families=("vit",),  # image sizes: ViT only
        resume_family="vit",
        interrupt_at=(2, 3, 5),  # mid-epoch right before a growth, after it, after the last
        expected_error=ConfigurationError,
        strategies=("fsdp",),
    ),
    TechniqueCase(
        id="autoprog",  # 2 blocks at 20x20 (steps 0-1); search of 2-3 blocks x 20/28 (steps 2-5); choice at 6; full at 7
        build=lambda: callbacks.AutoProg(
            stages=[0, 2, 7], image_sizes=[20, 28], depths=[2, 3], search_steps=1, tolerance=0.05, ema_decay=0.9
        ),
        yaml=(TECHNIQUE_CONFIGS / "autoprog.yaml").read_text(),
        families=("vit",),
        resume_family="vit",
        interrupt_at=(1, 3, 6),  # before the search (growth next), mid-search, at the choice
        expected_error=ConfigurationError,
        extra={"ddp_strategy": "ddp_find_unused_parameters_true"},
    ),
    TechniqueCase(
        id="residual_init",  # ReZero: block norms removed, a scalar per branch from 0 (blocks start as the identity)
        build=lambda: callbacks.ResidualInit(scheme="rezero"),
        yaml=(TECHNIQUE_CONFIGS / "residual_init_rezero.yaml").read_text(),
        interrupt_at=(3, 4),  # mid-epoch, epoch end: the scalars are weights, restored with the model
    ),
]


# -- tiny models and data of each family ------------------------------------------------------
def tiny_family(
    family: str,
    files: dict[str, str],
    mlm_length: int = 33,
    translation_data: type[TranslationDataModule] = TranslationDataModule,
    **shape: Any,
) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """A tiny model of ``family`` and a DataModule over the test's small user files.

    Epochs are made short by the trainer (``limit_train_batches``), not by the data. ``mlm_length``:
    BERT's tokens per block; ``translation_data``: the MT DataModule class; ``shape``: model
    arguments over the ``tiny`` preset (e.g. ``hidden_size``, ``dropout``).
    """
    shape = {"preset": "tiny", **shape}
    if family == "bert":
        dm = MLMDataModule(train_files=[files["txt"]], vocab_size=400, max_length=mlm_length, batch_size=8)
        return BertMLM(vocab_size=dm.vocab_size, max_length=mlm_length, warmup_fraction=0.25, **shape), dm
    if family == "mt":
        dm = translation_data(
            train_files=[files["pairs"]],
            source_column="src",
            target_column="tgt",
            vocab_size=500,
            max_length=40,
            batch_size=8,
        )
        model = Translation(vocab_size=dm.vocab_size, max_length=40, bleu_batches=0, warmup_fraction=0.25, **shape)
        return model, dm
    if family == "vit":
        return ViTClassifier(num_labels=10, warmup_fraction=0.25, **shape), ImageClassificationDataModule(batch_size=16)
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
