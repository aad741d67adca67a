"""TokenDropping: which tokens are kept, the sequence restored, exactness at keep 1, FLOPs, schedule, bad input.

Exact resume, composition with every other technique and DDP are checked by the contract suite
(row ``token_dropping`` in ``techniques.py``).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from techniques import tiny_family
from torch import nn

from lightning_efficient import BertMLM, EfficiencyMonitor, LayerDrop, Translation, ViTClassifier
from lightning_efficient.blocks import wrap_forward
from lightning_efficient.callbacks import token_dropping
from lightning_efficient.callbacks.token_dropping import (
    TokenDropping,
    gather_mask,
    gather_tokens,
    keep_count,
    scatter_tokens,
    scheduled_keep_fraction,
    select_kept_tokens,
)
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.flops import count_flops, transformer_flops
from lightning_efficient.testing import quiet_trainer

B, T, VOCAB = 3, 20, 60


def bert(num_layers: int = 4, dropout: float = 0.0, **kwargs: Any) -> BertMLM:
    torch.manual_seed(0)
    return BertMLM(vocab_size=VOCAB, preset="tiny", num_layers=num_layers, max_length=T, dropout=dropout, **kwargs)


def batch(pad_from: int | None = None, left_pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids, attention mask (row 1 padded from ``pad_from``, row 2's first ``left_pad`` are padding) and
    labels predicting ~25% of the real tokens."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (B, T), generator=generator)
    mask = torch.ones_like(ids)
    if pad_from is not None:
        mask[1, pad_from:] = 0
    mask[2, :left_pad] = 0
    ids = ids * mask
    predicted = (torch.rand(B, T, generator=generator) < 0.25) & (mask == 1)
    predicted[:, 0] = False  # [CLS] is kept anyway; leave it out of the predicted ones
    return ids, mask, ids.masked_fill(~predicted, -100)


def record_block_inputs(model: BertMLM) -> list[tuple[int, int]]:
    """Wrap each block innermost: (block index, sequence length it really ran on), in call order."""
    calls: list[tuple[int, int]] = []
    for i, block in enumerate(model.model.bert.encoder.layer):

        def inner(forward: Any, hidden: torch.Tensor, *args: Any, _i: int = i, **kwargs: Any) -> Any:
            calls.append((_i, hidden.shape[1]))
            return forward(hidden, *args, **kwargs)

        wrap_forward(block, inner, priority=0)
    return calls


def trainer(callbacks: list[Callback], steps: int, root: Any, **kwargs: Any) -> pl.Trainer:
    return quiet_trainer(max_steps=steps, limit_val_batches=0, default_root_dir=root, callbacks=callbacks, **kwargs)


# -- the pure functions ----------------------------------------------------------------------------
def test_keep_count_and_schedule() -> None:
    assert [keep_count(f, 128) for f in (0.5, 0.25, 1.0, 1e-6)] == [64, 32, 128, 1]
    assert keep_count(0.3, 10) == 3 and keep_count(0.31, 10) == 4
    assert [scheduled_keep_fraction(t, 0.2, 1.0, 8) for t in (0, 2, 4, 8, 9)] == pytest.approx(
        [0.2, 0.4, 0.6, 1.0, 1.0]
    )
    assert scheduled_keep_fraction(3, 0.9, 0.3, 6) == pytest.approx(0.6)  # decreasing works too
    assert scheduled_keep_fraction(5, 0.4) == 0.4


def test_select_keeps_every_required_position_then_real_tokens_then_padding() -> None:
    generator = torch.Generator().manual_seed(0)
    for trial in range(50):
        rows, length = 4, 16
        real = torch.arange(length) < torch.randint(1, length + 1, (rows, 1), generator=generator)
        required = (torch.rand(rows, length, generator=generator) < 0.3) & real
        keep = int(torch.randint(1, length + 1, (), generator=generator))
        kept = select_kept_tokens(required, keep, generator, real)
        expected_k = min(length, max(keep, int(required.sum(1).max())))
        assert kept.shape == (rows, expected_k), trial
        assert torch.equal(kept, kept.sort(dim=1).values) and all(len(set(r.tolist())) == expected_k for r in kept)
        chosen = torch.zeros_like(required).scatter(1, kept, True)
        assert not (required & ~chosen).any(), "a required position was dropped"
        for r in range(rows):  # padding only once every real token is in
            if (chosen[r] & ~real[r]).any():
                assert (chosen[r] | ~real[r]).all()


def test_select_draws_uniformly_and_is_seeded() -> None:
    required = torch.zeros(1, 10, dtype=torch.bool)
    required[0, 0] = True
    draws = [select_kept_tokens(required, 4, torch.Generator().manual_seed(s)) for s in range(2000)]
    assert torch.equal(draws[3], select_kept_tokens(required, 4, torch.Generator().manual_seed(3)))
    counts = torch.bincount(torch.cat(draws).flatten(), minlength=10).double() / 2000
    assert counts[0] == 1.0
    assert torch.allclose(counts[1:], torch.full((9,), 3 / 9, dtype=torch.float64), atol=0.04)  # 3 of the other 9


def test_select_ranks_by_importance_scores() -> None:
    required = torch.tensor([[False, False, True, False, False]])
    scores = torch.tensor([[0.5, 0.1, -9.0, 0.9, 0.3]])
    assert select_kept_tokens(required, 3, scores=scores).tolist() == [[0, 2, 3]]


def test_gather_scatter_round_trip_and_masks() -> None:
    hidden = torch.randn(2, 6, 4)
    kept = torch.tensor([[0, 2, 5], [1, 3, 4]])
    gathered = gather_tokens(hidden, kept)
    assert torch.equal(gathered[1, 2], hidden[1, 4])
    assert torch.equal(scatter_tokens(hidden, gathered, kept), hidden)
    restored = scatter_tokens(hidden, torch.zeros(2, 3, 4), kept)
    dropped = torch.ones(2, 6, dtype=torch.bool).scatter(1, kept, False)
    assert torch.equal(restored[dropped], hidden[dropped]) and (restored[~dropped] == 0).all()
    padding = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert gather_mask(padding, kept).tolist() == [[1, 1, 0], [1, 1, 1]]
    square = padding.bool()[:, None, None, :].expand(2, 1, 6, 6)  # sdpa's (B, 1, T, T) bool form
    assert torch.equal(
        gather_mask(square, kept), gather_mask(padding, kept).bool()[:, None, None, :].expand(2, 1, 3, 3)
    )
    additive = (1.0 - padding[:, None, None, :].float()) * torch.finfo(torch.float32).min  # (B, 1, 1, T)
    assert gather_mask(additive, kept).shape == (2, 1, 1, 3)
    assert gather_mask(None, kept) is None


def test_gather_scatter_and_masks_equal_torch_gather_and_scatter_with_gradients() -> None:
    """The indexed copies give what torch.gather / torch.scatter with an expanded index give, gradients included."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 4, generator=generator, requires_grad=True)
    weight = torch.randn(3, 4, 4, generator=generator, requires_grad=True)  # the blocks' work on the kept tokens
    indices = torch.rand(3, 7, generator=generator).topk(4, dim=1).indices.sort(dim=1).values
    index = indices[:, :, None].expand(3, 4, 4)
    upstream = (torch.randn(3, 4, 4, generator=generator), torch.randn(3, 7, 4, generator=generator))

    def run(gather: Any, scatter: Any) -> list[torch.Tensor]:
        short = gather(hidden)
        restored = scatter(hidden, short * weight)
        loss = (short * upstream[0]).sum() + (restored * upstream[1]).sum()
        return [short, restored, *torch.autograd.grad(loss, (hidden, weight))]

    ours = run(lambda h: gather_tokens(h, indices), lambda h, k: scatter_tokens(h, k, indices))
    reference = run(lambda h: h.gather(1, index), lambda h, k: h.scatter(1, index, k))
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))

    square = torch.rand(3, 1, 7, 7, generator=generator) < 0.7  # (B, 1, T, T): keys, then queries
    keys = square.gather(3, indices[:, None, None, :].expand(3, 1, 7, 4))
    assert torch.equal(gather_mask(square, indices), keys.gather(2, indices[:, None, :, None].expand(3, 1, 4, 4)))
    additive = torch.randn(1, 1, 1, 7, generator=generator)  # (1, 1, 1, T): broadcast over the batch, keys only
    assert torch.equal(gather_mask(additive, indices), additive.expand(3, 1, 1, 7).gather(3, indices[:, None, None, :]))
    three = torch.rand(3, 7, 7, generator=generator)  # (B, T, T)
    expected = three.gather(2, indices[:, None, :].expand(3, 7, 4)).gather(1, indices[:, :, None].expand(3, 4, 4))
    assert torch.equal(gather_mask(three, indices), expected)


# -- on BertMLM ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad_from", [None, 14])
def test_sequence_is_restored_and_masked_positions_are_never_dropped(
    monkeypatch: pytest.MonkeyPatch, pad_from: int | None
) -> None:
    model = bert(num_layers=4)
    dropping = TokenDropping(keep_fraction=0.5)
    dropping.attach(model)
    calls = record_block_inputs(model)
    selections: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def recording(
        required: torch.Tensor, keep: int, generator: Any = None, real: Any = None, **kwargs: Any
    ) -> torch.Tensor:
        kept = select_kept_tokens(required, keep, generator, real, **kwargs)
        selections.append((required, real, kept))
        return kept

    monkeypatch.setattr(token_dropping, "select_kept_tokens", recording)
    ids, mask, labels = batch(pad_from)
    model.train()
    logits, targets = model.masked_logits(ids, mask, labels)
    assert dropping.ranges == [(1, 2)] and model.predicted_positions is None
    k = keep_count(0.5, T)
    assert calls == [(0, T), (1, k), (2, k), (3, T)]  # the last block and the head see the whole sequence
    assert logits.shape[0] == targets.shape[0] == int((labels != -100).sum())
    (required, real, kept) = selections[0]
    assert torch.equal(required, (labels != -100) | (torch.arange(T) == 0))  # predicted positions and [CLS]
    chosen = torch.zeros_like(required).scatter(1, kept, True)
    assert not (required & ~chosen).any()
    if pad_from is not None:
        assert torch.equal(real, mask.bool())  # read back from the sdpa mask
        assert not chosen[1, pad_from:].any()  # row 1 has 14 real tokens >= K = 10: no padding kept
    model.eval()
    calls.clear()
    model.masked_logits(ids, mask, labels)
    assert calls == [(i, T) for i in range(4)]  # evaluation: the full sequence everywhere


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_output_equals_the_range_run_on_the_kept_tokens(monkeypatch: pytest.MonkeyPatch, attention: str) -> None:
    """Blocks 1-2 on the gathered tokens with their padding mask, the dropped ones restored, then block 3."""
    model = bert(num_layers=4)
    model.model.config._attn_implementation = attention
    dropping = TokenDropping(keep_fraction=0.4, seed=7)
    dropping.attach(model)
    kept_log: list[torch.Tensor] = []
    original = token_dropping.select_kept_tokens
    monkeypatch.setattr(
        token_dropping, "select_kept_tokens", lambda *a, **k: kept_log.append(original(*a, **k)) or kept_log[-1]
    )
    ids, mask, labels = batch(pad_from=6, left_pad=5)  # row 1: 6 real tokens < K = 8, so it keeps 2 padding positions
    model.train()
    model.predicted_positions = labels != -100
    got = model.model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    model.predicted_positions = None
    (kept,) = kept_log
    assert (mask.gather(1, kept) == 0).any(), "the case of padding inside the kept set is not exercised"
    dropping.detach(model)
    layers = model.model.bert.encoder.layer
    with torch.no_grad():
        hidden = model.model.bert.embeddings(input_ids=ids)
        full_mask = mask.bool()[:, None, None, :].expand(B, 1, T, T)
        kept_mask = mask.gather(1, kept).bool()[:, None, None, :].expand(B, 1, kept.shape[1], kept.shape[1])
        if attention == "eager":
            full_mask = (~full_mask).float() * torch.finfo(torch.float32).min
            kept_mask = (~kept_mask).float() * torch.finfo(torch.float32).min
        entering = layers[0](hidden, full_mask)
        short = gather_tokens(entering, kept)
        for layer in layers[1:3]:
            short = layer(short, kept_mask)
        expected = layers[3](scatter_tokens(entering, short, kept), full_mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)  # padding rows' states are unused


def test_dropped_tokens_pass_the_range_unchanged() -> None:
    model = bert(num_layers=4)
    layers = model.model.bert.encoder.layer
    seen: dict[str, torch.Tensor] = {}
    layers[1].register_forward_pre_hook(lambda m, args: seen.update(entering=args[0]))
    layers[2].register_forward_hook(lambda m, args, out: seen.update(leaving=out))
    TokenDropping(keep_fraction=0.3).attach(model)
    ids, mask, labels = batch()
    model.train()
    model.masked_logits(ids, mask, labels)
    unchanged = (seen["leaving"] == seen["entering"]).all(dim=-1)  # (B, T)
    assert seen["leaving"].shape == (B, T, 32)
    assert int(unchanged.sum()) == B * (T - keep_count(0.3, T))  # exactly the dropped tokens
    assert not (unchanged & (labels != -100)).any() and not unchanged[:, 0].any()


@pytest.mark.parametrize("head_on_masked_only", [True, False])
def test_keep_fraction_one_is_exactly_no_dropping(head_on_masked_only: bool) -> None:
    ids, mask, labels = batch(pad_from=12)
    results = []
    for dropping in (None, TokenDropping(keep_fraction=1.0)):
        model = bert(num_layers=3, dropout=0.1, head_on_masked_only=head_on_masked_only)
        if dropping is not None:
            dropping.attach(model)
        model.train()
        torch.manual_seed(5)  # same dropout masks
        logits, targets = model.masked_logits(ids, mask, labels)
        loss = nn.functional.cross_entropy(logits, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_flops_follow_the_kept_tokens() -> None:
    """The counter charges the range's blocks at K tokens: the difference is the formula's for (T - K)."""
    ids, mask, labels = batch()
    model = bert(num_layers=4)
    model.train()
    _, full = count_flops(model.masked_logits, ids, mask, labels)
    dropping = TokenDropping(keep_fraction=0.5)
    dropping.attach(model)
    _, dropped = count_flops(model.masked_logits, ids, mask, labels)
    k, size = keep_count(0.5, T), model.size
    per_block = {n: transformer_flops(B, n, size.hidden_size, 1, size.ffn_size) for n in (T, k)}
    assert full - dropped == pytest.approx(2 * (per_block[T] - per_block[k]))
    assert dropped < full
    model.eval()
    with torch.no_grad():
        _, evaluated = count_flops(model.masked_logits, ids, mask, labels)
    assert evaluated == pytest.approx(full / 3)  # evaluation: the full sequence, forward only


class StepLog(Callback):
    """Records each step's scheduled and realised kept fraction and the monitor's counted FLOPs."""

    def __init__(self, monitor: EfficiencyMonitor, dropping: TokenDropping | None) -> None:
        self.monitor, self.dropping, self.steps = monitor, dropping, []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = {"flops": self.monitor.last_step["flops"]}
        if self.dropping is not None:
            step.update(keep_fraction=self.dropping._fraction, kept_tokens=self.dropping._realised)
        self.steps.append(step)


def test_monitor_flops_and_the_schedule_through_fit(user_files: dict, tmp_path: Any) -> None:
    """Same seeds and data with and without dropping: the monitor's FLOPs differ by the formula's share."""
    runs, metrics = {}, {}
    for name, dropping in (("base", None), ("drop", TokenDropping(keep_fraction=0.25, final_keep_fraction=0.75))):
        pl.seed_everything(0, verbose=False)
        model, dm = tiny_family("bert", user_files)  # 3 blocks: block 1 dropped; 33 tokens
        monitor = EfficiencyMonitor(peak_flops=1e12)
        log = StepLog(monitor, dropping)
        callbacks = [monitor, log] if dropping is None else [dropping, monitor, log]
        fit = trainer(callbacks, steps=5, root=tmp_path / name, limit_train_batches=5)
        fit.fit(model, dm)
        runs[name], metrics[name] = log.steps, dict(fit.callback_metrics)
    length, size = 33, tiny_family("bert", user_files)[0].size
    for step, (base, drop) in enumerate(zip(runs["base"], runs["drop"], strict=True)):
        fraction = 0.25 + 0.5 * step / 5  # linear over estimated_stepping_batches = max_steps = 5
        assert drop["keep_fraction"] == pytest.approx(fraction)
        (kept,) = drop["kept_tokens"]  # one encoder call per step
        k = round(kept * length)
        assert k >= keep_count(fraction, length) and kept == pytest.approx(k / length)
        per_block = {n: transformer_flops(8, n, size.hidden_size, 1, size.ffn_size) for n in (length, k)}
        assert base["flops"] - drop["flops"] == pytest.approx(per_block[length] - per_block[k]), step
    assert float(metrics["drop"]["token_dropping/keep_fraction"]) == pytest.approx(0.25 + 0.5 * 4 / 5)
    assert float(metrics["drop"]["token_dropping/kept_tokens"]) == pytest.approx(runs["drop"][-1]["kept_tokens"][0])


def test_composes_with_layer_drop_inside_the_range() -> None:
    """LayerDrop skips a dropped block: it passes the shortened sequence through, restored after the range."""
    model = bert(num_layers=3)
    dropping, layer_drop = TokenDropping(keep_fraction=0.5), LayerDrop(drop_rate=0.5)
    layer_drop.attach(model)
    dropping.attach(model)
    calls = record_block_inputs(model)
    layer_drop._keep, layer_drop._kept = [torch.full((3,), 0.5)], [torch.tensor([True, False, True])]
    layers = model.model.bert.encoder.layer
    seen: dict[str, torch.Tensor] = {}
    layers[1].register_forward_pre_hook(lambda m, args: seen.update(entering=args[0]))
    layers[1].register_forward_hook(lambda m, args, out: seen.update(leaving=out))
    ids, mask, labels = batch()
    model.train()
    model.masked_logits(ids, mask, labels)
    assert calls == [(0, T), (2, T)]  # block 1 skipped
    assert torch.equal(seen["leaving"], seen["entering"])  # gathered, passed through, scattered back: unchanged
    layer_drop._kept = [torch.tensor([True, True, True])]
    calls.clear()
    model.masked_logits(ids, mask, labels)
    assert calls == [(0, T), (1, keep_count(0.5, T)), (2, T)]


def test_fits_with_layer_drop(user_files: dict, tmp_path: Any) -> None:
    model, dm = tiny_family("bert", user_files)
    losses: list[float] = []

    class Losses(Callback):
        def on_train_batch_end(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
        ) -> None:
            losses.append(float(outputs["loss"]))

    callbacks = [TokenDropping(0.5, layers=(0, 1)), LayerDrop(0.3, seed=1), Losses()]
    trainer(callbacks, steps=3, root=tmp_path).fit(model, dm)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)


def test_user_encoder_with_key_padding_mask() -> None:
    """An nn.TransformerEncoder model via block_paths: the padding mask is gathered, [CLS] and predicted kept."""

    class Own(nn.Module):
        predicted_positions: torch.Tensor | None = None

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)

    own = Own()
    TokenDropping(keep_fraction=0.5, block_paths=["encoder.layers"]).attach(own)
    x = torch.randn(2, 8, 8)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[1, 5:] = True
    own.predicted_positions = torch.zeros(2, 8, dtype=torch.bool)
    own.predicted_positions[:, 3] = True
    own.train()
    seen: dict[str, torch.Tensor] = {}
    own.encoder.layers[1].register_forward_pre_hook(lambda m, args: seen.update(entering=args[0]))
    own.encoder.layers[1].register_forward_hook(lambda m, args, out: seen.update(leaving=out))
    out = own.encoder(x, src_key_padding_mask=padding)
    assert out.shape == x.shape and torch.isfinite(out[~padding]).all()
    changed = (seen["leaving"] != seen["entering"]).any(-1)  # (B, T): the kept tokens
    assert changed.sum(1).tolist() == [4, 4] and changed[:, [0, 3]].all()
    assert not changed[1, 5:].any()  # row 1 has 5 real tokens: the padding is dropped first
    with pytest.raises(ValueError, match="cannot restrict a src_mask"):  # one (T, T) mask for every row
        own.encoder(x, mask=torch.zeros(8, 8))


def test_encoder_run_without_predicted_positions_warns_and_runs_everything() -> None:
    model = bert(num_layers=3)
    TokenDropping(0.5).attach(model)
    calls = record_block_inputs(model)
    model.train()
    ids = batch()[0]
    with pytest.warns(UserWarning, match="without predicted_positions"):
        model(ids)
    assert calls == [(0, T), (1, T), (2, T)]


def test_state_is_plain_and_round_trips() -> None:
    first = TokenDropping(0.5, final_keep_fraction=1.0)
    first._total_steps, first._last_step, first._micro = 40, 7, 1
    second = TokenDropping(0.5, final_keep_fraction=1.0)
    second.load_state_dict(first.state_dict())
    assert second.state_dict() == {"schedule_steps": 40, "last_step": 7, "micro": 1}


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_fraction": 0.0}, r"keep_fraction=0.0 must lie in \(0.0, 1.0\]"),
        ({"keep_fraction": 1.5}, r"keep_fraction=1.5 must lie in \(0.0, 1.0\]"),
        ({"keep_fraction": -0.2}, r"keep_fraction=-0.2 must lie in \(0.0, 1.0\]"),
        ({"keep_fraction": float("nan")}, r"keep_fraction=nan must be a finite number"),
        ({"final_keep_fraction": 0.0}, r"final_keep_fraction=0.0 must lie in \(0.0, 1.0\]"),
        ({"final_keep_fraction": 1.01}, r"final_keep_fraction=1.01 must lie in \(0.0, 1.0\]"),
        ({"final_keep_fraction": 1.0, "schedule_steps": 0}, r"schedule_steps=0 must be an integer >= 1"),
        ({"schedule_steps": 10}, r"schedule_steps=10 schedules nothing without final_keep_fraction"),
        ({"layers": (2, 1)}, r"layers=\(2, 1\) must satisfy 0 <= first <= last"),
        ({"layers": (-1, 1)}, r"layers=\(-1, 1\) must satisfy 0 <= first <= last"),
        ({"layers": (1,)}, r"layers=\(1,\) must be a pair \(first, last\)"),
        ({"layers": (1.0, 2.0)}, r"must be a pair \(first, last\) of block indices"),
    ],
)
def test_bad_arguments_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        TokenDropping(**kwargs)


def test_a_range_outside_the_model_names_its_depth(tmp_path: Any) -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"layers=\(1, 3\) is outside BertMLM's stack 'model.bert.encoder.layer'.*3 blocks \(indices 0 to 2\)",
    ):
        TokenDropping(layers=(1, 3)).attach(bert(num_layers=3))
    with pytest.raises(
        ConfigurationError, match=r"default range .* is empty .* of 2 blocks; pass layers=\(first, last\)"
    ):
        TokenDropping().attach(bert(num_layers=2))
    TokenDropping(layers=(0, 1)).attach(bert(num_layers=2))  # an explicit range works on 2 blocks
    model = bert(num_layers=3)
    trainer_ = trainer([TokenDropping(layers=(2, 5))], steps=1, root=tmp_path)
    with pytest.raises(ConfigurationError, match="3 blocks"):  # at setup, before any step
        trainer_.fit(model)
    assert trainer_.global_step == 0


@pytest.mark.parametrize("build", [lambda: ViTClassifier(num_labels=3, preset="tiny"),
                                   lambda: Translation(vocab_size=200, preset="tiny", max_length=16)])  # fmt: skip
def test_models_without_predicted_positions_are_refused(build: Any) -> None:
    model = build()
    with pytest.raises(
        ConfigurationError,
        match=rf"{type(model).__name__} does not say which they are: it has no attribute predicted_positions",
    ):
        TokenDropping().attach(model)


def test_schedule_without_a_length_fails_before_training(tmp_path: Any) -> None:
    dropping = TokenDropping(0.5, final_keep_fraction=1.0)
    stub = SimpleNamespace(estimated_stepping_batches=float("inf"))  # max_steps=-1, max_epochs=-1
    with pytest.raises(ConfigurationError, match=r"pass schedule_steps or set trainer.max_steps"):
        dropping.on_train_start(stub, None)
