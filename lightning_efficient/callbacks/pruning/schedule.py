"""The pruning schedule: when pruning events happen and what sparsity each one reaches (Zhu & Gupta's cubic).

Examples:
    >>> pruning_steps(0, 30, 10), round(cubic_sparsity(10, 0.9, 0, 30, 10), 4)
    ([0, 10, 20, 30], 0.6333)
"""

from __future__ import annotations

import math

__all__ = ["cubic_sparsity", "pruning_steps"]


def pruning_steps(start_step: int, end_step: int, frequency: int) -> list[int]:
    """The optimizer steps at which pruning events happen: every ``frequency`` from the start, and the end.

    Examples:
        >>> pruning_steps(10, 20, 4), pruning_steps(5, 5, 1)
        ([10, 14, 18, 20], [5])
    """
    return [*range(start_step, end_step, frequency), end_step]


def cubic_sparsity(
    step: int, final_sparsity: float, start_step: int, end_step: int, frequency: int, initial_sparsity: float = 0.0
) -> float:
    """The sparsity in force at optimizer ``step``: that of the latest event at or before it (0 before the first).

    Zhu & Gupta's cubic schedule, ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3`` at the
    events ``t`` of :func:`pruning_steps`.

    Examples:
        >>> [round(cubic_sparsity(t, 0.8, 10, 20, 5), 4) for t in (0, 10, 14, 15, 20, 99)]
        [0.0, 0.0, 0.0, 0.7, 0.8, 0.8]
    """
    if step < start_step:
        return 0.0
    event = max(t for t in pruning_steps(start_step, end_step, frequency) if t <= step)
    if end_step == start_step:
        return final_sparsity
    progress = (event - start_step) / (end_step - start_step)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3


def _count(sparsity: float, total: int) -> int:
    """How many of ``total`` units a sparsity prunes (rounded half up)."""
    return min(total, math.floor(sparsity * total + 0.5))
