"""Distillation: train a student on a frozen teacher's logits (Hinton et al. 2015; Tang et al. 2019).

Each training step the callback runs the teacher on the step's batch (or takes its logits from
the :class:`~lightning_efficient.callbacks.distillation.cache.TeacherOutputCache`) and leaves them in
the batch as :class:`~lightning_efficient.losses.SoftTargets`; the student's own loss helper
(:func:`~lightning_efficient.losses.classification_loss`,
:func:`~lightning_efficient.losses.prediction_losses`) then returns, per prediction,
``alpha * CE(hard target) + (1 - alpha) * soft loss`` (:mod:`.objectives`). So any student that
follows the loss protocol (:mod:`lightning_efficient.losses`, rule 4) is distilled without changing
its code, and what it predicts decides what is distilled:

- a classifier (BERT, the BiLSTM of Tang et al., ViT): one row per example;
- a masked LM: only the predicted (masked) positions, which teacher and student see identically
  (the student draws the masks into the batch first), so the teacher's vocabulary head runs on
  those positions only;
- translation: every target token, teacher-forced (word-level distillation, Kim & Rush 2016).

The teacher (:mod:`.teacher`) is frozen, moved with the student, and kept outside the student
(never in its ``state_dict``). On resume it is loaded again from the same source; the checkpoint
records a fingerprint of its weights, and resuming with another teacher fails. A ``"self"`` teacher
(the student as it started) has no source but the run itself, so its weights are kept in the
callback's state in the checkpoint (still not in the student's ``state_dict``).

The teacher's forward passes run in ``on_train_batch_start``: an
:class:`~lightning_efficient.monitor.EfficiencyMonitor` placed before ``Distillation`` in
``trainer.callbacks`` counts their FLOPs in the step (cache hits cost none), as the shipped configs do.

Examples:
    >>> import lightning.pytorch as pl
    >>> from lightning_efficient import BertClassifier, TextClassificationDataModule, BROWN_PROSE
    >>> dm = TextClassificationDataModule(label_map=BROWN_PROSE, vocab_size=500, max_length=24, batch_size=8)
    >>> student = BertClassifier(vocab_size=dm.vocab_size, num_labels=2, preset="tiny")
    >>> distillation = Distillation(teacher="self", loss="kl", temperature=2.0, alpha=0.5)
    >>> trainer = pl.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
    ...                      enable_checkpointing=False, enable_model_summary=False, callbacks=[distillation])
    >>> trainer.fit(student, dm)
    >>> distillation.teacher is not student, "teacher" in " ".join(student.state_dict())
    (True, False)
"""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_efficient.callbacks.distillation.cache import TeacherOutputCache, example_keys
from lightning_efficient.callbacks.distillation.intermediate import LAYER_MAPS, LayerTransfer
from lightning_efficient.callbacks.distillation.objectives import LOSSES, MISSING_LABEL_RULES, distillation_losses
from lightning_efficient.callbacks.distillation.sequence_level import distil_targets
from lightning_efficient.callbacks.distillation.teacher import (
    check_compatible,
    fingerprint,
    load_teacher,
    locate_teacher,
)
from lightning_efficient.data.tokenizers import cache_root
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError, check_int
from lightning_efficient.losses import EXTRA_LOSS_KEY, SOFT_TARGETS_KEY, TRAINING_ONLY, SoftTargets
from lightning_efficient.technique import Technique, check_choice, check_range

__all__ = ["CACHE_MODES", "Distillation"]

#: ``auto``: in memory when the teacher gives one prediction per example (classifiers), else none.
CACHE_MODES = ("auto", "none", "memory", "disk")
#: Tasks whose teacher gives one prediction per example: what the output cache can hold.
PER_EXAMPLE_TASKS = ("sequence_classification", "image_classification")
#: Key of the layer-transfer projection in the student's ``training_only`` ModuleDict (losses.TRAINING_ONLY).
PROJECTION_KEY = "distillation_projection"
#: Techniques that skip the student's blocks or drop its tokens: its blocks no longer match the teacher's.
CHANGES_STUDENT_LAYERS = ("layer_drop", "progressive_stacking", "token_dropping")


class Distillation(Technique):
    """Distil a frozen teacher into the student LightningModule (see the module docstring).

    Args:
        teacher: ``"self"`` (a frozen copy of the student at the start of training), the path of one
            of our checkpoints, a ``save_pretrained`` directory or hub id, or a module instance.
        loss: The soft loss: ``"mse"`` of the logits (Tang et al.) or ``"kl"`` at ``temperature``.
        temperature: Softens both distributions of ``kl`` (> 0; the loss is scaled by its square).
            ``mse`` compares raw logits and takes no temperature.
        alpha: Weight of the hard cross-entropy term, in ``[0, 1]``; ``0`` (Tang et al.'s best)
            trains on the teacher alone.
        missing_labels: For an example without a gold label (an augmented one): ``"teacher"`` uses the
            teacher's argmax as its hard target (as Tang et al.'s code does), ``"drop"`` gives it none.
        cache: Teacher-output cache: ``"auto"`` (in memory for classifiers, whose teacher gives one
            prediction per example; none for token predictions, which change every step), ``"none"``,
            ``"memory"``, or ``"disk"`` (also kept in a file under ``cache_dir``, named by the
            teacher's fingerprint, read by later runs).
        cache_dir: Directory of the ``disk`` cache; default ``$LIGHTNING_EFFICIENT_CACHE/teacher_outputs``.
        max_cache_mb: Size limit of the cache's logits.
        sequence_level: Train on the teacher's beam-search translations instead of the training
            references (sequence-level distillation, Kim & Rush 2016; translation only), generated
            once before training and cached on disk (:mod:`.sequence_level`). ``alpha=1.0`` is pure
            sequence-level distillation (the teacher does not run during training); a smaller
            ``alpha`` adds word-level soft targets on the translations.
        num_beams: Beam width of those translations (>= 1).
        layers: Intermediate-layer transfer (TinyBERT-style, :mod:`.intermediate`) for a student of the
            teacher's family: None (off), ``"uniform"`` (student block ``i`` learns teacher block
            ``(i + 1) * T // S - 1``), or the teacher block (0-based) of each student block. Student
            block outputs are projected to the teacher's width by a learned linear map when they
            differ (trained with the student, in its training checkpoints, removed after fit).
        hidden_weight: Weight of the hidden-state MSE of the paired blocks (>= 0).
        attention_weight: Weight of the attention-probability MSE of the paired blocks (>= 0; needs
            the teacher's head count).

    Raises:
        ConfigurationError: A value outside the allowed set or range (before training).
    """

    name = "distillation"
    hooks = ("setup", "on_fit_start", "on_train_batch_start", "on_train_batch_end", "on_train_epoch_end")
    #: Techniques that change the student: with ``teacher="self"`` the copy must be taken before they do.
    runs_before = ("layer_drop", "progressive_stacking", "activation_checkpointing", "pruning", "qat", "token_dropping")
    #: Importance sampling redraws the batch in its own batch-start hook: the teacher would see the pool.
    conflicts_with = ("importance_sampling",)
    distributed_safe = True
    #: Examples without a gold label (:data:`~lightning_efficient.losses.MISSING_LABEL`) are trained on the teacher.
    fills_missing_labels = True
    compile_safe = True  # tests/test_compile.py: compiled training equals eager
    compile_note = "the teacher runs uncompiled; the layer-transfer hooks are in place before the first compiled call"

    def __init__(
        self,
        teacher: str | nn.Module,
        loss: str = "mse",
        temperature: float = 1.0,
        alpha: float = 0.0,
        missing_labels: str = "teacher",
        cache: str = "auto",
        cache_dir: str | None = None,
        max_cache_mb: float = 1024.0,
        sequence_level: bool = False,
        num_beams: int = 4,
        layers: str | list[int] | None = None,
        hidden_weight: float = 1.0,
        attention_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(teacher, nn.Module) and (not isinstance(teacher, str) or not teacher.strip()):
            raise ConfigurationError(
                f"teacher={teacher!r} must be 'self', a checkpoint or save_pretrained directory path, or a module"
            )
        self.source = teacher
        self.loss = check_choice("loss", loss, LOSSES)
        self.temperature = check_range("temperature", temperature, low=0.0, low_inclusive=False)
        if loss == "mse" and temperature != 1.0:
            raise ConfigurationError(
                f"temperature={temperature} has no effect with loss='mse' (it compares raw logits); use loss='kl' "
                "or leave temperature at 1.0"
            )
        self.alpha = check_range("alpha", alpha, low=0.0, high=1.0)
        self.missing_labels = check_choice("missing_labels", missing_labels, MISSING_LABEL_RULES)
        self.cache_mode = check_choice("cache", cache, CACHE_MODES)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_cache_mb = check_range("max_cache_mb", max_cache_mb, low=0.0, low_inclusive=False)
        if not isinstance(sequence_level, bool):
            raise ConfigurationError(f"sequence_level={sequence_level!r} must be true or false")
        self.sequence_level = sequence_level
        self.num_beams = check_int("num_beams", num_beams, low=1)
        self.layers = self._check_layers(layers)
        self.hidden_weight = check_range("hidden_weight", hidden_weight, low=0.0)
        self.attention_weight = check_range("attention_weight", attention_weight, low=0.0)
        if layers is not None:
            if hidden_weight == 0 and attention_weight == 0:
                raise ConfigurationError(
                    f"layers={layers!r} with hidden_weight=0 and attention_weight=0 transfers nothing"
                )
            if cache in ("memory", "disk"):
                raise ConfigurationError(
                    f"layers={layers!r} needs the teacher's layers on every batch, but cache={cache!r} skips the teacher "
                    "for cached examples; use cache='auto' or 'none'"
                )
            if sequence_level and alpha == 1.0:
                raise ConfigurationError(
                    f"layers={layers!r}: with sequence_level=True and alpha=1.0 the teacher does not run during "
                    "training; use alpha < 1"
                )
        self.transfer: LayerTransfer | None = None
        self.teacher: nn.Module | None = None
        self.teacher_fingerprint: str | None = None
        self.cache: TeacherOutputCache | None = None
        self._checked_first_step = False

    @staticmethod
    def _check_layers(layers: Any) -> str | list[int] | None:
        """``layers`` as given, or a clear error (lengths and ranges are checked against the models in ``setup``)."""
        if layers is None:
            return None
        if isinstance(layers, str):
            return check_choice("layers", layers, LAYER_MAPS)
        if (
            not isinstance(layers, (list, tuple))
            or not layers
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers)
        ):
            raise ConfigurationError(
                f"layers={layers!r} must be None (off), 'uniform', or a list of teacher blocks (0-based), one per "
                "student block"
            )
        return list(layers)

    @staticmethod
    def check_sources(arguments: dict[str, Any]) -> None:
        """Fail at once when the configured ``teacher`` path does not exist (the CLI calls this before building anything).

        Raises:
            DataError: ``teacher`` is neither ``"self"`` nor an existing file, directory or hub id.
        """
        teacher = arguments.get("teacher")
        if isinstance(teacher, str) and teacher != "self":
            locate_teacher(teacher)

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Load, freeze and check the teacher (fit only), before any weights are loaded."""
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.source == "self":
            changed = [t.name for t in trainer.callbacks if isinstance(t, Technique) and t is not self and t.is_applied]
            if changed:
                raise ConfigurationError(
                    f"teacher='self' copies the student before other techniques change it, but {changed} already "
                    "did: put Distillation first in trainer.callbacks"
                )
        if self.teacher is None:
            self.teacher = load_teacher(self.source, pl_module)
            self.teacher_fingerprint = fingerprint(self.teacher)
        check_compatible(self.teacher, pl_module, getattr(trainer, "datamodule", None))
        if self.layers is not None:
            self.transfer = self._make_transfer(trainer, pl_module)
        if self.sequence_level:
            self._distil_targets(trainer)
        self.cache = self._make_cache(pl_module)
        self._checked_first_step = False

    def _make_transfer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> LayerTransfer:
        """Hooks on the paired blocks; the projection (if any) attached to the student before its optimizer exists."""
        changing = [t.name for t in trainer.callbacks if isinstance(t, Technique) and t.name in CHANGES_STUDENT_LAYERS]
        if changing:
            raise ConfigurationError(
                f"layers={self.layers!r} compares the student's blocks with the teacher's on the same tokens, but "
                f"{changing} skip the student's blocks or drop its tokens; remove them or set layers=None"
            )
        assert self.teacher is not None and self.layers is not None
        transfer = LayerTransfer(pl_module, self.teacher, self.layers, self.hidden_weight, self.attention_weight)
        if transfer.projection is not None:  # trains with the student, saved in its checkpoints, removed after fit
            if not isinstance(getattr(pl_module, TRAINING_ONLY, None), nn.ModuleDict):
                pl_module.add_module(TRAINING_ONLY, nn.ModuleDict())
            getattr(pl_module, TRAINING_ONLY)[PROJECTION_KEY] = transfer.projection
        transfer.attach()
        return transfer

    def remove(self, pl_module: nn.Module) -> None:
        """At teardown: the layer-transfer hooks and projection go; the student is as it was before fit."""
        super().remove(pl_module)
        if self.transfer is not None:
            self.transfer.remove()
            holder = getattr(pl_module, TRAINING_ONLY, None)
            if isinstance(holder, nn.ModuleDict) and PROJECTION_KEY in holder:
                del holder[PROJECTION_KEY]
                if not len(holder):
                    delattr(pl_module, TRAINING_ONLY)
            self.transfer = None

    def _distil_targets(self, trainer: pl.Trainer) -> None:
        """Replace the training references by the teacher's translations (rank 0 translates, the others read its file)."""
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            raise ConfigurationError(
                "sequence_level=True replaces the training targets of a TranslationDataModule: pass the data as "
                "trainer.fit(model, datamodule=...)"
            )
        assert self.teacher is not None and self.teacher_fingerprint is not None
        self.teacher.to(trainer.strategy.root_device)  # generate on the training device

        def run() -> dict[str, float]:
            return distil_targets(
                datamodule, self.teacher, self.teacher_fingerprint, num_beams=self.num_beams,
                batch_size=datamodule.batch_size, directory=self.cache_dir,
            )  # fmt: skip

        counts = run() if trainer.is_global_zero else None
        trainer.strategy.barrier("sequence_distillation")
        if counts is None:
            counts = run()  # reads rank 0's file (a shared cache_dir across nodes; else translates itself)
        rank_zero_info(
            f"Distillation: {counts['changed']:,} of {counts['pairs']:,} training targets replaced by the teacher's "
            f"beam-{self.num_beams} translations (mean length {counts['mean_length_before']:.1f} -> "
            f"{counts['mean_length_after']:.1f} tokens)"
        )

    def _make_cache(self, pl_module: pl.LightningModule) -> TeacherOutputCache | None:
        per_example = getattr(pl_module, "task", None) in PER_EXAMPLE_TASKS
        cacheable = per_example and self.layers is None  # layer transfer needs the teacher on every batch
        mode = ("memory" if cacheable else "none") if self.cache_mode == "auto" else self.cache_mode
        if mode == "none":
            return None
        if not per_example:
            raise ConfigurationError(
                f"cache={self.cache_mode!r}: the teacher-output cache holds one prediction per example, but "
                f"{type(pl_module).__name__} predicts tokens that change every step; use cache='none'"
            )
        path = None
        if mode == "disk":
            assert self.teacher_fingerprint is not None
            directory = self.cache_dir or cache_root() / "teacher_outputs"
            path = directory / f"{self.teacher_fingerprint[:20]}.pt"
        return TeacherOutputCache(int(self.max_cache_mb * 2**20), path)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move the teacher to the student's device; every rank must hold the same teacher."""
        assert self.teacher is not None
        self.teacher.to(pl_module.device)
        if trainer.world_size > 1 and trainer.strategy.broadcast(self.teacher_fingerprint) != self.teacher_fingerprint:
            raise ConfigurationError(
                f"rank {trainer.global_rank} holds another teacher than rank 0 (its weights differ): with "
                "teacher='self', seed every rank alike (seed_everything) so the students start alike"
            )
        rank_zero_info(
            f"Distillation: teacher {self._describe_source()} ({sum(p.numel() for p in self.teacher.parameters()):,} "
            f"parameters, frozen), loss {self.loss}, alpha {self.alpha}, cache "
            f"{'off' if self.cache is None else ('disk' if self.cache.path else 'memory')}"
        )

    def _describe_source(self) -> str:
        return type(self.source).__name__ if isinstance(self.source, nn.Module) else repr(self.source)

    # -- training -------------------------------------------------------------------------------
    def _row_losses(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return distillation_losses(
            student, teacher, targets, self.loss, self.temperature, self.alpha, self.missing_labels
        )

    def teacher_logits(self, trainer: pl.Trainer, batch: MutableMapping[str, Any]) -> torch.Tensor:
        """The teacher's ``distillation_logits`` of ``batch``, from the cache where it has them."""
        assert self.teacher is not None
        if self.cache is None:
            return self._run_teacher(trainer, batch)
        keys = example_keys(batch)
        found = self.cache.get(keys)
        missing = [i for i, item in enumerate(found) if item is None]
        if missing:
            size = len(keys)
            rows = torch.tensor(missing, device=batch["attention_mask"].device if "attention_mask" in batch else None)
            part = {
                k: v.index_select(0, rows.to(v.device))
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size
                else v
                for k, v in batch.items()
            }
            computed = self._run_teacher(trainer, part)
            self.cache.put([keys[i] for i in missing], computed)
            for i, row in zip(missing, computed):
                found[i] = row
        device = next(t for t in found if t is not None).device
        return torch.stack([t.to(device) for t in found])

    def _run_teacher(self, trainer: pl.Trainer, batch: MutableMapping[str, Any]) -> torch.Tensor:
        assert self.teacher is not None
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            return self.teacher.distillation_logits(batch).float()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Put the teacher's soft targets for this batch into it (after the student drew its random inputs)."""
        if not isinstance(batch, MutableMapping):
            raise ConfigurationError(
                f"Distillation needs dict batches (the package's DataModules give them), got a {type(batch).__name__}"
            )
        if self.sequence_level and self.alpha == 1.0:
            return  # pure sequence-level: the student trains on the teacher's translations alone
        fix_random_inputs = getattr(pl_module, "fix_random_inputs", None)
        if fix_random_inputs is not None:
            fix_random_inputs(batch)
        if self.transfer is not None:
            self.transfer.begin(batch.get("attention_mask"))  # arms its hooks for this batch's two forwards
        extra = self.transfer.loss if self.transfer is not None else None
        batch[SOFT_TARGETS_KEY] = SoftTargets(self.teacher_logits(trainer, batch), self._row_losses, extra)
        if self.cache is not None:
            self.log_metrics(pl_module, {"cache_hit_rate": self.cache.hit_rate})

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the layer-transfer terms; after the first step: fail if the student's loss ignored the soft targets."""
        if self.transfer is not None:
            self.transfer.clear()
            self.log_metrics(pl_module, {f"{k}_loss": v for k, v in self.transfer.last_terms.items()})
        if self._checked_first_step or (self.sequence_level and self.alpha == 1.0):
            return
        self._checked_first_step = True
        if isinstance(batch, MutableMapping) and (SOFT_TARGETS_KEY in batch or EXTRA_LOSS_KEY in batch):
            raise ConfigurationError(
                f"{type(pl_module).__name__}.training_step did not use the teacher's soft targets: its loss must go "
                "through lightning_efficient.losses.classification_loss or prediction_losses (the loss protocol, "
                "rule 4), or the student trains on labels alone"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the disk cache (each rank its own file would collide: rank 0 writes)."""
        if self.cache is not None and trainer.is_global_zero:
            self.cache.save()

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the teacher came from and its weights' fingerprint; the weights only of a ``"self"`` teacher.

        A teacher from a file or a directory is loaded from it again on resume (the fingerprint
        checks it is the same). A ``"self"`` teacher is the student as it started, which nothing
        but this run holds: its weights are kept here, in the callback's state (never in the
        student's ``state_dict``), so a resumed run distils from the same teacher.
        """
        source = self.source if isinstance(self.source, str) else f"<{type(self.source).__name__} instance>"
        state: dict[str, Any] = {"source": source, "fingerprint": self.teacher_fingerprint}
        if self.sequence_level:
            state["num_beams"] = self.num_beams
        if self.layers is not None:
            state["layers"] = self.layers
        if self.source == "self" and self.teacher is not None:
            state["weights"] = {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume: restore a ``"self"`` teacher's weights; any other must be the one the run started with."""
        saved = state_dict.get("fingerprint")
        if self.sequence_level and state_dict.get("num_beams", self.num_beams) != self.num_beams:
            raise CheckpointMismatchError(
                f"num_beams={self.num_beams}, but this run trained on the teacher's beam-{state_dict['num_beams']} "
                "translations; resume with the same num_beams"
            )
        if state_dict.get("layers") != self.layers:
            raise CheckpointMismatchError(
                f"layers={self.layers!r}, but this run was distilled with layers={state_dict.get('layers')!r} (its "
                "projection and layer pairs); resume with the same layers"
            )
        if self.source == "self" and "weights" in state_dict and self.teacher is not None:
            self.teacher.load_state_dict(state_dict["weights"])
            self.teacher_fingerprint = fingerprint(self.teacher)
            return
        if saved and self.teacher_fingerprint and saved != self.teacher_fingerprint:
            raise CheckpointMismatchError(
                f"the teacher {self._describe_source()} is not the one this run started with (the checkpoint's "
                f"teacher was {state_dict.get('source')!r}, whose weights differ); resume with the same teacher"
            )
