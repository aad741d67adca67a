"""ResidualInit: identity at init, the schemes' constants against their formulas, norms removed, checkpoints."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_efficient import BertMLM, Translation, ViTClassifier
from lightning_efficient.blocks import block_hidden_states, find_block_stacks
from lightning_efficient.callbacks import ProgressiveStacking, ResidualInit
from lightning_efficient.callbacks.progressive_stacking import grow_blocks
from lightning_efficient.callbacks.residual_init import (
    RESIDUAL_SCALES,
    RemovedNorm,
    deepnorm_constants,
    layerscale_epsilon,
    t_fixup_factors,
)
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError
from lightning_efficient.testing import quiet_trainer


class TorchEncoder(nn.Module):
    """A user's own model: a stack of ``nn.TransformerEncoderLayer`` (post-LN unless ``norm_first``)."""

    def __init__(self, width: int = 16, depth: int = 3, norm_first: bool = False) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, 2, 24, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def families() -> dict[str, tuple[nn.Module, callable]]:
    """A tiny model of each kind and a function running it on a fixed batch."""
    torch.manual_seed(0)
    ids, targets = torch.randint(1, 60, (2, 9)), torch.randint(1, 60, (2, 7))
    pixels = torch.randn(2, 1, 28, 28)
    return {
        "bert": (BertMLM(vocab_size=60, preset="tiny"), lambda m: m.model(input_ids=ids).logits),
        "mt": (
            Translation(vocab_size=60, preset="tiny", bleu_batches=0),
            lambda m: m.model(input_ids=ids, decoder_input_ids=targets).logits,
        ),
        "vit": (ViTClassifier(num_labels=10, preset="tiny"), lambda m: m.model(pixel_values=pixels).logits),
        "torch": (TorchEncoder(), lambda m: m(torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)))),
    }


def block_inputs_and_outputs(model: nn.Module, run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(hidden states in, hidden states out) of every block of ``model`` during ``run(model)``."""
    seen = []

    def hook(block, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        seen.append((block_hidden_states(args, kwargs), out))

    handles = [
        block.register_forward_hook(hook, with_kwargs=True)
        for stack in find_block_stacks(model)
        for block in stack.blocks
    ]
    try:
        run(model)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("family", ["bert", "mt", "vit", "torch"])
@pytest.mark.parametrize("scheme", ["rezero", "skipinit"])
def test_every_block_is_the_identity_at_init(family, scheme):
    model, run = families()[family]
    ResidualInit(scheme=scheme, remove_norms=scheme == "skipinit").attach(model)
    model.eval()
    with torch.no_grad():
        pairs = block_inputs_and_outputs(model, run)
    assert len(pairs) >= 3
    for hidden_in, hidden_out in pairs:
        torch.testing.assert_close(hidden_out, hidden_in, rtol=0, atol=0)


def test_without_the_scheme_blocks_are_not_the_identity():  # the control of the test above
    model, run = families()["bert"]
    model.eval()
    with torch.no_grad():
        pairs = block_inputs_and_outputs(model, run)
    assert all(not torch.allclose(out, hidden) for hidden, out in pairs)


@pytest.mark.parametrize(
    ("scheme", "kwargs", "removed"),
    [
        ("rezero", {}, True),
        ("t_fixup", {}, True),
        ("skipinit", {}, False),
        ("skipinit", {"remove_norms": True}, True),
        ("layerscale", {}, False),
        ("deepnorm", {}, False),
    ],
)
def test_block_layer_norms_are_gone_exactly_where_the_scheme_removes_them(scheme, kwargs, removed):
    model, _ = families()["mt"]
    blocks = [block for stack in find_block_stacks(model) for block in stack.blocks]
    norms_before = sum(isinstance(m, nn.LayerNorm) for b in blocks for m in b.modules())
    ResidualInit(scheme=scheme, **kwargs).attach(model)
    layer_norms = sum(isinstance(m, nn.LayerNorm) for b in blocks for m in b.modules())
    removed_norms = sum(isinstance(m, RemovedNorm) for b in blocks for m in b.modules())
    assert norms_before == 3 * 2 + 3 * 3  # 3 encoder blocks of 2 norms, 3 decoder blocks of 3
    assert (layer_norms, removed_norms) == ((0, norms_before) if removed else (norms_before, 0))


def test_gradients_reach_every_branch_scale_and_the_surgery_undoes():
    model, run = families()["bert"]
    keys_before = set(model.state_dict())
    scheme = ResidualInit(scheme="layerscale", epsilon=0.1)
    scheme.attach(model)
    scales = {name: p for name, p in model.named_parameters() if f".{RESIDUAL_SCALES}." in name}
    assert len(scales) == 3 * 2  # 3 blocks x (attention, FFN)
    assert all(p.shape == (32,) and torch.all(p == 0.1) for p in scales.values())  # per-channel, at epsilon
    run(model).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scales.values())
    scheme.detach(model)
    assert set(model.state_dict()) == keys_before


def test_rezero_scalars_move_on_the_first_step_while_they_hold_every_other_gradient_at_zero():
    model, run = families()["bert"]
    ResidualInit(scheme="rezero").attach(model)
    run(model).pow(2).mean().backward()
    block = model.model.bert.encoder.layer[1]
    assert all(p.grad.abs() > 0 for p in getattr(block, RESIDUAL_SCALES).parameters())
    assert torch.count_nonzero(block.intermediate.dense.weight.grad) == 0  # a branch times 0: no gradient yet


def test_scheme_constants_equal_the_papers_formulas():
    n, m = 6, 6
    encoder, decoder = deepnorm_constants(n, m)["encoder"], deepnorm_constants(n, m)["decoder"]
    assert encoder == pytest.approx((0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16)))
    assert encoder == pytest.approx((1.42, 0.50), abs=0.005)  # the values pinned in the research notes
    assert decoder == pytest.approx(((3 * m) ** 0.25, (12 * m) ** -0.25))
    assert deepnorm_constants(12)["encoder"] == pytest.approx(((2 * 12) ** 0.25, (8 * 12) ** -0.25))
    assert deepnorm_constants(0, 12)["decoder"] == pytest.approx(((2 * 12) ** 0.25, (8 * 12) ** -0.25))
    assert t_fixup_factors(4) == pytest.approx({"encoder": 0.67 * 4**-0.25, "embedding": (9 * 4) ** -0.25})
    assert t_fixup_factors(4, 2) == pytest.approx(
        {"encoder": 0.67 * 4**-0.25, "decoder": (9 * 2) ** -0.25, "embedding": (9 * 2) ** -0.25}
    )
    assert [layerscale_epsilon(d) for d in (12, 18, 19, 24, 25, 48)] == [0.1, 0.1, 1e-5, 1e-5, 1e-6, 1e-6]


def xavier_uniform_bound(weight: torch.Tensor) -> float:
    fan_out, fan_in = weight.shape
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_t_fixup_scales_xavier_weights_by_the_encoder_and_decoder_factors():
    torch.manual_seed(0)
    model = Translation(vocab_size=60, preset="tiny", hidden_size=64, num_heads=4, ffn_size=96, bleu_batches=0)
    ResidualInit(scheme="t_fixup").attach(model)
    seq2seq = model.model.model
    encoder_factor, decoder_factor = 0.67 * 3**-0.25, (9 * 3) ** -0.25
    checks = []
    for layer, factor in [(seq2seq.encoder.layers[0], encoder_factor), (seq2seq.decoder.layers[2], decoder_factor)]:
        checks += [(layer.self_attn.q_proj.weight, 1.0), (layer.self_attn.k_proj.weight, 1.0)]
        checks += [(layer.self_attn.v_proj.weight, factor), (layer.self_attn.out_proj.weight, factor)]
        checks += [(layer.fc1.weight, factor), (layer.fc2.weight, factor)]
        assert torch.count_nonzero(layer.fc1.bias) == 0
    checks += [(seq2seq.decoder.layers[2].encoder_attn.v_proj.weight, decoder_factor)]
    for weight, factor in checks:  # Xavier-uniform's bound a, times the factor: the largest |w| is just under it
        bound = xavier_uniform_bound(weight) * factor
        assert 0.95 * bound < weight.abs().max() <= bound
    embedding = seq2seq.shared.weight  # shared by encoder, decoder and head: scaled once, by (9M)^-1/4
    assert embedding[1:].std().item() == pytest.approx(64**-0.5 * decoder_factor, rel=0.05)


def test_deepnorm_is_layer_norm_of_alpha_x_plus_the_branch_with_beta_scaled_xavier_weights():
    torch.manual_seed(0)
    model = TorchEncoder(width=64, depth=4)
    ResidualInit(scheme="deepnorm").attach(model)
    alpha, beta = (2 * 4) ** 0.25, (8 * 4) ** -0.25  # encoder only, N = 4
    layer = model.encoder.layers[1]
    width = 64
    q, _, v = layer.self_attn.in_proj_weight.chunk(3)
    xavier_std = math.sqrt(2.0 / (width + width))
    assert q.std().item() == pytest.approx(xavier_std, rel=0.05)
    assert v.std().item() == pytest.approx(beta * xavier_std, rel=0.05)
    assert layer.linear1.weight.std().item() == pytest.approx(beta * math.sqrt(2.0 / (64 + 24)), rel=0.08)
    layer.eval()
    x = torch.randn(2, 5, width)
    with torch.no_grad():
        out = layer(x)
        # the reference, written out: x1 = LN(alpha x + SA(x)), out = LN(alpha x1 + FFN(x1)), LN with its own eps
        attention = F.multi_head_attention_forward(
            x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), width, 2,
            layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias, None, None, False, 0.0,
            layer.self_attn.out_proj.weight, layer.self_attn.out_proj.bias, training=False, need_weights=False,
        )[0].transpose(0, 1)  # fmt: skip
        x1 = F.layer_norm(alpha * x + attention, (width,), layer.norm1.weight, layer.norm1.bias, 1e-5)
        ffn = F.linear(F.relu(layer.linear1(x1)), layer.linear2.weight, layer.linear2.bias)  # linear2 unhooked
        expected = F.layer_norm(alpha * x1 + ffn, (width,), layer.norm2.weight, layer.norm2.bias, 1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert layer.norm1.eps == pytest.approx(1e-5 / alpha**2)


def test_grown_blocks_keep_their_copied_weights_and_restart_their_scales():
    model, _ = families()["bert"]
    ResidualInit(scheme="rezero").attach(model)
    blocks = model.model.bert.encoder.layer
    with torch.no_grad():
        for i, block in enumerate(blocks):
            for scale in getattr(block, RESIDUAL_SCALES).parameters():
                scale.fill_(0.5 + i)
    grow_blocks(blocks, 2, 3, "stack")  # block 2 becomes a copy of block 0
    torch.testing.assert_close(blocks[2].intermediate.dense.weight, blocks[0].intermediate.dense.weight)
    assert [float(s) for s in getattr(blocks[0], RESIDUAL_SCALES).parameters()] == [0.5, 0.5]
    assert [float(s) for s in getattr(blocks[2], RESIDUAL_SCALES).parameters()] == [0.0, 0.0]  # a new identity block


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "fixup"}, r"scheme='fixup' .*rezero.*deepnorm"),
        ({"scheme": "layerscale", "epsilon": 0}, "epsilon=0 must be > 0"),
        ({"scheme": "layerscale", "epsilon": -1e-5}, "epsilon=-1e-05 must be > 0"),
        ({"scheme": "rezero", "remove_norms": True}, "remove_norms=True is SkipInit's option"),
        ({"scheme": "deepnorm", "layout": "both"}, r"layout='both'"),
    ],
)
def test_bad_arguments_fail_in_one_line(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        ResidualInit(**kwargs)


@pytest.mark.parametrize(
    ("family", "kwargs", "message"),
    [
        ("bert", {"scheme": "deepnorm", "layout": "encoder_decoder"}, "needs an encoder and a decoder stack"),
        ("mt", {"scheme": "t_fixup", "layout": "encoder"}, "is for a model with one block stack; Translation has 2"),
        ("vit", {"scheme": "deepnorm"}, "pre-LN: use scheme='rezero', 'skipinit' or 'layerscale'"),
    ],
)
def test_a_scheme_the_model_cannot_take_is_refused_naming_why(family, kwargs, message):
    model, _ = families()[family]
    with pytest.raises(ConfigurationError, match=message):
        ResidualInit(**kwargs).attach(model)


def test_a_model_with_unknown_blocks_is_refused_naming_how_to_register_them():
    class Block(nn.Module):
        def forward(self, x):
            return x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(2))

    with pytest.raises(ConfigurationError, match="Block has no architecture entry.*register_architecture"):
        ResidualInit(block_paths=["layers"]).attach(Model())


# -- checkpoints -------------------------------------------------------------------------------
def fit(model: pl.LightningModule, callbacks: list, tmp_path, steps: int = 2, ckpt_path=None) -> pl.Trainer:
    from lightning_efficient import MLMDataModule

    data = MLMDataModule(vocab_size=400, max_length=24, batch_size=4)
    trainer = quiet_trainer(max_steps=steps, callbacks=callbacks, default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


def tiny_bert() -> BertMLM:
    return BertMLM(vocab_size=400, preset="tiny", max_length=24, warmup_fraction=0.0)


@pytest.fixture(scope="module")
def rezero_checkpoint(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("rezero")
    trainer = fit(tiny_bert(), [ResidualInit(scheme="rezero")], tmp_path)
    path = tmp_path / "rezero.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_a_resumed_run_restores_the_trained_scales(rezero_checkpoint, tmp_path):
    saved = torch.load(rezero_checkpoint, weights_only=True)["state_dict"]
    scales = {k: v for k, v in saved.items() if RESIDUAL_SCALES in k}
    assert scales and all(v.abs() > 0 for v in scales.values())  # trained for 2 steps, away from 0
    model = tiny_bert()
    fit(model, [ResidualInit(scheme="rezero")], tmp_path, steps=2, ckpt_path=rezero_checkpoint)  # resumes at step 2
    restored = model.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in scales.items())


@pytest.mark.parametrize(
    ("callbacks", "message"),
    [
        (
            [ResidualInit(scheme="layerscale")],
            r"trained with ResidualInit\(scheme='rezero'\), not ResidualInit\(scheme='layerscale'\)",
        ),
        ([], r"trained with ResidualInit\(scheme='rezero'\), which changes the model's blocks: add it"),
    ],
)
def test_a_checkpoint_of_another_scheme_is_refused_before_its_weights_load(
    rezero_checkpoint, tmp_path, callbacks, message
):
    with pytest.raises(CheckpointMismatchError, match=message):
        fit(tiny_bert(), callbacks, tmp_path, steps=3, ckpt_path=rezero_checkpoint)


def test_a_checkpoint_without_the_scheme_is_refused_by_a_run_with_it(tmp_path):
    trainer = fit(tiny_bert(), [], tmp_path)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"trained without ResidualInit\(scheme='t_fixup'\)"):
        fit(tiny_bert(), [ResidualInit(scheme="t_fixup")], tmp_path, steps=3, ckpt_path=tmp_path / "plain.ckpt")


def test_load_from_checkpoint_without_the_scheme_names_it(rezero_checkpoint):
    with pytest.raises(CheckpointMismatchError, match=r"ResidualInit\(scheme='rezero'\)"):
        BertMLM.load_from_checkpoint(rezero_checkpoint)


def test_a_run_cannot_start_from_weights_trained_with_a_scheme(rezero_checkpoint):
    with pytest.raises(
        CheckpointMismatchError, match="changes the model's blocks; starting a new run from such weights"
    ):
        BertMLM(pretrained=str(rezero_checkpoint), preset="tiny", max_length=24)


def test_progressive_stacking_grows_rezero_blocks_as_the_identity(tmp_path):
    model = tiny_bert()
    grow = ProgressiveStacking(stages={0: 2, 2: 3})
    fit(model, [ResidualInit(scheme="rezero"), grow], tmp_path, steps=2)
    blocks = model.model.bert.encoder.layer
    model.eval()
    ids = torch.randint(0, 400, (2, 11))
    with torch.no_grad():
        before = model.model(input_ids=ids).logits
        grow.depth = 3  # what the next step's growth does
        grow_blocks(blocks, 2, 3, "stack")
        after = model.model(input_ids=ids).logits
    torch.testing.assert_close(after, before)
