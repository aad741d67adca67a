"""Distillation students: the BiLSTM of Tang et al. (2019) and smaller BERTs started from a teacher's layers."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from lightning_efficient import (
    BROWN_PROSE,
    BertClassifier,
    BertMLM,
    CheckpointMismatchError,
    ConfigurationError,
    DataError,
    TextClassificationDataModule,
)
from lightning_efficient.models import BiLSTMClassifier, bert_student, uniform_layer_map
from lightning_efficient.testing import quiet_trainer

VOCAB = 97  # odd sizes on purpose
TINY = {"preset": "tiny", "max_length": 40}  # hidden 32, 4 heads, FFN 37


@pytest.fixture(scope="module")
def cls_data(user_files: dict[str, str]) -> TextClassificationDataModule:
    dm = TextClassificationDataModule(
        train_files=[user_files["jsonl"]], text_column="sentence", label_column="category", label_map=BROWN_PROSE,
        group_column="source_doc", vocab_size=200, max_length=33, batch_size=8,
    )  # fmt: skip
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def teacher_checkpoint(
    cls_data: TextClassificationDataModule, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, BertClassifier]:
    """A 4-layer tiny BertClassifier trained one step on ``cls_data`` (so it carries the tokenizer), and its checkpoint."""
    teacher = BertClassifier(
        vocab_size=cls_data.vocab_size, num_labels=cls_data.num_labels, label_names=cls_data.label_names,
        num_layers=4, **TINY,
    )  # fmt: skip
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(teacher, cls_data)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.ckpt")
    trainer.save_checkpoint(path)
    return path, teacher


@pytest.fixture
def teacher() -> BertClassifier:
    torch.manual_seed(0)
    return BertClassifier(vocab_size=VOCAB, num_labels=3, num_layers=4, **TINY)


def small_bilstm(**overrides) -> BiLSTMClassifier:
    torch.manual_seed(0)
    arguments = {"vocab_size": VOCAB, "num_labels": 3, "embedding_size": 12, "hidden_size": 7, "fc_size": 9}
    return BiLSTMClassifier(**{**arguments, **overrides}).eval()


def right_padded(lengths: list[int], width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ``(len(lengths), width)`` padded on the right with id 0, and their attention mask."""
    ids = torch.randint(5, VOCAB, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


# -- BiLSTM: forward ---------------------------------------------------------------------------------
def test_bilstm_shapes_and_padding_invariance() -> None:
    model = small_bilstm()
    ids, mask = right_padded([6, 4, 1], width=6)
    with torch.no_grad():
        logits = model(ids, mask)
        assert logits.shape == (3, 3)
        longer_ids = torch.cat([ids, torch.randint(5, VOCAB, (3, 5))], dim=1)  # padding that is not even pad ids
        longer_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.long)], dim=1)
        assert torch.allclose(model(longer_ids, longer_mask), logits, atol=1e-6)
        for row, length in enumerate([6, 4, 1]):  # each text alone, unpadded
            alone = model(ids[row : row + 1, :length], mask[row : row + 1, :length])
            assert torch.allclose(alone, logits[row : row + 1], atol=1e-6)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2])}
        assert torch.equal(model.distillation_logits(batch), logits)
        assert model.importance_scores(batch).shape == (3,)
    assert torch.equal(model(ids[:1]), model(ids[:1], torch.ones_like(ids[:1])))  # no mask: every token is real


@pytest.mark.parametrize("num_layers", [1, 2])
def test_packed_lstm_equals_an_unpacked_reference(num_layers: int) -> None:
    model = small_bilstm(num_layers=num_layers)
    ids, mask = right_padded([8], width=8, seed=1)
    with torch.no_grad():
        outputs, _ = model.lstm(model.embedding(ids))  # (1, 8, 2 * 7), no packing
        forward_final, backward_final = outputs[:, -1, :7], outputs[:, 0, 7:]  # after the last / the first token
        expected = model.classifier(torch.relu(model.fc(torch.cat([forward_final, backward_final], dim=-1))))
        assert torch.allclose(model(ids, mask), expected, atol=1e-6)


def test_bilstm_refuses_left_padding() -> None:
    ids, mask = right_padded([3, 5], width=5)
    with pytest.raises(ConfigurationError, match="right-padded batches"):
        small_bilstm()(ids, mask.flip(1))


def test_default_bilstm_parameter_count() -> None:
    vocab, labels = 120, 3
    embedding, hidden, fc = 300, 150, 200
    lstm_direction = 4 * hidden * embedding + 4 * hidden * hidden + 2 * 4 * hidden  # W_ih, W_hh, b_ih, b_hh
    expected = vocab * embedding + 2 * lstm_direction + (2 * hidden * fc + fc) + (fc * labels + labels)
    model = BiLSTMClassifier(vocab_size=vocab, num_labels=labels)
    assert sum(p.numel() for p in model.parameters()) == expected == 639_203
    assert model.embedding.padding_idx == 0 and model.dropout.p == 0.1


# -- BiLSTM: embeddings from a teacher ---------------------------------------------------------------------
def test_embeddings_copied_exactly_when_the_sizes_match(teacher_checkpoint, teacher, tmp_path) -> None:
    path, trained = teacher_checkpoint
    student = BiLSTMClassifier(num_labels=2, embedding_size=32, embeddings_from=path)  # vocab_size from the teacher
    assert torch.equal(student.embedding.weight, trained.model.get_input_embeddings().weight)
    assert student.hparams.vocab_size == trained.hparams.vocab_size and student.initialised_from == path
    assert student.tokenizer.to_str() == trained.tokenizer.to_str()
    teacher.model.save_pretrained(tmp_path)  # a save_pretrained directory: no tokenizer with it
    student = BiLSTMClassifier(vocab_size=VOCAB, num_labels=2, embedding_size=32, embeddings_from=str(tmp_path))
    assert torch.equal(student.embedding.weight, teacher.model.bert.embeddings.word_embeddings.weight)
    assert student.tokenizer is None


def test_embeddings_projected_on_principal_directions_when_narrower(teacher, tmp_path) -> None:
    teacher.model.save_pretrained(tmp_path)
    size = 20
    first = BiLSTMClassifier(vocab_size=VOCAB, num_labels=2, embedding_size=size, embeddings_from=str(tmp_path))
    second = BiLSTMClassifier(vocab_size=VOCAB, num_labels=2, embedding_size=size, embeddings_from=str(tmp_path))
    assert torch.equal(first.embedding.weight, second.embedding.weight)  # deterministic
    # Reference through the covariance's eigenvectors (not an SVD): largest variance first, largest component > 0.
    weights = teacher.model.bert.embeddings.word_embeddings.weight.detach().double()
    centred = weights - weights.mean(dim=0)
    variances, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending
    top = vectors[:, variances.argsort(descending=True)[:size]]  # (32, size)
    top = top * top.gather(0, top.abs().argmax(dim=0, keepdim=True)).sign()
    assert torch.allclose(first.embedding.weight.double(), centred @ top, atol=1e-5)
    projected = first.embedding.weight.detach().double()
    covariance = projected.T @ projected
    assert torch.allclose(covariance, torch.diag(covariance.diagonal()), atol=1e-4)  # uncorrelated directions


def test_embeddings_from_refuses_other_vocabularies_and_wider_students(teacher, tmp_path) -> None:
    teacher.model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=rf"vocab_size=200 does not match .* has {VOCAB} tokens"):
        BiLSTMClassifier(vocab_size=200, num_labels=2, embedding_size=32, embeddings_from=str(tmp_path))
    with pytest.raises(ConfigurationError, match=r"embedding_size=33 is wider than the embeddings .* \(32\)"):
        BiLSTMClassifier(vocab_size=VOCAB, num_labels=2, embedding_size=33, embeddings_from=str(tmp_path))
    foreign = tmp_path / "vit.ckpt"
    torch.save({"state_dict": {}, "lightning_efficient": {"module": "ViTClassifier"}}, foreign)
    with pytest.raises(
        CheckpointMismatchError, match="written by ViTClassifier; it must be a BertClassifier or BertMLM"
    ):
        BiLSTMClassifier(num_labels=2, embeddings_from=str(foreign))
    with pytest.raises(DataError, match="does not exist"):
        BiLSTMClassifier(num_labels=2, embeddings_from=str(tmp_path / "missing.ckpt"))


# -- BiLSTM: training, checkpoints, predict --------------------------------------------------------------
def test_bilstm_trains_and_reloads_without_the_teacher(cls_data, tmp_path) -> None:
    teacher_dir = tmp_path / "teacher"
    BertClassifier(vocab_size=cls_data.vocab_size, num_labels=2, **TINY).model.save_pretrained(teacher_dir)
    model = BiLSTMClassifier(
        vocab_size=cls_data.vocab_size, num_labels=cls_data.num_labels, label_names=cls_data.label_names,
        embedding_size=24, hidden_size=11, fc_size=13, embeddings_from=str(teacher_dir), freeze_embeddings=True,
    )  # fmt: skip
    embeddings, lstm = model.embedding.weight.clone(), model.lstm.weight_hh_l0.clone()
    trainer = quiet_trainer(max_steps=2, val_check_interval=2, limit_val_batches=1)
    trainer.fit(model, cls_data)
    assert {"train/loss", "train/accuracy", "val/loss", "val/accuracy", "val/f1"} <= set(trainer.callback_metrics)
    assert torch.equal(model.embedding.weight, embeddings) and not torch.equal(model.lstm.weight_hh_l0, lstm)
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    shutil.rmtree(teacher_dir)
    reloaded = BiLSTMClassifier.load_from_checkpoint(tmp_path / "student.ckpt").eval()
    assert reloaded.hparams.embeddings_from is None and reloaded.initialised_from == str(teacher_dir)
    assert reloaded.tokenizer.to_str() == cls_data.tokenizer.to_str()
    assert not reloaded.embedding.weight.requires_grad
    batch = next(iter(cls_data.val_dataloader()))
    with torch.no_grad():
        assert torch.equal(
            reloaded(batch["input_ids"], batch["attention_mask"]),
            model.eval()(batch["input_ids"], batch["attention_mask"]),
        )
    rows = quiet_trainer(limit_predict_batches=1).predict(reloaded, cls_data)[0]
    assert rows[0]["label"] in cls_data.label_names and abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5


def swapped_tokenizer(cls_data: TextClassificationDataModule, path, first: str, second: str) -> str:
    """``cls_data``'s tokenizer with the ids of tokens ``first`` and ``second`` swapped, written to ``path``."""
    other = json.loads(cls_data.tokenizer.to_str())
    vocab = other["model"]["vocab"]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    for added in other["added_tokens"]:
        added["id"] = {vocab[second]: vocab[first], vocab[first]: vocab[second]}.get(added["id"], added["id"])
    path.write_text(json.dumps(other))
    return str(path)


def data_with_tokenizer(cls_data: TextClassificationDataModule, tokenizer: str) -> TextClassificationDataModule:
    return TextClassificationDataModule(
        train_files=cls_data.train_files, text_column="sentence", label_column="category", label_map=BROWN_PROSE,
        group_column="source_doc", tokenizer=tokenizer, max_length=33, batch_size=8,
    )  # fmt: skip


def test_padding_idx_follows_the_tokenizer(cls_data, tmp_path) -> None:
    token = cls_data.tokenizer.id_to_token(7)
    dm = data_with_tokenizer(cls_data, swapped_tokenizer(cls_data, tmp_path / "tokenizer.json", "[PAD]", token))
    model = small_bilstm(vocab_size=dm.vocab_size, num_labels=dm.num_labels).train()
    assert model.embedding.padding_idx == 0  # no tokenizer yet: ours
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(model, dm)
    assert model.embedding.padding_idx == 7
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    assert BiLSTMClassifier.load_from_checkpoint(tmp_path / "student.ckpt").embedding.padding_idx == 7


def test_bilstm_refuses_data_with_another_tokenizer_than_its_embeddings(teacher_checkpoint, cls_data, tmp_path) -> None:
    path, _ = teacher_checkpoint
    student = BiLSTMClassifier(num_labels=cls_data.num_labels, embedding_size=32, embeddings_from=path)
    first, second = cls_data.tokenizer.id_to_token(10), cls_data.tokenizer.id_to_token(11)  # two ordinary tokens
    dm = data_with_tokenizer(cls_data, swapped_tokenizer(cls_data, tmp_path / "tokenizer.json", first, second))
    assert dm.vocab_size == student.hparams.vocab_size
    with pytest.raises(ConfigurationError, match=r"tokenizer is not the one that came with .*teacher\.ckpt"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(student, dm)


BAD_BILSTM = [
    ({"vocab_size": None}, "vocab_size is required"),
    ({"vocab_size": -3}, "vocab_size=-3 must be a positive integer"),
    ({"vocab_size": 2.5}, r"vocab_size=2.5 must be an integer >= 1"),
    ({"num_labels": None}, "num_labels is required"),
    ({"label_names": ["a", "b"]}, "label_names has 2 names but num_labels=3"),
    ({"embedding_size": 0}, r"embedding_size=0 must be an integer >= 1"),
    ({"hidden_size": 2.5}, r"hidden_size=2.5 must be an integer >= 1"),
    ({"num_layers": 0}, r"num_layers=0 must be an integer >= 1"),
    ({"fc_size": -1}, r"fc_size=-1 must be an integer >= 1"),
    ({"dropout": 1.0}, r"dropout=1.0 must lie in \[0.0, 1.0\)"),
    ({"freeze_embeddings": "yes"}, "freeze_embeddings='yes' must be true or false"),
    ({"learning_rate": 0}, "learning_rate=0 must be positive"),
    ({"lr_schedule": "cubic"}, "lr_schedule='cubic' is unknown"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_BILSTM, ids=[m for _, m in BAD_BILSTM])
def test_bad_bilstm_arguments(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        small_bilstm(**overrides)


# -- BERT students -------------------------------------------------------------------------------------
def test_uniform_layer_map_takes_the_last_layer_of_each_block() -> None:
    assert uniform_layer_map(12, 6) == [1, 3, 5, 7, 9, 11]
    assert uniform_layer_map(12, 4) == [2, 5, 8, 11]
    assert uniform_layer_map(12, 5) == [1, 3, 6, 8, 11]  # not divisible: spread evenly, ending on the top layer
    assert uniform_layer_map(3, 3) == [0, 1, 2] and uniform_layer_map(4, 1) == [3]


def assert_same_tensors(ours: nn.Module, theirs: nn.Module) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(("layer_map", "expected"), [("uniform", [1, 3]), ([0, 2], [0, 2]), ([3, 3], [3, 3])])
def test_student_copies_the_mapped_layers(teacher, layer_map, expected) -> None:
    student = bert_student(teacher, num_layers=2, layer_map=layer_map)
    assert type(student) is BertClassifier and len(student.model.bert.encoder.layer) == 2
    for i, t in enumerate(expected):
        assert_same_tensors(student.model.bert.encoder.layer[i], teacher.model.bert.encoder.layer[t])
    for part in ("embeddings", "pooler"):
        assert_same_tensors(getattr(student.model.bert, part), getattr(teacher.model.bert, part))
    assert_same_tensors(student.model.classifier, teacher.model.classifier)
    assert (student.hparams.num_layers, student.hparams.hidden_size, student.hparams.ffn_size) == (2, 32, 37)
    assert student.initialised_from == f"BertClassifier, teacher layers {expected}"
    assert student.label_names == teacher.label_names and student.hparams.max_length == 40


def test_student_forward_matches_a_hand_built_reference(teacher) -> None:
    student = bert_student(teacher, num_layers=2).eval()
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=40, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    reference = BertForSequenceClassification(config).eval()
    reference.bert.embeddings.load_state_dict(teacher.model.bert.embeddings.state_dict())
    for i, t in enumerate([1, 3]):
        reference.bert.encoder.layer[i].load_state_dict(teacher.model.bert.encoder.layer[t].state_dict())
    reference.bert.pooler.load_state_dict(teacher.model.bert.pooler.state_dict())
    reference.classifier.load_state_dict(teacher.model.classifier.state_dict())
    ids, mask = right_padded([9, 5, 2], width=9)
    with torch.no_grad():
        assert torch.allclose(student(ids, mask), reference(input_ids=ids, attention_mask=mask).logits, atol=1e-6)


def test_mlm_student_keeps_the_head_and_equals_the_teacher_without_the_dropped_layers() -> None:
    torch.manual_seed(0)
    teacher = BertMLM(vocab_size=VOCAB, **TINY).eval()  # 3 layers
    student = bert_student(teacher, num_layers=1).eval()  # uniform: layer 2
    assert type(student) is BertMLM
    assert_same_tensors(student.model.cls, teacher.model.cls)
    cut = copy.deepcopy(teacher)
    cut.model.bert.encoder.layer = nn.ModuleList([cut.model.bert.encoder.layer[2]])
    ids, mask = right_padded([7, 4], width=7)
    with torch.no_grad():
        assert torch.allclose(student(ids, mask), cut(ids, mask), atol=1e-6)


def test_student_of_a_checkpoint_trains_and_reloads(teacher_checkpoint, cls_data, tmp_path) -> None:
    path, trained = teacher_checkpoint
    student = bert_student(path, num_layers=2)
    assert student.initialised_from == f"{path}, teacher layers [1, 3]"
    assert student.tokenizer.to_str() == trained.tokenizer.to_str()
    assert_same_tensors(student.model.bert.encoder.layer[1], trained.model.bert.encoder.layer[3])
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(student, cls_data)
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    reloaded = BertClassifier.load_from_checkpoint(tmp_path / "student.ckpt").eval()
    assert reloaded.hparams.num_layers == 2 and reloaded.initialised_from == student.initialised_from
    ids, mask = right_padded([9, 3], width=9)
    with torch.no_grad():
        assert torch.equal(reloaded(ids, mask), student.eval()(ids, mask))


def test_student_of_a_teacher_built_from_a_directory(teacher, tmp_path) -> None:
    teacher.model.save_pretrained(tmp_path)
    from_directory = BertClassifier(num_labels=3, pretrained=str(tmp_path))
    student = bert_student(from_directory, num_layers=2)
    assert student.built_from_config and student.hparams.model_config["num_hidden_layers"] == 2
    assert student.hparams.hidden_size is None  # the sizes are in model_config
    for i, t in enumerate([1, 3]):
        assert_same_tensors(student.model.bert.encoder.layer[i], teacher.model.bert.encoder.layer[t])
    with pytest.warns(UserWarning, match=r"width differs .*hidden_size 32 -> 16"):
        narrow = bert_student(from_directory, num_layers=1, hidden_size=16, num_heads=2)
    assert narrow.model.config.hidden_size == 16 and narrow.model.config.intermediate_size == 37


def test_narrower_student_starts_random_and_says_so(teacher) -> None:
    with pytest.warns(UserWarning, match=r"hidden_size 32 -> 16, num_heads 4 -> 2, ffn_size 37 -> 19\)"):
        student = bert_student(teacher, num_layers=2, hidden_size=16, num_heads=2, ffn_size=19)
    assert student.model.config.hidden_size == 16 and student.initialised_from is None
    assert student(*right_padded([5, 2], width=5)).shape == (2, 3)


BAD_STUDENTS = [
    ({"num_layers": 0}, "num_layers=0 must be an integer from 1 to the teacher's 4 layers"),
    ({"num_layers": 5}, "num_layers=5 must be an integer from 1 to the teacher's 4 layers"),
    ({"layer_map": [1]}, r"layer_map=\[1\] has 1 entries but num_layers=2"),
    ({"layer_map": [0, 4]}, r"layer_map=\[0, 4\] holds \[4\]; the teacher's layers are numbered 0 to 3"),
    ({"layer_map": [-1, 2]}, r"holds \[-1\]"),
    ({"layer_map": "every_other"}, "layer_map='every_other' is unknown; choose one of: 'uniform'"),
    ({"num_heads": 5}, "hidden_size=32 is not divisible by num_heads=5"),
    ({"hidden_size": 0}, "hidden_size=0 must be a positive integer"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_STUDENTS, ids=[m[:40] for _, m in BAD_STUDENTS])
def test_bad_student_arguments(teacher, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        bert_student(teacher, **{"num_layers": 2, **overrides})


def test_bad_teachers(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="the teacher is a BiLSTMClassifier; it must be a BertClassifier"):
        bert_student(small_bilstm(), num_layers=1)
    with pytest.raises(DataError, match="does not exist"):
        bert_student(str(tmp_path / "missing.ckpt"), num_layers=1)
    with pytest.raises(ConfigurationError, match="is a directory"):
        bert_student(tmp_path, num_layers=1)
    foreign = tmp_path / "vit.ckpt"
    torch.save({"state_dict": {}, "lightning_efficient": {"module": "ViTClassifier"}}, foreign)
    with pytest.raises(
        CheckpointMismatchError, match="written by ViTClassifier; it must be a BertClassifier or BertMLM"
    ):
        bert_student(foreign, num_layers=1)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(CheckpointMismatchError, match="written by something else than this package"):
        bert_student(plain, num_layers=1)
