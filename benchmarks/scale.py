"""Parity of FSDP2 (dp2) and 2D parallelism (dp2 x tp2) on gloo with one process, and exact resume.

Issue 27's measured claims: "dp2 x tp2 on 4 gloo processes matches one process to 1e-5 on loss and
weights after 5 steps with clipping, and resumes exactly; FSDP2 dp2 the same." Runs, each 6
optimizer steps with gradient clipping active on every step, checkpointed after step 3
and resumed from that distributed checkpoint:

- ViT and a BERT genre classifier (per-example mean losses): the data-parallel ranks' batches of a
  step are together the batch of one process with twice the batch size, so dp2 and dp2 x tp2 are
  compared with **one process**;
- BERT MLM (tied decoder; vocabulary-parallel under 2D) and Marian MT (per-token mean losses, whose
  token counts differ between ranks): compared with **DDP** on the same two ranks, the established
  data-parallel reference (a one-process run averages over tokens, not over rank means).

It reuses the test suite's worker (``tests/tp_worker.py``: one launch of 2 processes, one of 4) and
prints, per run, the largest loss and weight differences and the wall-clock of each launch. On a CPU,
gloo makes every sharded run slower than one process: the figures are about correctness, not speed.

Command (the figures in the issue's closing note)::

    python benchmarks/scale.py --json /tmp/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))

import torch

from benchmarks.harness import write_json


def data_files(root: Path) -> dict[str, str]:
    """Small user files as the test suite writes them, under ``root``: 600 Brown sentences of three
    genres (text, and jsonl with ``sentence``/``category``) and 400 Bible sentence pairs."""
    from lightning_efficient.data.files import embedded_path, read_records

    rows = read_records(embedded_path("brown.jsonl.gz"))
    chosen: list[dict[str, Any]] = []
    for genre in ("news", "fiction", "learned"):
        chosen += [row for row in rows if row["genre"] == genre][:200]
    pairs = read_records(embedded_path("bible_en_fr.jsonl.gz"))[:400]
    (root / "sentences.txt").write_text("\n".join(r["text"] for r in chosen) + "\n", encoding="utf-8")
    (root / "sentences.jsonl").write_text(
        "".join(json.dumps({"sentence": r["text"], "category": r["genre"]}) + "\n" for r in chosen), encoding="utf-8"
    )
    (root / "pairs.jsonl").write_text(
        "".join(json.dumps({"src": p["en"], "tgt": p["fr"]}) + "\n" for p in pairs), encoding="utf-8"
    )
    return {name: str(root / file) for name, file in (("txt", "sentences.txt"), ("jsonl", "sentences.jsonl"),
                                                      ("pairs", "pairs.jsonl"))}  # fmt: skip


def launch(spec: dict[str, Any], out: Path, timeout: int) -> tuple[list[dict[str, Any]], float]:
    """Run ``tests/tp_worker.py`` on ``spec`` (its ``devices`` processes): every rank's results, and seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, str(TESTS / "tp_worker.py"), json.dumps(spec), str(out)], check=True, env=env, timeout=timeout
    )
    seconds = time.perf_counter() - start
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(spec["devices"])], seconds


def differences(
    run: dict[str, Any], reference: dict[str, Any], losses: dict[int, float] | None = None
) -> dict[str, float]:
    """Largest |loss difference| over the run's steps and |weight difference| after its last step."""
    losses = losses or run["losses"]
    loss = max(abs(losses[step] - reference["losses"][step]) for step in losses)
    weights = max((run["params"][n] - reference["params"][n]).abs().max().item() for n in reference["params"])
    return {"loss": loss, "weights": weights, "steps": len(losses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per launch before it counts as hung")
    args = parser.parse_args()
    from tp_worker import FAMILIES, ONE_PROCESS, TWO_D, parity_runs, reference_runs, replica_losses, train

    torch.set_num_threads(1)  # as each worker rank
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = data_files(root)
        one_process = [run for run in reference_runs() if run.get("kind") != "ddp"]
        references = {run["name"]: train(run, files, root / "ref", devices=1) for run in one_process}
        two = parity_runs(root / "two", "fsdp", {}) + [run for run in reference_runs() if run.get("kind") == "ddp"]
        fsdp, fsdp_seconds = launch({"files": files, "runs": two, "devices": 2}, root / "two", args.timeout)
        four = parity_runs(root / "four", "2d", TWO_D)
        two_d, two_d_seconds = launch({"files": files, "runs": four, "devices": 4}, root / "four", args.timeout)
    figures: dict[str, Any] = {"launch_seconds": {"fsdp_dp2": fsdp_seconds, "2d_dp2_tp2": two_d_seconds}}
    for kind, ranks, second in (("fsdp", fsdp, 1), ("2d", two_d, 2)):  # second: rank 0's partner replica
        for family in ONE_PROCESS:
            run = ranks[0][f"{family}_{kind}"]
            replicas = replica_losses(run, ranks[second][f"{family}_{kind}"])
            figures[f"{family}_{kind} vs one process"] = differences(run, references[family], replicas)
        for family in ("bert", "mt"):
            figures[f"{family}_{kind} vs ddp"] = differences(ranks[0][f"{family}_{kind}"], fsdp[0][f"{family}_ddp"])
        for family in FAMILIES:
            resumed = ranks[0][f"{family}_{kind}_resumed"]
            figures[f"{family}_{kind} resumed vs uninterrupted"] = differences(resumed, ranks[0][f"{family}_{kind}"])
    print(f"{'comparison':<40} {'steps':>5} {'max |d loss|':>13} {'max |d weight|':>15}")
    for name, value in figures.items():
        if name != "launch_seconds":
            print(f"{name:<40} {value['steps']:>5} {value['loss']:>13.2e} {value['weights']:>15.2e}")
    print("launch wall-clock (s):", {k: round(v, 1) for k, v in figures["launch_seconds"].items()})
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
