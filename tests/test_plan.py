"""The run plan: counted FLOPs against the monitor's, the schedule, parameters, nothing disturbed, each ``plan_at``.

Tiny models only (``BertMLM`` preset ``tiny``: hidden 32, 3 blocks) on the shared ``mlm_data``.
Every trainer carries an ``EfficiencyMonitor`` with a given peak, so no test measures the device.
"""

from __future__ import annotations

import copy
import json
import math
import random
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import peft
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_efficient import BertMLM, EfficiencyMonitor, MLMDataModule
from lightning_efficient.blocks import find_block_stacks
from lightning_efficient.callbacks import (
    ActivationCheckpointing,
    LayerDrop,
    MagnitudePruning,
    ParameterEfficientTuning,
    ProgressiveStacking,
    QuantizationAwareTraining,
    TokenDropping,
)
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.plan import RunPlan, build_plan, run_steps, schedule_steps
from lightning_efficient.testing import quiet_trainer

PEAK = 1e11  # FLOP/s given to every monitor: no test measures the device


def tiny_model(data: MLMDataModule, **kwargs: Any) -> BertMLM:
    return BertMLM(vocab_size=data.vocab_size, preset="tiny", max_length=32, **kwargs)


def trainer_with(techniques: list[Callback], steps: int = 8, **kwargs: Any) -> tuple[pl.Trainer, EfficiencyMonitor]:
    monitor = EfficiencyMonitor(peak_flops=PEAK)
    kwargs.setdefault("limit_val_batches", 0)
    kwargs.setdefault("default_root_dir", tempfile.mkdtemp())  # the monitor's efficiency.json goes there, not here
    return quiet_trainer(max_steps=steps, callbacks=[monitor, *techniques], **kwargs), monitor


def plan_of(trainer: pl.Trainer, model: BertMLM, data: MLMDataModule, **run: Any) -> RunPlan:
    return build_plan(trainer, model, data, run, [], [])


class FirstStepFlops(Callback):
    """After the monitor: its FLOPs of the first training step."""

    def __init__(self, monitor: EfficiencyMonitor) -> None:
        self.monitor = monitor
        self.flops: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.flops is None:
            self.flops = self.monitor.last_step["flops"]


# -- FLOPs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        list,
        lambda: [ActivationCheckpointing(every=1)],
        lambda: [ProgressiveStacking({0: 2, 4: 3})],  # step 0 runs 2 of the 3 blocks
        lambda: [LayerDrop(drop_rate=0.5, schedule="progressive")],  # PLD keeps every block at step 0
    ],
    ids=["plain", "activation_checkpointing", "progressive_stacking", "layer_drop"],
)
def test_counted_flops_equal_the_monitors_first_step(make: Any, mlm_data: MLMDataModule) -> None:
    torch.manual_seed(0)
    model = tiny_model(mlm_data)
    trainer, monitor = trainer_with(make(), steps=1)
    plan = plan_of(trainer, model, mlm_data)
    first = FirstStepFlops(monitor)
    trainer.callbacks.append(first)
    trainer.fit(model, mlm_data)  # the same first batch and masks (the data's and the model's own generators)
    assert first.flops is not None and first.flops > 0
    assert plan.flops["schedule"][0]["flops"] == pytest.approx(first.flops, rel=0.05)


def test_a_flop_budget_sets_the_runs_length(mlm_data: MLMDataModule) -> None:
    """A pipeline stage's max_steps is an upper bound of 10^7: the budget decides the length, as it will in fit."""
    import math

    from lightning_efficient.pipeline.budget import FlopBudget

    trainer, _ = trainer_with([], steps=10_000_000)
    trainer.callbacks.append(FlopBudget(flops=1e9))
    plan = plan_of(trainer, tiny_model(mlm_data), mlm_data)
    assert plan.total_steps == math.ceil(1e9 / plan.flops["full_step"])
    assert plan.flops["total"] == pytest.approx(plan.total_steps * plan.flops["full_step"])


def test_layer_drop_scales_each_blocks_flops_by_its_keep_probability(mlm_data: MLMDataModule) -> None:
    drop, gamma, total = 0.5, 0.1, 40
    trainer, _ = trainer_with([LayerDrop(drop_rate=drop, schedule="progressive", gamma=gamma)], steps=total)
    plan = plan_of(trainer, tiny_model(mlm_data), mlm_data)
    flops = plan.flops
    depth = len(flops["blocks"])
    assert depth == 3 and min(flops["blocks"]) > 0
    assert flops["non_block"] + sum(flops["blocks"]) == pytest.approx(flops["full_step"])
    for point in flops["schedule"]:
        theta = drop * math.exp(-gamma * point["step"]) + (
            1 - drop
        )  # Zhang & He: (1 - theta_bar) e^(-gamma t) + theta_bar
        keep = [1 - (b + 1) / depth * (1 - theta) for b in range(depth)]
        expected = flops["non_block"] + sum(f * p for f, p in zip(flops["blocks"], keep))
        assert point["flops"] == pytest.approx(expected)
        assert point["techniques"]["layer_drop"]["expected_keep"] == pytest.approx(sum(keep) / depth)
    steps = [point["step"] for point in flops["schedule"]]
    assert steps == [0, 10, 20, 30, 39]
    every_step = sum(
        flops["non_block"]
        + sum(f * (1 - (b + 1) / depth * drop * (1 - math.exp(-gamma * t))) for b, f in enumerate(flops["blocks"]))
        for t in range(total)
    )
    assert flops["total"] == pytest.approx(every_step)
    assert flops["total_steps_summed"] == total


def test_progressive_stacking_counts_blocks_not_yet_grown_as_no_work(mlm_data: MLMDataModule) -> None:
    trainer, _ = trainer_with([ProgressiveStacking({0: 1, 4: 2, 6: 3})], steps=8)
    flops = plan_of(trainer, tiny_model(mlm_data), mlm_data).flops
    by_step = {point["step"]: point for point in flops["schedule"]}  # steps 0, 2, 4, 6, 7
    for step, depth in ((0, 1), (2, 1), (4, 2), (6, 3), (7, 3)):
        assert by_step[step]["flops"] == pytest.approx(flops["non_block"] + sum(flops["blocks"][:depth]))
        assert by_step[step]["techniques"]["progressive_stacking"]["depth"] == depth


# -- parameters, memory, checkpoint ----------------------------------------------------------------
def test_parameter_counts_are_sums_over_the_model(mlm_data: MLMDataModule) -> None:
    model = tiny_model(mlm_data)
    trainer, _ = trainer_with([LayerDrop(drop_rate=0.2)])
    plan = plan_of(trainer, model, mlm_data)
    assert plan.parameters["total"] == sum(p.numel() for p in model.parameters())
    assert plan.parameters["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    (stack,) = find_block_stacks(model)
    assert [b["name"] for b in plan.parameters["blocks"]] == [f"{stack.path}.{i}" for i in range(len(stack))]
    assert [b["total"] for b in plan.parameters["blocks"]] == [
        sum(p.numel() for p in block.parameters()) for block in stack.blocks
    ]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.checkpoint["model_bytes"] >= weights  # + buffers; tied weights once
    assert plan.checkpoint["optimizer_bytes"] == 2 * weights  # AdamW: two moments of every trainable weight
    parts = plan.memory["parts"]
    assert parts["gradient_bytes"] == weights and parts["optimizer_state_bytes"] == 2 * weights
    assert parts["saved_activation_bytes"] > 0 and plan.memory["estimate_bytes"] == sum(parts.values())


def test_parameters_are_counted_with_the_surgery_applied(mlm_data: MLMDataModule) -> None:
    model = tiny_model(mlm_data)
    trainer, _ = trainer_with([ParameterEfficientTuning(peft.LoraConfig(r=4))])
    plan = plan_of(trainer, model, mlm_data)
    adapted = copy.deepcopy(model)
    ParameterEfficientTuning(peft.LoraConfig(r=4)).attach(adapted)
    assert plan.parameters["total"] == sum(p.numel() for p in adapted.parameters())
    assert plan.parameters["trainable"] == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert plan.parameters["trainable"] < sum(p.numel() for p in model.parameters()) < plan.parameters["total"]
    lora = sum(p.numel() * p.element_size() for p in adapted.parameters() if p.requires_grad)
    assert plan.checkpoint["optimizer_bytes"] == 2 * lora


def test_pruning_masks_are_in_the_checkpoint_estimate(mlm_data: MLMDataModule) -> None:
    model = tiny_model(mlm_data)
    plain = plan_of(trainer_with([])[0], model, mlm_data)
    pruned = plan_of(trainer_with([MagnitudePruning(final_sparsity=0.5, start_step=2)])[0], model, mlm_data)
    masked = MagnitudePruning(final_sparsity=0.5)
    masked_model = copy.deepcopy(model)
    masked.attach(masked_model)
    masks = sum(b.numel() * b.element_size() for name, b in masked_model.named_buffers() if name.endswith("_mask"))
    assert masks > 0
    assert pruned.checkpoint["model_bytes"] == plain.checkpoint["model_bytes"] + masks


# -- nothing disturbed -----------------------------------------------------------------------------
def hooks_of(model: torch.nn.Module) -> dict[str, tuple]:
    """Every module's hooks and instance ``forward`` (what surgery changes)."""
    return {
        name: (
            tuple(module._forward_hooks),
            tuple(module._forward_pre_hooks),
            tuple(module._backward_hooks),
            tuple(module._state_dict_hooks),
            tuple(module._load_state_dict_post_hooks),
            module.__dict__.get("forward"),
            type(module),
        )
        for name, module in model.named_modules()
    }


def random_draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), np.random.rand(3).tolist()


@pytest.mark.parametrize(
    "make",
    [
        lambda: [
            TokenDropping(keep_fraction=0.5),
            LayerDrop(drop_rate=0.5),
            ActivationCheckpointing(),
            MagnitudePruning(final_sparsity=0.5),
            ParameterEfficientTuning(peft.LoraConfig(r=4)),
        ],
        lambda: [ProgressiveStacking({0: 2, 4: 3}, init="momentum"), QuantizationAwareTraining(start_step=0)],
    ],
    ids=["five_techniques", "stacking_and_qat"],
)
def test_build_plan_leaves_model_states_and_random_streams_as_they_were(
    make: Any, mlm_data: MLMDataModule, tmp_path: Path
) -> None:
    model = tiny_model(mlm_data)
    model.model.bert.encoder.layer[1].eval()  # modes differ between modules: each must stay
    techniques = make()
    trainer, _ = trainer_with(techniques, default_root_dir=str(tmp_path / "run"))
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: module.training for name, module in model.named_modules()}
    hooks = hooks_of(model)
    mask_stream = model.mask_generator.get_state()
    drop_streams = [t.generator.get_state() for t in techniques if isinstance(t, LayerDrop)]
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()

    plan = plan_of(trainer, model, mlm_data, name="run", directory=str(tmp_path / "run"))

    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    numpy_state = np.random.get_state()
    assert numpy_state[0] == states[2][0] and np.array_equal(numpy_state[1], states[2][1])
    assert numpy_state[2:] == states[2][2:]
    stored = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in model.state_dict().values()}
    surgery = plan.checkpoint["model_bytes"] + plan.checkpoint["callback_bytes"] - sum(stored.values())
    assert surgery > 0  # masks, adapters, a moving average: the techniques were applied (to a copy)
    assert list(model.state_dict()) == list(weights)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in weights.items())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert hooks_of(model) == hooks
    assert torch.equal(model.mask_generator.get_state(), mask_stream)
    layer_drops = [t for t in techniques if isinstance(t, LayerDrop)]
    assert all(torch.equal(t.generator.get_state(), s) for t, s in zip(layer_drops, drop_streams))
    assert not any(technique.is_applied for technique in techniques)
    assert not (tmp_path / "run").exists()  # nothing written under the run's directory
    json.dumps(plan.to_dict())


def test_random_streams_continue_as_without_the_plan(mlm_data: MLMDataModule) -> None:
    model = tiny_model(mlm_data)
    trainer, _ = trainer_with([LayerDrop(drop_rate=0.5)])
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    expected = random_draws()
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    plan_of(trainer, model, mlm_data)
    assert random_draws() == expected


def test_a_run_with_a_plan_trains_bit_identically(mlm_data: MLMDataModule) -> None:
    def train(with_plan: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = tiny_model(mlm_data)
        trainer, _ = trainer_with([LayerDrop(drop_rate=0.5, seed=1), MagnitudePruning(0.5, start_step=1)], steps=3)
        if with_plan:
            plan_of(trainer, model, mlm_data)
        trainer.fit(model, mlm_data)
        return model.state_dict()

    planned, plain = train(True), train(False)
    assert list(planned) == list(plain)
    assert all(torch.equal(planned[key], plain[key]) for key in plain)


def test_a_technique_that_does_not_compose_is_refused(mlm_data: MLMDataModule) -> None:
    trainer, _ = trainer_with([LayerDrop(), ProgressiveStacking({0: 2, 4: 3})])
    with pytest.raises(ConfigurationError, match="cannot run with"):
        plan_of(trainer, tiny_model(mlm_data), mlm_data)


# -- rendering -------------------------------------------------------------------------------------
def test_text_and_summary_block_render_the_given_facts(mlm_data: MLMDataModule) -> None:
    techniques = [LayerDrop(drop_rate=0.5), ActivationCheckpointing(), MagnitudePruning(0.5, start_step=2, end_step=6)]
    trainer, _ = trainer_with(techniques)
    given = [
        {"name": t.name, "class_path": f"lightning_efficient.callbacks.{type(t).__name__}", "source": f"{t.name}.yaml",
         "arguments": {"every": 1}}
        for t in techniques
    ]  # fmt: skip
    run = {
        "name": "tiny+three",
        "directory": "runs/tiny+three",
        "writes": {"checkpoints": ["runs/tiny+three/checkpoints"], "tensorboard": "runs/tiny+three", "config": None},
        "existing_checkpoint": "runs/tiny+three/checkpoints/last.ckpt",
    }
    notes = ["trainer.max_steps: 8 from the base config"]
    plan = build_plan(trainer, tiny_model(mlm_data), mlm_data, run, given, notes)
    text = plan.text()
    assert len(text.splitlines()) <= 40
    assert "tensorboard --logdir runs/tiny+three" in text
    assert "runs/tiny+three/checkpoints/last.ckpt exists: fit will stop unless --resume, --overwrite" in text
    assert notes[0] in text and "pruning.yaml" in text
    assert [
        line.split()[1] for line in text.splitlines() if line.startswith("  ") and line.split()[0][:-1].isdigit()
    ] == [
        "layer_drop",
        "activation_checkpointing",
        "pruning",
    ]
    block = plan.summary_block()
    assert len(block.splitlines()) <= 8
    assert "tiny+three" in block and "layer_drop (LayerDrop) -> activation_checkpointing" in block
    assert "tensorboard --logdir runs/tiny+three" in block
    assert plan.techniques == given and plan.notes == notes and plan.run == run
    assert json.loads(json.dumps(plan.to_dict()))["run"] == run


# -- the run's length ------------------------------------------------------------------------------
def test_run_steps_follows_lightnings_stepping_batches() -> None:
    assert run_steps(quiet_trainer(max_steps=30), 100) == 30
    assert run_steps(quiet_trainer(max_epochs=2), 10) == 20
    assert run_steps(quiet_trainer(max_epochs=2, max_steps=15), 10) == 15
    assert run_steps(quiet_trainer(max_epochs=3, accumulate_grad_batches=4, limit_train_batches=7), 10) == 6
    assert run_steps(quiet_trainer(max_epochs=1, limit_train_batches=0.25), 10) == 2
    assert run_steps(quiet_trainer(max_epochs=-1), 10) is None
    assert run_steps(quiet_trainer(), None) is None  # an iterable dataset: epochs of unknown length
    assert schedule_steps(1) == [0] and schedule_steps(8) == [0, 2, 4, 6, 7]


# -- each technique's plan_at, against its schedule written out -------------------------------------
@pytest.mark.parametrize("step", [0, 3, 25, 400])
def test_layer_drop_plan_at(step: int) -> None:
    rate, gamma, depth = 0.4, 0.01, 5
    fixed = LayerDrop(drop_rate=rate).plan_at(step, 500, depth)
    assert fixed["block_work"] == pytest.approx([1 - rate] * depth)
    linear = LayerDrop(drop_rate=rate, schedule="linear").plan_at(step, 500, depth)
    assert linear["block_work"] == pytest.approx([1 - rate * l / depth for l in range(1, depth + 1)])
    pld = LayerDrop(drop_rate=rate, schedule="progressive", gamma=gamma).plan_at(step, 500, depth)
    theta = rate * math.exp(-gamma * step) + (1 - rate)
    assert pld["block_work"] == pytest.approx([1 - l / depth * (1 - theta) for l in range(1, depth + 1)])
    assert pld["expected_keep"] == pytest.approx(sum(pld["block_work"]) / depth)


@pytest.mark.parametrize("step", [0, 10, 40, 80, 99])
def test_token_dropping_plan_at(step: int) -> None:
    scheduled = TokenDropping(keep_fraction=0.25, final_keep_fraction=0.75, schedule_steps=80).plan_at(step, 100, 6)
    fraction = 0.25 + 0.5 * min(step / 80, 1.0)
    assert scheduled["keep_fraction"] == pytest.approx(fraction)
    assert scheduled["block_work"] == pytest.approx([1.0, fraction, fraction, fraction, fraction, 1.0])
    over_the_run = TokenDropping(keep_fraction=0.5, final_keep_fraction=1.0).plan_at(step, 100, 4)
    assert over_the_run["keep_fraction"] == pytest.approx(0.5 + 0.5 * step / 100)  # schedule_steps: the run's
    ranged = TokenDropping(keep_fraction=0.3, layers=(2, 3)).plan_at(step, 100, 6)
    assert ranged["block_work"] == pytest.approx([1.0, 1.0, 0.3, 0.3, 1.0, 1.0])


def test_progressive_stacking_plan_at() -> None:
    stacking = ProgressiveStacking({0: 2, 10: 4, 30: 6})
    for step in range(40):
        depth = 2 if step < 10 else 4 if step < 30 else 6
        assert stacking.plan_at(step, 40, 6) == {"depth": depth, "block_work": [1.0] * depth + [0.0] * (6 - depth)}


@pytest.mark.parametrize("step", [0, 9, 10, 14, 25, 30, 31, 100])
def test_pruning_plan_at_follows_the_cubic_schedule(step: int) -> None:
    final, initial, start, end, frequency = 0.9, 0.1, 10, 30, 5
    pruning = MagnitudePruning(final, start_step=start, end_step=end, frequency=frequency, initial_sparsity=initial)
    if step < start:
        expected = 0.0
    else:
        event = min(start + (step - start) // frequency * frequency, end)  # the latest event at or before the step
        expected = final + (initial - final) * (1 - (event - start) / (end - start)) ** 3  # Zhu & Gupta
    assert pruning.plan_at(step, 100, 4) == {"sparsity": pytest.approx(expected)}
    assert "block_work" not in pruning.plan_at(step, 100, 4)
    assert MagnitudePruning(0.5, start_step=5).plan_at(step, 100, 4)["sparsity"] == (0.5 if step >= 5 else 0.0)


@pytest.mark.parametrize("step", [0, 4, 5, 9, 10, 50])
def test_quantization_plan_at(step: int) -> None:
    qat = QuantizationAwareTraining(start_step=5, freeze_step=10)
    assert qat.plan_at(step, 60, 4) == {"fake_quant": step >= 5, "scales_frozen": step >= 10}
    assert QuantizationAwareTraining(start_step=5).plan_at(step, 60, 4)["scales_frozen"] is False
