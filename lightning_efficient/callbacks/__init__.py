"""Technique callbacks, one module per technique.

Example:
    >>> from lightning_efficient.callbacks import LayerDrop, ProgressiveStacking
    >>> LayerDrop(drop_rate=0.1).name, ProgressiveStacking({0: 2, 10: 4}).name
    ('layer_drop', 'progressive_stacking')
"""

from lightning_efficient.callbacks.activation_checkpointing import ActivationCheckpointing
from lightning_efficient.callbacks.importance_sampling import ImportanceSampling, importance_weighted_loss
from lightning_efficient.callbacks.layer_drop import LayerDrop
from lightning_efficient.callbacks.progressive_stacking import ProgressiveStacking
from lightning_efficient.callbacks.pruning import MagnitudePruning, load_pruned
from lightning_efficient.callbacks.quantization import QuantizationAwareTraining, load_quantized
from lightning_efficient.callbacks.token_dropping import TokenDropping

__all__ = [
    "ActivationCheckpointing",
    "ImportanceSampling",
    "LayerDrop",
    "MagnitudePruning",
    "ProgressiveStacking",
    "QuantizationAwareTraining",
    "TokenDropping",
    "importance_weighted_loss",
    "load_pruned",
    "load_quantized",
]
