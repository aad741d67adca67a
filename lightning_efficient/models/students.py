"""Smaller BERT students of a BERT teacher, started DistilBERT-style from the teacher's own layers.

:func:`bert_student` builds a module of the teacher's class (:class:`~lightning_efficient.BertClassifier`
or :class:`~lightning_efficient.BertMLM`: same vocabulary, labels, tokenizer and ``max_length``)
with fewer Transformer blocks, and optionally narrower. A student of the teacher's width starts
from the teacher: embeddings, the blocks chosen by ``layer_map``, and the pooler, classifier or
masked-LM head, copied (DistilBERT, Sanh et al. 2019, initialised its student from every other
layer of BERT-base). A narrower student cannot take the teacher's matrices and starts random.

The student is an ordinary module of its class, built through the class's own constructor with
explicit sizes, so it trains with the normal ``Trainer`` and its checkpoints reload with
``load_from_checkpoint`` without the teacher.

Examples:
    >>> from lightning_efficient.models.bert import BertClassifier
    >>> teacher = BertClassifier(vocab_size=100, num_labels=2, preset="tiny", num_layers=4)
    >>> student = bert_student(teacher, num_layers=2)
    >>> type(student).__name__, student.hparams.num_layers, student.initialised_from
    ('BertClassifier', 2, 'BertClassifier, teacher layers [1, 3]')
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from lightning_efficient.blocks import BlockStack, find_block_stacks
from lightning_efficient.checkpoint import checkpoint_module_class
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError, check_choice, check_int
from lightning_efficient.models.bert import BertClassifier, BertMLM
from lightning_efficient.models.presets import ModelSize, resolve_size

__all__ = ["BERT_MODULES", "bert_student", "bert_teacher", "uniform_layer_map"]

#: The module classes of ours that can be a BERT teacher (and whose students :func:`bert_student` builds).
BERT_MODULES: dict[str, type[BertClassifier | BertMLM]] = {"BertClassifier": BertClassifier, "BertMLM": BertMLM}

#: Our size arguments and the transformers config fields (BERT layout) that hold them.
_CONFIG_FIELDS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "ffn_size": "intermediate_size",
}


def bert_teacher(teacher: nn.Module | str | Path) -> BertClassifier | BertMLM:
    """A BERT teacher module: ``teacher`` itself, or loaded from one of our checkpoints with the class it names.

    Args:
        teacher: A :class:`~lightning_efficient.BertClassifier` or :class:`~lightning_efficient.BertMLM`,
            or the path of a checkpoint one of them wrote.

    Raises:
        ConfigurationError: ``teacher`` is another module, or a directory (build a ``BertClassifier``
            with ``pretrained=`` that directory and pass the module).
        CheckpointMismatchError: The checkpoint was written by another module, or not by this package.
        DataError: Nothing exists at the path, or it is not a checkpoint.

    Examples:
        >>> bert_teacher(nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: the teacher is a Linear; it must be a BertClassifier or BertMLM, or the path of one of their checkpoints
    """
    if isinstance(teacher, (BertClassifier, BertMLM)):
        return teacher
    if not isinstance(teacher, (str, Path)):
        raise ConfigurationError(
            f"the teacher is a {type(teacher).__name__}; it must be a BertClassifier or BertMLM, "
            "or the path of one of their checkpoints"
        )
    path = Path(teacher).expanduser()
    if path.is_dir():
        raise ConfigurationError(
            f"teacher {str(teacher)!r} is a directory; give one of our BertClassifier or BertMLM .ckpt files, or "
            "build BertClassifier(pretrained=<the directory>) and pass that module"
        )
    written_by = checkpoint_module_class(path)  # DataError / CorruptCheckpointError for a missing or broken file
    if written_by not in BERT_MODULES:
        raise CheckpointMismatchError(
            f"teacher {str(teacher)!r} was written by {written_by or 'something else than this package'}; "
            "it must be a BertClassifier or BertMLM checkpoint"
        )
    return BERT_MODULES[written_by].load_from_checkpoint(path, map_location="cpu", weights_only=True)


def uniform_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layer each student layer starts from: student layer ``i`` <- teacher layer ``(i + 1) * T // S - 1``.

    With ``S`` dividing ``T`` that is every ``k``-th layer, ``k - 1, 2k - 1, ..., T - 1`` (``k = T / S``):
    the last layer of each block of ``k``, TinyBERT's depth mapping (its attention targets are
    ``teacher_atts[i * k + k - 1]``). Otherwise the same formula spreads the layers evenly and still
    ends on the teacher's top layer.

    Examples:
        >>> uniform_layer_map(12, 6), uniform_layer_map(12, 5), uniform_layer_map(4, 1)
        ([1, 3, 5, 7, 9, 11], [1, 3, 6, 8, 11], [3])
    """
    check_int("student_layers", student_layers, low=1, high=teacher_layers)
    return [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers)]


def _checked_layer_map(layer_map: str | Sequence[int], teacher_layers: int, student_layers: int) -> list[int]:
    """``layer_map`` resolved to one teacher layer per student layer, or a clear error."""
    if isinstance(layer_map, str):
        check_choice("layer_map", layer_map, ("uniform",))
        return uniform_layer_map(teacher_layers, student_layers)
    mapping = list(layer_map)
    if len(mapping) != student_layers:
        raise ConfigurationError(
            f"layer_map={mapping} has {len(mapping)} entries but num_layers={student_layers}: "
            "give one teacher layer per student layer"
        )
    bad = [i for i in mapping if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < teacher_layers]
    if bad:
        raise ConfigurationError(
            f"layer_map={mapping} holds {bad}; the teacher's layers are numbered 0 to {teacher_layers - 1}"
        )
    return mapping


def _encoder_stack(teacher: BertClassifier | BertMLM) -> BlockStack:
    """The teacher's one stack of Transformer blocks, checked to have a BERT-layout config."""
    config = teacher.model.config
    missing = [field for field in _CONFIG_FIELDS.values() if not hasattr(config, field)]
    if missing:
        raise ConfigurationError(
            f"the teacher's model is a {config.model_type!r} model, whose config has no {', '.join(missing)}; "
            "bert_student builds students of BERT-layout encoders (BERT, RoBERTa, ...)"
        )
    if getattr(config, "pruned_linears", None):
        raise ConfigurationError(
            "the teacher was structurally pruned (its layers have shapes of their own); "
            "build the student from the teacher before pruning"
        )
    stacks = find_block_stacks(teacher.model)
    if len(stacks) != 1:
        raise ConfigurationError(f"the teacher has {len(stacks)} block stacks; a BERT teacher has one encoder stack")
    return stacks[0]


def _build_student(teacher: BertClassifier | BertMLM, size: ModelSize) -> BertClassifier | BertMLM:
    """A fresh module of the teacher's class and arguments, of shape ``size``, built by its constructor."""
    arguments = dict(teacher.hparams)
    arguments.update(pretrained=None, model_config=None)
    if "pretrained_checkpoint" in arguments:
        arguments["pretrained_checkpoint"] = None
    sizes = vars(size)
    if teacher.built_from_config:  # its architecture comes from a config (a save_pretrained directory): change it
        config = copy.deepcopy(teacher.model.config)
        for ours, field in _CONFIG_FIELDS.items():
            setattr(config, field, sizes[ours])
        arguments.update(model_config=config.to_dict(), **dict.fromkeys(sizes))
    else:
        arguments.update(sizes)
    return type(teacher)(**arguments)


def _copy_teacher(
    teacher: BertClassifier | BertMLM, stack: BlockStack, student: BertClassifier | BertMLM, layer_map: list[int]
) -> None:
    """Copy every weight of the teacher's model into the student's, block ``i`` from teacher block ``layer_map[i]``."""
    prefix = f"{stack.path}."
    state = {k: v for k, v in teacher.model.state_dict().items() if not k.startswith(prefix)}
    for student_index, teacher_index in enumerate(layer_map):
        block = stack.blocks[teacher_index].state_dict()
        state.update({f"{prefix}{student_index}.{k}": v for k, v in block.items()})
    student.model.load_state_dict(state)  # strict: every student weight is set


def bert_student(
    teacher: nn.Module | str | Path,
    num_layers: int,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    ffn_size: int | None = None,
    layer_map: str | Sequence[int] = "uniform",
) -> BertClassifier | BertMLM:
    """A BERT student of ``teacher``: its class and arguments, ``num_layers`` blocks, started from its layers.

    When the width is the teacher's (``hidden_size``, ``num_heads`` and ``ffn_size`` unset or equal),
    the student starts DistilBERT-style: the embeddings, the pooler and the classifier (or the
    masked-LM head) are copied, and student block ``i`` is a copy of teacher block ``layer_map[i]``.
    Otherwise the teacher's matrices do not fit, and the student starts random (it warns).

    ``layer_map="uniform"`` (:func:`uniform_layer_map`) takes teacher layers ``k - 1, 2k - 1, ...,
    T - 1`` for ``k = T / S``: the last layer of each block of ``k`` layers, TinyBERT's mapping.
    It is chosen because each student block then starts as the teacher block whose output it is
    meant to reproduce at that relative depth (what layer-wise distillation compares), and the top
    student block is the teacher's top block, whose outputs the copied pooler and head were trained
    on. DistilBERT's own extraction script took BERT-base layers ``[0, 2, 4, 7, 9, 11]`` (keeping the
    bottom layer); pass that list as ``layer_map`` to reproduce it.

    The student keeps the teacher's vocabulary, labels, tokenizer, ``max_length``, dropout and
    optimiser arguments. It is built by its class's constructor with explicit sizes (a teacher
    started from a ``save_pretrained`` directory gives a student ``model_config`` of the new sizes),
    so it trains with the normal ``Trainer`` and ``load_from_checkpoint`` rebuilds it. Its
    ``initialised_from`` names the teacher and the layers copied.

    Args:
        teacher: A ``BertClassifier`` or ``BertMLM``, or the path of one of their checkpoints
            (:func:`bert_teacher`).
        num_layers: Blocks of the student, from 1 to the teacher's.
        hidden_size: Width of the student (default: the teacher's).
        num_heads: Attention heads (default: the teacher's); must divide ``hidden_size``.
        ffn_size: FFN inner width (default: the teacher's).
        layer_map: ``"uniform"``, or the teacher layer (0-based) of each student layer.

    Returns:
        A new module of the teacher's class.

    Raises:
        ConfigurationError: ``num_layers`` out of range, a ``layer_map`` of the wrong length or out of
            range, bad sizes, or a teacher that is not a BERT module (see :func:`bert_teacher`).
        CheckpointMismatchError: A checkpoint of another module.

    Examples:
        >>> from lightning_efficient.models.bert import BertMLM
        >>> teacher = BertMLM(vocab_size=80, preset="tiny")  # 3 layers
        >>> student = bert_student(teacher, num_layers=2, layer_map=[0, 2])
        >>> student.initialised_from, len(student.model.bert.encoder.layer)
        ('BertMLM, teacher layers [0, 2]', 2)
    """
    name = type(teacher).__name__ if isinstance(teacher, nn.Module) else str(teacher)
    teacher = bert_teacher(teacher)
    stack = _encoder_stack(teacher)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= len(stack):
        raise ConfigurationError(
            f"num_layers={num_layers!r} must be an integer from 1 to the teacher's {len(stack)} layers"
        )
    config = teacher.model.config
    theirs = {ours: getattr(config, _CONFIG_FIELDS[ours]) for ours in ("hidden_size", "num_heads", "ffn_size")}
    given = {"hidden_size": hidden_size, "num_heads": num_heads, "ffn_size": ffn_size}
    widths = {key: theirs[key] if value is None else value for key, value in given.items()}
    size = resolve_size("tiny", num_layers=num_layers, **widths)  # every field explicit: validated only
    mapping = _checked_layer_map(layer_map, len(stack), num_layers)
    student = _build_student(teacher, size)
    student.tokenizer = teacher.tokenizer
    if widths == theirs:
        _copy_teacher(teacher, stack, student, mapping)
        student.initialised_from = f"{name}, teacher layers {mapping}"
    else:
        differing = ", ".join(f"{k} {theirs[k]} -> {widths[k]}" for k in widths if widths[k] != theirs[k])
        warnings.warn(
            f"bert_student: the student's width differs from the teacher's ({differing}), so it starts from random "
            "weights; only a student of the teacher's width starts from the teacher's layers",
            UserWarning,
            stacklevel=2,
        )
    return student
