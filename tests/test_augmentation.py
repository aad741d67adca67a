"""Tang et al.'s transfer-set augmentation: the rules' rates, the set's construction, the DataModule wrapper."""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lightning_efficient import BertClassifier, ConfigurationError, DataError, TextClassificationDataModule
from lightning_efficient.cli import EfficientCLI
from lightning_efficient.data import augmentation
from lightning_efficient.data.augmentation import PosLexicon, TransferSetAugmentation, augment_words, build_transfer_set
from lightning_efficient.data.files import read_texts
from lightning_efficient.losses import MISSING_LABEL

#: 10 tags of 10 words each: every word has a tag and 9 other words to be swapped with.
TOY_TAGS = {f"w{i}": f"t{i % 10}" for i in range(100)}
DRAWS = 2000


@pytest.fixture(autouse=True)
def transfer_set_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Transfer sets are cached under ``tmp_path`` (tokenizers stay in the shared cache: trained once)."""
    monkeypatch.setattr(augmentation, "cache_root", lambda: tmp_path)
    return tmp_path / "transfer_sets"


@pytest.fixture
def toy_sentences() -> list[list[str]]:
    rng = random.Random(0)
    return [[f"w{rng.randrange(100)}" for _ in range(12)] for _ in range(DRAWS)]


def make_inner(user_files: dict[str, str], **kwargs) -> TextClassificationDataModule:
    """The user's 600 Brown sentences of 3 genres (news, fiction, learned), a small vocabulary."""
    options = {"text_column": "sentence", "label_column": "category", "group_column": "source_doc"}
    return TextClassificationDataModule(
        train_files=[user_files["jsonl"]], vocab_size=500, max_length=32, batch_size=8, **{**options, **kwargs}
    )


def make_wrapper(user_files: dict[str, str], inner_kwargs: dict | None = None, **kwargs) -> TransferSetAugmentation:
    return TransferSetAugmentation(make_inner(user_files, **(inner_kwargs or {})), **{"n_iter": 3, **kwargs})


class FillsMissingLabels(pl.Callback):
    """Stands for ``Distillation``: the wrapper checks only this class attribute."""

    fills_missing_labels = True


# -- the rules ------------------------------------------------------------------------------


def test_mask_and_pos_rates_and_the_replacement_keeps_the_tag(toy_sentences) -> None:
    lexicon = PosLexicon(TOY_TAGS)
    rng = random.Random(0)
    masked = swapped = total = 0
    for words in toy_sentences:
        out = augment_words(words, rng, lexicon, p_mask=0.2, p_pos=0.3, p_ng=0.0, mask_token="[MASK]")
        assert len(out) == len(words)  # p_ng=0: no word is dropped
        for before, after in zip(words, out):
            total += 1
            if after == "[MASK]":
                masked += 1
            elif after != before:
                swapped += 1
                assert lexicon.tag(after) == lexicon.tag(before), (before, after)
    assert masked / total == pytest.approx(0.2, abs=0.01)
    assert swapped / total == pytest.approx(0.3, abs=0.01)


def test_untagged_and_only_words_of_their_tag_are_never_swapped() -> None:
    lexicon = PosLexicon({"cat": "nn", "dog": "nn", "to": "to"})
    rng = random.Random(0)
    outs = [augment_words(["Cat", "zebra", "to"], rng, lexicon, 0.0, 1.0, 0.0, "[MASK]") for _ in range(50)]
    assert all(out == ["Dog", "zebra", "to"] for out in outs)  # the capitalisation follows the original


def test_ngram_rate_and_the_kept_ngram_is_a_window_of_the_perturbed_sentence(toy_sentences) -> None:
    lexicon = PosLexicon(TOY_TAGS)
    sampled, lengths = 0, set()
    for seed, words in enumerate(toy_sentences):
        # Same seed: the word draws come first, so p_ng=0 gives the sentence the n-gram is cut from.
        perturbed = augment_words(words, random.Random(seed), lexicon, 0.2, 0.2, 0.0, "[MASK]")
        out = augment_words(words, random.Random(seed), lexicon, 0.2, 0.2, 0.4, "[MASK]")
        if out == perturbed:
            continue
        sampled += 1
        n = len(out)
        assert 1 <= n <= 5
        assert any(perturbed[i : i + n] == out for i in range(len(perturbed) - n + 1)), (perturbed, out)
        lengths.add(n)
    assert sampled / len(toy_sentences) == pytest.approx(0.4, abs=0.03)  # 12 words: every n-gram is shorter
    assert lengths == {1, 2, 3, 4, 5}


def test_ngram_of_a_short_sentence_is_capped_at_its_length() -> None:
    lexicon = PosLexicon(TOY_TAGS)
    rng = random.Random(0)
    outs = [augment_words(["w1", "w2"], rng, lexicon, 0.0, 0.0, 1.0, "[MASK]", max_ngram=5) for _ in range(100)]
    assert {tuple(out) for out in outs} == {("w1",), ("w2",), ("w1", "w2")}
    assert augment_words([], rng, lexicon, 0.5, 0.5, 1.0, "[MASK]") == []


# -- the transfer set -----------------------------------------------------------------------


def test_transfer_set_has_originals_first_and_no_duplicates() -> None:
    texts = ["w1 w2 w3", "w4 w5", "w6", "w7 w8 w9 w10"]
    out, labels = build_transfer_set(texts, [0, 1, 0, 1], PosLexicon(TOY_TAGS), n_iter=30, seed=0)
    assert out[:4] == texts and labels[:4] == [0, 1, 0, 1]
    assert len(out) > 10 and labels[4:] == [MISSING_LABEL] * (len(out) - 4)
    assert len(set(out)) == len(out)  # no copy twice, none equal to an original
    assert "" not in out


def test_transfer_set_is_deterministic_for_a_seed() -> None:
    texts = [f"w{i} w{i + 1} w{i + 2} w{i + 3}" for i in range(20)]
    lexicon = PosLexicon(TOY_TAGS)
    first = build_transfer_set(texts, [0] * 20, lexicon, n_iter=5, seed=3)
    assert build_transfer_set(texts, [0] * 20, lexicon, n_iter=5, seed=3) == first
    assert build_transfer_set(texts, [0] * 20, lexicon, n_iter=5, seed=4) != first


def test_max_size_caps_the_set_and_keeps_every_original() -> None:
    texts = [f"w{i} w{i + 1} w{i + 2} w{i + 3}" for i in range(20)]
    lexicon = PosLexicon(TOY_TAGS)
    full, _ = build_transfer_set(texts, [1] * 20, lexicon, n_iter=5)
    capped, labels = build_transfer_set(texts, [1] * 20, lexicon, n_iter=5, max_size=50)
    assert len(capped) == 50 and capped == full[:50]  # the first copies drawn: round by round, over every sentence
    assert labels[:20] == [1] * 20
    originals_only, _ = build_transfer_set(texts, [1] * 20, lexicon, n_iter=5, max_size=5)
    assert originals_only == texts


# -- the lexicon ----------------------------------------------------------------------------


def test_brown_lexicon_strips_tag_modifiers_and_is_cached() -> None:
    lexicon = PosLexicon.brown()
    assert PosLexicon.brown() is lexicon
    assert len(lexicon) > 40_000
    assert lexicon.tag("The") == "at" and lexicon.tag("county") == "nn"  # "County" of "Fulton County" is nn-tl
    tags = {lexicon.tag(word) for word in ("the", "county", "jury", "said", "grand")}
    assert not any(tag.endswith(("-tl", "-hl", "-nc")) for tag in tags)
    assert lexicon.words("at") == sorted(lexicon.words("at")) and "the" in lexicon.words("at")
    assert lexicon.coverage(["The", "jury", "said", "nothing", "zzyzx"]) == pytest.approx(0.8)


def test_most_frequent_tag_wins_and_ties_do_not_depend_on_order() -> None:
    sentences = [("run run", "vb vb"), ("run", "nn"), ("set set", "vb nn")]
    lexicon = PosLexicon.from_tagged(sentences)
    assert lexicon.tag("run") == "vb"
    assert lexicon.tag("set") == "nn" == PosLexicon.from_tagged(reversed(sentences)).tag("set")


def test_lexicon_from_files(tmp_path: Path) -> None:
    tagged = tmp_path / "tagged.jsonl"
    tagged.write_text(json.dumps({"text": "The Cat sat", "tags": "at nn-tl vbd"}) + "\n")
    assert PosLexicon.from_file(tagged).tag("cat") == "nn"
    mapping = tmp_path / "lexicon.json"
    mapping.write_text(json.dumps({"Cat": "nn", "dog": "nn"}))
    assert PosLexicon.from_file(mapping).words("nn") == ["cat", "dog"]
    mapping.write_text(json.dumps(["cat", "dog"]))
    with pytest.raises(DataError, match="JSON object mapping each word"):
        PosLexicon.from_file(mapping)
    with pytest.raises(DataError, match="has 2 words but 1 tags"):
        PosLexicon.from_tagged([("a b", "at")])


# -- the DataModule wrapper -----------------------------------------------------------------


def test_wrapper_trains_on_the_transfer_set_with_missing_labels_for_copies(user_files) -> None:
    dm = make_wrapper(user_files, max_source_examples=40)
    dm.setup("fit")
    stats = dm.transfer_set_stats
    assert stats["source_examples"] == 40 and stats["augmented"] > 40
    assert stats["total"] == 40 + stats["augmented"] == len(dm.datamodule.splits["train"])
    assert stats["duplicates"] == 3 * 40 - stats["augmented"]
    labels = [label for _, label in dm.datamodule.splits["train"]]
    assert set(labels[:40]) <= {0, 1, 2} and labels[40:] == [MISSING_LABEL] * stats["augmented"]
    batches = list(dm.train_dataloader())
    assert sum(len(b["labels"]) for b in batches) == stats["total"]
    seen = {int(label) for b in batches for label in b["labels"]}
    assert MISSING_LABEL in seen and seen & {0, 1, 2}


def test_the_mask_word_encodes_to_the_tokenizers_mask_id(user_files) -> None:
    dm = make_wrapper(user_files, max_source_examples=30, p_mask=0.5, p_pos=0.0, p_ng=0.0)
    dm.setup("fit")
    mask_id = dm.special_ids.mask_id
    assert mask_id == 4  # our WordPiece: [MASK]
    copies = dm.datamodule.splits["train"][30:]
    assert all(mask_id in ids for ids, _ in copies)  # p_mask 0.5 and no other change: every copy has a mask


def test_roberta_mask_token_is_used_and_encodes_to_its_id(user_files, tmp_path) -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(read_texts([user_files["txt"]], "text"), trainer=trainer)
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.save(str(tmp_path / "tokenizer.json"))
    dm = make_wrapper(user_files, {"tokenizer": str(tmp_path / "tokenizer.json")}, max_source_examples=20, p_mask=0.5)
    dm.setup("fit")
    mask_id = tok.token_to_id("<mask>")
    assert dm.special_ids.mask_id == mask_id
    assert sum(mask_id in ids for ids, _ in dm.datamodule.splits["train"][20:]) > 20


def test_wrapper_delegates_what_the_model_and_the_cli_read(user_files) -> None:
    dm = make_wrapper(user_files, max_source_examples=20)
    inner = dm.datamodule
    assert dm.model_arguments() == inner.model_arguments()
    assert set(dm.model_arguments()) == set(TransferSetAugmentation.model_argument_names)
    assert dm.tokenizer is inner.tokenizer and dm.batch_size == inner.batch_size == 8
    assert (dm.vocab_size, dm.num_labels, dm.label_names) == (inner.vocab_size, 3, ["fiction", "learned", "news"])
    dm.setup("fit")
    val = next(iter(dm.val_dataloader()))
    assert val["labels"].ge(0).all()  # validation keeps its gold labels
    assert dm.state_dict() == inner.state_dict()


def test_fit_without_a_labelling_callback_fails_and_with_one_trains(user_files, root) -> None:
    dm = make_wrapper(user_files, max_source_examples=20)
    model = BertClassifier(vocab_size=dm.vocab_size, num_labels=dm.num_labels, preset="tiny", max_length=32)
    options = {"max_steps": 2, "limit_val_batches": 1, "logger": False, "enable_checkpointing": False}
    options |= {"enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": root}
    with pytest.raises(ConfigurationError, match=r"no gold label; add lightning_efficient\.Distillation"):
        pl.Trainer(**options).fit(model, dm)
    trainer = pl.Trainer(callbacks=[FillsMissingLabels()], **options)
    trainer.fit(model, dm)
    assert trainer.global_step == 2 and dm.datamodule.trainer is trainer
    assert dm.transfer_set_stats["source_examples"] == 20


def test_second_build_reads_the_cache(user_files, transfer_set_cache, monkeypatch) -> None:
    first = make_wrapper(user_files, max_source_examples=30)
    first.setup("fit")
    assert len(list(transfer_set_cache.glob("transfer-set-*.json"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("built again instead of read from the cache")

    monkeypatch.setattr(augmentation, "_build_transfer_set", fail)
    second = make_wrapper(user_files, max_source_examples=30)
    second.setup("fit")
    assert second.datamodule.splits["train"] == first.datamodule.splits["train"]
    assert second.transfer_set_stats == first.transfer_set_stats
    with pytest.raises(AssertionError, match="built again"):  # another argument: another key
        make_wrapper(user_files, max_source_examples=30, seed=1).setup("fit")


def test_unreadable_cache_is_built_again_with_a_warning(user_files, transfer_set_cache) -> None:
    first = make_wrapper(user_files, max_source_examples=10)
    first.setup("fit")
    (path,) = transfer_set_cache.glob("transfer-set-*.json")
    path.write_text('{"texts": ["cut sh')
    second = make_wrapper(user_files, max_source_examples=10)
    with pytest.warns(UserWarning, match="cached transfer set .* cannot be read"):
        second.setup("fit")
    assert second.datamodule.splits["train"] == first.datamodule.splits["train"]
    assert len(json.loads(path.read_text())["texts"]) == second.transfer_set_stats["total"]  # rewritten whole


def test_cache_false_neither_reads_nor_writes(user_files, transfer_set_cache) -> None:
    make_wrapper(user_files, max_source_examples=10, cache=False).setup("fit")
    assert not transfer_set_cache.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"p_mask": 1.5}, r"p_mask=1.5 must lie in \[0.0, 1.0\]"),
        ({"p_pos": -0.1}, r"p_pos=-0.1 must lie in \[0.0, 1.0\]"),
        ({"p_ng": 2}, r"p_ng=2 must lie in \[0.0, 1.0\]"),
        ({"p_mask": 0.6, "p_pos": 0.6}, r"p_mask \+ p_pos = 1.2 must be at most 1"),
        ({"n_iter": 0}, r"n_iter=0 must be an integer >= 1"),
        ({"max_ngram": 0}, r"max_ngram=0 must be an integer >= 1"),
        ({"max_size": 0}, r"max_size=0 must be an integer >= 1 or None"),
        ({"max_source_examples": 0}, r"max_source_examples=0 must be an integer >= 1 or None"),
        ({"min_coverage": 1.1}, r"min_coverage=1.1 must lie in \[0.0, 1.0\]"),
    ],
)
def test_bad_arguments_fail_at_construction(user_files, kwargs, message) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make_wrapper(user_files, **kwargs)


def test_bad_datamodule_or_lexicon_path_fails_at_construction(user_files, tmp_path) -> None:
    from lightning_efficient import MLMDataModule

    with pytest.raises(ConfigurationError, match="datamodule=MLMDataModule is not text-classification data"):
        TransferSetAugmentation(MLMDataModule(train_files=[user_files["txt"]], vocab_size=300))
    missing = str(tmp_path / "nope.json")
    with pytest.raises(DataError, match=f"pos_lexicon='{missing}' does not exist"):
        make_wrapper(user_files, pos_lexicon=missing)


def test_low_coverage_warns_and_zero_coverage_fails(user_files, tmp_path) -> None:
    lexicon = tmp_path / "lexicon.json"
    lexicon.write_text(json.dumps({"the": "at", "a": "at"}))
    dm = make_wrapper(user_files, max_source_examples=50, pos_lexicon=str(lexicon))
    with pytest.warns(UserWarning, match=r"tags \d+\.\d% of the training words \(min_coverage=0.5\)"):
        dm.setup("fit")
    lexicon.write_text(json.dumps({"zyzzyva": "nn", "quixotry": "nn"}))
    with pytest.raises(DataError, match="tags none of the training words"):
        make_wrapper(user_files, max_source_examples=50, pos_lexicon=str(lexicon)).setup("fit")


def test_cli_builds_the_wrapper_and_fills_the_model_arguments(user_files, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    inner = {"train_files": [user_files["jsonl"]], "text_column": "sentence", "label_column": "category"}
    config = {
        "model": {
            "class_path": "lightning_efficient.BertClassifier",
            "init_args": {"preset": "tiny", "max_length": 32},
        },
        "data": {
            "class_path": "lightning_efficient.data.TransferSetAugmentation",
            "init_args": {
                "datamodule": {
                    "class_path": "lightning_efficient.TextClassificationDataModule",
                    "init_args": {**inner, "vocab_size": 500, "max_length": 32},
                },
                "n_iter": 2,
            },
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cli = EfficientCLI(args=["-c", str(tmp_path / "config.yaml"), "--trainer.logger", "false"], run=False)
    assert isinstance(cli.datamodule, TransferSetAugmentation)
    assert isinstance(cli.datamodule.datamodule, TextClassificationDataModule)
    for name, value in cli.datamodule.model_arguments().items():
        assert cli.model.hparams[name] == value, name
