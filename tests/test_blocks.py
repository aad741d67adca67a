import pytest
import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    MarianConfig,
    MarianMTModel,
    RobertaConfig,
    RobertaForMaskedLM,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

from lightning_efficient import BertClassifier, BertMLM, NoTargetModulesError, Translation, ViTClassifier
from lightning_efficient.blocks import KNOWN_STACKS, find_block_stacks

SHAPE = dict(hidden_size=32, num_attention_heads=4, intermediate_size=37)
SEQ2SEQ = dict(vocab_size=50, pad_token_id=0, decoder_start_token_id=0, d_model=32, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37)


def summary(model: nn.Module, **kwargs) -> list[tuple[str, str, str, int]]:
    return [(s.path, s.role, s.kind, len(s)) for s in find_block_stacks(model, **kwargs)]


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (lambda: BertModel(BertConfig(vocab_size=50, num_hidden_layers=2, **SHAPE)), [("encoder.layer", "encoder", "BertEncoder", 2)]),
        (lambda: RobertaForMaskedLM(RobertaConfig(vocab_size=50, num_hidden_layers=3, **SHAPE)), [("roberta.encoder.layer", "encoder", "RobertaEncoder", 3)]),
        (
            lambda: ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, num_hidden_layers=2, **SHAPE)),
            [("vit.layers", "encoder", "ViTModel", 2)],  # transformers 4: vit.encoder.layer (ViTEncoder)
        ),
        (
            lambda: MarianMTModel(MarianConfig(encoder_layers=2, decoder_layers=3, **SEQ2SEQ)),
            [("model.encoder.layers", "encoder", "MarianEncoder", 2), ("model.decoder.layers", "decoder", "MarianDecoder", 3)],
        ),
        (
            lambda: BartForConditionalGeneration(BartConfig(encoder_layers=3, decoder_layers=2, **SEQ2SEQ)),
            [("model.encoder.layers", "encoder", "BartEncoder", 3), ("model.decoder.layers", "decoder", "BartDecoder", 2)],
        ),
        (
            lambda: T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=37, num_heads=4, num_layers=2, num_decoder_layers=3)),
            [("encoder.block", "encoder", "T5Stack", 2), ("decoder.block", "decoder", "T5Stack", 3)],
        ),
    ],
    ids=["bert", "roberta", "vit", "marian", "bart", "t5"],
)
def test_hf_families(factory, expected):
    assert summary(factory()) == expected


def test_torch_transformer_encoder_and_decoder():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 31, batch_first=True), 3, enable_nested_tensor=False)
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 31, batch_first=True), 2)
    assert summary(encoder) == [("layers", "encoder", "TransformerEncoder", 3)]
    assert summary(nn.Transformer(16, 2, 2, 1, 31, batch_first=True)) == [
        ("encoder.layers", "encoder", "TransformerEncoder", 2),
        ("decoder.layers", "decoder", "TransformerDecoder", 1),
    ]
    assert summary(decoder)[0][:3] == ("layers", "decoder", "TransformerDecoder")


class OwnModel(nn.Module):
    """A user's hand-written Transformer: an nn.TransformerEncoder inside, plus a custom stack."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 31, batch_first=True), 2, enable_nested_tensor=False)
        self.mixers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.head = nn.Linear(16, 50)


def test_own_model_is_found_and_paths_override():
    model = OwnModel()
    assert summary(model) == [("encoder.layers", "encoder", "TransformerEncoder", 2)]
    (stack,) = find_block_stacks(model, paths=["mixers"])
    assert (stack.path, stack.role, stack.kind, len(stack)) == ("mixers", "custom", "path", 3)
    assert stack.parent is model and stack.attribute == "mixers" and stack.blocks is model.mixers


def test_our_lightning_modules():
    assert summary(BertMLM(vocab_size=50, preset="tiny")) == [("model.bert.encoder.layer", "encoder", "BertEncoder", 3)]
    assert summary(BertClassifier(vocab_size=50, num_labels=2, preset="tiny"))[0][0] == "model.bert.encoder.layer"
    assert [s[:2] for s in summary(Translation(vocab_size=50, preset="tiny"))] == [
        ("model.model.encoder.layers", "encoder"),
        ("model.model.decoder.layers", "decoder"),
    ]
    assert [s[:2] for s in summary(Translation(vocab_size=50, architecture="bart", preset="tiny"))] == [
        ("model.model.encoder.layers", "encoder"),
        ("model.model.decoder.layers", "decoder"),
    ]
    assert summary(ViTClassifier(num_labels=10, preset="tiny")) == [("model.vit.layers", "encoder", "ViTModel", 3)]


def test_parent_and_attribute_allow_replacing_the_stack():
    model = BertMLM(vocab_size=50, preset="tiny")
    (stack,) = find_block_stacks(model)
    setattr(stack.parent, stack.attribute, nn.ModuleList(list(stack.blocks)[:1]))
    assert len(model.model.bert.encoder.layer) == 1
    ids = torch.randint(5, 50, (2, 7))
    assert model(ids).shape == (2, 7, 50)  # the shallower model still runs


def test_nothing_found_names_what_was_searched():
    with pytest.raises(NoTargetModulesError, match=r"found no Transformer block stack in Sequential: searched its modules for BertEncoder, .*T5Stack.*; .*paths=\['model.encoder.layers'\]"):
        find_block_stacks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    assert set(KNOWN_STACKS) >= {"BertEncoder", "ViTEncoder", "MarianEncoder", "BartDecoder", "T5Stack", "TransformerEncoder"}


def test_same_name_without_blocks_is_not_a_stack():
    class TransformerEncoder(nn.Module):  # a user's class that shares the name but holds no block list
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(NoTargetModulesError, match="found no Transformer block stack"):
        find_block_stacks(nn.Sequential(TransformerEncoder()))


def test_bad_paths():
    model = OwnModel()
    with pytest.raises(NoTargetModulesError, match=r"block path 'encoder.blocks': OwnModel has no submodule 'blocks' under encoder; children there: layers"):
        find_block_stacks(model, paths=["encoder.blocks"])
    with pytest.raises(NoTargetModulesError, match=r"block path 'head' is a Linear; it must be a non-empty nn.ModuleList or nn.Sequential"):
        find_block_stacks(model, paths=["head"])
    with pytest.raises(NoTargetModulesError, match=r"no submodule 'missing' under \(the model itself\); children there: embed, encoder, mixers, head"):
        find_block_stacks(model, paths=["missing"])
