"""Optimizers for large-batch training, injectable from LightningCLI YAML, and the no-decay rule.

Example:
    >>> import torch
    >>> from lightning_efficient.optim import LAMB, Lion
    >>> model = torch.nn.Linear(3, 2)
    >>> [len(LAMB(model.parameters()).param_groups), len(Lion(model.parameters()).param_groups)]
    [2, 2]
"""

from lightning_efficient.optim.lamb import LAMB, trust_ratios
from lightning_efficient.optim.lion import Lion
from lightning_efficient.optim.param_groups import is_no_decay, no_decay_groups

__all__ = ["LAMB", "Lion", "is_no_decay", "no_decay_groups", "trust_ratios"]

from lightning_efficient.optim.lr_scaling import LRScaling, scaled_lr
from lightning_efficient.optim.trust_ratio import TrustRatioMonitor

__all__ += ["LRScaling", "TrustRatioMonitor", "scaled_lr"]
