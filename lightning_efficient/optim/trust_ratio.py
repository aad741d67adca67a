"""Deprecated module, moved to :mod:`lightning_efficient.callbacks.trust_ratio` (a callback belongs in callbacks).

Every name is still readable here for one release: reading one warns (``DeprecationWarning``)
with the new path and returns the very same object.

Examples:
    >>> import warnings
    >>> from lightning_efficient.callbacks import TrustRatioMonitor
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     from lightning_efficient.optim.trust_ratio import TrustRatioMonitor as Old
    >>> Old is TrustRatioMonitor, str(caught[0].message)
    (True, 'lightning_efficient.optim.trust_ratio.TrustRatioMonitor is deprecated; use lightning_efficient.callbacks.TrustRatioMonitor')
"""

from __future__ import annotations

from typing import Any

from lightning_efficient.optim import _moved_attribute

__all__: list[str] = []  # nothing is defined here: the old names are read through __getattr__


def __getattr__(name: str) -> Any:
    """Any name of :mod:`lightning_efficient.callbacks.trust_ratio`, with a ``DeprecationWarning``."""
    return _moved_attribute(__name__, name, "lightning_efficient.callbacks.trust_ratio")
