"""Importance sampling's pure functions: scores against autograd, unbiasedness by exact enumeration,
the variance-reduction estimate, bad input; the callback on a batch with Hugging Face token ``labels``
and on a training step that ignores the weights."""

from __future__ import annotations

import itertools
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_efficient.callbacks.importance_sampling import (
    ImportanceSampling,
    cross_entropy_gradient_norms,
    importance_sample,
    importance_weighted_loss,
    tau_threshold,
    variance_reduction,
)
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.testing import quiet_trainer


def autograd_norms(logits: torch.Tensor, targets: torch.Tensor, token_mean: bool = True) -> torch.Tensor:
    """Per example, ||d loss_i / d logits_i|| by autograd, the loss as the modules define it."""
    norms = []
    for i in range(logits.shape[0]):
        z = logits[i].detach().clone().requires_grad_(True)
        if logits.dim() == 2:
            loss = F.cross_entropy(z[None], targets[i][None])
        else:
            valid = targets[i] != -100
            token_losses = F.cross_entropy(z, targets[i].clamp(min=0), reduction="none") * valid
            loss = token_losses.sum() / (valid.sum().clamp(min=1) if token_mean else 1)
        (gradient,) = torch.autograd.grad(loss, z)
        norms.append(gradient.norm())
    return torch.stack(norms)


def test_scores_equal_the_gradient_norms_autograd_computes() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=generator) * 3
    targets = torch.randint(0, 11, (6,), generator=generator)
    torch.testing.assert_close(cross_entropy_gradient_norms(logits, targets), autograd_norms(logits, targets))
    sequences = torch.randn(5, 7, 13, generator=generator) * 2
    tokens = torch.randint(0, 13, (5, 7), generator=generator)
    tokens[torch.rand(5, 7, generator=generator) < 0.6] = -100  # MLM: most positions are not predicted
    tokens[3] = -100  # a sequence with nothing to predict scores 0
    for token_mean in (True, False):
        expected = autograd_norms(sequences, tokens, token_mean)
        torch.testing.assert_close(cross_entropy_gradient_norms(sequences, tokens, token_mean=token_mean), expected)
    assert cross_entropy_gradient_norms(sequences, tokens)[3] == 0


def test_weighted_estimate_is_unbiased_by_exact_enumeration() -> None:
    """E[(1/b) sum_k w_k grad L_{i_k}] over every draw of b with replacement = the pool's mean gradient."""
    torch.manual_seed(0)
    pool, batch, classes = 4, 2, 3
    x = torch.randn(pool, 5, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    weight = torch.randn(classes, 5, dtype=torch.float64, requires_grad=True)

    def gradient(indices: list[int], weights: list[float]) -> torch.Tensor:
        losses = F.cross_entropy(x[indices] @ weight.T, y[indices], reduction="none")
        (g,) = torch.autograd.grad((losses * torch.tensor(weights, dtype=torch.float64)).mean(), weight)
        return g

    with torch.no_grad():
        scores = cross_entropy_gradient_norms((x @ weight.T).float(), y).double()
    p = scores / scores.sum()
    assert float(p.max() / p.min()) > 1.5  # a non-uniform distribution, or the test proves nothing
    full = gradient(list(range(pool)), [1.0] * pool)
    expected = torch.zeros_like(full)
    for draw in itertools.product(range(pool), repeat=batch):
        probability = math.prod(float(p[i]) for i in draw)
        expected += probability * gradient(list(draw), [1.0 / (pool * float(p[i])) for i in draw])
    torch.testing.assert_close(expected, full, rtol=1e-12, atol=1e-12)
    # and the weights importance_sample returns are those 1 / (B p_i)
    generator = torch.Generator().manual_seed(1)
    for _ in range(8):
        indices, weights = importance_sample(scores.float(), pool, generator)
        torch.testing.assert_close(weights.double(), 1.0 / (pool * p[indices]), rtol=1e-6, atol=0)


def test_draws_follow_the_scores_and_repeat_with_the_generator() -> None:
    scores = torch.tensor([1.0, 3.0, 0.0, 6.0])
    indices, _ = importance_sample(scores, 4, torch.Generator().manual_seed(5))
    again, _ = importance_sample(scores, 4, torch.Generator().manual_seed(5))
    assert torch.equal(indices, again)
    counts = torch.zeros(4)
    generator = torch.Generator().manual_seed(2)
    for _ in range(2000):
        drawn, _ = importance_sample(scores, 4, generator)
        counts += torch.bincount(drawn, minlength=4)
    torch.testing.assert_close(counts / counts.sum(), scores / scores.sum(), atol=0.01, rtol=0)
    assert counts[2] == 0  # a zero score is never drawn without smoothing
    _, smoothed = importance_sample(scores, 4, torch.Generator().manual_seed(0), smoothing=0.5)
    assert float(smoothed.max()) <= 1 / 0.5 + 1e-6  # smoothing s bounds the weights by 1 / s


def test_variance_reduction_and_its_threshold() -> None:
    assert variance_reduction(torch.ones(10)) == pytest.approx(1.0)
    assert variance_reduction(torch.zeros(10)) == 1.0
    scores = torch.tensor([1.0, 1.0, 1.0, 5.0])
    g = scores / scores.sum()
    expected = 1 / math.sqrt(1 - float(((g - 0.25) ** 2).sum() / (g**2).sum()))
    assert variance_reduction(scores) == pytest.approx(expected) and expected > 1.3
    assert tau_threshold(pool_size=96, batch_size=32) == pytest.approx((96 + 96) / 96)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: importance_sample(torch.ones(4), 5, torch.Generator()),
            r"batch_size=5 must be an integer in \[1, 4\]",
        ),
        (
            lambda: importance_sample(torch.ones(4), 0, torch.Generator()),
            r"batch_size=0 must be an integer in \[1, 4\]",
        ),
        (lambda: importance_sample(torch.ones(4), 2, torch.Generator(), smoothing=1.5), r"smoothing=1.5 must lie in"),
        (lambda: importance_sample(torch.tensor([1.0, -1.0]), 1, torch.Generator()), "must be finite and >= 0"),
        (lambda: importance_sample(torch.zeros(3), 1, torch.Generator()), "every importance score is 0"),
        (lambda: tau_threshold(pool_size=16, batch_size=32), "pool_size=16 must be >= batch_size=32"),
        (lambda: cross_entropy_gradient_norms(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long)), "do not fit"),
    ],
)
def test_bad_input_names_the_value(call, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        call()


# -- the callback on a user's token model ----------------------------------------------------------
VOCAB, LENGTH = 11, 8


class TokenModel(pl.LightningModule):
    """A per-token classifier over Hugging Face style batches: ``input_ids``, ``attention_mask``, and ``labels``
    of token ids (-100 where no loss), aligned with the inputs. Records the shapes of the batches it trains on."""

    def __init__(self, use_weights: bool = True) -> None:
        super().__init__()
        self.use_weights = use_weights
        self.embed, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...], int]] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))

    def importance_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return cross_entropy_gradient_norms(self(batch["input_ids"]), batch["labels"], token_mean=False)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        ids, labels = batch["input_ids"], batch["labels"]
        self.shapes.append((tuple(ids.shape), tuple(labels.shape), int(batch["attention_mask"].sum(1).max())))
        logits = self(ids)
        losses = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (N, T); 0 where -100
        if not self.use_weights:
            return losses.sum() / labels.ne(-100).sum()
        scores = lambda: cross_entropy_gradient_norms(logits, labels, token_mean=False)
        return importance_weighted_loss(losses.sum(1), batch, tokens=labels.ne(-100).sum(1), scores=scores)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def token_rows(count: int = 24) -> list[dict[str, torch.Tensor]]:
    """Rows of 3 to 8 tokens padded to 8; labels on the first 3 tokens only (masked-LM style), -100 elsewhere."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(count):
        length = 3 + i % 6
        ids = torch.randint(1, VOCAB, (LENGTH,), generator=generator)
        ids[length:] = 0
        labels = torch.full((LENGTH,), -100)
        labels[:3] = ids[:3]
        rows.append({"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels})
    return rows


@pytest.mark.parametrize("tau_threshold", [0.0, 1e9], ids=["sampled", "uniform"])
def test_token_labels_of_the_inputs_are_cut_with_them(tau_threshold: float) -> None:
    """labels with the inputs' shape stay aligned with them when the batch is cut to its longest row (the
    translation rule alone cut them after their last labelled column, 3, and the loss failed on the shapes)."""
    model = TokenModel()
    technique = ImportanceSampling(batch_size=3, tau_threshold=tau_threshold)
    loader = torch.utils.data.DataLoader(token_rows(), batch_size=6)
    quiet_trainer(max_steps=4, callbacks=[technique]).fit(model, loader)
    assert technique.steps == 4 and technique.sampled_steps == (4 if tau_threshold == 0 else 0)
    for ids, labels, longest in model.shapes:
        assert labels == ids and ids[1] == longest, "cut to the longest kept row, labels alike"
    assert any(ids[1] < LENGTH for ids, _, _ in model.shapes), "no batch was cut: the test proves nothing"


def test_a_training_step_that_ignores_the_weights_fails_before_its_backward() -> None:
    """The first weighted step stops before its backward: no parameter takes a biased step."""
    model = TokenModel(use_weights=False)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    loader = torch.utils.data.DataLoader(token_rows(), batch_size=6)
    trainer = quiet_trainer(max_steps=3, callbacks=[ImportanceSampling(batch_size=3, tau_threshold=0.0)])
    with pytest.raises(ConfigurationError, match="TokenModel.training_step did not use the importance weights"):
        trainer.fit(model, loader)
    assert trainer.global_step == 0
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
