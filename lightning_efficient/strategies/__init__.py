"""Distributed strategies on Lightning's ``ModelParallelStrategy``: FSDP2, tensor and 2D parallelism."""

from lightning_efficient.strategies.fully_sharded import FULLY_SHARDED_COMPOSES_WITH, FullyShardedStrategy
from lightning_efficient.strategies.tensor_parallel import (
    COMPOSES_WITH,
    TensorParallelStrategy,
    check_strategy_support,
    clip_grad_norm_,
    megatron_plan,
)

__all__ = [
    "COMPOSES_WITH",
    "FULLY_SHARDED_COMPOSES_WITH",
    "FullyShardedStrategy",
    "TensorParallelStrategy",
    "check_strategy_support",
    "clip_grad_norm_",
    "megatron_plan",
]
