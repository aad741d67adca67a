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

from lightning_efficient.optim import _forward_moved_names

__all__: list[str] = []  # nothing is defined here: the old names are read through __getattr__

__getattr__ = _forward_moved_names(__name__, "lightning_efficient.callbacks.trust_ratio")
