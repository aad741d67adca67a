"""Checkpoint metadata: one reader and writer, and checkpoints of release 0.1.0 still load and resume."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_efficient import BertMLM, MagnitudePruning, MLMDataModule
from lightning_efficient.checkpoint import (
    CHECKPOINT_KEY,
    checkpoint_module_class,
    checkpoint_tokenizer,
    read_checkpoint_metadata,
    read_metadata,
    write_metadata,
)
from lightning_efficient.cli import EfficientCLI
from lightning_efficient.data import tokenizers
from lightning_efficient.data.base import EfficientDataModule
from lightning_efficient.data.tokenizers import load_tokenizer
from lightning_efficient.errors import CheckpointMismatchError, DataError

#: Written by release 0.1.0 (see tests/fixtures/README.md): a tiny BertMLM after 2 steps of
#: MagnitudePruning(final_sparsity=0.5, start_step=0, end_step=1, frequency=1).
FIXTURE = Path(__file__).parent / "fixtures" / "bert_tiny_mlm_v0.1.0.ckpt"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def fixture_pruning() -> MagnitudePruning:
    """The callback configuration the fixture was written with."""
    return MagnitudePruning(final_sparsity=0.5, start_step=0, end_step=1, frequency=1)


@pytest.fixture(scope="module")
def old() -> dict:
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


def test_the_key_is_the_one_release_0_1_0_wrote(old):
    assert CHECKPOINT_KEY == "lightning_efficient" and tokenizers.CHECKPOINT_KEY is CHECKPOINT_KEY
    assert read_metadata(old) is old[CHECKPOINT_KEY]


def test_metadata_of_the_old_file_is_read_without_building_anything(old):
    metadata = read_checkpoint_metadata(FIXTURE)
    assert metadata["module"] == "BertMLM" and checkpoint_module_class(FIXTURE) == "BertMLM"
    assert {"rng", "tokenizer", "mask_generator"} <= set(metadata)
    assert torch.equal(metadata["mask_generator"], old[CHECKPOINT_KEY]["mask_generator"])
    tokenizer = checkpoint_tokenizer(FIXTURE)
    assert tokenizer.get_vocab_size() == old["hyper_parameters"]["vocab_size"] == 120
    assert load_tokenizer(FIXTURE).get_vocab() == tokenizer.get_vocab()  # the data modules' path


def test_unreadable_and_foreign_checkpoints(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.ckpt' does not exist"):
        read_checkpoint_metadata(tmp_path / "nothing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"junk\.ckpt' is truncated or not a checkpoint \(it is not a file written by"):
        read_checkpoint_metadata(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")  # a plain Lightning checkpoint
    assert read_checkpoint_metadata(tmp_path / "plain.ckpt") is None
    assert checkpoint_module_class(tmp_path / "plain.ckpt") is None
    with pytest.raises(CheckpointMismatchError, match=r"holds no tokenizer \(written by an unknown module\)"):
        checkpoint_tokenizer(tmp_path / "plain.ckpt")


def test_the_module_adds_its_fields_to_records_written_before_it():
    """A technique's callback saves before the module (Lightning's order): its records survive the module's."""
    checkpoint: dict = {"hyper_parameters": {}}
    write_metadata(checkpoint, technique_records={"layer_drop": 1})
    BertMLM(vocab_size=50, preset="tiny").on_save_checkpoint(checkpoint)
    metadata = read_metadata(checkpoint)
    assert metadata["technique_records"] == {"layer_drop": 1}
    assert metadata["module"] == "BertMLM" and {"rng", "mask_generator"} <= set(metadata)


def test_old_checkpoint_loads_into_the_current_model(old):
    # A pruned checkpoint holds the mask buffers too: without the callback they are left out.
    model = BertMLM.load_from_checkpoint(FIXTURE, strict=False)
    assert model.hparams.hidden_size == 16 and model.hparams.num_layers == 2
    assert model.tokenizer.get_vocab_size() == 120  # restored from the metadata
    assert torch.equal(model.mask_generator.get_state(), old[CHECKPOINT_KEY]["mask_generator"])
    query = "model.bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(model.state_dict()[query], old["state_dict"][query])
    assert bool((model.state_dict()[query][old["state_dict"][query + "_mask"] == 0] == 0).all())  # pruned stays 0


def test_old_checkpoint_resumes_training_with_its_callback(old, tmp_path, user_files):
    masks = {k: v for k, v in old["state_dict"].items() if k.endswith("_mask")}
    pruned = sum(int((m == 0).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert masks and pruned == pytest.approx(0.5, abs=0.02)  # the fixture holds real masks
    # The tokenizer comes from the checkpoint; a small corpus (not the embedded one it was trained on) keeps the test fast.
    dm = MLMDataModule(train_files=[user_files["txt"]], tokenizer=str(FIXTURE), max_length=16, batch_size=4)
    model = BertMLM(**old["hyper_parameters"])
    pruning = fixture_pruning()
    trainer = pl.Trainer(
        max_steps=3, limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[pruning],
    )  # fmt: skip
    trainer.fit(model, dm, ckpt_path=FIXTURE)
    assert trainer.global_step == 3  # 2 steps before, 1 more now
    assert (pruning.last_event, pruning.target_sparsity) == (1, 0.5)  # the callback's state came back
    state = model.state_dict()
    for name, mask in masks.items():
        assert torch.equal(state[name], mask), name  # the masks came back, and no event changed them
        weight = state[name.removesuffix("_mask")]
        assert bool((weight[mask == 0] == 0).all()), name  # the extra step kept the pruned weights at zero
    moved = "model.bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(state[moved], old["state_dict"][moved])  # and it trained
    assert model.tokenizer.get_vocab() == checkpoint_tokenizer(FIXTURE).get_vocab()


def test_cli_builds_its_data_module_once(tmp_path, monkeypatch):
    """The model's data-decided arguments come from the one DataModule the run then uses."""
    monkeypatch.chdir(tmp_path)
    built = []
    original = EfficientDataModule.__init__  # patched in the base: the CLI reads MLMDataModule's own signature

    def counting_init(self, *args, **kwargs):
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(EfficientDataModule, "__init__", counting_init)
    args = ["-c", str(CONFIGS / "bert/tiny_mlm.yaml"), "--data.init_args.vocab_size", "300"]
    cli = EfficientCLI(args=args, run=False)
    assert built == [cli.datamodule] and cli.config_init["data"] is cli.datamodule
    assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size
    assert cli.config["data"]["init_args"]["vocab_size"] == 300  # the config (config.yaml) keeps its data section
