"""Sequence-level knowledge distillation (Kim & Rush 2016): train on the teacher's translations.

Word-level distillation matches the teacher's distribution at every target token of the
reference. Sequence-level distillation instead replaces each training reference by the teacher's
beam-search translation of the source, and the student trains on those with its ordinary loss.
The translations are generated once, before training, and cached on disk under a key of the
teacher's weights, the beam width, the length limit and the source ids, so a second run (or a
resumed one) reads them instead of running the teacher.

- :func:`teacher_translations`: the frozen teacher's translations of token-id sources, as target
  ids of the data module's form (``text </s>``, or ``<s> text </s>`` for a BART tokenizer).
- :func:`cached_teacher_translations`: the same, read from or written to the disk cache.
- :func:`distil_targets`: replace a set-up :class:`~lightning_efficient.data.TranslationDataModule`'s
  training targets by the teacher's translations (validation and test keep their references).

Examples:
    >>> import tempfile
    >>> from lightning_efficient.models import Translation
    >>> _ = torch.manual_seed(0)
    >>> teacher = Translation(vocab_size=50, preset="tiny", max_length=8).eval()
    >>> sources = [[5, 6, 7, 1], [8, 1]]
    >>> directory = Path(tempfile.mkdtemp())
    >>> first = cached_teacher_translations(teacher, "fp", sources, num_beams=2, pad_id=0, directory=directory)
    >>> first == cached_teacher_translations(teacher, "fp", sources, num_beams=2, pad_id=0, directory=directory)
    True
    >>> len(list(directory.glob("*.json")))  # the second call read the file
    1
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_efficient.atomic_write import write_atomically
from lightning_efficient.data.text import pad_batch
from lightning_efficient.data.tokenizers import cache_root
from lightning_efficient.errors import ConfigurationError, check_int

__all__ = [
    "REFERENCES_ATTRIBUTE",
    "cache_key",
    "cached_teacher_translations",
    "distil_targets",
    "teacher_translations",
]

#: The attribute of a data module under which :func:`distil_targets` keeps the original training split.
REFERENCES_ATTRIBUTE = "reference_train_split"
#: Part of every cache key: a change of the file's layout or of the post-processing gives new keys.
_FORMAT_VERSION = 1


def _check_teacher(teacher: Any) -> None:
    """Fail unless ``teacher`` is a sequence-to-sequence module whose ``model`` can ``generate``."""
    task = getattr(teacher, "task", None)
    generate = getattr(getattr(teacher, "model", None), "generate", None)
    if task != "seq2seq" or not callable(generate):
        raise ConfigurationError(
            f"sequence-level distillation needs a translation teacher (task 'seq2seq' with a .model.generate, as "
            f"lightning_efficient.Translation), got a {type(teacher).__name__} of task {task!r}"
        )


def _length_limit(teacher: nn.Module, max_length: int | None) -> int:
    """``max_length``, or the teacher's own generation limit (``hparams.max_length``, else its positions)."""
    if max_length is not None:
        return check_int("max_length", max_length, low=1)
    limit = getattr(teacher, "hparams", {}).get("max_length")
    if limit is None:
        limit = getattr(teacher.model.config, "max_position_embeddings", None)
    if limit is None:
        raise ConfigurationError(f"the teacher {type(teacher).__name__} has no max_length: pass max_length")
    return int(limit)


def _as_target(generated: list[int], eos_id: int, max_length: int) -> list[int]:
    """One generated row as data-module target ids: without the decoder start token, ending at the first ``</s>``.

    A row cut at ``max_length`` before any ``</s>`` (a teacher without ``forced_eos_token_id``) is
    cut to ``max_length - 1`` tokens and ended with ``</s>``, as the data module's targets all are.

    Examples:
        >>> _as_target([0, 7, 8, 1, 0, 0], eos_id=1, max_length=5)  # Marian: starts with <pad>
        [7, 8, 1]
        >>> _as_target([1, 7, 8, 1], eos_id=1, max_length=5)  # our BART starts with </s> itself
        [7, 8, 1]
        >>> _as_target([0, 7, 8, 9, 9, 9], eos_id=1, max_length=5)
        [7, 8, 9, 9, 1]
    """
    tokens = generated[1:]
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return [*tokens[: max_length - 1], eos_id]


def teacher_translations(
    teacher: nn.Module,
    sources: Sequence[list[int]],
    *,
    num_beams: int = 4,
    batch_size: int = 32,
    max_length: int | None = None,
    pad_id: int,
) -> list[list[int]]:
    """The teacher's deterministic beam-search translations of ``sources``, as target ids.

    Sources are batched longest first (less padding; an out-of-memory error comes at once) and the
    translations returned in the order of ``sources``. Each is in the form of the data module's
    target ids: the decoder start token and the padding after ``</s>`` removed, ``</s>`` kept (the
    tokens before it are kept as generated).
    Right padding with an attention mask does not change a translation, only float rounding can
    (the tests compare batched and one-by-one generation).

    Args:
        teacher: A :class:`~lightning_efficient.models.Translation` (or any module of task ``seq2seq``
            whose ``model`` has Hugging Face's ``generate``); run in eval mode under ``no_grad``,
            and left in the mode it had.
        sources: Source token ids, each as the data module gives them (ending with ``</s>``).
        num_beams: Beam width (1: greedy).
        batch_size: Sources per ``generate`` call.
        max_length: Most target tokens, ``</s>`` included; default: the teacher's ``max_length``.
        pad_id: The tokenizer's ``<pad>`` id, which pads the source batches.

    Returns:
        One list of target ids per source.

    Raises:
        ConfigurationError: Not a translation teacher, a bad count, or an empty source.

    Examples:
        >>> from lightning_efficient.models import Translation
        >>> _ = torch.manual_seed(0)
        >>> teacher = Translation(vocab_size=50, preset="tiny", max_length=8)
        >>> translations = teacher_translations(teacher, [[5, 6, 7, 1], [8, 1]], num_beams=2, pad_id=0)
        >>> [t[-1] for t in translations], all(len(t) <= 8 for t in translations)
        ([1, 1], True)
    """
    _check_teacher(teacher)
    check_int("num_beams", num_beams, low=1)
    check_int("batch_size", batch_size, low=1)
    max_length = _length_limit(teacher, max_length)
    empty = [i for i, source in enumerate(sources) if len(source) == 0]
    if empty:
        raise ConfigurationError(f"sources {empty[:5]} are empty; every source needs at least its </s> token")
    model = teacher.model
    eos_id = model.config.eos_token_id
    device = next(model.parameters()).device
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    translations: list[list[int]] = [[] for _ in sources]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(sources), desc="Teacher translations", unit="pair", disable=None) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                input_ids, attention_mask = pad_batch([sources[i] for i in rows], pad_id)
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    num_beams=num_beams,
                    do_sample=False,
                    max_new_tokens=max_length,
                )
                for i, generated in zip(rows, output.tolist()):
                    translations[i] = _as_target(generated, eos_id, max_length)
                bar.update(len(rows))
    finally:
        model.train(was_training)
    return translations


def cache_key(teacher_fingerprint: str, sources: Sequence[list[int]], *, num_beams: int, max_length: int) -> str:
    """The SHA-256 naming the cached translations of ``sources`` by one teacher at one beam width and length.

    Examples:
        >>> cache_key("fp", [[5, 1]], num_beams=4, max_length=8) == cache_key("fp", [[5, 1]], num_beams=4, max_length=8)
        True
        >>> cache_key("fp", [[5, 1]], num_beams=4, max_length=8) == cache_key("fp", [[5, 1]], num_beams=1, max_length=8)
        False
    """
    content = [_FORMAT_VERSION, teacher_fingerprint, num_beams, max_length, [[int(t) for t in s] for s in sources]]
    return hashlib.sha256(json.dumps(content, separators=(",", ":")).encode()).hexdigest()


def _read_cache(path: Path, count: int) -> list[list[int]] | None:
    """The translations in ``path``, or None when it is missing or not ``count`` lists of ids (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        translations = json.loads(path.read_text(encoding="utf-8"))["translations"]
    except (OSError, ValueError, KeyError, TypeError):
        translations = None
    valid = (
        isinstance(translations, list)
        and len(translations) == count
        and all(isinstance(t, list) and all(isinstance(i, int) for i in t) for t in translations)
    )
    if not valid:
        warnings.warn(f"the sequence-distillation cache {path} is unreadable; translating again", stacklevel=3)
        return None
    return translations


def cached_teacher_translations(
    teacher: nn.Module,
    teacher_fingerprint: str,
    sources: Sequence[list[int]],
    *,
    num_beams: int = 4,
    batch_size: int = 32,
    max_length: int | None = None,
    pad_id: int,
    directory: Path | None = None,
) -> list[list[int]]:
    """:func:`teacher_translations`, generated once and then read from a JSON file.

    The file is ``<directory>/<cache_key>.json`` (:func:`cache_key`: the teacher's fingerprint, the
    beam width, the length limit and the source ids), written atomically; a later call with the same
    key reads it and does not run the teacher. An unreadable file is translated again and
    replaced; a directory that cannot be written is skipped with a warning.

    Args:
        teacher: The frozen translation teacher (see :func:`teacher_translations`).
        teacher_fingerprint: The teacher's weights' fingerprint
            (:func:`~lightning_efficient.callbacks.distillation.teacher.fingerprint`).
        sources: Source token ids.
        num_beams: Beam width.
        batch_size: Sources per ``generate`` call (not part of the key).
        max_length: Most target tokens; default: the teacher's ``max_length``.
        pad_id: The tokenizer's ``<pad>`` id.
        directory: Where the files are; default ``$LIGHTNING_EFFICIENT_CACHE/sequence_distillation``.

    Returns:
        One list of target ids per source.
    """
    _check_teacher(teacher)
    max_length = _length_limit(teacher, max_length)
    key = cache_key(teacher_fingerprint, sources, num_beams=num_beams, max_length=max_length)
    path = Path(directory or cache_root() / "sequence_distillation") / f"{key}.json"
    cached = _read_cache(path, len(sources))
    if cached is not None:
        return cached
    translations = teacher_translations(
        teacher, sources, num_beams=num_beams, batch_size=batch_size, max_length=max_length, pad_id=pad_id
    )
    record = {"teacher": teacher_fingerprint, "num_beams": num_beams, "max_length": max_length}
    try:
        write_atomically(path, json.dumps({**record, "translations": translations}, separators=(",", ":")))
    except OSError as err:
        warnings.warn(
            f"could not write the sequence-distillation cache {path} ({err}); going on without it", stacklevel=2
        )
    return translations


def _training_pairs(datamodule: Any) -> list[tuple[list[int], list[int], str, str]]:
    splits = getattr(datamodule, "splits", None)
    train = splits.get("train") if isinstance(splits, dict) else None
    if not train or not all(isinstance(item, tuple) and len(item) == 4 for item in train):
        raise ConfigurationError(
            f"sequence-level distillation needs a set-up TranslationDataModule (splits['train'] of (source_ids, "
            f"target_ids, source_text, target_text) pairs), got a {type(datamodule).__name__} without one"
        )
    return train


def distil_targets(
    datamodule: Any,
    teacher: nn.Module,
    teacher_fingerprint: str,
    *,
    num_beams: int = 4,
    batch_size: int = 32,
    directory: Path | None = None,
) -> dict[str, float]:
    """Replace the training targets of a set-up translation data module by the teacher's translations.

    Each training pair keeps its source ids and text; its target ids become the teacher's
    translation (:func:`cached_teacher_translations`, at most the data module's ``max_length``
    tokens) and its target text their decoding by the data module's tokenizer. Validation and test
    keep their references, so BLEU still measures against them. The original training split is
    kept in the data module's :data:`REFERENCES_ATTRIBUTE` attribute, and every call translates
    those references' sources: a second call (or another teacher) never translates translations.

    Args:
        datamodule: A :class:`~lightning_efficient.data.TranslationDataModule` after ``setup("fit")``.
        teacher: The frozen translation teacher.
        teacher_fingerprint: Its fingerprint (the cache key).
        num_beams: Beam width.
        batch_size: Sources per ``generate`` call.
        directory: The cache directory (see :func:`cached_teacher_translations`).

    Returns:
        ``pairs`` (training pairs), ``changed`` (targets that differ from the reference),
        ``mean_length_before`` and ``mean_length_after`` (mean target tokens of the references and of
        the translations).

    Raises:
        ConfigurationError: No set-up translation training split, or not a translation teacher.
    """
    _check_teacher(teacher)
    train = _training_pairs(datamodule)
    references = getattr(datamodule, REFERENCES_ATTRIBUTE, None)
    if references is None or [item[0] for item in references] != [item[0] for item in train]:
        references = list(train)  # first call, or the split was built again since
        setattr(datamodule, REFERENCES_ATTRIBUTE, references)
    max_length = min(int(datamodule.max_length), _length_limit(teacher, None))
    translations = cached_teacher_translations(
        teacher,
        teacher_fingerprint,
        [source for source, _, _, _ in references],
        num_beams=num_beams,
        batch_size=batch_size,
        max_length=max_length,
        pad_id=datamodule.pad_id,
        directory=directory,
    )
    texts = datamodule.tokenizer.decode_batch(translations, skip_special_tokens=True)
    datamodule.splits["train"] = [
        (source, target, source_text, text)
        for (source, _, source_text, _), target, text in zip(references, translations, texts)
    ]
    count = len(references)
    return {
        "pairs": count,
        "changed": sum(target != reference[1] for target, reference in zip(translations, references)),
        "mean_length_before": sum(len(reference[1]) for reference in references) / count,
        "mean_length_after": sum(len(target) for target in translations) / count,
    }
