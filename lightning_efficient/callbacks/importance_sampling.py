"""Gradient-norm importance sampling (Katharopoulos & Fleuret 2018): the pure functions.

"Not all samples are created equal": the examples whose gradients are large carry most of the
information of a step. The scheme draws a pool of ``B`` examples uniformly, scores each with an
upper bound of its gradient norm that costs one forward pass, draws the training batch of ``b``
from the pool with probability ``p_i`` proportional to the scores (with replacement) and weights
each drawn example's loss by ``w_i = 1 / (B p_i)``, so that the expected gradient equals the
pool's mean gradient: the estimate stays unbiased while its variance drops.

- :func:`cross_entropy_gradient_norms`: the score, the norm of the loss gradient with respect
  to the logits (the last layer's pre-activation), in closed form for cross-entropy:
  ``||softmax(z) - onehot(y)||``. For a sequence (MLM, translation) whose loss is the mean over
  its predicted tokens, the gradient norm over all its token logits.
- :func:`importance_sample`: the draw and the weights.
- :func:`variance_reduction`: the paper's estimate ``tau = 1 / sqrt(1 - ||g - u||^2 / ||g||^2)``
  of how much a batch drawn this way is worth in uniformly drawn batches (``g``: the normalised
  scores, ``u``: uniform); :func:`tau_threshold`: the ``tau`` above which sampling pays for the
  scoring pass, ``(B + 3b) / (3b)`` (a forward costs about a third of a forward and backward).

Example:
    >>> import torch
    >>> logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    >>> scores = cross_entropy_gradient_norms(logits, torch.tensor([0, 0, 0]))
    >>> [round(s, 3) for s in scores.tolist()]  # confident and right, unsure, confident and wrong
    [0.043, 0.816, 1.377]
    >>> indices, weights = importance_sample(scores, 2, torch.Generator().manual_seed(0))
    >>> indices.tolist(), [round(w, 3) for w in weights.tolist()]
    ([2, 2], [0.541, 0.541])
    >>> round(variance_reduction(scores), 3), round(tau_threshold(pool_size=3, batch_size=2), 3)  # not worth it here
    (1.24, 1.5)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_efficient.errors import ConfigurationError
from lightning_efficient.technique import check_range

__all__ = ["cross_entropy_gradient_norms", "importance_sample", "tau_threshold", "variance_reduction"]


@torch.no_grad()
def cross_entropy_gradient_norms(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, token_mean: bool = True
) -> torch.Tensor:
    """Per example, the norm of the gradient of its cross-entropy loss with respect to its logits.

    Args:
        logits: ``(N, C)`` (one prediction per example) or ``(N, T, C)`` (a sequence each).
        targets: ``(N,)`` or ``(N, T)`` class indices; ``ignore_index`` marks tokens without a loss.
        ignore_index: The target value of tokens that are not predicted.
        token_mean: Sequences: the example's loss is the mean over its predicted tokens (the
            gradient norm is divided by their count), else their sum.

    Returns:
        ``(N,)`` float32 scores; 0 for a sequence with no predicted token.

    Raises:
        ConfigurationError: The shapes of ``logits`` and ``targets`` do not fit.
    """
    if logits.dim() not in (2, 3) or targets.shape != logits.shape[:-1]:
        raise ConfigurationError(
            f"logits of shape {tuple(logits.shape)} and targets of shape {tuple(targets.shape)} do not fit: "
            "expected (N, C) with (N,), or (N, T, C) with (N, T)"
        )
    valid = targets != ignore_index
    probabilities = F.softmax(logits.float(), dim=-1)
    target_probability = probabilities.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    squared = (probabilities.square().sum(-1) - 2 * target_probability + 1).clamp(min=0) * valid  # ||p - y||^2
    if logits.dim() == 2:
        return squared.sqrt()
    norms = squared.sum(-1).sqrt()
    return norms / valid.sum(-1).clamp(min=1) if token_mean else norms


def importance_sample(
    scores: torch.Tensor, batch_size: int, generator: torch.Generator, smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``batch_size`` pool positions with probability proportional to ``scores``; their loss weights.

    Args:
        scores: ``(B,)`` non-negative scores of the pool.
        batch_size: Examples to draw (with replacement), ``1 <= batch_size <= B``.
        generator: The (checkpointed) generator to draw from.
        smoothing: Mix the distribution with the uniform one, ``(1 - s) p + s / B``, in [0, 1]:
            bounds every weight by ``1 / s`` (1: uniform sampling).

    Returns:
        ``(indices, weights)``: ``(batch_size,)`` positions in the pool and the weights
        ``1 / (B p_i)`` of the drawn examples' losses (the weighted mean loss has the pool's mean
        gradient as its expectation).

    Raises:
        ConfigurationError: A bad ``batch_size`` or ``smoothing``, or scores that are negative,
            not finite, or all zero (with no smoothing).
    """
    pool = scores.numel()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= pool:
        raise ConfigurationError(f"batch_size={batch_size!r} must be an integer in [1, {pool}] (the pool's size)")
    check_range("smoothing", smoothing, low=0.0, high=1.0)
    scores = scores.detach().double().flatten()
    if not torch.isfinite(scores).all() or (scores < 0).any():
        raise ConfigurationError("importance scores must be finite and >= 0")
    total = float(scores.sum())
    if total == 0 and smoothing == 0:
        raise ConfigurationError("every importance score is 0: nothing to sample by; use smoothing > 0")
    probabilities = torch.full_like(scores, 1.0 / pool) if total == 0 else scores / total
    probabilities = (1 - smoothing) * probabilities + smoothing / pool
    indices = torch.multinomial(probabilities, batch_size, replacement=True, generator=generator)
    weights = 1.0 / (pool * probabilities[indices])
    return indices, weights.float()


def variance_reduction(scores: torch.Tensor) -> float:
    """The paper's ``tau = 1 / sqrt(1 - ||g - u||^2 / ||g||^2)`` of a pool's scores (1: uniform is as good).

    ``g`` are the scores normalised to sum 1 and ``u = 1 / B``. All-zero scores give 1.
    """
    scores = scores.detach().double().flatten()
    total = float(scores.sum())
    if total <= 0:
        return 1.0
    g = scores / total
    ratio = float((g - 1.0 / g.numel()).square().sum() / g.square().sum())
    return 1.0 / math.sqrt(max(1.0 - ratio, 1e-12))


def tau_threshold(pool_size: int, batch_size: int) -> float:
    """The ``tau`` above which importance sampling pays for its scoring pass: ``(B + 3b) / (3b)`` (eq. 29)."""
    if batch_size < 1 or pool_size < batch_size:
        raise ConfigurationError(
            f"pool_size={pool_size} must be >= batch_size={batch_size} >= 1: the batch is drawn from the pool"
        )
    return (pool_size + 3 * batch_size) / (3 * batch_size)
