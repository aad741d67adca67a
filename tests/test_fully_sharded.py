"""FullyShardedStrategy (FSDP2) and 2D (data x tensor) parallelism on gloo: parity, resume, techniques.

Two launches of ``tp_worker.py`` under a hard timeout (a hang fails instead of blocking): 2 processes
for FSDP2 (dp2) and the DDP runs it is compared with, 4 processes for 2D (dp2 x tp2).

What "the same" means, per loss:

- ViT's and the BERT classifier's losses are means over their examples, and the data-parallel ranks'
  batches of a step are together one process's batch of twice the size (the sampler deals a seeded permutation out rank by rank), so
  dp2 and dp2 x tp2 must match **one process** with the doubled batch.
- BERT MLM's and MT's losses are means over tokens (masked or target), whose counts differ between
  ranks, so data parallelism of any kind averages two rank means; there the reference is **DDP** on
  the same two ranks (FSDP2 on gloo has been reported to sum gradients instead, pytorch#162338: both
  comparisons would catch it).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from techniques import CASES
from test_tensor_parallel import _launch, _max_diff
from tp_worker import (
    BATCH,
    CLIPS,
    FAMILIES,
    ONE_PROCESS,
    SAVE_AT,
    TWO_D,
    parity_runs,
    reference_runs,
    replica_losses,
    train,
)

from lightning_efficient.errors import ConfigurationError
from lightning_efficient.strategies import (
    COMPOSES_WITH,
    FULLY_SHARDED_COMPOSES_WITH,
    FullyShardedStrategy,
    TensorParallelStrategy,
)

TOL = 1e-5
ROWS = [case for case in CASES if "fsdp" in case.strategies]
TECHNIQUES = [case.id for case in ROWS]
TECHNIQUES_2D = [case.id for case in CASES if "2d" in case.strategies]


@pytest.fixture(scope="module")
def fsdp(user_files: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict]:
    """(rank 0's results, rank 1's results, one-process references) of the 2-process runs."""
    out = tmp_path_factory.mktemp("fsdp")
    one_process = [run for run in reference_runs() if run.get("kind") != "ddp"]
    runs = parity_runs(out, "fsdp", {}) + [run for run in reference_runs() if run.get("kind") == "ddp"]
    runs += [{"name": "vit_fsdp_bf16", "family": "vit", "steps": 3, "kind": "fsdp", "precision": "bf16-mixed"}]
    for case in ROWS:  # the contract rows declared to compose: against DDP, and resumed from step 1
        row = {"family": case.base_family, "steps": 4, "techniques": [case.id]}
        resume = str(out / f"{case.id}_fsdp" / "step=1.ckpt")
        runs += [
            {"name": f"{case.id}_fsdp", **row, "kind": "fsdp", "save_at": 1},
            {"name": f"{case.id}_fsdp_resumed", **row, "kind": "fsdp", "resume": resume},
            {"name": f"{case.id}_ddp", **row, "kind": "ddp", "strategy": {"find_unused_parameters": True}},
        ]
    runs += [
        {
            "name": "pruning_fsdp",
            "family": "bert",
            "steps": 1,
            "kind": "fsdp",
            "techniques": ["pruning"],
            "expect_error": True,
        }
    ]
    references = _references(
        out, [*one_process, {"name": "vit_bf16", "family": "vit", "steps": 3, "batch_size": 2 * BATCH}], user_files
    )
    result = _launch({"files": user_files, "runs": runs}, out)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return ranks[0], ranks[1], references


@pytest.fixture(scope="module")
def two_d(user_files: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Each of the 4 ranks' results of the dp2 x tp2 runs."""
    out = tmp_path_factory.mktemp("two_d")
    runs = parity_runs(out, "2d", TWO_D)
    for technique in TECHNIQUES_2D:
        runs.append(
            {"name": f"{technique}_2d", "family": "bert", "steps": 4, "techniques": [technique], "strategy": TWO_D}
        )
    runs.append(
        {
            "name": "layer_drop_2d",
            "family": "bert",
            "steps": 1,
            "techniques": ["layer_drop"],
            "strategy": TWO_D,
            "expect_error": True,
        }
    )
    result = _launch({"files": user_files, "runs": runs, "devices": 4}, out, timeout=420)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(4)]


def _references(out: Path, runs: list[dict[str, Any]], files: dict[str, str]) -> dict[str, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker rank
    try:
        return {run["name"]: train(run, files, out / "ref", devices=1) for run in runs}
    finally:
        torch.set_num_threads(threads)


def _replica_mean(*ranks: dict) -> dict:
    """One data-parallel rank's results with the loss of the whole data-parallel batch (one rank per replica)."""
    return {**ranks[0], "losses": replica_losses(*ranks)}


def _assert_same(run: dict, ref: dict, what: str, tol: float = TOL, first_step: int = 1) -> None:
    steps = [s for s in sorted(ref["losses"]) if s >= first_step]
    assert sorted(run["losses"]) == steps, what
    losses = max(abs(run["losses"][s] - ref["losses"][s]) for s in steps)
    params = _max_diff(run["params"], ref["params"])
    assert losses < tol and params < tol, f"{what}: losses differ by {losses:.2e}, parameters by {params:.2e}"


# -- FSDP2 (2 processes) ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ONE_PROCESS)
def test_fsdp_matches_one_process_with_twice_the_batch(fsdp: tuple[dict, dict, dict], family: str) -> None:
    rank0, rank1, refs = fsdp
    run, ref = rank0[f"{family}_fsdp"], refs[family]
    _assert_same(_replica_mean(run, rank1[f"{family}_fsdp"]), ref, f"{family}_fsdp")
    assert _max_diff(run["first_grads"], ref["first_grads"]) < TOL, "gradients not averaged"
    assert _max_diff(rank1[f"{family}_fsdp"]["params"], run["params"]) == 0.0
    assert min(ref["grad_norms"].values()) > CLIPS[family], "clipping was not active on every step"
    assert run["world_size"] == 2 and run["batch_hash"] != rank1[f"{family}_fsdp"]["batch_hash"]
    assert set(run["placements"]) == set(ref["params"]) and set(run["placements"].values()) == {"(Shard(dim=0),)"}


@pytest.mark.parametrize("family", ["bert", "mt"])
def test_fsdp_matches_ddp_on_token_mean_losses(fsdp: tuple[dict, dict, dict], family: str) -> None:
    rank0, _, _ = fsdp
    _assert_same(rank0[f"{family}_fsdp"], rank0[f"{family}_ddp"], f"{family}_fsdp")
    assert _max_diff(rank0[f"{family}_fsdp"]["first_grads"], rank0[f"{family}_ddp"]["first_grads"]) < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_resumes_from_a_sharded_checkpoint(fsdp: tuple[dict, dict, dict], family: str) -> None:
    rank0, _, _ = fsdp
    _assert_same(rank0[f"{family}_fsdp_resumed"], rank0[f"{family}_fsdp"], family, first_step=SAVE_AT + 1)


def test_fsdp_keeps_the_mlm_decoder_tied(fsdp: tuple[dict, dict, dict]) -> None:
    tied = fsdp[0]["bert_fsdp"]["tied"]
    assert ["model.bert.embeddings.word_embeddings.weight", "model.cls.predictions.decoder.weight"] in tied


def test_fsdp_bf16_mixed_precision_stays_near_fp32(fsdp: tuple[dict, dict, dict]) -> None:
    """FSDP2's policy: bf16 compute, fp32 shards and reduction; the losses stay within bf16 rounding."""
    run, ref = _replica_mean(fsdp[0]["vit_fsdp_bf16"], fsdp[1]["vit_fsdp_bf16"]), fsdp[2]["vit_bf16"]
    assert all(math.isfinite(loss) for loss in run["losses"].values())
    assert max(abs(run["losses"][s] - ref["losses"][s]) for s in ref["losses"]) < 0.05
    assert all(p.dtype == torch.float32 for p in run["params"].values()), "the sharded parameters stay fp32"


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_declared_techniques_train_under_fsdp_as_under_ddp(fsdp: tuple[dict, dict, dict], technique: str) -> None:
    rank0, rank1, _ = fsdp
    _assert_same(rank0[f"{technique}_fsdp"], rank0[f"{technique}_ddp"], technique)
    _assert_same(rank0[f"{technique}_fsdp_resumed"], rank0[f"{technique}_fsdp"], f"{technique} resumed", first_step=2)
    assert _max_diff(rank1[f"{technique}_fsdp"]["params"], rank0[f"{technique}_fsdp"]["params"]) == 0.0


def test_undeclared_technique_is_refused_on_both_ranks(fsdp: tuple[dict, dict, dict]) -> None:
    for rank in fsdp[:2]:
        assert (
            "pruning (MagnitudePruning) is not supported under FSDP2 (FullyShardedStrategy)"
            in rank["pruning_fsdp"]["error"]
        )


# -- 2D: dp2 x tp2 (4 processes) --------------------------------------------------------------
@pytest.mark.parametrize("family", ONE_PROCESS)
def test_2d_matches_one_process(two_d: list[dict], fsdp: tuple[dict, dict, dict], family: str) -> None:
    name = f"{family}_2d"
    _assert_same(_replica_mean(two_d[0][name], two_d[2][name]), fsdp[2][family], name)
    for rank in two_d[1:]:
        assert _max_diff(rank[name]["params"], two_d[0][name]["params"]) < 1e-6
    assert two_d[0][name]["world_size"] == 4
    assert set(two_d[0][name]["placements"]) == set(fsdp[2][family]["params"]), "every parameter is a DTensor"


def test_2d_shards_the_tensor_shards_over_the_data_dimension(two_d: list[dict]) -> None:
    query = two_d[0]["vit_2d"]["placements"]["model.vit.layers.0.attention.q_proj.weight"]
    # the data dimension shards the tensor dimension's rows (FSDP2 writes it as a strided shard)
    assert query in ("(Shard(dim=0), Shard(dim=0))", "(_StridedShard(dim=0, sf=2), Shard(dim=0))"), query


@pytest.mark.parametrize("family", ["bert", "mt"])
def test_2d_matches_ddp(two_d: list[dict], fsdp: tuple[dict, dict, dict], family: str) -> None:
    """dp2 x tp2 is data parallelism over 2 replicas: DDP on 2 ranks, to float tolerance."""
    _assert_same(two_d[0][f"{family}_2d"], fsdp[0][f"{family}_ddp"], f"{family}_2d")
    ranks = [rank[f"{family}_2d"]["batch_hash"] for rank in two_d]
    assert ranks[0] == ranks[1] != ranks[2] == ranks[3], "tensor ranks share a batch, data ranks do not"


@pytest.mark.parametrize("family", FAMILIES)
def test_2d_resumes_from_a_sharded_checkpoint(two_d: list[dict], family: str) -> None:
    _assert_same(two_d[0][f"{family}_2d_resumed"], two_d[0][f"{family}_2d"], family, first_step=SAVE_AT + 1)


def test_2d_keeps_the_vocab_parallel_decoder_tied(two_d: list[dict]) -> None:
    for rank in two_d:
        assert ["model.bert.embeddings.word_embeddings.weight", "model.cls.predictions.decoder.weight"] in rank[
            "bert_2d"
        ]["tied"]


@pytest.mark.parametrize("technique", TECHNIQUES_2D)
def test_declared_techniques_train_under_2d(two_d: list[dict], fsdp: tuple[dict, dict, dict], technique: str) -> None:
    _assert_same(two_d[0][f"{technique}_2d"], fsdp[0][f"{technique}_ddp"], technique)


def test_2d_refuses_a_technique_its_tensor_dimension_does_not_support(two_d: list[dict]) -> None:
    for rank in two_d:
        assert "layer_drop (LayerDrop) is not supported under tensor parallelism" in rank["layer_drop_2d"]["error"]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_contract_rows_declare_the_strategies_they_compose_with(case: Any) -> None:
    """A row's ``strategies`` is what the strategies check at setup: every declared row is trained above."""
    name = case.build().name
    assert ("fsdp" in case.strategies) == (name in FULLY_SHARDED_COMPOSES_WITH)
    assert ("tp" in case.strategies) == (name in COMPOSES_WITH)
    assert ("2d" in case.strategies) == (name in FULLY_SHARDED_COMPOSES_WITH & COMPOSES_WITH)


# -- bad input, in this process ---------------------------------------------------------------------
def test_mesh_sizes_that_do_not_fit_the_world_are_refused_at_trainer() -> None:
    with pytest.raises(
        ConfigurationError, match=r"data_parallel_size=2 x tensor_parallel_size=2 = 4 is not the world size 2"
    ):
        pl.Trainer(
            accelerator="cpu", devices=2, strategy=TensorParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)
        )
    with pytest.raises(ConfigurationError, match=r"data_parallel_size=4 is not the world size 2"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=FullyShardedStrategy(data_parallel_size=4))
    with pytest.raises(ConfigurationError, match=r"data_parallel_size='two' must be a positive integer or 'auto'"):
        FullyShardedStrategy(data_parallel_size="two")


def test_offload_on_a_cpu_run_turns_itself_off_with_one_info_line(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """One process (FSDP2 over a single rank): CPUOffloadPolicy would pin memory for a GPU that is not there."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from lightning_efficient import ImageClassificationDataModule, ViTClassifier
    from lightning_efficient.testing import quiet_trainer

    model = ViTClassifier(num_labels=10, preset="tiny")
    trainer = quiet_trainer(
        accelerator="cpu", devices=1, strategy=FullyShardedStrategy(offload=True), max_steps=1, limit_val_batches=0,
        default_root_dir=tmp_path, enable_checkpointing=False,
    )  # fmt: skip
    environment = dict(os.environ)
    try:
        with warnings.catch_warnings(), caplog.at_level(logging.INFO):
            warnings.simplefilter("error", UserWarning)  # an info line, not a warning
            trainer.fit(model, ImageClassificationDataModule(batch_size=8))
    finally:  # the 1-process group holds MASTER_PORT: the launches of the other tests would inherit it
        torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
    lines = [record for record in caplog.records if "offload" in record.getMessage()]
    assert [r.levelno for r in lines] == [logging.INFO] and "nothing to offload to" in lines[0].getMessage()
    groups = [
        group
        for module in model.modules()
        if (state := fully_shard.state(module))
        for group in state._fsdp_param_groups
    ]
    assert groups and not any(isinstance(group.offload_policy, CPUOffloadPolicy) for group in groups)
    assert trainer.global_step == 1


def test_fragments_load_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_efficient.cli import EfficientCLI

    configs = Path(__file__).parents[1] / "configs"
    monkeypatch.chdir(tmp_path)
    for fragment, kind, devices in (
        ("fsdp", FullyShardedStrategy, 2),
        ("data_tensor_parallel", TensorParallelStrategy, 4),
    ):
        path = configs / "techniques" / f"{fragment}.yaml"
        assert (
            f"lightning-efficient fit -c configs/bert/small_mlm.yaml -c configs/techniques/{fragment}.yaml"
            in path.read_text()
        )
        cli = EfficientCLI(args=["-c", str(configs / "vit" / "tiny_fashion.yaml"), "-c", str(path)], run=False)
        assert type(cli.trainer.strategy) is kind and cli.trainer.num_devices == devices
    assert cli.trainer.strategy._data_parallel_size == cli.trainer.strategy._tensor_parallel_size == 2


def test_a_sharded_checkpoint_needs_a_sharded_strategy_or_consolidation(tmp_path: Path) -> None:
    """``predict``/``fit`` with a checkpoint folder but no sharded strategy: one line naming both ways on."""
    from lightning_efficient.checkpoint import CHECKPOINT_KEY, DISTRIBUTED_METADATA
    from lightning_efficient.cli import check_ckpt_path
    from lightning_efficient.errors import CheckpointMismatchError

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    torch.save({CHECKPOINT_KEY: {"module": "ViTClassifier"}}, folder / DISTRIBUTED_METADATA)
    model = "lightning_efficient.ViTClassifier"
    with pytest.raises(CheckpointMismatchError, match=r"is a distributed checkpoint .*consolidate_checkpoint"):
        check_ckpt_path(str(folder), model, None, "auto")
    for strategy in (
        {"class_path": "lightning_efficient.strategies.FullyShardedStrategy"},
        {"class_path": "lightning_efficient.strategies.TensorParallelStrategy", "init_args": {}},
    ):
        check_ckpt_path(str(folder), model, None, strategy)


def test_2d_checks_the_techniques_against_both_dimensions(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_efficient.technique import Technique

    class TensorOnly(Technique):
        name = "tensor_only"

    monkeypatch.setattr(TensorParallelStrategy, "composes_with", frozenset({"tensor_only"}))
    strategy = TensorParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)
    strategy._check_support([TensorOnly()], data_parallel_size=1)  # 1D: tensor parallelism's set only
    with pytest.raises(
        ConfigurationError, match=r"tensor_only \(TensorOnly\) is not supported under the data dimension"
    ):
        strategy._check_support([TensorOnly()], data_parallel_size=2)
