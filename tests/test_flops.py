"""FlopCounter against torch's FlopCounterMode and the analytic Transformer formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lightning_efficient import BertMLM, ConfigurationError, Translation, ViTClassifier
from lightning_efficient.flops import FlopCounter, count_flops, transformer_flops

H, FFN, LAYERS, HEADS = 32, 37, 3, 4  # the tiny preset


def reference_flops(run) -> int:
    """torch's count of forward + backward (math attention, which FlopCounterMode sees as bmm)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = run()
        if out.requires_grad:
            out.float().sum().backward()
    return counter.get_total_flops()


def our_flops(run) -> float:
    """Our count of the forward alone (backward charged from it); the backward runs uncounted."""
    with FlopCounter() as counter:
        out = run()
    if out.requires_grad:
        out.float().sum().backward()
    return counter.flops


def block_forward(batch: int, seq: int, memory: int | None = None) -> float:
    """Forward FLOPs of one tiny-preset block, written out: projections, attention, FFN."""
    tokens = batch * seq
    flops = 2 * tokens * (4 * H * H + 2 * H * FFN) + 4 * batch * seq * seq * H
    if memory is not None:  # cross-attention: q, o on the target, k, v on the memory
        flops += 2 * tokens * 2 * H * H + 2 * batch * memory * 2 * H * H + 4 * batch * seq * memory * H
    return flops


def _bert():
    torch.manual_seed(0)
    model = BertMLM(vocab_size=101, preset="tiny")
    ids = torch.randint(5, 101, (3, 13))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    return lambda: model(ids, mask)


def _marian():
    torch.manual_seed(0)
    model = Translation(vocab_size=101, preset="tiny")
    source, target = torch.randint(3, 101, (3, 11)), torch.randint(3, 101, (3, 7))
    return lambda: model(source, torch.ones_like(source), target)


def _vit():
    torch.manual_seed(0)
    model = ViTClassifier(num_labels=5, preset="tiny")
    images = torch.randn(2, 1, 28, 28)
    return lambda: model(images)


def _torch_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(H, HEADS, FFN, batch_first=True)
    encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
    x = torch.randn(2, 9, H)
    return lambda: encoder(x)


def _torch_decoder_separate_kv():
    torch.manual_seed(0)
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(H, HEADS, FFN), 2)
    attention = nn.MultiheadAttention(H, HEADS, kdim=20, vdim=24)
    target, memory = torch.randn(5, 2, H), torch.randn(9, 2, H)
    key, value = torch.randn(9, 2, 20), torch.randn(9, 2, 24)
    return lambda: decoder(target, memory) + attention(target, key, value)[0]


@pytest.mark.parametrize(
    "build", [_bert, _marian, _vit, _torch_encoder, _torch_decoder_separate_kv], ids=lambda f: f.__name__[1:]
)
def test_counter_equals_flop_counter_mode_forward_and_backward(build):
    run = build()
    assert our_flops(run) == reference_flops(run)


def test_torch_encoder_in_eval_under_no_grad_is_counted():
    """Eval + no_grad is where nn.TransformerEncoderLayer takes its fused fast path; under the
    counter it runs the composite path instead (same math), and every block is counted."""
    layer = nn.TransformerEncoderLayer(H, HEADS, FFN, batch_first=True)
    encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).eval()
    x = torch.randn(2, 9, H)
    with torch.no_grad():
        assert our_flops(lambda: encoder(x)) == LAYERS * block_forward(2, 9)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            assert our_flops(lambda: encoder(x)) == reference_flops(lambda: encoder(x))
        finally:
            torch.backends.mha.set_fastpath_enabled(True)


def test_counter_works_on_meta_and_matches_the_formula_for_bert_mlm_small():
    """The main job's shape (hidden 256, 4 layers, 30522 vocab, batch 32 x 128), head on 15% of the
    tokens, counted on the meta device: nothing is allocated or computed."""
    with torch.device("meta"):
        model = BertMLM(vocab_size=30522, preset="small", max_length=128)
    ids = torch.zeros(32, 128, dtype=torch.long, device="meta")
    masked = 614  # ~15% of 4096 tokens
    with FlopCounter() as counter:
        hidden = model.model.bert(input_ids=ids).last_hidden_state  # (B, T, H)
        model.model.cls(hidden.flatten(0, 1)[:masked])  # (M, V): transform + decoder
    h = 256
    expected = transformer_flops(32, 128, h, 4, 1024, extra_matmuls=[(h * h + h * 30522, masked)])
    assert counter.flops == pytest.approx(expected, rel=0.05)


def test_counter_matches_the_formula_for_marian_small():
    torch.manual_seed(0)
    model = Translation(vocab_size=997, preset="small", max_length=64)
    source, target = torch.randint(3, 997, (2, 23)), torch.randint(3, 997, (2, 17))
    with FlopCounter() as counter:
        model(source, torch.ones_like(source), target)
    h = 256
    expected = transformer_flops(2, 23, h, 4, 1024, decoder_layers=4, target_len=17, extra_matmuls=[(h * 997, 2 * 17)])
    assert counter.flops == pytest.approx(expected, rel=0.05)


def test_counter_matches_the_formula_for_vit_small():
    torch.manual_seed(0)
    model = ViTClassifier(num_labels=10, preset="small")
    with FlopCounter() as counter:
        model(torch.randn(2, 1, 28, 28))
    h, patches = 256, (28 // 4) ** 2
    expected = transformer_flops(2, patches + 1, h, 4, 1024, extra_matmuls=[(16 * h, 2 * patches), (h * 10, 2)])
    # The pixels need no gradient, so the patch embedding costs 2x its forward, not 3x: a 0.04% gap.
    assert counter.flops == pytest.approx(expected, rel=0.05)


def test_frozen_layers_and_no_grad_follow_the_convention():
    torch.manual_seed(0)
    first, frozen, last = nn.Linear(6, 10), nn.Linear(10, 8), nn.Linear(8, 3)
    frozen.requires_grad_(False)
    x = torch.randn(5, 6)  # the data needs no gradient
    forward = [2 * 5 * 6 * 10, 2 * 5 * 10 * 8, 2 * 5 * 8 * 3]

    def run():
        return last(frozen(first(x)))

    # first: weight grad only (2F); frozen: input grad only (2F); last: both (3F)
    assert our_flops(run) == 2 * forward[0] + 2 * forward[1] + 3 * forward[2]
    assert our_flops(run) == reference_flops(run)
    with torch.no_grad():
        assert our_flops(run) == sum(forward)
    first.requires_grad_(False)
    assert our_flops(run) == forward[0] + forward[1] + 2 * forward[2]  # only `last`'s weight gradient is left
    assert our_flops(run) == reference_flops(run)


class SkippableBlock(nn.Module):
    """Runs its block unless ``skip`` is set: what a layer-drop technique does."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block, self.skip = block, False

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        return hidden if self.skip else self.block(hidden, *args, **kwargs)


def test_a_skipped_layer_is_not_counted():
    torch.manual_seed(0)
    model = BertMLM(vocab_size=101, preset="tiny")
    layers = model.model.bert.encoder.layer
    layers[1] = SkippableBlock(layers[1])
    ids = torch.randint(5, 101, (2, 11))

    def run():
        return model.model.bert(input_ids=ids).last_hidden_state

    full = our_flops(run)
    layers[1].skip = True
    skipped = our_flops(run)
    assert full - skipped == 3 * block_forward(2, 11)


def test_einsum_tensordot_matmul_variants_and_conv():
    torch.manual_seed(0)
    a = torch.randn(3, 5, 7, requires_grad=True)
    w = torch.randn(7, 4, requires_grad=True)
    c = torch.randn(4, 6)
    cases = {
        "einsum pair": lambda: torch.einsum("bij,jk->bik", a, w),
        "einsum ellipsis": lambda: torch.einsum("...j,jk->...k", a, w),
        "einsum chain": lambda: torch.einsum("bij,jk,kl->bil", a, w, c),
        "tensordot": lambda: torch.tensordot(a, torch.randn(5, 7, 6, requires_grad=True), dims=2),
        "rmatmul": lambda: torch.Tensor.__rmatmul__(w, a),
        "baddbmm": lambda: torch.baddbmm(torch.zeros(3, 5, 4), a, w.expand(3, 7, 4)),
        "conv1d": lambda: nn.Conv1d(4, 6, 3)(torch.randn(2, 4, 11)),
    }
    for name, run in cases.items():
        assert our_flops(run) == reference_flops(run), name
    assert our_flops(cases["einsum pair"]) == 3 * 2 * 3 * 5 * 7 * 4
    # Grouped convolution: 2 x outputs x (C_in / groups) x kernel, weight gradient once more.
    # (FlopCounterMode's convolution_backward ignores groups and counts the weight gradient x groups.)
    grouped = nn.Conv1d(4, 6, 3, groups=2)
    assert our_flops(lambda: grouped(torch.randn(2, 4, 11))) == 2 * (2 * (2 * 6 * 9) * (2 * 3))


def test_count_flops_returns_the_result():
    layer = nn.Linear(4, 3)
    out, flops = count_flops(layer, torch.randn(2, 4))
    assert out.shape == (2, 3)
    assert flops == 3 * 2 * 2 * 4 * 3 - 2 * 4 * 3 * 2  # forward + weight gradient (input needs none)


def test_transformer_flops_formula_and_arguments():
    # One block of hidden 8, FFN 16, 4 tokens: projections 2*4*(4*64 + 2*128) + attention 4*16*8.
    assert transformer_flops(1, 4, 8, 1, 16, training=False) == 4096 + 512
    assert transformer_flops(1, 4, 8, 1, 16) == 3 * (4096 + 512)
    assert transformer_flops(2, 5, 32, 1, 37, decoder_layers=1, target_len=3, training=False) == pytest.approx(
        block_forward(2, 5) + block_forward(2, 3, memory=5)
    )
    with pytest.raises(ConfigurationError, match="target_len"):
        transformer_flops(1, 4, 8, 1, 16, decoder_layers=1)
