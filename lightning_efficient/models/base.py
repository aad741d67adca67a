"""The base LightningModule of the package: optimizer defaults and self-describing checkpoints.

Every checkpoint written by one of our modules carries, under ``checkpoint["lightning_efficient"]``,
the module's class name and (for text models) the tokenizer, so ``predict`` needs nothing but the
checkpoint, and loading a checkpoint into the wrong model type fails with a message saying so
(:mod:`lightning_efficient.checkpoint` writes and reads that metadata).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from torch.distributed.tensor import DTensor
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_efficient.checkpoint import (
    adapter_record,
    check_module,
    check_pruning_masks,
    check_structure,
    read_metadata,
    read_tokenizer,
    recorded_structure,
    write_metadata,
    write_tokenizer,
)
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError, check_int
from lightning_efficient.losses import TRAINING_ONLY, classification_loss, cross_entropy_gradient_norms
from lightning_efficient.models.dropout import use_fast_dropout
from lightning_efficient.models.pretrained import (
    PretrainedSource,
    model_from_config,
    model_from_directory,
    resolve_pretrained,
)
from lightning_efficient.monitor import batch_counts
from lightning_efficient.optim.param_groups import no_decay_groups
from lightning_efficient.safeguards import capture_random_states, restore_random_states

__all__ = [
    "EfficientModule",
    "TextClassifier",
    "class_names",
    "compile_backend",
    "decay_parameter_groups",
    "require_argument",
    "warmup_schedule",
    "warn_if_epoch_was_cut_short",
]

LR_SCHEDULES = ("linear", "cosine", "constant")
#: ``torch.compile`` backends for checking semantics that ``torch._dynamo.list_backends()`` does not list.
DEBUG_BACKENDS = ("aot_eager", "eager")


def compile_backend(compile: bool | str) -> str | None:
    """The ``torch.compile`` backend that a module's ``compile`` argument asks for; None when it is off.

    ``True`` is Inductor (the fast one); a string names a backend: one of
    ``torch._dynamo.list_backends()``, or ``"eager"`` / ``"aot_eager"`` (no code generation: for
    checking that a run compiles and trains as it does uncompiled).

    Raises:
        ConfigurationError: ``compile`` is neither a bool nor a known backend name.

    Examples:
        >>> compile_backend(False), compile_backend(True), compile_backend("aot_eager")
        (None, 'inductor', 'aot_eager')
        >>> compile_backend("fastest")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: compile='fastest' is not a torch.compile backend; use true, false or one of: aot_eager, ...
    """
    if isinstance(compile, bool):
        return "inductor" if compile else None
    import torch._dynamo

    allowed = sorted({*torch._dynamo.list_backends(), *DEBUG_BACKENDS})
    if isinstance(compile, str) and compile in allowed:
        return compile
    raise ConfigurationError(
        f"compile={compile!r} is not a torch.compile backend; use true, false or one of: {', '.join(allowed)}"
    )


def decay_parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters into a weight-decayed group and a no-decay group (biases, norm weights).

    The package's one rule (:func:`lightning_efficient.optim.no_decay_groups`), which works on any
    model: a parameter with fewer than two dimensions (bias, LayerNorm scale) gets no weight decay,
    as in the BERT recipe. Empty groups are left out.

    Examples:
        >>> groups = decay_parameter_groups(torch.nn.Linear(3, 2), weight_decay=0.01)
        >>> [len(g["params"]) for g in groups], [g["weight_decay"] for g in groups]
        ([1, 1], [0.01, 0.0])
    """
    return no_decay_groups((p for p in model.parameters() if p.requires_grad), weight_decay)


def warmup_schedule(step: int, warmup_steps: int, total_steps: int, shape: str) -> float:
    """LR multiplier: linear warmup to 1, then ``linear`` / ``cosine`` decay to 0, or ``constant``.

    Examples:
        >>> [round(warmup_schedule(s, 2, 10, "linear"), 3) for s in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if shape == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return 1.0 - progress if shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def warn_if_epoch_was_cut_short(checkpoint: dict[str, Any]) -> bool:
    """Warn when resuming from a checkpoint written after training stopped part-way through an epoch.

    Lightning marks the epoch as finished when ``max_steps``, ``max_time`` or early stopping ends
    ``fit`` mid-epoch, so ``trainer.save_checkpoint`` after such a ``fit`` resumes at the *next*
    epoch: the rest of that epoch's batches are never trained on. Checkpoints written during
    training (``ModelCheckpoint``) resume exactly. Returns whether it warned.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs = loop.get("epoch_progress", {}).get("current", {})
    batches = loop.get("epoch_loop.batch_progress", {})
    finished = epochs.get("started", 0) > 0 and epochs.get("completed") == epochs.get("started")
    if not (finished and batches.get("is_last_batch") is False):
        return False
    done = batches.get("current", {}).get("completed", 0)
    warnings.warn(
        f"this checkpoint was written after fit stopped {done} batches into epoch {epochs['started'] - 1} "
        "(max_steps, max_time or early stopping). Lightning counts that epoch as finished, so training resumes "
        f"at epoch {epochs['started']} and the rest of epoch {epochs['started'] - 1} is never trained on. For an exact "
        "continuation, resume from a checkpoint written during training (ModelCheckpoint, e.g. last.ckpt).",
        UserWarning,
        stacklevel=2,
    )
    return True


def require_argument(name: str, value: Any, hint: str) -> Any:
    """Return ``value``, or fail naming ``name`` when it is missing or not positive."""
    if value is None:
        raise ConfigurationError(f"{name} is required: {hint} (the lightning-efficient CLI fills it from the data)")
    if isinstance(value, int) and value <= 0:
        raise ConfigurationError(f"{name}={value} must be a positive integer")
    return value


def class_names(num_labels: int | None, label_names: list[str] | None, hint: str) -> list[str]:
    """The checked class names of a classifier: ``label_names``, or ``"0", "1", ...`` when not given.

    Args:
        num_labels: Number of classes (at least 2); missing: fail with ``hint``.
        label_names: One name per class, or None.
        hint: Where ``num_labels`` comes from, for the error when it is missing.

    Raises:
        ConfigurationError: ``num_labels`` is missing or below 2, or ``label_names`` has another length.

    Examples:
        >>> class_names(3, None, "pass datamodule.num_labels")
        ['0', '1', '2']
        >>> class_names(2, ["a", "b", "c"], "pass datamodule.num_labels")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: label_names has 3 names but num_labels=2
    """
    num_labels = require_argument("num_labels", num_labels, hint)
    if num_labels < 2:
        raise ConfigurationError(f"num_labels={num_labels} must be at least 2")
    if label_names is not None and len(label_names) != num_labels:
        raise ConfigurationError(f"label_names has {len(label_names)} names but num_labels={num_labels}")
    return label_names or [str(i) for i in range(num_labels)]


class EfficientModule(pl.LightningModule):
    """Base of the package's LightningModules.

    Provides AdamW with BERT-style decay groups and a warmup schedule (LightningCLI's
    ``optimizer:`` block replaces the AdamW and keeps the schedule; an ``lr_scheduler:`` block
    replaces the schedule too), checkpoint metadata, and the check that
    the data the trainer feeds matches the model (vocabulary, labels).

    Args:
        learning_rate: Peak learning rate of the default AdamW.
        weight_decay: Decoupled weight decay of matrices (biases and norms get none).
        warmup_fraction: Share of the run's optimizer steps spent warming the LR up linearly.
        lr_schedule: ``linear`` or ``cosine`` decay to zero after warmup, or ``constant``.
        compile: Compile the model with ``torch.compile`` at the end of :meth:`setup` (after the
            techniques' surgery): ``True`` for Inductor, or a backend name (see :func:`compile_backend`).
            The modules of :meth:`compile_targets` are compiled in place (``nn.Module.compile``), so
            checkpoint keys do not change. A technique that cannot run compiled is refused there,
            before the first step (:func:`~lightning_efficient.technique.check_compile_support`).
    """

    #: Whether the model needs a tokenizer (text models) in its checkpoints.
    needs_tokenizer: bool = False
    #: What the model predicts, as a key of :data:`~lightning_efficient.models.pretrained.AUTO_CLASSES`
    #: (``"masked_lm"``, ``"sequence_classification"``, ``"seq2seq"``, ``"image_classification"``).
    task: str | None = None

    def __init__(
        self,
        learning_rate: float,
        weight_decay: float,
        warmup_fraction: float,
        lr_schedule: str,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        if learning_rate <= 0:
            raise ConfigurationError(f"learning_rate={learning_rate} must be positive")
        if weight_decay < 0:
            raise ConfigurationError(f"weight_decay={weight_decay} must be >= 0")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ConfigurationError(f"warmup_fraction={warmup_fraction} must lie in [0, 1)")
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigurationError(
                f"lr_schedule={lr_schedule!r} is unknown; choose one of: {', '.join(LR_SCHEDULES)}"
            )
        self.tokenizer: Tokenizer | None = None
        #: Where the starting weights came from (the ``pretrained`` argument), recorded in checkpoints.
        self.initialised_from: str | None = None
        #: Whether the model was built from a transformers config (a directory's, or ``model_config``).
        self.built_from_config = False
        #: Optimizer steps of the LR schedule (set when it is built, moved by :meth:`set_schedule_length`).
        self.schedule_length: int | None = None
        #: The ``torch.compile`` backend of the ``compile`` argument, None when off (not named ``compile``:
        #: that would hide ``nn.Module.compile``).
        self.compile_backend: str | None = compile_backend(compile)

    @property
    def class_name(self) -> str:
        """The name of this module's class, as checkpoints record it.

        FSDP2's ``fully_shard`` (:class:`~lightning_efficient.strategies.FullyShardedStrategy`) swaps a
        sharded module's class for a subclass named ``FSDP<name>``; this is the name of the class it wrapped.
        """
        from torch.distributed.fsdp import FSDPModule

        return next(cls for cls in type(self).__mro__ if not issubclass(cls, FSDPModule)).__name__

    # -- data / model consistency ---------------------------------------------------------------
    def data_requirements(self) -> dict[str, Any]:
        """The values of ``datamodule.model_arguments()`` that this model must equal."""
        return {}

    def count_batch(self, batch: Any) -> tuple[int, int | torch.Tensor]:
        """``(samples, tokens)`` of a training batch, for ``EfficiencyMonitor``'s throughput.

        Default: :func:`lightning_efficient.monitor.batch_counts` (rows and real tokens of a batch
        with an ``attention_mask``: the non-pad tokens of our text DataModules).
        """
        return batch_counts(batch)

    def setup(self, stage: str) -> None:
        self._check_data(stage)
        self.compile_model()

    def compile_targets(self) -> list[nn.Module]:
        """The modules that ``compile`` compiles in place: the transformers model (``self.model``)."""
        return [self.model]

    def compile_model(self) -> None:
        """Compile :meth:`compile_targets` in place with the ``compile`` backend (once; nothing when it is off).

        Called at the end of :meth:`setup`, which Lightning runs after every callback's ``setup``: the
        techniques' hooks and wrappers are in place before the first compiled call.

        With Inductor, random operators (dropout) run as in eager (``fallback_random``): they draw
        from torch's global generator, so a compiled run draws the masks an eager run draws and
        resumes them from the random state our checkpoints carry; on the CPU, torch's own dropout is
        also faster than Inductor's generated one (``benchmarks/compile.py``).

        Raises:
            ConfigurationError: A technique of the run cannot run compiled (naming it and the reason).
        """
        if self.compile_backend is None:
            return
        from lightning_efficient.technique import check_compile_support

        check_compile_support(self._techniques())
        options = {"fallback_random": True} if self.compile_backend == "inductor" else None
        for module in self.compile_targets():
            if getattr(module, "_compiled_call_impl", None) is None:  # compiled once, whatever the stages
                module.compile(backend=self.compile_backend, options=options)

    def _check_data(self, stage: str) -> None:
        """Take the data module's tokenizer; fail when the data's vocabulary or labels differ from the model's."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        if self.needs_tokenizer and getattr(datamodule, "tokenizer", None) is not None:
            self.tokenizer = datamodule.tokenizer
        if hasattr(datamodule, "model_arguments") and not (
            stage == "predict" and getattr(datamodule, "predict_files", None)
        ):
            given = datamodule.model_arguments()
            for name, expected in self.data_requirements().items():
                if name in given and given[name] != expected:
                    raise ConfigurationError(
                        f"{type(self).__name__}: {name}={expected!r} does not match the data, which has "
                        f"{name}={given[name]!r} ({type(datamodule).__name__}); set {name} to the data's value "
                        "(the lightning-efficient CLI fills it in when left unset)"
                    )

    def classification_training_step(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """The training step of a classifier from its logits ``(N, C)``: loss, logged with the accuracy.

        The loss is :func:`lightning_efficient.losses.classification_loss` of ``batch["labels"]``
        (importance-weighted when a technique weighted the batch); logs ``train/loss`` and ``train/accuracy``.
        """
        loss = classification_loss(logits, batch["labels"], batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", (logits.argmax(-1) == batch["labels"]).float().mean())
        return loss

    def add_classification_metrics(self, num_labels: int) -> None:
        """Create the validation and test metrics of a classifier: micro accuracy and macro F1 over ``num_labels``.

        They are the ``val_accuracy``, ``val_f1``, ``test_accuracy`` and ``test_f1`` attributes that
        :meth:`classification_eval_step` updates.
        """
        for stage in ("val", "test"):
            setattr(self, f"{stage}_accuracy", MulticlassAccuracy(num_classes=num_labels, average="micro"))
            setattr(self, f"{stage}_f1", MulticlassF1Score(num_classes=num_labels, average="macro"))

    def classification_eval_step(self, logits: torch.Tensor, batch: dict[str, Any], stage: str) -> None:
        """The validation or test step of a classifier from its logits ``(N, C)``.

        Logs ``{stage}/loss`` (cross-entropy), ``{stage}/accuracy`` and ``{stage}/f1`` (macro), with the
        metrics of :meth:`add_classification_metrics`; ``stage`` is ``"val"`` or ``"test"``.
        """
        accuracy, f1 = getattr(self, f"{stage}_accuracy"), getattr(self, f"{stage}_f1")
        loss = F.cross_entropy(logits.float(), batch["labels"])
        accuracy(logits, batch["labels"])
        f1(logits, batch["labels"])
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/accuracy", accuracy, prog_bar=True)
        self.log(f"{stage}/f1", f1)

    def classification_predictions(self, logits: torch.Tensor, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """The predict output of a classifier: per text of ``batch["text"]``, its label name and class probabilities.

        The names are the module's ``label_names``.
        """
        probabilities = logits.float().softmax(-1)
        return [
            {
                "text": text,
                "label": self.label_names[int(p.argmax())],
                "probabilities": dict(zip(self.label_names, p.tolist())),
            }
            for text, p in zip(batch["text"], probabilities)
        ]

    # -- optimizer ------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            decay_parameter_groups(self, hp.weight_decay),
            lr=hp.learning_rate,
            betas=(0.9, 0.98),
            eps=1e-6,
            # One kernel per step, 3.5x faster than foreach on BERT-small's CPU step; torch's fused AdamW
            # refuses DTensor parameters (FSDP2, tensor parallelism): its step counters are plain tensors.
            fused=not any(isinstance(p, DTensor) for p in self.parameters()),
        )
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_config(optimizer)}

    def lr_scheduler_config(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The module's schedule (``warmup_fraction``, ``lr_schedule``) on ``optimizer``, stepped per optimizer step.

        Used by :meth:`configure_optimizers`, and by the CLI for an optimizer given in YAML
        (``optimizer:``) without an ``lr_scheduler:``, so a LAMB or Lion run keeps the warmup and decay.
        """
        hp = self.hparams
        self.schedule_length = max(1, int(self.trainer.estimated_stepping_batches))

        def multiplier(step: int) -> float:  # reads schedule_length on every step: set_schedule_length moves the end
            total = self.schedule_length
            return warmup_schedule(step, int(hp.warmup_fraction * total), total, hp.lr_schedule)

        multiplier.schedule_of = self  # type: ignore[attr-defined]  # how set_schedule_length finds it
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"scheduler": scheduler, "interval": "step"}

    def set_schedule_length(self, total_steps: int) -> bool:
        """Stretch or shrink the module's LR schedule to end after ``total_steps`` optimizer steps.

        The warmup-and-decay schedule of :meth:`lr_scheduler_config` runs over
        ``trainer.estimated_stepping_batches`` steps; this moves its end (the warmup stays
        ``warmup_fraction * total_steps``) and recomputes the LR of the coming step, so the steps
        from now on follow ``warmup_schedule(step, warmup, total_steps, lr_schedule)``. Call it
        during ``fit``, once the optimizers exist (from ``on_train_start`` on; a call before is
        overwritten when the schedule is built). The length is not checkpointed: whoever sets it
        sets it again on resume (:class:`~lightning_efficient.pipeline.budget.FlopBudget` does).

        Args:
            total_steps: Optimizer steps of the whole schedule (>= 1), counted from the run's first step.

        Returns:
            Whether a schedule of this module was found among the trainer's schedulers and changed
            (False when an ``lr_scheduler:`` block or another ``configure_optimizers`` replaced it:
            then only :attr:`schedule_length` is set).

        Raises:
            ConfigurationError: ``total_steps`` is not an integer >= 1.

        Examples:
            >>> from lightning_efficient import BertMLM
            >>> from lightning_efficient.testing import quiet_trainer
            >>> model = BertMLM(vocab_size=50, preset="tiny", learning_rate=1e-3, warmup_fraction=0.0)
            >>> trainer = quiet_trainer(max_steps=100, max_epochs=-1)  # a schedule over 100 steps
            >>> model.trainer = trainer
            >>> trainer.strategy.connect(model)
            >>> trainer.strategy.setup_optimizers(trainer)  # what fit does before on_train_start
            >>> model.set_schedule_length(4), model.schedule_length
            (True, 4)
            >>> scheduler = trainer.lr_scheduler_configs[0].scheduler
            >>> lrs = []
            >>> for _ in range(5):
            ...     lrs.append(round(scheduler.get_last_lr()[0], 6))
            ...     scheduler.optimizer.step()
            ...     scheduler.step()
            >>> lrs  # linear decay to 0 over 4 steps, not 100
            [0.001, 0.00075, 0.0005, 0.00025, 0.0]
        """
        check_int("total_steps", total_steps, low=1)
        self.schedule_length = total_steps
        changed = False
        trainer = self._trainer
        for config in trainer.lr_scheduler_configs if trainer is not None else ():
            scheduler = config.scheduler
            lambdas = getattr(scheduler, "lr_lambdas", ())
            if not any(getattr(fn, "schedule_of", None) is self for fn in lambdas):
                continue
            for group, base_lr, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, lambdas):
                lr = base_lr * fn(scheduler.last_epoch)
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # get_last_lr()
            changed = True
        return changed

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "callbacks" not in checkpoint:  # weights_only: Lightning skips the callbacks' on_save_checkpoint, yet
            for technique in self._techniques():  # their records belong here (surgery, an adapter-only dropped base)
                technique.on_save_checkpoint(self.trainer, self, checkpoint)
        write_metadata(checkpoint, module=self.class_name, rng=capture_random_states())
        write_metadata(checkpoint, initialised_from=self.initialised_from)
        if self.tokenizer is not None:
            write_tokenizer(checkpoint, self.tokenizer)
        hyper_parameters = checkpoint.get("hyper_parameters")
        if hyper_parameters is not None:
            # The starting weights are part of this checkpoint now: reloading it must not need their source.
            for name in ("pretrained", "pretrained_checkpoint"):
                if name in hyper_parameters:
                    hyper_parameters[name] = None
            if self.built_from_config:  # rebuilds the same architecture (and pruned shapes) without the source
                hyper_parameters["model_config"] = self.model.config.to_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; strict loading of pruning masks this module lacks names the fix.

        Modules a technique attached for training only (under :data:`~lightning_efficient.losses.TRAINING_ONLY`,
        e.g. distillation's layer projections) are left out when this module has none.

        Without it, ``load_from_checkpoint`` of a pruned checkpoint fails with torch's "Unexpected
        key(s) ... weight_mask" (:func:`~lightning_efficient.checkpoint.check_pruning_masks`).
        """
        if strict:
            check_pruning_masks({"state_dict": state_dict}, self.state_dict())
        if not hasattr(self, TRAINING_ONLY):  # a technique's training-only modules (losses.TRAINING_ONLY): not ours
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(f"{TRAINING_ONLY}.")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = read_metadata(checkpoint)
        if meta is None:
            return  # not written by us (e.g. a plain Lightning checkpoint): load as Lightning would
        check_module(checkpoint, self.class_name)
        check_structure(checkpoint, self._technique_structures(), self._checkpoint_name())
        for technique in self._techniques():
            technique.check_checkpoint(checkpoint, self._checkpoint_name())
        if self._trainer is not None and self.strict_loading:  # masks without MagnitudePruning: say what to add
            check_pruning_masks(checkpoint, self.state_dict(), str(self.trainer.ckpt_path))
        tokenizer = read_tokenizer(checkpoint)
        if tokenizer is not None:
            self.tokenizer = tokenizer
        self.initialised_from = self.initialised_from or meta.get("initialised_from")  # kept across reloads
        if self._trainer is not None and self.trainer.state.fn == "fit":
            # Resuming training: continue the global random streams (dropout) where they were.
            # Loading weights for inference or fine-tuning leaves the caller's RNG alone.
            if "rng" in meta:
                restore_random_states(meta["rng"])
            warn_if_epoch_was_cut_short(checkpoint)

    def _techniques(self) -> list[Any]:
        """The run's techniques (``Technique`` callbacks of the trainer), none without a trainer."""
        from lightning_efficient.technique import Technique

        callbacks = self._trainer.callbacks if self._trainer is not None else []
        return [cb for cb in callbacks if isinstance(cb, Technique)]

    def _technique_structures(self) -> dict[str, dict[str, Any]]:
        """The model surgery of the run's techniques (:meth:`~lightning_efficient.technique.Technique.surgery`)."""
        surgeries = {technique.name: technique.surgery() for technique in self._techniques()}
        return {name: surgery for name, surgery in surgeries.items() if surgery is not None}

    def _checkpoint_name(self) -> str:
        path = self._trainer.ckpt_path if self._trainer is not None else None
        return str(path) if path else "being loaded"

    def require_tokenizer(self) -> Tokenizer:
        """The tokenizer from the data module or checkpoint, or a clear error."""
        if self.tokenizer is None:
            raise ConfigurationError(
                f"{type(self).__name__} has no tokenizer: run it with one of our text DataModules "
                "or load it from one of our checkpoints"
            )
        return self.tokenizer

    # -- starting weights -----------------------------------------------------------------------
    def build_model(
        self,
        task: str,
        build: Callable[[dict[str, Any]], nn.Module],
        pretrained: str | None,
        model_config: Mapping[str, Any] | None,
        accepts: tuple[str, ...],
        shape: dict[str, Any],
        sizes: dict[str, Any],
        overrides: dict[str, Any] | None = None,
    ) -> nn.Module:
        """The transformers model of this module: built by ``build``, or started from ``pretrained`` weights.

        - ``pretrained`` a directory (or hub id): the class comes from its config through ``Auto*``
          (:func:`~lightning_efficient.models.pretrained.model_from_directory`), weights and all.
        - ``model_config`` (a checkpoint of a model that started from a directory), or a ``pretrained``
          checkpoint that carries one: the class comes from that config.
        - otherwise ``build()``; a ``pretrained`` checkpoint must then have the same ``shape``.

        Weights of a ``pretrained`` checkpoint of ours are copied in: all of them for a masked LM or
        a translation model, the encoder only (a fresh head) for a classifier. The tokenizer that
        comes with the weights becomes this module's tokenizer, and ``initialised_from`` names the source.

        Args:
            task: A key of :data:`~lightning_efficient.models.pretrained.AUTO_CLASSES`.
            build: Builds the model from ``shape`` (this module's own arguments; a field left None, such as
                ``vocab_size``, taken from a ``pretrained`` checkpoint).
            pretrained: A checkpoint of ours, a ``save_pretrained`` directory or a hub id, or None.
            model_config: A transformers config dict to build from (written into our checkpoints), or None.
            accepts: The module classes of ours whose checkpoints can start this module.
            shape: This module's shape fields (compared with a checkpoint's hyperparameters).
            sizes: The size arguments given explicitly (None when unset); refused with a config-defined model.
            overrides: Config fields this module decides (``num_labels``, ``id2label``).

        Raises:
            CheckpointMismatchError: A checkpoint of another module, or of another shape (naming the fields).
            ConfigurationError: Size arguments given together with a config-defined model.
        """
        overrides = overrides or {}
        source = resolve_pretrained(pretrained) if pretrained else None
        if source is not None and source.kind == "checkpoint" and source.module not in accepts:
            raise CheckpointMismatchError(
                f"pretrained {source.name!r} was written by {source.module or 'something else than this package'}; "
                f"it must be a {' or '.join(accepts)} checkpoint"
            )
        if source is not None and source.kind == "checkpoint":
            _refuse_changed_blocks(source)
        config = model_config or (source.model_config if source is not None else None)
        if source is not None and source.kind == "directory":
            self._refuse_sizes(sizes, source.name)
            model = model_from_directory(source, task, **overrides)
        elif config is not None:
            self._refuse_sizes(sizes, source.name if source is not None else "model_config")
            model = model_from_config({**config, **overrides}, task)
        else:
            if source is not None:
                theirs = source.hyper_parameters
                shape = {k: theirs.get(k) if v is None else v for k, v in shape.items()}
            model = build(shape)
            if source is not None:
                _check_shape(source, shape)
        if source is not None and source.kind == "checkpoint":
            whole = task in ("masked_lm", "seq2seq") or source.module == type(self).__name__  # a head of the same task
            _copy_checkpoint_weights(model, source, whole=whole)
        self.built_from_config = config is not None or (source is not None and source.kind == "directory")
        if source is not None:
            self.initialised_from = source.name
            tokenizer = source.tokenizer()
            if tokenizer is not None:
                self.tokenizer = tokenizer
        return use_fast_dropout(model)

    @staticmethod
    def _refuse_sizes(sizes: dict[str, Any], name: str) -> None:
        given = {k: v for k, v in sizes.items() if v is not None}
        if given:
            listed = ", ".join(f"{k}={v}" for k, v in given.items())
            raise ConfigurationError(
                f"{listed} cannot be combined with pretrained={name!r}: the architecture comes from its config; "
                "leave the size arguments unset"
            )

    def settle_vocab_size(self, vocab_size: int | None) -> int:
        """The vocabulary size of the built model, checked against ``vocab_size`` (the data's), and kept in hparams.

        Raises:
            ConfigurationError: ``vocab_size`` was given and differs from the model's (names both sizes).
        """
        actual = int(self.model.config.vocab_size)
        if vocab_size is not None and vocab_size != actual:
            raise ConfigurationError(
                f"vocab_size={vocab_size} (the data's tokenizer) does not match the model from "
                f"{self.initialised_from or 'model_config'!r}, whose vocabulary has {actual} tokens; "
                "give the data module the tokenizer that came with the model (its tokenizer.json)"
            )
        self.hparams["vocab_size"] = actual
        return actual


def _check_shape(source: PretrainedSource, ours: dict[str, Any]) -> None:
    """Fail unless a checkpoint's hyperparameters give the same shape fields as ``ours`` (naming those that differ)."""
    from lightning_efficient.models.presets import resolve_size

    theirs = source.hyper_parameters
    size = resolve_size(
        theirs.get("preset", "small"), theirs.get("hidden_size"), theirs.get("num_layers"),
        theirs.get("num_heads"), theirs.get("ffn_size"),
    )  # fmt: skip
    pretrained = {**vars(size), **{k: theirs[k] for k in ours if k in theirs and k not in vars(size)}}
    differing = {k: (v, pretrained[k]) for k, v in ours.items() if k in pretrained and pretrained[k] != v}
    if differing:
        detail = ", ".join(f"{k}: ours {a} vs checkpoint {b}" for k, (a, b) in differing.items())
        raise CheckpointMismatchError(f"pretrained {source.name!r} has another shape ({detail})")


def _refuse_changed_blocks(source: PretrainedSource) -> None:
    """Fail when a technique changed the blocks of the checkpoint's model (its surgery comes after this constructor)."""
    recorded = recorded_structure(source.checkpoint)
    adapter = adapter_record(source.checkpoint)
    if adapter:
        base = adapter.get("base") or "its base"
        raise CheckpointMismatchError(
            f"pretrained {source.name!r} is an adapter checkpoint (ParameterEfficientTuning): start from its base "
            f"(pretrained={base!r}) and apply the adapter with --adapter (or ParameterEfficientTuning(adapter=...))"
        )
    if recorded:
        names = ", ".join(entry["technique"] for entry in recorded.values())
        raise CheckpointMismatchError(
            f"pretrained {source.name!r} was trained with {names}, which changes the model's blocks; starting a new "
            "run from such weights is not supported yet (resume its own run with ckpt_path instead)"
        )


def _copy_checkpoint_weights(model: nn.Module, source: PretrainedSource, whole: bool) -> None:
    """Copy a checkpoint's ``model.`` weights into ``model``: all of them, or (``whole=False``) its base model's.

    Raises:
        CheckpointMismatchError: Keys are missing (besides a pooler) or unexpected.
    """
    base = getattr(model, "base_model_prefix", "")
    prefix = "model." if whole or not base else f"model.{base}."
    target = model if whole or not base else model.base_model
    state = {k[len(prefix) :]: v for k, v in source.checkpoint["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = target.load_state_dict(state, strict=False)
    tensors = target.state_dict()
    loaded = {tensors[k].data_ptr() for k in state if k in tensors}
    missing = [k for k in missing if not k.startswith("pooler.") and tensors[k].data_ptr() not in loaded]  # tied
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"pretrained {source.name!r}: weights missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


class TextClassifier(EfficientModule):
    """Base of the text classifiers (``BertClassifier``, ``BiLSTMClassifier``): every step from ``forward``.

    A subclass builds its network and ``forward(input_ids, attention_mask) -> (N, num_labels)``
    logits; this class gives the training step (the loss protocol: importance weights, a
    distillation teacher's soft targets), validation and test (loss, accuracy, macro F1), predict
    (label and probabilities), :meth:`importance_scores` and :meth:`distillation_logits`.
    """

    needs_tokenizer = True
    task = "sequence_classification"

    def batch_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Class logits ``(N, num_labels)`` of a text batch (``input_ids``, ``attention_mask``)."""
        return self(batch["input_ids"], batch["attention_mask"])

    def importance_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per example, the gradient-norm bound of its loss (for importance sampling)."""
        return cross_entropy_gradient_norms(self.batch_logits(batch), batch["labels"])

    def distillation_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits ``(N, num_labels)`` of the batch: what a distillation teacher gives (the loss protocol, rule 4)."""
        return self.batch_logits(batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.classification_training_step(self.batch_logits(batch), batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.classification_eval_step(self.batch_logits(batch), batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.classification_eval_step(self.batch_logits(batch), batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Predicted label name and class probabilities of each text."""
        return self.classification_predictions(self.batch_logits(batch), batch)
