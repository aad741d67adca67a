"""Deprecated module, moved to :mod:`lightning_efficient.callbacks.lr_scaling` (a callback belongs in callbacks).

Every name is still readable here for one release: reading one warns (``DeprecationWarning``)
with the new path and returns the very same object.

Examples:
    >>> import pytest
    >>> with pytest.deprecated_call(match="use lightning_efficient.callbacks.lr_scaling.scaled_lr"):
    ...     from lightning_efficient.optim.lr_scaling import scaled_lr
    >>> scaled_lr(1e-3, effective_batch=256, reference_batch=32, rule="linear")
    0.008
"""

from __future__ import annotations

from lightning_efficient.optim import _forward_moved_names

__all__: list[str] = []  # nothing is defined here: the old names are read through __getattr__

__getattr__ = _forward_moved_names(__name__, "lightning_efficient.callbacks.lr_scaling")
