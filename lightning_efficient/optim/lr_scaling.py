"""Deprecated module, moved to :mod:`lightning_efficient.callbacks.lr_scaling` (a callback belongs in callbacks).

Every name is still readable here for one release: reading one warns (``DeprecationWarning``)
with the new path and returns the very same object.

Examples:
    >>> import warnings
    >>> from lightning_efficient.callbacks import LRScaling
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     from lightning_efficient.optim.lr_scaling import LRScaling as Old
    >>> Old is LRScaling, str(caught[0].message)
    (True, 'lightning_efficient.optim.lr_scaling.LRScaling is deprecated; use lightning_efficient.callbacks.LRScaling')
"""

from __future__ import annotations

from typing import Any

from lightning_efficient.optim import _moved_attribute

__all__: list[str] = []  # nothing is defined here: the old names are read through __getattr__


def __getattr__(name: str) -> Any:
    """Any name of :mod:`lightning_efficient.callbacks.lr_scaling`, with a ``DeprecationWarning``."""
    return _moved_attribute(__name__, name, "lightning_efficient.callbacks.lr_scaling")
