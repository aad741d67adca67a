"""Distillation: loss formulas against written-out references, the frozen teacher, the cache, resume, bad input."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_efficient import (
    BertClassifier,
    BertMLM,
    CheckpointMismatchError,
    ConfigurationError,
    CorruptCheckpointError,
    DataError,
    Distillation,
    MLMDataModule,
    TextClassificationDataModule,
    Translation,
    TranslationDataModule,
)
from lightning_efficient.callbacks.distillation import TeacherOutputCache, distillation_losses, soft_losses
from lightning_efficient.losses import MISSING_LABEL, SOFT_TARGETS_KEY, SoftTargets, classification_loss
from lightning_efficient.testing import quiet_trainer


# -- formulas ----------------------------------------------------------------------------------
def test_mse_is_the_mean_squared_logit_difference() -> None:
    student = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.5], [3.0, -1.0, 2.0]])
    expected = [(1.0 + 9.0 + 0.0) / 3, (9.0 + 1.0 + 4.0) / 3]
    assert soft_losses(student, teacher, "mse").tolist() == pytest.approx(expected)


def test_kl_is_scaled_by_the_temperature_squared() -> None:
    student, teacher, t = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[0.0, 1.0, 0.5]]), 3.0

    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(v / t) for v in z]
        return [v / sum(e) for v in e]

    p, q = softmax([0.0, 1.0, 0.5]), softmax([1.0, -2.0, 0.5])
    expected = t * t * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert float(soft_losses(student, teacher, "kl", temperature=t)) == pytest.approx(expected, rel=1e-6)


def test_alpha_mixes_the_hard_term_and_missing_labels_follow_the_rule() -> None:
    student = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [4.0, 0.0]])  # the teacher's argmax is class 0 for both rows
    labels = torch.tensor([1, MISSING_LABEL])
    soft = [((2 - 1) ** 2 + 0) / 2, (16 + 1) / 2]
    ce = [math.log(1 + math.exp(2.0)), math.log(1 + math.exp(1.0))]  # row 0 vs gold 1, row 1 vs the teacher's 0
    mixed = distillation_losses(student, teacher, labels, "mse", alpha=0.25, missing_labels="teacher")
    assert mixed.tolist() == pytest.approx([0.25 * ce[i] + 0.75 * soft[i] for i in range(2)])
    dropped = distillation_losses(student, teacher, labels, "mse", alpha=0.25, missing_labels="drop")
    assert dropped.tolist() == pytest.approx([0.25 * ce[0] + 0.75 * soft[0], 0.75 * soft[1]])
    assert distillation_losses(student, teacher, labels, "mse", alpha=0.0).tolist() == pytest.approx(soft)


def test_classification_loss_takes_the_soft_targets_out_of_the_batch() -> None:
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3)
    batch: dict[str, Any] = {SOFT_TARGETS_KEY: SoftTargets(teacher, lambda s, t, y: soft_losses(s, t, "mse"))}
    loss = classification_loss(student, torch.tensor([0, 1, 2, MISSING_LABEL]), batch)
    assert SOFT_TARGETS_KEY not in batch
    assert float(loss.detach()) == pytest.approx(float(F.mse_loss(student, teacher)))
    loss.backward()
    assert student.grad is not None and teacher.grad is None


# -- masked LM: only the predicted positions ---------------------------------------------------
class Capture(Callback):
    """Keeps, at each training batch start (after Distillation's), the batch's soft targets and masks."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.seen.append(
            {
                "teacher": batch[SOFT_TARGETS_KEY].logits.clone(),
                "masked": batch["mlm_input_ids"].clone(),
                "labels": batch["mlm_labels"].clone(),
                "attention_mask": batch["attention_mask"].clone(),
                "student_state": {k: v.clone() for k, v in pl_module.state_dict().items()},
            }
        )


def test_mlm_distils_only_at_the_masked_positions(mlm_data: MLMDataModule, mlm_checkpoint: tuple[str, BertMLM]) -> None:
    path, _ = mlm_checkpoint
    torch.manual_seed(0)
    student = BertMLM(vocab_size=mlm_data.vocab_size, preset="tiny", max_length=64, num_layers=1, dropout=0.0)
    capture = Capture()
    distillation = Distillation(teacher=path, loss="kl", temperature=2.0)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[distillation, capture])
    losses: list[float] = []

    class Loss(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
            losses.append(float(outputs["loss"]))

    trainer.callbacks.append(Loss())
    trainer.fit(student, mlm_data)
    seen = capture.seen[0]
    predicted = seen["labels"] != -100
    teacher = BertMLM.load_from_checkpoint(path).eval()
    with torch.no_grad():
        full = teacher(seen["masked"], seen["attention_mask"])  # (B, T, V) at every position
    assert seen["teacher"].shape == (int(predicted.sum()), mlm_data.vocab_size)
    torch.testing.assert_close(seen["teacher"], full[predicted], rtol=1e-4, atol=1e-4)
    # The loss: the token mean of T^2 KL at the masked positions, from the student's weights at that step.
    reference = BertMLM(vocab_size=mlm_data.vocab_size, preset="tiny", max_length=64, num_layers=1, dropout=0.0)
    reference.load_state_dict(seen["student_state"])
    with torch.no_grad():
        student_logits = reference(seen["masked"], seen["attention_mask"])[predicted]
    p = F.softmax(full[predicted] / 2.0, -1)
    expected = 4.0 * (p * (p.log() - F.log_softmax(student_logits / 2.0, -1))).sum(-1).mean()
    assert losses[0] == pytest.approx(float(expected), rel=1e-4)


# -- classification: frozen teacher, checkpoint, cache, self ----------------------------------
@pytest.fixture(scope="module")
def prose(user_files: dict[str, str]) -> TextClassificationDataModule:
    """The user's 600 Brown sentences as a 3-genre task (vocab 300, 24 tokens, batch 8), set up for fit."""
    dm = TextClassificationDataModule(
        train_files=[user_files["jsonl"]], text_column="sentence", label_column="category",
        group_column="source_doc", vocab_size=300, max_length=24, batch_size=8,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def classifier(dm: TextClassificationDataModule, seed: int = 0, **size: Any) -> BertClassifier:
    torch.manual_seed(seed)
    size = {"preset": "tiny", "max_length": 24, **size}
    return BertClassifier(vocab_size=dm.vocab_size, num_labels=dm.num_labels, label_names=dm.label_names, **size)


@pytest.fixture(scope="module")
def teacher_checkpoint(prose: TextClassificationDataModule, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny BertClassifier trained 3 steps on ``prose``, saved as one of our checkpoints."""
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(classifier(prose, seed=1), prose)
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


class CountCalls:
    """Wraps a teacher's ``distillation_logits`` and counts the rows it computes."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        self.rows = 0
        self.forward = teacher.distillation_logits
        teacher.distillation_logits = self

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        self.rows += batch["input_ids"].shape[0]
        return self.forward(batch)


def test_teacher_is_frozen_outside_the_checkpoint_and_cached(
    prose: TextClassificationDataModule, teacher_checkpoint: str, tmp_path: Path
) -> None:
    student = classifier(prose, num_layers=1)
    distillation = Distillation(teacher=teacher_checkpoint)

    class Spy(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0 and trainer.current_epoch == 0:
                self.counter = CountCalls(distillation.teacher)

    spy = Spy()
    trainer = quiet_trainer(
        max_epochs=2, limit_train_batches=5, limit_val_batches=0, default_root_dir=tmp_path,
        enable_checkpointing=True, callbacks=[distillation, spy, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )  # fmt: skip
    trainer.fit(student, prose)
    teacher = distillation.teacher
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters()) and not teacher.training
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in student.parameters()}
    assert not any(id(p) in optimized for p in teacher.parameters())
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == set(student.state_dict())
    assert checkpoint["callbacks"][distillation.state_key]["fingerprint"] == distillation.teacher_fingerprint
    # The cache (on by default for a classifier): 2 epochs of 5 batches of 8 looked up; the teacher ran on the
    # misses only (the spy counts from the second batch on: the first batch's 8 were misses before it).
    cache = distillation.cache
    assert isinstance(cache, TeacherOutputCache) and cache.hits + cache.misses == 80
    assert cache.misses == spy.counter.rows + 8 and 0 < len(cache.entries) <= cache.misses


def test_cache_serves_a_fixed_set_without_the_teacher(
    prose: TextClassificationDataModule, teacher_checkpoint: str
) -> None:
    """One batch repeated: the teacher runs on it once; later lookups are hits with the same logits."""
    batch = next(iter(prose.train_dataloader()))
    student = classifier(prose, num_layers=1)
    distillation = Distillation(teacher=teacher_checkpoint, cache="memory")
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    distillation.setup(trainer, student, "fit")
    counter = CountCalls(distillation.teacher)
    first = distillation.teacher_logits(trainer, dict(batch))
    reordered = {k: v.flip(0) for k, v in batch.items()}
    second = distillation.teacher_logits(trainer, reordered)
    assert counter.rows == 8 and distillation.cache.hits == 8 and distillation.cache.misses == 8
    torch.testing.assert_close(second, first.flip(0), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(first, distillation.teacher(batch["input_ids"], batch["attention_mask"]))


def test_disk_cache_is_read_by_a_later_run(
    prose: TextClassificationDataModule, teacher_checkpoint: str, tmp_path: Path
) -> None:
    batch = next(iter(prose.train_dataloader()))
    trainer = quiet_trainer(max_steps=1)
    first = Distillation(teacher=teacher_checkpoint, cache="disk", cache_dir=str(tmp_path))
    first.setup(trainer, classifier(prose, num_layers=1), "fit")
    logits = first.teacher_logits(trainer, dict(batch))
    first.cache.save()
    assert len(list(tmp_path.glob("*.pt"))) == 1
    later = Distillation(teacher=teacher_checkpoint, cache="disk", cache_dir=str(tmp_path))
    later.setup(trainer, classifier(prose, num_layers=1), "fit")
    counter = CountCalls(later.teacher)
    torch.testing.assert_close(later.teacher_logits(trainer, dict(batch)), logits, rtol=0, atol=0)
    assert counter.rows == 0 and later.cache.hits == 8


def test_self_teacher_is_a_frozen_copy_that_leaves_the_student_training(prose: TextClassificationDataModule) -> None:
    student = classifier(prose, dropout=0.3)
    distillation = Distillation(teacher="self", loss="kl", temperature=2.0)
    modes: list[tuple[bool, bool]] = []

    class Modes(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            modes.append((pl_module.training, all(m.training for m in pl_module.modules())))

    start = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[distillation, Modes()])
    trainer.fit(student, prose)
    assert modes == [(True, True)] * 3  # dropout stays on in the student
    teacher = distillation.teacher
    assert teacher is not student and not teacher.training
    assert all(torch.equal(v, start[k]) for k, v in teacher.state_dict().items())  # the student at the start
    assert any(not torch.equal(v, start[k]) for k, v in student.state_dict().items())  # which trained on


class Stop(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_resume_is_exact_and_refuses_another_teacher(
    prose: TextClassificationDataModule, teacher_checkpoint: str, tmp_path: Path
) -> None:
    def run(steps: int, stop: int | None = None, ckpt: str | None = None, teacher: str = teacher_checkpoint) -> Any:
        pl.seed_everything(3)
        student = classifier(prose, num_layers=1, dropout=0.2)
        callbacks = [Distillation(teacher=teacher, alpha=0.3), ModelCheckpoint(dirpath=tmp_path, save_last=True)]
        callbacks += [Stop(stop)] if stop else []
        trainer = quiet_trainer(
            max_steps=steps,
            limit_val_batches=0,
            callbacks=callbacks,
            default_root_dir=tmp_path,
            enable_checkpointing=True,
        )
        trainer.fit(student, prose, ckpt_path=ckpt)
        return student

    whole = run(6)
    run(6, stop=3)
    resumed = run(6, ckpt=str(tmp_path / "last.ckpt"))
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    run(6, stop=3)
    with pytest.raises(CheckpointMismatchError, match="not the one this run started with"):
        run(6, ckpt=str(tmp_path / "last.ckpt"), teacher="self")


# -- translation: word-level ------------------------------------------------------------------
def translation(files: dict[str, str], max_length: int) -> tuple[Translation, TranslationDataModule]:
    """A tiny 1-layer Translation student and the user's pairs (vocabulary 300, batch 4)."""
    dm = TranslationDataModule(
        train_files=[files["pairs"]], source_column="src", target_column="tgt", vocab_size=300,
        max_length=max_length, batch_size=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Translation(vocab_size=dm.vocab_size, preset="tiny", max_length=max_length, num_layers=1, bleu_batches=0)
    return model, dm


def test_translation_distils_every_target_token(user_files: dict[str, str]) -> None:
    student, dm = translation(user_files, max_length=24)
    capture: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Seen(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            capture.append((batch[SOFT_TARGETS_KEY].logits, batch["labels"]))

    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[Distillation(teacher="self"), Seen()])
    trainer.fit(student, dm)
    logits, labels = capture[0]
    assert logits.shape == (int((labels != -100).sum()), dm.vocab_size)


# -- bad input: each a clear error before the first step -------------------------------------
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"temperature": 0.0}, "temperature=0.0 must be > 0"),
        ({"loss": "kl", "temperature": -1.0}, "temperature=-1.0"),
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"alpha": -0.1}, "alpha=-0.1"),
        ({"loss": "cosine"}, "loss='cosine' is unknown"),
        ({"temperature": 2.0}, "no effect with loss='mse'"),
        ({"missing_labels": "zero"}, "missing_labels='zero'"),
        ({"cache": "gpu"}, "cache='gpu'"),
        ({"teacher": ""}, "teacher=''"),
    ],
)
def test_bad_arguments_are_refused(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Distillation(**{"teacher": "self", **arguments})


def fit_refused(student: pl.LightningModule, dm: Any, distillation: Distillation) -> None:
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[distillation])
    try:
        trainer.fit(student, dm)
    finally:
        assert trainer.global_step == 0 and all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_missing_and_broken_teacher_files(prose: TextClassificationDataModule, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"teacher='runs/nowhere/last.ckpt' does not exist"):
        fit_refused(classifier(prose), prose, Distillation(teacher="runs/nowhere/last.ckpt"))
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CorruptCheckpointError, match="broken.ckpt"):
        fit_refused(classifier(prose), prose, Distillation(teacher=str(broken)))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointMismatchError, match="none of our modules wrote"):
        fit_refused(classifier(prose), prose, Distillation(teacher=str(foreign)))


def test_teacher_and_student_must_predict_the_same_classes_from_the_same_ids(
    prose: TextClassificationDataModule, teacher_checkpoint: str, mlm_checkpoint: tuple[str, BertMLM]
) -> None:
    other_labels = BertClassifier(vocab_size=prose.vocab_size, num_labels=2, preset="tiny", max_length=24)
    with pytest.raises(CheckpointMismatchError, match="different label sets"):
        fit_refused(classifier(prose), prose, Distillation(teacher=other_labels))
    other_vocab = BertClassifier(vocab_size=prose.vocab_size + 1, num_labels=prose.num_labels,
                                 label_names=prose.label_names, preset="tiny", max_length=24)  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match="different vocabularies"):
        fit_refused(classifier(prose), prose, Distillation(teacher=other_vocab))
    same_size = classifier(prose)
    same_size.tokenizer = BertMLM.load_from_checkpoint(mlm_checkpoint[0]).tokenizer  # another vocabulary
    if same_size.tokenizer.get_vocab_size() == prose.vocab_size:
        with pytest.raises(CheckpointMismatchError, match="tokenize differently"):
            fit_refused(classifier(prose), prose, Distillation(teacher=same_size))


def test_student_without_the_protocol_is_refused_before_training(prose: TextClassificationDataModule) -> None:
    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer(torch.ones(1, 2)).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ConfigurationError, match="Plain does not follow the loss protocol"):
        fit_refused(Plain(), prose, Distillation(teacher="self"))


def test_a_student_that_ignores_the_soft_targets_fails_after_its_first_step(
    prose: TextClassificationDataModule,
) -> None:
    class Ignores(BertClassifier):
        def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    student = Ignores(vocab_size=prose.vocab_size, num_labels=prose.num_labels, label_names=prose.label_names,
                      preset="tiny", max_length=24)  # fmt: skip
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[Distillation(teacher="self")])
    with pytest.raises(ConfigurationError, match="did not use the teacher's soft targets"):
        trainer.fit(student, prose)
    assert trainer.global_step == 1


def test_cache_of_token_predictions_is_refused(mlm_data: MLMDataModule) -> None:
    student = BertMLM(vocab_size=mlm_data.vocab_size, preset="tiny", max_length=64)
    with pytest.raises(ConfigurationError, match="cache='memory'.*use cache='none'"):
        fit_refused(student, mlm_data, Distillation(teacher="self", cache="memory"))


def test_directory_teacher_with_other_labels_is_refused(prose: TextClassificationDataModule, tmp_path: Path) -> None:
    names = list(reversed(prose.label_names))
    other = BertClassifier(vocab_size=prose.vocab_size, num_labels=prose.num_labels, label_names=names,
                           preset="tiny", max_length=24)  # fmt: skip
    other.model.save_pretrained(tmp_path / "teacher")
    with pytest.raises(CheckpointMismatchError, match="trained on the labels"):
        fit_refused(classifier(prose), prose, Distillation(teacher=str(tmp_path / "teacher")))
    same = classifier(prose, seed=4)
    same.model.save_pretrained(tmp_path / "same")
    distillation = Distillation(teacher=str(tmp_path / "same"))
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[distillation])
    trainer.fit(classifier(prose), prose)
    assert all(torch.equal(a, b) for a, b in zip(distillation.teacher.model.state_dict().values(),
                                                 same.model.state_dict().values()))  # fmt: skip


def test_sequence_level_trains_on_the_teacher_translations(user_files: dict[str, str], tmp_path: Path) -> None:
    student, dm = translation(user_files, max_length=32)  # 34 training pairs fit 32 tokens
    batches: list[dict[str, Any]] = []

    class Seen(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            batches.append(dict(batch))

    distillation = Distillation(teacher="self", sequence_level=True, num_beams=2, alpha=1.0, cache_dir=str(tmp_path))
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[distillation, Seen()])
    trainer.fit(student, dm)
    references = [target for _, target, *_ in dm.reference_train_split]
    translations = [target for _, target, *_ in dm.splits["train"]]
    assert len(translations) == len(references) and translations != references
    assert all(SOFT_TARGETS_KEY not in batch for batch in batches)  # alpha 1: the teacher does not run per step
    assert len(list(tmp_path.glob("*.json"))) == 1
    with pytest.raises(ConfigurationError, match="num_beams=0"):
        Distillation(teacher="self", sequence_level=True, num_beams=0)
    with pytest.raises(ConfigurationError, match="sequence_level='yes'"):
        Distillation(teacher="self", sequence_level="yes")  # type: ignore[arg-type]


# -- YAML: the shipped fragment and the end-to-end configs -------------------------------------
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_fragment_names_the_missing_teacher_at_once_and_prints_its_config(tmp_path: Path) -> None:
    import subprocess
    import sys

    base = [
        "fit",
        "-c",
        str(CONFIGS / "bert/tiny_classify_prose.yaml"),
        "-c",
        str(CONFIGS / "techniques/distillation.yaml"),
    ]
    command = [sys.executable, "-m", "lightning_efficient.cli"]
    done = subprocess.run([*command, *base], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    error = done.stderr[done.stderr.index("error: ") :].splitlines()
    assert error[0] == (
        "error: teacher='runs/teacher/checkpoints/last.ckpt' does not exist; give one of our .ckpt files, "
        "a directory written by save_pretrained, or a Hugging Face hub id"
    )
    assert len(error) < 6 and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))
    printed = subprocess.run([*command, *base, "--print_config"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300, check=False)  # fmt: skip
    assert printed.returncode == 0 and "lightning_efficient.callbacks.Distillation" in printed.stdout


def test_end_to_end_bert_teacher_then_bilstm_student_from_yaml(
    user_files: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """configs/bert/tiny_classify_prose.yaml, then configs/bilstm/tiny_distil_prose.yaml, as the configs say.

    Shortened: 4 steps each, on the user's 600 Brown sentences (3 genres) instead of the whole corpus.
    """
    from lightning_efficient.cli import main

    monkeypatch.chdir(tmp_path)
    short = ["--trainer.max_steps", "4", "--trainer.limit_val_batches", "1"]
    data = {"train_files": f"[{user_files['jsonl']}]", "text_column": "sentence", "label_column": "category",
            "label_map": "null", "group_column": "source_doc", "vocab_size": "300"}  # fmt: skip
    main(["fit", "-c", str(CONFIGS / "bert/tiny_classify_prose.yaml"), *short,
          *[item for key, value in data.items() for item in (f"--data.init_args.{key}", value)]])  # fmt: skip
    teacher = tmp_path / "runs/bert_tiny_classify_prose/checkpoints/last.ckpt"
    inner = {key: value for key, value in data.items() if key != "vocab_size"} | {"train_files": [user_files["jsonl"]]}
    smaller = tmp_path / "smaller.yaml"  # a nested override, as a user writes one
    smaller.write_text(yaml.safe_dump({"data": {"init_args": {
        "datamodule": {"init_args": {**inner, "label_map": None}}, "max_source_examples": 40, "n_iter": 3,
    }}}))  # fmt: skip
    main(["fit", "-c", str(CONFIGS / "bilstm/tiny_distil_prose.yaml"), "-c", str(smaller), *short])
    student = torch.load(tmp_path / "runs/bilstm_tiny_distil_prose+smaller/checkpoints/last.ckpt", weights_only=True)
    assert {key.split(".")[0] for key in student["state_dict"]} == {"embedding", "lstm", "fc", "classifier"}
    state = student["callbacks"]["lightning_efficient.distillation"]
    assert state["source"] == "runs/bert_tiny_classify_prose/checkpoints/last.ckpt" and "weights" not in state
    teacher_embeddings = torch.load(teacher, weights_only=True)["state_dict"][
        "model.bert.embeddings.word_embeddings.weight"
    ]
    assert student["state_dict"]["embedding.weight"].shape == teacher_embeddings.shape  # the teacher's vocabulary


def test_resume_is_exact_on_the_augmented_transfer_set(
    user_files: dict[str, str], teacher_checkpoint: str, tmp_path: Path
) -> None:
    """The transfer set is rebuilt identically from its seed (and cache); the cache's contents are not state."""
    from lightning_efficient import BiLSTMClassifier, TransferSetAugmentation

    def run(stop: int | None = None, ckpt: str | None = None) -> tuple[BiLSTMClassifier, TransferSetAugmentation]:
        inner = TextClassificationDataModule(
            train_files=[user_files["jsonl"]], text_column="sentence", label_column="category",
            group_column="source_doc", tokenizer=teacher_checkpoint, max_length=24, batch_size=8,
        )  # fmt: skip
        data = TransferSetAugmentation(inner, n_iter=3, max_source_examples=30, seed=5)
        pl.seed_everything(7)
        student = BiLSTMClassifier(
            vocab_size=inner.vocab_size, num_labels=3, label_names=inner.label_names, embedding_size=16,
            hidden_size=8, fc_size=8, dropout=0.3,
        )  # fmt: skip
        callbacks = [Distillation(teacher=teacher_checkpoint, loss="kl", temperature=2.0, alpha=0.5),
                     ModelCheckpoint(dirpath=tmp_path, save_last=True)] + ([Stop(stop)] if stop else [])  # fmt: skip
        trainer = quiet_trainer(max_steps=8, limit_val_batches=0, callbacks=callbacks, default_root_dir=tmp_path,
                                enable_checkpointing=True)  # fmt: skip
        trainer.fit(student, data, ckpt_path=ckpt)
        return student, data

    whole, data = run()
    assert data.transfer_set_stats["augmented"] > 0
    run(stop=5)
    resumed, _ = run(ckpt=str(tmp_path / "last.ckpt"))
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


# -- intermediate layers (TinyBERT-style), wired through Distillation(layers=...) ------------
def test_layer_transfer_trains_the_projection_and_leaves_a_plain_student(
    prose: TextClassificationDataModule, tmp_path: Path
) -> None:
    from lightning_efficient.losses import TRAINING_ONLY

    teacher = classifier(prose, seed=2, num_layers=4)
    student = classifier(prose, seed=3, num_layers=2, hidden_size=24)

    def hooks(model: torch.nn.Module) -> int:
        return sum(len(m._forward_hooks) for m in model.modules())

    before = hooks(student)
    projections: list[torch.Tensor] = []

    class Projection(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            projections.append(getattr(pl_module, TRAINING_ONLY)["distillation_projection"].weight.detach().clone())

    trainer = quiet_trainer(
        max_steps=3, limit_val_batches=0, enable_checkpointing=True, default_root_dir=tmp_path,
        callbacks=[Distillation(teacher=teacher, layers="uniform"), Projection(),
                   ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )  # fmt: skip
    trainer.fit(student, prose)
    assert {"distillation/hidden_loss", "distillation/attention_loss"} <= set(trainer.callback_metrics)
    assert projections[0].shape == (32, 24) and not torch.equal(projections[0], projections[-1])  # it trains
    assert not hasattr(student, TRAINING_ONLY) and hooks(student) == before and hooks(teacher) == 0
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert f"{TRAINING_ONLY}.distillation_projection.weight" in state  # a resume restores it
    reloaded = BertClassifier.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)  # drops it
    assert not hasattr(reloaded, TRAINING_ONLY)
    with pytest.raises(ConfigurationError, match=r"layers=\[1, -1\]"):
        Distillation(teacher="self", layers=[1, -1])
    with pytest.raises(ConfigurationError, match="cache='memory'"):
        Distillation(teacher="self", layers="uniform", cache="memory")
