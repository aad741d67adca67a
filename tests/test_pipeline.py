"""The pipeline's file, stages and dry run: what is checked before anything trains, and how stage configs are composed."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from lightning_efficient.errors import ConfigurationError
from lightning_efficient.pipeline.command import check_plan, run_pipeline
from lightning_efficient.pipeline.spec import Budget, expand, load_pipeline
from lightning_efficient.pipeline.stages import get_value, merge_config, plan_stages, set_value

ROOT = Path(__file__).resolve().parents[1]
MLM = str(ROOT / "configs/bert/tiny_mlm.yaml")
CLASSIFY = str(ROOT / "configs/bert/tiny_classify_prose.yaml")
PRUNING = str(ROOT / "configs/techniques/pruning_structured.yaml")
QAT = str(ROOT / "configs/techniques/qat_int8.yaml")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def pipeline(tmp_path: Path, text: str, **kwargs):
    return load_pipeline(write(tmp_path, text), root=tmp_path / "runs", **kwargs)


THREE_STAGES = f"""
    name: p
    stages:
      - name: pretrain
        config: {MLM}
        sweep: {{model.init_args.hidden_size: [32, 48]}}
        budget: {{flops: 1.0e10}}
      - name: finetune
        from: pretrain
        config: {CLASSIFY}
      - name: compress
        from: finetune
        fragments: [{PRUNING}, {QAT}]
        overrides:
          trainer.callbacks[MagnitudePruning].init_args.final_sparsity: 0.25
"""


# -- the file ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ("[{name: a, config: a.yaml}, {name: b, from: c}]", "stage 'b': from='c' names no stage"),
        ("[{name: a, from: b}, {name: b, from: a}]", "stages form a cycle through from: "),
        ("[{name: a, config: a.yaml}, {name: a, config: b.yaml}]", "two stages are called 'a'"),
        ("[{name: a, config: a.yaml, budget: {flops: 0}}]", "budget flops=0 must be a positive number"),
        ("[{name: a, config: a.yaml, budget: {flops: -1}}]", "budget flops=-1 must be a positive number"),
        ("[{name: a, config: a.yaml, budget: {seconds: x}}]", "budget seconds='x' must be a positive number"),
        ("[{name: a, config: a.yaml, budget: {step: 5}}]", "unknown key 'step'; did you mean 'steps'?"),
        ("[{name: a, config: a.yaml, fromm: b}]", "stage 'a': unknown key 'fromm'; did you mean 'from'?"),
        ("[{name: a, config: a.yaml, kind: train}]", "kind='train' is unknown; choose one of: fit, distil"),
        ("[{name: a, config: a.yaml, sweep: {model.init_args.preset: tiny}}]", "must be a non-empty list"),
        ("[{name: a/b, config: a.yaml}]", "name='a/b' must be letters"),
        ("[{name: a}]", "stage 'a': give a config"),
    ],
    ids=lambda value: value if len(value) < 30 else value[:30],
)
def test_bad_pipeline_files_fail_naming_the_problem(tmp_path, stages, message):
    with pytest.raises(ConfigurationError) as caught:
        pipeline(tmp_path, f"stages: {stages}", check_files=False)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("latency", "message"),
    [
        ("{batch_sizes: [32]}", "must be a list of positive integers holding 1"),
        ("{repeats: 0}", "latency repeats=0 must be a positive integer"),
        ("{compile: maybe}", "latency compile='maybe' must be true or false"),
        ("{batch_size: [1]}", "latency: unknown key 'batch_size'; did you mean 'batch_sizes'?"),
    ],
)
def test_bad_latency_options_fail_naming_them(tmp_path, latency, message):
    with pytest.raises(ConfigurationError) as caught:
        pipeline(tmp_path, f"latency: {latency}\nstages: [{{name: a, config: a.yaml}}]", check_files=False)
    assert message in str(caught.value)


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigurationError, match="config file 'nowhere.yaml' does not exist"):
        pipeline(tmp_path, "stages: [{name: a, config: nowhere.yaml}]")


def test_a_budget_reads_yaml_exponents_and_refuses_fractional_steps():
    assert Budget.parse("s", {"flops": "2e15", "steps": 10}) == Budget(flops=2e15, steps=10)
    with pytest.raises(ConfigurationError, match="steps=2.5 must be a whole number"):
        Budget.parse("s", {"steps": 2.5})


def test_stages_run_sources_first_and_branches_follow_every_branch(tmp_path):
    spec = pipeline(
        tmp_path,
        f"""
        stages:
          - {{name: b, from: a}}
          - {{name: a, config: {MLM}, sweep: {{model.init_args.hidden_size: [32, 48], trainer.max_steps: [3, 4]}}}}
        """,
    )
    assert [stage.name for stage in spec.stages] == ["a", "b"]
    names = [run.name for run in expand(spec)]
    assert names[:4] == [
        "a/hidden_size=32,max_steps=3",
        "a/hidden_size=32,max_steps=4",
        "a/hidden_size=48,max_steps=3",
        "a/hidden_size=48,max_steps=4",
    ]
    assert names[4:] == [name.replace("a/", "b/") for name in names[:4]]
    assert expand(spec)[5].branch == {"model.init_args.hidden_size": 32, "trainer.max_steps": 4}


def test_sweep_values_that_read_the_same_would_share_a_directory(tmp_path):
    spec = pipeline(tmp_path, f"stages: [{{name: a, config: {MLM}, sweep: {{trainer.max_steps: [5, '5']}}}}]")
    with pytest.raises(ConfigurationError, match="two sweep branches would share the directory 'a/max_steps=5'"):
        expand(spec)


# -- composing a stage's config ----------------------------------------------------------------------
def test_merge_config_matches_lightning_cli_on_base_plus_fragments(tmp_path, monkeypatch):
    """The composed file parses to what ``-c base -c fragment -c fragment`` parses to."""
    from lightning_efficient.cli import EfficientCLI

    class Parsed(Exception):
        pass

    class ParseOnly(EfficientCLI):
        check_inputs = False

        def before_instantiate_classes(self):
            raise Parsed(self.config["fit"])

    def parsed(*files):  # one run name: the composed file's run is named for one file, the other for three
        args = ["fit"] + [word for file in files for word in ("-c", str(file))] + ["--run_name", "composed"]
        with pytest.raises(Parsed) as caught:
            ParseOnly(args=args)
        config = caught.value.args[0]
        return [callback.as_dict() for callback in config.trainer.callbacks]

    monkeypatch.setattr("sys.argv", ["lightning-efficient"])
    composed = yaml.safe_load(Path(CLASSIFY).read_text())
    for fragment in (PRUNING, QAT):
        composed = merge_config(composed, yaml.safe_load(Path(fragment).read_text()))
    file = tmp_path / "composed.yaml"
    file.write_text(yaml.safe_dump(composed))
    assert parsed(file) == parsed(CLASSIFY, PRUNING, QAT)


def test_set_value_picks_list_items_by_class_and_names_what_is_there():
    config = {"trainer": {"callbacks": [{"class_path": "x.A", "init_args": {"v": 1}}, {"class_path": "x.B"}]}}
    set_value(config, "trainer.callbacks[A].init_args.v", 2)
    assert get_value(config, "trainer.callbacks[A].init_args.v") == 2
    with pytest.raises(ConfigurationError, match="no C in that list; it holds: A, B"):
        set_value(config, "trainer.callbacks[C].init_args.v", 3)


def test_plans_own_their_directories_start_from_their_source_and_carry_its_shape(tmp_path):
    spec = pipeline(tmp_path, THREE_STAGES)
    plans = {plan.name: plan for plan in plan_stages(spec)}
    assert list(plans) == [
        "pretrain/hidden_size=32", "pretrain/hidden_size=48",
        "finetune/hidden_size=32", "finetune/hidden_size=48",
        "compress/hidden_size=32", "compress/hidden_size=48",
    ]  # fmt: skip
    for plan in plans.values():
        text = yaml.safe_dump(plan.config)
        assert "runs/bert_tiny" not in text  # every path of the base config moved into the stage's directory
        assert plan.config["trainer"]["default_root_dir"] == str(plan.directory)
        assert plan.checkpoint == plan.directory / "checkpoints" / "last.ckpt"
        callbacks = [callback["class_path"] for callback in plan.config["trainer"]["callbacks"]]  # the safeguards stay
        assert (
            callbacks[0] == "lightning_efficient.RandomStates" and "lightning_efficient.NonFiniteLossGuard" in callbacks
        )
        assert plan.config["trainer"]["plugins"] == [{"class_path": "lightning_efficient.AtomicCheckpointIO"}]
    pretrain, finetune = plans["pretrain/hidden_size=48"], plans["finetune/hidden_size=48"]
    assert get_value(pretrain.config, "trainer.callbacks[FlopBudget].init_args.flops") == 1e10
    assert pretrain.config["trainer"]["max_epochs"] == -1
    assert get_value(finetune.config, "model.init_args.pretrained") == str(pretrain.checkpoint)
    assert get_value(finetune.config, "model.init_args.hidden_size") == 48  # the source's shape
    compress = plans["compress/hidden_size=48"]
    assert get_value(compress.config, "model.class_path") == "lightning_efficient.BertClassifier"  # finetune's config
    assert get_value(compress.config, "model.init_args.pretrained") == str(finetune.checkpoint)
    assert get_value(compress.config, "trainer.callbacks[MagnitudePruning].init_args.final_sparsity") == 0.25
    assert get_value(compress.config, "trainer.callbacks[QuantizationAwareTraining].class_path")


def test_a_from_whose_checkpoint_the_model_cannot_load_fails_before_anything_runs(tmp_path):
    spec = pipeline(tmp_path, f"stages: [{{name: a, config: {CLASSIFY}}}, {{name: b, from: a, config: {MLM}}}]")
    with pytest.raises(
        ConfigurationError, match="its model BertMLM cannot start from 'a', a BertClassifier checkpoint"
    ):
        plan_stages(spec)
    spec = pipeline(
        tmp_path, f"stages: [{{name: a, config: {MLM}}}, {{name: v, kind: validate, from: a}}, {{name: b, from: v}}]"
    )
    with pytest.raises(ConfigurationError, match="from='v' is a validate stage, which writes no checkpoint"):
        plan_stages(spec)


def test_a_budget_on_a_stage_that_does_not_train_is_refused(tmp_path):
    spec = pipeline(
        tmp_path, f"stages: [{{name: a, config: {MLM}}}, {{name: v, kind: validate, from: a, budget: {{steps: 3}}}}]"
    )
    with pytest.raises(ConfigurationError, match="a validate stage does not train"):
        plan_stages(spec)


# -- the dry run ---------------------------------------------------------------------------------------
def test_a_misspelled_sweep_key_fails_at_the_dry_run_naming_it(tmp_path):
    spec = pipeline(tmp_path, f"stages: [{{name: a, config: {MLM}, sweep: {{model.init_args.hiden_size: [32]}}}}]")
    with pytest.raises(ConfigurationError) as caught:
        run_pipeline(spec, dry_run=True)
    assert "stage 'a/hiden_size=32'" in str(caught.value) and "hiden_size" in str(caught.value)
    assert not (tmp_path / "runs" / "p" / "a" / "checkpoints").exists()


def test_the_dry_run_lists_stages_in_order_and_trains_nothing(tmp_path, monkeypatch):
    spec = pipeline(tmp_path, THREE_STAGES)
    lines: list[str] = []
    assert run_pipeline(spec, dry_run=True, say=lines.append) is None
    text = "\n".join(lines)
    assert text.index("pretrain/hidden_size=32") < text.index("finetune/hidden_size=32") < text.index("compress/")
    assert "budget: flops 1e+10" in text and "from: finetune/hidden_size=48" in text
    assert not list((tmp_path / "runs").rglob("*.ckpt")) and not list((tmp_path / "runs").rglob("record.json"))
    lines.clear()
    run_pipeline(spec, print_commands=True, say=lines.append)
    commands = "\n".join(lines)
    assert f"lightning-efficient fit -c {tmp_path}/runs/p/pretrain/hidden_size=32/stage.yaml" in commands
    assert "python -m lightning_efficient.pipeline.measure --config" in commands
    monkeypatch.chdir(ROOT)  # tiny.yaml's config paths are relative to the repository
    spec = load_pipeline(ROOT / "configs/pipelines/tiny.yaml", root=tmp_path)  # its latency options reach measure
    assert "--batch-sizes 1 32 --repeats 3 --no-compile" in plan_stages(spec)[2].measure_command()


def test_check_plan_parses_each_stage_like_its_own_run(tmp_path):
    spec = pipeline(tmp_path, f"stages: [{{name: a, config: {MLM}, overrides: {{trainer.max_stepz: 3}}}}]")
    (plan,) = plan_stages(spec)
    with pytest.raises(ConfigurationError, match="max_stepz"):
        check_plan(plan)


def test_invalid_yaml_is_one_line_with_its_place(tmp_path):
    with pytest.raises(ConfigurationError) as caught:
        pipeline(tmp_path, "stages: [{name: a, overrides: {x[y].z: 1}}]")
    assert "is not valid YAML" in str(caught.value) and "line 1" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_distil_stage_takes_its_source_as_the_teacher_and_keeps_its_own_shape(tmp_path):
    student = str(ROOT / "configs/bilstm/tiny_distil_prose.yaml")
    spec = pipeline(
        tmp_path,
        f"""
        stages:
          - {{name: teacher, config: {CLASSIFY}, overrides: {{model.init_args.hidden_size: 48}}}}
          - {{name: student, kind: distil, from: teacher, config: {student}}}
        """,
    )
    teacher, distilled = plan_stages(spec)
    assert get_value(distilled.config, "trainer.callbacks[Distillation].init_args.teacher") == str(teacher.checkpoint)
    assert get_value(distilled.config, "model.init_args.hidden_size") is None  # a BiLSTM: no BERT shape carried
    assert get_value(distilled.config, "model.init_args.pretrained") is None
    assert distilled.command().startswith("lightning-efficient fit -c ")


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "pipelines").glob("*.yaml")), ids=lambda path: path.stem)
def test_every_shipped_pipeline_has_its_command_in_its_header_and_every_stage_parses(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    header = path.read_text().split("\nname:")[0]
    assert f"lightning-efficient pipeline -c configs/pipelines/{path.name}" in header
    assert "minutes" in header or "hours" in header  # the expected time on 2 CPU cores
    spec = load_pipeline(path, root=tmp_path)
    assert spec.name == path.stem
    for plan in plan_stages(spec):
        check_plan(plan)


def test_the_report_of_the_stage_before_is_written_while_a_stage_runs_even_when_it_fails(tmp_path):
    from lightning_efficient.pipeline.command import _run

    marker = tmp_path / "started"
    child = f"import pathlib, sys; pathlib.Path({str(marker)!r}).touch(); sys.exit(3)"
    written: list[bool] = []
    with pytest.raises(ConfigurationError, match=r"stage 'x' failed \(exit 3\)"):
        _run([sys.executable, "-c", child], "stage 'x'", meanwhile=lambda: written.append(True))
    assert written == [True] and marker.is_file()  # both ran: the report before the failure is on disk

    def broken() -> None:
        raise OSError("disk full")

    survivor = tmp_path / "survivor"
    child = f"import pathlib, time; time.sleep(2); pathlib.Path({str(survivor)!r}).touch()"
    with pytest.raises(OSError, match="disk full"):
        _run([sys.executable, "-c", child], "stage 'y'", meanwhile=broken)
    time.sleep(3)
    assert not survivor.exists()  # the stage's process was killed with the pipeline
