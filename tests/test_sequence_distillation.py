"""Sequence-level distillation: the teacher's translations, their disk cache, distilled training targets, bad input.

The teacher is a tiny random ``Translation`` made to depend on its source (weights drawn with
std 0.3, not 0.02) and given a bias towards ``</s>`` (and against ``<pad>``), so its translations
differ from source to source and end at different lengths: padding after ``</s>`` and the restored
order are exercised without training it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_efficient import BertMLM, ConfigurationError, Translation, TranslationDataModule
from lightning_efficient.callbacks.distillation.sequence_level import (
    REFERENCES_ATTRIBUTE,
    cache_key,
    cached_teacher_translations,
    distil_targets,
    teacher_translations,
)
from lightning_efficient.callbacks.distillation.teacher import fingerprint, freeze
from lightning_efficient.data.text import pad_batch
from lightning_efficient.models.translation import EOS_ID, PAD_ID
from lightning_efficient.testing import quiet_trainer

MAX_LENGTH = 24


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Generation of a tiny model is many small steps: one thread is several times faster on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_data(user_files: dict[str, str]) -> TranslationDataModule:
    dm = TranslationDataModule(
        train_files=[user_files["pairs"]], source_column="src", target_column="tgt", vocab_size=300,
        max_length=MAX_LENGTH, batch_size=4,
    )  # fmt: skip
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def data(user_files: dict[str, str]) -> TranslationDataModule:
    """The set-up data module; tests that change it make their own (:func:`make_data`)."""
    return make_data(user_files)


def make_teacher(data: TranslationDataModule, architecture: str = "marian") -> Translation:
    torch.manual_seed(0)
    model = Translation(
        vocab_size=data.vocab_size, architecture=architecture, preset="tiny", max_length=MAX_LENGTH, num_layers=1,
        bleu_batches=0,
    )  # fmt: skip
    with torch.no_grad():
        for parameter in model.model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
        model.model.final_logits_bias[0, EOS_ID] = 2.5
        model.model.final_logits_bias[0, PAD_ID] = -10.0  # a trained model never says <pad>; batches pad with it
    model.tokenizer = data.tokenizer
    return freeze(model)


@pytest.fixture(scope="module")
def teacher(data: TranslationDataModule) -> Translation:
    return make_teacher(data)


@pytest.fixture(scope="module")
def sources(data: TranslationDataModule, user_files: dict[str, str]) -> list[list[int]]:
    """The English sentences of the pairs file that fit ``MAX_LENGTH`` tokens (varied lengths), encoded."""
    texts = [json.loads(line)["src"] for line in Path(user_files["pairs"]).read_text(encoding="utf-8").splitlines()]
    return [e.ids for e in data.tokenizer.encode_batch(texts) if len(e.ids) <= MAX_LENGTH][:16]


def one_by_one(teacher: Translation, source: list[int], num_beams: int) -> list[int]:
    """The teacher's own ``generate`` of one unpadded source, without the decoder start token."""
    ids = torch.tensor([source])
    output = teacher.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=num_beams, do_sample=False,
        max_new_tokens=MAX_LENGTH,
    )  # fmt: skip
    assert output[0, 0] == teacher.model.config.decoder_start_token_id
    return output[0, 1:].tolist()


def fail(**kwargs: Any) -> None:
    raise AssertionError("the teacher ran")


# -- the teacher's translations ---------------------------------------------------------------
@pytest.mark.parametrize("num_beams", [1, 4])
def test_translations_are_the_teachers_own_generation_in_the_sources_order(
    teacher: Translation, sources: list[list[int]], num_beams: int
) -> None:
    expected = [one_by_one(teacher, source, num_beams) for source in sources]
    assert len({len(s) for s in sources}) > 3 and sorted(sources, key=len) != sources  # sorting really reorders
    assert len({tuple(t) for t in expected}) > len(sources) // 2, "the teacher must depend on its source"
    assert len({len(t) for t in expected}) > 2, "translations of varied lengths: padding after </s> in a batch"
    for batch_size in (1, 5, len(sources)):
        translations = teacher_translations(teacher, sources, num_beams=num_beams, batch_size=batch_size, pad_id=PAD_ID)
        assert translations == expected, f"batch_size={batch_size}"
    for translation in translations:  # the data module's target form: text </s>, no padding
        assert translation[-1] == EOS_ID and EOS_ID not in translation[:-1] and PAD_ID not in translation
        assert 1 <= len(translation) <= MAX_LENGTH
    texts = teacher.generate(*pad_batch(sources[:3], PAD_ID), num_beams=num_beams)
    assert texts == teacher.tokenizer.decode_batch(translations[:3], skip_special_tokens=True)


def test_a_bart_teacher_loses_its_start_token_too(data: TranslationDataModule, sources: list[list[int]]) -> None:
    bart = make_teacher(data, "bart")  # its decoder starts with </s> itself
    translations = teacher_translations(bart, sources, num_beams=2, batch_size=8, pad_id=PAD_ID)
    assert translations == [one_by_one(bart, source, 2) for source in sources]
    assert all(t[-1] == EOS_ID and EOS_ID not in t[:-1] for t in translations)


def test_max_length_caps_the_translation_and_ends_it_with_eos(teacher: Translation, sources: list[list[int]]) -> None:
    translations = teacher_translations(teacher, sources, num_beams=2, max_length=4, pad_id=PAD_ID)
    assert all(len(t) <= 4 and t[-1] == EOS_ID for t in translations)
    assert any(len(t) == 4 for t in translations)


def test_the_teacher_keeps_its_mode(teacher: Translation, sources: list[list[int]]) -> None:
    teacher.model.train()
    try:
        first = teacher_translations(teacher, sources[:4], num_beams=1, pad_id=PAD_ID)
        assert teacher.model.training
        assert first == teacher_translations(teacher, sources[:4], num_beams=1, pad_id=PAD_ID)  # no dropout
    finally:
        teacher.model.eval()


# -- the disk cache ---------------------------------------------------------------------------
def test_the_cache_is_written_once_and_read_without_the_teacher(
    teacher: Translation, sources: list[list[int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arguments = {"num_beams": 2, "batch_size": 4, "pad_id": PAD_ID, "directory": tmp_path}
    first = cached_teacher_translations(teacher, "teacher-a", sources, **arguments)
    key = cache_key("teacher-a", sources, num_beams=2, max_length=MAX_LENGTH)  # max_length: the teacher's
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}.json"]
    assert json.loads((tmp_path / f"{key}.json").read_text())["translations"] == first
    assert first == teacher_translations(teacher, sources, num_beams=2, pad_id=PAD_ID)
    monkeypatch.setattr(teacher.model, "generate", fail)
    assert cached_teacher_translations(teacher, "teacher-a", sources, **arguments) == first
    assert cached_teacher_translations(teacher, "teacher-a", sources, **arguments, max_length=MAX_LENGTH) == first
    for other in ({"num_beams": 1}, {"max_length": 8}):  # another key: the teacher runs
        with pytest.raises(AssertionError, match="the teacher ran"):
            cached_teacher_translations(teacher, "teacher-a", sources, **{**arguments, **other})
    with pytest.raises(AssertionError, match="the teacher ran"):
        cached_teacher_translations(teacher, "teacher-b", sources, **arguments)


def test_the_key_changes_with_each_of_its_parts() -> None:
    base = {"teacher_fingerprint": "a", "sources": [[5, 6, 1]], "num_beams": 4, "max_length": 24}
    others = [{"teacher_fingerprint": "b"}, {"sources": [[5, 7, 1]]}, {"num_beams": 1}, {"max_length": 23}]
    keys = {cache_key(**{**base, **other}) for other in [{}, *others]}
    assert len(keys) == 5 and all(len(k) == 64 for k in keys)


def test_the_default_directory_is_under_the_package_cache(
    teacher: Translation, sources: list[list[int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIGHTNING_EFFICIENT_CACHE", str(tmp_path))
    cached_teacher_translations(teacher, "fp", sources[:2], num_beams=1, pad_id=PAD_ID)
    assert len(list((tmp_path / "sequence_distillation").glob("*.json"))) == 1


def test_an_unreadable_cache_file_is_translated_again(
    teacher: Translation, sources: list[list[int]], tmp_path: Path
) -> None:
    path = tmp_path / f"{cache_key('fp', sources[:3], num_beams=1, max_length=MAX_LENGTH)}.json"
    path.write_text('{"translations": [[1]', encoding="utf-8")
    with pytest.warns(UserWarning, match="unreadable"):
        translations = cached_teacher_translations(
            teacher, "fp", sources[:3], num_beams=1, pad_id=PAD_ID, directory=tmp_path
        )
    assert translations == teacher_translations(teacher, sources[:3], num_beams=1, pad_id=PAD_ID)
    assert json.loads(path.read_text())["translations"] == translations


# -- distilled training targets ---------------------------------------------------------------
def test_distil_targets_replaces_the_training_targets_only_and_is_idempotent(
    user_files: dict[str, str], teacher: Translation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dm = make_data(user_files)
    before = {name: list(split) for name, split in dm.splits.items()}
    stats = distil_targets(dm, teacher, fingerprint(teacher), num_beams=2, batch_size=4, directory=tmp_path)
    train = dm.splits["train"]
    translations = teacher_translations(
        teacher, [s for s, _, _, _ in before["train"]], num_beams=2, max_length=dm.max_length, pad_id=dm.pad_id
    )
    assert [(s, st) for s, _, st, _ in train] == [(s, st) for s, _, st, _ in before["train"]]  # sources kept
    assert [t for _, t, _, _ in train] == translations
    assert [text for _, _, _, text in train] == dm.tokenizer.decode_batch(translations, skip_special_tokens=True)
    assert {name: split for name, split in dm.splits.items() if name != "train"} == {
        name: split for name, split in before.items() if name != "train"
    }
    assert getattr(dm, REFERENCES_ATTRIBUTE) == before["train"]
    references = [t for _, t, _, _ in before["train"]]
    assert stats == {
        "pairs": len(train),
        "changed": sum(t != r for t, r in zip(translations, references)),
        "mean_length_before": pytest.approx(sum(map(len, references)) / len(train)),
        "mean_length_after": pytest.approx(sum(map(len, translations)) / len(train)),
    }
    assert stats["changed"] == len(train)

    monkeypatch.setattr(teacher.model, "generate", fail)  # again: from the cache, from the references
    assert distil_targets(dm, teacher, fingerprint(teacher), num_beams=2, batch_size=4, directory=tmp_path) == stats
    assert dm.splits["train"] == train and getattr(dm, REFERENCES_ATTRIBUTE) == before["train"]


def test_a_student_trains_on_the_distilled_targets(
    user_files: dict[str, str], teacher: Translation, tmp_path: Path
) -> None:
    dm = make_data(user_files)
    distil_targets(dm, teacher, fingerprint(teacher), num_beams=2, batch_size=4, directory=tmp_path)
    seen: list[list[str]] = []

    class Seen(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            seen.append(batch["target_text"])

    torch.manual_seed(1)
    student = Translation(vocab_size=dm.vocab_size, preset="tiny", max_length=MAX_LENGTH, num_layers=1, bleu_batches=0)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[Seen()])
    trainer.fit(student, dm)
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])
    distilled = {text for _, _, _, text in dm.splits["train"]}
    assert seen and set(seen[0]) <= distilled
    assert not set(seen[0]) & {text for _, _, _, text in getattr(dm, REFERENCES_ATTRIBUTE)}


# -- bad input --------------------------------------------------------------------------------
def test_a_data_module_without_a_translation_split_is_refused(
    user_files: dict[str, str], teacher: Translation, tmp_path: Path
) -> None:
    not_set_up = TranslationDataModule(train_files=[user_files["pairs"]], source_column="src", target_column="tgt")
    blocks = SimpleNamespace(splits={"train": [[5, 6, 7]]})  # an MLM data module's blocks
    for datamodule in (not_set_up, blocks, object()):
        with pytest.raises(ConfigurationError, match="needs a set-up TranslationDataModule"):
            distil_targets(datamodule, teacher, "fp", directory=tmp_path)


def test_a_teacher_that_does_not_translate_is_refused(data: TranslationDataModule, tmp_path: Path) -> None:
    teacher = BertMLM(vocab_size=data.vocab_size, preset="tiny")
    with pytest.raises(ConfigurationError, match="needs a translation teacher.*'masked_lm'"):
        distil_targets(data, teacher, "fp", directory=tmp_path)
    with pytest.raises(ConfigurationError, match="needs a translation teacher"):
        teacher_translations(SimpleNamespace(task="seq2seq", model=None), [[5, 1]], pad_id=PAD_ID)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_beams": 0}, "num_beams=0 must be an integer >= 1"),
        ({"batch_size": 0}, "batch_size=0 must be an integer >= 1"),
        ({"max_length": 0}, "max_length=0 must be an integer >= 1"),
        ({"sources": [[5, 1], []]}, r"sources \[1\] are empty"),
    ],
)
def test_bad_arguments_are_refused(teacher: Translation, arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        teacher_translations(teacher, **{"sources": [[5, 1]], "pad_id": PAD_ID, **arguments})
