"""The architecture table: every built-in block resolves on a real instance; a user's block is described once."""

from __future__ import annotations

import pytest
import torch
from own_block import OwnBlock, OwnModel, registered_own_block
from torch import nn

from lightning_efficient import BertMLM, Translation, ViTClassifier
from lightning_efficient.architectures import (
    AttentionLayout,
    architecture_of,
    block_view,
    model_architecture_of,
    register_architecture,
)
from lightning_efficient.blocks import find_block_stacks
from lightning_efficient.errors import ConfigurationError, NoTargetModulesError


def first_blocks(model: nn.Module) -> list[nn.Module]:
    return [stack.blocks[0] for stack in find_block_stacks(model)]


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        # (attentions: (path, heads, head size, cross), FFN width, norms, residual) of each stack's first block
        (lambda: BertMLM(vocab_size=50, preset="tiny"), [([("attention.self", 4, 8, False)], 37, 2, "post")]),
        (lambda: ViTClassifier(num_labels=3, preset="tiny"), [([("attention", 4, 8, False)], 37, 2, "pre")]),
        (
            lambda: Translation(vocab_size=60, preset="tiny"),
            [
                ([("self_attn", 4, 8, False)], 37, 2, "post"),
                ([("self_attn", 4, 8, False), ("encoder_attn", 4, 8, True)], 37, 3, "post"),
            ],
        ),
        (
            lambda: Translation(vocab_size=60, preset="tiny", architecture="bart"),
            [
                ([("self_attn", 4, 8, False)], 37, 2, "post"),
                ([("self_attn", 4, 8, False), ("encoder_attn", 4, 8, True)], 37, 3, "post"),
            ],
        ),
        (
            lambda: nn.Transformer(16, 2, 1, 1, 23, batch_first=True, norm_first=True),
            [([("self_attn", 2, 8, False)], 23, 2, "pre"), ([("self_attn", 2, 8, False), ("multihead_attn", 2, 8, True)], 23, 3, "pre")],
        ),
    ],
    ids=["bert", "vit", "marian", "bart", "torch"],
)
def test_every_built_in_block_resolves(build, expected):
    views = [block_view(block) for block in first_blocks(build())]
    found = [
        ([(a.path, a.heads, a.head_size, a.layout.cross) for a in v.attentions], v.ffn.width, len(v.norms), v.residual)
        for v in views
    ]
    assert found == expected
    for view in views:  # the modules named are the block's own: Q/K/V rows are heads * head_size
        for attention in view.attentions:
            rows = attention.heads * attention.head_size
            assert attention.output.in_features == rows
            assert all(p.out_features == rows for p in attention.projections)
            assert attention.fused == (not attention.projections)


def test_post_ln_torch_block_follows_norm_first():
    assert block_view(nn.TransformerEncoderLayer(8, 2, 5)).residual == "post"


def test_vocabulary_layouts():
    mlm = model_architecture_of(BertMLM(vocab_size=50, preset="tiny").model)
    assert mlm.embeddings == ("bert.embeddings.word_embeddings",) and mlm.heads == ("cls.predictions.decoder",) and mlm.tied
    assert model_architecture_of(nn.Linear(2, 2)) is None


def test_unknown_block_fails_naming_the_known_ones():
    with pytest.raises(ConfigurationError, match=r"OwnBlock has no architecture entry; known block classes: BartDecoderLayer, .*BertLayer, .*register_architecture"):
        block_view(OwnBlock())


def test_a_registered_block_resolves_and_its_lists_are_found():
    model = OwnModel()
    with pytest.raises(NoTargetModulesError, match="found no Transformer block stack in OwnModel"):
        find_block_stacks(model)
    with registered_own_block():
        (stack,) = find_block_stacks(model)
        assert (stack.path, stack.role, stack.kind, len(stack)) == ("blocks", "encoder", "OwnBlock", 3)
        assert stack.parent is model and stack.attribute == "blocks"
        view = block_view(model.blocks[0])
        assert [(a.heads, a.head_size) for a in view.attentions] == [(4, 8)]
        assert view.attentions[0].projections == [model.blocks[0].wq, model.blocks[0].wk, model.blocks[0].wv]
        assert view.ffn.first is model.blocks[0].ff_in and view.residual == "pre"
    assert architecture_of(model.blocks[0]) is None  # unregistered again


def test_registering_twice_needs_replace_and_bad_layouts_fail():
    with registered_own_block():
        with pytest.raises(ConfigurationError, match="OwnBlock already has an architecture entry; pass replace=True"):
            register_architecture(OwnBlock, attentions=[])
        register_architecture(OwnBlock, attentions=[], residual="post", replace=True)
        assert architecture_of(OwnBlock()).residual == "post"
    with pytest.raises(ConfigurationError, match="needs query, key and value"):
        AttentionLayout("attn", "q", None, "v")
    with pytest.raises(ConfigurationError, match=r"residual='sandwich' is unknown; choose one of: 'post', 'pre'"):
        register_architecture(OwnBlock, residual="sandwich")
    with registered_own_block():
        register_architecture(OwnBlock, attentions=[AttentionLayout("", "q", "k", "v")], replace=True)
        with pytest.raises(ConfigurationError, match=r"OwnBlock: attention output 'out_proj' is not an nn.Linear"):
            block_view(OwnBlock())


def test_own_model_trains_a_step():
    model = OwnModel()
    batch = next(iter(model.train_dataloader()))
    loss = model.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
