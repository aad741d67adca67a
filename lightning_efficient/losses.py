"""The per-example loss protocol: what a LightningModule tells the techniques about its loss.

Some techniques need more from a module than its mean loss. This module holds everything that
the package's models implement and those techniques consume, so a model imports no technique and
your own LightningModule can take part by following the same three rules:

1. **Per-example losses and weights.** A technique that reweights examples (importance sampling)
   puts ``(N,)`` loss weights into the dict batch under :data:`WEIGHTS_KEY`, or asks for the
   examples' scores with :data:`SCORE_REQUEST_KEY`. :func:`is_importance_batch` tells a
   ``training_step`` that it did; the step then computes the loss of each example (for token
   losses: each example's summed token losses and its number of predicted tokens) and returns
   :func:`importance_weighted_loss` of them, which applies (and removes) the weights. Without
   weights it is the plain mean, so the same step serves every batch. :func:`classification_loss`
   does all of it for one prediction per example.
2. **Scores.** ``importance_scores(batch) -> Tensor (N,)`` gives each example's score, an upper
   bound of its gradient norm: :func:`cross_entropy_gradient_norms` of its logits (closed form for
   cross-entropy), or :func:`row_gradient_norms` for token logits gathered from many rows. The step
   passes the same function to ``importance_weighted_loss(..., scores=...)``, which leaves the scores
   under :data:`SCORES_KEY` when they were asked for (they come free from the training forward).
   A module may add ``(N, T)`` tensors to the batch while scoring (:data:`PADDED_KEYS` names the
   ones aligned with ``attention_mask``).
3. **Predicted positions.** A sequence model whose loss predicts only some positions (masked LM)
   says which while its encoder runs: the attribute :data:`PREDICTED_POSITIONS`
   (``predicted_positions``), a ``(B, T)`` bool tensor, True where the loss predicts, None otherwise
   (:func:`predicting` sets and clears it). Token dropping never drops those positions.
4. **Soft targets (distillation).** A module that can be distilled, as teacher or student, has
   ``distillation_logits(batch) -> Tensor (M, C)``: the logits its training loss is computed from,
   one row per prediction, in the order its loss sees them (a classifier: one row per example; a
   masked LM: its predicted positions, row-major; translation: its target tokens, row-major),
   computed from the batch alone. A model whose training step draws random inputs (the masked LM's
   masks) first draws them into the batch in ``fix_random_inputs(batch)``, so teacher and student
   see the same inputs. A distillation technique puts the teacher's :class:`SoftTargets` into the
   batch under :data:`SOFT_TARGETS_KEY`; the student's loss goes through :func:`classification_loss`
   or :func:`prediction_losses`, which take them out and return the distillation loss of each row
   instead of its cross-entropy. Examples without a gold label (augmented ones) carry
   :data:`MISSING_LABEL`; a technique that labels them says so with ``fills_missing_labels = True``.

Examples:
    >>> logits = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
    >>> labels = torch.tensor([0, 0])
    >>> batch = {"labels": labels, WEIGHTS_KEY: torch.tensor([0.5, 1.5])}  # as a technique leaves it
    >>> is_importance_batch(batch)
    True
    >>> loss = classification_loss(logits, labels, batch)  # (0.5 * 0.0181 + 1.5 * 4.0181) / 2
    >>> round(float(loss), 4), WEIGHTS_KEY in batch
    (3.0181, False)
    >>> [round(s, 3) for s in cross_entropy_gradient_norms(logits, labels).tolist()]  # right, then wrong
    [0.025, 1.389]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_efficient.errors import ConfigurationError

__all__ = [
    "EXTRA_LOSS_KEY",
    "MISSING_LABEL",
    "PADDED_KEYS",
    "PREDICTED_POSITIONS",
    "SCORES_KEY",
    "SCORE_REQUEST_KEY",
    "SOFT_TARGETS_KEY",
    "TRAINING_ONLY",
    "WEIGHTS_KEY",
    "SoftTargets",
    "classification_loss",
    "cross_entropy_gradient_norms",
    "importance_weighted_loss",
    "is_importance_batch",
    "predicting",
    "prediction_losses",
    "row_gradient_norms",
    "softmax_cross_entropy",
    "take_soft_targets",
]

#: Batch key of the drawn examples' loss weights ``1 / (B p_i)``, put in by the callback, taken out by
#: :func:`importance_weighted_loss`.
WEIGHTS_KEY = "importance_weights"
#: Batch key by which the callback asks the training step for its examples' scores (uniform steps).
SCORE_REQUEST_KEY = "importance_score_request"
#: Batch key under which :func:`importance_weighted_loss` leaves the scores asked for.
SCORES_KEY = "importance_scores"
#: Batch keys of ``(N, T)`` tensors aligned with ``attention_mask`` (the package's text batches, and
#: the masks BertMLM scored with): trimmed to the longest kept row after a draw.
PADDED_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "mlm_input_ids", "mlm_labels")
#: Name of the module attribute holding, while the encoder runs, the ``(B, T)`` bool mask of the
#: positions the loss predicts (None otherwise).
PREDICTED_POSITIONS = "predicted_positions"
#: Label of an example without a gold label (an augmented transfer-set example): cross-entropy ignores it.
MISSING_LABEL = -100
#: Batch key of the teacher's :class:`SoftTargets`, put in by a distillation technique, taken out by the loss.
SOFT_TARGETS_KEY = "soft_targets"
#: Batch key of :attr:`SoftTargets.extra` between :func:`prediction_losses` and the step's final loss.
EXTRA_LOSS_KEY = "soft_targets_extra_loss"
#: Name of the submodule under which a technique attaches training-only modules to a student (e.g.
#: intermediate-layer projections): in training checkpoints (so a resume is exact), dropped when a
#: module without them loads one.
TRAINING_ONLY = "training_only"


@dataclass
class SoftTargets:
    """A teacher's logits for the rows of a training step, and the loss that compares a student's with them.

    Attributes:
        logits: ``(M, C)`` the teacher's :meth:`distillation_logits` of the batch.
        loss: ``(student (M, C), teacher (M, C), targets (M,)) -> (M,)``: the loss of each row (the
            distillation technique's mix of soft and hard terms, in float32).
        extra: A loss term of the whole step (intermediate-layer transfer), added once to the step's
            loss by :func:`importance_weighted_loss` / :func:`classification_loss`; called after the
            student's forward, so it can use what hooks captured there.
    """

    logits: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    extra: Callable[[], torch.Tensor] | None = None

    def row_losses(self, student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of each row of ``student_logits`` against the teacher's.

        Raises:
            ConfigurationError: The student predicts other rows or classes than the teacher.
        """
        if student_logits.shape != self.logits.shape:
            raise ConfigurationError(
                f"the student's logits have shape {tuple(student_logits.shape)} but the teacher's "
                f"{tuple(self.logits.shape)}: teacher and student must predict the same rows (same inputs, same "
                "predicted positions) over the same classes"
            )
        return self.loss(student_logits, self.logits.to(student_logits.device), targets)


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

    Examples:
        >>> norms = cross_entropy_gradient_norms(torch.zeros(1, 2, 2), torch.tensor([[0, -100]]))
        >>> round(float(norms[0]), 4)  # ||(0.5, 0.5) - (1, 0)|| over the one predicted token
        0.7071
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


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy from one softmax; its backward turns the saved probabilities into the gradient in place."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(logits, dim=-1)
        picked = probabilities.gather(1, targets[:, None]).squeeze(1)
        losses = -picked.log()
        tiny = picked < 1e-30  # the target's probability underflows (a logit gap > 69): exact for those rows
        if bool(tiny.any()):
            rows = tiny.nonzero().squeeze(1)
            exact = torch.logsumexp(logits[rows], dim=-1) - logits[rows, targets[rows]]
            losses = losses.index_put((rows,), exact)
        ctx.save_for_backward(probabilities, targets)
        ctx.consumed = False
        return losses.mean()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.consumed:
            raise RuntimeError(
                "softmax_cross_entropy's graph can be backpropagated once (retain_graph is not supported)"
            )
        ctx.consumed = True
        probabilities, targets = ctx.saved_tensors
        rows = torch.arange(len(targets), device=targets.device)
        probabilities[rows, targets] -= 1.0  # softmax - one-hot, in the saved buffer: no second (M, C) tensor
        return probabilities.mul_(grad / len(targets)), None


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits, targets)`` (the mean over rows) at about half its cost over a large vocabulary.

    ``F.cross_entropy`` runs ``log_softmax``, then in backward zero-fills an ``(M, C)`` gradient for
    ``nll_loss`` and runs ``log_softmax``'s backward: about 60 ms of BERT-small's CPU training step
    for 600 masked positions over 30,522 tokens. Here the forward is one softmax (kept for backward,
    as ``log_softmax``'s output is), and the backward writes ``softmax - one_hot`` into it in place.
    A row whose target probability underflows (below ``1e-30``) takes its loss from ``logsumexp``.
    Off the CPU (where that check would synchronise the device) and under ``torch.compile`` it is
    ``F.cross_entropy``. The graph can be backpropagated once.

    Args:
        logits: ``(M, C)`` float logits.
        targets: ``(M,)`` class indices (no ignored index).

    Returns:
        The mean loss, a 0-d tensor.

    Examples:
        >>> logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], requires_grad=True)
        >>> targets = torch.tensor([0, 1])
        >>> loss = softmax_cross_entropy(logits, targets)
        >>> torch.allclose(loss, F.cross_entropy(logits, targets))
        True
    """
    if logits.device.type != "cpu" or torch.compiler.is_compiling():
        return F.cross_entropy(logits, targets)
    return _SoftmaxCrossEntropy.apply(logits, targets)


@torch.no_grad()
def row_gradient_norms(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Per row, the gradient norm of the *sum* of its token losses, from token logits gathered over rows.

    Args:
        logits: ``(M, C)`` logits of ``M`` predicted tokens.
        targets: ``(M,)`` their classes.
        rows: ``(M,)`` the row (example) each token belongs to.
        num_rows: The number of rows ``N``.

    Returns:
        ``(N,)`` float32 ``sqrt(sum over the row's tokens of ||softmax(z) - onehot(y)||^2)``; 0 for a
        row without tokens.

    Examples:
        >>> logits = torch.zeros(3, 2)
        >>> norms = row_gradient_norms(logits, torch.tensor([0, 1, 0]), torch.tensor([0, 0, 2]), 3)
        >>> [round(n, 4) for n in norms.tolist()]  # two tokens of 0.5 squared each, none, one
        [1.0, 0.0, 0.7071]
    """
    squared = cross_entropy_gradient_norms(logits, targets).square()
    return torch.zeros(num_rows, device=logits.device).index_add_(0, rows, squared).sqrt()


def is_importance_batch(batch: Any) -> bool:
    """Whether a technique put loss weights (:data:`WEIGHTS_KEY`) or a score request into ``batch``.

    Examples:
        >>> is_importance_batch({"x": torch.zeros(2)}), is_importance_batch({SCORE_REQUEST_KEY: True})
        (False, True)
    """
    return isinstance(batch, MutableMapping) and (WEIGHTS_KEY in batch or SCORE_REQUEST_KEY in batch)


def importance_weighted_loss(
    losses: torch.Tensor,
    batch: MutableMapping[str, Any],
    tokens: torch.Tensor | None = None,
    scores: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The training loss of a batch, weighted by the importance weights the callback put into it.

    Takes the weights ``w`` out of the batch (so the callback can tell they were used) and
    returns, for per-example losses, ``mean(w * losses)``, whose expectation is the pool's mean
    loss; for sequences (``tokens`` given: each example's summed token losses and its number of
    predicted tokens) the weighted token mean ``sum(w * losses) / sum(w * tokens)``, the ratio
    estimate of the pool's token mean (consistent, its bias falls as 1/b). Without weights it is
    the plain mean (or token mean). When the callback asked for the batch's scores, it calls
    ``scores()`` (under ``no_grad``) and leaves them in ``batch[SCORES_KEY]``. A distillation
    technique's whole-step term (:attr:`SoftTargets.extra`) is added to the result.

    Args:
        losses: ``(N,)`` the loss of each example (with its graph), or the sum of its token losses.
        batch: The dict batch of the training step.
        tokens: ``(N,)`` predicted tokens per example, for token losses.
        scores: Gives the ``(N,)`` scores of this forward (``cross_entropy_gradient_norms`` of its logits).

    Examples:
        >>> losses = torch.tensor([1.0, 2.0, 3.0])
        >>> batch = {"x": torch.zeros(3), WEIGHTS_KEY: torch.tensor([2.0, 1.0, 0.0])}
        >>> round(float(importance_weighted_loss(losses, batch)), 4), WEIGHTS_KEY in batch  # (2 + 2 + 0) / 3
        (1.3333, False)
        >>> float(importance_weighted_loss(losses, {}, tokens=torch.tensor([1, 1, 2])))  # 6 / 4
        1.5
    """
    extra = batch.pop(EXTRA_LOSS_KEY, None)
    loss = _weighted_mean(losses, batch, tokens, scores)
    return loss if extra is None else loss + extra()


def _weighted_mean(
    losses: torch.Tensor,
    batch: MutableMapping[str, Any],
    tokens: torch.Tensor | None,
    scores: Callable[[], torch.Tensor] | None,
) -> torch.Tensor:
    weights = batch.pop(WEIGHTS_KEY, None)
    if scores is not None and batch.pop(SCORE_REQUEST_KEY, False):
        with torch.no_grad():
            batch[SCORES_KEY] = scores().detach().float()
    if weights is not None:
        weights = weights.to(device=losses.device, dtype=losses.dtype)
        losses = weights * losses
    if tokens is None:
        return losses.mean()
    tokens = tokens.to(device=losses.device, dtype=losses.dtype)
    counted = tokens.sum() if weights is None else (weights * tokens).sum()
    return losses.sum() / counted.clamp(min=torch.finfo(losses.dtype).tiny)


def take_soft_targets(batch: Any) -> SoftTargets | None:
    """Take the teacher's :class:`SoftTargets` out of a dict batch (None when no technique put any there)."""
    return batch.pop(SOFT_TARGETS_KEY, None) if isinstance(batch, MutableMapping) else None


def prediction_losses(
    logits: torch.Tensor, targets: torch.Tensor, batch: Any, label_smoothing: float = 0.0
) -> torch.Tensor:
    """The loss of each prediction of a training step: the distillation loss when a teacher's soft targets are in the batch.

    Args:
        logits: ``(M, C)`` the student's logits, one row per prediction (with their graph).
        targets: ``(M,)`` classes (:data:`MISSING_LABEL` where there is none).
        batch: The training step's batch; :data:`SOFT_TARGETS_KEY` is taken out of it.
        label_smoothing: Of the plain cross-entropy (not of a distillation loss).

    Returns:
        ``(M,)`` float32 losses; a row with :data:`MISSING_LABEL` and no teacher has loss 0.

    Examples:
        >>> logits, targets = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, MISSING_LABEL])
        >>> [round(x, 4) for x in prediction_losses(logits, targets, {}).tolist()]
        [0.1269, 0.0]
        >>> mse = SoftTargets(torch.zeros(2, 2), lambda s, t, y: (s - t).square().mean(-1))
        >>> prediction_losses(logits, targets, {SOFT_TARGETS_KEY: mse}).tolist()
        [2.0, 2.0]
    """
    soft = take_soft_targets(batch)
    if soft is not None:
        if soft.extra is not None:
            batch[EXTRA_LOSS_KEY] = soft.extra
        return soft.row_losses(logits, targets)
    return F.cross_entropy(
        logits.float(), targets, ignore_index=MISSING_LABEL, reduction="none", label_smoothing=label_smoothing
    )


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, batch: Any) -> torch.Tensor:
    """The training loss of one prediction per example, following the protocol.

    The plain mean cross-entropy (in float32); the mean distillation loss when a teacher's soft
    targets are in the batch (:func:`prediction_losses`); for a batch a technique weighted or asked
    scores of (:func:`is_importance_batch`), :func:`importance_weighted_loss` of the per-example
    losses with :func:`cross_entropy_gradient_norms` as the scores.

    Args:
        logits: ``(N, C)`` class logits (with their graph).
        labels: ``(N,)`` classes.
        batch: The training step's batch (weights and soft targets are taken out of a dict batch).

    Examples:
        >>> logits, labels = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0])
        >>> plain = classification_loss(logits, labels, {})
        >>> weighted = classification_loss(logits, labels, {WEIGHTS_KEY: torch.tensor([1.0, 1.0])})
        >>> torch.allclose(plain, weighted), torch.allclose(plain, F.cross_entropy(logits, labels))
        (True, True)
    """
    importance = is_importance_batch(batch)
    if not importance and not (isinstance(batch, MutableMapping) and SOFT_TARGETS_KEY in batch):
        return F.cross_entropy(logits.float(), labels)
    losses = prediction_losses(logits, labels, batch)
    if not importance:
        extra = batch.pop(EXTRA_LOSS_KEY, None)
        return losses.mean() if extra is None else losses.mean() + extra()
    return importance_weighted_loss(losses, batch, scores=lambda: cross_entropy_gradient_norms(logits, labels))


@contextmanager
def predicting(module: nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, ``module.predicted_positions`` is ``positions`` (then None again, even on error).

    Args:
        module: The LightningModule whose encoder runs inside the block.
        positions: ``(B, T)`` bool, True where the loss predicts.

    Examples:
        >>> module = nn.Linear(2, 2)
        >>> with predicting(module, torch.tensor([[True, False]])):
        ...     module.predicted_positions.tolist()
        [[True, False]]
        >>> module.predicted_positions is None
        True
    """
    setattr(module, PREDICTED_POSITIONS, positions)
    try:
        yield
    finally:
        setattr(module, PREDICTED_POSITIONS, None)
