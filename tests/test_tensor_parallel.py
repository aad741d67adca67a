"""TensorParallelStrategy: 2 gloo processes match one process; bad configurations fail before training.

The parity runs (BERT, ViT, MT; with and without gradient clipping; resumed from a distributed
checkpoint; vocabulary- and sequence-parallel with activation checkpointing; LAMB; a user's own
block described with ``register_architecture``; Lion and LAMB built before fit as from YAML, saved and
resumed) share one
2-process launch of ``tp_worker.py`` under a hard timeout, so a hang fails instead of blocking.
The single-process reference runs the same function in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from own_block import OwnBlock, OwnModel, registered_own_block
from techniques import CASES, BlocklessModule
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel
from tp_worker import train

from lightning_efficient import BertMLM, Translation, ViTClassifier
from lightning_efficient.data.sampling import DataParallelSampler
from lightning_efficient.errors import ConfigurationError, NoTargetModulesError
from lightning_efficient.strategies import COMPOSES_WITH, TensorParallelStrategy, clip_grad_norm_, megatron_plan
from lightning_efficient.strategies.tensor_parallel import (
    STYLES,
    check_composition,
    check_strategy_support,
    parallel_sizes,
    resolve_plan,
)

TIMEOUT_S = 300
STEPS, SAVE_AT, CLIP = 20, 10, 0.25
TOL = 1e-5
FAMILIES = ("bert", "vit", "mt")
WORKER = Path(__file__).parent / "tp_worker.py"


def _launch(spec: dict[str, Any], out: Path, timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    try:
        return subprocess.run(
            [sys.executable, str(WORKER), json.dumps(spec), str(out)],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the 2-process run hung for {timeout} s:\n{expired.stderr}")


def _runs(out: Path) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for family in FAMILIES:
        runs += [
            {"name": f"{family}_plain", "family": family, "steps": STEPS},
            {"name": f"{family}_clip", "family": family, "steps": STEPS, "clip": CLIP, "save_at": SAVE_AT},
            {"name": f"{family}_resumed", "family": family, "steps": STEPS, "clip": CLIP,
             "resume": str(out / f"{family}_clip" / f"step={SAVE_AT}.ckpt")},
        ]  # fmt: skip
    runs += [
        {"name": "bert_vocab_sequence_ac", "family": "bert", "steps": 4, "clip": CLIP, "techniques": ["activation_checkpointing"],
         "strategy": {"vocab_parallel": True, "sequence_parallel": True}},
        {"name": "mt_vocab_sequence", "family": "mt", "steps": 4, "strategy": {"vocab_parallel": True, "sequence_parallel": True}},
        {"name": "vit_sequence_lamb", "family": "vit", "steps": 4, "clip": CLIP, "optimizer": "lamb", "techniques": ["trust_ratio"],
         "strategy": {"sequence_parallel": True}},
        {"name": "layer_drop", "family": "bert", "steps": 1, "techniques": ["layer_drop"], "expect_error": True},
        {"name": "own_clip", "family": "own", "steps": 8, "clip": CLIP},
    ]  # fmt: skip
    for optimizer in ("lion", "lamb"):  # an `optimizer:` block in YAML: LightningCLI builds it before fit
        yaml = {"family": "own", "steps": 8, "clip": CLIP, "optimizer": optimizer, "optimizer_from_yaml": True}
        runs += [
            {"name": f"own_{optimizer}_yaml", **yaml, "save_at": 4},  # 4 batches an epoch: saved at an epoch's end
            {"name": f"own_{optimizer}_yaml_resumed", **yaml, "resume": str(out / f"own_{optimizer}_yaml" / "step=4.ckpt")},
        ]  # fmt: skip
    return runs


@pytest.fixture(scope="module")
def parallel(user_files: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict]:
    """(rank 0's results, rank 1's results, the single-process references) of every run."""
    out = tmp_path_factory.mktemp("tp")
    runs = _runs(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker rank (the reference also trains the tokenizers the workers reuse)
    try:
        references = {
            run["name"]: train(
                {k: v for k, v in run.items() if k not in ("strategy", "save_at")}, user_files, out / "ref", devices=1
            )
            for run in runs
            if "resume" not in run and not run.get("expect_error")
        }
    finally:
        torch.set_num_threads(threads)
    result = _launch({"files": user_files, "runs": runs}, out)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return ranks[0], ranks[1], references


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _assert_parity(run: dict, ref: dict, what: str, first_step: int = 1) -> None:
    steps = list(range(first_step, STEPS + 1)) if first_step > 1 else sorted(ref["losses"])
    assert sorted(run["losses"]) == steps, what
    losses = max(abs(run["losses"][s] - ref["losses"][s]) for s in steps)
    params = _max_diff(run["params"], ref["params"])
    assert losses < TOL and params < TOL, f"{what}: losses differ by {losses:.2e}, parameters by {params:.2e}"
    assert run["world_size"] == 2 and run["steps"] == ref["steps"]


@pytest.mark.parametrize("family", FAMILIES)
def test_two_tp_ranks_match_one_process(parallel: tuple[dict, dict, dict], family: str) -> None:
    rank0, rank1, refs = parallel
    for kind in ("plain", "clip"):
        name = f"{family}_{kind}"
        run, ref = rank0[name], refs[name]
        _assert_parity(run, ref, name)
        assert _max_diff(run["first_grads"], ref["first_grads"]) < TOL, f"{name}: the first backward differs"
        assert max(abs(run["grad_norms"][s] - ref["grad_norms"][s]) for s in ref["grad_norms"]) < TOL
        assert _max_diff(rank1[name]["params"], run["params"]) < 1e-6, f"{name}: the TP ranks hold different models"
        assert rank0[name]["batch_hash"] == rank1[name]["batch_hash"], f"{name}: TP ranks must see the same batches"
    assert min(refs[f"{family}_clip"]["grad_norms"].values()) > CLIP, "clipping was not active on every step"
    assert _max_diff(refs[f"{family}_clip"]["params"], refs[f"{family}_plain"]["params"]) > 10 * TOL, (
        "clipping changed nothing"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_from_a_distributed_checkpoint(parallel: tuple[dict, dict, dict], family: str) -> None:
    rank0, rank1, refs = parallel
    name = f"{family}_resumed"
    _assert_parity(rank0[name], refs[f"{family}_clip"], name, first_step=SAVE_AT + 1)
    assert rank0[name]["batch_hash"] == rank1[name]["batch_hash"]


@pytest.mark.parametrize("name", ["bert_vocab_sequence_ac", "mt_vocab_sequence", "vit_sequence_lamb"])
def test_vocab_and_sequence_parallel_compose(parallel: tuple[dict, dict, dict], name: str) -> None:
    """Vocabulary- and sequence-parallel plans (tied embeddings stay tied), with activation
    checkpointing, LAMB (our foreach optimizer) and the trust-ratio monitor: still the single process."""
    rank0, rank1, refs = parallel
    run, ref = rank0[name], refs[name]
    losses = max(abs(run["losses"][s] - ref["losses"][s]) for s in ref["losses"])
    assert sorted(run["losses"]) == sorted(ref["losses"]) and losses < TOL
    assert _max_diff(run["params"], ref["params"]) < TOL and _max_diff(run["first_grads"], ref["first_grads"]) < TOL
    assert rank0[name]["batch_hash"] == rank1[name]["batch_hash"]


def test_registered_own_block_trains_in_parallel(parallel: tuple[dict, dict, dict]) -> None:
    """A block the package never knew, described once with register_architecture: TP=2 is one process."""
    rank0, rank1, refs = parallel
    run, ref = rank0["own_clip"], refs["own_clip"]
    assert sorted(run["losses"]) == sorted(ref["losses"]) == list(range(1, 9))
    assert max(abs(run["losses"][s] - ref["losses"][s]) for s in ref["losses"]) < TOL
    assert _max_diff(run["first_grads"], ref["first_grads"]) < TOL
    # OwnBlock's key bias gets no gradient (softmax ignores a score shift shared by all keys): AdamW turns
    # its rounding noise (~1e-10, different in the two runs) into steps of up to lr, so it is not compared.
    noise = {name for name in ref["params"] if name.endswith(".wk.bias")}
    assert len(noise) == 2 and all(ref["first_grads"][name].abs().max() < 1e-8 for name in noise)
    kept = [{n: p for n, p in params.items() if n not in noise} for params in (run["params"], ref["params"])]
    assert _max_diff(*kept) < TOL
    assert _max_diff(rank1["own_clip"]["params"], run["params"]) < 1e-6
    assert min(ref["grad_norms"].values()) > CLIP, "clipping was not active on every step"


@pytest.mark.parametrize("optimizer", ["lion", "lamb"])
def test_optimizer_from_yaml_saves_and_resumes(parallel: tuple[dict, dict, dict], optimizer: str) -> None:
    """An optimizer built before fit (LightningCLI's ``optimizer:`` block; here Lion and LAMB) holds the
    parameters that the plan replaces: it used to fail at the first distributed checkpoint (a KeyError)."""
    rank0, rank1, refs = parallel
    ref = refs[f"own_{optimizer}_yaml"]
    # OwnBlock's key bias gets only rounding noise as gradient, which Lion's sign() turns into steps of lr
    noise = {name for name in ref["params"] if name.endswith(".wk.bias")}
    for name, first in ((f"own_{optimizer}_yaml", 1), (f"own_{optimizer}_yaml_resumed", 5)):
        run = rank0[name]
        assert sorted(run["losses"]) == list(range(first, 9)), name
        assert max(abs(run["losses"][s] - ref["losses"][s]) for s in run["losses"]) < TOL, name
        kept = [{n: p for n, p in params.items() if n not in noise} for params in (run["params"], ref["params"])]
        assert _max_diff(*kept) < TOL, f"{name}: parameters differ from one process"
        assert _max_diff(rank1[name]["params"], run["params"]) < 1e-6


def test_unsupported_technique_fails_on_both_ranks(parallel: tuple[dict, dict, dict]) -> None:
    rank0, rank1, _ = parallel
    for rank in (rank0, rank1):
        assert "layer_drop (LayerDrop) is not supported under tensor parallelism" in rank["layer_drop"]["error"]


def test_bad_plan_fails_on_every_rank_without_hanging(user_files: dict[str, str], tmp_path: Path) -> None:
    """3 heads at tp=2: both processes stop with the error, before any collective."""
    run = {"name": "bad", "family": "vit", "steps": 1, "shape": {"num_heads": 3}}
    result = _launch({"files": user_files, "runs": [run]}, tmp_path, timeout=120)
    assert result.returncode != 0
    for rank in (0, 1):
        message = (tmp_path / f"error_rank{rank}.txt").read_text()
        assert (
            message.startswith("ConfigurationError")
            and "3 attention heads are not divisible by tensor_parallel_size=2" in message
        )


# -- errors without a process group --------------------------------------------------------------
def test_heads_and_ffn_not_divisible() -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"layer\.0\.attention\.self: 6 attention heads are not divisible by tensor_parallel_size=4; .*\(1, 2, 3, 6\)",
    ):
        megatron_plan(
            BertMLM(vocab_size=50, preset="tiny", hidden_size=36, num_heads=6, ffn_size=40), tensor_parallel_size=4
        )
    with pytest.raises(
        ConfigurationError, match=r"mlp\.fc1: FFN width \(out_features=37\) is not divisible by tensor_parallel_size=2"
    ):
        megatron_plan(ViTClassifier(num_labels=10, preset="tiny"), tensor_parallel_size=2)
    with pytest.raises(
        ConfigurationError, match=r"num_embeddings \(the vocabulary\)=51 is not divisible by tensor_parallel_size=2"
    ):
        megatron_plan(BertMLM(vocab_size=51, preset="tiny", ffn_size=38), tensor_parallel_size=2, vocab_parallel=True)


def test_world_size_must_factor_into_dp_times_tp() -> None:
    assert parallel_sizes(6, tensor_parallel_size=3) == (2, 3) and parallel_sizes(2) == (1, 2)
    with pytest.raises(
        ConfigurationError, match=r"world size 4 does not factor into data_parallel_size x tensor_parallel_size=3"
    ):
        parallel_sizes(4, tensor_parallel_size=3)
    with pytest.raises(
        ConfigurationError, match=r"data_parallel_size=2 x tensor_parallel_size=2 = 4 is not the world size 2"
    ):
        parallel_sizes(2, data_parallel_size=2, tensor_parallel_size=2)
    with pytest.raises(ConfigurationError, match="world size 3 does not factor"):  # at Trainer(...): no process started
        pl.Trainer(accelerator="cpu", devices=3, strategy=TensorParallelStrategy(tensor_parallel_size=2), logger=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=TensorParallelStrategy(tensor_parallel_size=1), logger=False
    )
    assert trainer.strategy._sizes() == (2, 1), "2D is supported (test_fully_sharded.py trains it)"
    with pytest.raises(ConfigurationError, match="tensor_parallel_size=0 must be a positive integer"):
        TensorParallelStrategy(tensor_parallel_size=0)


def test_plan_entry_matching_nothing_and_unknown_style() -> None:
    model = BertMLM(vocab_size=50, preset="tiny", ffn_size=38)
    with pytest.raises(
        NoTargetModulesError, match=r"plan entry 'model\.bert\.encoder\.layers\.\*\.query' matches no module of BertMLM"
    ):
        resolve_plan(model, {"model.bert.encoder.layers.*.query": "colwise"})
    with pytest.raises(
        ConfigurationError, match=r"plan\['x'\]='columnwise' is not a known style; choose one of: colwise, rowwise"
    ):
        TensorParallelStrategy(plan={"x": "columnwise"})


def test_model_without_a_plan_needs_a_user_plan() -> None:
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    with pytest.raises(
        ConfigurationError,
        match=r"layers\.0\.self_attn \(TransformerEncoderLayer\) has a fused in-projection \(in_proj_weight\), which a "
        r"Megatron plan cannot shard into heads; pass TensorParallelStrategy\(plan=",
    ):
        megatron_plan(encoder, tensor_parallel_size=2)
    with pytest.raises(
        ConfigurationError,
        match=r"OwnBlock \(in blocks\) has no architecture entry, so no tensor-parallel plan; known block classes: .*"
        r"BertLayer.*register_architecture, or pass TensorParallelStrategy\(plan=",
    ):
        megatron_plan(OwnModel(), tensor_parallel_size=2, block_paths=["blocks"])  # not registered
    with pytest.raises(NoTargetModulesError, match="found no Transformer block stack in BlocklessModule"):
        megatron_plan(BlocklessModule(), tensor_parallel_size=2)
    plan = resolve_plan(encoder, {"layers.*.linear1": "colwise", "layers.*.linear2": "rowwise"})  # a user plan works
    assert sorted(plan) == ["layers.0.linear1", "layers.0.linear2", "layers.1.linear1", "layers.1.linear2"]


# -- the plans -----------------------------------------------------------------------------------
def _kinds(plan: dict[str, Any], needle: str) -> dict[str, str]:
    return {fqn.split(needle, 1)[1]: type(style).__name__ for fqn, style in plan.items() if needle in fqn}


def test_megatron_plans_of_each_family() -> None:
    shape = {"preset": "tiny", "ffn_size": 38}
    bert = megatron_plan(BertMLM(vocab_size=50, **shape), 2, vocab_parallel=True)
    assert len(bert) == 3 * 6 + 2
    assert type(bert["model.bert.embeddings.word_embeddings"]).__name__ == "RowwiseParallel"
    vit = megatron_plan(ViTClassifier(num_labels=10, **shape), 2)
    assert _kinds(vit, "layers.1.") == {"attention.q_proj": "ColwiseParallel", "attention.k_proj": "ColwiseParallel",
                                        "attention.v_proj": "ColwiseParallel", "attention.o_proj": "RowwiseParallel",
                                        "mlp.fc1": "ColwiseParallel", "mlp.fc2": "RowwiseParallel"}  # fmt: skip
    for architecture in ("marian", "bart"):
        plan = megatron_plan(Translation(vocab_size=60, architecture=architecture, **shape), 2, sequence_parallel=True)
        decoder = _kinds(plan, "decoder.layers.2.")
        assert decoder["encoder_attn.q_proj"] == decoder["encoder_attn.k_proj"] == "ColwiseParallel"
        assert decoder["encoder_attn"] == decoder["self_attn"] == "PrepareModuleInput"  # gathers the sequence once
        assert decoder["encoder_attn.out_proj"] == decoder["fc2"] == "RowwiseParallel"
        assert decoder["final_layer_norm"] == decoder["encoder_attn_layer_norm"] == "SequenceParallel"
        assert len(_kinds(plan, "encoder.layers.0.")) == 9 and len(decoder) == 15


def _described(plan: dict[str, Any]) -> list[tuple[str, type, dict[str, Any]]]:
    """A plan as comparable values (styles have no ``__eq__``): path, style class and its settings, in order."""
    return [(path, type(style), vars(style)) for path, style in plan.items()]


def test_marian_decoder_block_plan_is_the_literal_megatron_plan() -> None:
    """One decoder block, sequence-parallel: self- and cross-attention, FFN and the three norms, in this order."""
    model = Translation(vocab_size=60, architecture="marian", preset="tiny", ffn_size=38)
    plan = megatron_plan(model, 2, sequence_parallel=True)
    prefix = "model.model.decoder.layers.1."
    gather = {"input_layouts": (Shard(1),), "desired_input_layouts": (Replicate(),), "use_local_output": True}
    expected: dict[str, Any] = {}
    for attention in ("self_attn", "encoder_attn"):
        expected[attention] = PrepareModuleInput(**gather)
        expected.update({f"{attention}.{p}_proj": ColwiseParallel() for p in "qkv"})
        expected[f"{attention}.out_proj"] = RowwiseParallel(output_layouts=Shard(1))
    expected["fc1"] = ColwiseParallel(input_layouts=Shard(1))
    expected["fc2"] = RowwiseParallel(output_layouts=Shard(1))
    for norm in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"):
        expected[norm] = SequenceParallel(use_local_output=True)
    block = {path: style for path, style in plan.items() if path.startswith(prefix)}
    assert _described(block) == _described({prefix + path: style for path, style in expected.items()})


def test_registered_own_block_gets_a_megatron_plan() -> None:
    """Describing the block once is all tensor parallelism needs: the plan follows its own names."""
    with registered_own_block():
        with pytest.raises(
            ConfigurationError,
            match=r"^blocks\.0\.ff_in: FFN width \(out_features=37\) is not divisible by tensor_parallel_size=2",
        ):
            megatron_plan(OwnModel(), tensor_parallel_size=2)
        with pytest.raises(
            ConfigurationError, match=r"^blocks\.0: 4 attention heads are not divisible by tensor_parallel_size=8"
        ):
            megatron_plan(OwnModel(), tensor_parallel_size=8)
        model = OwnModel(depth=2)
        model.blocks = nn.ModuleList(OwnBlock(ffn=38) for _ in range(2))  # an FFN width that 2 divides
        plan = megatron_plan(model, tensor_parallel_size=2)
        with pytest.raises(
            ConfigurationError,
            match=r"sequence_parallel: blocks\.0 \(OwnBlock\) computes its attention in the block itself",
        ):
            megatron_plan(model, tensor_parallel_size=2, sequence_parallel=True)
    expected: dict[str, Any] = {}
    for i in range(2):
        expected.update({f"blocks.{i}.{name}": ColwiseParallel() for name in ("wq", "wk", "wv")})
        expected[f"blocks.{i}.wo"] = RowwiseParallel()
        expected[f"blocks.{i}.ff_in"] = ColwiseParallel()
        expected[f"blocks.{i}.ff_out"] = RowwiseParallel()
    assert _described(plan) == _described(expected)


def test_every_style_name_resolves() -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in STYLES])
    plan = resolve_plan(model, {str(i): name for i, name in enumerate(STYLES)})
    assert [type(style) for style in plan.values()] == [type(style) for style in STYLES.values()]


# -- clipping, sampler, composition --------------------------------------------------------------
def test_clip_grad_norm_equals_torch_on_plain_tensors() -> None:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    grads = [torch.randn_like(p) for p in params]
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    for p, c, g in zip(params, copies, grads):
        p.grad, c.grad = g.clone(), g.clone()
    ours = clip_grad_norm_(params, 0.5)
    theirs = torch.nn.utils.clip_grad_norm_(copies, 0.5)
    assert torch.allclose(ours, theirs)
    assert all(torch.allclose(p.grad, c.grad, atol=1e-7) for p, c in zip(params, copies))


def test_data_parallel_sampler_gives_tp_ranks_the_same_batches() -> None:
    shards = [
        list(DataParallelSampler(range(30), tensor_parallel_size=2, world_size=6, rank=r, seed=3)) for r in range(6)
    ]
    assert shards[0] == shards[1] and shards[2] == shards[3] and shards[4] == shards[5]
    assert sorted(shards[0] + shards[2] + shards[4]) == list(range(30))
    assert list(DataParallelSampler(range(30), tensor_parallel_size=1, world_size=1, rank=0, seed=3)) != list(range(30))
    with pytest.raises(
        ConfigurationError, match="tensor_parallel_size=4 must be a positive integer that divides world_size=6"
    ):
        DataParallelSampler(range(30), tensor_parallel_size=4, world_size=6, rank=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_contract_rows_compose_or_are_refused(case: Any) -> None:
    """Every technique of the contract suite either is declared to compose with TP or is refused by name."""
    technique = case.build()
    if technique.name in COMPOSES_WITH:
        check_strategy_support([technique])
    else:
        with pytest.raises(ConfigurationError, match=f"{technique.name} .* is not supported under tensor parallelism"):
            check_strategy_support([technique])


def test_check_composition_is_a_deprecated_name_of_check_strategy_support() -> None:
    from lightning_efficient import LayerDrop

    with (
        pytest.warns(DeprecationWarning, match="check_composition is deprecated; use .*check_strategy_support"),
        pytest.raises(ConfigurationError, match="layer_drop .* is not supported under tensor parallelism"),
    ):
        check_composition([LayerDrop(drop_rate=0.1)])


def test_declared_compositions_are_real_techniques() -> None:
    names = {
        case.build().name
        for case in CASES
        if case.id in ("layer_drop", "progressive_stacking", "pruning", *COMPOSES_WITH)
    }
    assert COMPOSES_WITH <= names and {"layer_drop", "progressive_stacking", "pruning"} <= names - COMPOSES_WITH


def test_fragment_loads_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_efficient.cli import EfficientCLI

    configs = Path(__file__).parents[1] / "configs"
    fragment = configs / "techniques" / "tensor_parallel.yaml"
    assert (
        "lightning-efficient fit -c configs/bert/small_mlm.yaml -c configs/techniques/tensor_parallel.yaml"
        in fragment.read_text()
    )
    monkeypatch.chdir(tmp_path)
    cli = EfficientCLI(args=["-c", str(configs / "vit" / "tiny_fashion.yaml"), "-c", str(fragment)], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, TensorParallelStrategy) and cli.trainer.num_devices == 2
    assert strategy._tensor_parallel_size == 2 and strategy.plan is None
    assert not strategy.vocab_parallel and not strategy.sequence_parallel
    assert len(cli.trainer.callbacks) > 2, "the fragment must keep the config's callbacks"


def test_optimizer_of_foreign_tensors_is_refused() -> None:
    from lightning_efficient.strategies.tensor_parallel import repoint_optimizers

    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ConfigurationError, match=r"SGD param_groups\[0\] holds a tensor of shape \(3,\) that is not"):
        repoint_optimizers([optimizer], model, {})
