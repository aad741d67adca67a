"""Errors raised by lightning_efficient before any training starts.

Every error names the bad value and what is allowed, so a user can fix a YAML file
without reading our source.
"""

from __future__ import annotations

__all__ = ["ConfigurationError", "DataError", "CheckpointMismatchError", "NoTargetModulesError"]


class ConfigurationError(ValueError):
    """An argument of a module, data module or technique is invalid.

    Example:
        >>> raise ConfigurationError("preset='huge' is unknown; choose one of: tiny, small, base")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: preset='huge' is unknown; choose one of: tiny, small, base
    """


class DataError(ConfigurationError):
    """A data file is missing, unreadable, or lacks a requested column."""


class CheckpointMismatchError(ConfigurationError):
    """A checkpoint was written by a different model type or holds no tokenizer."""


class NoTargetModulesError(ConfigurationError):
    """A technique found nothing to act on (no block stack, no module matching a pattern).

    Techniques raise it instead of silently doing nothing.
    """
