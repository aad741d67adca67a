"""ParameterEfficientTuning: peft adapters as a technique, adapter-only checkpoints, merges that keep sparsity and int8."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import peft
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_efficient import (
    BertClassifier,
    BertMLM,
    CheckpointMismatchError,
    ConfigurationError,
    ParameterEfficientTuning,
    TextClassificationDataModule,
)
from lightning_efficient.callbacks.parameter_efficient import adapter_layers, base_fingerprint
from lightning_efficient.errors import NoTargetModulesError
from lightning_efficient.targets import select_modules
from lightning_efficient.testing import quiet_trainer


# -- a tiny fine-tune from a pretrained masked LM ------------------------------------------------
def classifier_data(pretrained: str) -> TextClassificationDataModule:
    """The embedded genre task (15 labels) with the pretrained checkpoint's tokenizer (blocks of 33 tokens, batch 8)."""
    return TextClassificationDataModule(tokenizer=pretrained, max_length=33, batch_size=8)


def classifier(pretrained: str | None, num_labels: int = 15) -> BertClassifier:
    return BertClassifier(num_labels=num_labels, pretrained=pretrained, preset="tiny", max_length=64)


def fine_tune(
    pretrained: str,
    root: Path,
    steps: int,
    technique: ParameterEfficientTuning,
    ckpt_path: str | None = None,
    seed: int = 0,
    stage: str = "fit",
) -> tuple[BertClassifier, pl.Trainer, list[float]]:
    """Fine-tune (or validate) a tiny classifier from ``pretrained`` with ``technique``; a checkpoint after every step."""
    pl.seed_everything(seed, verbose=False)
    dm = classifier_data(pretrained)
    model = classifier(pretrained)
    losses: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
            losses.append(float(outputs["loss"]))

    every_step = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = quiet_trainer(
        max_steps=steps, limit_val_batches=1, enable_checkpointing=True, default_root_dir=root,
        callbacks=[technique, every_step, Losses()],
    )  # fmt: skip
    if stage == "fit":
        trainer.fit(model, dm, ckpt_path=ckpt_path)
    else:
        trainer.validate(model, dm, ckpt_path=ckpt_path)
    return model, trainer, losses


@pytest.fixture(scope="module")
def pretrained(mlm_checkpoint: tuple[str, BertMLM]) -> str:
    return mlm_checkpoint[0]


@pytest.fixture(scope="module")
def lora_run(
    pretrained: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[BertClassifier, pl.Trainer, Path, list]:
    """LoRA r=4 on a classifier from the pretrained MLM: 4 steps, adapter-only checkpoints after each."""
    root = tmp_path_factory.mktemp("lora")
    model, trainer, losses = fine_tune(pretrained, root, 4, ParameterEfficientTuning(peft.LoraConfig(r=4)))
    return model, trainer, root, losses


def test_only_adapters_and_the_head_train_and_hold_optimizer_state(lora_run: tuple, pretrained: str) -> None:
    model, trainer, _, _ = lora_run
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    for name in trainable:
        assert ".lora_" in name or name.startswith(("model.classifier.", "model.bert.pooler.")), name
    assert sum(".lora_A." in n for n in trainable) == 6  # query and value of 3 blocks
    held = {id(p) for p in trainer.optimizers[0].state}
    named = dict(model.named_parameters())
    assert held == {id(named[n]) for n in trainable}
    start = classifier(pretrained)  # the frozen base did not move: equal to a fresh copy of the pretrained weights
    for name, value in start.state_dict().items():
        if name.startswith("model.bert.encoder"):
            ours = name.replace(".query.", ".query.base_layer.").replace(".value.", ".value.base_layer.")
            assert torch.equal(model.state_dict()[ours], value), name
    assert any(named[n].abs().sum() > 0 for n in trainable if ".lora_B." in n), "lora_B never left zero"


def test_adapter_only_checkpoint_holds_no_base_tensor_and_resumes_exactly(
    lora_run: tuple, pretrained: str, tmp_path: Path
) -> None:
    model, _, root, losses = lora_run
    checkpoint = torch.load(root / "step=2.ckpt", weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}
    record = checkpoint["lightning_efficient"]["adapter"]
    assert record["adapter_only"] and record["base"] == pretrained
    assert record["base_sha256"] == base_fingerprint(
        (n, p)
        for n, p in classifier(pretrained).named_parameters()
        if not n.startswith(("model.classifier", "model.bert.pooler"))
    )
    full = sum(v.numel() for v in classifier(pretrained).state_dict().values())
    assert sum(v.numel() for v in checkpoint["state_dict"].values()) < 0.2 * full
    # a fresh process of the same run: other seed (the head's fresh init differs), the same base from pretrained
    resumed, _, resumed_losses = fine_tune(
        pretrained, tmp_path, 4, ParameterEfficientTuning(peft.LoraConfig(r=4)), str(root / "step=2.ckpt"), seed=99
    )
    assert resumed_losses == losses[2:]
    for name, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_a_weights_only_checkpoint_is_adapter_only_too(lora_run: tuple, tmp_path: Path) -> None:
    model, trainer, _, _ = lora_run  # Lightning skips the callbacks' on_save_checkpoint for these: our module calls it
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    checkpoint = torch.load(tmp_path / "weights.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert checkpoint["lightning_efficient"]["adapter"]["adapter_only"]
    assert "parameter_efficient" in checkpoint["lightning_efficient"]["structure"]


def test_a_checkpoint_for_another_base_is_refused_naming_both(lora_run: tuple, mlm_data: Any, tmp_path: Path) -> None:
    _, _, root, _ = lora_run
    pl.seed_everything(1, verbose=False)
    other = BertMLM(vocab_size=mlm_data.vocab_size, preset="tiny", max_length=64)  # the same shape, other weights
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(other, mlm_data)
    trainer.save_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(CheckpointMismatchError, match="trained on base .*mlm.ckpt.* this run's base is .*other.ckpt"):
        fine_tune(str(tmp_path / "other.ckpt"), tmp_path, 1, ParameterEfficientTuning(peft.LoraConfig(r=4)),
                  str(root / "step=2.ckpt"), stage="validate")  # fmt: skip


def test_an_adapter_checkpoint_as_pretrained_points_to_its_base_and_adapter(lora_run: tuple, pretrained: str) -> None:
    _, _, root, _ = lora_run
    with pytest.raises(
        CheckpointMismatchError, match=f"is an adapter checkpoint.*pretrained='{pretrained}'.*--adapter"
    ):
        classifier(str(root / "step=2.ckpt"))


def test_a_missing_adapter_weight_still_fails_the_load(lora_run: tuple, pretrained: str, tmp_path: Path) -> None:
    _, _, root, _ = lora_run
    checkpoint = torch.load(root / "step=2.ckpt", weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if ".lora_B." in k)
    del checkpoint["state_dict"][key]
    torch.save(checkpoint, tmp_path / "cut.ckpt")
    with pytest.raises(RuntimeError, match="Missing key.*lora_B"):
        fine_tune(pretrained, tmp_path, 1, ParameterEfficientTuning(peft.LoraConfig(r=4)), str(tmp_path / "cut.ckpt"),
                  stage="validate")  # fmt: skip


def test_adapter_argument_applies_a_checkpoint_or_a_peft_directory(
    lora_run: tuple, pretrained: str, tmp_path: Path
) -> None:
    model, _, root, _ = lora_run
    batch = tiny_batch()
    expected = model.eval()(**batch)
    technique = next(cb for cb in model.trainer.callbacks if isinstance(cb, ParameterEfficientTuning))
    technique.save_pretrained(model, tmp_path / "peft")
    for source in (root / "step=4.ckpt", tmp_path / "peft"):
        fresh = classifier(pretrained)
        applied = ParameterEfficientTuning(peft.LoraConfig(r=4), adapter=str(source))
        applied.attach(fresh)
        torch.testing.assert_close(fresh.eval()(**batch), expected, rtol=0, atol=1e-6, msg=str(source))


def test_save_pretrained_loads_with_peft_from_pretrained(lora_run: tuple, pretrained: str, tmp_path: Path) -> None:
    model, _, _, _ = lora_run
    technique = next(cb for cb in model.trainer.callbacks if isinstance(cb, ParameterEfficientTuning))
    directory = technique.save_pretrained(model, tmp_path / "adapter")
    assert {p.name for p in directory.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    base = classifier(pretrained).model
    loaded = peft.PeftModel.from_pretrained(base, str(directory)).eval()
    batch = tiny_batch()
    expected = model.eval()(**batch)
    torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=1e-6)


# -- merging ------------------------------------------------------------------------------------
def tiny_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 290, (3, 13), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 9:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def adapted(config: peft.PeftConfig, **kwargs: Any) -> tuple[BertClassifier, ParameterEfficientTuning]:
    """A tiny classifier with ``config``'s adapters attached, every adapter weight random (not the identity)."""
    torch.manual_seed(0)
    model = BertClassifier(vocab_size=300, num_labels=3, preset="tiny").eval()
    technique = ParameterEfficientTuning(config, **kwargs)
    technique.attach(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name or ".ia3_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.2 + (1.0 if ".ia3_" in name else 0.0))
    return model, technique


@pytest.mark.parametrize(
    "config",
    [peft.LoraConfig(r=3, lora_alpha=5), peft.LoraConfig(r=2, use_dora=True), peft.IA3Config()],
    ids=["lora", "dora", "ia3"],
)
def test_merged_outputs_equal_unmerged_outputs(config: peft.PeftConfig) -> None:
    model, technique = adapted(
        config, targets=["key", "value", "ffn_second"] if isinstance(config, peft.IA3Config) else ["query", "value"]
    )
    batch = tiny_batch()
    unmerged = model(**batch)
    report = technique.merge(model, keep_zeros=False)
    assert report["merged"] == (9 if isinstance(config, peft.IA3Config) else 6)
    assert not adapter_layers(model) and not technique.is_applied
    assert all(p.requires_grad for p in model.parameters()), "requires_grad not given back"
    torch.testing.assert_close(model(**batch), unmerged, rtol=0, atol=1e-5)
    with pytest.raises(ConfigurationError, match="already merged"):
        technique.merge(model)


def test_unmerge_restores_the_base_and_refuses_twice() -> None:
    model, technique = adapted(peft.LoraConfig(r=4))
    layer = model.model.bert.encoder.layer[1].attention.self.query
    base = layer.base_layer.weight.detach().clone()
    outputs = model(**tiny_batch())
    technique.merge(model, unload=False)
    assert not torch.equal(layer.base_layer.weight, base)
    torch.testing.assert_close(model(**tiny_batch()), outputs, rtol=0, atol=1e-5)
    technique.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, base, rtol=0, atol=1e-6)
    with pytest.raises(ConfigurationError, match="not merged"):
        technique.unmerge(model)


def zero_half(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Zero the lower-magnitude half of each named layer's weight (a pruned base); returns the zero patterns."""
    zeros = {}
    with torch.no_grad():
        for name in names:
            weight = model.get_submodule(name).weight
            zeros[name] = weight.abs() <= weight.abs().flatten().median()
            weight[zeros[name]] = 0.0
    return zeros


def random_lora_b(model: nn.Module) -> None:
    """Every ``lora_B`` random (peft starts it at zero: the update would be nothing to merge)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_()


#: The query and value projections of the tiny BERT's 3 blocks (the default targets).
QUERY_VALUE = [f"model.bert.encoder.layer.{i}.attention.self.{p}" for i in range(3) for p in ("query", "value")]


def lora_on_pruned_base(**kwargs: Any) -> tuple[BertClassifier, ParameterEfficientTuning, dict[str, torch.Tensor]]:
    """A tiny classifier with half of each query/value weight zeroed, then LoRA r=4 (alpha 8) with random ``lora_B``."""
    torch.manual_seed(0)
    model = BertClassifier(vocab_size=300, num_labels=3, preset="tiny").eval()
    zeros = zero_half(model, QUERY_VALUE)
    technique = ParameterEfficientTuning(peft.LoraConfig(r=4, lora_alpha=8), **kwargs)
    technique.attach(model)
    random_lora_b(model)
    return model, technique, zeros


def test_a_masked_merge_keeps_a_pruned_base_exactly_sparse() -> None:
    model, technique, zeros = lora_on_pruned_base()
    names = QUERY_VALUE
    layer = model.get_submodule(names[0])
    expected = (
        layer.base_layer.weight
        + ~zeros[names[0]] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * 2.0
    )
    report = technique.merge(model)
    assert report["zeros_kept"] == sum(int(z.sum()) for z in zeros.values())
    for name in names:
        weight = model.get_submodule(name).weight
        assert torch.equal(weight == 0, zeros[name]), f"{name}: the zeros moved"
    torch.testing.assert_close(model.get_submodule(names[0]).weight, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sparse_update", [False, True])
def test_sparse_update_trains_what_the_masked_merge_gives(sparse_update: bool) -> None:
    model, technique, zeros = lora_on_pruned_base(sparse_update=sparse_update)
    names = QUERY_VALUE
    batch = tiny_batch()
    model.train()
    model(**batch).sum().backward()  # the adapters learn through the masked update too
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_" in n)
    unmerged = model.eval()(**batch)
    technique.merge(model)
    assert all(torch.equal(model.get_submodule(name).weight == 0, zeros[name]) for name in names)
    difference = (model(**batch) - unmerged).abs().max()
    if sparse_update:  # the merged model is the trained one
        assert difference < 1e-5
    else:  # the update at the pruned weights is dropped by the merge: another model
        assert difference > 1e-3


def test_sparse_update_is_plain_lora_only() -> None:
    with pytest.raises(ConfigurationError, match="sparse_update=True masks LoRA's update.*use_dora=True"):
        ParameterEfficientTuning(peft.LoraConfig(use_dora=True), sparse_update=True)
    with pytest.raises(ConfigurationError, match="IA3Config has no such update"):
        ParameterEfficientTuning(peft.IA3Config(), sparse_update=True)


def test_the_pruning_masks_decide_a_masked_merge() -> None:
    from lightning_efficient.callbacks.pruning.masks import add_masks

    torch.manual_seed(0)
    model = BertClassifier(vocab_size=300, num_labels=3, preset="tiny").eval()
    query = model.model.bert.encoder.layer[0].attention.self.query
    add_masks([query])
    query.weight_mask[:, ::2] = 0  # masked, though the weight there is not zero (yet)
    technique = ParameterEfficientTuning(peft.LoraConfig(r=2))
    technique.attach(model)
    random_lora_b(model)
    technique.merge(model)
    assert (query.weight[:, ::2] == 0).all() and (query.weight[:, 1::2] != 0).all()


def test_int8_base_trains_merges_and_requantizes() -> None:
    from torchao.quantization import Int8Tensor

    model, technique = adapted(peft.LoraConfig(r=4), int8_base=True)
    query = model.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query.base_layer.weight.data, Int8Tensor)
    assert isinstance(model.model.bert.encoder.layer[0].output.dense.weight.data, Int8Tensor)  # not adapted: int8 too
    batch = tiny_batch()
    model.train()
    model(**batch).sum().backward()
    assert query.lora_A["default"].weight.grad is not None and query.base_layer.weight.grad is None
    model.eval()
    unmerged = model(**batch)
    with pytest.raises(ConfigurationError, match="unload=True"):
        technique.merge(model, unload=False)
    technique.merge(model)
    assert isinstance(model.model.bert.encoder.layer[0].attention.self.query.weight.data, Int8Tensor)
    merged = model(**batch)
    assert (merged - unmerged).abs().max() < 0.05 * unmerged.abs().max()  # int8 rounding of the merged weight only
    with pytest.raises(ConfigurationError, match="merged int8 model cannot be unmerged"):
        technique.unmerge(model)


# -- composition and the shared kit --------------------------------------------------------------
def test_the_selector_never_offers_adapter_layers() -> None:
    model, _ = adapted(peft.LoraConfig(r=2))
    names = list(select_modules(model))
    assert not any(".lora_" in name for name in names)
    assert "model.bert.encoder.layer.0.attention.self.query.base_layer" in names


def test_a_lora_student_distils_under_bf16_with_activation_checkpointing_and_layer_drop(
    pretrained: str, tmp_path: Path
) -> None:
    from lightning_efficient.callbacks import ActivationCheckpointing, Distillation, LayerDrop

    pl.seed_everything(0, verbose=False)
    dm = classifier_data(pretrained)
    teacher = classifier(pretrained)  # any classifier of the task will do as the teacher here
    student = classifier(pretrained)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    lora = ParameterEfficientTuning(peft.LoraConfig(r=4))
    callbacks = [lora, Distillation(teacher=teacher, loss="kl", temperature=2.0, alpha=0.5),
                 ActivationCheckpointing(), LayerDrop(drop_rate=0.3, seed=1)]  # fmt: skip
    trainer = quiet_trainer(max_steps=3, limit_val_batches=1, precision="bf16-mixed", callbacks=callbacks)
    trainer.fit(student, dm)
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))
    changed = {k for k, v in student.state_dict().items() if k in start and not torch.equal(v, start[k])}
    assert changed and all(k.startswith(("model.classifier.", "model.bert.pooler.")) for k in changed), changed
    assert any(".lora_B." in n and p.abs().sum() > 0 for n, p in student.named_parameters())


def test_detach_restores_the_model_and_requires_grad() -> None:
    torch.manual_seed(0)
    model = BertClassifier(vocab_size=300, num_labels=3, preset="tiny").eval()
    model.model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # the user's own choice, kept
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    outputs = model(**tiny_batch())
    technique = ParameterEfficientTuning(targets="linear")
    technique.attach(model)
    assert len(adapter_layers(model)) == 18  # 6 Linear layers in each of 3 blocks
    technique.detach(model)
    assert not adapter_layers(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert set(model.state_dict()) == set(before)
    torch.testing.assert_close(model(**tiny_batch()), outputs, rtol=0, atol=0)


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"peft_config": peft.LoraConfig(r=0)}, ConfigurationError, r"r=0\): the rank must be >= 1"),
        ({"peft_config": peft.LoraConfig(lora_alpha=0)}, ConfigurationError, "alpha=0 must be > 0"),
        (
            {"peft_config": peft.LoraConfig(lora_dropout=1.0)},
            ConfigurationError,
            r"lora_dropout=1.0\) must lie in \[0, 1\)",
        ),
        ({"peft_config": peft.PrefixTuningConfig(num_virtual_tokens=4)}, ConfigurationError, "prompt-learning"),
        ({"peft_config": "lora"}, ConfigurationError, "is not a peft config"),
        ({"targets": ["query", "vlaue"]}, ConfigurationError, "vlaue"),
        ({"targets": ["linear", "query"]}, ConfigurationError, "'linear' alone"),
        (
            {"peft_config": peft.LoraConfig(target_modules=["query"]), "targets": ["key"]},
            ConfigurationError,
            "give one of them",
        ),
        ({"peft_config": peft.IA3Config(), "int8_base": True}, ConfigurationError, "LoraConfig only"),
        ({"train_modules": "head"}, ConfigurationError, "'auto' or a list"),
    ],
    ids=[
        "rank",
        "alpha",
        "dropout",
        "prefix",
        "not_a_config",
        "target_word",
        "linear_and_part",
        "both",
        "int8_ia3",
        "train",
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        ParameterEfficientTuning(**kwargs)


def test_bad_targets_fail_when_attached_listing_the_candidates() -> None:
    model = BertClassifier(vocab_size=300, num_labels=3, preset="tiny")
    with pytest.raises(NoTargetModulesError, match=r"include pattern '\*.querry'.*candidates: model.bert"):
        ParameterEfficientTuning(include=["*.querry"]).attach(model)
    with pytest.raises(ConfigurationError, match="peft could not place the adapters"):
        ParameterEfficientTuning(peft.LoraConfig(target_modules=["nowhere"])).attach(model)
    with pytest.raises(NoTargetModulesError, match="train_modules pattern"):
        ParameterEfficientTuning(train_modules=["*.head.*"]).attach(model)


def test_a_task_type_of_another_task_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="task_type='SEQ_CLS' does not fit BertMLM, a masked_lm model"):
        ParameterEfficientTuning(peft.LoraConfig(task_type="SEQ_CLS")).attach(BertMLM(vocab_size=300, preset="tiny"))


def test_a_missing_adapter_source_fails_before_anything_is_built() -> None:
    with pytest.raises(ConfigurationError, match="adapter='nowhere.ckpt' does not exist"):
        ParameterEfficientTuning.check_sources({"adapter": "nowhere.ckpt"})


# -- the command line -----------------------------------------------------------------------------
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("fragment", ["lora", "dora", "ia3", "lora_int8_base"])
def test_each_fragment_builds_its_adapter_through_the_cli(
    fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_efficient.cli import EfficientCLI

    monkeypatch.chdir(tmp_path)
    config = CONFIGS / "vit" / "tiny_fashion.yaml"
    cli = EfficientCLI(args=["-c", str(config), "-c", str(CONFIGS / "techniques" / f"{fragment}.yaml")], run=False)
    (technique,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ParameterEfficientTuning)]
    expected = {
        "lora": peft.LoraConfig,
        "dora": peft.LoraConfig,
        "ia3": peft.IA3Config,
        "lora_int8_base": peft.LoraConfig,
    }
    assert type(technique.peft_config) is expected[fragment]
    assert technique.int8_base == (fragment == "lora_int8_base")
    assert getattr(technique.peft_config, "use_dora", False) == (fragment == "dora")
    technique.attach(cli.model)  # the ViT's layers: 2 blocks x the fragment's parts
    assert len(adapter_layers(cli.model)) == cli.model.model.config.num_hidden_layers * len(technique.targets)


def test_fit_then_predict_with_the_adapter_on_its_base_and_refuse_another_base(
    pretrained: str, mlm_data: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from lightning_efficient.cli import main

    monkeypatch.chdir(tmp_path)
    config = str(CONFIGS / "bert" / "tiny_classify_prose.yaml")
    shape = ["--model.init_args.max_length", "64", "--data.init_args.max_length", "64"]
    main(["fit", "-c", config, "-c", str(CONFIGS / "techniques" / "lora.yaml"), "--model.init_args.pretrained",
          pretrained, *shape, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"])  # fmt: skip
    adapter = tmp_path / "runs/bert_tiny_classify_prose+lora/checkpoints/last.ckpt"  # the run is named for both files
    assert torch.load(adapter, weights_only=True)["lightning_efficient"]["adapter"]["adapter_only"]
    assert (tmp_path / "runs/bert_tiny_classify_prose+lora/adapter/adapter_config.json").is_file()  # peft_dir
    predictions = tmp_path / "runs/bert_tiny_classify_prose/predictions.jsonl"
    main(["predict", "-c", config, "--model.init_args.pretrained", pretrained, *shape, "--adapter", str(adapter),
          "--trainer.limit_predict_batches", "1"])  # fmt: skip
    rows = [line for line in predictions.read_text().splitlines()]
    assert len(rows) == 32  # one batch
    pl.seed_everything(1, verbose=False)  # another base of the same shape
    other = BertMLM(vocab_size=mlm_data.vocab_size, preset="tiny", max_length=64)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(other, mlm_data)
    trainer.save_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "-c", config, "--model.init_args.pretrained", str(tmp_path / "other.ckpt"), *shape,
              "--adapter", str(adapter), "--trainer.limit_predict_batches", "1"])  # fmt: skip
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[0]  # then the --traceback hint
    assert error.startswith("error: adapter checkpoint") and "was trained on base" in error
    assert f"base {pretrained} (sha256" in error and "this run's base is " + str(tmp_path / "other.ckpt") in error


# -- a user's own module ---------------------------------------------------------------------------
def own_fit(root: Path, seed: int, ckpt_path: str | None = None) -> tuple[nn.Module, ParameterEfficientTuning]:
    from own_block import OwnModel

    pl.seed_everything(seed, verbose=False)
    model = OwnModel()
    technique = ParameterEfficientTuning(peft.LoraConfig(r=2, lora_alpha=4))
    every_step = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = quiet_trainer(max_steps=4, enable_checkpointing=True, callbacks=[technique, every_step])
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, technique


def test_a_users_registered_block_gets_adapters_and_resumes_adapter_only(tmp_path: Path) -> None:
    from own_block import OwnModel, registered_own_block

    with registered_own_block():
        pl.seed_everything(0, verbose=False)
        start = OwnModel().state_dict()
        model, _ = own_fit(tmp_path / "full", seed=0)
        assert sorted(adapter_layers(model)) == [f"blocks.{i}.{p}" for i in range(3) for p in ("wq", "wv")]
        changed = {k for k, v in model.state_dict().items() if k in start and not torch.equal(v, start[k])}
        assert not changed, "the frozen base of a user's module moved"  # (wq/wv now live under base_layer)
        saved = torch.load(tmp_path / "full" / "step=2.ckpt", weights_only=True)["state_dict"]
        assert all(".lora_" in key for key in saved) and len(saved) == 12
        # the last checkpoint into a fresh process's model (a plain DataLoader cannot resume mid-epoch; ours can)
        resumed, _ = own_fit(tmp_path / "resumed", seed=0, ckpt_path=str(tmp_path / "full" / "step=4.ckpt"))
        for name, value in model.state_dict().items():
            assert torch.equal(resumed.state_dict()[name], value), name
        with pytest.raises(CheckpointMismatchError, match="weights of their own.*weights of its own"):
            own_fit(tmp_path / "other", seed=1, ckpt_path=str(tmp_path / "full" / "step=2.ckpt"))


def test_adapter_flag_sets_a_configured_technique_or_refuses_a_disagreeing_one() -> None:
    from lightning_efficient.cli import _adapter_technique

    configured = ParameterEfficientTuning()
    assert _adapter_technique("a.ckpt", [configured]) is None and configured.adapter == "a.ckpt"
    with pytest.raises(
        ConfigurationError, match="--adapter 'b.ckpt' and ParameterEfficientTuning\\(adapter='a.ckpt'\\)"
    ):
        _adapter_technique("b.ckpt", [configured])
