"""MagnitudePruning: cubic schedule, rankings, masks across steps and resume, structured export, bad input."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn

from lightning_efficient import BertClassifier, BertMLM, MLMDataModule, ViTClassifier, testing
from lightning_efficient.callbacks.pruning import (
    MagnitudePruning,
    add_masks,
    apply_masks,
    block_units,
    cubic_sparsity,
    export_pruned,
    load_pruned,
    magnitude_masks,
    pruning_steps,
)
from lightning_efficient.errors import ConfigurationError, NoTargetModulesError

CONFIGS = Path(__file__).parents[1] / "configs"


#: The quiet ``Trainer`` of these tests, without validation (a call's arguments win).
quiet_trainer = partial(testing.quiet_trainer, limit_val_batches=0, num_sanity_val_steps=0)


def tiny_mlm(dm: MLMDataModule) -> BertMLM:
    return BertMLM(vocab_size=dm.vocab_size, preset="tiny", max_length=17, warmup_fraction=0.0)


def zero_where_masked(module: nn.Module) -> bool:
    return bool((module.weight[module.weight_mask == 0] == 0).all())


class Probe(Callback):
    """Put after the pruning callback: records, at every batch start and end, what the masks did."""

    def __init__(self, pruning: MagnitudePruning) -> None:
        self.pruning = pruning
        self.zeros_at_start: dict[int, dict[str, int]] = {}
        self.violations: list[tuple[int, str]] = []  # (step, module) where a masked weight was not zero
        self.start_state: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_state = {
            "sparsity": self.pruning.sparsity,
            "masks": {n: m.weight_mask.clone() for n, m in self.pruning._targets.items()},
            "zero_where_masked": all(zero_where_masked(m) for m in self.pruning._targets.values()),
        }

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        zeros = {n: int((m.weight_mask == 0).sum()) for n, m in self.pruning._targets.items()}
        self.zeros_at_start[trainer.global_step] = zeros

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        for name, module in self.pruning._targets.items():
            if not zero_where_masked(module):
                self.violations.append((trainer.global_step, name))


# -- the schedule ------------------------------------------------------------------------------
def test_cubic_schedule_equals_zhu_gupta_formula() -> None:
    s_i, s_f, t0, end, dt = 0.1, 0.7, 3, 13, 4
    assert pruning_steps(t0, end, dt) == [3, 7, 11, 13]
    n_dt = end - t0
    last_event = None
    for t in range(20):
        if t in (3, 7, 11, 13):
            last_event = t
        expected = 0.0 if last_event is None else s_f + (s_i - s_f) * (1 - (last_event - t0) / n_dt) ** 3
        assert cubic_sparsity(t, s_f, t0, end, dt, s_i) == pytest.approx(expected, abs=1e-12), t
    assert cubic_sparsity(13, s_f, t0, end, dt, s_i) == pytest.approx(s_f)
    assert [cubic_sparsity(t, 0.6, 5, 5, 1) for t in (4, 5, 9)] == [0.0, 0.6, 0.6]  # one-shot


def test_training_sparsity_follows_the_schedule_per_layer(mlm_data: MLMDataModule) -> None:
    pruning = MagnitudePruning(final_sparsity=0.8, start_step=1, end_step=5, frequency=2, initial_sparsity=0.2)
    probe = Probe(pruning)
    quiet_trainer(max_steps=7, accumulate_grad_batches=2, callbacks=[pruning, probe]).fit(tiny_mlm(mlm_data), mlm_data)
    sizes = {n: m.weight.numel() for n, m in pruning._targets.items()}
    assert len(sizes) == 3 * 6  # q, k, v, attention output, FFN in, FFN out of each of 3 blocks
    for step in range(7):
        last = max([t for t in (1, 3, 5) if t <= step], default=None)
        s = 0.0 if last is None else 0.8 + (0.2 - 0.8) * (1 - (last - 1) / 4) ** 3
        expected = {n: math.floor(s * size + 0.5) for n, size in sizes.items()}
        assert probe.zeros_at_start[step] == expected, step
    assert probe.violations == []  # masked weights exactly zero after every optimizer step (AdamW, accumulation)
    assert pruning.sparsity == pytest.approx(0.8, abs=1e-3) and pruning.last_event == 5


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call, to check what reaches the loggers."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))


def test_per_layer_sparsity_reaches_the_loggers_at_each_event(mlm_data: MLMDataModule, tmp_path: Path) -> None:
    pruning = MagnitudePruning(final_sparsity=0.5, start_step=1, end_step=3, frequency=2)
    logger = RecordingLogger()
    quiet_trainer(max_steps=5, logger=logger, log_every_n_steps=1, default_root_dir=tmp_path, callbacks=[pruning]).fit(
        tiny_mlm(mlm_data), mlm_data
    )
    layer_calls = {step: m for step, m in logger.calls if any(k.startswith("pruning/sparsity/") for k in m)}
    assert sorted(layer_calls) == [1, 3]  # one report per pruning event
    final = layer_calls[3]
    assert len(final) == 3 * 6 and all(k.startswith("pruning/sparsity/model.bert.encoder.layer.") for k in final)
    assert final == pytest.approx({f"pruning/sparsity/{n}": s for n, s in pruning.layer_sparsity().items()})
    assert all(v == pytest.approx(0.5, abs=0.02) for v in final.values())
    assert any("pruning/sparsity" in m for _, m in logger.calls)  # the overall figure, every logged step


# -- rankings on a hand-built model ------------------------------------------------------------
class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(2, 2, bias=False)
        self.small = nn.Linear(2, 2, bias=False)
        self.head = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.big.weight.copy_(torch.tensor([[10.0, -1.0], [3.0, 20.0]]))
            self.small.weight.copy_(torch.tensor([[0.1, -0.4], [0.3, 0.2]]))
            self.head.weight.fill_(0.01)


def test_global_and_per_layer_ranking_on_a_hand_built_model() -> None:
    per_layer = MagnitudePruning(final_sparsity=0.5, include=["big", "small"])
    model = TwoLayers()
    per_layer.attach(model)
    per_layer.prune_now(model, 0.5)
    assert model.big.weight_mask.tolist() == [[1, 0], [0, 1]]  # the 2 smallest of each layer: 1, 3 and 0.1, 0.2
    assert model.small.weight_mask.tolist() == [[0, 1], [1, 0]]
    assert not hasattr(model.head, "weight_mask")  # not a target

    global_ = MagnitudePruning(final_sparsity=0.5, scope="global", include=["big", "small"])
    model = TwoLayers()
    global_.attach(model)
    global_.prune_now(model, 0.5)
    assert model.big.weight_mask.tolist() == [[1, 1], [1, 1]]  # the 4 smallest overall are all in `small`
    assert model.small.weight_mask.tolist() == [[0, 0], [0, 0]]
    assert model.small.weight.abs().sum() == 0 and global_.sparsity == 0.5
    # Pruned weights stay pruned: a later event never revives them, even if they would now rank higher.
    global_.prune_now(model, 0.75)
    assert model.small.weight_mask.sum() == 0 and model.big.weight_mask.tolist() == [[1, 0], [0, 1]]


def test_magnitude_masks_prune_exactly_k_with_ties() -> None:
    weights = {"w": torch.zeros(10)}
    keep = magnitude_masks(weights, 0.3)["w"]
    assert keep.tolist() == [False] * 3 + [True] * 7  # ties broken by index: exactly round(0.3 * 10)


def test_masks_in_a_plain_pytorch_loop_stay_zero_with_adamw() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    add_masks([model[0], model[2]])
    masks = magnitude_masks({"0": model[0].weight, "2": model[2].weight}, 0.6)
    model[0].weight_mask.copy_(masks["0"])
    model[2].weight_mask.copy_(masks["2"])
    apply_masks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(5):
        model(torch.randn(4, 5)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        apply_masks(model)
        for layer in (model[0], model[2]):
            assert int((layer.weight_mask == 0).sum()) == math.floor(0.6 * layer.weight.numel() + 0.5)
            assert zero_where_masked(layer)


# -- resume ------------------------------------------------------------------------------------
def test_masks_and_sparsity_exact_right_after_resume(mlm_data: MLMDataModule, tmp_path: Path) -> None:
    def run(ckpt_path: str | None, root: Path) -> tuple[MagnitudePruning, Probe, BertMLM]:
        pl.seed_everything(0, verbose=False)
        pruning = MagnitudePruning(final_sparsity=0.7, start_step=1, end_step=5, frequency=2)
        probe = Probe(pruning)
        saver = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=1, save_top_k=-1)
        model = tiny_mlm(mlm_data)
        callbacks = [pruning, probe, saver]
        trainer = quiet_trainer(max_steps=7, callbacks=callbacks, enable_checkpointing=True, default_root_dir=root)
        trainer.fit(model, mlm_data, ckpt_path=ckpt_path)
        return pruning, probe, model

    full, full_probe, full_model = run(None, tmp_path / "full")
    checkpoint = torch.load(tmp_path / "full" / "step=4.ckpt", weights_only=True)  # after events 1 and 3
    resumed, probe, model = run(str(tmp_path / "full" / "step=4.ckpt"), tmp_path / "resumed")
    state = checkpoint["state_dict"]
    saved_masks = {k[: -len(".weight_mask")]: v for k, v in state.items() if k.endswith(".weight_mask")}
    assert len(saved_masks) == 18
    for name, mask in saved_masks.items():  # the checkpoint itself holds masked weights: exact with no fix-up
        assert not checkpoint["state_dict"][f"{name}.weight"][mask == 0].any(), name
    assert probe.start_state["zero_where_masked"]
    for name, mask in probe.start_state["masks"].items():
        assert torch.equal(mask, saved_masks[name]), name
    s3 = 0.7 * (1 - (1 - 2 / 4) ** 3)  # the sparsity of the event at step 3
    assert probe.start_state["sparsity"] == pytest.approx(s3, abs=2e-3)
    assert all(probe.zeros_at_start[step] == full_probe.zeros_at_start[step] for step in (4, 5, 6))
    assert probe.violations == [] and resumed.state_dict()["last_event"] == full.state_dict()["last_event"] == 5
    for key, value in full_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_checkpoint_without_masks_loads_unpruned() -> None:
    dense = TwoLayers().state_dict()
    model = TwoLayers()
    MagnitudePruning(include=["big"]).attach(model)
    with pytest.warns(UserWarning, match="all-ones mask"):
        model.load_state_dict(dense)
    assert model.big.weight_mask.sum() == 4


# -- rewinding ---------------------------------------------------------------------------------
def test_rewinding_resets_survivors_to_the_weights_of_step_k(mlm_data: MLMDataModule) -> None:
    pruning = MagnitudePruning(final_sparsity=0.5, start_step=3, rewind_step=1)

    class AtEvent(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 3:
                self.after_event = {n: m.weight.detach().clone() for n, m in pruning._targets.items()}

    at_event = AtEvent()
    quiet_trainer(max_steps=5, callbacks=[pruning, at_event]).fit(tiny_mlm(mlm_data), mlm_data)
    assert set(pruning.rewind_weights) == set(pruning._targets)
    for name, module in pruning._targets.items():
        expected = pruning.rewind_weights[name] * module.weight_mask
        assert torch.equal(at_event.after_event[name], expected), name
        assert not torch.equal(module.weight, expected)  # training went on from there


# -- structured pruning and export -------------------------------------------------------------
def _trained_classifier(structure: str, scope: str, seed: int = 0) -> tuple[BertClassifier, MagnitudePruning]:
    torch.manual_seed(seed)
    model = BertClassifier(vocab_size=60, num_labels=3, preset="tiny", max_length=16)
    with torch.no_grad():  # spread the norms, as training would
        for p in model.parameters():
            p.mul_(1 + torch.rand(()))
    pruning = MagnitudePruning(final_sparsity=0.5, structure=structure, scope=scope)
    pruning.attach(model)
    pruning.prune_now(model, 0.5)
    return model.eval(), pruning


@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_structured_export_equals_masked_model_and_loads_back(scope: str, tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    model, pruning = _trained_classifier("heads_and_neurons", scope)
    layers = model.model.bert.encoder.layer
    heads_alive = [int((l.attention.output.dense.weight_mask.view(32, 4, 8) != 0).any(2).any(0).sum()) for l in layers]
    neurons_alive = [int((l.output.dense.weight_mask != 0).any(0).sum()) for l in layers]
    if scope == "per_layer":
        assert heads_alive == [2, 2, 2] and neurons_alive == [18, 18, 18]  # round(0.5 * 4), round(0.5 * 37)
    else:
        assert sum(heads_alive) == 6 and min(heads_alive) >= 1 and sum(neurons_alive) == 111 - 56
    ids = torch.randint(5, 60, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        expected = model(ids, mask)
    before = sum(p.numel() for l in layers for p in l.parameters())
    report = pruning.export(model)
    assert not pruning.is_applied and not any(k.endswith("_mask") for k in model.state_dict())
    assert [l.attention.self.query.out_features for l in layers] == [8 * h for h in heads_alive]
    assert [l.intermediate.dense.out_features for l in layers] == neurons_alive
    assert report["heads_removed"] == 6 and report["neurons_removed"] == 111 - sum(neurons_alive)
    after = sum(p.numel() for l in layers for p in l.parameters())
    assert after < 0.6 * before
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), expected, rtol=0, atol=1e-5)
    assert report["hf_loadable"] is False  # transformers 5 BERT cannot express fewer heads of the same size
    model.model.save_pretrained(tmp_path)
    loaded = load_pruned(tmp_path)
    assert isinstance(loaded, BertForSequenceClassification)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-5)


def test_export_from_saved_weights_without_masks() -> None:
    """A checkpoint loaded with strict=False (mask buffers dropped) exports alike: pruned units are all-zero."""
    model, _ = _trained_classifier("heads_and_neurons", "per_layer", seed=2)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_mask")}
    plain = BertClassifier(vocab_size=60, num_labels=3, preset="tiny", max_length=16).eval()
    plain.load_state_dict(state)
    ids = torch.randint(5, 60, (2, 9))
    with torch.no_grad():
        expected = model(ids)
    report = export_pruned(plain)
    assert (report["heads_removed"], report["neurons_removed"]) == (6, 57)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), expected, rtol=0, atol=1e-5)


def test_uniform_neuron_pruning_loads_with_plain_from_pretrained(tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    model, pruning = _trained_classifier("neurons", "per_layer", seed=1)
    ids = torch.randint(5, 60, (2, 9))
    with torch.no_grad():
        expected = model(ids)
    report = pruning.export(model)
    assert report["hf_loadable"] is True and model.model.config.intermediate_size == 18
    model.model.save_pretrained(tmp_path)
    loaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_vit_uniform_head_pruning_loads_with_plain_from_pretrained(tmp_path: Path) -> None:
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    model = ViTClassifier(num_labels=10, preset="tiny").eval()
    pruning = MagnitudePruning(final_sparsity=0.5, structure="heads_and_neurons")
    pruning.attach(model)
    pruning.prune_now(model, 0.5)
    config = model.model.config
    pixels = torch.randn(2, config.num_channels, config.image_size, config.image_size)
    with torch.no_grad():
        expected = model.model(pixel_values=pixels).logits
    assert pruning.export(model)["hf_loadable"] is True
    model.model.save_pretrained(tmp_path)
    loaded = ViTForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, expected, rtol=0, atol=1e-5)


def test_structured_masks_hold_during_training(mlm_data: MLMDataModule) -> None:
    pruning = MagnitudePruning(final_sparsity=0.5, start_step=1, end_step=3, frequency=2, structure="heads_and_neurons")
    probe = Probe(pruning)
    quiet_trainer(max_steps=5, callbacks=[pruning, probe]).fit(tiny_mlm(mlm_data), mlm_data)
    assert probe.violations == []
    for block in pruning._units:
        (attention,) = block.attentions
        alive = (attention.output.weight != 0).view(32, 4, 8).any(2).any(0)
        assert int(alive.sum()) == 2
        rows = alive.repeat_interleave(8)
        for linear in attention.inputs:  # pruned heads' q/k/v rows and biases are zero too
            assert linear.weight[~rows].abs().sum() == 0 and linear.bias[~rows].abs().sum() == 0
    assert pruning._stats["heads_pruned"] == 0.5 and pruning._stats["neurons_pruned"] == pytest.approx(19 / 37)


def test_block_units_of_an_encoder_layer_have_no_heads() -> None:
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=11)
    units = block_units(layer)
    assert units.attentions == [] and units.ffn.neurons == 11
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    with pytest.raises(ConfigurationError, match=r"block layers.0 \(TransformerEncoderLayer\) has no attention whose heads"
                       r" can be pruned: .* fused parameter \(in_proj_weight\)"):  # fmt: skip
        MagnitudePruning(structure="heads").attach(encoder)
    pruning = MagnitudePruning(structure="neurons", final_sparsity=0.5)
    pruning.attach(encoder)  # its FFN neurons can go
    pruning.prune_now(encoder, 0.5)
    assert [int(l.linear2.weight_mask.any(0).sum()) for l in encoder.layers] == [5, 5]


def test_a_user_registered_block_gets_structured_pruning_and_export() -> None:
    from own_block import DEPTH, FFN, VOCAB, OwnModel, registered_own_block

    torch.manual_seed(0)
    model = OwnModel()
    with pytest.raises(ConfigurationError, match=r"OwnBlock has no architecture entry; known block classes: .*"
                       r"register_architecture"):  # fmt: skip
        MagnitudePruning(structure="neurons", block_paths=["blocks"]).attach(model)
    unstructured = MagnitudePruning(block_paths=["blocks"])  # single weights need no entry
    unstructured.attach(model)
    assert len(unstructured._targets) == DEPTH * 6
    unstructured.detach(model)
    with registered_own_block():
        pruning = MagnitudePruning(final_sparsity=0.5, start_step=1, structure="heads_and_neurons")
        quiet_trainer(max_steps=3, callbacks=[pruning]).fit(model)
        assert pruning.last_event == 1 and pruning._stats["heads_pruned"] == 0.5
        ids = torch.randint(0, VOCAB, (2, 7))
        with torch.no_grad():
            expected = model.eval()(ids)
        report = export_pruned(model)
    assert (report["heads_removed"], report["neurons_removed"]) == (DEPTH * 2, DEPTH * (FFN - 18))
    assert report["hf_loadable"] is None and not any(k.endswith("_mask") for k in model.state_dict())
    for block in model.blocks:
        assert block.n_heads == 2 and block.d_head == 8
        assert [block.wq.out_features, block.wk.out_features, block.wv.out_features, block.wo.in_features] == [16] * 4
        assert (block.ff_in.out_features, block.ff_out.in_features) == (18, 18)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=1e-5)


def test_old_public_names_are_the_same_objects_and_export_is_deprecated() -> None:
    from lightning_efficient.callbacks import pruning
    from lightning_efficient.callbacks.pruning import callback, exporting, masks, schedule, structured

    assert pruning.MagnitudePruning is callback.MagnitudePruning and pruning.export_pruned is exporting.export_pruned
    assert pruning.add_masks is masks.add_masks
    assert pruning.cubic_sparsity is schedule.cubic_sparsity and pruning.block_units is structured.block_units
    assert {"export", "export_pruned", "load_pruned", "structured_masks", "SCOPES"} <= set(pruning.__all__)
    model = TwoLayers()
    add_masks([model.big]).remove()
    with pytest.warns(DeprecationWarning, match="use lightning_efficient.callbacks.export_pruned"):
        report = pruning.export(model, shrink=False)
    assert report["masked_modules"] == 0


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"final_sparsity": 1.0}, r"final_sparsity=1.0 must lie in \[0.0, 1.0\)"),
        ({"final_sparsity": -0.1}, r"final_sparsity=-0.1 must lie in \[0.0, 1.0\)"),
        ({"final_sparsity": 0.5, "initial_sparsity": 0.6}, r"initial_sparsity=0.6 must lie in \[0.0, 0.5\]"),
        ({"start_step": 10, "end_step": 5}, r"end_step=5 must be an integer >= 10"),
        ({"frequency": 0}, r"frequency=0 must be an integer >= 1"),
        ({"structure": "rows"}, r"structure='rows' is unknown; choose one of: 'unstructured', 'heads'"),
        ({"scope": "layer"}, r"scope='layer' is unknown; choose one of: 'per_layer', 'global'"),
        ({"end_step": 5, "rewind_step": 6}, r"rewind_step=6 must be an integer in \[0, 5\] or None"),
        ({"module_types": ()}, r"module_types=\(\) must name at least one"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        MagnitudePruning(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"include": ["*.nothing"]},
            r"no Linear module matched include pattern '\*.nothing' in BertMLM; candidates: model.bert",
        ),
        (
            {"exclude": ["*.key*"], "include": ["*.query"]},
            r"no Linear module matched exclude pattern '\*.key\*' among the included ones in BertMLM; candidates: ",
        ),
        (
            {"structure": "heads", "final_sparsity": 0.9},
            r"final_sparsity=0.9 would prune all 4 heads of an attention layer; .* must be < 0.875",
        ),
        (
            {"structure": "heads", "final_sparsity": 0.8, "scope": "global"},
            r"final_sparsity=0.8 would prune every head of some attention layer",
        ),
        (
            {"structure": "neurons", "final_sparsity": 0.99},
            r"final_sparsity=0.99 would prune all 37 neurons of an FFN layer",
        ),
    ],
)
def test_bad_targets_fail_at_setup_before_training(kwargs: dict[str, Any], message: str, mlm_data: Any) -> None:
    model = tiny_mlm(mlm_data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = quiet_trainer(max_steps=2, callbacks=[MagnitudePruning(**kwargs)])
    with pytest.raises(ConfigurationError, match=message):
        trainer.fit(model, mlm_data)
    assert trainer.global_step == 0 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_model_without_blocks_fails_naming_it() -> None:
    with pytest.raises(NoTargetModulesError, match="TwoLayers"):
        MagnitudePruning().attach(TwoLayers())


def test_schedule_longer_than_the_run_fails_before_training(mlm_data: MLMDataModule) -> None:
    model = tiny_mlm(mlm_data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = quiet_trainer(max_steps=4, callbacks=[MagnitudePruning(start_step=1, end_step=4)])
    with pytest.raises(ConfigurationError, match=r"end_step=4 is never reached: the run has 4 optimizer steps"):
        trainer.fit(model, mlm_data)
    assert trainer.global_step == 0 and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    pruning = MagnitudePruning(start_step=1, end_step=4, frequency=1, final_sparsity=0.5, strict_schedule=False)
    with pytest.warns(UserWarning, match=r"end_step=4 is never reached"):
        quiet_trainer(max_steps=4, callbacks=[pruning]).fit(tiny_mlm(mlm_data), mlm_data)
    assert pruning.last_event == 3 and pruning.target_sparsity == pytest.approx(0.5 * (1 - (1 - 2 / 3) ** 3))


# -- the config fragments ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, config, run_steps",
    [
        ("pruning_gradual", "bert/small_mlm.yaml", 200),  # max_steps: 200
        ("pruning_structured", "bert/small_classify_prose.yaml", 2 * 1439),  # 2 epochs of 1,439 steps
    ],
)
def test_fragment_loads_through_the_cli(
    name: str, config: str, run_steps: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_efficient.cli import EfficientCLI

    fragment = CONFIGS / "techniques" / f"{name}.yaml"
    text = fragment.read_text()
    assert f"configs/{config}" in text and f"-c configs/techniques/{name}.yaml" in text  # the command it documents
    monkeypatch.chdir(tmp_path)
    cli = EfficientCLI(args=["-c", str(CONFIGS / "vit" / "tiny_fashion.yaml"), "-c", str(fragment)], run=False)
    (pruning,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, MagnitudePruning)]
    assert len(cli.trainer.callbacks) > 2, "the fragment must append to the config's callbacks"
    assert pruning.start_step < pruning.end_step < run_steps and pruning.strict_schedule
    if name == "pruning_gradual":
        assert (pruning.structure, pruning.final_sparsity, pruning.events[:2]) == ("unstructured", 0.8, [20, 30])
    else:
        assert (pruning.structure, pruning.scope, pruning.final_sparsity) == ("heads_and_neurons", "per_layer", 0.5)
