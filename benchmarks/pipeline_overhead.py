"""The pipeline's own cost: ``lightning-efficient pipeline`` against the same stages run by hand.

Each round runs the pipeline (``--pipeline``, default ``configs/pipelines/tiny.yaml``) twice into fresh
folders, the order alternating between rounds:

1. ``pipeline``: :func:`~lightning_efficient.pipeline.command.run_pipeline`, whose wall-clock includes
   parsing every stage's config before the first one starts, the records and the report refreshed
   (with its PNGs) after every stage;
2. ``by hand``: each stage's commands as ``--print_commands`` prints them (its ``lightning-efficient``
   run, then its measurement), one after the other, each timed, their output to the same place as
   the pipeline's stages (this terminal, or the file it is redirected to).

Claim (issue 22): the pipeline's wall-clock <= 1.05x the sum of its stages run by hand.

Command (the figures in the issue's closing note)::

    python benchmarks/pipeline_overhead.py --rounds 2 --json /tmp/pipeline_overhead.json > /tmp/pipeline_overhead.log
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import write_json
from lightning_efficient.pipeline.command import check_plan, run_pipeline
from lightning_efficient.pipeline.spec import load_pipeline
from lightning_efficient.pipeline.stages import plan_stages, python_command

ROOT = Path(__file__).resolve().parents[1]


def by_hand(pipeline: Path, root: Path) -> float:
    """Seconds of every stage's run and measurement, each run as its own command (their sum)."""
    spec = load_pipeline(pipeline, root=root)
    total = 0.0
    for plan in plan_stages(spec):
        check_plan(plan)  # writes stage.yaml, the file the printed command names (untimed)
        commands = [python_command(plan.arguments())]
        if plan.measured:
            commands.append([sys.executable, "-m", "lightning_efficient.pipeline.measure", *plan.measure_arguments()])
        for argv in commands:
            start = time.perf_counter()
            subprocess.run(argv, check=True)
            total += time.perf_counter() - start
    return total


def by_pipeline(pipeline: Path, root: Path) -> float:
    """Seconds of the whole ``run_pipeline``."""
    start = time.perf_counter()
    run_pipeline(load_pipeline(pipeline, root=root), say=lambda line: None)
    return time.perf_counter() - start


def one_round(pipeline: Path, index: int) -> dict[str, float]:
    """Both ways into fresh folders (round ``index``: the pipeline first when even); seconds and their ratio."""
    work = Path(tempfile.mkdtemp(prefix="pipeline_overhead_"))
    order = ["pipeline", "by hand"] if index % 2 == 0 else ["by hand", "pipeline"]
    seconds = {}
    for name in order:
        run = by_pipeline if name == "pipeline" else by_hand
        seconds[name] = run(pipeline, work / name.replace(" ", "_"))
    ratio = seconds["pipeline"] / seconds["by hand"]
    print(f"round {index + 1}: pipeline {seconds['pipeline']:.1f} s, by hand {seconds['by hand']:.1f} s, {ratio:.3f}x")
    return {**seconds, "ratio": ratio}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=ROOT / "configs" / "pipelines" / "tiny.yaml")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    pipeline, here = args.pipeline.resolve(), os.getcwd()
    os.chdir(ROOT)  # the shipped pipelines name their configs relative to the repository
    try:
        rounds = [one_round(pipeline, index) for index in range(args.rounds)]
    finally:
        os.chdir(here)
    ratio = statistics.median(r["ratio"] for r in rounds)
    verdict = "PASS" if ratio <= 1.05 else "FAIL"
    print(f"pipeline / stages by hand: {ratio:.3f}x (median of {len(rounds)} rounds) -> {verdict} (<= 1.05x)")
    return write_json(args.json, {"rounds": rounds, "ratio": ratio, "pass": ratio <= 1.05})


if __name__ == "__main__":
    main()
