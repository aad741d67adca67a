"""``lightning-efficient pipeline``: run a pipeline's stages in order, resumably, and keep its report current.

::

    lightning-efficient pipeline -c configs/pipelines/tiny.yaml                  # run (or finish) every stage
    lightning-efficient pipeline -c configs/pipelines/tiny.yaml --dry_run        # what would run; trains nothing
    lightning-efficient pipeline -c configs/pipelines/tiny.yaml --print_commands # each stage as a plain command
    lightning-efficient pipeline -c configs/pipelines/tiny.yaml --stage finetune # run that stage again

Before any stage starts, every stage's composed config is parsed the way its own run parses it,
so a misspelled sweep key or override fails at once, naming it (:func:`check_plan`).

A stage runs as its own process (the command ``--print_commands`` prints), then its final model is
measured (``python -m lightning_efficient.pipeline.measure``), its record written
(``runs/<pipeline>/<stage>/record.json``) and the report refreshed. Rerunning the pipeline skips
every stage whose record matches its config (and the run it started from), so nothing already
measured is measured again; a stage that was killed resumes from its ``last.ckpt``; ``--stage``
runs one stage's branches again from scratch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lightning_efficient.atomic_write import write_atomically
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.pipeline.spec import PipelineSpec, load_pipeline
from lightning_efficient.pipeline.stages import StagePlan, plan_stages, python_command

__all__ = ["PENDING_FILE", "RECORD_FILE", "check_plan", "describe", "main", "read_record", "run_pipeline"]

#: A stage's record, written when it finished (and was measured).
RECORD_FILE = "record.json"
#: Written when a stage starts: the hash of the config it runs, so a rerun knows whether ``last.ckpt`` is its own.
PENDING_FILE = "pending.json"


def check_plan(plan: StagePlan) -> None:
    """Parse ``plan``'s composed config as its own run would, without building anything.

    Inputs that do not exist yet (the checkpoint of a stage not run yet) are not checked here.

    Raises:
        ConfigurationError: The config does not parse; the message names the stage and the bad key or value.
    """
    from lightning_efficient.cli import EfficientCLI, user_error_message

    class _Parsed(Exception):
        pass

    class _ParseOnly(EfficientCLI):
        check_inputs = False

        def before_instantiate_classes(self) -> None:
            raise _Parsed

    plan.config_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(plan.config_file, plan.yaml_text().encode())
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both args and a command line
    try:
        _ParseOnly(args=plan.arguments(), parser_kwargs={"exit_on_error": False})
    except _Parsed:
        return
    except Exception as error:
        message = user_error_message(error)
        if message is None:
            raise
        raise ConfigurationError(f"stage {plan.name!r}: {message}") from None
    finally:
        sys.argv = argv


def _budget_text(plan: StagePlan) -> str:
    budget = plan.run.stage.budget
    if budget is None:
        return "-"
    parts = [f"{name} {value:g}" for name, value in vars(budget).items() if value is not None]
    return ", ".join(parts)


def describe(plans: Sequence[StagePlan]) -> str:
    """The dry run's text: the stages in order, their kind, input, budget and sweep choices, and where they write."""
    lines = []
    for index, plan in enumerate(plans, 1):
        source = plan.source.name if plan.source is not None else "-"
        choices = ", ".join(f"{key}={value}" for key, value in plan.run.choices) or "-"
        lines.append(f"{index:>2}. {plan.name}  [{plan.kind.name}]")
        lines.append(f"    from: {source}   budget: {_budget_text(plan)}   sweep: {choices}")
        lines.append(f"    config: {plan.config_file}   measured: {'yes' if plan.measured else 'no'}")
    return "\n".join(lines)


def read_record(plan: StagePlan) -> dict[str, Any] | None:
    """The stage's ``record.json``, or None when it has none (or an unreadable one)."""
    try:
        return json.loads((plan.directory / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (json.dumps(data, indent=2) + "\n").encode())


def _efficiency(plan: StagePlan) -> dict[str, Any] | None:
    from lightning_efficient.compare import find_summary, load_summary

    try:
        return dict(load_summary(find_summary(plan.directory)))
    except ConfigurationError:
        return None


def _run(argv: list[str], what: str, meanwhile: Callable[[], None] | None = None) -> float:
    """Run ``argv`` (output to this terminal); its wall-clock seconds. A failure stops the pipeline, saying how to go on.

    ``meanwhile`` runs in this process once the command has started (the report of the stage before
    is drawn while this one imports), so the pipeline's own work costs the stages no time.
    """
    start = time.perf_counter()
    with subprocess.Popen(argv) as process:
        try:
            if meanwhile is not None:
                meanwhile()
            code = process.wait()
        except BaseException:  # as subprocess.call: an interrupted pipeline leaves no stage running
            process.kill()
            raise
    if code != 0:
        raise ConfigurationError(
            f"{what} failed (exit {code}); fix it and run the pipeline again: finished stages are skipped "
            "and this one resumes from its last.ckpt"
        )
    return time.perf_counter() - start


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _run_stage(
    plan: StagePlan,
    records: dict[str, dict[str, Any]],
    rerun: bool,
    say: Callable[[str], None],
    meanwhile: Callable[[], None] | None = None,
) -> dict:
    """Run one stage branch unless its record says it already ran with this config; its record.

    ``meanwhile`` runs while the stage's process starts (not at all when the stage is skipped).
    """
    source_record = records.get(plan.source.name) if plan.source is not None else None
    config_hash = plan.config_hash(source_record["finished"] if source_record else None)
    record = read_record(plan)
    if record is not None and record.get("config_hash") == config_hash and not rerun:
        say(f"[{plan.name}] finished before with this config: skipped")
        return record
    pending_file = plan.directory / PENDING_FILE
    try:
        pending = json.loads(pending_file.read_text()).get("config_hash")
    except (OSError, ValueError):
        pending = None
    checkpoint = plan.checkpoint
    resume = not rerun and pending == config_hash and checkpoint is not None and checkpoint.is_file()
    if plan.directory.exists() and not resume:
        if any(path.name != plan.config_file.name for path in plan.directory.iterdir()):  # a dry run writes stage.yaml
            why = "--stage" if rerun else "its config changed" if record or pending else "an unfinished run"
            say(f"[{plan.name}] starting over in {plan.directory} ({why})")
        shutil.rmtree(plan.directory)
    plan.directory.mkdir(parents=True, exist_ok=True)
    write_atomically(plan.config_file, plan.yaml_text().encode())
    _write_json(pending_file, {"config_hash": config_hash, "started": _now()})
    say(f"[{plan.name}] {'resuming from ' + str(checkpoint) if resume else 'running'}: {plan.command(resume)}")
    wall = _run(python_command(plan.arguments(resume)), f"stage {plan.name!r}", meanwhile)
    if plan.kind.trains and (checkpoint is None or not checkpoint.is_file()):
        raise ConfigurationError(f"stage {plan.name!r} ended without its final checkpoint {str(checkpoint)!r}")
    measures = None
    if plan.measured:
        say(f"[{plan.name}] measuring: {plan.measure_command()}")
        measure_argv = [sys.executable, "-m", "lightning_efficient.pipeline.measure", *plan.measure_arguments()]
        _run(measure_argv, f"measuring stage {plan.name!r}")
        measures = json.loads((plan.measure_directory / "measures.json").read_text())
    record = {
        "name": plan.name,
        "stage": plan.run.stage.name,
        "kind": plan.kind.name,
        "branch": plan.run.branch,
        "from": plan.source.name if plan.source is not None else None,
        "status": "finished",
        "config": str(plan.config_file),
        "config_hash": config_hash,
        "command": plan.command(),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "source_checkpoint": str(plan.source.checkpoint) if plan.source is not None else None,
        "wall_time_s": wall,
        "resumed": resume,
        "finished": _now(),
        "efficiency": _efficiency(plan) if plan.kind.trains else None,
        "measures": measures,
    }
    _write_json(plan.directory / RECORD_FILE, record)
    pending_file.unlink(missing_ok=True)
    return record


class _Report:
    """The pipeline's report, rewritten after a stage finishes: while the next stage starts, or at the end."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.records: dict[str, dict[str, Any]] | None = None  # finished stages not in the files yet
        self.latest: dict[str, Any] | None = None

    def stage_finished(self, records: dict[str, dict[str, Any]]) -> None:
        self.records = dict(records)

    def write(self) -> None:
        """Write ``report.{json,md,png}`` of the stages finished so far, unless they are written already."""
        if self.records is None:
            return
        from lightning_efficient.pipeline.report import build_report, write_report

        records, self.records = self.records, None
        spec = self.spec
        curves = [r["name"] for r in records.values() if r["stage"] in spec.curves] if spec.curves else None
        self.latest = build_report(spec.name, list(records.values()), spec.metric, spec.mode, curves=curves)
        write_report(spec.directory, self.latest)


def run_pipeline(
    spec: PipelineSpec,
    stage: str | None = None,
    dry_run: bool = False,
    print_commands: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Check every stage, then run (or describe) them; the report, or None for a dry run or ``print_commands``.

    Args:
        spec: The pipeline, from :func:`~lightning_efficient.pipeline.spec.load_pipeline`.
        stage: Run only this stage's branches, again from scratch (the stages it starts from must have finished).
        dry_run: Print the stages, their order, inputs and budgets; train nothing.
        print_commands: Print each stage as the commands that run and measure it; run nothing.
        say: Where progress lines go.

    Raises:
        ConfigurationError: A stage's config does not parse, ``stage`` names no stage or its input
            has not run, or a stage failed.
    """
    plans = plan_stages(spec)
    if stage is not None and stage not in {plan.run.stage.name for plan in plans}:
        names = ", ".join(dict.fromkeys(plan.run.stage.name for plan in plans))
        raise ConfigurationError(f"--stage {stage!r} names no stage; stages: {names}")
    for plan in plans:
        check_plan(plan)
    if dry_run:
        say(f"pipeline {spec.name}: {len(plans)} stage runs in {spec.directory}\n{describe(plans)}")
        return None
    if print_commands:
        for plan in plans:
            say(f"# {plan.name}\n{plan.command()}" + (f"\n{plan.measure_command()}" if plan.measured else ""))
        return None
    records: dict[str, dict[str, Any]] = {}
    report = _Report(spec)
    start = time.perf_counter()
    for plan in plans:
        chosen = stage is None or plan.run.stage.name == stage
        if not chosen:
            record = read_record(plan)
            if record is not None:
                records[plan.name] = record
            continue
        if plan.source is not None and plan.source.name not in records:
            raise ConfigurationError(
                f"stage {plan.name!r} starts from {plan.source.name!r}, which has not finished; run the pipeline first"
            )
        records[plan.name] = _run_stage(plan, records, rerun=stage is not None, say=say, meanwhile=report.write)
        report.stage_finished(records)
    report.write()
    return {**report.latest, "wall_time_s": time.perf_counter() - start}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-efficient pipeline",
        description="Run a pipeline of stages (train, then compress), each an ordinary run in runs/<pipeline>/<stage>/, "
        "and write runs/<pipeline>/report.{json,md,png}.",
    )
    parser.add_argument("-c", "--config", required=True, help="the pipeline YAML, e.g. configs/pipelines/tiny.yaml")
    parser.add_argument("--stage", default=None, help="run only this stage's branches again, from scratch")
    parser.add_argument(
        "--dry_run", action="store_true", help="print the stages, their inputs and budgets; train nothing"
    )
    parser.add_argument(
        "--print_commands", action="store_true", help="print each stage as the plain command that runs it; run nothing"
    )
    parser.add_argument(
        "--root", default=None, help="folder of the pipeline's directory (default: the file's root, runs)"
    )
    return parser


def main(argv: Sequence[str] | None = None, show_traceback: bool = False) -> None:
    """Entry point of ``lightning-efficient pipeline`` (see the module doc); a mistake prints one ``error:`` line, exit 2."""
    args = _parser().parse_args(argv)
    try:
        spec = load_pipeline(args.config, root=args.root)
        report = run_pipeline(spec, stage=args.stage, dry_run=args.dry_run, print_commands=args.print_commands)
    except Exception as error:  # noqa: BLE001 (exit_on_user_error re-raises anything but a user's mistake)
        from lightning_efficient.cli import exit_on_user_error

        exit_on_user_error(error, show_traceback)
    if report is not None:
        from lightning_efficient.pipeline.report import format_front

        print(format_front(report, spec.directory))
