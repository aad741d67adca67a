"""The distillation losses, as pure torch functions of student logits, teacher logits and labels.

Each function returns the loss of every row (one prediction: an example of a classifier, a
predicted token of a masked LM or of a translation), in float32, so a technique can average them
or weight them (:func:`lightning_efficient.losses.importance_weighted_loss`).

- ``mse``: the mean squared difference of the logits (Tang et al. 2019, who found it better than
  KL for a BiLSTM student; Kim et al. 2021 agree);
- ``kl``: ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` (Hinton et al. 2015; the ``T^2`` keeps
  the gradient's scale independent of the temperature);
- the hard term: cross-entropy against the gold label, or, for a row without one
  (:data:`~lightning_efficient.losses.MISSING_LABEL`, an augmented example), against the teacher's
  argmax (as Tang et al.'s code labels its transfer set), or no hard term for that row.

Examples:
    >>> student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 0.0]])
    >>> soft_losses(student, teacher, "mse").tolist()  # ((1 - 3)^2 + 0) / 2
    [2.0]
    >>> distillation_losses(student, teacher, torch.tensor([MISSING_LABEL]), "mse", alpha=0.0).tolist()
    [2.0]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_efficient.losses import MISSING_LABEL

__all__ = ["LOSSES", "MISSING_LABEL_RULES", "distillation_losses", "hard_targets", "soft_losses"]

#: The soft losses: mean squared logit difference, or temperature-scaled KL divergence.
LOSSES = ("mse", "kl")
#: What the hard term does for a row without a gold label: the teacher's argmax, or no hard term.
MISSING_LABEL_RULES = ("teacher", "drop")


def soft_losses(student: torch.Tensor, teacher: torch.Tensor, loss: str, temperature: float = 1.0) -> torch.Tensor:
    """The soft loss of each row: ``mse`` of the logits, or ``T^2``-scaled ``kl`` at temperature ``T``.

    Args:
        student: ``(M, C)`` student logits (with their graph).
        teacher: ``(M, C)`` teacher logits.
        loss: ``"mse"`` or ``"kl"``.
        temperature: Softens both distributions (``kl`` only).

    Returns:
        ``(M,)`` float32.

    Examples:
        >>> z = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(soft_losses(z, z, "kl", temperature=3.0))  # same logits: no divergence
        0.0
    """
    student, teacher = student.float(), teacher.float()
    if loss == "mse":
        return (student - teacher).square().mean(-1)
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    return temperature**2 * (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)


def hard_targets(targets: torch.Tensor, teacher: torch.Tensor, missing_labels: str) -> torch.Tensor:
    """The classes of the hard term: the gold label, and where there is none the teacher's argmax (or none).

    Examples:
        >>> teacher = torch.tensor([[0.0, 5.0], [5.0, 0.0]])
        >>> hard_targets(torch.tensor([0, MISSING_LABEL]), teacher, "teacher").tolist()
        [0, 0]
        >>> hard_targets(torch.tensor([0, MISSING_LABEL]), teacher, "drop").tolist()
        [0, -100]
    """
    if missing_labels == "drop":
        return targets
    return torch.where(targets == MISSING_LABEL, teacher.argmax(-1), targets)


def distillation_losses(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    loss: str = "mse",
    temperature: float = 1.0,
    alpha: float = 0.0,
    missing_labels: str = "teacher",
) -> torch.Tensor:
    """``alpha * CE(student, hard target) + (1 - alpha) * soft loss`` of each row.

    A row without a hard target (``missing_labels="drop"`` and no gold label) gets only
    ``(1 - alpha) * soft loss``. With ``alpha = 0`` (Tang et al.'s best) the labels play no part.

    Args:
        student: ``(M, C)`` student logits (with their graph).
        teacher: ``(M, C)`` teacher logits.
        targets: ``(M,)`` gold classes, :data:`~lightning_efficient.losses.MISSING_LABEL` where unknown.
        loss: The soft loss, ``"mse"`` or ``"kl"``.
        temperature: Of ``kl``.
        alpha: Weight of the hard cross-entropy, in ``[0, 1]``.
        missing_labels: ``"teacher"`` (hard target = the teacher's argmax) or ``"drop"``.

    Returns:
        ``(M,)`` float32.

    Examples:
        >>> student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
        >>> mixed = distillation_losses(student, teacher, torch.tensor([1]), "mse", alpha=0.5)
        >>> round(float(mixed), 4)  # 0.5 * ln 2 + 0.5 * (4 + 0) / 2
        1.3466
    """
    soft = soft_losses(student, teacher, loss, temperature)
    if alpha == 0.0:
        return soft
    hard = F.cross_entropy(
        student.float(), hard_targets(targets, teacher, missing_labels), ignore_index=MISSING_LABEL, reduction="none"
    )
    return alpha * hard + (1.0 - alpha) * soft
