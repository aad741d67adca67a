"""Errors raised by lightning_efficient before any training starts, and the validators that raise them.

Every error names the bad value and what is allowed, so a user can fix a YAML file without
reading our source. Techniques, models, data modules and strategies validate their arguments with
the functions here (:func:`check_choice`, :func:`check_range`, :func:`check_int`,
:func:`check_patterns`), so one kind of mistake reads the same everywhere.

Examples:
    >>> check_int("every", 0, low=1)
    Traceback (most recent call last):
    ...
    lightning_efficient.errors.ConfigurationError: every=0 must be an integer >= 1
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "CheckpointMismatchError",
    "ConfigurationError",
    "CorruptCheckpointError",
    "DataError",
    "NoTargetModulesError",
    "NonFiniteLossError",
    "check_choice",
    "check_int",
    "check_patterns",
    "check_range",
    "did_you_mean",
]


class ConfigurationError(ValueError):
    """An argument of a module, data module or technique is invalid.

    Examples:
        >>> raise ConfigurationError("preset='huge' is unknown; choose one of: tiny, small, base")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: preset='huge' is unknown; choose one of: tiny, small, base
    """


class DataError(ConfigurationError):
    """A data file is missing, unreadable, or lacks a requested column."""


class CheckpointMismatchError(ConfigurationError):
    """A checkpoint was written by a different model type or holds no tokenizer."""


class CorruptCheckpointError(CheckpointMismatchError, DataError):
    """A checkpoint file is truncated (a copy or save cut short) or is not a checkpoint at all.

    Examples:
        >>> raise CorruptCheckpointError("checkpoint 'a.ckpt' is truncated or not a checkpoint (EOF)")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.CorruptCheckpointError: checkpoint 'a.ckpt' is truncated or not a checkpoint (EOF)
    """


class NoTargetModulesError(ConfigurationError):
    """A technique found nothing to act on (no block stack, no module matching a pattern).

    Techniques raise it instead of silently doing nothing.
    """


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the candidate nearest to ``word``, or ``""`` when none is near.

    Examples:
        >>> did_you_mean("fromm", ["from", "config"])
        "; did you mean 'from'?"
    """
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else fail naming both.

    Examples:
        >>> check_choice("schedule", "cubic", ("cubic", "linear"))
        'cubic'
        >>> check_choice("schedule", "cubc", ("cubic", "linear"))
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: schedule='cubc' is unknown; choose one of: 'cubic', 'linear'
    """
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigurationError(f"{name}={value!r} is unknown; choose one of: {', '.join(map(repr, allowed))}")
    return value


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> Any:
    """Return ``value`` if it is a finite number within the bounds, else fail naming the range.

    Examples:
        >>> check_range("drop_rate", 0.5, low=0.0, high=1.0, high_inclusive=False)
        0.5
        >>> check_range("drop_rate", 1.0, low=0.0, high=1.0, high_inclusive=False)
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: drop_rate=1.0 must lie in [0.0, 1.0)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(f"{name}={value!r} must be a finite number")
    too_low = low is not None and (value < low or (value == low and not low_inclusive))
    too_high = high is not None and (value > high or (value == high and not high_inclusive))
    if too_low or too_high:
        if low is not None and high is not None:
            bounds = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
            raise ConfigurationError(f"{name}={value!r} must lie in {bounds}")
        if low is not None:
            raise ConfigurationError(f"{name}={value!r} must be {'>=' if low_inclusive else '>'} {low}")
        raise ConfigurationError(f"{name}={value!r} must be {'<=' if high_inclusive else '<'} {high}")
    return value


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None, optional: bool = False) -> Any:
    """Return ``value`` if it is an ``int`` (not a bool) within ``[low, high]``, else fail naming the range.

    Args:
        name: The argument's name, as the user spells it.
        value: The value given.
        low: Smallest allowed value (None: no bound).
        high: Largest allowed value (None: no bound).
        optional: Also accept None (and return it).

    Examples:
        >>> check_int("frequency", 3, low=1), check_int("end_step", None, optional=True)
        (3, None)
        >>> check_int("frequency", 2.5, low=1)
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: frequency=2.5 must be an integer >= 1
    """
    if value is None and optional:
        return None
    bounds = [f">= {low}" if low is not None else "", f"<= {high}" if high is not None else ""]
    if low is not None and high is not None:
        wanted = f"an integer in [{low}, {high}]"
    else:
        wanted = " ".join(["an integer", *[b for b in bounds if b]])
    wanted += " or None" if optional else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name}={value!r} must be {wanted}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigurationError(f"{name}={value!r} must be {wanted}")
    return value


def check_patterns(name: str, value: Any, optional: bool = True) -> list[str] | None:
    """Return ``value`` as a list of non-empty strings (name patterns), else fail saying what is expected.

    A single string is refused (a YAML ``include: "*.query"`` is one pattern, not a list of
    characters): write it as a list.

    Examples:
        >>> check_patterns("include", ["*.query", "*.value"]), check_patterns("exclude", None)
        (['*.query', '*.value'], None)
        >>> check_patterns("include", "*.query")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: include='*.query' must be a list of name patterns, e.g. ['*.query']
    """
    if value is None and optional:
        return None
    example = f"[{value!r}]" if isinstance(value, str) and value else "['*.attention.*']"
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ConfigurationError(f"{name}={value!r} must be a list of name patterns, e.g. {example}")
    if not all(isinstance(pattern, str) and pattern for pattern in value):
        raise ConfigurationError(f"{name}={list(value)!r} must hold only non-empty strings (name patterns)")
    return list(value)


class NonFiniteLossError(RuntimeError):
    """The training loss (or the weights about to be saved) became ``nan`` or ``inf``.

    Raised by :class:`~lightning_efficient.safeguards.NonFiniteLossGuard` before the backward pass and
    before any checkpoint is written, so the last checkpoint on disk still holds finite weights.
    """
