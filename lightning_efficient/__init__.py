"""lightning_efficient: cheaper Transformer training and compression for PyTorch Lightning.

Examples:
    >>> import lightning.pytorch as pl
    >>> from lightning_efficient import MLMDataModule, BertMLM
    >>> dm = MLMDataModule(vocab_size=2000, max_length=32, batch_size=8)  # embedded Austen + Brown
    >>> model = BertMLM(vocab_size=dm.vocab_size, preset="tiny")
    >>> trainer = pl.Trainer(max_steps=2, val_check_interval=2, limit_val_batches=1, logger=False, enable_progress_bar=False,
    ...                      enable_checkpointing=False, enable_model_summary=False)
    >>> trainer.fit(model, dm)
    >>> sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
    ['val/accuracy', 'val/loss', 'val/perplexity']
"""

from lightning_efficient.import_noise import hide_import_noise

hide_import_noise()  # before transformers imports torchao (see import_noise)

from lightning_efficient.blocks import BlockStack, find_block_stacks
from lightning_efficient.callbacks import (
    ActivationCheckpointing,
    AutoProg,
    Distillation,
    DynamicSparsity,
    ImportanceSampling,
    LayerDrop,
    LotteryTicket,
    LRScaling,
    MagnitudePruning,
    ParameterEfficientTuning,
    ProgressiveResizing,
    ProgressiveStacking,
    PruneAtInit,
    QuantizationAwareTraining,
    ResidualInit,
    TokenDropping,
    TrustRatioMonitor,
    export_pruned,
    export_quantized,
    load_pruned,
    load_quantized,
)
from lightning_efficient.checkpoint import AtomicCheckpointIO
from lightning_efficient.data import (
    BROWN_PROSE,
    ImageClassificationDataModule,
    MLMDataModule,
    PosLexicon,
    ResumableDataLoader,
    ResumableSampler,
    TextClassificationDataModule,
    TransferSetAugmentation,
    TranslationDataModule,
)
from lightning_efficient.errors import (
    CheckpointMismatchError,
    ConfigurationError,
    CorruptCheckpointError,
    DataError,
    NonFiniteLossError,
    NoTargetModulesError,
)
from lightning_efficient.flops import FlopCounter, count_flops, transformer_flops
from lightning_efficient.models import PRESETS, BertClassifier, BertMLM, BiLSTMClassifier, Translation, ViTClassifier
from lightning_efficient.monitor import EfficiencyMonitor
from lightning_efficient.optim import LAMB, Lion
from lightning_efficient.pipeline.budget import FlopBudget
from lightning_efficient.predictions import JsonlPredictionWriter
from lightning_efficient.safeguards import LastCheckpoint, NonFiniteLossGuard, RandomStates
from lightning_efficient.strategies import FullyShardedStrategy, TensorParallelStrategy
from lightning_efficient.technique import Technique

__version__ = "0.2.0"

__all__ = [
    "BROWN_PROSE",
    "LAMB",
    "PRESETS",
    "ActivationCheckpointing",
    "AtomicCheckpointIO",
    "AutoProg",
    "BertClassifier",
    "BertMLM",
    "BiLSTMClassifier",
    "BlockStack",
    "CheckpointMismatchError",
    "ConfigurationError",
    "CorruptCheckpointError",
    "DataError",
    "Distillation",
    "DynamicSparsity",
    "EfficiencyMonitor",
    "FlopBudget",
    "FlopCounter",
    "FullyShardedStrategy",
    "ImageClassificationDataModule",
    "ImportanceSampling",
    "JsonlPredictionWriter",
    "LRScaling",
    "LastCheckpoint",
    "LayerDrop",
    "Lion",
    "LotteryTicket",
    "MLMDataModule",
    "MagnitudePruning",
    "NoTargetModulesError",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "ParameterEfficientTuning",
    "PosLexicon",
    "ProgressiveResizing",
    "ProgressiveStacking",
    "PruneAtInit",
    "QuantizationAwareTraining",
    "RandomStates",
    "ResidualInit",
    "ResumableDataLoader",
    "ResumableSampler",
    "Technique",
    "TensorParallelStrategy",
    "TextClassificationDataModule",
    "TokenDropping",
    "TransferSetAugmentation",
    "Translation",
    "TranslationDataModule",
    "TrustRatioMonitor",
    "ViTClassifier",
    "__version__",
    "count_flops",
    "export_pruned",
    "export_quantized",
    "find_block_stacks",
    "load_pruned",
    "load_quantized",
    "transformer_flops",
]
