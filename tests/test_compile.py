"""``compile`` on our LightningModules (issue 27): checkpoint keys, outputs, and each technique's declared safety.

Inductor compiles are slow on 2 cores (tens of seconds for a first compile), so only the first two
tests use it; the per-technique tests use the ``aot_eager`` backend, which traces forward and backward
like Inductor (hooks, wrappers, guards, recompiles) but runs eager kernels, so a compiled run of a
technique can be compared with an eager one to the last bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch._dynamo
from techniques import CASES, TechniqueCase, tiny_family
from test_models import LossRecorder

from lightning_efficient import BertClassifier, BertMLM, BiLSTMClassifier, MLMDataModule, Translation, ViTClassifier
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.models.students import bert_student
from lightning_efficient.testing import quiet_trainer

#: The backend of the per-technique comparisons. Not "eager" (Dynamo alone): without AOT autograd the
#: recompute of a non-reentrant activation checkpoint draws other dropout masks than the forward did.
BACKEND = "aot_eager"
#: Optimizer steps of a per-technique comparison: long enough for the rows' schedule changes
#: (QAT's switch at 3 and freeze at 5, pruning at 2 and 4, stacking's growth at 2, resizing at 3 and 5).
STEPS = 6
#: AutoProg's row chooses its depth and size at step 6 and trains the full model from step 7.
ROW_STEPS = {"autoprog": 8}
#: Weight tolerance after the comparison's steps (default 1e-5). The compiled backward sums some gradients in
#: another order than eager autograd (last-bit differences, ~1e-9 here); QAT's fake quantization turns a
#: value that moves across a rounding boundary into a whole quantization step (measured 1.4e-4 after 6 steps).
ROW_WEIGHT_TOLERANCE = {"qat": 1e-3}
#: Rows whose mechanism another row already covers (test time): first_block_noise is block_noise's hook on one block.
SAME_AS = {"first_block_noise": "block_noise"}


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    """Each test compiles from scratch: no cached graph of another test's model, no recompile limit reached."""
    torch._dynamo.reset()


def fit(
    family: str, files: dict[str, str], compile: bool | str, case: TechniqueCase | None = None, steps: int = 2
) -> tuple[pl.LightningModule, list[float]]:
    """Train the tiny ``family`` model ``steps`` steps (with the row's technique); return it and its losses."""
    pl.seed_everything(0, verbose=False)
    model, dm = tiny_family(family, files, compile=compile)
    recorder = LossRecorder()
    callbacks = [case.build(), recorder] if case is not None else [recorder]
    trainer = quiet_trainer(
        max_steps=steps, limit_train_batches=4, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks
    )
    trainer.fit(model, dm)
    return model, recorder.losses


# -- Inductor: checkpoint keys and outputs -----------------------------------------------------
def test_compile_keeps_checkpoint_keys_and_matches_eager(user_files: dict[str, str], tmp_path: Path) -> None:
    dm = MLMDataModule(train_files=[user_files["txt"]], vocab_size=300, max_length=17, batch_size=4)
    runs = {}
    for compile in (True, False):  # Inductor; dropout on: its masks come from torch's generator, as in eager
        pl.seed_everything(0, verbose=False)
        model = BertMLM(vocab_size=dm.vocab_size, preset="tiny", max_length=17, compile=compile)
        recorder = LossRecorder()
        trainer = quiet_trainer(
            max_steps=2, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[recorder]
        )
        trainer.fit(model, dm)
        trainer.save_checkpoint(tmp_path / f"{compile}.ckpt")
        runs[compile] = (model, recorder.losses)
    (compiled, compiled_losses), (eager, eager_losses) = runs[True], runs[False]
    assert all(module._compiled_call_impl is not None for module in compiled.compile_targets())
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-4)

    state = torch.load(tmp_path / "True.ckpt", weights_only=True)["state_dict"]
    assert list(state) == list(torch.load(tmp_path / "False.ckpt", weights_only=True)["state_dict"])
    assert not any("_orig_mod" in key for key in state)
    reloaded = BertMLM.load_from_checkpoint(tmp_path / "True.ckpt", weights_only=True)
    assert reloaded.hparams.compile is True and all(
        getattr(module, "_compiled_call_impl", None) is None for module in reloaded.compile_targets()
    )  # compiled only in setup, by a Trainer
    eager.load_state_dict(compiled.state_dict())  # the same weights

    # The compiled training step's graphs (train mode, gradients on) against eager, on the same weights and masks.
    batch = next(iter(dm.train_dataloader()))
    outputs = []
    for model in (compiled, eager):
        model.train()
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        loss, logits, _ = model._step(batch, torch.Generator().manual_seed(1))
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        outputs.append((loss.detach(), logits.detach(), grads))
    (loss_c, logits_c, grads_c), (loss_e, logits_e, grads_e) = outputs
    torch.testing.assert_close(logits_c, logits_e, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss_c, loss_e, atol=1e-4, rtol=1e-4)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-4, rtol=1e-3, msg=name)


# -- every technique: refused with its reason, or trains compiled as it does eager --------------
def test_an_unsafe_technique_is_refused_before_the_first_step(user_files: dict[str, str]) -> None:
    """Every contract row is compile-safe today; a technique declared unsafe is refused with its reason."""
    from lightning_efficient.testing import BlockOutputNoise

    class Rewiring(BlockOutputNoise):
        name = "rewiring"
        compile_safe = False
        compile_note = "it adds hooks after the first step"

    model, dm = tiny_family("bert", user_files, compile="aot_eager")
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[Rewiring(std=0.1)])
    with pytest.raises(ConfigurationError, match=r"rewiring \(Rewiring\) cannot run under compile: it adds hooks"):
        trainer.fit(model, dm)
    assert trainer.global_step == 0


@pytest.mark.parametrize("case", [case for case in CASES if case.id not in SAME_AS], ids=lambda c: c.id)
def test_safe_technique_trains_compiled_as_eager(case: TechniqueCase, user_files: dict[str, str]) -> None:
    assert case.build().compile_safe, f"{case.id}: declare compile_safe (this test measures it) or refuse it"
    steps = ROW_STEPS.get(case.id, STEPS)
    eager, eager_losses = fit(case.base_family, user_files, False, case, steps)
    torch._dynamo.utils.counters.clear()
    compiled, compiled_losses = fit(case.base_family, user_files, BACKEND, case, steps)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    assert len(compiled_losses) == steps
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    weights, expected = compiled.state_dict(), eager.state_dict()
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, atol=ROW_WEIGHT_TOLERANCE.get(case.id, 1e-5), rtol=0, msg=name)


def test_a_technique_that_is_not_declared_is_refused(user_files: dict[str, str]) -> None:
    from lightning_efficient.technique import Technique

    class Undeclared(Technique):
        name = "undeclared"

    model, dm = tiny_family("bert", user_files, compile="eager")
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[Undeclared()])
    with pytest.raises(ConfigurationError, match=r"undeclared \(Undeclared\) cannot run under compile: it is not"):
        trainer.fit(model, dm)


# -- the argument on every module ----------------------------------------------------------------
@pytest.mark.parametrize("value", ["fastest", 1, None, "Inductor"])
def test_bad_compile_value_names_it_and_the_choices(value: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"compile=.* is not a torch.compile backend; use true, false or one"):
        BertMLM(vocab_size=50, preset="tiny", compile=value)


@pytest.mark.parametrize(
    "build",
    [
        lambda compile: BertMLM(vocab_size=50, preset="tiny", compile=compile),
        lambda compile: BertClassifier(vocab_size=50, num_labels=2, preset="tiny", compile=compile),
        lambda compile: Translation(vocab_size=50, preset="tiny", compile=compile),
        lambda compile: ViTClassifier(num_labels=3, preset="tiny", compile=compile),
        lambda compile: BiLSTMClassifier(vocab_size=50, num_labels=2, embedding_size=8, hidden_size=4, compile=compile),
    ],
    ids=["bert_mlm", "bert_classifier", "translation", "vit", "bilstm"],
)
def test_every_module_takes_compile(build: Any) -> None:
    assert build(False).compile_backend is None
    model = build("aot_eager")
    assert model.compile_backend == "aot_eager" and model.hparams.compile == "aot_eager"
    assert build(True).compile_backend == "inductor"
    model.compile_model()  # what setup does
    assert all(module._compiled_call_impl is not None for module in model.compile_targets())
    assert "_orig_mod" not in "".join(model.state_dict())


def test_a_student_compiles_as_its_teacher() -> None:
    teacher = BertMLM(vocab_size=50, preset="tiny", compile="aot_eager")
    assert bert_student(teacher, num_layers=2).compile_backend == "aot_eager"


def test_bilstm_trains_compiled_as_eager(user_files: dict[str, str]) -> None:
    from lightning_efficient import TextClassificationDataModule

    losses = []
    for compile in (False, "aot_eager"):
        pl.seed_everything(0, verbose=False)
        dm = TextClassificationDataModule(
            train_files=[user_files["jsonl"]], text_column="sentence", label_column="category", vocab_size=300,
            max_length=24, batch_size=8,
        )  # fmt: skip
        dm.setup("fit")
        model = BiLSTMClassifier(
            vocab_size=dm.vocab_size, num_labels=dm.num_labels, embedding_size=8, hidden_size=4, fc_size=6,
            compile=compile,
        )  # fmt: skip
        recorder = LossRecorder()
        trainer = quiet_trainer(max_steps=3, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[recorder])
        trainer.fit(model, dm)
        losses.append(recorder.losses)
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
