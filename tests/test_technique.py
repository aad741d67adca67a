"""The Technique base class: declarations, composition checks, surgery bookkeeping, state checks."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_efficient import BertMLM, ConfigurationError
from lightning_efficient.technique import Technique, check_choice, check_composition, check_plain_state, check_range
from lightning_efficient.testing import BlockOutputNoise


class First(Technique):
    name = "first"
    runs_before = ("second",)


class Second(Technique):
    name = "second"


class Loner(Technique):
    name = "loner"
    conflicts_with = ("first",)
    distributed_safe = True


def test_hook_declaration_is_checked_when_the_class_is_defined():
    with pytest.raises(TypeError, match=r"undeclared \['on_train_batch_end'\]"):

        class Undeclared(Technique):
            name = "undeclared"

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                pass

    with pytest.raises(TypeError, match=r"declared but not implemented \['on_fit_start'\]"):

        class Overdeclared(Technique):
            name = "overdeclared"
            hooks = ("on_fit_start",)

    with pytest.raises(TypeError, match="not Lightning Callback hooks"):

        class Misspelt(Technique):
            name = "misspelt"
            hooks = ("on_train_bacth_end",)

    assert BlockOutputNoise.used_hooks() == ("on_save_checkpoint", "on_train_batch_start", "setup", "teardown")

    class OwnSetup(Technique):  # overriding a base hook is fine when declared
        name = "own_setup"
        hooks = ("setup",)

        def setup(self, trainer, pl_module, stage):
            super().setup(trainer, pl_module, stage)

    assert OwnSetup.used_hooks() == ("on_save_checkpoint", "setup", "teardown")
    with pytest.raises(TypeError, match=r"undeclared \['teardown'\]"):

        class SilentTeardown(Technique):
            name = "silent_teardown"

            def teardown(self, trainer, pl_module, stage):
                super().teardown(trainer, pl_module, stage)


def test_composition_rules():
    check_composition([First(), Second()])  # declared order respected
    check_composition([Second()])
    with pytest.raises(ConfigurationError, match="first must run before second: put First before Second"):
        check_composition([Second(), First()])
    with pytest.raises(ConfigurationError, match="loner cannot run with first"):
        check_composition([Loner(), Second(), First()])
    with pytest.raises(ConfigurationError, match="loner cannot run with first"):  # declared on one side only
        check_composition([First(), Loner()])
    with pytest.raises(ConfigurationError, match="second is given twice"):
        check_composition([Second(), Second()])
    with pytest.raises(ConfigurationError, match=r"first is not verified for distributed training \(world_size=2\)"):
        check_composition([First(), Second()], world_size=2)
    check_composition([Loner()], world_size=2)


def test_bad_combination_fails_at_setup_before_any_step(tmp_path):
    class Exclusive(BlockOutputNoise):
        name = "exclusive_noise"
        conflicts_with = ("block_noise",)

    model = BertMLM(vocab_size=50, preset="tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    noise = BlockOutputNoise()
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, callbacks=[noise, Exclusive()])  # fmt: skip
    with pytest.raises(ConfigurationError, match="exclusive_noise cannot run with block_noise"):
        trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([{"input_ids": torch.ones(2, 4, dtype=torch.long)}], batch_size=None))
    assert trainer.global_step == 0 and not noise.is_applied
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="state_key` must be unique"):  # Lightning refuses two of one technique
        pl.Trainer(callbacks=[BlockOutputNoise(), BlockOutputNoise()])


def test_surgery_is_reversible_and_bound_to_one_model():
    model = BertMLM(vocab_size=50, preset="tiny")
    blocks = model.model.bert.encoder.layer
    noise = BlockOutputNoise(std=1.0)
    keys = list(model.state_dict())
    noise.attach(model)
    noise.attach(model)  # idempotent
    assert [len(b._forward_hooks) for b in blocks] == [1, 1, 1]
    assert list(model.state_dict()) == keys  # checkpoint keys unchanged
    with pytest.raises(ConfigurationError, match="already applied to another model"):
        noise.attach(BertMLM(vocab_size=50, preset="tiny"))
    noise.detach(model)
    assert [len(b._forward_hooks) for b in blocks] == [0, 0, 0] and not noise.is_applied


def test_noise_follows_its_own_generator_and_schedule():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False)
    x = torch.randn(2, 3, 8)
    clean = model(x)
    noise = BlockOutputNoise(std=0.5, seed=7)
    noise.attach(model)
    assert torch.equal(model(x), clean)  # before start_step: inactive
    noise.active = True
    noisy = model(x)
    noise.detach(model)
    g = torch.Generator().manual_seed(7)
    layer0, layer1 = model.layers
    expected = layer1(layer0(x) + 0.5 * torch.randn(2, 3, 8, generator=g))
    expected = expected + 0.5 * torch.randn(2, 3, 8, generator=g)
    torch.testing.assert_close(noisy, expected)
    assert noise.draws == 2
    model.eval()
    noise.attach(model)
    assert torch.equal(model(x), model(x))  # evaluation: no noise


def test_argument_validation_names_value_and_range():
    with pytest.raises(ConfigurationError, match=r"std=-0.1 must be >= 0.0"):
        BlockOutputNoise(std=-0.1)
    with pytest.raises(ConfigurationError, match=r"start_step=-1 must be >= 0"):
        BlockOutputNoise(start_step=-1)
    with pytest.raises(ConfigurationError, match=r"std=nan must be a finite number"):
        BlockOutputNoise(std=float("nan"))
    with pytest.raises(ConfigurationError, match=r"rate=2 must lie in \(0, 1\]"):
        check_range("rate", 2, low=0, high=1, low_inclusive=False)
    with pytest.raises(ConfigurationError, match=r"rate=True must be a finite number"):
        check_range("rate", True, low=0)
    with pytest.raises(ConfigurationError, match="choose one of: 'a', 'b'"):
        check_choice("mode", "c", ["a", "b"])


def test_plain_state_check_names_the_offending_entry():
    check_plain_state({"a": [1, 2.0, "x", None, torch.ones(1)], 3: (True,)}, "t")
    with pytest.raises(TypeError, match=r"t: state\['a'\]\[1\] is a Generator"):
        check_plain_state({"a": [1, torch.Generator()]}, "t")
    with pytest.raises(TypeError, match="key .* of type tuple"):
        check_plain_state({(1, 2): 1}, "t")


def test_saving_a_checkpoint_with_unloadable_state_fails(tmp_path):
    class Leaky(BlockOutputNoise):
        name = "leaky"

        def state_dict(self):
            return {"generator": self.generator}  # a Generator object, not its state tensor

    model = BertMLM(vocab_size=50, preset="tiny")
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, callbacks=[Leaky()])  # fmt: skip
    batch = {"input_ids": torch.randint(5, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    with pytest.raises(TypeError, match=r"Leaky: state\['generator'\] is a Generator"):
        trainer.save_checkpoint(tmp_path / "x.ckpt")
