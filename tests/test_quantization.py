"""QuantizationAwareTraining: fake quantization against a written-out reference, the switch and the freeze,
conversion equal to fake quantization, save/load, composition with pruning, bad input."""

from __future__ import annotations

import copy
import re
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_efficient import BertClassifier, BertMLM, MLMDataModule, Translation, testing
from lightning_efficient.callbacks.pruning import MagnitudePruning
from lightning_efficient.callbacks.pruning import export_pruned as export_pruning
from lightning_efficient.callbacks.quantization import (
    QuantizationAwareTraining,
    compile_quantized,
    export,
    export_quantized,
    load_quantized,
    save_quantized,
)
from lightning_efficient.errors import ConfigurationError, NoTargetModulesError

#: The quiet ``Trainer`` of these tests, without validation (a call's arguments win).
quiet_trainer = partial(testing.quiet_trainer, limit_val_batches=0, num_sanity_val_steps=0)


def tiny_mlm(dm: MLMDataModule, **kwargs: Any) -> BertMLM:
    return BertMLM(vocab_size=dm.vocab_size, preset="tiny", max_length=17, warmup_fraction=0.0, **kwargs)


# -- the reference: quantize-dequantize written out ------------------------------------------------
def reference_activation(x: torch.Tensor) -> torch.Tensor:
    """int8 per token, asymmetric: the range of each row (with 0 in it) onto [-128, 127]."""
    low = x.amin(dim=-1, keepdim=True).clamp(max=0)
    high = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((high - low) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zero_point = (-128 - torch.round(low / scale)).clamp(-128, 127)
    q = (torch.round(x * (1.0 / scale)) + zero_point).clamp(-128, 127)  # torchao multiplies by the reciprocal
    return (q - zero_point) * scale


def reference_symmetric_activation(x: torch.Tensor, per_token: bool) -> torch.Tensor:
    """int8 symmetric, per tensor or per token: max |x| onto half the int range, codes clamped to [-128, 127]."""
    high = x.abs().amax(dim=-1, keepdim=True) if per_token else x.abs().amax()
    scale = (high / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    q = torch.round(x * (1.0 / scale)).clamp(-128, 127)
    return q * scale


def reference_weight(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric per group of ``group`` columns (group = width: per channel): max |w| onto half the int range."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    scale = (g.abs().amax(dim=-1, keepdim=True) / ((qmax - qmin) / 2)).clamp(min=torch.finfo(torch.float32).eps)
    q = torch.round(g * (1.0 / scale)).clamp(qmin, qmax)
    return (q * scale).reshape(rows, cols)


def reference_weight_codes(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """The unclamped integer codes of :func:`reference_weight`."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    scale = (g.abs().amax(dim=-1, keepdim=True) / ((2**bits - 1) / 2)).clamp(min=torch.finfo(torch.float32).eps)
    return torch.round(g * (1.0 / scale)).reshape(rows, cols)


class OneLinear(nn.Module):
    """A model whose one 'block' is a Linear, found through ``block_paths``."""

    def __init__(self, d_in: int = 64, d_out: int = 24) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(d_in, d_out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x)


@pytest.mark.parametrize(
    ("weight_dtype", "granularity", "activations", "bits", "group"),
    [
        ("int8", "per_channel", "per_tensor", 8, 64),
        ("int8", "per_channel", "per_token", 8, 64),
        ("int8", "per_channel", "asymmetric_per_token", 8, 64),
        ("int4", "per_group", "asymmetric_per_token", 4, 16),
        ("int8", "per_group", "asymmetric_per_token", 8, 32),
    ],
)
def test_fake_quant_forward_equals_the_written_out_quantize_dequantize(
    weight_dtype: str, granularity: str, activations: str, bits: int, group: int
) -> None:
    torch.manual_seed(0)
    model = OneLinear()
    x = torch.randn(5, 7, 64) * torch.linspace(0.1, 3.0, 7).reshape(1, 7, 1)  # tokens with different ranges
    x.requires_grad_(True)
    qat = QuantizationAwareTraining(
        weight_dtype, granularity, group_size=group, activations=activations, block_paths=["blocks"],
        include=["blocks.0"],
    )  # fmt: skip
    qat.attach(model)
    linear = model.blocks[0]
    plain = F.linear(x, linear.weight, linear.bias)
    qat.active = False
    assert torch.equal(model(x), plain)  # off: the plain layer
    qat.active = True
    if activations == "asymmetric_per_token":
        x_fq = reference_activation(x)
    else:
        x_fq = reference_symmetric_activation(x, per_token=activations == "per_token")
    w_fq = reference_weight(linear.weight, bits, group)
    expected = F.linear(x_fq, w_fq, linear.bias)
    got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)  # quantization really happened
    got.sum().backward()  # straight-through: the gradients are those of the linear map of the quantized values
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    if activations != "asymmetric_per_token":  # torchao's asymmetric quantizer zeroes the gradient of clipped codes
        torch.testing.assert_close(x.grad, w_fq.detach().sum(0).expand_as(x), rtol=1e-5, atol=1e-6)
    # torchao's weight quantizer passes the gradient where the code is in range: a row's largest positive weight
    # lands on 127.5 and clamps to 127, so it gets none
    codes = reference_weight_codes(linear.weight.detach(), bits, group)
    in_range = (codes >= -(2 ** (bits - 1))) & (codes <= 2 ** (bits - 1) - 1)
    expected_grad = (torch.ones(5 * 7, 24).t() @ x_fq.detach().reshape(-1, 64)) * in_range
    torch.testing.assert_close(linear.weight.grad, expected_grad, rtol=1e-5, atol=1e-4)


def test_default_activations_follow_the_weights() -> None:
    assert QuantizationAwareTraining().activations == "per_tensor"
    assert QuantizationAwareTraining("int4", "per_group").activations == "asymmetric_per_token"
    assert QuantizationAwareTraining("int8", "per_group").activations == "asymmetric_per_token"


# -- the switch, the freeze, resume-relevant state ---------------------------------------------
class Probe(Callback):
    """After the QAT callback: records at each batch start whether fake quantization is on, and the scales."""

    def __init__(self, qat: QuantizationAwareTraining) -> None:
        self.qat = qat
        self.active: dict[int, bool] = {}
        self.scales: dict[int, torch.Tensor] = {}
        self.weights: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self.active[step] = self.qat.active
        name = next(iter(self.qat.targets))
        self.weights[step] = self.qat.targets[name].weight.detach().clone()
        scale = self.qat._quantizers[name].weight.scale
        if self.qat.frozen:
            self.scales[step] = scale.clone()


def test_switch_at_start_step_and_weight_scales_held_from_freeze_step(mlm_data: MLMDataModule) -> None:
    qat = QuantizationAwareTraining(start_step=2, freeze_step=4)
    probe = Probe(qat)
    model = tiny_mlm(mlm_data)
    keys = sorted(model.state_dict())
    quiet_trainer(max_steps=7, callbacks=[qat, probe]).fit(model, mlm_data)
    assert probe.active == {0: False, 1: False, 2: True, 3: True, 4: True, 5: True, 6: True}
    assert sorted(probe.scales) == [4, 5, 6]
    # the held scales are those of the weights at step 4, not of the later weights
    held = reference_weight_scale(probe.weights[4])
    for step in (4, 5, 6):
        torch.testing.assert_close(probe.scales[step].reshape(held.shape), held)
    assert not torch.equal(probe.weights[6], probe.weights[4])  # the weights moved on
    assert sorted(model.state_dict()) == keys  # checkpoint keys unchanged
    assert set(qat.state_dict()["frozen_scales"]) == set(qat.targets)


def reference_weight_scale(w: torch.Tensor) -> torch.Tensor:
    return (w.abs().amax(dim=-1, keepdim=True) / 127.5).clamp(min=torch.finfo(torch.float32).eps)


def test_validate_and_predict_runs_are_fake_quantized(mlm_data: MLMDataModule) -> None:
    qat = QuantizationAwareTraining(start_step=5)
    trainer = quiet_trainer(limit_val_batches=1, callbacks=[qat])
    trainer.validate(tiny_mlm(mlm_data), mlm_data)
    assert qat.active


# -- conversion, files ----------------------------------------------------------------------
CONVERSIONS = {
    "int8_per_tensor": {},
    "int8_per_token": {"activations": "per_token"},
    "int8_asymmetric_per_token": {"activations": "asymmetric_per_token"},
    "int4_per_group": {"weight_dtype": "int4", "granularity": "per_group", "group_size": 8},
    "int8_frozen_scales": {"freeze": True},
    "int8_asymmetric_frozen_scales": {"freeze": True, "activations": "asymmetric_per_token"},
    "with_embeddings": {"embeddings": True},
}


@pytest.mark.parametrize("kwargs", list(CONVERSIONS.values()), ids=list(CONVERSIONS))
def test_converted_model_equals_fake_quant_and_loads_back(kwargs: dict[str, Any], tmp_path: Path) -> None:
    kwargs = dict(kwargs)
    freeze = kwargs.pop("freeze", False)
    torch.manual_seed(0)
    model = BertClassifier(vocab_size=100, num_labels=3, preset="tiny", ffn_size=48).eval()
    qat = QuantizationAwareTraining(**kwargs)
    qat.attach(model)
    qat.active = True
    if freeze:
        for name, quantizers in qat._quantizers.items():
            quantizers.freeze_weight(qat.targets[name].weight)
        with torch.no_grad():
            for linear in qat.targets.values():
                linear.weight.mul_(1.01)  # weights move on after the freeze: the held scales must be used
    ids = torch.randint(0, 100, (4, 11))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        fake = model.model(input_ids=ids, attention_mask=mask).logits
        fake_weights = {n: qat._quantizers[n].weight(m.weight) for n, m in qat.targets.items()}
    report = export_quantized(model, qat)
    assert report["converted"] == 18 + 3 * qat.embeddings and not qat.is_applied  # word, position, type tables
    kind = "Int8Tensor" if qat.activations in ("per_tensor", "per_token") else "IntxUnpackedToInt8Tensor"
    weight = model.model.bert.encoder.layer[1].intermediate.dense.weight
    assert type(weight.data).__name__ == kind and weight.qdata.dtype == torch.int8
    for name, expected in fake_weights.items():  # the integer codes and scales are those training saw
        torch.testing.assert_close(model.get_submodule(name).weight.dequantize(), expected, rtol=0, atol=0)
    with torch.no_grad():
        converted = model.model(input_ids=ids, attention_mask=mask).logits
    # the same codes; the int8 product is exact where the fake-quantized float one rounds
    torch.testing.assert_close(converted, fake, rtol=0, atol=1e-5)
    save_quantized(model, tmp_path / "int8", report)
    loaded = load_quantized(tmp_path / "int8", compile=False)
    with torch.no_grad():
        again = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(again, converted, rtol=0, atol=0)
    assert type(loaded.bert.encoder.layer[0].output.dense.weight.data).__name__ == kind
    assert type(loaded.classifier.weight.data) is torch.Tensor  # the head stays float
    table = type(loaded.bert.embeddings.word_embeddings.weight.data).__name__
    assert table == ("IntxUnpackedToInt8Tensor" if qat.embeddings else "Tensor")
    size = sum(f.stat().st_size for f in (tmp_path / "int8").iterdir())
    float_bytes = 4 * sum(p.numel() for p in loaded.parameters())
    # int8 blocks and tables; at this tiny size biases, LayerNorms, scales and the head weigh a lot
    assert float_bytes / size > (1.5 if qat.embeddings else 1.05)


def test_readme_lines_train_export_load_and_predict(
    mlm_data: MLMDataModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's QAT lines as written (a shorter schedule), then its ``module.model = model; trainer.predict``:
    the compiled int8 model is moved where it is by each ``predict`` (it used to fail: "Couldn't swap"), and the
    QAT callback still in the trainer leaves the int8 layers alone (it used to fake-quantize them again)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL) if "load_quantized(" in b)
    assert "(module.model = model; trainer.predict(...))" in block
    code = block.replace("start_step=700", "start_step=1").replace("max_steps=1000", "max_steps=2")
    assert code.count("=1,") + code.count("=2,") == 2, "the README's schedule changed: update this test"
    monkeypatch.chdir(tmp_path)
    module = tiny_mlm(mlm_data)
    trainer_class = partial(quiet_trainer, limit_predict_batches=1)  # one batch: one compilation
    namespace = {"pl": SimpleNamespace(Trainer=trainer_class), "module": module, "datamodule": mlm_data}
    exec(code, namespace)  # noqa: S102 - the package's own README
    model, trainer = namespace["model"], namespace["trainer"]
    module.model = model
    first = trainer.predict(module, mlm_data)
    again = trainer.predict(module, mlm_data)  # its setup moves the model again, after compiled calls
    assert first == again and first[0][0]["prediction"]
    assert type(module.model.bert.encoder.layer[0].output.dense.weight.data).__name__ == "Int8Tensor"
    assert model.to("cpu") is model and module.cpu() is module


def test_compiled_int8_model_equals_the_eager_one_at_every_shape(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BertClassifier(vocab_size=100, num_labels=3, preset="tiny", ffn_size=48).eval()
    qat = QuantizationAwareTraining(embeddings=True)
    qat.attach(model)
    save_quantized(model, tmp_path / "int8", export_quantized(model, qat))
    eager = load_quantized(tmp_path / "int8", compile=False)
    fast = load_quantized(tmp_path / "int8")  # compiled: int8 kernels under inductor's freezing
    assert type(fast) is type(eager) and fast.config.num_labels == 3  # the HF model, attributes and all
    with torch.inference_mode():
        for shape in [(4, 11), (3, 7), (5, 13)]:  # the second shape recompiles with dynamic shapes
            ids = torch.randint(0, 100, shape)
            mask = torch.ones_like(ids)
            mask[0, shape[1] // 2 :] = 0  # padding too
            torch.testing.assert_close(
                fast(input_ids=ids, attention_mask=mask).logits,
                eager(input_ids=ids, attention_mask=mask).logits,
                rtol=1e-4,
                atol=1e-4,
            )


def test_translation_both_stacks_are_quantized(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Translation(vocab_size=120, preset="tiny", ffn_size=40).eval()
    qat = QuantizationAwareTraining()
    qat.attach(model)
    assert any(".decoder." in n and "encoder_attn" in n for n in qat.targets)  # cross-attention too
    assert any(".encoder." in n for n in qat.targets)
    qat.active = True
    src = torch.randint(3, 120, (2, 9))
    tgt = torch.randint(3, 120, (2, 7))
    with torch.no_grad():
        fake = model.model(input_ids=src, decoder_input_ids=tgt).logits
        report = export_quantized(model, qat)
        converted = model.model(input_ids=src, decoder_input_ids=tgt).logits
    torch.testing.assert_close(converted, fake, rtol=0, atol=1e-5)
    assert report["converted"] == len(report["modules"]) > 20


def test_compiled_translation_model_still_generates_the_eager_tokens() -> None:
    torch.manual_seed(0)
    model = Translation(vocab_size=120, preset="tiny", ffn_size=40).eval()
    qat = QuantizationAwareTraining()
    qat.attach(model)
    export_quantized(model, qat)
    eager = model.model
    fast = compile_quantized(copy.deepcopy(eager))  # keeps generate(): only forward is compiled
    src = torch.randint(3, 120, (2, 9))
    with torch.inference_mode():
        expected = eager.generate(input_ids=src, max_new_tokens=4, num_beams=1, do_sample=False)
        got = fast.generate(input_ids=src, max_new_tokens=4, num_beams=1, do_sample=False)
    assert torch.equal(got, expected)


def test_export_is_a_deprecated_name_of_export_quantized() -> None:
    from lightning_efficient import callbacks
    from lightning_efficient.callbacks import quantization

    torch.manual_seed(0)
    model = OneLinear()
    qat = QuantizationAwareTraining(block_paths=["blocks"])
    qat.attach(model)
    with pytest.warns(DeprecationWarning, match=r"use lightning_efficient\.callbacks\.export_quantized"):
        report = export(model, qat)
    assert report["modules"] == ["blocks.0"] and type(model.blocks[0].weight.data).__name__ == "Int8Tensor"
    assert "export" in quantization.__all__ and callbacks.export_quantized is quantization.export_quantized


# -- a user's own block, described once ------------------------------------------------------
def test_a_registered_own_block_is_fake_quantized_and_converted() -> None:
    from own_block import DEPTH, VOCAB, OwnModel, registered_own_block

    with pytest.raises(NoTargetModulesError):  # unknown without its description
        QuantizationAwareTraining().attach(OwnModel())
    # a seed whose activations lie far from a rounding tie: there one code may differ between the float and the int8
    # path, and the difference grows through the blocks (BERT's tests above are such draws too)
    torch.manual_seed(6)
    with registered_own_block():
        model = OwnModel()
        qat = QuantizationAwareTraining(start_step=1)
        quiet_trainer(max_steps=3, callbacks=[qat]).fit(model)
        layers = ("wq", "wk", "wv", "wo", "ff_in", "ff_out")
        expected = [f"blocks.{i}.{name}" for i in range(DEPTH) for name in layers]
        assert qat.active and list(qat.targets) == expected  # not embed, not head
        model.eval()
        ids = torch.randint(0, VOCAB, (2, 9))
        with torch.no_grad():
            fake = model(ids)
            qat.active = False
            plain = model(ids)
            qat.active = True
            fake_weights = {n: qat._quantizers[n].weight(m.weight) for n, m in qat.targets.items()}
        assert not torch.allclose(fake, plain, atol=1e-4)  # quantization really happened
        report = export_quantized(model, qat)
        with torch.no_grad():
            converted = model(ids)
    assert report["modules"] == expected
    for name, weight in fake_weights.items():  # the codes and scales training saw
        assert type(model.get_submodule(name).weight.data).__name__ == "Int8Tensor"
        torch.testing.assert_close(model.get_submodule(name).weight.dequantize(), weight, rtol=0, atol=0)
    assert type(model.head.weight.data) is torch.Tensor and type(model.embed.weight.data) is torch.Tensor
    torch.testing.assert_close(converted, fake, rtol=0, atol=1e-5)


# -- nn.MultiheadAttention: a fused in-projection and an out_proj it never calls ----------------
class TorchTransformer(pl.LightningModule):
    """A user's own model on torch's ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` (nested tensors on)."""

    def __init__(self, width: int = 16, vocab: int = 23) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = partial(nn.TransformerEncoderLayer, width, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer(), num_layers=2)
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(width, 2, dim_feedforward=32, dropout=0.0, batch_first=True), num_layers=1
        )
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        memory = self.encoder(self.embed(ids), src_key_padding_mask=padding)
        return self.head(self.decoder(self.embed(ids), memory, memory_key_padding_mask=padding))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch).flatten(0, 1), batch.flatten())

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        ids = torch.randint(0, 23, (16, 7), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(ids, batch_size=4)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_of_the_converted_module_is_torchs(batch_first: bool) -> None:
    """QuantizedMultiheadAttention (float, before torchao converts it) computes nn.MultiheadAttention:
    self- and cross-attention, boolean and float masks, padding, causal, weights, one unbatched sequence."""
    from lightning_efficient.callbacks.quantization.attention import QuantizedMultiheadAttention

    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, num_heads=2, batch_first=batch_first).eval()
    ours = QuantizedMultiheadAttention(attention)
    x, memory = torch.randn(3, 5, 8), torch.randn(3, 6, 8)
    if not batch_first:
        x, memory = x.transpose(0, 1), memory.transpose(0, 1)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    calls = [
        ((x, x, x), {}),
        ((x, memory, memory), {"key_padding_mask": padding, "average_attn_weights": False}),
        ((x, x, x), {"attn_mask": causal, "need_weights": False, "is_causal": True}),
        ((x, x, x), {"attn_mask": causal.isinf()}),  # boolean: True is not attended
        ((x, memory, memory), {"attn_mask": torch.randn(6, 5, 6)}),  # per batch and head
        ((x[0] if batch_first else x[:, 0],) * 3, {}),  # unbatched
    ]
    with torch.no_grad():
        for args, kwargs in calls:
            (expected, expected_weights), (got, got_weights) = attention(*args, **kwargs), ours(*args, **kwargs)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
            assert (got_weights is None) == (expected_weights is None)
            if expected_weights is not None:
                torch.testing.assert_close(got_weights, expected_weights, rtol=0, atol=1e-6)


def test_torch_transformer_attentions_are_quantized_and_converted() -> None:
    """nn.MultiheadAttention's fused in-projection and out_proj are fake-quantized (also in no_grad eval, where
    torch's fast path and nested tensors would bypass them), held scales included, and convert to int8 layers
    whose model runs and matches the fake-quantized one."""
    from lightning_efficient.callbacks.quantization.attention import QuantizedMultiheadAttention

    torch.manual_seed(1)  # a draw far from rounding ties (see the own-block test)
    model = TorchTransformer()
    qat = QuantizationAwareTraining(start_step=1, freeze_step=2)
    quiet_trainer(max_steps=3, callbacks=[qat]).fit(model)
    attentions = ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn", "decoder.layers.0.self_attn",
                  "decoder.layers.0.multihead_attn"]  # fmt: skip
    assert {f"{a}.{p}" for a in attentions for p in ("in_proj", "out_proj")} <= set(qat.targets)
    assert len(qat.targets) == 2 * 4 + 6 and qat.frozen
    model.eval()
    ids = torch.randint(0, 23, (3, 7))
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 5:] = True  # left-aligned padding: nn.TransformerEncoder's nested-tensor path in eval
    with torch.no_grad():
        fake = model(ids, padding)
        qat.active = False
        plain = model(ids, padding)
        qat.active = True
        fake_weights = {n: qat._quantizers[n].weight(m.weight) for n, m in qat.targets.items()}
        assert (fake - plain).abs().max() > 1e-3  # quantized, not torch's fast path on float weights
        report = export_quantized(model, qat)
        converted = model(ids, padding)
    for attention in attentions:
        module = model.get_submodule(attention)
        assert isinstance(module, QuantizedMultiheadAttention)
        codes = torch.cat([getattr(module, f"{p}_proj").weight.dequantize() for p in "qkv"])
        torch.testing.assert_close(codes, fake_weights[f"{attention}.in_proj"], rtol=0, atol=0)  # the held scales
        assert f"{attention}.q_proj" in report["modules"] and f"{attention}.in_proj" not in report["modules"]
    for name, weight in fake_weights.items():
        if not name.endswith(".in_proj"):
            assert type(model.get_submodule(name).weight.data).__name__ == "Int8Tensor"
            torch.testing.assert_close(model.get_submodule(name).weight.dequantize(), weight, rtol=0, atol=0)
    assert report["converted"] == len(report["modules"]) == 2 * 6 + 10
    torch.testing.assert_close(converted, fake, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids, torch.zeros_like(padding)), rtol=0, atol=1e-6)


def test_multihead_attention_that_cannot_be_quantized_is_refused_at_setup() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    layer.self_attn = nn.MultiheadAttention(16, 2, batch_first=True, add_zero_attn=True)
    encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
    with pytest.raises(
        ConfigurationError,
        match=r"^layers\.0\.self_attn \(MultiheadAttention\) has add_zero_attn=True, which QuantizationAwareTraining "
        r"cannot quantize; exclude 'layers\.0\.self_attn\.out_proj'",
    ):
        QuantizationAwareTraining().attach(encoder)
    bare = nn.ModuleDict({"attention": nn.MultiheadAttention(16, 2)})  # no block entry describes it
    with pytest.raises(
        ConfigurationError,
        match=r"^attention\.out_proj is the output projection of attention \(nn\.MultiheadAttention\), whose fused "
        r"in-projection \(in_proj_weight\) no architecture entry describes",
    ):
        QuantizationAwareTraining(include=["*.out_proj"]).attach(bare)


# -- composition with pruning ---------------------------------------------------------------
def test_pruned_weights_stay_zero_through_fake_quant_and_conversion(mlm_data: MLMDataModule) -> None:
    pruning = MagnitudePruning(final_sparsity=0.6, start_step=1)
    qat = QuantizationAwareTraining(start_step=2)
    model = tiny_mlm(mlm_data)
    quiet_trainer(max_steps=5, callbacks=[pruning, qat]).fit(model, mlm_data)
    assert pruning.sparsity == pytest.approx(0.6, abs=1e-3) and qat.active
    for name, linear in qat.targets.items():
        zero = linear.weight_mask == 0
        assert bool((linear.weight[zero] == 0).all())
        fake = qat._quantizers[name].weight(linear.weight)
        assert bool((fake[zero] == 0).all()), name  # 0 maps to 0 under symmetric quantization
    export_pruning(model, shrink=False)  # masks into the weights
    export_quantized(model, qat)
    layer = model.model.bert.encoder.layer[0].attention.self.query.weight
    assert float((layer.qdata == 0).float().mean()) >= 0.6 - 1e-3  # the zeros survive as int8 zeros


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_dtype": "int2"}, "weight_dtype='int2' is unknown; choose one of: 'int8', 'int4'"),
        (
            {"granularity": "per_tensor"},
            "granularity='per_tensor' is unknown; choose one of: 'per_channel', 'per_group'",
        ),
        ({"group_size": 1}, "group_size=1 must be an integer >= 2"),
        (
            {"activations": "per_channel"},
            "activations='per_channel' is unknown; choose one of: 'per_tensor', 'per_token', 'asymmetric_per_token'",
        ),
        (
            {"weight_dtype": "int4", "granularity": "per_group", "activations": "per_tensor"},
            (
                "activations='per_tensor' converts to torchao's Int8Tensor, which holds int8 weights per channel "
                "only, not weight_dtype='int4' with granularity='per_group'; use activations='asymmetric_per_token'"
            ),
        ),
        ({"start_step": -1}, "start_step=-1 must be >= 0"),
        ({"start_step": 5, "freeze_step": 3}, "freeze_step=3 must be >= 5"),
        ({"module_types": ()}, "module_types=() must name at least one module class"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        QuantizationAwareTraining(**kwargs)


def test_group_size_that_does_not_divide_a_width_fails_before_training(mlm_data: MLMDataModule) -> None:
    qat = QuantizationAwareTraining(weight_dtype="int4", granularity="per_group", group_size=16)
    model = tiny_mlm(mlm_data)  # FFN width 37: the FFN output layer's input width
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ConfigurationError,
        match=r"group_size=16 does not divide the input width 37 of .*output\.dense "
        r"\(3 layers affected; the target widths are \[32, 37\]\): no group size divides them all",
    ):
        quiet_trainer(max_steps=2, callbacks=[qat]).fit(model, mlm_data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_start_step_after_the_run_fails_before_training(mlm_data: MLMDataModule) -> None:
    qat = QuantizationAwareTraining(start_step=10)
    model = tiny_mlm(mlm_data)
    with pytest.raises(ConfigurationError, match=r"start_step=10 is never reached: the run has 4 optimizer steps"):
        quiet_trainer(max_steps=4, callbacks=[qat]).fit(model, mlm_data)
    assert model.global_step == 0
    lenient = QuantizationAwareTraining(start_step=10, strict_schedule=False)
    with pytest.warns(UserWarning, match="start_step=10 is never reached"):
        quiet_trainer(max_steps=1, callbacks=[lenient]).fit(tiny_mlm(mlm_data), mlm_data)


def test_patterns_that_match_nothing_and_models_without_blocks_fail(mlm_data: MLMDataModule) -> None:
    with pytest.raises(
        NoTargetModulesError,
        match=r"no Linear module matched include pattern '\*\.nothing' in BertMLM; candidates: model\.bert\.",
    ):
        QuantizationAwareTraining(include=["*.nothing"]).attach(tiny_mlm(mlm_data))
    with pytest.raises(
        NoTargetModulesError,
        match=r"no Linear module matched exclude pattern '\*\.nope' among the included ones in BertMLM; "
        r"candidates: model\.bert\.encoder\.layer\.0\.",
    ):
        QuantizationAwareTraining(exclude=["*.nope"]).attach(tiny_mlm(mlm_data))
    with pytest.raises(NoTargetModulesError):
        QuantizationAwareTraining().attach(nn.Sequential(nn.Linear(3, 3)))


def test_held_scales_of_layers_this_run_does_not_quantize_are_refused(mlm_data: MLMDataModule) -> None:
    first = QuantizationAwareTraining(freeze_step=0)
    quiet_trainer(max_steps=1, callbacks=[first]).fit(tiny_mlm(mlm_data), mlm_data)
    state = first.state_dict()
    assert len(state["frozen_scales"]) == 18
    narrower = QuantizationAwareTraining(freeze_step=0, include=["*.attention.self.query"])
    narrower.load_state_dict(state)
    with pytest.raises(ConfigurationError, match="the checkpoint holds held weight scales of"):
        quiet_trainer(max_steps=2, callbacks=[narrower]).fit(tiny_mlm(mlm_data), mlm_data)


# -- the config fragments ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "scheme"),
    [
        ("qat_int8", ("int8", "per_channel", "per_tensor")),
        ("qat_int4_weights", ("int4", "per_group", "asymmetric_per_token")),
    ],
)
def test_fragment_loads_through_the_cli(
    name: str, scheme: tuple[str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_efficient.cli import EfficientCLI

    configs = Path(__file__).parents[1] / "configs"
    fragment = configs / "techniques" / f"{name}.yaml"
    assert f"-c configs/techniques/{name}.yaml" in fragment.read_text()  # the command it documents
    monkeypatch.chdir(tmp_path)
    cli = EfficientCLI(args=["-c", str(configs / "bert" / "small_classify_prose.yaml"), "-c", str(fragment)], run=False)
    (qat,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, QuantizationAwareTraining)]
    assert len(cli.trainer.callbacks) > 2, "the fragment must append to the config's callbacks"
    assert (qat.weight_dtype, qat.granularity, qat.activations) == scheme
