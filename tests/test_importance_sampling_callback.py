"""ImportanceSampling, the callback: the modules' scores and weighted losses against autograd and the
formulas, the unbiased expected gradient through a module, the tau switch and an exact resume across
it, rank-specific draws on disjoint shards, logging, and every bad input."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_efficient import BertClassifier, BertMLM, Translation, ViTClassifier
from lightning_efficient.callbacks.importance_sampling import (
    SCORE_REQUEST_KEY,
    SCORES_KEY,
    WEIGHTS_KEY,
    ImportanceSampling,
    cross_entropy_gradient_norms,
    importance_weighted_loss,
    row_gradient_norms,
    tau_threshold,
    variance_reduction,
)
from lightning_efficient.data.sampling import ResumableDataLoader, ResumableSampler
from lightning_efficient.errors import ConfigurationError

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`:UserWarning")


# -- a user's own Transformer that exposes per-example losses ------------------------------------
class UserTransformer(pl.LightningModule):
    """A small classifier over token sequences, written the way the module docstring asks."""

    def __init__(self, report_scores: bool = True, use_weights: bool = True, lr: float = 0.3) -> None:
        super().__init__()
        self.report_scores, self.use_weights, self.lr = report_scores, use_weights, lr
        self.embed = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))

    def importance_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return cross_entropy_gradient_norms(self(batch["tokens"]), batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["tokens"])
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        if not self.use_weights:
            return losses.mean()
        scores = (lambda: cross_entropy_gradient_norms(logits, batch["labels"])) if self.report_scores else None
        loss = importance_weighted_loss(losses, batch, scores=scores)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def user_data(pool: int = 12, rows: int = 120, noisy: float = 0.1) -> ResumableDataLoader:
    """Token sequences of class c drawn from tokens [6c, 6c + 6) (easy), a share of them with a random label (hard)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (rows,), generator=generator)
    tokens = 6 * labels[:, None] + torch.randint(0, 6, (rows, 7), generator=generator)
    flip = torch.rand(rows, generator=generator) < noisy
    labels[flip] = torch.randint(0, 3, (int(flip.sum()),), generator=generator)
    examples = [{"tokens": t, "labels": y} for t, y in zip(tokens, labels)]
    return ResumableDataLoader(examples, batch_size=pool, sampler=ResumableSampler(examples, seed=0))


class Spy(Callback):
    """Before the technique: its tau; after it: the batch the step trains on; at the end: the step's loss."""

    def __init__(self, technique: ImportanceSampling, where: str) -> None:
        self.technique, self.where = technique, where
        self.tau_before: list[float | None] = []
        self.rows: list[int] = []
        self.weights: list[torch.Tensor | None] = []
        self.sampled: list[bool] = []
        self.losses: dict[int, float] = {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.where == "before":
            self.tau_before.append(self.technique.tau)
        else:
            self.rows.append(batch["labels"].shape[0])
            self.weights.append(batch.get(WEIGHTS_KEY))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.where == "after":
            self.sampled.append(self.technique._sampled_now)
            self.losses[trainer.global_step] = float(outputs["loss"])


def fit_user(
    technique: ImportanceSampling, root: Path, steps: int, model: pl.LightningModule | None = None, **kwargs: Any
) -> tuple[pl.LightningModule, Spy, Spy]:
    pl.seed_everything(0, verbose=False)
    model = model or UserTransformer()
    before, after = Spy(technique, "before"), Spy(technique, "after")
    callbacks: list[Callback] = [before, technique, after]
    if kwargs.pop("save_every_step", False):
        callbacks.append(ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=1, save_top_k=-1))
    trainer = pl.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=len(callbacks) > 3, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, callbacks=callbacks, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, user_data(), ckpt_path=kwargs.pop("ckpt_path", None))
    return model, before, after


# -- the modules: scores and weighted losses -----------------------------------------------------
def classification_batch(rows: int = 5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (rows, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (rows,), generator=generator)}


def test_row_gradient_norms_equal_autograd_of_each_rows_summed_token_losses() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 11, generator=generator) * 2
    targets = torch.randint(0, 11, (7,), generator=generator)
    rows = torch.tensor([0, 0, 2, 2, 2, 3, 0])
    expected = []
    for row in range(4):
        z = logits.clone().requires_grad_(True)
        loss = F.cross_entropy(z[rows == row], targets[rows == row], reduction="sum")
        expected.append(torch.autograd.grad(loss, z)[0].norm() if (rows == row).any() else torch.tensor(0.0))
    torch.testing.assert_close(row_gradient_norms(logits, targets, rows, 4), torch.stack(expected))


def test_classifier_scores_and_weighted_loss_follow_the_formulas() -> None:
    model = BertClassifier(vocab_size=60, num_labels=3, preset="tiny", dropout=0.0)
    batch = classification_batch()
    logits = model(batch["input_ids"], batch["attention_mask"]).detach()
    expected_scores = []
    for i in range(5):  # ||d loss_i / d logits_i|| by autograd
        z = logits[i : i + 1].clone().requires_grad_(True)
        expected_scores.append(torch.autograd.grad(F.cross_entropy(z, batch["labels"][i : i + 1]), z)[0].norm())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.importance_scores(batch), torch.stack(expected_scores))
    model.train()
    model._trainer = None  # training_step's self.log needs no trainer when none is attached
    plain = F.cross_entropy(logits, batch["labels"])
    assert model.training_step(dict(batch), 0) == plain  # no weights: the module's loss as before
    weights = torch.tensor([0.5, 2.0, 1.0, 0.0, 3.0])
    weighted = model.training_step({**batch, WEIGHTS_KEY: weights}, 0)
    per_example = F.cross_entropy(logits, batch["labels"], reduction="none")
    torch.testing.assert_close(weighted, (weights * per_example).sum() / 5)


def test_translation_and_mlm_weighted_token_means() -> None:
    mt = Translation(vocab_size=40, preset="tiny", dropout=0.0)
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(4, 40, (4, 6), generator=generator)
    labels[0, 4:] = -100
    labels[2, 1:] = -100
    batch = {
        "input_ids": torch.randint(4, 40, (4, 7), generator=generator),
        "attention_mask": torch.ones(4, 7, dtype=torch.long),
        "labels": labels,
    }
    weights = torch.tensor([1.0, 0.5, 2.0, 1.5])
    logits = mt(batch["input_ids"], batch["attention_mask"], labels).detach()
    smoothing = mt.hparams.label_smoothing
    assert smoothing > 0  # the training loss's label smoothing is kept
    token = F.cross_entropy(
        logits.transpose(1, 2), labels, reduction="none", label_smoothing=smoothing
    )  # 0 where ignored
    valid = (labels != -100).float()
    expected = (weights * token.sum(1)).sum() / (weights * valid.sum(1)).sum()
    torch.testing.assert_close(mt.training_step({**batch, WEIGHTS_KEY: weights}, 0), expected)
    mt.eval()
    with torch.no_grad():  # the summed-token bound, as autograd gives it
        z = logits.clone().requires_grad_(True)
        grads = []
        for i in range(4):
            with torch.enable_grad():
                grads.append(torch.autograd.grad(F.cross_entropy(z[i], labels[i], reduction="sum"), z)[0].norm())
        torch.testing.assert_close(mt.importance_scores(batch), torch.stack(grads))

    mlm = BertMLM(vocab_size=60, preset="tiny", dropout=0.0)
    batch = {
        "input_ids": torch.randint(5, 60, (4, 12), generator=generator),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
    }
    mlm.eval()
    with torch.no_grad():
        scores = mlm.importance_scores(batch)  # draws the masks into the batch
    mlm.train()
    masked, mlm_labels = batch["mlm_input_ids"], batch["mlm_labels"]
    hidden = mlm.model.bert(input_ids=masked, attention_mask=batch["attention_mask"]).last_hidden_state.detach()
    keep = mlm_labels != -100
    head = mlm.model.cls(hidden[keep]).detach()
    rows = keep.nonzero()[:, 0]
    torch.testing.assert_close(scores, row_gradient_norms(head, mlm_labels[keep], rows, 4))
    state = mlm.mask_generator.get_state()
    token = F.cross_entropy(head, mlm_labels[keep], reduction="none")
    sums = torch.zeros(4).index_add(0, rows, token)
    counts = torch.bincount(rows, minlength=4).float()
    weighted, _, _ = mlm._importance_step({**batch, WEIGHTS_KEY: weights})
    torch.testing.assert_close(weighted, (weights * sums).sum() / (weights * counts).sum())
    assert torch.equal(mlm.mask_generator.get_state(), state), "the scored masks are reused, none drawn again"


def test_vit_scores_equal_the_closed_form_of_its_logits() -> None:
    model = ViTClassifier(num_labels=4, preset="tiny", image_size=8, patch_size=4, num_channels=1, dropout=0.0).eval()
    batch = {"pixel_values": torch.randn(3, 1, 8, 8), "labels": torch.tensor([0, 3, 1])}
    with torch.no_grad():
        logits = model(batch["pixel_values"])
        expected = (logits.softmax(-1) - F.one_hot(batch["labels"], 4)).norm(dim=-1)
        torch.testing.assert_close(model.importance_scores(batch), expected)


def test_expected_gradient_through_the_module_equals_the_pool_gradient() -> None:
    """Exact enumeration of every draw of b=2 from a pool of 3: E[grad of the weighted loss] = grad of the pool's mean."""
    model = UserTransformer()
    generator = torch.Generator().manual_seed(3)
    pool = {"tokens": torch.randint(0, 20, (3, 7), generator=generator), "labels": torch.tensor([0, 2, 1])}
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([3.0, 0.0, -1.0]))  # confident in class 0: right, unsure, wrong
        scores = model.importance_scores(pool).double()
    p = scores / scores.sum()
    assert float(p.max() / p.min()) > 1.2, "a non-uniform distribution, or the test proves nothing"
    params = [q for q in model.parameters()]

    def gradient(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return list(torch.autograd.grad(model.training_step(batch, 0), params))

    full = gradient({k: v.clone() for k, v in pool.items()})
    expected = [torch.zeros_like(g, dtype=torch.float64) for g in full]
    for draw in itertools.product(range(3), repeat=2):
        index = torch.tensor(draw)
        weights = (1.0 / (3 * p[index])).float()
        batch = {"tokens": pool["tokens"][index], "labels": pool["labels"][index], WEIGHTS_KEY: weights}
        probability = math.prod(float(p[i]) for i in draw)
        for total, g in zip(expected, gradient(batch)):
            total += probability * g.double()
    for total, g in zip(expected, full):
        torch.testing.assert_close(total, g.double(), rtol=1e-5, atol=1e-7)


# -- the callback --------------------------------------------------------------------------------
def test_sampled_steps_train_b_weighted_rows_of_the_pool(tmp_path: Path) -> None:
    technique = ImportanceSampling(batch_size=4, tau_threshold=0.0, seed=1)
    _, _, after = fit_user(technique, tmp_path, steps=5)
    assert after.rows == [4] * 5 and after.sampled == [True] * 5
    assert technique.sampled_steps == technique.steps == 5 and technique.batches == 5
    for weights in after.weights:  # 1 / (B p_i) with p a distribution over 12: mean weight of a draw ~ 1
        assert weights is not None and weights.shape == (4,) and bool((weights > 0).all())


def test_sampling_switches_on_when_tau_passes_the_threshold_and_resume_is_exact(tmp_path: Path) -> None:
    threshold = 1.2
    technique = ImportanceSampling(batch_size=4, tau_threshold=threshold, seed=2)
    model, before, after = fit_user(technique, tmp_path / "full", steps=40, save_every_step=True)
    for tau, sampled in zip(before.tau_before, after.sampled):  # the rule: sample iff the average tau exceeds it
        assert sampled == (tau is not None and tau > threshold)
    assert not after.sampled[0] and any(after.sampled), f"tau never passed {threshold}: {technique.tau}"
    switch = after.sampled.index(True)  # 0-based index of the first sampled step; step={switch}.ckpt is right before it
    assert 2 <= switch <= 30, switch
    assert all(r == 4 for r in after.rows)
    assert all((w is None) != s for w, s in zip(after.weights, after.sampled))  # weights exactly on sampled steps
    full_weights = {k: v.clone() for k, v in model.state_dict().items()}
    for k in (switch - 1, switch, switch + 2):  # before the switch, at it, after it
        resumed_technique = ImportanceSampling(batch_size=4, tau_threshold=threshold, seed=2)
        checkpoint = tmp_path / "full" / f"step={k}.ckpt"
        resumed, _, resumed_after = fit_user(resumed_technique, tmp_path / f"r{k}", steps=40, ckpt_path=str(checkpoint))
        assert resumed_after.losses == {s: v for s, v in after.losses.items() if s > k}, f"resumed after step {k}"
        assert resumed_after.sampled == after.sampled[k:]
        for name, value in resumed.state_dict().items():
            assert torch.equal(value, full_weights[name]), name
        assert resumed_technique.state_dict() == technique.state_dict()


def test_uniform_steps_estimate_tau_from_the_training_forward(tmp_path: Path) -> None:
    technique = ImportanceSampling(batch_size=4, tau_threshold=1e9, tau_momentum=0.0)
    _, _, after = fit_user(technique, tmp_path, steps=3)
    assert after.sampled == [False] * 3 and after.weights == [None] * 3
    assert technique.tau is not None and technique.tau >= 1.0  # momentum 0: the last batch's estimate


def test_a_module_without_training_scores_gets_an_extra_scoring_pass_and_a_warning(tmp_path: Path) -> None:
    technique = ImportanceSampling(batch_size=4, tau_threshold=1e9)
    with pytest.warns(UserWarning, match="does not pass scores="):
        fit_user(technique, tmp_path, steps=2, model=UserTransformer(report_scores=False))
    assert technique.tau is not None and technique.steps == 2


def test_ranks_draw_differently_from_disjoint_shards() -> None:
    technique = ImportanceSampling(batch_size=2, seed=4)
    scores = torch.rand(16) + 0.1
    draws = [torch.multinomial(scores, 8, replacement=True, generator=technique._generator(rank)) for rank in (0, 1)]
    assert not torch.equal(draws[0], draws[1])
    again = torch.multinomial(scores, 8, replacement=True, generator=technique._generator(0))
    assert torch.equal(draws[0], again), "a rank's draw depends only on (seed, rank, batch count)"
    shards = [set(ResumableSampler(range(30), num_replicas=2, rank=rank, seed=0)) for rank in (0, 1)]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 30  # each rank's pools come from its own shard


def test_logs_tau_sampling_and_the_speedup_estimate(tmp_path: Path) -> None:
    technique = ImportanceSampling(batch_size=4, tau_threshold=0.0)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[technique], log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(UserTransformer(), user_data())
    metrics = trainer.callback_metrics
    for name in (
        "tau",
        "tau_threshold",
        "sampled",
        "sampled_fraction",
        "speedup_estimate",
        "score_max_over_mean",
        "weight_max",
    ):
        assert f"importance_sampling/{name}" in metrics, name
    assert float(metrics["importance_sampling/sampled_fraction"]) == 1.0
    assert float(metrics["importance_sampling/tau_threshold"]) == 0.0
    # the pool's tau over the break-even (B + 3b) / (3b) = (12 + 12) / 12
    assert float(metrics["importance_sampling/speedup_estimate"]) == pytest.approx(technique._pool_tau / 2.0)


def test_importance_weighted_loss_hands_over_the_scores_only_when_asked() -> None:
    losses = torch.tensor([1.0, 3.0])
    batch: dict[str, Any] = {SCORE_REQUEST_KEY: True}
    importance_weighted_loss(losses, batch, scores=lambda: torch.tensor([0.5, 0.25]))
    assert torch.equal(batch[SCORES_KEY], torch.tensor([0.5, 0.25])) and SCORE_REQUEST_KEY not in batch
    quiet: dict[str, Any] = {}
    importance_weighted_loss(losses, quiet, scores=lambda: pytest.fail("scored without a request"))
    assert quiet == {}
    assert variance_reduction(batch[SCORES_KEY]) > 1 and tau_threshold(12, 4) == 2.0


def test_a_draw_trims_the_pools_padding_to_its_longest_kept_row() -> None:
    lengths = [3, 4, 2, 9, 3, 4]  # the pool is padded to 9 by one long row
    mask = torch.tensor([[1] * n + [0] * (9 - n) for n in lengths])
    for seed in range(6):
        batch = {
            "input_ids": torch.randint(5, 50, (6, 9)) * mask,
            "attention_mask": mask.clone(),
            "labels": torch.arange(6),
        }
        technique = ImportanceSampling(batch_size=2, tau_threshold=1e9, seed=seed)  # uniform draws
        technique.on_train_batch_start(SimpleNamespace(global_rank=0), UserTransformer(), batch, 0)  # type: ignore[arg-type]
        kept = batch["labels"].tolist()
        longest = max(lengths[i] for i in kept)
        assert batch["attention_mask"].shape == batch["input_ids"].shape == (2, longest)
        assert torch.equal(batch["attention_mask"].sum(1), torch.tensor([lengths[i] for i in kept]))  # nothing real cut
    targets = torch.tensor([[7] * n + [-100] * (6 - n) for n in (2, 6, 3, 1)])  # translation labels, padded to 6
    batch = {"input_ids": torch.ones(4, 5, dtype=torch.long), "attention_mask": torch.ones(4, 5), "labels": targets}
    ImportanceSampling(batch_size=2, tau_threshold=1e9, seed=0).on_train_batch_start(
        SimpleNamespace(global_rank=0),
        UserTransformer(),
        batch,
        0,  # type: ignore[arg-type]
    )
    longest = int((batch["labels"] != -100).sum(1).max())
    assert batch["labels"].shape == (2, longest) and batch["input_ids"].shape == (2, 5)


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, r"batch_size=0 must be a positive integer"),
        ({"batch_size": 2.5}, r"batch_size=2.5 must be a positive integer"),
        ({"batch_size": 4, "tau_momentum": 1.0}, r"tau_momentum=1.0 must lie in \[0.0, 1.0\)"),
        ({"batch_size": 4, "smoothing": 1.5}, r"smoothing=1.5 must lie in \[0.0, 1.0\]"),
        ({"batch_size": 4, "tau_threshold": -1}, r"tau_threshold=-1 must be >= 0.0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ImportanceSampling(**kwargs)


def test_a_pool_smaller_than_the_batch_fails_before_training(tmp_path: Path) -> None:
    technique = ImportanceSampling(batch_size=16)  # the loader's pools hold 12
    with pytest.raises(ConfigurationError, match=r"batch_size=12 is the pool .* batch_size=16"):
        fit_user(technique, tmp_path, steps=2)
    assert technique.batches == 0, "no batch was drawn"


def test_a_module_without_per_example_scores_is_refused_at_setup(tmp_path: Path) -> None:
    class NoScores(UserTransformer):
        importance_scores = None  # type: ignore[assignment]

    technique = ImportanceSampling(batch_size=4)
    with pytest.raises(ConfigurationError, match="NoScores gives no per-example scores"):
        fit_user(technique, tmp_path, steps=2, model=NoScores())
    assert technique.batches == 0


def test_a_training_step_that_ignores_the_weights_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="did not use the importance weights"):
        fit_user(
            ImportanceSampling(batch_size=4, tau_threshold=0.0),
            tmp_path,
            steps=2,
            model=UserTransformer(use_weights=False),
        )


def test_scores_of_the_wrong_shape_and_tuple_batches_are_errors(tmp_path: Path) -> None:
    class BadScores(UserTransformer):
        def importance_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.ones(3)

    with pytest.raises(ConfigurationError, match=r"importance_scores must return a tensor of shape \(12,\)"):
        fit_user(ImportanceSampling(batch_size=4, tau_threshold=0.0), tmp_path, steps=1, model=BadScores())
    technique = ImportanceSampling(batch_size=2)
    with pytest.raises(ConfigurationError, match="needs dict batches"):
        technique.on_train_batch_start(None, UserTransformer(), (torch.zeros(4, 7), torch.zeros(4)), 0)  # type: ignore[arg-type]
