"""Fast CPU dropout (``lightning_efficient.models.dropout``): its masks, its gradient, its attention, and the models."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from lightning_efficient import BertMLM
from lightning_efficient.models.base import decay_parameter_groups
from lightning_efficient.models.dropout import ATTENTION, FastDropout, fast_dropout, keep_mask, use_fast_dropout
from lightning_efficient.testing import quiet_trainer


def tiny_bert(dropout: float) -> BertForMaskedLM:
    config = BertConfig(
        vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    return BertForMaskedLM(config)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p_in_every_lane(p: float) -> None:
    torch.manual_seed(0)
    mask, scale = keep_mask((1 << 18, 4), p)  # column j: lane j of each 64-bit draw
    dropped = round(p * 65536)
    assert scale == 65536 / (65536 - dropped)
    rates = mask.float().mean(0)
    assert torch.allclose(rates, torch.full((4,), 1 - dropped / 65536), atol=0.004)  # ~4 standard deviations
    assert mask[:-1].ne(mask[1:]).float().mean() == pytest.approx(2 * p * (1 - p), abs=0.004)  # no runs


def test_fast_dropout_value_and_gradient_are_mask_times_scale() -> None:
    torch.manual_seed(1)
    x = (torch.rand(64, 33) + 0.5).requires_grad_()
    y = fast_dropout(x, 0.3)
    kept = y != 0
    scale = 65536 / (65536 - round(0.3 * 65536))
    assert torch.allclose(y, x.detach() * kept * scale)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.allclose(x.grad, grad * kept * scale)


def test_fast_dropout_draws_from_the_global_generator() -> None:
    x = torch.ones(1000)
    torch.manual_seed(5)
    first = fast_dropout(x, 0.2)
    torch.manual_seed(5)
    assert torch.equal(fast_dropout(x, 0.2), first)
    assert not torch.equal(fast_dropout(x, 0.2), first)  # the generator moved on


def test_fast_dropout_edge_cases() -> None:
    x = torch.randn(10)
    assert fast_dropout(x, 0.0) is x
    assert fast_dropout(x, 0.5, training=False) is x
    assert torch.equal(fast_dropout(x, 1.0), torch.zeros(10))
    layer = FastDropout(0.25)
    assert isinstance(layer, nn.Dropout) and layer.p == 0.25


def test_attention_with_dropout_is_softmax_then_mask_then_values() -> None:
    """The math path, written out: softmax(Q K^T / sqrt(d) + mask), dropped with the same draws, times V."""
    model = use_fast_dropout(tiny_bert(0.2))
    attention = model.bert.encoder.layer[0].attention.self
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    function = ALL_ATTENTION_FUNCTIONS[ATTENTION]
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)
    allowed = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    allowed[1, ..., 5:] = False  # padding keys of row 1
    torch.manual_seed(3)
    out, _ = function(attention, q, k, v, allowed, dropout=0.2, scaling=8**-0.5)
    torch.manual_seed(3)
    mask, scale = keep_mask((2, 4, 7, 7), 0.2)
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    probabilities = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) * mask * scale
    assert torch.allclose(out, (probabilities @ v).transpose(1, 2), atol=1e-6)
    # without dropout: transformers' SDPA function, unchanged
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain, _ = function(attention, q, k, v, allowed, dropout=0.0, scaling=8**-0.5)
    assert torch.equal(plain, sdpa_attention_forward(attention, q, k, v, allowed, dropout=0.0, scaling=8**-0.5)[0])


def test_a_model_with_fast_dropout_computes_what_it_did_without_dropout(tmp_path) -> None:
    torch.manual_seed(0)
    plain = tiny_bert(0.1)
    fast = tiny_bert(0.1)
    fast.load_state_dict(plain.state_dict())
    use_fast_dropout(fast)
    assert not any(type(m) is nn.Dropout for m in fast.modules())
    assert sum(isinstance(m, FastDropout) for m in fast.modules()) == sum(
        isinstance(m, nn.Dropout) for m in plain.modules()
    )
    ids = torch.randint(5, 53, (3, 9))
    padding = torch.ones(3, 9, dtype=torch.long)
    padding[2, 6:] = 0
    plain.eval(), fast.eval()
    assert torch.allclose(
        plain(ids, attention_mask=padding).logits, fast(ids, attention_mask=padding).logits, atol=1e-6
    )
    fast.save_pretrained(tmp_path)  # the attention name is not saved: the model loads without this package
    assert ATTENTION not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bert"


def test_main_job_losses_equal_the_torch_dropout_and_foreach_adamw_ones() -> None:
    """Today's path (nn.Dropout, transformers' SDPA, AdamW foreach) and ours give the same losses at dropout 0."""

    def run(fast: bool) -> list[float]:
        torch.manual_seed(0)
        module = BertMLM(vocab_size=61, preset="tiny", max_length=16, dropout=0.0, learning_rate=3e-3)
        if not fast:
            for parent in list(module.model.modules()):
                for name, child in parent.named_children():
                    if isinstance(child, FastDropout):
                        setattr(parent, name, nn.Dropout(child.p))
            module.model.set_attn_implementation("sdpa")

            def configure_optimizers() -> dict:
                hp = module.hparams
                groups = decay_parameter_groups(module, hp.weight_decay)
                optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=(0.9, 0.98), eps=1e-6, foreach=True)
                return {"optimizer": optimizer, "lr_scheduler": module.lr_scheduler_config(optimizer)}

            module.configure_optimizers = configure_optimizers
        losses: list[float] = []

        class Record(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                losses.append(float(outputs["loss"]))

        ids = torch.randint(5, 61, (24, 16), generator=torch.Generator().manual_seed(1))
        loader = torch.utils.data.DataLoader(
            [{"input_ids": row, "attention_mask": torch.ones(16, dtype=torch.long)} for row in ids], batch_size=4
        )
        quiet_trainer(max_steps=6, limit_val_batches=0, callbacks=[Record()]).fit(module, loader)
        return losses

    today, ours = run(fast=False), run(fast=True)
    assert len(today) == 6 and today[0] != today[-1]
    assert ours == pytest.approx(today, rel=1e-5)
