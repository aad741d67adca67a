"""Stacking ``-c`` fragments: every shipped pair stacks or fails naming both, merges, disagreements, the declared order."""

import itertools
import random
from pathlib import Path

import pytest

from lightning_efficient.callbacks import (
    ActivationCheckpointing,
    Distillation,
    LayerDrop,
    LRScaling,
    MagnitudePruning,
    QuantizationAwareTraining,
    TokenDropping,
)
from lightning_efficient.cli import EfficientCLI, _read_config_file
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.fragments import (
    callback_sources,
    check_strategy,
    compose_techniques,
    disagreements,
    setting_source,
)
from lightning_efficient.technique import Technique, sort_techniques, technique_order

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FRAGMENTS = sorted((CONFIGS / "techniques").glob("*.yaml"))


def compose(files: list[Path]) -> tuple[list, list[str]]:
    """What the CLI does with the ``-c`` files' callbacks and strategy, on the YAML as read (no parsing, no build)."""
    read = [(file.name, _read_config_file(str(file))) for file in files]
    sources = callback_sources(read)
    callbacks, notes = compose_techniques([dict(entry) for _, entry in sources], sources)
    techniques = [callback for callback in callbacks if callback.technique_class() is not None]
    strategy = None
    for _, config in read:
        strategy = (config.get("trainer") or {}).get("strategy", strategy)
    check_strategy(strategy, techniques, setting_source(read, "trainer.strategy"))
    return techniques, notes + disagreements(read)


def test_there_are_fragments_to_pair():
    assert len(FRAGMENTS) >= 30


@pytest.mark.parametrize("first", FRAGMENTS, ids=[f.stem for f in FRAGMENTS])
def test_every_pair_of_fragments_stacks_or_fails_naming_both(first):
    """Each pair, in both orders: one of each technique in declared order, or an error that names both files."""
    for second in FRAGMENTS:
        if second == first:
            continue
        try:
            techniques, notes = compose([first, second])
        except ConfigurationError as error:
            message = str(error)
            assert first.name in message and second.name in message, message
            assert "\n" not in message and len(message) < 400, message
            continue
        names = [t.technique_class().name for t in techniques]
        assert len(names) == len(set(names)), (first.name, second.name, names)
        classes = [t.technique_class() for t in techniques]
        assert technique_order(classes) == list(range(len(classes))), (first.name, second.name, names)
        for note in notes:  # a disagreement names both files and the winner, the later one
            assert first.name in note and second.name in note and f"{second.name}'s wins" in note, note


def test_the_large_batch_fragments_stack_into_one_lr_scaling():
    """lamb + large_batch + lr_scaling + lion: one LRScaling (they agree), one optimizer line (the later wins)."""
    files = [CONFIGS / "techniques" / f"{name}.yaml" for name in ("lamb", "large_batch", "lr_scaling", "lion")]
    techniques, notes = compose(files)
    assert [t.technique_class() for t in techniques] == [LRScaling]
    assert techniques[0].merged_from == ["lr_scaling.yaml"]
    assert techniques[0].arguments() == {
        "reference_batch_size": 32, "rule": "sqrt", "warmup_steps": 0, "batch_size": None,
    }  # fmt: skip
    lamb, lion = "lightning_efficient.optim.LAMB", "lightning_efficient.optim.Lion"
    assert notes == [f"optimizer: lamb.yaml sets {lamb}, lion.yaml sets {lion}; lion.yaml's wins (the later -c)"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


LAYER_DROP = """
trainer:
  callbacks+:
    - class_path: lightning_efficient.callbacks.LayerDrop
      init_args:
{args}
"""


def test_a_technique_given_twice_merges_and_the_later_file_wins(tmp_path):
    first = write(tmp_path / "a.yaml", LAYER_DROP.format(args="        drop_rate: 0.2\n        seed: 3"))
    second = write(tmp_path / "b.yaml", LAYER_DROP.format(args="        drop_rate: 0.4\n        schedule: linear"))
    techniques, notes = compose([first, second])
    assert len(techniques) == 1
    assert techniques[0].arguments() == {"drop_rate": 0.4, "seed": 3, "schedule": "linear"}
    assert notes == ["LayerDrop.drop_rate: a.yaml sets 0.2, b.yaml sets 0.4; b.yaml's wins (the later -c)"]


def test_the_merged_technique_is_built_once_with_the_merged_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = write(tmp_path / "a.yaml", LAYER_DROP.format(args="        drop_rate: 0.2\n        seed: 3"))
    second = write(tmp_path / "b.yaml", LAYER_DROP.format(args="        drop_rate: 0.4"))
    args = [
        "-c",
        str(CONFIGS / "bert/tiny_mlm.yaml"),
        "-c",
        str(first),
        "-c",
        str(second),
        "--data.init_args.vocab_size",
        "300",
    ]
    cli = EfficientCLI(args=args, run=False)
    (drop,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, LayerDrop)]
    assert (drop.drop_rate, drop.seed) == (0.4, 3)
    assert cli.notes == ["LayerDrop.drop_rate: a.yaml sets 0.2, b.yaml sets 0.4; b.yaml's wins (the later -c)"]
    assert Path(cli.trainer.default_root_dir).name == "bert_tiny_mlm+a+b"
    block = cli.plan().summary_block()  # the first screen of the fit says which value won
    assert f"note: {cli.notes[0]}" in block and "techniques: layer_drop (LayerDrop)" in block


def test_two_classes_claiming_one_technique_name_fail_naming_both(tmp_path):
    first = write(tmp_path / "a.yaml", LAYER_DROP.format(args="        drop_rate: 0.2"))
    second = write(
        tmp_path / "b.yaml",
        "trainer:\n  callbacks+:\n    - class_path: tests.test_fragments.OtherLayerDrop\n",
    )
    with pytest.raises(ConfigurationError, match=r"a.yaml gives .*LayerDrop and b.yaml gives .*OtherLayerDrop"):
        compose([first, second])


class OtherLayerDrop(Technique):
    """A user's technique that claims LayerDrop's name."""

    name = "layer_drop"


def test_a_conflict_names_both_fragments():
    files = [CONFIGS / "techniques" / "layer_drop.yaml", CONFIGS / "techniques" / "progressive_stacking.yaml"]
    with pytest.raises(ConfigurationError) as error:
        compose(files)
    assert "layer_drop.yaml" in str(error.value) and "progressive_stacking.yaml" in str(error.value)
    assert "cannot run with" in str(error.value)


def test_a_strategy_refuses_a_technique_before_anything_is_built():
    files = [CONFIGS / "techniques" / "pruning_gradual.yaml", CONFIGS / "techniques" / "fsdp.yaml"]
    with pytest.raises(
        ConfigurationError,
        match=r"pruning \(MagnitudePruning from pruning_gradual.yaml\) does not compose with FullyShardedStrategy from fsdp.yaml",
    ):
        compose(files)


def test_disagreements_compare_fragments_not_the_base_and_class_arguments_only_within_a_class():
    a = {"trainer": {"max_steps": 5}, "optimizer": {"class_path": "x.A", "init_args": {"lr": 1.0}}}
    b = {"trainer": {"max_steps": 5}, "optimizer": {"class_path": "x.B", "init_args": {"lr": 2.0}}}
    c = {"optimizer": {"class_path": "x.B", "init_args": {"lr": 3.0}}}
    assert disagreements([("a", a), ("b", b)]) == ["optimizer: a sets x.A, b sets x.B; b's wins (the later -c)"]
    assert disagreements([("b", b), ("c", c)]) == [
        "optimizer.init_args.lr: b sets 2.0, c sets 3.0; c's wins (the later -c)"
    ]


# -- the declared order ---------------------------------------------------------------------------
ORDERED = [Distillation, LayerDrop, ActivationCheckpointing, MagnitudePruning, QuantizationAwareTraining, TokenDropping]


def test_a_shuffled_list_is_sorted_by_the_declarations_and_otherwise_kept():
    rng = random.Random(0)
    for _ in range(50):
        shuffled = ORDERED[:]
        rng.shuffle(shuffled)
        order = [shuffled[i] for i in technique_order(shuffled)]
        for before, after in itertools.combinations(range(len(order)), 2):
            assert order[before].name not in order[after].runs_before, [c.__name__ for c in order]
        free = [c for c in shuffled if not any(c.name in o.runs_before or o.name in c.runs_before for o in ORDERED)]
        assert [c for c in order if c in free] == free  # the user's order where nothing is declared
    assert (
        MagnitudePruning.name in Distillation.runs_before
        and QuantizationAwareTraining.name in MagnitudePruning.runs_before
    )


def test_sort_techniques_moves_only_techniques():
    from lightning.pytorch.callbacks import Callback

    other = Callback()
    qat, pruning = QuantizationAwareTraining(), MagnitudePruning(final_sparsity=0.5)
    assert sort_techniques([qat, other, pruning]) == [pruning, other, qat]


def test_a_cycle_names_both():
    class First(Technique):
        name = "first"
        runs_before = ("second",)

    class Second(Technique):
        name = "second"
        runs_before = ("first",)

    with pytest.raises(
        ConfigurationError, match=r"first \(First from a.yaml\) and second \(Second from b.yaml\) each declare"
    ):
        technique_order([First, Second], ["a.yaml", "b.yaml"])


def test_held_quantization_scales_come_from_the_pruned_weights(mlm_data, tmp_path):
    """Pruning and QAT's freeze at one step: sorted, the held scales of pruned neurons are those of zero rows."""
    from lightning_efficient import BertMLM
    from lightning_efficient.testing import quiet_trainer

    model = BertMLM(vocab_size=mlm_data.vocab_size, preset="tiny", ffn_size=48, max_length=64)
    pruning = MagnitudePruning(final_sparsity=0.5, start_step=2, end_step=2, structure="neurons")
    qat = QuantizationAwareTraining(freeze_step=2)
    callbacks = sort_techniques([qat, pruning])
    assert callbacks == [pruning, qat]
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(model, mlm_data)
    name, layer = next((n, m) for n, m in model.named_modules() if n.endswith("0.intermediate.dense"))
    (scale,) = [held["scale"].flatten() for key, held in qat.frozen_scales().items() if name.endswith(key)]
    pruned = layer.weight.detach().abs().sum(dim=1) == 0
    assert 0 < int(pruned.sum()) < len(pruned)
    assert scale[pruned].max() < 1e-3 * scale[~pruned].min()  # a zero row's scale: held after the pruning
