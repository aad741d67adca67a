"""MLM data at scale: the ``datasets`` path of ``MLMDataModule`` against today's in-memory path, memory and speed.

Claim measured: on a 1 GB text corpus, ``MLMDataModule`` (sources opened by ``load_source`` as
memory-mapped Arrow, tokenized and packed by a cached batched ``Dataset.map`` in ``num_proc``
processes, rows read by ``ArrowRows``) (a) sets up and trains 50 steps of the main job in a peak
RSS <= 2 GB, (b) sets up from its warm cache in <= 5% of the cold setup's time, and (c) feeds the
main job at >= 0.97x the training tokens/s of today's path, which (d) does not fit in memory at
1 GB. "Today's path" is the code before the change (``git show 8d467a9:lightning_efficient/data/text.py``):
``read_texts`` loads every text into a Python list, one ``tokenizer.encode_batch`` over all of them,
every id concatenated into one list, cut into ``[CLS] ... [SEP]`` blocks, split by ``split_indices``,
and the training loader wraps the list of blocks (:class:`TodaysMLMDataModule` below, the same
code). Sizes: MB = 2^20 bytes of corpus, GB = 2^30 bytes (RSS and corpus alike).

1. Corpus: the embedded Austen and Brown texts (~10 MB, ``read_texts``, whitespace made single
   spaces), repeated, each repetition's lines shuffled by a seeded RNG, one text per line, into
   ``--workdir/corpus_<N>mb.txt`` of exactly N MB (the last line cut and padded with spaces). The
   smaller files of part 4 are prefixes of the large one. Files of the right size are kept.
2. Tokenizer: one WordPiece (``--vocab-size``) trained on the embedded corpus only
   (``MLMDataModule().tokenizer``, the package cache), written to ``--workdir/tokenizer.json`` and
   passed as ``tokenizer=`` everywhere, so no measurement includes tokenizer training.
3. New path, one fresh process per measurement: ``MLMDataModule(train_files=[corpus],
   tokenizer=..., num_proc=N)``, ``prepare_data(); setup("fit")``, then ``--train-steps`` steps of
   the main job (``BertMLM`` of ``configs/bert/small_mlm.yaml``, ``Trainer`` without logger,
   checkpoints or validation, on ``train_dataloader()``). Cold: a fresh ``LIGHTNING_EFFICIENT_CACHE``
   (the child's environment); warm: a second process on the same cache. "setup s" = construction +
   ``prepare_data`` + ``setup`` (imports excluded); it is split into "load" (``load_source``: the text
   file to Arrow, called first on its own), "map" (``prepare_data``: tokenize + pack + write) and
   "split". Tokenization MB/s = corpus MB / map s. Peak RSS: ``getrusage(RUSAGE_SELF).ru_maxrss`` after
   setup and at the end; a thread samples ``/proc/self/status`` every 0.2 s for the anonymous vs
   file-backed (shared libraries, ~0.14 GB, and memory-mapped Arrow pages, reclaimable) parts, per
   phase; the ``num_proc`` map workers' largest peak is ``RUSAGE_CHILDREN``. A reference process
   (the embedded corpus, ~10 MB, same steps) gives the training's own peak, so the data path's share
   can be read off.
4. Today's path, same isolation, at growing prefixes of the corpus (``--old-sizes-mb``): read,
   encode, pack and split times, MB/s and peak RSS. A watchdog thread in this process reads the
   child's ``VmRSS`` (and its children's) every 0.1 s and kills it past ``--old-rss-cap-gb``; the
   larger sizes are then skipped. The slope: least squares of peak RSS on corpus size (GB per GB).
5. Training tokens/s, same process, interleaved by ``benchmarks/harness.py`` (``--rounds``
   rounds, ``--warmup`` + ``--steps`` steps per run, order rotating, after one untimed run of
   each): the main job fed by the new DataModule's ``train_dataloader()`` vs by today's loader over
   the Python list of blocks, both on the default (embedded) corpus, same batch size and collate;
   the ratio is the harness's median of per-round ratios. Beside it, the loaders alone (no model):
   milliseconds per batch.

Command (the full run, ~25 minutes on 2 cores; ~6 GB of disk under the work directory):

    python benchmarks/data_scale.py --json runs/bench/data_scale.json

``--quick`` (8 MB corpus, today's path at 2 and 4 MB, 5 steps, BERT-tiny, 2 rounds: about 1 minute)
checks the script end to end; ``--parts new old throughput`` picks parts.

Measured (Xeon, 2 cores, shared with other jobs: load average ~1.9; 1024 MB corpus, 1,734,312 blocks)::

    run                setup s  map s  map MB/s  warm/cold  setup anon GB  RSS setup GB  peak RSS GB  tokens/s
    num_proc=1 cold      306.4  295.4      3.47          -           0.59          1.77         2.88     5,510
    num_proc=1 warm        3.0    0.4         -      0.97%           0.57          1.46         3.07     5,142
    num_proc=2 cold      254.1  242.8      4.22          -           0.63          1.57         2.78     4,953
    num_proc=2 warm        3.3    0.4         -      1.29%           0.54          1.46         3.10     5,443
    reference (10 MB)      0.2    0.0         -          -           0.37          0.55         2.57     5,450

    today's path: 32 / 64 / 128 / 256 MB -> peak RSS 1.70 / 2.88 / 5.24 / 9.99 GB at 3.0-3.4 MB/s;
    512 MB killed at 12.0 GB after 94 s; 37.9 GB of RSS per GB of corpus (38 GB at 1 GB)
    training tokens/s new / today's: 1.014x (6 rounds, 0.980-1.030)

Warm setup (<= 5%) and tokens/s (>= 0.97x) are met; peak RSS <= 2 GB is not, and cannot be by the
data path: the same 50 steps on the 10 MB embedded corpus peak at 2.57 GB (the model, AdamW and
glibc's growing heap, see ``plan.py``). The setup's anonymous memory stays ~0.6 GB at 1 GB of corpus
(imports ~0.45 GB); the rest of its RSS is mmapped Arrow pages (reclaimable page cache).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.data import DataLoader

from benchmarks.harness import (
    LightningJob,
    StepTimer,
    Variant,
    benchmark_trainer,
    harness_arguments,
    interleave,
    report,
    setup,
    write_json,
)
from benchmarks.jobs import MAIN_JOB, mlm_arguments, mlm_module
from lightning_efficient import MLMDataModule
from lightning_efficient.data.files import embedded_path, read_texts
from lightning_efficient.data.sources import load_source
from lightning_efficient.errors import DataError

MB, GB = 2**20, 2**30
RECORD_TAG = "DATA-SCALE-RECORD "  # prefix of the line a worker process prints its record on
PARTS = ("new", "old", "throughput")
NEW, OLD = "new path (Arrow rows)", "today's path (list)"
QUICK = {  # --quick: these defaults change (options given on the command line win)
    "corpus_mb": 8,
    "old_sizes_mb": [2, 4],
    "train_steps": 5,
    "preset": "tiny",
    "rounds": 2,
    "steps": 3,
    "warmup": 1,
    "loader_batches": 20,
    "no_reference": True,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the claim's setting, ``--quick`` shrinks them."""
    parser = mlm_arguments(harness_arguments(__doc__, rounds=6, steps=30, warmup=5))
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench/data_scale"), help="corpora, caches, logs")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, the whole script in < 2 minutes")
    group = parser.add_argument_group("new path (part 3)")
    group.add_argument("--corpus-mb", type=int, default=1024, help="size of the synthetic corpus")
    group.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="Dataset.map processes to compare")
    group.add_argument("--train-steps", type=int, default=50, help="training steps after setup, in each process")
    group.add_argument("--max-rss-gb", type=float, default=2.0, help="target: peak RSS of setup + training")
    group.add_argument("--max-warm-ratio", type=float, default=0.05, help="target: warm setup / cold setup")
    group.add_argument("--no-reference", action="store_true", help="skip the embedded-corpus reference process")
    group = parser.add_argument_group("today's path (part 4)")
    group.add_argument("--old-sizes-mb", type=int, nargs="+", default=[32, 64, 128, 256, 512], help="corpus prefixes")
    group.add_argument("--old-rss-cap-gb", type=float, default=12.0, help="kill a process whose RSS passes this")
    group = parser.add_argument_group("training tokens/s (part 5)")
    group.add_argument("--min-ratio", type=float, default=0.97, help="target: new tokens/s / today's")
    group.add_argument("--loader-batches", type=int, default=200, help="batches of the loader-only timing")
    parser.add_argument("--worker", choices=("new", "old"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    if args.steps < 1 or args.train_steps < 1:
        parser.error("--steps and --train-steps must be >= 1")
    return args


# -- today's path: the MLM DataModule before the move to datasets (8d467a9) ------------------------
class TodaysMLMDataModule(MLMDataModule):
    """``MLMDataModule`` as it was at 8d467a9: every text, id and block in Python lists.

    ``setup`` is the old one (``read_texts``, one ``encode_batch`` over everything, the blocks cut
    from one list of ids, ``held_out_indices``), timed by phase in :attr:`timings`; the loaders
    are the base class's (``ResumableDataLoader`` over the list), the collate is shared.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timings: dict[str, float] = {}

    def prepare_data(self) -> None:
        _ = self.tokenizer  # the old prepare_data: the tokenizer only

    def old_blocks(self, texts: Sequence[str]) -> list[list[int]]:
        """Tokenize ``texts``, concatenate them and cut the stream into ``[CLS] ... [SEP]`` blocks (the old code)."""
        cls_id, sep_id = self.special_ids.cls_id, self.special_ids.sep_id
        start = time.perf_counter()
        stream: list[int] = []
        for encoding in self.tokenizer.encode_batch(list(texts), add_special_tokens=False):
            stream.extend(encoding.ids)
        encoded = time.perf_counter()
        width = self.max_length - 2
        blocks = [[cls_id, *stream[i : i + width], sep_id] for i in range(0, len(stream) - width + 1, width)]
        self.timings.update(encode_s=encoded - start, pack_s=time.perf_counter() - encoded, tokens=len(stream))
        return blocks

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        start = time.perf_counter()
        if self._texts is None:
            self._texts = read_texts(self.train_files, self.text_column)  # kept, as the old module did
        self.timings["read_s"] = time.perf_counter() - start
        blocks = self.old_blocks(self._texts)
        split_start = time.perf_counter()
        self.splits = {name: [blocks[i] for i in part] for name, part in self.held_out_indices(len(blocks)).items()}
        self.timings["split_s"] = time.perf_counter() - split_start
        if not self.splits["train"]:
            raise DataError(f"training files {self.train_files} hold fewer than one block of {self.max_length} tokens")


# -- corpus and tokenizer (parts 1, 2) --------------------------------------------------------------
def corpus_lines() -> list[str]:
    """The embedded Austen and Brown texts, one line each (whitespace runs made single spaces)."""
    texts = read_texts([embedded_path("austen.txt.gz"), embedded_path("brown.jsonl.gz")], "text")
    return [line for line in (" ".join(text.split()) for text in texts) if line]


def _cut(piece: bytes) -> bytes:
    """``piece`` ending in a newline at the same length: a split UTF-8 character dropped, spaces padding."""
    if not piece or piece.endswith(b"\n"):
        return piece
    body = piece[:-1].decode("utf-8", errors="ignore").encode("utf-8")
    return body + b" " * (len(piece) - 1 - len(body)) + b"\n"


def write_corpus(path: Path, megabytes: int, lines: list[str], seed: int) -> bool:
    """Write ``megabytes`` MB of ``lines``, repeated, shuffled per repetition; False if it already exists."""
    size = megabytes * MB
    if path.is_file() and path.stat().st_size == size:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    written, repetition = 0, 0
    with open(partial, "wb") as out:
        while written < size:
            order = list(lines)
            random.Random(seed * 1_000_003 + repetition).shuffle(order)
            chunk = ("\n".join(order) + "\n").encode("utf-8")
            if written + len(chunk) > size:
                chunk = _cut(chunk[: size - written])
            out.write(chunk)
            written += len(chunk)
            repetition += 1
    os.replace(partial, path)
    return True


def tokenizer_file(workdir: Path, vocab_size: int, max_length: int) -> Path:
    """``workdir/tokenizer.json``: WordPiece of the embedded corpus (trained once, from the package cache)."""
    path = workdir / "tokenizer.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = MLMDataModule(vocab_size=vocab_size, max_length=max_length).tokenizer
        path.write_text(tokenizer.to_str(), encoding="utf-8")
    return path


@contextlib.contextmanager
def package_cache(directory: Path) -> Iterator[None]:
    """``LIGHTNING_EFFICIENT_CACHE=directory`` (and no ``HF_DATASETS_CACHE``) in this process, for the block."""
    saved = {key: os.environ.get(key) for key in ("LIGHTNING_EFFICIENT_CACHE", "HF_DATASETS_CACHE")}
    os.environ["LIGHTNING_EFFICIENT_CACHE"] = str(directory)
    os.environ.pop("HF_DATASETS_CACHE", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- worker processes (parts 3, 4) ------------------------------------------------------------------
def _status(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS``, ``RssAnon``, ``RssFile`` of a process in bytes (empty if it is gone)."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    fields[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return fields


def _maxrss(who: int = resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024  # kilobytes on Linux


class RssSampler(threading.Thread):
    """Samples this process's ``/proc/self/status`` every ``interval`` s: peaks (overall, per phase), a timeline."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.phase = "start"
        self.started_at = time.perf_counter()
        self.peaks: dict[str, int] = {}
        self.phase_peaks: dict[str, dict[str, int]] = {}
        self.timeline: list[tuple[float, int, int, str]] = []  # (s, RssAnon, RssFile, phase)
        self._stop_event = threading.Event()

    def sample(self) -> None:
        fields, phase = _status(), self.phase
        peaks = self.phase_peaks.setdefault(phase, {})
        for key, value in fields.items():
            self.peaks[key] = max(self.peaks.get(key, 0), value)
            peaks[key] = max(peaks.get(key, 0), value)
        when = time.perf_counter() - self.started_at
        self.timeline.append((round(when, 2), fields.get("RssAnon", 0), fields.get("RssFile", 0), phase))

    def enter(self, phase: str) -> None:
        """Close the current phase with a sample, then count the next samples to ``phase``."""
        self.sample()
        self.phase = phase

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def finish(self) -> dict[str, Any]:
        self._stop_event.set()
        self.join()
        self.sample()
        step = max(1, len(self.timeline) // 200)  # at most ~200 points in the record
        return {"sampled_peaks": self.peaks, "phase_peaks": self.phase_peaks, "timeline": self.timeline[::step]}


def new_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Set up the new ``MLMDataModule`` on ``config["files"]`` and train; timings and memory."""
    sampler = RssSampler()
    sampler.start()
    record: dict[str, Any] = {"rss_start": _maxrss()}
    sampler.enter("load")
    start = time.perf_counter()
    datamodule = MLMDataModule(
        train_files=config["files"], tokenizer=config["tokenizer"], max_length=config["max_length"],
        batch_size=config["batch_size"], num_proc=config["num_proc"], seed=config["seed"],
    )  # fmt: skip
    for file in config["files"]:
        load_source(file, [datamodule.text_column], "train")  # the text file to Arrow (or the cached table)
    loaded = time.perf_counter()
    sampler.enter("map")
    datamodule.prepare_data()  # tokenizer, tokenize + pack + write (or find the cached blocks)
    prepared = time.perf_counter()
    sampler.enter("split")
    datamodule.setup("fit")
    done = time.perf_counter()
    record.update(
        load_s=loaded - start, map_s=prepared - loaded, split_s=done - prepared, setup_s=done - start,
        blocks=len(datamodule.splits["train"]), rss_setup=_maxrss(), status_setup=_status(),
        map_workers_maxrss=_maxrss(resource.RUSAGE_CHILDREN),
    )  # fmt: skip
    return {**record, **train_steps(datamodule, config, sampler)}


def old_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Today's setup (``TodaysMLMDataModule``) on ``config["files"]``; timings and memory."""
    sampler = RssSampler()
    sampler.start()
    record: dict[str, Any] = {"rss_start": _maxrss()}
    sampler.enter("setup")
    start = time.perf_counter()
    datamodule = TodaysMLMDataModule(
        train_files=config["files"], tokenizer=config["tokenizer"], max_length=config["max_length"],
        batch_size=config["batch_size"], seed=config["seed"],
    )  # fmt: skip
    datamodule.prepare_data()
    datamodule.setup("fit")
    done = time.perf_counter()
    batch = next(iter(datamodule.train_dataloader()))
    record.update(
        setup_s=done - start, **datamodule.timings, blocks=len(datamodule.splits["train"]),
        batch_shape=list(batch["input_ids"].shape), rss_setup=_maxrss(), status_setup=_status(),
    )  # fmt: skip
    record.update(sampler.finish(), rss_peak=_maxrss())
    return record


def train_steps(datamodule: MLMDataModule, config: dict[str, Any], sampler: RssSampler) -> dict[str, Any]:
    """``config["steps"]`` steps of the main job on ``datamodule.train_dataloader()``; step times and peak RSS."""
    sampler.enter("train")
    args = argparse.Namespace(preset=config["preset"], max_length=config["max_length"], seed=config["seed"])
    torch.manual_seed(config["seed"])
    model = mlm_module(datamodule.vocab_size, args, **MAIN_JOB)
    model.tokenizer = datamodule.tokenizer
    timer = StepTimer()
    trainer = benchmark_trainer(
        max_steps=config["steps"], accelerator="cpu", default_root_dir=config["root"], callbacks=[timer]
    )
    trainer.fit(model, train_dataloaders=datamodule.train_dataloader())
    times = timer.times
    timed = times[min(5, len(times) - 1) :] if times else []
    tokens = config["batch_size"] * config["max_length"]
    return {
        **sampler.finish(),
        "rss_peak": _maxrss(),
        "status_end": _status(),
        "steps": trainer.global_step,
        "step_times": times,
        "train_tokens_per_s": tokens / statistics.median(timed) if timed else None,
    }


class Watchdog(threading.Thread):
    """Reads a child's ``VmRSS`` (its own children's added) every ``interval`` s; kills its group past ``cap``."""

    def __init__(self, process: subprocess.Popen, cap: int | None, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.process, self.cap, self.interval = process, cap, interval
        self.started_at = time.perf_counter()
        self.peak = 0
        self.killed_at: tuple[int, float] | None = None  # (RSS bytes, seconds)
        self._stop_event = threading.Event()

    def tree_rss(self) -> int:
        pids, total = [self.process.pid], 0
        while pids:
            pid = pids.pop()
            total += _status(pid).get("VmRSS", 0)
            try:
                pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except (OSError, ValueError):
                pass
        return total

    def run(self) -> None:
        while not self._stop_event.wait(self.interval) and self.process.poll() is None:
            rss = self.tree_rss()
            self.peak = max(self.peak, rss)
            if self.cap is not None and rss > self.cap and self.killed_at is None:
                self.killed_at = (rss, time.perf_counter() - self.started_at)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)  # its own session: the child and its map workers

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def run_worker(
    kind: str, name: str, config: dict[str, Any], cache: Path | None, cap_gb: float | None, logs: Path
) -> dict[str, Any]:
    """Run a ``--worker`` process under the watchdog; its record, or ``{"killed": ...}`` / ``{"failed": ...}``."""
    env = {key: value for key, value in os.environ.items() if key != "HF_DATASETS_CACHE"}
    if cache is not None:
        env["LIGHTNING_EFFICIENT_CACHE"] = str(cache)
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--worker-config", json.dumps(config)]
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        watchdog = Watchdog(process, None if cap_gb is None else int(cap_gb * GB))
        watchdog.start()
        returncode = process.wait()
        watchdog.stop()
    result: dict[str, Any] = {"process_s": time.perf_counter() - started, "watchdog_peak": watchdog.peak}
    result["load_average"] = os.getloadavg()  # the machine's other work over the last 1, 5, 15 minutes
    if watchdog.killed_at is not None:
        rss, seconds = watchdog.killed_at
        return {**result, "killed": True, "killed_rss": rss, "killed_after_s": seconds, "log": str(log)}
    text = log.read_text(encoding="utf-8", errors="replace")
    records = [line[len(RECORD_TAG) :] for line in text.splitlines() if line.startswith(RECORD_TAG)]
    if returncode != 0 or not records:
        tail = [line for line in text.splitlines() if "examples/s" not in line][-25:]
        print(f"   FAILED (exit {returncode}), log {log}:\n      " + "\n      ".join(tail))
        return {**result, "failed": True, "returncode": returncode, "error": "\n".join(tail), "log": str(log)}
    return {**result, **json.loads(records[-1])}


# -- parts --------------------------------------------------------------------------------------------
def worker_config(args: argparse.Namespace, files: list[str], tokenizer: Path, **extra: Any) -> dict[str, Any]:
    return {
        "files": [str(Path(file).resolve()) for file in files], "tokenizer": str(tokenizer.resolve()),
        "max_length": args.max_length, "batch_size": args.batch_size, "seed": args.seed, "preset": args.preset,
        "steps": args.train_steps, "threads": args.threads, **extra,
    }  # fmt: skip


def new_part(args: argparse.Namespace, corpus: Path, tokenizer: Path) -> dict[str, Any]:
    """Part 3: cold then warm setup + training, in fresh processes, for every ``--num-proc``."""
    workdir, corpus_mb = args.workdir, corpus.stat().st_size / MB
    runs: dict[str, Any] = {}
    for num_proc in args.num_proc:
        cache = workdir / f"cache_new_np{num_proc}"
        shutil.rmtree(cache, ignore_errors=True)  # cold: nothing of an earlier run
        for state in ("cold", "warm"):
            name = f"num_proc={num_proc} {state}"
            config = worker_config(args, [str(corpus)], tokenizer, num_proc=num_proc, root=str(workdir / "trainer"))
            print(f"== new path, {corpus_mb:.0f} MB, {name}", flush=True)
            run = run_worker("new", f"new_np{num_proc}_{state}", config, cache, args.old_rss_cap_gb, workdir / "logs")
            if "setup_s" in run:
                run["map_mb_per_s"] = corpus_mb / run["map_s"]
                run["setup_mb_per_s"] = corpus_mb / run["setup_s"]
                print(
                    f"   setup {run['setup_s']:.1f} s (load {run['load_s']:.1f}, map {run['map_s']:.1f}, split "
                    f"{run['split_s']:.1f}), {run['blocks']} train blocks, peak RSS {run['rss_setup'] / GB:.2f} GB "
                    f"after setup, {run['rss_peak'] / GB:.2f} GB after {run['steps']} steps"
                )
            runs[name] = run
        cold, warm = runs[f"num_proc={num_proc} cold"], runs[f"num_proc={num_proc} warm"]
        if "setup_s" in cold and "setup_s" in warm:
            warm["warm_ratio"] = warm["setup_s"] / cold["setup_s"]
    reference = None
    if not args.no_reference:
        print("== reference: the embedded corpus (~10 MB), the same training", flush=True)
        files = [embedded_path("austen.txt.gz"), embedded_path("brown.jsonl.gz")]
        config = worker_config(args, files, tokenizer, num_proc=None, root=str(workdir / "trainer"))
        cache = workdir / "cache_reference"  # kept between runs: cold only the first time (~10 MB, seconds)
        reference = run_worker("new", "reference", config, cache, args.old_rss_cap_gb, workdir / "logs")
        if "rss_peak" in reference:
            print(f"   peak RSS {reference['rss_setup'] / GB:.2f} GB after setup, {reference['rss_peak'] / GB:.2f} GB")
    return {"corpus_mb": corpus_mb, "runs": runs, "reference": reference}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares ``(slope, intercept)`` of ``ys`` on ``xs`` (None with fewer than two distinct x)."""
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def old_part(args: argparse.Namespace, lines: list[str], tokenizer: Path) -> dict[str, Any]:
    """Part 4: today's setup at growing corpus prefixes until one passes the RSS cap."""
    runs: dict[str, Any] = {}
    for size in sorted(args.old_sizes_mb):
        corpus = args.workdir / f"corpus_{size}mb.txt"
        write_corpus(corpus, size, lines, args.seed)
        print(f"== today's path, {size} MB", flush=True)
        config = worker_config(args, [str(corpus)], tokenizer)
        run = run_worker("old", f"old_{size}mb", config, None, args.old_rss_cap_gb, args.workdir / "logs")
        runs[str(size)] = run
        if run.get("killed"):
            print(f"   killed at {run['killed_rss'] / GB:.1f} GB after {run['killed_after_s']:.0f} s")
            break
        if "setup_s" in run:
            tokenize = run["read_s"] + run["encode_s"] + run["pack_s"]
            run["mb_per_s"] = size / tokenize
            print(
                f"   setup {run['setup_s']:.1f} s (read {run['read_s']:.1f}, encode {run['encode_s']:.1f}, pack "
                f"{run['pack_s']:.1f}, split {run['split_s']:.1f}), peak RSS {run['rss_peak'] / GB:.2f} GB"
            )
    done = [(int(size), run["rss_peak"]) for size, run in runs.items() if "rss_peak" in run]
    line = fit_line([size * MB / GB for size, _ in done], [rss / GB for _, rss in done])
    result: dict[str, Any] = {"runs": runs, "cap_gb": args.old_rss_cap_gb}
    if line is not None:
        result.update(gb_per_gb=line[0], intercept_gb=line[1], at_corpus_gb=line[1] + line[0] * args.corpus_mb / 1024)
    return result


def loader_ms_per_batch(loader: DataLoader, batches: int) -> float:
    """Median milliseconds per batch of iterating ``loader`` (no model), over ``batches`` batches."""
    times, iterator = [], iter(loader)
    for _ in range(batches):
        start = time.perf_counter()
        try:
            next(iterator)
        except StopIteration:
            iterator = iter(loader)
            next(iterator)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def throughput_part(args: argparse.Namespace, tokenizer: Path) -> dict[str, Any]:
    """Part 5: the main job fed by the new loader vs today's, interleaved in this process."""
    options = {"train_files": args.train_files, "tokenizer": str(tokenizer), "max_length": args.max_length}
    options.update(batch_size=args.batch_size, seed=args.seed)
    with package_cache(args.workdir / "cache_throughput"):
        new_data = MLMDataModule(**options)
        new_data.prepare_data()
        new_data.setup("fit")
    old_data = TodaysMLMDataModule(**options)
    old_data.setup("fit")
    print(
        f"== training tokens/s: {len(new_data.splits['train'])} new blocks, {len(old_data.splits['train'])} "
        f"today's; {args.rounds} rounds x {args.steps} timed steps (+{args.warmup} warmup) per side",
        flush=True,
    )
    loaders = {}
    for name, data in ((NEW, new_data), (OLD, old_data)):
        loader = data.train_dataloader()
        dataset = getattr(loader, "dataset", None)
        items = getattr(dataset, "items", dataset)
        loaders[name] = {
            "loader": type(loader).__name__,
            "dataset": type(dataset).__name__,
            "items": type(items).__name__,
            "batched_fetch": callable(getattr(dataset, "__getitems__", None)),
            "ms_per_batch": loader_ms_per_batch(loader, args.loader_batches),
        }
        print(f"   {name}: loader alone {loaders[name]['ms_per_batch']:.2f} ms/batch ({loaders[name]['items']})")

    def job(data: MLMDataModule) -> LightningJob:
        model = mlm_module(data.vocab_size, args, **MAIN_JOB)
        model.tokenizer = data.tokenizer
        return LightningJob(model, data.train_dataloader(), trainer_kwargs={"accelerator": "cpu"})

    variants = [
        Variant(OLD, lambda: job(old_data), seed=args.seed),
        Variant(NEW, lambda: job(new_data), seed=args.seed),
    ]
    interleave(variants, rounds=1, steps=1, warmup=1, verbose=False)  # untimed: the process's first fits
    times = interleave(variants, args.rounds, args.steps, args.warmup)
    print(f"load average after the rounds: {', '.join(f'{load:.2f}' for load in os.getloadavg())}")
    result = report(times, baseline=OLD, metric="throughput", work_per_step=args.batch_size * args.max_length)
    result.update(loaders=loaders, load_average=os.getloadavg())
    return result


# -- table and verdicts ---------------------------------------------------------------------------
def setup_peaks(run: dict[str, Any]) -> tuple[int | None, int | None, int | None, int | None]:
    """Sampled peaks of a new-path run: RssAnon and RssFile during setup, and while training."""
    phases = run.get("phase_peaks", {})
    setup = [peaks for phase, peaks in phases.items() if phase != "train"]
    anon = max((peaks.get("RssAnon", 0) for peaks in setup), default=None)
    file = max((peaks.get("RssFile", 0) for peaks in setup), default=None)
    train = phases.get("train", {})
    return anon, file, train.get("RssAnon"), train.get("RssFile")


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


def _rows(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(row[0].ljust(widths[0]) + "".join(cell.rjust(width + 2) for cell, width in zip(row[1:], widths[1:])))


def print_tables(result: dict[str, Any]) -> None:
    new = result.get("new")
    if new:
        print(f"\nnew path: MLMDataModule on a {new['corpus_mb']:.0f} MB corpus, setup + {result['train_steps']} steps")
        rows = [["run", "setup s", "load s", "map s", "split s", "map MB/s", "warm/cold", "setup anon GB"]]
        rows[0] += ["setup file GB", "RSS setup GB", "train anon GB", "train file GB", "peak RSS GB", "map worker GB"]
        rows[0] += ["tokens/s"]
        entries = dict(new["runs"])
        if new.get("reference"):
            entries["reference (embedded)"] = new["reference"]
        for name, run in entries.items():
            if "setup_s" not in run:
                rows.append([name, "KILLED" if run.get("killed") else "FAILED", *["-"] * 13])
                continue
            setup_anon, setup_file, train_anon, train_file = setup_peaks(run)
            rows.append([
                name, f"{run['setup_s']:.1f}", f"{run['load_s']:.1f}", f"{run['map_s']:.1f}", f"{run['split_s']:.2f}",
                f"{run['map_mb_per_s']:.2f}" if "map_mb_per_s" in run and "cold" in name else "-",
                f"{run['warm_ratio']:.2%}" if "warm_ratio" in run else "-", _gb(setup_anon), _gb(setup_file),
                _gb(run["rss_setup"]), _gb(train_anon), _gb(train_file), _gb(run["rss_peak"]),
                _gb(run["map_workers_maxrss"]) if run["map_workers_maxrss"] else "-",
                f"{run['train_tokens_per_s']:,.0f}" if run["train_tokens_per_s"] else "-",
            ])  # fmt: skip
        _rows(rows)
        print(
            "setup s = construction + prepare_data + setup (imports excluded): load = the text file to Arrow, map = "
            "tokenize + pack + write (cold) or open the cache (warm); map MB/s = corpus MB / map s; setup anon / file: "
            "sampled peaks of RssAnon / RssFile during setup (file: ~0.14 GB of libraries + mmapped Arrow pages, "
            "reclaimable); RSS setup: "
            "ru_maxrss after setup; train anon / file: the peaks while training; peak RSS: ru_maxrss at the end; "
            "map worker: the largest num_proc worker's ru_maxrss; tokens/s: median step after 5 (noisy, one process)"
        )
    old = result.get("old")
    if old:
        print(f"\ntoday's path: read_texts + one encode_batch + Python lists (RSS cap {old['cap_gb']:.0f} GB)")
        rows = [["corpus MB", "setup s", "read s", "encode s", "pack s", "split s", "MB/s", "peak RSS GB", "GB/GB"]]
        for size, run in old["runs"].items():
            if run.get("killed"):
                rows.append([size, f"killed at {run['killed_rss'] / GB:.1f} GB after {run['killed_after_s']:.0f} s"])
                rows[-1] += [""] * 7
            elif "setup_s" not in run:
                rows.append([size, "FAILED", *["-"] * 7])
            else:
                rows.append([
                    size, f"{run['setup_s']:.1f}", f"{run['read_s']:.1f}", f"{run['encode_s']:.1f}",
                    f"{run['pack_s']:.1f}", f"{run['split_s']:.1f}", f"{run['mb_per_s']:.2f}", _gb(run["rss_peak"]),
                    f"{(run['rss_peak'] - run['rss_start']) / (int(size) * MB):.1f}",
                ])  # fmt: skip
        _rows(rows)
        if "gb_per_gb" in old:
            print(
                f"fit: peak RSS = {old['intercept_gb']:.2f} GB + {old['gb_per_gb']:.1f} GB per GB of corpus; at "
                f"{result['corpus_mb']} MB: {old['at_corpus_gb']:.1f} GB. MB/s = corpus MB / (read + encode + pack); "
                "GB/GB: (peak RSS - RSS at start) / corpus"
            )
    if result.get("throughput"):
        loaders = result["throughput"]["loaders"]
        print(
            "\nloaders alone: " + ", ".join(f"{name} {n['ms_per_batch']:.2f} ms/batch" for name, n in loaders.items())
        )


def verdicts(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    new = result.get("new")
    if new:
        runs = new["runs"].values()
        peaks = [run["rss_peak"] for run in runs if "rss_peak" in run]
        failed = any("rss_peak" not in run for run in runs)
        checks["new_peak_rss_gb"] = max(peaks) / GB if peaks else None
        checks["new_peak_rss_pass"] = bool(peaks) and not failed and max(peaks) <= args.max_rss_gb * GB
        setups = [run["rss_setup"] for run in runs if "rss_setup" in run]
        anons = [setup_peaks(run)[0] for run in runs if "rss_setup" in run]
        checks["new_setup_rss_gb"] = max(setups) / GB if setups else None
        checks["new_setup_anon_gb"] = max(anons) / GB if anons and None not in anons else None
        reference = new.get("reference") or {}
        checks["reference_peak_rss_gb"] = reference["rss_peak"] / GB if "rss_peak" in reference else None
        ratios = [run.get("warm_ratio") for name, run in new["runs"].items() if "warm" in name]
        checks["warm_ratio"] = max(ratios) if ratios and None not in ratios else None
        checks["warm_ratio_pass"] = checks["warm_ratio"] is not None and checks["warm_ratio"] <= args.max_warm_ratio
    old = result.get("old")
    if old:
        checks["old_killed_at_mb"] = next((int(s) for s, run in old["runs"].items() if run.get("killed")), None)
        checks["old_gb_per_gb"] = old.get("gb_per_gb")
    if result.get("throughput"):
        ratio = result["throughput"]["variants"][NEW]["ratio"]
        checks["tokens_per_s_ratio"] = ratio
        checks["tokens_per_s_pass"] = ratio >= args.min_ratio
    return checks


def print_verdicts(checks: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    if "new_peak_rss_pass" in checks:
        peak = checks["new_peak_rss_gb"]
        print(
            f"{'PASS' if checks['new_peak_rss_pass'] else 'FAIL'}: new path peak RSS (setup + training) "
            f"{'-' if peak is None else f'{peak:.2f}'} GB (target <= {args.max_rss_gb:g} GB)"
        )
        setup_rss, anon, reference = (
            checks[k] for k in ("new_setup_rss_gb", "new_setup_anon_gb", "reference_peak_rss_gb")
        )
        if setup_rss is not None:
            print(
                f"      setup alone: {setup_rss:.2f} GB (anonymous at most "
                f"{'-' if anon is None else f'{anon:.2f}'} GB; "
                "the rest is file-backed: shared libraries, mmapped Arrow pages)"
                + (f"; the same training on the ~10 MB embedded corpus: {reference:.2f} GB" if reference else "")
            )
        ratio = checks["warm_ratio"]
        print(
            f"{'PASS' if checks['warm_ratio_pass'] else 'FAIL'}: warm-cache setup "
            f"{'-' if ratio is None else f'{ratio:.2%}'} of the cold setup (target <= {args.max_warm_ratio:.0%})"
        )
    if "old_gb_per_gb" in checks:
        slope, killed = checks["old_gb_per_gb"], checks["old_killed_at_mb"]
        print(
            f"today's path: {'-' if slope is None else f'{slope:.1f}'} GB of RSS per GB of corpus"
            + (f", killed at {killed} MB (cap {args.old_rss_cap_gb:g} GB)" if killed else "")
        )
    if "tokens_per_s_pass" in checks:
        print(
            f"{'PASS' if checks['tokens_per_s_pass'] else 'FAIL'}: training tokens/s new / today's "
            f"{checks['tokens_per_s_ratio']:.3f}x (target >= {args.min_ratio:.2f}x)"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Write the corpus and tokenizer, run the parts, print the tables and verdicts; returns the numbers."""
    args = setup(parse_args(argv))
    if args.worker:
        config = json.loads(args.worker_config)
        if config.get("threads"):
            torch.set_num_threads(config["threads"])
        record = new_worker(config) if args.worker == "new" else old_worker(config)
        print(RECORD_TAG + json.dumps(record), flush=True)
        return record
    started = time.perf_counter()
    workdir = args.workdir
    lines = corpus_lines()
    corpus = workdir / f"corpus_{args.corpus_mb}mb.txt"
    if "new" in args.parts:
        begin = time.perf_counter()
        wrote = write_corpus(corpus, args.corpus_mb, lines, args.seed)
        print(f"corpus {corpus}: {'written' if wrote else 'kept'} ({time.perf_counter() - begin:.0f} s)", flush=True)
    tokenizer = tokenizer_file(workdir, args.vocab_size, args.max_length)
    result: dict[str, Any] = {
        "claim": "MLMDataModule on datasets: peak RSS, warm-cache setup and training tokens/s against today's path",
        "corpus_mb": args.corpus_mb, "train_steps": args.train_steps, "preset": args.preset,
        "batch_size": args.batch_size, "max_length": args.max_length, "workdir": str(workdir),
        "tokenizer": str(tokenizer), "quick": args.quick, "parts": args.parts,
    }  # fmt: skip
    if "new" in args.parts:
        result["new"] = new_part(args, corpus, tokenizer)
    if "old" in args.parts:
        result["old"] = old_part(args, lines, tokenizer)
    if "throughput" in args.parts:
        result["throughput"] = throughput_part(args, tokenizer)
    print_tables(result)
    result["verdicts"] = verdicts(result, args)
    print_verdicts(result["verdicts"], args)
    result["seconds"] = time.perf_counter() - started
    print(f"total {result['seconds']:.0f} s")
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
