"""The teacher of a distillation: where it comes from, how it is frozen, and whether it fits the student.

A teacher is one of the package's LightningModules (anything following the loss protocol's rule 4,
:mod:`lightning_efficient.losses`), given as

- a module instance (used as it is, frozen);
- ``"self"``: a frozen copy of the student as it is when training starts (self-distillation, e.g. a
  pruned or quantized student learning from its uncompressed self);
- one of our checkpoints (the class is the one that wrote it);
- a ``save_pretrained`` directory or hub id (loaded as our module for the student's task:
  :data:`TEACHER_FOR_TASK`).

It is frozen by :func:`freeze` (``requires_grad_(False)`` *and* ``eval()``: eval alone still builds a
graph) and run under ``no_grad``. It never becomes a submodule of the student, so it is never in the
student's ``state_dict`` or checkpoint, and Lightning's "modules in eval mode" warning does not see it.

Examples:
    >>> from lightning_efficient.models import BertClassifier
    >>> student = BertClassifier(vocab_size=50, num_labels=2, preset="tiny")
    >>> teacher = load_teacher("self", student)
    >>> teacher is student, any(p.requires_grad for p in teacher.parameters()), teacher.training, student.training
    (False, False, False, True)
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_efficient.callbacks.distillation.cache import tensor_bytes
from lightning_efficient.checkpoint import checkpoint_module_class
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError, DataError
from lightning_efficient.models.pretrained import describe_source

__all__ = [
    "TEACHER_FOR_TASK",
    "check_compatible",
    "fingerprint",
    "freeze",
    "load_teacher",
    "locate_teacher",
    "output_names",
]

#: The module of ours that loads a ``save_pretrained`` directory as the teacher of a student of each task.
TEACHER_FOR_TASK: dict[str, str] = {
    "sequence_classification": "BertClassifier",
    "masked_lm": "BertMLM",
    "seq2seq": "Translation",
    "image_classification": "ViTClassifier",
}


def freeze(teacher: nn.Module) -> nn.Module:
    """``requires_grad_(False)`` and ``eval()``: no gradient, no dropout. Returns ``teacher``."""
    teacher.requires_grad_(False)
    return teacher.eval()


def frozen_copy(student: pl.LightningModule) -> nn.Module:
    """A frozen deep copy of ``student`` (without its trainer): the ``"self"`` teacher."""
    trainer = getattr(student, "_trainer", None)
    student._trainer = None
    try:
        teacher = copy.deepcopy(student)
    finally:
        student._trainer = trainer
    return freeze(teacher)


def _module_class(name: str) -> type:
    from lightning_efficient import models

    cls = getattr(models, name, None)
    if cls is None:
        raise CheckpointMismatchError(f"the teacher was written by {name}, which is not one of the package's modules")
    return cls


def _trained_labels(directory: Path) -> list[str]:
    """The class names in a ``save_pretrained`` directory's ``config.json`` (empty when it names none)."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8")) if directory.is_dir() else {}
    id2label = config.get("id2label") or {}
    return [str(id2label[key]) for key in sorted(id2label, key=int)]


def _directory_teacher(source: str, directory: Path, student: nn.Module) -> nn.Module:
    task = getattr(student, "task", None)
    if task not in TEACHER_FOR_TASK:
        raise ConfigurationError(
            f"teacher={source!r} is a save_pretrained directory, but the student {type(student).__name__} has no task "
            f"the package loads directories for ({', '.join(TEACHER_FOR_TASK)}); give one of our checkpoints or a "
            "module instance"
        )
    arguments: dict[str, Any] = {"pretrained": source}
    names = output_names(student)
    if names is not None:
        trained = _trained_labels(directory)
        if trained != list(names) and trained != [f"LABEL_{i}" for i in range(len(names))]:
            raise CheckpointMismatchError(
                f"teacher={source!r} was trained on the labels {trained or 'of none (no classifier head)'}, the "
                f"student's are {list(names)}: teacher and student must predict the same classes in the same order"
            )
        arguments |= {"num_labels": len(names), "label_names": list(names)}
    return _module_class(TEACHER_FOR_TASK[task])(**arguments)


def locate_teacher(source: str) -> tuple[str, Path]:
    """``(kind, path)`` of a teacher path (see :func:`~lightning_efficient.models.pretrained.describe_source`), loading nothing.

    Raises:
        DataError: The path does not exist (the message names ``teacher=``).

    Examples:
        >>> locate_teacher("runs/nowhere/last.ckpt")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.DataError: teacher='runs/nowhere/last.ckpt' does not exist; give one of our .ckpt files, a directory written by save_pretrained, or a Hugging Face hub id
    """
    try:
        return describe_source(source)
    except DataError as err:
        raise DataError(str(err).replace("pretrained=", "teacher=", 1)) from None


def load_teacher(source: str | nn.Module, student: pl.LightningModule) -> nn.Module:
    """The frozen teacher given by ``source`` (see the module docstring).

    Raises:
        DataError: A path that does not exist.
        CorruptCheckpointError: A file that is not a checkpoint.
        CheckpointMismatchError: A checkpoint not written by one of our modules, or a directory's
            classifier trained on other labels.
        ConfigurationError: A directory for a student of a task without a directory loader.
    """
    if isinstance(source, nn.Module):
        return freeze(source)
    if source == "self":
        return frozen_copy(student)
    kind, path = locate_teacher(source)
    if kind != "checkpoint":
        return freeze(_directory_teacher(str(source), path, student))
    module = checkpoint_module_class(path)  # a broken file: CorruptCheckpointError naming it
    if module is None:
        raise CheckpointMismatchError(
            f"teacher={str(source)!r} is a checkpoint none of our modules wrote; give one of ours (it names its "
            "class), a save_pretrained directory, or a module instance"
        )
    return freeze(_module_class(module).load_from_checkpoint(path, map_location="cpu", weights_only=True))


def fingerprint(module: nn.Module) -> str:
    """A SHA-256 of the module's parameters and buffers (names, shapes, values): the same teacher on resume.

    Examples:
        >>> fingerprint(nn.Linear(2, 2)) == fingerprint(nn.Linear(2, 2))  # other random weights
        False
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def output_names(module: nn.Module) -> list[str] | None:
    """The class names a classifier predicts (``label_names``), or None for models that predict tokens."""
    names = getattr(module, "label_names", None)
    return [str(name) for name in names] if names is not None else None


def _vocabulary(module: nn.Module, datamodule: Any) -> dict[str, int] | None:
    tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is None and datamodule is not None:
        tokenizer = getattr(datamodule, "tokenizer", None)
    return tokenizer.get_vocab() if tokenizer is not None else None


def check_compatible(teacher: nn.Module, student: nn.Module, datamodule: Any = None) -> None:
    """Fail unless teacher and student follow the loss protocol and predict the same classes from the same ids.

    Args:
        teacher: The frozen teacher.
        student: The student LightningModule.
        datamodule: The student's data (its tokenizer stands for the student's when the student has none yet).

    Raises:
        ConfigurationError: One of them lacks ``distillation_logits``.
        CheckpointMismatchError: Different label sets, vocabulary sizes or tokenizers.
    """
    for role, module in (("student", student), ("teacher", teacher)):
        if not callable(getattr(module, "distillation_logits", None)):
            raise ConfigurationError(
                f"the {role} {type(module).__name__} does not follow the loss protocol: it has no "
                "distillation_logits(batch) (see lightning_efficient.losses, rule 4; the package's modules have it)"
            )
    teacher_names, student_names = output_names(teacher), output_names(student)
    if (teacher_names is None) != (student_names is None) or teacher_names != student_names:
        raise CheckpointMismatchError(
            f"teacher and student predict different label sets: teacher {teacher_names}, student {student_names}; "
            "distil into a student of the teacher's classes"
        )
    teacher_size = getattr(teacher, "hparams", {}).get("vocab_size")
    student_size = getattr(student, "hparams", {}).get("vocab_size")
    if teacher_size is not None and student_size is not None and teacher_size != student_size:
        raise CheckpointMismatchError(
            f"teacher and student have different vocabularies (vocab_size {teacher_size} and {student_size}); "
            "train the student on the teacher's tokenizer (data tokenizer: the teacher's checkpoint)"
        )
    teacher_vocab, student_vocab = _vocabulary(teacher, None), _vocabulary(student, datamodule)
    if teacher_vocab is not None and student_vocab is not None and teacher_vocab != student_vocab:
        differing = sum(student_vocab.get(token) != index for token, index in teacher_vocab.items())
        raise CheckpointMismatchError(
            f"teacher and student tokenize differently ({differing} of the teacher's {len(teacher_vocab)} tokens have "
            "another id in the student's tokenizer); train the student on the teacher's tokenizer "
            "(data tokenizer: the teacher's checkpoint or its tokenizer.json)"
        )
