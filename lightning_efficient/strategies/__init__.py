"""Distributed strategies: tensor parallelism on Lightning's ``ModelParallelStrategy``."""

from lightning_efficient.strategies.tensor_parallel import (
    COMPOSES_WITH,
    TensorParallelStrategy,
    check_strategy_support,
    clip_grad_norm_,
    megatron_plan,
)

__all__ = ["COMPOSES_WITH", "TensorParallelStrategy", "check_strategy_support", "clip_grad_norm_", "megatron_plan"]
