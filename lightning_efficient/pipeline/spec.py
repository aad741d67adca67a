"""A pipeline's YAML: its stages, their inputs, sweeps and budgets, checked before anything runs.

A pipeline file::

    name: tiny                          # runs/<name>/ (default: the file's stem)
    metric: val/accuracy                # the report's accuracy axis
    mode: max                           # max: higher is better
    curves: [pretrain]                  # the stages whose validation curves report_curves.png plots
    latency: {batch_sizes: [1, 32], repeats: 10, threads: 2, compile: true}   # how measured models are timed
    stages:
      - name: pretrain
        config: configs/bert/tiny_mlm.yaml
        sweep: {model.init_args.preset: [tiny, small]}    # one branch per value
        budget: {flops: 2.0e12}         # or {seconds: 600} or {steps: 500}
      - name: finetune
        from: pretrain                  # starts from each pretrain branch's last checkpoint
        config: configs/bert/tiny_classify_prose.yaml
        overrides: {trainer.max_epochs: 1}
      - name: prune
        from: finetune                  # config defaults to finetune's
        fragments: [configs/techniques/pruning_structured.yaml]
        sweep: {trainer.callbacks[MagnitudePruning].init_args.final_sparsity: [0.25, 0.5]}

Keys are dotted paths into the run's config; ``callbacks[ClassName]`` picks the callback of that
class in a list. A ``sweep`` maps keys to lists of values (every combination is a branch) and may
sweep ``fragments`` (a list of fragment lists). A stage with ``from:`` runs once per branch of
the stage it starts from, and takes that branch's model shape (``preset`` and the size
arguments) unless it sets them itself.

Everything here is checked by :func:`load_pipeline` and :func:`expand`, before any stage starts:
unknown keys, a ``from:`` that names no stage, a cycle, two stages with the same name or output
directory, budgets that are not positive, missing config files.

Examples:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "p.yaml"
    >>> _ = path.write_text("stages: [{name: a, config: a.yaml}, {name: b, from: c}]")
    >>> load_pipeline(path, check_files=False)
    Traceback (most recent call last):
    ...
    lightning_efficient.errors.ConfigurationError: stage 'b': from='c' names no stage; stages: a, b
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_efficient.errors import ConfigurationError, did_you_mean

__all__ = [
    "BUDGET_KEYS",
    "LATENCY_KEYS",
    "PIPELINE_KEYS",
    "SHAPE_KEYS",
    "STAGE_KEYS",
    "Budget",
    "PipelineSpec",
    "StageRun",
    "StageSpec",
    "expand",
    "load_pipeline",
]

#: The keys of a pipeline file.
PIPELINE_KEYS = ("name", "root", "metric", "mode", "curves", "latency", "stages")
#: The keys of ``latency:`` (how measured models are timed; see :mod:`~lightning_efficient.pipeline.measure`).
LATENCY_KEYS = ("batch_sizes", "repeats", "threads", "compile")
#: The keys of a stage.
STAGE_KEYS = ("name", "kind", "from", "config", "fragments", "overrides", "sweep", "budget", "measure")
#: The keys of a budget: counted model FLOPs, wall-clock seconds, optimizer steps.
BUDGET_KEYS = ("flops", "seconds", "steps")
#: The model arguments a stage takes from the branch it starts from (the checkpoint's shape).
SHAPE_KEYS = tuple(
    f"model.init_args.{name}" for name in ("preset", "hidden_size", "num_layers", "num_heads", "ffn_size")
)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _check_keys(where: str, given: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in given:
        if key not in allowed:
            raise ConfigurationError(
                f"{where}: unknown key {key!r}{did_you_mean(str(key), allowed)}; keys: {', '.join(allowed)}"
            )


@dataclass(frozen=True)
class Budget:
    """What stops a fit stage: counted model FLOPs, wall-clock seconds and/or optimizer steps (None: no limit)."""

    flops: float | None = None
    seconds: float | None = None
    steps: int | None = None

    @classmethod
    def parse(cls, where: str, value: Any) -> Budget | None:
        """A budget from a stage's ``budget:`` mapping (None stays None).

        Examples:
            >>> Budget.parse("stage 'a'", {"flops": 2e12})
            Budget(flops=2000000000000.0, seconds=None, steps=None)
            >>> Budget.parse("stage 'a'", {"flops": 0})
            Traceback (most recent call last):
            ...
            lightning_efficient.errors.ConfigurationError: stage 'a': budget flops=0 must be a positive number
        """
        if value is None:
            return None
        if not isinstance(value, Mapping) or not value:
            raise ConfigurationError(f"{where}: budget={value!r} must be a mapping of {', '.join(BUDGET_KEYS)}")
        _check_keys(f"{where} budget", value, BUDGET_KEYS)
        for key, number in value.items():
            if isinstance(number, str):  # YAML reads 2e15 (no dot) as a string
                try:
                    number = float(number)
                except ValueError:
                    pass
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 < number < math.inf:
                raise ConfigurationError(f"{where}: budget {key}={value[key]!r} must be a positive number")
            if key == "steps" and int(number) != number:
                raise ConfigurationError(f"{where}: budget steps={value[key]!r} must be a whole number")
        numbers = {key: float(value[key]) for key in value}
        return cls(
            flops=numbers.get("flops"),
            seconds=numbers.get("seconds"),
            steps=int(numbers["steps"]) if "steps" in numbers else None,
        )


@dataclass(frozen=True)
class StageSpec:
    """One stage of a pipeline file, checked (see the module doc for the keys)."""

    name: str
    kind: str = "fit"
    source: str | None = None
    config: str | None = None
    fragments: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    budget: Budget | None = None
    measure: bool | None = None


@dataclass(frozen=True)
class PipelineSpec:
    """A checked pipeline file: stages in run order (every ``from:`` before the stage that uses it)."""

    name: str
    path: Path
    root: Path
    metric: str
    mode: str
    stages: tuple[StageSpec, ...]
    curves: tuple[str, ...] = ()
    latency: dict[str, Any] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        """``<root>/<name>``: where every stage's directory and the report go."""
        return self.root / self.name

    def stage(self, name: str) -> StageSpec:
        """The stage called ``name``."""
        return next(stage for stage in self.stages if stage.name == name)


def _string_list(where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigurationError(f"{where} must be a list of file paths, not {value!r}")
    return tuple(value)


def _stage(index: int, raw: Any, kinds: Sequence[str]) -> StageSpec:
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"stage {index + 1} must be a mapping with a name, not {raw!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(f"stage {index + 1}: name={name!r} must be letters, digits, '_', '-' or '.'")
    where = f"stage {name!r}"
    _check_keys(where, raw, STAGE_KEYS)
    kind = raw.get("kind", "fit")
    if kind not in kinds:
        raise ConfigurationError(f"{where}: kind={kind!r} is unknown; choose one of: {', '.join(kinds)}")
    source = raw.get("from")
    if source is not None and not isinstance(source, str):
        raise ConfigurationError(f"{where}: from={source!r} must be a stage name")
    config = raw.get("config")
    if config is not None and not isinstance(config, str):
        raise ConfigurationError(f"{where}: config={config!r} must be a file path")
    if config is None and source is None:
        raise ConfigurationError(f"{where}: give a config (a run's YAML), or from: a stage whose config it takes")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ConfigurationError(f"{where}: overrides={overrides!r} must be a mapping of config keys to values")
    sweep = raw.get("sweep") or {}
    if not isinstance(sweep, Mapping):
        raise ConfigurationError(f"{where}: sweep={sweep!r} must be a mapping of config keys to lists of values")
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ConfigurationError(f"{where}: sweep {key}={values!r} must be a non-empty list of values")
        if key == "fragments":
            for choice in values:
                _string_list(f"{where}: each sweep choice of fragments", choice)
    measure = raw.get("measure")
    if measure is not None and not isinstance(measure, bool):
        raise ConfigurationError(f"{where}: measure={measure!r} must be true or false")
    return StageSpec(
        name=name,
        kind=kind,
        source=source,
        config=config,
        fragments=_string_list(f"{where}: fragments", raw.get("fragments")),
        overrides=dict(overrides),
        sweep={str(key): list(values) for key, values in sweep.items()},
        budget=Budget.parse(where, raw.get("budget")),
        measure=measure,
    )


def _in_run_order(stages: list[StageSpec]) -> tuple[StageSpec, ...]:
    """The stages with every ``from:`` before its user (file order otherwise); a cycle is an error."""
    by_name = {stage.name: stage for stage in stages}
    for stage in stages:
        if stage.source is not None and stage.source not in by_name:
            raise ConfigurationError(
                f"stage {stage.name!r}: from={stage.source!r} names no stage{did_you_mean(stage.source, list(by_name))}"
                f"; stages: {', '.join(by_name)}"
            )
    ordered: list[StageSpec] = []
    for stage in stages:
        chain, current = [], stage
        while current is not None and current not in ordered:
            if current in chain:
                cycle = [s.name for s in chain[chain.index(current) :]] + [current.name]
                raise ConfigurationError(f"stages form a cycle through from: {' -> '.join(reversed(cycle))}")
            chain.append(current)
            current = by_name.get(current.source) if current.source else None
        ordered.extend(reversed([s for s in chain if s not in ordered]))
    return tuple(ordered)


def load_pipeline(
    path: str | Path, kinds: Sequence[str] | None = None, check_files: bool = True, root: str | Path | None = None
) -> PipelineSpec:
    """Read and check a pipeline file (the module doc lists the keys).

    Args:
        path: The pipeline YAML.
        kinds: The stage kinds allowed (default: those of :data:`~lightning_efficient.pipeline.stages.STAGE_KINDS`).
        check_files: Whether every ``config`` and fragment must exist.
        root: Overrides the file's ``root`` (default ``runs``).

    Raises:
        ConfigurationError: The file is missing or malformed; see the module doc for what is checked.
    """
    if kinds is None:
        from lightning_efficient.pipeline.stages import STAGE_KINDS

        kinds = tuple(STAGE_KINDS)
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"pipeline file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigurationError(
            f"pipeline file {str(path)!r} is not valid YAML{where}: {problem} (quote a key with [ ] in a {{...}} mapping)"
        ) from None
    if not isinstance(raw, Mapping) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise ConfigurationError(f"pipeline file {str(path)!r} must be a mapping with a non-empty list of stages")
    _check_keys(f"pipeline {str(path)!r}", raw, PIPELINE_KEYS)
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(f"pipeline name={name!r} must be letters, digits, '_', '-' or '.'")
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise ConfigurationError(f"mode={mode!r} is unknown; choose one of: max, min")
    metric = raw.get("metric", "val/accuracy")
    if not isinstance(metric, str) or not metric:
        raise ConfigurationError(f"metric={metric!r} must be a metric name, e.g. 'val/accuracy'")
    stages = [_stage(index, item, kinds) for index, item in enumerate(raw["stages"])]
    seen: set[str] = set()
    for stage in stages:
        if stage.name in seen:
            raise ConfigurationError(f"two stages are called {stage.name!r}; each stage needs its own name")
        seen.add(stage.name)
    curves = _string_list("curves", raw.get("curves"))
    for stage_name in curves:
        if stage_name not in seen:
            raise ConfigurationError(
                f"curves names stage {stage_name!r}, which is not a stage; stages: {', '.join(seen)}"
            )
    latency = raw.get("latency") or {}
    if not isinstance(latency, Mapping):
        raise ConfigurationError(f"latency={latency!r} must be a mapping of {', '.join(LATENCY_KEYS)}")
    _check_keys("latency", latency, LATENCY_KEYS)
    sizes = latency.get("batch_sizes", [1])
    if not isinstance(sizes, list) or 1 not in sizes or not all(isinstance(n, int) and n > 0 for n in sizes):
        raise ConfigurationError(
            f"latency batch_sizes={sizes!r} must be a list of positive integers holding 1 (the report's latency axis)"
        )
    for key in ("repeats", "threads"):
        value = latency.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"latency {key}={value!r} must be a positive integer")
    if not isinstance(latency.get("compile", True), bool):
        raise ConfigurationError(f"latency compile={latency['compile']!r} must be true or false")
    if check_files:
        for stage in stages:
            choices = [file for choice in stage.sweep.get("fragments", []) for file in _string_list("", choice)]
            for file in [stage.config, *stage.fragments, *choices]:
                if file is not None and not Path(file).is_file():
                    raise ConfigurationError(f"stage {stage.name!r}: config file {file!r} does not exist")
    return PipelineSpec(
        name=name,
        path=path,
        root=Path(root if root is not None else raw.get("root", "runs")),
        metric=metric,
        mode=mode,
        stages=_in_run_order(stages),
        curves=curves,
        latency=dict(latency),
    )


# -- branches ---------------------------------------------------------------------------------------
def _short_key(key: str) -> str:
    """``trainer.callbacks[MagnitudePruning].init_args.final_sparsity`` -> ``final_sparsity``."""
    return re.sub(r"\[.*?\]", "", key).rsplit(".", 1)[-1]


def _label_part(key: str, value: Any) -> str:
    if key == "fragments":
        return "+".join(Path(file).stem for file in _string_list("", value)) or "none"
    text = re.sub(r"[^A-Za-z0-9_.+-]", "_", str(value))
    return f"{_short_key(key)}={text}"


@dataclass(frozen=True)
class StageRun:
    """One branch of a stage: the stage, its own sweep choices, and the branch it starts from."""

    stage: StageSpec
    choices: tuple[tuple[str, Any], ...] = ()
    source: StageRun | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        """The label parts of every sweep choice on the way here, upstream first."""
        upstream = self.source.labels if self.source is not None else ()
        return upstream + tuple(_label_part(key, value) for key, value in self.choices)

    @property
    def name(self) -> str:
        """``<stage>`` or ``<stage>/<label>``: unique in the pipeline, and the directory under it."""
        return "/".join([self.stage.name, ",".join(self.labels)]) if self.labels else self.stage.name

    @property
    def branch(self) -> dict[str, Any]:
        """Every sweep choice on the way here (upstream first; a later stage's choice of a key wins)."""
        upstream = self.source.branch if self.source is not None else {}
        return {**upstream, **dict(self.choices)}


def expand(spec: PipelineSpec) -> list[StageRun]:
    """Every branch of every stage, in run order.

    Raises:
        ConfigurationError: Two branches would share an output directory (two sweep values with the same label).

    Examples:
        >>> stages = (StageSpec("a", config="a.yaml", sweep={"model.init_args.preset": ["tiny", "small"]}),
        ...           StageSpec("b", source="a"))
        >>> spec = PipelineSpec("p", Path("p.yaml"), Path("runs"), "val/accuracy", "max", stages)
        >>> [run.name for run in expand(spec)]
        ['a/preset=tiny', 'a/preset=small', 'b/preset=tiny', 'b/preset=small']
    """
    runs: dict[str, list[StageRun]] = {}
    ordered: list[StageRun] = []
    for stage in spec.stages:
        keys = list(stage.sweep)
        combinations = [tuple(zip(keys, values)) for values in itertools.product(*(stage.sweep[k] for k in keys))]
        sources: list[StageRun | None] = list(runs[stage.source]) if stage.source else [None]
        branches = [StageRun(stage, choices, source) for source in sources for choices in combinations]
        names = [run.name for run in branches]
        for run_name in names:
            if names.count(run_name) > 1:
                raise ConfigurationError(
                    f"stage {stage.name!r}: two sweep branches would share the directory {run_name!r}; "
                    "give sweep values that differ as text"
                )
        runs[stage.name] = branches
        ordered.extend(branches)
    return ordered
