"""Optimizers for large-batch training, injectable from LightningCLI YAML, and the no-decay rule.

``LRScaling`` and ``TrustRatioMonitor`` (callbacks) moved to :mod:`lightning_efficient.callbacks`;
their old spellings here (``lightning_efficient.optim.LRScaling``, ``.TrustRatioMonitor``,
``.scaled_lr``) still work for one release and warn (``DeprecationWarning``) with the new path.

Examples:
    >>> import torch
    >>> from lightning_efficient.optim import LAMB, Lion
    >>> model = torch.nn.Linear(3, 2)
    >>> [len(LAMB(model.parameters()).param_groups), len(Lion(model.parameters()).param_groups)]
    [2, 2]
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

from lightning_efficient.optim.lamb import LAMB, trust_ratios
from lightning_efficient.optim.lion import Lion
from lightning_efficient.optim.param_groups import is_no_decay, no_decay_groups

__all__ = ["LAMB", "Lion", "is_no_decay", "no_decay_groups", "trust_ratios"]

#: Names that moved out of this package: name -> the module that holds them now. Reading one here
#: warns; the old modules ``optim.lr_scaling`` and ``optim.trust_ratio`` forward to these too.
_MOVED = {
    "LRScaling": "lightning_efficient.callbacks.lr_scaling",
    "TrustRatioMonitor": "lightning_efficient.callbacks.trust_ratio",
    "scaled_lr": "lightning_efficient.callbacks.lr_scaling",
}

_OLD_MODULES = ("lr_scaling", "trust_ratio")


def _moved_attribute(old_module: str, name: str, new_module: str) -> Any:
    """Read ``name`` from ``new_module``, warning that ``old_module.name`` is deprecated (same object).

    The warning names the shortest new spelling: ``lightning_efficient.callbacks.<name>`` where the
    callbacks package exports it, else ``<new_module>.<name>``. A missing name is an ``AttributeError``.

    Examples:
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     rule = _moved_attribute("lightning_efficient.optim", "SCALING_RULES", _MOVED["LRScaling"])
        >>> rule, str(caught[0].message)
        (('linear', 'sqrt'), 'lightning_efficient.optim.SCALING_RULES is deprecated; use lightning_efficient.callbacks.lr_scaling.SCALING_RULES')
    """
    module = importlib.import_module(new_module)
    if name.startswith("__") or not hasattr(module, name):
        raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
    callbacks = importlib.import_module("lightning_efficient.callbacks")
    new = f"{callbacks.__name__}.{name}" if name in callbacks.__all__ else f"{new_module}.{name}"
    warnings.warn(f"{old_module}.{name} is deprecated; use {new}", DeprecationWarning, stacklevel=3)
    return getattr(module, name)


def _forward_moved_names(old_module: str, new_module: str) -> Callable[[str], Any]:
    """The module ``__getattr__`` of a deprecated module ``old_module`` whose names all moved to ``new_module``.

    Every name of ``new_module`` stays readable through ``old_module`` with a warning
    (:func:`_moved_attribute`); ``optim.lr_scaling`` and ``optim.trust_ratio`` are such modules.

    Examples:
        >>> read = _forward_moved_names("old.place", "lightning_efficient.callbacks.lr_scaling")
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     rules = read("SCALING_RULES")
        >>> rules, str(caught[0].message)
        (('linear', 'sqrt'), 'old.place.SCALING_RULES is deprecated; use lightning_efficient.callbacks.lr_scaling.SCALING_RULES')
    """

    def __getattr__(name: str) -> Any:
        return _moved_attribute(old_module, name, new_module)

    __getattr__.__doc__ = f"Any name of :mod:`{new_module}`, with a ``DeprecationWarning``."
    return __getattr__


def __getattr__(name: str) -> Any:
    """The moved names (``_MOVED``), with a ``DeprecationWarning``, and the old shim modules."""
    if name in _MOVED:
        return _moved_attribute(__name__, name, _MOVED[name])
    if name in _OLD_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
