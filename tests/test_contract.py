"""The technique contract suite: every row of ``techniques.CASES`` must pass all of these.

See ``tests/techniques.py`` for what a row declares and how a technique issue registers one.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from techniques import CASES, FAMILIES, TechniqueCase, common_family, tiny_family

from lightning_efficient import BertMLM, ConfigurationError, Technique, ViTClassifier
from lightning_efficient.technique import check_composition, check_plain_state
from lightning_efficient.testing import quiet_trainer

ROWS = {case.id: case for case in CASES}
DDP_TIMEOUT_S = 300  # for all DDP rows together (one 2-process run)
STEPS_PER_EPOCH = 4
#: The fixed pair set that trains and resumes: every row with each of these (and with bf16-mixed).
FIXED_PAIR_PARTNERS = ("layer_drop", "pruning")


class Recorder(Callback):
    """Records each step's loss and, at the end of fit, everything that must survive a resume."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.final: dict[str, Any] = {}
        self.applied: set[bool] = set()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}  # techniques applied

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.applied |= {cb.is_applied for cb in trainer.callbacks if isinstance(cb, Technique)}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.metric_names = set(trainer.callback_metrics)
        self.final = {
            "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
            "scheduler": copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict()),
            "techniques": {
                cb.name: copy.deepcopy(cb.state_dict()) for cb in trainer.callbacks if isinstance(cb, Technique)
            },
            "rng": torch.get_rng_state(),
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
        }


def fit(
    cases: list[TechniqueCase],
    family: str,
    files: dict[str, str],
    root: Path,
    steps: int,
    ckpt_path: str | None = None,
    save_every_step: bool = False,
    seed: int = 0,
    **trainer_kwargs: Any,
) -> tuple[Recorder, list[Technique]]:
    """Train the tiny ``family`` model with the rows' techniques; return the recorder and them."""
    pl.seed_everything(seed, verbose=False)
    model, dm = tiny_family(family, files)
    techniques = [case.build() for case in cases]
    recorder = Recorder()
    callbacks: list[Callback] = [*techniques, recorder]
    if save_every_step:
        callbacks.append(ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=1, save_top_k=-1))
    trainer = quiet_trainer(
        max_steps=steps,
        limit_train_batches=STEPS_PER_EPOCH,
        limit_val_batches=1,
        enable_checkpointing=save_every_step,
        default_root_dir=root,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return recorder, techniques


def assert_same(actual: Any, expected: Any, where: str) -> None:
    """Exact equality of nested states (tensors bit for bit)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual, expected), f"{where} differs"
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), f"{where}: keys {sorted(map(str, actual))} != {sorted(map(str, expected))}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length differs"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def check_resume(
    cases: list[TechniqueCase],
    family: str,
    files: dict[str, str],
    tmp_path: Path,
    steps: int,
    interrupt_at: tuple[int, ...],
    **trainer_kwargs: Any,
) -> tuple[Recorder, list[Technique]]:
    """Interrupt at each step of ``interrupt_at``, resume, and compare with the uninterrupted run (returned)."""
    full, techniques = fit(cases, family, files, tmp_path / "full", steps, save_every_step=True, **trainer_kwargs)
    for k in interrupt_at:
        checkpoint = tmp_path / "full" / f"step={k}.ckpt"
        state = torch.load(checkpoint, weights_only=True)  # the whole checkpoint is weights_only loadable
        for case in cases:  # (Lightning leaves out a callback whose state is empty)
            check_plain_state(state["callbacks"].get(f"lightning_efficient.{case.build().name}", {}), case.id)
        with warnings.catch_warnings():  # a checkpoint written during training resumes exactly: no warning
            warnings.filterwarnings("error", message=".*never trained on.*")
            resumed, _ = fit(
                cases,
                family,
                files,
                tmp_path / f"resumed_{k}",
                steps,
                ckpt_path=str(checkpoint),
                seed=1234,
                **trainer_kwargs,
            )
        where = f"resumed after step {k}"
        assert {s: v for s, v in resumed.losses.items()} == {s: v for s, v in full.losses.items() if s > k}, where
        assert_same(resumed.final, full.final, where)
    return full, techniques


def conflict(a: Technique, b: Technique) -> bool:
    """Whether ``a`` and ``b`` declare that they cannot run together."""
    return a.name in b.conflicts_with or b.name in a.conflicts_with


def in_order(first: TechniqueCase, second: TechniqueCase) -> list[TechniqueCase]:
    """The two rows in an order their ``runs_before`` declarations accept."""
    return [second, first] if first.build().name in second.build().runs_before else [first, second]


# -- the table ---------------------------------------------------------------------------------
def exported_techniques() -> dict[str, type[Technique]]:
    """Every ``Technique`` subclass the package exports, by its public path (walks ``__all__``)."""
    import lightning_efficient
    import lightning_efficient.callbacks
    import lightning_efficient.strategies

    found = {}
    for module in (lightning_efficient, lightning_efficient.callbacks, lightning_efficient.strategies):
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, type) and issubclass(value, Technique) and value is not Technique:
                found[f"{module.__name__}.{name}"] = value
    return found


def test_every_exported_technique_has_a_row() -> None:
    exported = exported_techniques()
    assert {"lightning_efficient.LayerDrop", "lightning_efficient.callbacks.MagnitudePruning"} <= set(exported)
    covered = {type(case.build()) for case in CASES}
    missing = sorted({f"{cls.__name__} ({path})" for path, cls in exported.items() if cls not in covered})
    assert not missing, (
        f"exported techniques with no contract row: {', '.join(missing)}; add a TechniqueCase row for each "
        "to CASES in tests/techniques.py"
    )


def test_rows_have_unique_ids_and_a_base_family() -> None:
    """The pairwise, precision, copy and DDP tests run on the tiny BERT, or on the tiny ViT for image-only rows."""
    assert len(ROWS) == len(CASES), "two rows share an id"
    assert all(case.base_family in ("bert", "vit") and case.resume_family in case.families for case in CASES)
    assert all(partner in ROWS for partner in FIXED_PAIR_PARTNERS)
    assert all(set(ROWS[partner].families) == set(FAMILIES) for partner in FIXED_PAIR_PARTNERS)


# -- per row -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fits_every_family(case: TechniqueCase, user_files: dict[str, str], tmp_path: Path) -> None:
    for family in case.families:
        recorder, (technique,) = fit([case], family, user_files, tmp_path / family, steps=3)
        assert len(recorder.losses) == 3 and all(torch.isfinite(torch.tensor(list(recorder.losses.values())))), family
        assert recorder.applied == {True}, f"{family}: the surgery was not in place during training"
        foreign = {
            m for m in recorder.metric_names if not m.startswith(("train/", "val/", "test/", f"{technique.name}/"))
        }
        assert not foreign, f"{family}: metrics not named <technique>/<metric>: {sorted(foreign)}"
        assert not technique.is_applied or technique.keep_after_fit, f"{family}: surgery not undone at teardown"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_resume_equals_uninterrupted_run(case: TechniqueCase, user_files: dict[str, str], tmp_path: Path) -> None:
    assert any(k % STEPS_PER_EPOCH for k in case.interrupt_at), "interrupt at least once mid-epoch"
    check_resume([case], case.resume_family, user_files, tmp_path, case.steps, case.interrupt_at)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_copies_and_pickles(case: TechniqueCase, user_files: dict[str, str], tmp_path: Path) -> None:
    technique = case.build()
    for clone in (copy.deepcopy(technique), pickle.loads(pickle.dumps(technique))):
        assert type(clone) is type(technique)
        assert_same(clone.state_dict(), technique.state_dict(), "fresh copy")
    _, (trained,) = fit([case], case.base_family, user_files, tmp_path, steps=2)
    for clone in (copy.deepcopy(trained), pickle.loads(pickle.dumps(trained))):
        assert_same(clone.state_dict(), trained.state_dict(), "copy after fit")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_declares_its_hooks_and_plain_state(case: TechniqueCase) -> None:
    technique = case.build()
    assert technique.name != Technique.name and technique.name.isidentifier()
    for hook in technique.used_hooks():
        assert getattr(type(technique), hook) is not getattr(Callback, hook), f"{hook} is declared but not implemented"
    check_plain_state(technique.state_dict(), case.id)


@pytest.mark.parametrize("case", [c for c in CASES if c.unsupported is not None], ids=lambda c: c.id)
def test_refuses_unsupported_model(case: TechniqueCase, tmp_path: Path) -> None:
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path, callbacks=[case.build()])
    model = case.unsupported()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(case.expected_error) as error:
        trainer.fit(model)
    assert type(model).__name__ in str(error.value)
    assert trainer.global_step == 0 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


CONFIGS = {"bert": "bert/tiny_mlm.yaml", "mt": "mt/tiny_en_fr.yaml", "vit": "vit/tiny_fashion.yaml"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_instantiates_from_yaml_through_the_cli(
    case: TechniqueCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row's fragment appends the technique to a config's callbacks (``callbacks+:``)."""
    from lightning_efficient.cli import EfficientCLI

    fragment = tmp_path / "technique.yaml"
    fragment.write_text(case.yaml)
    monkeypatch.chdir(tmp_path)  # the config's relative run paths land in tmp_path
    family = "vit" if "vit" in case.families else case.families[0]  # ViT needs no tokenizer: fastest
    config = Path(__file__).parents[1] / "configs" / CONFIGS[family]
    cli = EfficientCLI(args=["-c", str(config), "-c", str(fragment)], run=False)
    techniques = [cb for cb in cli.trainer.callbacks if isinstance(cb, Technique)]
    assert [type(t) for t in techniques] == [type(case.build())]
    assert len(cli.trainer.callbacks) > 1, "the fragment must append to the config's callbacks, not replace them"


# -- pairs -------------------------------------------------------------------------------------
# Pairs are tested on a family both rows run on; a bert-only row and an image-only row never share a model.
ALL_PAIRS = [pair for pair in itertools.combinations(CASES, 2) if common_family(*pair) is not None]
FIXED_PAIRS = [pair for pair in ALL_PAIRS if {pair[0].id, pair[1].id} & set(FIXED_PAIR_PARTNERS)]


def pair_id(pair: tuple[TechniqueCase, TechniqueCase]) -> str:
    return f"{pair[0].id}+{pair[1].id}"


@pytest.mark.parametrize("pair", FIXED_PAIRS, ids=pair_id)
def test_fixed_pairs_compose_and_resume(
    pair: tuple[TechniqueCase, TechniqueCase], user_files: dict[str, str], tmp_path: Path
) -> None:
    """Every row with each of ``FIXED_PAIR_PARTNERS`` trains and resumes exactly (or is refused clearly)."""
    a, b = (case.build() for case in pair)
    family = common_family(*pair)
    if conflict(a, b):
        with pytest.raises(ConfigurationError, match=f"{a.name}|{b.name}") as error:
            fit(list(pair), family, user_files, tmp_path, steps=1)
        assert a.name in str(error.value) and b.name in str(error.value)
        return
    check_resume(in_order(*pair), family, user_files, tmp_path, steps=6, interrupt_at=(3,))


def tiny_bert_batch() -> tuple[BertMLM, dict[str, torch.Tensor]]:
    """A tiny BERT (odd vocabulary) and a masked-LM batch of 2 x 11 tokens with padding, no data module."""
    torch.manual_seed(0)
    model = BertMLM(vocab_size=97, preset="tiny", max_length=33)
    input_ids = torch.randint(5, 97, (2, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    labels = torch.full_like(input_ids, -100)
    labels[0, [2, 5, 7]] = input_ids[0, [2, 5, 7]]
    labels[1, [1, 4]] = input_ids[1, [1, 4]]
    return model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tiny_vit_batch() -> tuple[ViTClassifier, dict[str, torch.Tensor]]:
    """A tiny ViT (28x28, patches of 4) and a batch of 3 images with labels, no data module."""
    torch.manual_seed(0)
    model = ViTClassifier(num_labels=7, preset="tiny")
    return model, {"pixel_values": torch.randn(3, 1, 28, 28), "labels": torch.tensor([0, 3, 6])}


def logits_and_targets(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The training path's logits and their targets: BERT's head on the masked positions, or ViT's classes."""
    if isinstance(model, BertMLM):
        return model.masked_logits(**batch)
    return model(batch["pixel_values"]), batch["labels"]


def structure(model: torch.nn.Module) -> list[tuple[str, str, int, int, bool]]:
    """Each module's name, class, forward hook and pre-hook counts, and whether its ``forward`` is wrapped."""
    return [
        (name, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in vars(m))
        for name, m in model.named_modules()
    ]


@pytest.mark.parametrize("pair", ALL_PAIRS, ids=pair_id)
def test_every_pair_composes(pair: tuple[TechniqueCase, TechniqueCase]) -> None:
    """Every pair of rows passes ``check_composition`` (or is refused clearly), and both surgeries apply and undo.

    No training: both techniques are attached to a tiny BERT, a forward and backward pass runs,
    and detaching them (in reverse order) restores the model's modules, hooks, parameters, buffers
    and outputs.
    """
    a, b = (case.build() for case in pair)
    if conflict(a, b):
        for ordered in ([a, b], [b, a]):
            with pytest.raises(ConfigurationError) as error:
                check_composition(ordered)
            assert a.name in str(error.value) and b.name in str(error.value)
        return
    first, second = (case.build() for case in in_order(*pair))
    if first.name in second.runs_before or second.name in first.runs_before:
        with pytest.raises(ConfigurationError, match="must run before"):
            check_composition([second, first])
    check_composition([first, second])

    model, batch = tiny_bert_batch() if common_family(*pair) == "bert" else tiny_vit_batch()
    reference, targets = logits_and_targets(model.eval(), batch)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    plain = structure(model)
    first.attach(model)
    second.attach(model)
    assert first.is_applied and second.is_applied
    logits, _ = logits_and_targets(model.train(), batch)
    assert logits.shape == reference.shape and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits.float(), targets).backward()
    second.detach(model)
    first.detach(model)
    assert not first.is_applied and not second.is_applied
    assert structure(model) == plain, "hooks, wrappers or modules left after detaching both"
    assert_same(model.state_dict(), before, "model after detaching both")
    assert torch.equal(logits_and_targets(model.eval(), batch)[0], reference), "outputs differ after detaching both"


# -- distributed -------------------------------------------------------------------------------
DDP_CASES = [c for c in CASES if c.build().distributed_safe]


@pytest.fixture(scope="module")
def ddp_runs(user_files: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """One 2-process gloo run of every DDP row in turn, under a hard timeout: (output folder, exit code, log).

    One run for all rows: a run of its own costs each row ~8 s of start-up (two Python processes
    importing torch and Lightning).
    """
    out = tmp_path_factory.mktemp("ddp")
    worker = Path(__file__).parent / "ddp_worker.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(worker.parent), os.environ.get("PYTHONPATH", "")])}
    ids = ",".join(case.id for case in DDP_CASES)
    try:
        result = subprocess.run(
            [sys.executable, str(worker), ids, json.dumps(user_files), str(out)],
            check=False, env=env, capture_output=True, text=True, timeout=DDP_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired as timeout:
        return out, -1, f"the DDP runs hung for {DDP_TIMEOUT_S} s:\n{timeout.stderr}"
    return out, result.returncode, result.stderr


@pytest.mark.parametrize("case", DDP_CASES, ids=lambda c: c.id)
def test_ddp_two_processes(case: TechniqueCase, ddp_runs: tuple[Path, int, str]) -> None:
    """Two gloo processes train with the technique: same decisions on both ranks."""
    out, returncode, log = ddp_runs
    paths = [out / case.id / f"rank{r}.pt" for r in (0, 1)]
    if not all(path.exists() for path in paths):
        pytest.fail(f"the DDP worker (exit code {returncode}) stopped before {case.id} finished:\n{log[-3000:]}")
    ranks = [torch.load(path, weights_only=True) for path in paths]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3
    assert_same(ranks[1]["technique"], ranks[0]["technique"], "technique state across ranks")
    assert_same(ranks[1]["weights"], ranks[0]["weights"], "weights across ranks")
    assert ranks[0]["batch_hash"] != ranks[1]["batch_hash"], "each rank must see its own shard"


def test_ddp_worker_exits_cleanly(ddp_runs: tuple[Path, int, str]) -> None:
    _, returncode, log = ddp_runs
    assert returncode == 0, log[-3000:]


# -- mixed precision ---------------------------------------------------------------------------
def _floats(state: Any, where: str) -> list[tuple[str, torch.Tensor]]:
    """Every floating-point tensor in a nested state, with its place."""
    if isinstance(state, torch.Tensor):
        return [(where, state)] if state.is_floating_point() else []
    if isinstance(state, dict):
        return [item for key, value in state.items() for item in _floats(value, f"{where}[{key!r}]")]
    if isinstance(state, (list, tuple)):
        return [item for i, value in enumerate(state) for item in _floats(value, f"{where}[{i}]")]
    return [(where, torch.tensor(state))] if isinstance(state, float) else []


def _assert_finite(recorder: Recorder, technique: Technique, steps: int) -> None:
    assert len(recorder.losses) == steps and recorder.applied == {True}
    assert all(torch.isfinite(torch.tensor(list(recorder.losses.values())))), recorder.losses
    state = {"technique": recorder.final["techniques"].get(technique.name, {}), "weights": recorder.final["weights"]}
    bad = [where for where, tensor in _floats(state, "") if not torch.isfinite(tensor).all()]
    assert not bad, f"non-finite values: {bad[:5]}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bf16_mixed_resumes_and_stays_finite(case: TechniqueCase, user_files: dict[str, str], tmp_path: Path) -> None:
    """Lightning's bf16 autocast (``configs/techniques/bf16_mixed.yaml``) with each technique on tiny BERT.

    bf16 is the third partner of the fixed pair set: 6 steps, interrupted after step 3 and resumed
    exactly, with finite losses, weights and technique state.
    """
    full, (technique,) = check_resume(
        [case], case.base_family, user_files, tmp_path, steps=6, interrupt_at=(3,), precision="bf16-mixed"
    )
    _assert_finite(full, technique, steps=6)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fp16_overflow_steps_are_skipped_cleanly(
    case: TechniqueCase, user_files: dict[str, str], tmp_path: Path
) -> None:
    """``16-mixed`` as on a GPU (fp16 autocast + loss scaling), emulated on the CPU with Lightning's plugin.

    The loss scale starts at 2^40, so the first step's fp16 gradients overflow: the scaler skips
    that optimizer step and divides the scale by 2^16, until steps go through. Techniques must come
    out finite, and the run must have made real steps.
    """
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-16)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    recorder, (technique,) = fit([case], case.base_family, user_files, tmp_path, steps=4, plugins=[plugin])
    _assert_finite(recorder, technique, steps=4)
    assert scaler.get_scale() < 2.0**40, "no overflow step: the test did not exercise skipping"
    final, initial = recorder.final["weights"], recorder.start  # the weights as training started (surgery applied)
    assert any(v.is_floating_point() and not torch.equal(v, initial[k]) for k, v in final.items()), "every step skipped"
