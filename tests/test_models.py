import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_efficient import (
    BROWN_PROSE,
    BertClassifier,
    BertMLM,
    CheckpointMismatchError,
    ConfigurationError,
    ImageClassificationDataModule,
    MLMDataModule,
    TextClassificationDataModule,
    Translation,
    TranslationDataModule,
    ViTClassifier,
)
from lightning_efficient.models.bert import mask_tokens
from lightning_efficient.models.base import warmup_schedule
from lightning_efficient.testing import quiet_trainer


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.fixture(scope="module")
def mlm_data(user_files):
    dm = MLMDataModule(train_files=[user_files["txt"]], text_column="sentence", vocab_size=400, max_length=33, batch_size=8)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def cls_data(user_files):
    dm = TextClassificationDataModule(
        train_files=[user_files["jsonl"]], text_column="sentence", label_column="category", label_map=BROWN_PROSE,
        group_column="source_doc", vocab_size=400, max_length=33, batch_size=16,
    )  # fmt: skip
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def mt_data(user_files):
    dm = TranslationDataModule(
        train_files=[user_files["pairs"]], source_column="src", target_column="tgt", vocab_size=500, max_length=40, batch_size=8
    )
    dm.setup("fit")
    return dm


# -- masking --------------------------------------------------------------------------------------
def test_mask_tokens_follows_bert_recipe():
    ids = torch.randint(5, 1000, (64, 128))
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS], [SEP]
    attention = torch.ones_like(ids)
    attention[:, 100:] = 0
    masked, labels = mask_tokens(ids, attention, torch.Generator().manual_seed(0), vocab_size=1000)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 100:].any()  # never specials or padding
    assert torch.equal(labels[chosen], ids[chosen])
    assert abs(chosen[:, 1:100].float().mean().item() - 0.15) < 0.01
    as_mask = (masked == 4) & chosen
    kept = (masked == ids) & chosen
    random = chosen & ~as_mask & ~kept
    n = chosen.sum().item()
    assert abs(as_mask.sum().item() / n - 0.8) < 0.02
    assert abs(kept.sum().item() / n - 0.1) < 0.02  # (random draws can also hit the same id: ~0.01%)
    assert abs(random.sum().item() / n - 0.1) < 0.02
    assert ((masked[random] >= 5) & (masked[random] < 1000)).all()
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_mask_tokens_is_a_function_of_the_generator_state():
    ids = torch.randint(5, 50, (4, 20))
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    first = mask_tokens(ids, torch.ones_like(ids), g, 50)
    g.set_state(state)
    again = mask_tokens(ids, torch.ones_like(ids), g, 50)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_mask_tokens_picks_at_least_one():
    ids = torch.tensor([[2, 9, 3]])
    _, labels = mask_tokens(ids, torch.ones_like(ids), torch.Generator().manual_seed(0), 50, probability=1e-9)
    assert labels.tolist() == [[-100, 9, -100]]


def test_masked_only_head_equals_full_head_loss(mlm_data):
    torch.manual_seed(0)
    fast = BertMLM(vocab_size=mlm_data.vocab_size, preset="tiny", head_on_masked_only=True).eval()
    full = BertMLM(vocab_size=mlm_data.vocab_size, preset="tiny", head_on_masked_only=False).eval()
    full.load_state_dict(fast.state_dict())
    batch = next(iter(mlm_data.train_dataloader()))
    loss_fast, _, _ = fast._step(batch, torch.Generator().manual_seed(3))
    loss_full, _, _ = full._step(batch, torch.Generator().manual_seed(3))
    # Reference: cross-entropy over the full (B, T, V) logits at the masked positions, written out.
    masked, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], torch.Generator().manual_seed(3), mlm_data.vocab_size)
    logits = fast(masked, batch["attention_mask"])
    log_probs = logits.log_softmax(-1)
    keep = labels != -100
    reference = -log_probs[keep].gather(1, labels[keep][:, None]).mean()
    assert torch.allclose(loss_fast, reference, atol=1e-5) and torch.allclose(loss_full, reference, atol=1e-5)


# -- training: loss falls on the tiny preset ------------------------------------------------------
def _overfit(model: pl.LightningModule, dm: pl.LightningDataModule, steps: int = 30) -> list[float]:
    recorder = LossRecorder()
    quiet_trainer(max_steps=steps, overfit_batches=1, callbacks=[recorder], num_sanity_val_steps=0, limit_val_batches=0).fit(model, dm)
    return recorder.losses


def _falls(losses: list[float], factor: float) -> bool:
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    return last < factor * first


def test_bert_mlm_loss_falls(mlm_data):
    torch.manual_seed(0)
    losses = _overfit(BertMLM(vocab_size=mlm_data.vocab_size, preset="tiny", learning_rate=3e-3, warmup_fraction=0.0), mlm_data, steps=60)
    assert _falls(losses, 0.85), losses


def test_bert_classifier_loss_falls(cls_data):
    torch.manual_seed(0)
    model = BertClassifier(vocab_size=cls_data.vocab_size, num_labels=2, preset="tiny", learning_rate=3e-3, warmup_fraction=0.0)
    assert _falls(_overfit(model, cls_data), 0.5)


def test_translation_loss_falls(mt_data):
    torch.manual_seed(0)
    model = Translation(vocab_size=mt_data.vocab_size, preset="tiny", max_length=40, learning_rate=3e-3, warmup_fraction=0.0)
    assert _falls(_overfit(model, mt_data), 0.8)


def test_bart_translation_loss_falls(mt_data):
    torch.manual_seed(0)
    model = Translation(
        vocab_size=mt_data.vocab_size, architecture="bart", preset="tiny", max_length=40, learning_rate=3e-3, warmup_fraction=0.0
    )
    assert _falls(_overfit(model, mt_data), 0.8)


def test_vit_loss_falls():
    torch.manual_seed(0)
    dm = ImageClassificationDataModule(batch_size=32)
    losses = _overfit(ViTClassifier(num_labels=10, preset="tiny", learning_rate=3e-3, warmup_fraction=0.0), dm, steps=60)
    assert _falls(losses, 0.7), losses


# -- generation, validation metrics, predict -----------------------------------------------------
def test_translation_validation_logs_bleu_and_generates(mt_data):
    model = Translation(vocab_size=mt_data.vocab_size, preset="tiny", max_length=40, bleu_batches=1)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(model, mt_data)
    trainer.validate(model, mt_data, verbose=False)
    assert {"val/loss", "val/bleu"} <= set(trainer.callback_metrics)
    batch = next(iter(mt_data.val_dataloader()))
    greedy = model.generate(batch["input_ids"][:2], batch["attention_mask"][:2], num_beams=1)
    beam = model.generate(batch["input_ids"][:2], batch["attention_mask"][:2], num_beams=3)
    assert len(greedy) == len(beam) == 2 and all(isinstance(t, str) for t in greedy + beam)


def test_predict_outputs(mlm_data, cls_data):
    mlm = BertMLM(vocab_size=mlm_data.vocab_size, preset="tiny")
    rows = [r for batch in quiet_trainer(limit_predict_batches=1).predict(mlm, mlm_data) for r in batch]
    assert len(rows) == 8 and {"text", "masked", "prediction", "accuracy"} <= set(rows[0])
    assert "[MASK]" in rows[0]["masked"]
    classifier = BertClassifier(vocab_size=cls_data.vocab_size, num_labels=2, label_names=cls_data.label_names, preset="tiny")
    rows = [r for batch in quiet_trainer(limit_predict_batches=1).predict(classifier, cls_data) for r in batch]
    assert rows[0]["label"] in cls_data.label_names
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5


def test_mlm_predict_fills_given_masks(user_files, mlm_data, tmp_path):
    path = tmp_path / "fill.txt"
    path.write_text("the [MASK] said that the jury had no evidence .\n")
    dm = MLMDataModule(train_files=[user_files["txt"]], text_column="sentence", vocab_size=400, max_length=33, predict_files=[str(path)])
    rows = quiet_trainer().predict(BertMLM(vocab_size=dm.vocab_size, preset="tiny"), dm)[0]
    assert rows[0]["masked"].split()[1:3] == ["the", "[MASK]"] and "accuracy" not in rows[0]
    assert "[MASK]" not in rows[0]["prediction"]


# -- pretrain -> fine-tune -------------------------------------------------------------------------
def test_finetune_loads_encoder_weights(mlm_checkpoint):
    path, mlm = mlm_checkpoint
    classifier = BertClassifier(vocab_size=mlm.hparams.vocab_size, num_labels=3, preset="tiny", max_length=64, pretrained=path)
    ours, theirs = classifier.model.bert.state_dict(), mlm.model.bert.state_dict()
    assert set(theirs) <= set(ours)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    assert classifier.initialised_from == path


def test_finetune_checkpoint_reloads_without_the_pretrained_file(mlm_checkpoint, cls_data, tmp_path):
    path, mlm = mlm_checkpoint
    dm = TextClassificationDataModule(
        train_files=cls_data.train_files, text_column="sentence", label_column="category", tokenizer=path, max_length=33
    )
    classifier = BertClassifier(vocab_size=dm.vocab_size, num_labels=dm.num_labels, preset="tiny", max_length=64, pretrained=path)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(classifier, dm)
    trainer.save_checkpoint(tmp_path / "cls.ckpt")
    reloaded = BertClassifier.load_from_checkpoint(tmp_path / "cls.ckpt")
    assert reloaded.hparams.pretrained is None
    assert reloaded.tokenizer.get_vocab() == mlm.tokenizer.get_vocab()
    assert torch.equal(reloaded.model.classifier.weight, classifier.model.classifier.weight)


def test_finetune_shape_mismatch_names_fields(mlm_checkpoint):
    path, mlm = mlm_checkpoint
    with pytest.raises(CheckpointMismatchError, match=r"another shape \(num_layers: ours 2 vs checkpoint 3\)"):
        BertClassifier(vocab_size=mlm.hparams.vocab_size, num_labels=2, preset="tiny", num_layers=2, max_length=64, pretrained=path)


def test_finetune_from_non_mlm_checkpoint(tmp_path):
    vit = ViTClassifier(num_labels=10, preset="tiny")
    trainer = quiet_trainer(max_steps=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(vit, ImageClassificationDataModule(batch_size=4))
    trainer.save_checkpoint(tmp_path / "vit.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"was written by ViTClassifier; it must be a BertMLM or BertClassifier checkpoint"):
        BertClassifier(vocab_size=400, num_labels=2, preset="tiny", pretrained=str(tmp_path / "vit.ckpt"))


# -- checkpoints ----------------------------------------------------------------------------------
def test_checkpoint_carries_tokenizer_and_mask_generator(mlm_checkpoint):
    path, mlm = mlm_checkpoint
    reloaded = BertMLM.load_from_checkpoint(path)
    assert reloaded.tokenizer.to_str() == mlm.tokenizer.to_str()
    assert torch.equal(reloaded.mask_generator.get_state(), mlm.mask_generator.get_state())
    assert torch.load(path, weights_only=True)["lightning_efficient"]["module"] == "BertMLM"


def test_loading_another_model_types_checkpoint_says_so(mlm_checkpoint, mt_data):
    path, _ = mlm_checkpoint
    model = Translation(vocab_size=mt_data.vocab_size, preset="tiny", max_length=40)
    with pytest.raises(CheckpointMismatchError, match=r"written by BertMLM, not by Translation"):
        quiet_trainer().predict(model, mt_data, ckpt_path=path)


def test_save_pretrained_round_trip(tmp_path):
    from transformers import ViTForImageClassification

    model = ViTClassifier(num_labels=10, preset="tiny").eval()
    model.model.save_pretrained(tmp_path)
    loaded = ViTForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(model(x), loaded(pixel_values=x).logits, atol=1e-6)


# -- bad input ------------------------------------------------------------------------------------
def test_vocab_mismatch_fails_before_training(mlm_data):
    model = BertMLM(vocab_size=mlm_data.vocab_size + 7, preset="tiny")
    recorder = LossRecorder()
    with pytest.raises(ConfigurationError, match=rf"vocab_size={mlm_data.vocab_size + 7} does not match the data, which has vocab_size={mlm_data.vocab_size}"):
        quiet_trainer(max_steps=1, callbacks=[recorder]).fit(model, mlm_data)
    assert recorder.losses == []


def test_label_count_mismatch_fails_before_training(cls_data):
    model = BertClassifier(vocab_size=cls_data.vocab_size, num_labels=15, preset="tiny")
    with pytest.raises(ConfigurationError, match=r"num_labels=15 does not match the data, which has num_labels=2"):
        quiet_trainer(max_steps=1).fit(model, cls_data)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: BertMLM(preset="tiny"), r"vocab_size is required"),
        (lambda: BertMLM(vocab_size=100, preset="large"), r"preset='large' is unknown; choose one of: tiny, small, base"),
        (lambda: BertMLM(vocab_size=100, preset="tiny", num_heads=5), r"hidden_size=32 is not divisible by num_heads=5"),
        (lambda: BertMLM(vocab_size=100, preset="tiny", mlm_probability=1.5), r"mlm_probability=1.5 must lie in \(0, 1\)"),
        (lambda: BertMLM(vocab_size=100, preset="tiny", lr_schedule="step"), r"lr_schedule='step' is unknown; choose one of: linear, cosine, constant"),
        (lambda: BertMLM(vocab_size=100, preset="tiny", learning_rate=0), r"learning_rate=0 must be positive"),
        (lambda: BertClassifier(vocab_size=100, num_labels=2, label_names=["a"], preset="tiny"), r"label_names has 1 names but num_labels=2"),
        (lambda: Translation(vocab_size=100, architecture="t5", preset="tiny"), r"architecture='t5' is unknown; choose one of: marian, bart"),
        (lambda: Translation(vocab_size=100, preset="tiny", num_beams=0), r"num_beams=0 must be >= 1"),
        (lambda: ViTClassifier(num_labels=10, preset="tiny", patch_size=5), r"patch_size=5 must divide image_size=28"),
        (lambda: ViTClassifier(preset="tiny"), r"num_labels is required"),
    ],
)
def test_bad_model_arguments(factory, message):
    with pytest.raises(ConfigurationError, match=message):
        factory()


def test_warmup_schedule_shapes():
    assert [warmup_schedule(s, 4, 12, "linear") for s in (0, 3, 4, 8, 12)] == [0.25, 1.0, 1.0, 0.5, 0.0]
    assert warmup_schedule(8, 4, 12, "cosine") == pytest.approx(0.5)
    assert warmup_schedule(11, 0, 12, "constant") == 1.0


def test_resuming_after_a_mid_epoch_stop_warns_that_lightning_skips_the_rest(mlm_data, tmp_path):
    """Lightning finishes the epoch when max_steps stops fit mid-epoch; we say so on resume."""
    model = BertMLM(vocab_size=mlm_data.vocab_size, preset="tiny", max_length=33)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, mlm_data)
    trainer.save_checkpoint(tmp_path / "stopped.ckpt")
    resumed = quiet_trainer(max_steps=3, limit_val_batches=0, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="2 batches into epoch 0 .* the rest of epoch 0 is never trained on"):
        resumed.fit(BertMLM(vocab_size=mlm_data.vocab_size, preset="tiny", max_length=33), mlm_data, ckpt_path=tmp_path / "stopped.ckpt")
