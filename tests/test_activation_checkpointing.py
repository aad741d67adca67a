"""ActivationCheckpointing: same gradients, blocks really recomputed, selection, LayerDrop, undo, bad input.

Exact resume, composition with the other techniques, DDP and bf16 are checked by the contract
suite (row ``activation_checkpointing`` in ``techniques.py``).
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from techniques import tiny_family
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.marian.modeling_marian import MarianDecoderLayer, MarianEncoderLayer

from lightning_efficient import BertMLM, Translation
from lightning_efficient.blocks import find_block_stacks
from lightning_efficient.callbacks.activation_checkpointing import ActivationCheckpointing, select_blocks
from lightning_efficient.callbacks.layer_drop import LayerDrop
from lightning_efficient.errors import ConfigurationError, NoTargetModulesError
from lightning_efficient.testing import quiet_trainer

FRAGMENTS = Path(__file__).parents[1] / "configs" / "techniques"
SMALL_MLM = Path(__file__).parents[1] / "configs" / "bert" / "small_mlm.yaml"


def count_calls(monkeypatch: pytest.MonkeyPatch, *layer_classes: type) -> Counter:
    """Patch each class's ``forward`` to count calls per block instance (``id(block)``)."""
    calls: Counter = Counter()
    for layer_class in layer_classes:
        original = layer_class.forward

        def counting(self: nn.Module, *args: Any, _original: Callable = original, **kwargs: Any) -> Any:
            calls[id(self)] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(layer_class, "forward", counting)
    return calls


def trainer(callbacks: list[Callback], steps: int, root: Any, **kwargs: Any) -> pl.Trainer:
    return quiet_trainer(max_steps=steps, limit_val_batches=0, default_root_dir=root, callbacks=callbacks, **kwargs)


# -- three model families, each with a loss on a fixed random batch -----------------------------
class TorchEncoder(nn.Module):
    """A user's own ``nn.TransformerEncoder`` (odd sizes, dropout on) with a linear head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=23, dropout=0.2, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x, src_key_padding_mask=padding))  # (B, T, 5)


def bert_loss() -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    model = BertMLM(vocab_size=50, preset="tiny", max_length=16, dropout=0.2)
    ids = torch.randint(5, 50, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # padding: the attention mask reaches the blocks as a keyword argument
    return model, lambda: F.cross_entropy(model(ids, mask).flatten(0, 1), ids.flatten())


def mt_loss() -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    model = Translation(vocab_size=60, preset="tiny", max_length=16, dropout=0.2)
    ids, labels = torch.randint(5, 60, (3, 9)), torch.randint(5, 60, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return model, lambda: F.cross_entropy(model(ids, mask, labels).flatten(0, 1), labels.flatten())


def torch_loss() -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    model = TorchEncoder()
    x, targets = torch.randn(3, 10, 16), torch.randint(0, 5, (3, 10))
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[2, 7:] = True
    return model, lambda: F.cross_entropy(model(x, padding).flatten(0, 1), targets.flatten())


FAMILIES = {"bert": bert_loss, "mt": mt_loss, "torch": torch_loss}


def gradients(
    model: nn.Module, loss_fn: Callable[[], torch.Tensor], seed: int
) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one forward/backward in training mode, dropout drawn from ``seed``."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn()
    loss.backward()
    return float(loss), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# -- correctness -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradients_equal_those_without_checkpointing(family: str) -> None:
    torch.manual_seed(0)
    model, loss_fn = FAMILIES[family]()
    blocks = sum(len(stack) for stack in find_block_stacks(model))
    reference_loss, reference = gradients(model, loss_fn, seed=7)
    _, other_dropout = gradients(model, loss_fn, seed=8)
    assert any(not torch.allclose(other_dropout[k], g) for k, g in reference.items()), "dropout must be on"

    ac = ActivationCheckpointing(every=1)
    ac.attach(model)
    loss, checkpointed = gradients(model, loss_fn, seed=7)
    ac.detach(model)

    assert ac.checkpointed_blocks == blocks  # every block (both stacks of MT) went through the checkpoint
    assert loss == pytest.approx(reference_loss, abs=1e-6)
    assert checkpointed.keys() == reference.keys()
    for name, grad in reference.items():  # the recompute saw the same dropout masks
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointed_blocks_are_recomputed_only_when_training_with_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_calls(monkeypatch, BertLayer)
    torch.manual_seed(0)
    model, loss_fn = bert_loss()
    blocks = list(find_block_stacks(model)[0].blocks)
    ac = ActivationCheckpointing(every=2)
    ac.attach(model)
    assert ac.selected == ["model.bert.encoder.layer.0", "model.bert.encoder.layer.2"]

    loss_fn().backward()
    assert [calls[id(b)] for b in blocks] == [2, 1, 2]  # forward + recompute for blocks 0 and 2

    calls.clear()
    with torch.no_grad():
        loss_fn()
    model.eval()
    loss_fn()
    assert [calls[id(b)] for b in blocks] == [2, 2, 2]  # no_grad and eval: one plain call each, twice
    assert ac.checkpointed_blocks == 2  # only the first pass was checkpointed


def test_names_select_the_decoder_stack_of_a_translation_model(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_calls(monkeypatch, MarianEncoderLayer, MarianDecoderLayer)
    torch.manual_seed(0)
    model, loss_fn = mt_loss()
    encoder, decoder = (list(stack.blocks) for stack in find_block_stacks(model))
    ac = ActivationCheckpointing(names=["*.decoder.layers.*"])
    ac.attach(model)
    assert ac.selected == [f"model.model.decoder.layers.{i}" for i in range(3)]
    loss_fn().backward()
    assert [calls[id(b)] for b in encoder] == [1, 1, 1]
    assert [calls[id(b)] for b in decoder] == [2, 2, 2]


def test_select_blocks_by_every_and_by_name() -> None:
    stacks = find_block_stacks(Translation(vocab_size=60, preset="tiny"))  # 3 encoder + 3 decoder blocks
    assert list(select_blocks(stacks, every=2)) == [
        "model.model.encoder.layers.0", "model.model.encoder.layers.2",
        "model.model.decoder.layers.0", "model.model.decoder.layers.2",
    ]  # fmt: skip
    assert list(select_blocks(stacks, every=5)) == ["model.model.encoder.layers.0", "model.model.decoder.layers.0"]
    assert len(select_blocks(stacks, every=1)) == 6
    # Whole-name match, '*' crosses dots, overlapping patterns select a block once, model order kept.
    assert list(select_blocks(stacks, names=["*.layers.1", "*encoder*1", "model.model.encoder.layers.0"])) == [
        "model.model.encoder.layers.0", "model.model.encoder.layers.1", "model.model.decoder.layers.1",
    ]  # fmt: skip
    unmatched = r"no Transformer block matched names pattern 'layers\.1' in the model; candidates: model\.model\.encoder\.layers\.0"
    with pytest.raises(NoTargetModulesError, match=unmatched):
        select_blocks(stacks, names=["layers.1"])  # not a whole-name match
    bert_stacks = find_block_stacks(BertMLM(vocab_size=50, preset="tiny"))
    assert list(select_blocks(bert_stacks, names=["*.encoder.layer.0"])) == ["model.bert.encoder.layer.0"]


# -- composition and undo ----------------------------------------------------------------------
class BlockCalls(Callback):
    """Per training step: calls of each block (forward + recompute) and the checkpoint counter."""

    def __init__(self, calls: Counter, blocks: list[nn.Module], ac: ActivationCheckpointing) -> None:
        self.calls, self.blocks, self.ac = calls, blocks, ac
        self.steps: list[tuple[list[int], int]] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.calls.clear()

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps.append(([self.calls[id(b)] for b in self.blocks], self.ac.checkpointed_blocks))


def saved_activation_bytes(model: BertMLM, ids: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward during one training forward."""
    saved: dict[tuple[int, tuple[int, ...]], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[(tensor.data_ptr(), tuple(tensor.shape))] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids, torch.ones_like(ids)).sum()
    return sum(saved.values())


def test_saves_exactly_what_hf_checkpointing_saves() -> None:
    """The memory comparison with HF's own checkpointing, without the noise of a process's RSS."""
    ids = torch.randint(5, 300, (4, 33), generator=torch.Generator().manual_seed(0))

    def model() -> BertMLM:
        torch.manual_seed(0)
        return BertMLM(vocab_size=300, preset="tiny", max_length=33).train()

    plain, ours, hf = model(), model(), model()
    ActivationCheckpointing().attach(ours)
    hf.model.activation_checkpointing_enable()
    none_bytes, ours_bytes, hf_bytes = (saved_activation_bytes(m, ids) for m in (plain, ours, hf))
    assert ours_bytes == hf_bytes < none_bytes / 3


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensors created under this mode that are still alive, recorded after every op.

    Counted per storage (a view adds nothing), from the op that creates it until it is freed (a
    ``weakref.finalize`` on the storage, whose Python object lives exactly as long as it does), so
    the record covers what autograd and the checkpoints keep, the recompute and the backward's
    transients. Storages that existed before (``existing``: the parameters) are not counted.
    """

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.existing = {tensor.untyped_storage().data_ptr() for tensor in existing}
        self.live: dict[int, int] = {}
        self.after_each_op: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live and key not in self.existing:
                    self.live[key] = storage.nbytes()
                    weakref.finalize(storage, self.live.pop, key, None)
        self.after_each_op.append((func.__name__, sum(self.live.values())))
        return out


def test_keeps_the_same_live_tensors_as_hf_checkpointing_at_every_op() -> None:
    """Ours vs HF's checkpointing: the same bytes alive after every op of a training step (no RSS noise).

    Forward, the recompute of each block and the backward: the block inputs the checkpoints keep, the
    attention mask, the recomputed activations and when they are freed all count. At BERT-base, 8 x 512,
    the same holds (a plain loop with AdamW): both peak at 884.3 MiB above the parameters, over 6112
    equal ops
    (benchmarks/activation_checkpointing.py reports the allocator's live-tensor peak per variant).
    """
    ids = torch.randint(5, 300, (4, 33), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0  # padding: a real attention mask reaches every block

    def live_bytes(variant: str) -> list[tuple[str, int]]:
        torch.manual_seed(0)
        model = BertMLM(vocab_size=300, preset="tiny", max_length=33).train()
        if variant == "ours":
            ActivationCheckpointing().attach(model)
        elif variant == "hf":
            model.model.activation_checkpointing_enable()
        torch.manual_seed(1)  # the same dropout masks
        with LiveTensorBytes(list(model.parameters())) as live:
            loss, _, _ = model._step({"input_ids": ids, "attention_mask": mask}, torch.Generator().manual_seed(2))
            loss.backward()
        return live.after_each_op

    none, ours, hf = live_bytes("none"), live_bytes("ours"), live_bytes("hf")
    assert max(b for _, b in ours) <= max(b for _, b in hf)
    assert ours == hf  # the same ops (forward, recompute, backward), the same bytes alive after each
    assert max(b for _, b in ours) < max(b for _, b in none)
    assert len(ours) > len(none)  # the blocks really were recomputed


def test_a_block_layer_drop_skips_is_neither_run_nor_recomputed(
    monkeypatch: pytest.MonkeyPatch, user_files: dict[str, str], tmp_path: Path
) -> None:
    calls = count_calls(monkeypatch, BertLayer)
    torch.manual_seed(0)
    model, dm = tiny_family("bert", user_files)
    blocks = list(find_block_stacks(model)[0].blocks)
    ac, drop = ActivationCheckpointing(every=1), LayerDrop(drop_rate=0.5, seed=3)
    record = BlockCalls(calls, blocks, ac)
    trainer([ac, drop, record], steps=4, root=tmp_path).fit(model, dm)  # AC first: priority, not order, decides

    run = [sum(count > 0 for count in counts) for counts, _ in record.steps]
    assert all(count in (0, 2) for counts, _ in record.steps for count in counts)  # skipped, or run + recomputed
    assert [checkpointed for _, checkpointed in record.steps] == run
    assert sum(run) == drop.kept_blocks and 0 < drop.kept_blocks < drop.block_slots
    assert all("forward" not in vars(b) for b in blocks), "both wrappers removed at teardown"


def test_removing_it_keeps_layer_drop_and_restores_forward_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_calls(monkeypatch, MarianEncoderLayer, MarianDecoderLayer)
    torch.manual_seed(0)
    model, loss_fn = mt_loss()
    blocks = [b for stack in find_block_stacks(model) for b in stack.blocks]
    keys = list(model.state_dict())
    config = model.model.config
    assert config.use_cache is True

    ac = ActivationCheckpointing(every=1)
    ac.attach(model)
    assert config.use_cache is False and all("forward" in vars(b) for b in blocks)
    assert list(model.state_dict()) == keys  # checkpoint keys unchanged
    drop = LayerDrop(drop_rate=0.0)  # outside training steps it runs every block
    drop.attach(model)
    loss_fn().backward()
    assert [calls[id(b)] for b in blocks] == [2] * 6 and ac.checkpointed_blocks == 6

    calls.clear()
    ac.detach(model)  # removed first: LayerDrop's wrapper must survive
    assert config.use_cache is True and all("forward" in vars(b) for b in blocks)
    loss_fn().backward()
    assert [calls[id(b)] for b in blocks] == [1] * 6 and ac.checkpointed_blocks == 6  # no longer checkpointed
    drop.detach(model)
    assert all("forward" not in vars(b) for b in blocks)


def test_offload_on_cpu_turns_itself_off_with_one_info_line(
    user_files: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model, dm = tiny_family("bert", user_files)
    ac = ActivationCheckpointing(every=1, offload=True)
    offloads: list[bool] = []
    original = torch.autograd.graph.save_on_cpu

    def counting_save_on_cpu(*args: Any, **kwargs: Any) -> Any:
        offloads.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", counting_save_on_cpu)
    fit = trainer([ac], steps=2, root=tmp_path)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.filterwarnings("error", message=".*offload.*")  # no warning about offload any more
        fit.fit(model, dm)
        fit.validate(model, dm, verbose=False)  # a later stage says nothing again
    records = [r for r in caplog.records if "offload" in r.getMessage()]
    message = (
        "ActivationCheckpointing: offload is off because this run is on the CPU: there is no GPU memory to "
        "offload saved activations from (checkpointing still applies)"
    )
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.INFO, message)]
    assert offloads == [] and ac.checkpointed_blocks == 3  # really off, and the blocks still checkpoint


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, r"every=0 must be an integer >= 1"),
        ({"every": -2}, r"every=-2 must be an integer >= 1"),
        ({"every": 1.5}, r"every=1\.5 must be an integer >= 1"),
        ({"every": True}, r"every=True must be an integer >= 1"),
        ({"names": []}, r"names=\[\] must be a list of name patterns"),
        ({"names": "*.layer.0"}, r"names='\*\.layer\.0' must be a list of name patterns, e.g. \['\*\.layer\.0'\]"),
        ({"names": ["*.0", ""]}, r"must hold only non-empty strings"),
        ({"every": 2, "names": ["*.0"]}, r"every=2 and names=\['\*\.0'\] both choose blocks; give one of them"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ActivationCheckpointing(**kwargs)


def test_a_pattern_matching_nothing_fails_before_training(user_files: dict[str, str], tmp_path: Path) -> None:
    model, dm = tiny_family("bert", user_files)
    fit = trainer([ActivationCheckpointing(names=["*.encoder.layer.0", "*.decoder.*"])], steps=2, root=tmp_path)
    with pytest.raises(
        ConfigurationError,
        match=r"no Transformer block matched names pattern '\*\.decoder\.\*' in BertMLM; candidates: model\.bert",
    ):
        fit.fit(model, dm)
    assert fit.global_step == 0


def test_models_it_cannot_act_on_are_refused() -> None:
    with pytest.raises(NoTargetModulesError, match="found no Transformer block stack in Sequential"):
        ActivationCheckpointing().attach(nn.Sequential(nn.Linear(2, 2)))
    model = BertMLM(vocab_size=50, preset="tiny")
    hf = model.model
    enable = getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable  # transformers 4
    enable()  # HF's own checkpointing: ours would checkpoint those blocks twice
    with pytest.raises(ConfigurationError, match=r"already checkpoint themselves.*activation_checkpointing_disable"):
        ActivationCheckpointing().attach(model)


# -- config fragments --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["activation_checkpointing", "bf16_mixed", "fp16_mixed"])
def test_fragment_loads_through_the_cli(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_efficient.cli import EfficientCLI

    fragment = FRAGMENTS / f"{name}.yaml"
    assert f"-c configs/techniques/{name}.yaml" in fragment.read_text()
    monkeypatch.chdir(tmp_path)
    cli = EfficientCLI(args=["-c", str(SMALL_MLM), "-c", str(fragment)], run=False)
    if name == "activation_checkpointing":
        (ac,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ActivationCheckpointing)]
        assert (ac.every, ac.names, ac.offload) == (1, None, False) and len(cli.trainer.callbacks) > 2
    else:  # on a CPU Lightning turns 16-mixed into bf16-mixed (fp16 needs a GPU)
        expected = "16-mixed" if name == "fp16_mixed" and torch.cuda.is_available() else "bf16-mixed"
        assert cli.trainer.precision == expected


def test_a_user_registered_block_is_checkpointed_with_equal_gradients() -> None:
    from own_block import OwnModel, registered_own_block

    model = OwnModel()
    batch = next(iter(model.train_dataloader()))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.training_step(batch, 0).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    reference = gradients()
    with registered_own_block():
        ac = ActivationCheckpointing(every=2)
        ac.attach(model)
        assert ac.selected == ["blocks.0", "blocks.2"]
        checkpointed = gradients()
        assert ac.checkpointed_blocks == 2
        ac.detach(model)
    assert reference.keys() == checkpointed.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
