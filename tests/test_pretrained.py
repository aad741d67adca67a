"""``pretrained=``: our checkpoints, save_pretrained directories (DistilBERT, RoBERTa, BART, ViT) and hub ids.

The last section gives the BERT modules tokenizers laid out as public checkpoints' are (a BERT
WordPiece with ``[CLS]`` at 101, a RoBERTa byte-level BPE with ``<pad>`` at 1 and ``<mask>`` last).

Every model here is tiny (hidden 32, 2 layers, a vocabulary of ~200) and written with
``save_pretrained`` into a temporary directory, with a ``tokenizer.json`` beside it when the test
needs one: nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
    ViTConfig,
    ViTForImageClassification,
)

from lightning_efficient import (
    BertClassifier,
    BertMLM,
    CheckpointMismatchError,
    ConfigurationError,
    DataError,
    MLMDataModule,
    TextClassificationDataModule,
    Translation,
    TranslationDataModule,
    ViTClassifier,
)
from lightning_efficient.blocks import find_block_stacks
from lightning_efficient.callbacks import LayerDrop, MagnitudePruning, export_pruned
from lightning_efficient.checkpoint import read_checkpoint_metadata
from lightning_efficient.data.files import read_texts
from lightning_efficient.data.tokenizers import BERT_SPECIAL_TOKENS, SpecialIds, find_special_ids, train_wordpiece
from lightning_efficient.errors import CorruptCheckpointError
from lightning_efficient.models.bert import check_pad_token, mask_tokens
from lightning_efficient.models.pretrained import tokenizer_source
from lightning_efficient.testing import quiet_trainer


@pytest.fixture(scope="module")
def tokenizer(user_files):
    """A WordPiece tokenizer of ~200 tokens on the user's sentences (our special tokens at ids 0..4)."""
    return train_wordpiece(read_texts([user_files["txt"]], "text"), vocab_size=200, show_progress=False)


def _distilbert_dir(root: Path, vocab_size: int, tokenizer=None) -> Path:
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=64, pad_token_id=0
    )
    DistilBertForMaskedLM(config).save_pretrained(root)
    if tokenizer is not None:
        tokenizer.save(str(root / "tokenizer.json"))
    return root


@pytest.fixture(scope="module")
def distilbert_dir(tmp_path_factory, tokenizer) -> Path:
    return _distilbert_dir(tmp_path_factory.mktemp("distilbert"), tokenizer.get_vocab_size(), tokenizer)


@pytest.fixture(scope="module")
def cls_data(user_files, distilbert_dir):
    dm = TextClassificationDataModule(
        train_files=[user_files["jsonl"]], text_column="sentence", label_column="category", group_column="source_doc",
        tokenizer=str(distilbert_dir / "tokenizer.json"), max_length=33, batch_size=8,
    )  # fmt: skip
    dm.setup("fit")
    return dm


# -- directories ---------------------------------------------------------------------------------
def test_classifier_from_a_distilbert_directory_takes_its_weights_and_tokenizer(distilbert_dir, tokenizer):
    model = BertClassifier(num_labels=3, pretrained=str(distilbert_dir))
    assert type(model.model).__name__ == "DistilBertForSequenceClassification"
    saved = DistilBertForMaskedLM.from_pretrained(distilbert_dir).distilbert.state_dict()
    ours = model.model.distilbert.state_dict()
    assert saved.keys() == ours.keys() and all(torch.equal(ours[k], saved[k]) for k in saved)
    assert model.model.classifier.out_features == 3
    assert model.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert model.hparams.vocab_size == tokenizer.get_vocab_size()
    assert model.initialised_from == str(distilbert_dir)


def test_distilbert_trains_with_techniques_and_reloads_without_its_directory(tmp_path, tokenizer, cls_data):
    source = _distilbert_dir(tmp_path / "distilbert", tokenizer.get_vocab_size(), tokenizer)
    model = BertClassifier(num_labels=cls_data.num_labels, label_names=cls_data.label_names, pretrained=str(source))
    assert [s.path for s in find_block_stacks(model)] == ["model.distilbert.transformer.layer"]
    drop = LayerDrop(drop_rate=0.5)
    pruning = MagnitudePruning(final_sparsity=0.5, structure="heads", frequency=1)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[drop, pruning], default_root_dir=tmp_path)
    trainer.fit(model, cls_data)
    assert 0 < drop.kept_blocks < drop.block_slots  # blocks were really skipped
    outputs = model.model.distilbert.transformer.layer[0].attention.out_lin.weight.view(32, 4, 8)
    assert int((outputs.abs().sum(dim=(0, 2)) == 0).sum()) == 2  # half of the 4 heads pruned
    export_pruned(model, shrink=False)  # masks into the weights: a plain checkpoint (masks need the callback to load)
    trainer.save_checkpoint(tmp_path / "cls.ckpt")
    shutil.rmtree(source)  # the checkpoint carries the architecture and the tokenizer

    meta = read_checkpoint_metadata(tmp_path / "cls.ckpt")
    assert meta["initialised_from"] == str(source)
    reloaded = BertClassifier.load_from_checkpoint(tmp_path / "cls.ckpt")
    assert type(reloaded.model).__name__ == "DistilBertForSequenceClassification"
    assert reloaded.hparams.pretrained is None and reloaded.initialised_from == str(source)
    assert reloaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    ids = torch.randint(5, tokenizer.get_vocab_size(), (2, 9))
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(ids), reloaded(ids), atol=1e-6)


def test_roberta_directory_as_masked_lm_runs_the_head_on_masked_positions_only(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=70, pad_token_id=0,
    )  # fmt: skip
    RobertaForMaskedLM(config).save_pretrained(tmp_path)
    fast = BertMLM(pretrained=str(tmp_path)).eval()
    full = BertMLM(pretrained=str(tmp_path), head_on_masked_only=False).eval()
    assert type(fast.model).__name__ == "RobertaForMaskedLM" and fast.tokenizer is None  # no tokenizer.json here
    ids = torch.randint(5, tokenizer.get_vocab_size(), (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    loss_fast, logits_fast, _ = fast._step(batch, torch.Generator().manual_seed(1))
    loss_full, logits_full, _ = full._step(batch, torch.Generator().manual_seed(1))
    assert torch.allclose(loss_fast, loss_full, atol=1e-5) and logits_fast.shape == logits_full.shape
    assert logits_fast.shape[0] < ids.numel()  # only the masked positions reached the head
    pruning = MagnitudePruning(final_sparsity=0.5, structure="neurons")
    pruning.attach(fast)
    pruning.prune_now(fast, 0.5)
    report = export_pruned(fast)
    assert report["neurons_removed"] == 2 * 24 and fast.model.config.intermediate_size == 24


def test_export_pruned_directory_loads_back_through_pretrained(tmp_path, distilbert_dir):
    model = BertClassifier(num_labels=2, pretrained=str(distilbert_dir)).eval()
    pruning = MagnitudePruning(final_sparsity=0.5, structure="heads_and_neurons")
    pruning.attach(model)
    pruning.prune_now(model, 0.5)
    report = export_pruned(model)
    assert report["heads_removed"] == 4 and report["neurons_removed"] == 48
    model.model.save_pretrained(tmp_path / "pruned")
    shutil.copy(distilbert_dir / "tokenizer.json", tmp_path / "pruned")
    loaded = BertClassifier(num_labels=2, pretrained=str(tmp_path / "pruned")).eval()
    block = loaded.model.distilbert.transformer.layer[1]
    assert (block.attention.n_heads, block.attention.q_lin.out_features, block.ffn.lin1.out_features) == (2, 16, 24)
    ids = torch.randint(5, model.hparams.vocab_size, (3, 10))
    with torch.no_grad():
        assert torch.allclose(model(ids), loaded(ids), atol=1e-6)
    trainer = quiet_trainer(max_steps=0)
    trainer.strategy.connect(loaded)
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")  # a checkpoint of the pruned model rebuilds its shapes
    with torch.no_grad():
        assert torch.allclose(BertClassifier.load_from_checkpoint(tmp_path / "pruned.ckpt").eval()(ids), loaded(ids))


def test_vit_pretrained_on_larger_rgb_images_takes_the_grey_28x28_images(tmp_path):
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, num_labels=5,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(tmp_path)
    model = ViTClassifier(num_labels=10, pretrained=str(tmp_path)).eval()
    images = torch.randn(2, 1, 28, 28)
    adapted = model.model_inputs(images)
    assert adapted.shape == (2, 3, 32, 32) and torch.equal(adapted[:, 0], adapted[:, 2])
    assert model(images).shape == (2, 10) and model.model.config.num_labels == 10
    assert model.count_batch({"pixel_values": images}) == (2, 2 * (16 + 1))
    assert model.data_requirements() == {"num_labels": 10, "image_size": 28}  # the data's images are unchanged


def test_translation_from_a_bart_directory(tmp_path):
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=120, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=1, decoder_start_token_id=1, forced_bos_token_id=None,
    )  # fmt: skip
    saved = BartForConditionalGeneration(config)
    saved.save_pretrained(tmp_path)
    model = Translation(pretrained=str(tmp_path), max_length=16).eval()
    source, target = torch.randint(3, 120, (2, 9)), torch.randint(3, 120, (2, 7))
    with torch.no_grad():
        expected = saved.eval()(input_ids=source, labels=target).logits
        assert torch.allclose(model(source, torch.ones_like(source), target), expected, atol=1e-6)
    assert model.hparams.vocab_size == 120


def test_translation_trains_from_a_bart_directory_with_its_tokenizer(tmp_path, user_files):
    """A BART's layout: <s> <pad> </s> <unk> at 0..3, <mask> last, ``<s> text </s>``; padded with 1."""
    pairs = [json.loads(line) for line in Path(user_files["pairs"]).read_text(encoding="utf-8").splitlines()]
    tok = _roberta_layout_tokenizer([text for pair in pairs for text in (pair["src"], pair["tgt"])])
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=tok.get_vocab_size(), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
    )  # fmt: skip
    BartForConditionalGeneration(config).save_pretrained(tmp_path / "bart")
    tok.save(str(tmp_path / "bart" / "tokenizer.json"))
    dm = TranslationDataModule(
        train_files=[user_files["pairs"]], source_column="src", target_column="tgt",
        tokenizer=str(tmp_path / "bart" / "tokenizer.json"), max_length=40, batch_size=8,
    )  # fmt: skip
    dm.setup("fit")
    assert dm.pad_id == 1
    batch = next(iter(dm.train_dataloader()))
    short = batch["attention_mask"].sum(-1).argmin()
    assert (batch["input_ids"][short][batch["attention_mask"][short] == 0] == 1).all()  # padded with <pad> 1
    assert (batch["input_ids"][:, 0] == 0).all()  # <s> text </s>
    lengths = (batch["labels"] != -100).sum(-1)
    assert lengths.min() < lengths.max()  # some targets are padded, with -100
    for row, length in zip(batch["labels"], lengths.tolist()):
        assert row[0] == 0 and row[length - 1] == 2 and (row[length:] == -100).all()
    model = Translation(pretrained=str(tmp_path / "bart"), max_length=40, bleu_batches=0)
    assert model.model.config.decoder_start_token_id == 2 and model.model.config.pad_token_id == 1
    with torch.no_grad():
        loss = model._loss(batch, 0.0)
    assert torch.isfinite(loss)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert model.tokenizer.token_to_id("<pad>") == 1
    assert isinstance(model.generate(batch["input_ids"][:2], batch["attention_mask"][:2]), list)


def test_translation_refuses_a_tokenizer_whose_pad_is_not_the_models(tmp_path, user_files):
    pairs = [json.loads(line) for line in Path(user_files["pairs"]).read_text(encoding="utf-8").splitlines()]
    tok = _roberta_layout_tokenizer([text for pair in pairs for text in (pair["src"], pair["tgt"])])
    tok.save(str(tmp_path / "tokenizer.json"))
    dm = TranslationDataModule(
        train_files=[user_files["pairs"]], source_column="src", target_column="tgt",
        tokenizer=str(tmp_path / "tokenizer.json"), max_length=40, batch_size=8,
    )  # fmt: skip
    model = Translation(vocab_size=dm.vocab_size, preset="tiny", max_length=40)  # ours: <pad> 0, </s> 1
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    with pytest.raises(ConfigurationError, match=r"'<pad>' at id 1 but the model's config has pad_token_id=0"):
        trainer.fit(model, dm)
    tok.post_processor = processors.TemplateProcessing(single="$A")  # no </s> at the end
    tok.save(str(tmp_path / "unframed.json"))
    unframed = TranslationDataModule(train_files=[user_files["pairs"]], tokenizer=str(tmp_path / "unframed.json"))
    with pytest.raises(ConfigurationError, match=r"encodes an empty text as \[\], which does not end with '</s>'"):
        _ = unframed.tokenizer


# -- our checkpoints -----------------------------------------------------------------------------
def test_masked_lm_continues_from_our_checkpoint(mlm_checkpoint):
    path, mlm = mlm_checkpoint
    model = BertMLM(vocab_size=mlm.hparams.vocab_size, pretrained=path, preset="tiny", max_length=64)
    theirs = mlm.model.state_dict()
    assert all(torch.equal(model.model.state_dict()[k], v) for k, v in theirs.items())
    assert model.initialised_from == path and model.tokenizer.to_str() == mlm.tokenizer.to_str()
    with pytest.raises(CheckpointMismatchError, match=r"another shape \(hidden_size: ours 64 vs checkpoint 32\)"):
        BertMLM(pretrained=path, preset="tiny", hidden_size=64, max_length=64)


def test_pretrained_checkpoint_is_a_deprecated_alias(mlm_checkpoint):
    path, mlm = mlm_checkpoint
    with pytest.warns(DeprecationWarning, match=r"pretrained_checkpoint=\.\.\.\) is deprecated; use pretrained="):
        model = BertClassifier(num_labels=2, pretrained_checkpoint=path, preset="tiny", max_length=64)
    assert torch.equal(
        model.model.bert.embeddings.word_embeddings.weight, mlm.model.bert.embeddings.word_embeddings.weight
    )
    with pytest.raises(ConfigurationError, match=r"give pretrained only"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        BertClassifier(num_labels=2, pretrained="other.ckpt", pretrained_checkpoint=path, preset="tiny")


# -- what fails, and how -------------------------------------------------------------------------
def test_data_vocabulary_must_match_the_weights(tmp_path):
    _distilbert_dir(tmp_path, vocab_size=150)  # weights alone, no tokenizer.json
    with pytest.raises(
        ConfigurationError, match=r"vocab_size=300 \(the data's tokenizer\) does not match .* has 150 tokens"
    ):
        BertMLM(vocab_size=300, pretrained=str(tmp_path))
    with pytest.raises(ConfigurationError, match=r"num_layers=4 cannot be combined with pretrained=.*leave the size"):
        BertMLM(pretrained=str(tmp_path), num_layers=4)


def test_hub_id_without_network_fails_in_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without network
    with pytest.raises(DataError, match=r"could not be found locally .* and there is no network") as caught:
        BertMLM(pretrained="lightning-efficient-tests/no-such-model")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no chained hub tracebacks


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda root: str(root / "runs" / "last.ckpt"), DataError, r"last.ckpt' does not exist"),
        (lambda root: str(root), DataError, r"is a directory without config.json"),
        (lambda root: _quantized_dir(root), ConfigurationError, r"int8 model written by save_quantized"),
        (lambda root: _marian_dir(root), ConfigurationError, r"needs the optional package sentencepiece"),
        (lambda root: _truncated_ckpt(root), CorruptCheckpointError, r"half.ckpt' is truncated or not a checkpoint"),
    ],
)
def test_unusable_sources_say_why(tmp_path, make, error, message):
    if "sentencepiece" in message and importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed: the tokenizer would load")
    with pytest.raises(error, match=message):
        Translation(pretrained=make(tmp_path))


def _quantized_dir(root: Path) -> str:
    _distilbert_dir(root, vocab_size=50)
    (root / "quantization.json").write_text(json.dumps({"architecture": "DistilBertForMaskedLM"}))
    return str(root)


def _truncated_ckpt(root: Path) -> str:
    model = Translation(vocab_size=50, preset="tiny")
    path = root / "half.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy cut short
    return str(path)


def _marian_dir(root: Path) -> str:
    from transformers import MarianConfig, MarianMTModel

    config = MarianConfig(
        vocab_size=60, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=20, decoder_ffn_dim=20, pad_token_id=0, decoder_start_token_id=0,
    )  # fmt: skip
    MarianMTModel(config).save_pretrained(root)
    (root / "source.spm").write_bytes(b"")  # Marian's sentencepiece model files
    return str(root)


def test_cli_tokenizer_source(tmp_path, distilbert_dir):
    assert tokenizer_source(str(distilbert_dir)) == str(distilbert_dir / "tokenizer.json")
    _distilbert_dir(tmp_path, vocab_size=50)
    assert tokenizer_source(str(tmp_path)) is None  # weights alone: the data module's tokenizer is checked
    assert tokenizer_source("some-org/some-model") is None and tokenizer_source(None) is None


def test_cli_gives_the_data_module_the_directory_tokenizer(
    user_files, distilbert_dir, tokenizer, tmp_path, monkeypatch
):
    from lightning_efficient.cli import EfficientCLI

    monkeypatch.chdir(tmp_path)
    cli = EfficientCLI(
        args=[
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
            "--model", "lightning_efficient.BertClassifier", "--model.init_args.pretrained", str(distilbert_dir),
            "--data", "lightning_efficient.TextClassificationDataModule",
            "--data.init_args.train_files", f"[{user_files['jsonl']}]", "--data.init_args.text_column", "sentence",
            "--data.init_args.label_column", "category",
        ],
        run=False,
    )  # fmt: skip
    assert cli.datamodule.tokenizer_source == str(distilbert_dir / "tokenizer.json")
    assert cli.datamodule.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert type(cli.model.model).__name__ == "DistilBertForSequenceClassification"
    assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size and cli.model.hparams.num_labels == 3


# -- tokenizers laid out as public checkpoints' ----------------------------------------------------
def _bert_layout_tokenizer(trained: Tokenizer) -> Tokenizer:
    """``trained``'s words in bert-base-uncased's layout: [PAD] 0, [unused*] 1..99, [UNK] [CLS] [SEP] [MASK] 100..103."""
    words = sorted((i, t) for t, i in trained.get_vocab().items() if t not in BERT_SPECIAL_TOKENS)
    vocab = {"[PAD]": 0, **{f"[unused{i - 1}]": i for i in range(1, 100)}}
    vocab.update({"[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103})
    vocab.update({token: 104 + n for n, (_, token) in enumerate(words)})
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(list(BERT_SPECIAL_TOKENS))
    tok.post_processor = processors.BertProcessing(("[SEP]", 102), ("[CLS]", 101))
    return tok


def _roberta_layout_tokenizer(texts: list[str]) -> Tokenizer:
    """A byte-level BPE as RoBERTa's: <s> <pad> </s> <unk> at 0..3, <mask> last, ``<s> text </s>``."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tok


@pytest.fixture(scope="module", params=["bert", "roberta"])
def public_layout(request, tmp_path_factory, tokenizer, user_files) -> tuple[str, Path, SpecialIds]:
    """``(layout, directory, expected ids)``: a tiny masked LM saved with a tokenizer.json in that layout."""
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
    if request.param == "bert":
        tok = _bert_layout_tokenizer(tokenizer)
        BertForMaskedLM(
            BertConfig(vocab_size=tok.get_vocab_size(), max_position_embeddings=64, **shape)
        ).save_pretrained(root)
        expected = SpecialIds(pad_id=0, cls_id=101, sep_id=102, mask_id=103, ids=frozenset({0, 100, 101, 102, 103}))
    else:
        tok = _roberta_layout_tokenizer(read_texts([user_files["txt"]], "text"))
        mask_id = tok.get_vocab_size() - 1
        config = RobertaConfig(
            vocab_size=tok.get_vocab_size(), max_position_embeddings=64 + 2, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, **shape,
        )  # fmt: skip
        RobertaForMaskedLM(config).save_pretrained(root)
        expected = SpecialIds(1, 0, 2, mask_id, frozenset({0, 1, 2, 3, mask_id}))
    tok.save(str(root / "tokenizer.json"))
    return request.param, root, expected


def test_public_layout_special_ids_are_found_by_name(public_layout, user_files):
    layout, root, expected = public_layout
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    assert find_special_ids(tok, "x", need_mask=True) == expected
    assert (layout == "bert") == (tok.token_to_id("[CLS]") == 101)  # the layouts really are the public ones
    dm = MLMDataModule(
        train_files=[user_files["txt"]], tokenizer=str(root / "tokenizer.json"), max_length=17, batch_size=4
    )
    dm.setup("fit")
    assert dm.special_ids == expected and dm.vocab_size == tok.get_vocab_size()
    block = dm.splits["train"][0]
    assert (block[0], block[-1]) == (expected.cls_id, expected.sep_id) and len(block) == 17
    assert not set(block[1:-1]) & expected.ids


def test_masked_lm_trains_from_a_public_layout_directory_and_masks_with_its_ids(public_layout, user_files, tmp_path):
    layout, root, expected = public_layout
    dm = MLMDataModule(
        train_files=[user_files["txt"]], tokenizer=str(root / "tokenizer.json"), max_length=17, batch_size=4
    )
    model = BertMLM(pretrained=str(root))
    quiet_trainer(max_steps=2, limit_val_batches=1, default_root_dir=tmp_path).fit(model, dm)
    assert model.special_ids == expected
    batch = next(iter(dm.train_dataloader()))
    masked, labels = model.mask(batch["input_ids"], batch["attention_mask"], torch.Generator().manual_seed(0))
    chosen = labels != -100
    specials = torch.tensor(sorted(expected.ids))
    assert chosen.any() and not chosen[torch.isin(batch["input_ids"], specials)].any()  # specials never masked
    assert (masked[chosen] == expected.mask_id).float().mean() > 0.5  # ~80% of the chosen: the tokenizer's mask id
    assert torch.equal(masked[~chosen], batch["input_ids"][~chosen])
    if layout == "bert":
        assert not (masked == 4).any()  # our [MASK] id is bert-base's [unused3]


def test_masking_with_special_ids_anywhere_never_picks_or_draws_them():
    ids = torch.arange(200).repeat(10, 1)  # every id of the vocabulary, specials included
    specials = {0, 100, 101, 102, 103}
    generator = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(
        ids, torch.ones_like(ids), generator, 200, 0.9, mask_token_id=103, special_ids=specials
    )
    chosen = labels != -100
    assert not chosen[:, sorted(specials)].any() and chosen.float().mean() > 0.8
    replaced = chosen & (masked != ids) & (masked != 103)
    assert replaced.sum() > 50 and not torch.isin(masked[replaced], torch.tensor(sorted(specials))).any()


def _masks_before(input_ids, attention_mask, generator, vocab_size, probability=0.15):
    """The masking of 0.2.0 (special tokens: ids 0..4), to compare the new one with."""
    shape = input_ids.shape
    candidates = (attention_mask == 1) & (input_ids >= 5)
    chosen = (torch.rand(shape, generator=generator) < probability) & candidates
    if not chosen.any() and candidates.any():
        chosen.view(-1)[candidates.view(-1).nonzero()[0]] = True
    action = torch.rand(shape, generator=generator)
    random_tokens = torch.randint(5, vocab_size, shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (action < 0.8)] = 4
    replace = chosen & (action >= 0.8) & (action < 0.9)
    masked[replace] = random_tokens[replace]
    return masked, input_ids.masked_fill(~chosen, -100)


def test_our_tokenizers_give_the_same_masks_as_before(mlm_data):
    model = BertMLM(vocab_size=mlm_data.vocab_size, preset="tiny", num_layers=1, max_length=32, mlm_probability=0.5)
    model.tokenizer = mlm_data.tokenizer
    batch = next(iter(mlm_data.train_dataloader()))
    for seed in range(3):
        new = model.mask(batch["input_ids"], batch["attention_mask"], torch.Generator().manual_seed(seed))
        old = _masks_before(
            batch["input_ids"], batch["attention_mask"], torch.Generator().manual_seed(seed), mlm_data.vocab_size, 0.5
        )
        assert all(torch.equal(a, b) for a, b in zip(new, old))


def test_classifier_pads_with_the_tokenizers_pad_id_and_a_padded_batch_gives_the_unpadded_outputs(
    public_layout, user_files, tmp_path
):
    layout, root, expected = public_layout
    dm = TextClassificationDataModule(
        train_files=[user_files["jsonl"]], text_column="sentence", label_column="category", group_column="source_doc",
        tokenizer=str(root / "tokenizer.json"), max_length=40, batch_size=8,
    )  # fmt: skip
    model = BertClassifier(num_labels=3, pretrained=str(root))
    quiet_trainer(max_steps=2, limit_val_batches=1, default_root_dir=tmp_path).fit(model, dm)
    examples = sorted(dm.splits["val"], key=lambda e: len(e[0]))
    short, long = examples[0][0], examples[-1][0]
    batch = dm._collate([examples[-1], examples[0]])
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["input_ids"][pad] == expected.pad_id).all()  # RoBERTa: <pad> 1, not 0 (<s>)
    assert (short[0], short[-1]) == (expected.cls_id, expected.sep_id) and len(long) > len(short)
    if layout == "roberta":  # position ids come from input_ids != padding_idx
        positions = model.model.roberta.embeddings.create_position_ids_from_input_ids(batch["input_ids"], 1)
        assert torch.equal(positions[1, : len(short)], torch.arange(len(short)) + 2) and (positions[pad] == 1).all()
    model.eval()
    with torch.no_grad():
        padded = model(batch["input_ids"], batch["attention_mask"])
        alone = model(torch.tensor([short]), torch.ones(1, len(short), dtype=torch.long))
    assert torch.allclose(padded[1], alone[0], atol=1e-5)


def test_a_tokenizer_that_is_not_the_models_is_refused(public_layout, tokenizer, user_files, tmp_path):
    layout, root, _ = public_layout
    model = BertClassifier(num_labels=3, pretrained=str(root))
    ours = find_special_ids(tokenizer, "ours")
    if layout == "roberta":  # pads with 0, RoBERTa's <s>
        with pytest.raises(ConfigurationError, match=r"pads with id 0 but the model's config has pad_token_id=1"):
            check_pad_token(model.model, ours)
    unframed = Tokenizer.from_file(str(root / "tokenizer.json"))
    unframed.post_processor = None
    unframed.save(str(tmp_path / "unframed.json"))
    dm = MLMDataModule(train_files=[user_files["txt"]], tokenizer=str(tmp_path / "unframed.json"))
    with pytest.raises(ConfigurationError, match=r"encodes an empty text as \[\], not .*post-processor"):
        dm.setup("fit")
