"""The per-example loss protocol lives in lightning_efficient.losses; models import no callback."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_efficient import losses
from lightning_efficient.callbacks import importance_sampling
from lightning_efficient.losses import softmax_cross_entropy
from lightning_efficient.models.bert import BertMLM

MODELS = Path(losses.__file__).parent / "models"
MOVED = [
    "PADDED_KEYS",
    "SCORES_KEY",
    "SCORE_REQUEST_KEY",
    "WEIGHTS_KEY",
    "cross_entropy_gradient_norms",
    "importance_weighted_loss",
    "is_importance_batch",
    "row_gradient_norms",
]


def test_importance_sampling_still_exports_the_moved_names_as_the_same_objects():
    unchanged = {"ImportanceSampling", "importance_sample", "tau_threshold", "variance_reduction"}
    assert set(importance_sampling.__all__) == {*MOVED, *unchanged}  # as in release 0.1.0
    for name in MOVED:
        assert getattr(importance_sampling, name) is getattr(losses, name), name


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.py")), ids=lambda p: p.name)
def test_models_import_no_technique(path):
    imported = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.append(node.module)
        elif isinstance(node, ast.Import):
            imported.extend(alias.name for alias in node.names)
    assert not [m for m in imported if m.startswith("lightning_efficient.callbacks")]


def test_classification_loss_weights_each_example_and_hands_back_the_scores():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 3, requires_grad=True), torch.tensor([0, 2, 1, 1])
    weights = torch.tensor([0.5, 2.0, 1.0, 0.0])
    batch = {"labels": labels, losses.WEIGHTS_KEY: weights, losses.SCORE_REQUEST_KEY: True}
    loss = losses.classification_loss(logits, labels, batch)
    reference = (weights * F.cross_entropy(logits, labels, reduction="none")).mean()
    torch.testing.assert_close(loss, reference)
    assert losses.WEIGHTS_KEY not in batch and losses.SCORE_REQUEST_KEY not in batch  # taken out: the callback can tell
    probabilities = logits.detach().softmax(-1)
    expected = (probabilities - F.one_hot(labels, 3)).norm(dim=-1)  # ||softmax(z) - onehot(y)||
    torch.testing.assert_close(batch[losses.SCORES_KEY], expected)
    loss.backward()  # the weighted loss keeps its graph
    assert logits.grad is not None and torch.equal(logits.grad[3], torch.zeros(3))  # weight 0: no gradient


def test_bert_mlm_says_which_positions_it_predicts_only_while_its_encoder_runs():
    model = BertMLM(vocab_size=60, preset="tiny")
    seen = []
    model.model.bert.encoder.register_forward_pre_hook(lambda module, args: seen.append(model.predicted_positions))
    ids = torch.randint(5, 60, (2, 10))
    labels = ids.masked_fill(torch.rand(2, 10, generator=torch.Generator().manual_seed(0)) > 0.3, -100)
    logits, targets = model.masked_logits(ids, torch.ones_like(ids), labels)
    assert torch.equal(seen[0], labels != -100) and model.predicted_positions is None
    assert logits.shape[0] == targets.shape[0] == int((labels != -100).sum())
    with pytest.raises(RuntimeError), losses.predicting(model, labels != -100):
        raise RuntimeError("an error inside the encoder")
    assert model.predicted_positions is None  # cleared even then


def test_softmax_cross_entropy_equals_torch_cross_entropy_and_its_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.randn(37, 1003) * 4
    logits[3, :] = 0.0
    logits[5, 7] = 150.0  # row 5's target (not 7) has probability exp(-150): below fp32's range
    targets = torch.randint(0, 1003, (37,))
    targets[5] = 8
    ours = logits.clone().requires_grad_()
    reference = logits.clone().requires_grad_()
    loss = softmax_cross_entropy(ours, targets)
    expected = F.cross_entropy(reference, targets)
    assert torch.isfinite(loss)
    assert torch.allclose(loss, expected, rtol=1e-6)
    (loss * 3).backward()
    (expected * 3).backward()
    assert torch.allclose(ours.grad, reference.grad, atol=1e-8)
    with torch.no_grad():  # evaluation: no graph
        assert torch.allclose(softmax_cross_entropy(logits, targets), expected)


def test_softmax_cross_entropy_refuses_a_second_backward() -> None:
    logits = torch.randn(4, 9, requires_grad=True)
    loss = softmax_cross_entropy(logits, torch.tensor([1, 2, 3, 4]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()
