"""Technique callbacks, one module (or package) per technique, and the two export verbs.

``export_pruned`` makes :class:`MagnitudePruning`'s masks permanent (and slices structured units
away); ``export_quantized`` converts :class:`QuantizationAwareTraining`'s layers to int8.

Examples:
    >>> from lightning_efficient.callbacks import LayerDrop, ProgressiveStacking
    >>> LayerDrop(drop_rate=0.1).name, ProgressiveStacking({0: 2, 10: 4}).name
    ('layer_drop', 'progressive_stacking')
"""

from lightning_efficient.callbacks.activation_checkpointing import ActivationCheckpointing
from lightning_efficient.callbacks.autoprog import AutoProg
from lightning_efficient.callbacks.distillation import Distillation
from lightning_efficient.callbacks.dynamic_sparsity import DynamicSparsity
from lightning_efficient.callbacks.importance_sampling import ImportanceSampling, importance_weighted_loss
from lightning_efficient.callbacks.layer_drop import LayerDrop
from lightning_efficient.callbacks.lottery_ticket import LotteryTicket
from lightning_efficient.callbacks.lr_scaling import LRScaling
from lightning_efficient.callbacks.parameter_efficient import ParameterEfficientTuning
from lightning_efficient.callbacks.progressive_resizing import ProgressiveResizing
from lightning_efficient.callbacks.progressive_stacking import ProgressiveStacking
from lightning_efficient.callbacks.prune_at_init import PruneAtInit
from lightning_efficient.callbacks.pruning import MagnitudePruning, export_pruned, load_pruned
from lightning_efficient.callbacks.quantization import QuantizationAwareTraining, export_quantized, load_quantized
from lightning_efficient.callbacks.residual_init import ResidualInit
from lightning_efficient.callbacks.token_dropping import TokenDropping
from lightning_efficient.callbacks.trust_ratio import TrustRatioMonitor

__all__ = [
    "ActivationCheckpointing",
    "AutoProg",
    "Distillation",
    "DynamicSparsity",
    "ImportanceSampling",
    "LRScaling",
    "LayerDrop",
    "LotteryTicket",
    "MagnitudePruning",
    "ParameterEfficientTuning",
    "ProgressiveResizing",
    "ProgressiveStacking",
    "PruneAtInit",
    "QuantizationAwareTraining",
    "ResidualInit",
    "TokenDropping",
    "TrustRatioMonitor",
    "export_pruned",
    "export_quantized",
    "importance_weighted_loss",
    "load_pruned",
    "load_quantized",
]
