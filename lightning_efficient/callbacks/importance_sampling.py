"""Gradient-norm importance sampling (Katharopoulos & Fleuret 2018, "Not all samples are created equal").

The examples whose gradients are large carry most of the information of a step. Each training
step the data loader hands over a *pool* of ``B`` examples drawn uniformly (its ``batch_size``);
:class:`ImportanceSampling` scores the pool with an upper bound of each example's gradient norm
that costs one forward pass, draws the training batch of ``b`` examples (its ``batch_size``) from
the pool with probability ``p_i`` proportional to the scores, with replacement, and weights each
drawn example's loss by ``w_i = 1 / (B p_i)``: the expected gradient equals the pool's mean
gradient, so the estimate stays unbiased while its variance drops. The scoring pass costs about
``B / (3 b)`` of a training step, so sampling is switched on only while the paper's estimate of
the variance reduction ``tau`` (an exponential moving average) exceeds the break-even
``(B + 3b) / (3b)``; on the other steps the batch is ``b`` uniformly drawn pool examples and
``tau`` is estimated from the scores of their training forward, which costs nothing extra.

The pure functions (the loss protocol's pieces live in :mod:`lightning_efficient.losses`, shared
with the models, and are re-exported here):

- :func:`cross_entropy_gradient_norms`: the score, the norm of the loss gradient with respect
  to the logits (the last layer's pre-activation), in closed form for cross-entropy:
  ``||softmax(z) - onehot(y)||``; for a sequence (MLM, translation) over all its token logits.
  :func:`row_gradient_norms` is the same for token logits gathered from many rows (MLM's head
  runs on the masked positions only).
- :func:`importance_sample`: the draw and the weights.
- :func:`variance_reduction`: ``tau = 1 / sqrt(1 - ||g - u||^2 / ||g||^2)`` (``g``: the
  normalised scores, ``u``: uniform), how many uniformly drawn batches a batch drawn this way is
  worth; :func:`tau_threshold`: the ``tau`` above which sampling pays for its scoring pass.
- :func:`importance_weighted_loss`: the loss a module's ``training_step`` returns, weighted when
  the callback put weights into the batch.

**What a module must provide** (the package's BERT, translation and ViT modules do; the protocol
is stated in :mod:`lightning_efficient.losses`):

1. ``importance_scores(batch) -> Tensor (N,)``: the score of each example of a dict batch, from
   a forward pass (the callback calls it under ``torch.no_grad()`` in eval mode). It may add
   tensors with ``N`` rows to the batch that its ``training_step`` then uses (BertMLM stores the
   masks it drew, so the examples are trained with the masks they were scored with).
2. A ``training_step`` whose loss goes through :func:`importance_weighted_loss` with the
   per-example losses (for token losses: each example's sum, and its token count), so the
   weights are applied; it passes ``scores=`` a function giving the same scores from the
   training forward, for the ``tau`` estimate of uniform steps.

Examples:
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
from collections.abc import MutableMapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_efficient.errors import ConfigurationError
from lightning_efficient.losses import (
    PADDED_KEYS,
    SCORE_REQUEST_KEY,
    SCORES_KEY,
    WEIGHTS_KEY,
    cross_entropy_gradient_norms,
    importance_weighted_loss,
    is_importance_batch,
    row_gradient_norms,
)
from lightning_efficient.technique import Technique, check_range

__all__ = [
    "PADDED_KEYS",
    "SCORES_KEY",
    "SCORE_REQUEST_KEY",
    "WEIGHTS_KEY",
    "ImportanceSampling",
    "cross_entropy_gradient_norms",
    "importance_sample",
    "importance_weighted_loss",
    "is_importance_batch",
    "row_gradient_norms",
    "tau_threshold",
    "variance_reduction",
]


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


def _rows(batch: MutableMapping[str, Any]) -> int:
    """The number of examples of a dict batch: the first dimension of its first tensor."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ConfigurationError("importance sampling needs a dict batch holding tensors with one row per example")


def _token_matrix(value: Any) -> bool:
    """Whether ``value`` is an ``(N, T)`` tensor with at least one column."""
    return isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] > 0


def _used_length(used: torch.Tensor) -> int:
    """One past the last column of ``(N, T)`` bools that is True in some row (all ``T`` when none is)."""
    columns = used.any(dim=0).nonzero()
    return int(columns.max()) + 1 if columns.numel() else used.shape[1]


def _select_rows(batch: MutableMapping[str, Any], indices: torch.Tensor, pool: int) -> None:
    """Keep the rows ``indices`` of every tensor (and list) of the batch that has ``pool`` rows, in place.

    The pool was padded to its longest sequence: the tensors of :data:`PADDED_KEYS` then lose the
    trailing columns that are padding in every kept row (``attention_mask`` 0), so the trained batch
    costs what a batch of its own would. Integer ``(N, T)`` ``labels``: token labels of the inputs
    (Hugging Face style, the shape of ``attention_mask`` or ``input_ids``; -100 where no loss) are cut
    with the inputs, keeping every column that is attended or labelled; targets of their own length
    (translation) lose the columns that are -100 in every kept row.
    """
    positions = indices.tolist()
    for key, value in list(batch.items()):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == pool:
            batch[key] = value[indices.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == pool:
            batch[key] = type(value)(value[i] for i in positions)
    mask, inputs, labels = batch.get("attention_mask"), batch.get("input_ids"), batch.get("labels")
    shape = mask.shape if _token_matrix(mask) else inputs.shape if _token_matrix(inputs) else None
    length = _used_length(mask.ne(0)) if _token_matrix(mask) else shape[1] if shape else 0
    keys: tuple[str, ...] = PADDED_KEYS
    if _token_matrix(labels) and not labels.is_floating_point():
        label_length = _used_length(labels.ne(-100))
        if labels.shape == shape:  # token labels of the inputs: cut with them
            length, keys = max(length, label_length), (*PADDED_KEYS, "labels")
        else:  # targets of their own length (translation)
            batch["labels"] = labels[:, :label_length].contiguous()
    if shape is None or length == shape[1]:
        return
    for key in keys:
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == shape:
            batch[key] = value[:, :length].contiguous()


class ImportanceSampling(Technique):
    """Train on the examples with the largest gradient-norm bound, reweighted to stay unbiased.

    The data loader's ``batch_size`` is the pool ``B``; ``batch_size`` here is the batch ``b`` that
    is trained each step (see the module docstring for the scheme and for what the module must
    provide). Decisions are the same on every DDP rank (``tau`` is averaged over ranks each step)
    and each rank draws from its own pool (its shard of the data) with a generator derived from
    ``(seed, rank, batch count)``, so a resumed run draws exactly what the uninterrupted run drew.
    Put it after an :class:`~lightning_efficient.monitor.EfficiencyMonitor` in ``trainer.callbacks``
    so the monitor counts the scoring pass.

    Args:
        batch_size: Examples trained per step, ``b`` (at most the loader's batch size, the pool).
        tau_threshold: Sample while ``tau`` exceeds this; None: the break-even ``(B + 3b) / (3b)``
            (a forward costs a third of a forward and backward); below 1: sample on every step.
        tau_momentum: Momentum of ``tau``'s moving average, in [0, 1) (the authors' 0.9).
        smoothing: Mix the sampling distribution with the uniform one, ``(1 - s) p + s / B``, in
            [0, 1]: bounds every weight by ``1 / s``.
        seed: Seed of the draws.

    Logged every step: ``importance_sampling/tau`` (the moving average), ``tau_threshold``,
    ``sampled`` (1 on a sampled step), ``sampled_fraction`` (of the run's steps so far),
    ``speedup_estimate`` (on sampled steps the pool's ``tau`` over the break-even ``(B + 3b) / (3b)``,
    the paper's estimate of the step's worth in uniform steps per unit of time; 1 on uniform steps), and on sampled steps ``score_max_over_mean`` and
    ``weight_max``; a histogram of the pool's scores goes to TensorBoard on logging steps.

    Examples:
        >>> import tempfile
        >>> import lightning.pytorch as pl
        >>> from lightning_efficient import BertClassifier
        >>> rows = [{"input_ids": torch.randint(5, 50, (8,)), "attention_mask": torch.ones(8, dtype=torch.long),
        ...          "labels": torch.tensor(i % 2)} for i in range(24)]
        >>> loader = torch.utils.data.DataLoader(rows, batch_size=6)  # pools of 6
        >>> sampling = ImportanceSampling(batch_size=2, tau_threshold=0.0)  # sample on every step
        >>> trainer = pl.Trainer(max_steps=3, callbacks=[sampling], default_root_dir=tempfile.mkdtemp(), logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(BertClassifier(vocab_size=50, num_labels=2, preset="tiny"), loader)
        >>> sampling.sampled_steps, sampling.steps, sampling.tau > 1
        (3, 3, True)
    """

    name = "importance_sampling"
    hooks = ("setup", "on_train_start", "on_train_batch_start", "on_before_backward", "on_train_batch_end")
    distributed_safe = True
    compile_safe = True  # tests/test_compile.py: compiled training equals eager
    compile_note = "the scoring pass (no_grad) compiles a second graph"

    def __init__(
        self,
        batch_size: int,
        tau_threshold: float | None = None,
        tau_momentum: float = 0.9,
        smoothing: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(
                f"batch_size={batch_size!r} must be a positive integer (the examples trained per step)"
            )
        self.batch_size = batch_size
        self.tau_threshold = (
            None if tau_threshold is None else float(check_range("tau_threshold", tau_threshold, low=0.0))
        )
        self.tau_momentum = float(check_range("tau_momentum", tau_momentum, low=0.0, high=1.0, high_inclusive=False))
        self.smoothing = float(check_range("smoothing", smoothing, low=0.0, high=1.0))
        self.seed = int(seed)
        self.tau: float | None = None
        self.batches = 0
        self.steps = 0
        self.sampled_steps = 0
        self._sampled_now = False
        self._pool_tau = 1.0
        self._pool_size = 0
        self._warned_fallback = False
        self._batch: MutableMapping[str, Any] | None = None

    def threshold(self, pool_size: int) -> float:
        """The ``tau`` above which a pool of ``pool_size`` is sampled."""
        return tau_threshold(pool_size, self.batch_size) if self.tau_threshold is None else self.tau_threshold

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "importance_scores", None)):
            raise ConfigurationError(
                f"{type(pl_module).__name__} gives no per-example scores, which importance sampling needs: give it a "
                "method importance_scores(batch) -> Tensor (N,) (e.g. cross_entropy_gradient_norms of its logits) and "
                "compute the training loss with importance_weighted_loss(per_example_losses, batch) "
                "(see lightning_efficient.callbacks.importance_sampling)"
            )
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pool = getattr(trainer.train_dataloader, "batch_size", None)
        if pool is not None and pool < self.batch_size:
            raise ConfigurationError(
                f"the data loader's batch_size={pool} is the pool that importance sampling draws batch_size="
                f"{self.batch_size} examples from; it must be at least {self.batch_size} (the paper uses pools of 3 "
                "to 5 batches): raise the data's batch_size or lower ImportanceSampling's"
            )

    def _generator(self, rank: int) -> torch.Generator:
        """The generator of this batch on ``rank``: a function of (seed, rank, batch count), nothing to save."""
        mixed = (self.seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + self.batches) % (2**63)
        return torch.Generator().manual_seed(mixed)

    def _score(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: MutableMapping[str, Any], pool: int
    ) -> torch.Tensor:
        """The module's scores of a dict batch: eval mode, no grad, at the training precision (autocast)."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            with trainer.precision_plugin.forward_context(), torch.no_grad():
                scores = pl_module.importance_scores(batch)
        finally:
            pl_module.train(was_training)
        if not isinstance(scores, torch.Tensor) or scores.shape != (pool,):
            raise ConfigurationError(
                f"{type(pl_module).__name__}.importance_scores must return a tensor of shape ({pool},) for a batch of "
                f"{pool} examples, got {getattr(scores, 'shape', type(scores).__name__)}"
            )
        return scores.detach().float()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, MutableMapping):
            raise ConfigurationError(
                f"importance sampling needs dict batches (it selects rows and adds the loss weights); got a {type(batch).__name__}"
            )
        self._batch = batch
        pool = _rows(batch)
        generator = self._generator(trainer.global_rank)
        self.batches += 1
        self._sampled_now = False
        self._pool_size = pool
        if pool < self.batch_size:  # a short last pool: train on all of it
            batch[SCORE_REQUEST_KEY] = True
            return
        always = self.tau_threshold is not None and self.tau_threshold < 1
        if always or (self.tau is not None and self.tau > self.threshold(pool)):
            scores = self._score(trainer, pl_module, batch, pool)
            indices, weights = importance_sample(scores, self.batch_size, generator, self.smoothing)
            _select_rows(batch, indices, pool)
            batch[WEIGHTS_KEY] = weights
            self._sampled_now = True
            self._pool_tau = variance_reduction(scores)
            mean = float(scores.mean())
            self.log_metrics(
                pl_module,
                {
                    "score_max_over_mean": float(scores.max()) / mean if mean > 0 else 1.0,
                    "weight_max": float(weights.max()),
                },
            )
            self._histogram(trainer, scores)
        else:
            _select_rows(batch, torch.randperm(pool, generator=generator)[: self.batch_size], pool)
            batch[SCORE_REQUEST_KEY] = True

    def _histogram(self, trainer: pl.Trainer, scores: torch.Tensor) -> None:
        if not trainer._logger_connector.should_update_logs:
            return
        for logger in trainer.loggers:
            add_histogram = getattr(getattr(logger, "experiment", None), "add_histogram", None)
            if callable(add_histogram) and trainer.is_global_zero:
                add_histogram(f"{self.name}/scores", scores.cpu(), trainer.global_step)

    @staticmethod
    def _check_weights_used(pl_module: pl.LightningModule, batch: Any) -> None:
        if isinstance(batch, MutableMapping) and WEIGHTS_KEY in batch:
            raise ConfigurationError(
                f"{type(pl_module).__name__}.training_step did not use the importance weights: compute its loss with "
                "importance_weighted_loss(per_example_losses, batch) (lightning_efficient.callbacks.importance_sampling), "
                "else the sampled batches train a biased objective"
            )

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """Fail on the first weighted batch whose loss ignored the weights, before its backward: no biased update."""
        self._check_weights_used(pl_module, self._batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch = None
        self._check_weights_used(pl_module, batch)
        if self._sampled_now:
            estimate = self._pool_tau
        else:
            batch.pop(SCORE_REQUEST_KEY, None)
            scores = batch.pop(SCORES_KEY, None)
            if scores is None:
                if not self._warned_fallback:
                    rank_zero_warn(
                        f"{type(pl_module).__name__}.training_step does not pass scores= to importance_weighted_loss: "
                        "importance sampling scores the uniform steps' batches with an extra forward pass"
                    )
                    self._warned_fallback = True
                scores = self._score(trainer, pl_module, batch, _rows(batch))
            estimate = variance_reduction(scores)
        estimate = float(trainer.strategy.reduce(torch.tensor(estimate, device=pl_module.device), reduce_op="mean"))
        self.tau = estimate if self.tau is None else self.tau_momentum * self.tau + (1 - self.tau_momentum) * estimate
        self.steps += 1
        self.sampled_steps += int(self._sampled_now)
        pool = max(self._pool_size, self.batch_size)
        break_even = tau_threshold(pool, self.batch_size)
        self.log_metrics(
            pl_module,
            {
                "tau": self.tau,
                "tau_threshold": self.threshold(pool),
                "sampled": float(self._sampled_now),
                "sampled_fraction": self.sampled_steps / self.steps,
                "speedup_estimate": self._pool_tau / break_even if self._sampled_now else 1.0,
            },
        )

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau, "batches": self.batches, "steps": self.steps, "sampled_steps": self.sampled_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tau = state_dict["tau"]
        self.batches = int(state_dict["batches"])
        self.steps = int(state_dict["steps"])
        self.sampled_steps = int(state_dict["sampled_steps"])
