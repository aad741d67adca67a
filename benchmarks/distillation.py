"""Tang et al.'s distillation at our scale: a BERT teacher into a BiLSTM on an augmented transfer set.

What is run, in one process (Brown's informative vs imaginative prose, ``BROWN_PROSE``):

1. ``teacher``: a ``BertClassifier`` (``--teacher-preset``, default small) trained from scratch for
   ``--teacher-steps``; its validation and test accuracy; saved as a checkpoint.
2. Students: Tang et al.'s ``BiLSTMClassifier`` (150 per direction, 200 ReLU), its embeddings
   started from the teacher's (Tang's 300 dims by projection, or the teacher's width when it is
   narrower: BERT-small's 256, copied), each trained for the same
   ``--student-steps`` optimizer steps (batch ``--student-batch``, AdamW lr ``--student-lr``) on
   ``--sources`` training sentences, in the paper's ablation:
   ``labels only`` (those sentences, cross-entropy), ``KD`` (the same sentences, MSE to the
   teacher's logits, alpha 0), ``KD + mask``, ``KD + POS``, ``KD + n-gram`` (one rule of
   ``TransferSetAugmentation`` each, ``--n-iter`` draws per sentence), ``KD + all`` (the paper's
   p_mask = p_pos = 0.1, p_ng = 0.25); ``labels only`` and ``KD + all`` for every seed of ``--seeds``,
   the others for ``--ablation-seeds``. Each run is validated every ``--val-every`` steps; the
   reported test accuracy is the one at its best validation accuracy. The transfer sets' teacher
   logits come from a disk cache shared by the seeds (the teacher labels each set once).
3. Teacher-output cache: ``KD + all`` trained 2 epochs with the in-memory cache; the second
   epoch's time over the first's (the first runs the teacher on every example).
4. Inference speed (CPU, ``torch.inference_mode``): teacher and distilled student on the same test
   sentences at batch 1 and batch 32, interleaved by the harness; and parameter counts, total and
   without the embedding tables.

Claims (issue 21), each printed with PASS/FAIL: the distilled BiLSTM (``KD + all``) beats
``labels only`` by >= 2 accuracy points (mean of the seeds) and closes >= half of the gap to the
teacher; the student is >= 10x faster than the teacher at batch 1 and 32 with >= 20x fewer
parameters; the cached epoch takes <= 0.6x of the uncached one.

Command (the figures in the issue's closing note; the teacher trains about 25 minutes on 2 cores, each
student 3-5 minutes; ``--teacher-checkpoint`` reuses a teacher of an earlier run):

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/distillation.py --threads 2 --student-steps 1000 \
        --val-every 200 --json /tmp/distillation.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.harness import Variant, benchmark_trainer, harness_arguments, interleave, report, setup, write_json
from benchmarks.jobs import prose_arguments, prose_classifier, prose_data
from lightning_efficient import (
    BROWN_PROSE,
    BertClassifier,
    BiLSTMClassifier,
    Distillation,
    TextClassificationDataModule,
    TransferSetAugmentation,
)
from lightning_efficient.models.presets import PRESETS

#: The ablation: name -> TransferSetAugmentation rates (None: no distillation, labels only).
RULES: dict[str, dict[str, float] | None] = {
    "labels only": None,
    "KD": {"p_mask": 0.0, "p_pos": 0.0, "p_ng": 0.0},
    "KD + mask": {"p_mask": 0.1, "p_pos": 0.0, "p_ng": 0.0},
    "KD + POS": {"p_mask": 0.0, "p_pos": 0.1, "p_ng": 0.0},
    "KD + n-gram": {"p_mask": 0.0, "p_pos": 0.0, "p_ng": 0.25},
    "KD + all": {"p_mask": 0.1, "p_pos": 0.1, "p_ng": 0.25},
}
TEACHER, STUDENT = "teacher (BERT)", "student (BiLSTM, distilled)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness_arguments(__doc__, rounds=6, steps=20, warmup=3)
    prose_arguments(parser)
    parser.add_argument("--teacher-preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--teacher-lr", type=float, default=3e-4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--sources", type=int, default=4000, help="training sentences the students see")
    parser.add_argument("--n-iter", type=int, default=10, help="augmented draws per sentence")
    parser.add_argument("--student-steps", type=int, default=2000)
    parser.add_argument("--student-batch", type=int, default=50)
    parser.add_argument("--student-lr", type=float, default=1e-3)
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="of labels only and KD + all")
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=[0], help="of KD and KD + one rule")
    parser.add_argument("--teacher-checkpoint", default=None, help="a trained teacher of ours: skip part 1's training")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--seed", type=int, default=0, help="data split and augmentation seed")
    parser.add_argument("--skip-cache", action="store_true", help="skip part 3")
    parser.add_argument("--skip-speed", action="store_true", help="skip part 4")
    parser.add_argument(
        "--speed-presets",
        nargs="*",
        default=[],
        choices=sorted(PRESETS),
        help="part 4 also for a randomly initialised teacher of these presets beside a BiLSTM of Tang's size "
        "(speed and size do not depend on training)",
    )
    parser.add_argument(
        "--skip-students", action="store_true", help="skip part 2 (part 4 then times an untrained BiLSTM)"
    )
    return parser.parse_args(argv)


def accuracy(model: torch.nn.Module, loader: Any) -> float:
    """Plain accuracy over a loader of dict batches, in eval mode (restored after)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for batch in loader:
            logits = model(batch["input_ids"], batch["attention_mask"])
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    model.train(was_training)
    return correct / total


class BestTest(Callback):
    """Every ``every`` steps: validation accuracy; keeps the test accuracy at the best one."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.best = (-1.0, 0.0, 0)  # (val, test, step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.val, self.test = trainer.datamodule.val_dataloader(), trainer.datamodule.test_dataloader()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            val = accuracy(pl_module, self.val)
            if val > self.best[0]:
                self.best = (val, accuracy(pl_module, self.test), step)


class EpochTimes(Callback):
    """Wall time of each training epoch."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.times.append(time.perf_counter() - self.start)


def student_data(args: argparse.Namespace, rates: dict[str, float] | None) -> TransferSetAugmentation:
    """The students' data: ``--sources`` sentences, augmented by ``rates`` (all 0: the sentences alone)."""
    inner = TextClassificationDataModule(
        train_files=args.train_files, text_column=args.text_column, label_column=args.label_column,
        label_map=None if args.no_label_map else BROWN_PROSE, vocab_size=args.vocab_size,
        max_length=args.max_length, batch_size=args.student_batch, seed=args.seed,
    )  # fmt: skip
    rates = rates or {"p_mask": 0.0, "p_pos": 0.0, "p_ng": 0.0}
    return TransferSetAugmentation(inner, n_iter=args.n_iter, seed=args.seed, max_source_examples=args.sources, **rates)


def bilstm(data: TransferSetAugmentation, teacher_path: str, args: argparse.Namespace) -> BiLSTMClassifier:
    """Tang et al.'s BiLSTM with the teacher's embeddings: 300-d (projected), or the teacher's width when narrower."""
    return BiLSTMClassifier(
        vocab_size=data.vocab_size, num_labels=data.num_labels, label_names=data.label_names,
        embedding_size=min(300, PRESETS[args.teacher_preset].hidden_size), embeddings_from=teacher_path,
        learning_rate=args.student_lr,
    )  # fmt: skip


def train_teacher(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    data = prose_data(args, batch_size=32)
    if args.teacher_checkpoint:  # trained before (e.g. by an earlier run of this script): evaluate it only
        teacher = BertClassifier.load_from_checkpoint(args.teacher_checkpoint, weights_only=True)
        shutil.copy(args.teacher_checkpoint, path)
        val, test = accuracy(teacher, data.val_dataloader()), accuracy(teacher, data.test_dataloader())
        print(f"teacher: {args.teacher_checkpoint}, val {val:.4f}, test {test:.4f}")
        return {"model": teacher, "val": val, "test": test, "data": data}
    torch.manual_seed(args.seed)
    teacher = prose_classifier(data, args.teacher_preset, args.max_length, learning_rate=args.teacher_lr)
    best = BestTest(every=max(args.teacher_steps // 6, 1))
    start = time.perf_counter()
    trainer = benchmark_trainer(max_steps=args.teacher_steps, callbacks=[best], enable_checkpointing=False)
    trainer.fit(teacher, data)
    trainer.save_checkpoint(path)
    val, test = accuracy(teacher, data.val_dataloader()), accuracy(teacher, data.test_dataloader())
    print(f"teacher: {args.teacher_steps} steps in {time.perf_counter() - start:.0f} s, val {val:.4f}, test {test:.4f}")
    return {"model": teacher, "val": val, "test": test, "data": data}


def train_student(args: argparse.Namespace, rule: str, seed: int, teacher_path: str, cache_dir: str) -> dict[str, Any]:
    rates = RULES[rule]
    data = student_data(args, rates)
    pl.seed_everything(seed, verbose=False)
    student = bilstm(data, teacher_path, args)
    callbacks: list[Callback] = [BestTest(args.val_every)]
    if rates is not None:
        callbacks.insert(
            0, Distillation(teacher=teacher_path, loss="mse", alpha=0.0, cache="disk", cache_dir=cache_dir)
        )
    start = time.perf_counter()
    trainer = benchmark_trainer(max_steps=args.student_steps, callbacks=callbacks, enable_checkpointing=False)
    trainer.fit(student, data)
    val, test, step = callbacks[-1].best
    stats = data.transfer_set_stats
    print(
        f"  {rule:12s} seed {seed}: {stats['total']:6d} examples, best val {val:.4f} at step {step}, "
        f"test {test:.4f} ({time.perf_counter() - start:.0f} s)"
    )
    return {"val": val, "test": test, "step": step, "examples": stats["total"], "model": student}


def cache_epochs(args: argparse.Namespace, teacher_path: str) -> dict[str, Any]:
    data = student_data(args, RULES["KD + all"])
    pl.seed_everything(0, verbose=False)
    timer = EpochTimes()
    distillation = Distillation(teacher=teacher_path, cache="memory")
    trainer = benchmark_trainer(max_epochs=2, callbacks=[distillation, timer], enable_checkpointing=False)
    trainer.fit(bilstm(data, teacher_path, args), data)
    first, second = timer.times
    ratio = second / first
    print(f"cache: epoch 1 (teacher on every example) {first:.1f} s, epoch 2 (hits) {second:.1f} s: {ratio:.2f}x "
          f"(hit rate {distillation.cache.hit_rate:.2f}) -> {'PASS' if ratio <= 0.6 else 'FAIL'} (<= 0.6)")  # fmt: skip
    return {"first_epoch_s": first, "second_epoch_s": second, "ratio": ratio, "pass": ratio <= 0.6}


def parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(all, without embedding tables)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    embeddings = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    return total, total - embeddings


def inference_speed(args: argparse.Namespace, teacher: torch.nn.Module, student: torch.nn.Module, data: Any) -> dict:
    batch = next(iter(data.test_dataloader()))
    print(f"\ninference: teacher {type(teacher).__name__} ({teacher.size}), "
          f"student embedding {student.hparams.embedding_size}, batch of {batch['input_ids'].shape[1]} tokens")  # fmt: skip
    results: dict[str, Any] = {}
    for size in (1, 32):
        ids, mask = batch["input_ids"][:size], batch["attention_mask"][:size]

        def forward(model: torch.nn.Module, ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> Any:
            model.eval()

            def step() -> None:
                with torch.inference_mode():
                    model(ids, mask)

            return step

        times = interleave(
            [Variant(TEACHER, lambda: forward(teacher)), Variant(STUDENT, lambda: forward(student))],
            args.rounds, args.steps, args.warmup, verbose=False,
        )  # fmt: skip
        print(f"inference, batch {size}:")
        table = report(times, baseline=TEACHER, metric="throughput", work_per_step=size, unit="sentences")
        speedup = table["variants"][STUDENT]["ratio"]
        results[f"batch_{size}"] = {"speedup": speedup, "pass": speedup >= 10}
        print(f"  student speed-up {speedup:.1f}x -> {'PASS' if speedup >= 10 else 'FAIL'} (>= 10x)")
    (t_all, t_body), (s_all, s_body) = parameters(teacher), parameters(student)
    results["parameters"] = {"teacher": [t_all, t_body], "student": [s_all, s_body], "pass": t_all >= 20 * s_all}
    print(
        f"parameters: teacher {t_all:,} ({t_body:,} without embeddings), student {s_all:,} ({s_body:,}): "
        f"{t_all / s_all:.1f}x fewer ({t_body / s_body:.1f}x without embeddings) -> "
        f"{'PASS' if t_all >= 20 * s_all else 'FAIL'} (>= 20x)"
    )
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = setup(parse_args(argv))
    work = Path(tempfile.mkdtemp(prefix="distillation_benchmark_"))
    teacher_path = str(work / "teacher.ckpt")
    teacher = train_teacher(args, Path(teacher_path))
    runs: dict[str, list[dict[str, Any]]] = {rule: [] for rule in args.rules if not args.skip_students}
    for rule, results in runs.items():
        for seed in args.seeds if rule in ("labels only", "KD + all") else args.ablation_seeds:
            results.append(train_student(args, rule, seed, teacher_path, str(work / "teacher_outputs")))
    if runs:
        print(
            f"\nBiLSTM students, {args.sources} source sentences, {args.student_steps} steps, test accuracy at best val:"
        )
        print(f"  {'teacher':14s} {teacher['test']:.4f}")
    summary: dict[str, Any] = {"teacher": {"val": teacher["val"], "test": teacher["test"]}, "students": {}}
    for rule, results in runs.items():
        tests = [r["test"] for r in results]
        mean, spread = statistics.mean(tests), (max(tests) - min(tests))
        summary["students"][rule] = {"tests": tests, "mean": mean, "examples": results[0]["examples"]}
        print(f"  {rule:14s} {mean:.4f} (range {spread:.4f}; {results[0]['examples']} training examples)")
    verdicts: dict[str, Any] = {}
    if "labels only" in runs and "KD + all" in runs:
        base, distilled = summary["students"]["labels only"]["mean"], summary["students"]["KD + all"]["mean"]
        gain, gap = 100 * (distilled - base), teacher["test"] - base
        closed = (distilled - base) / gap if gap > 0 else float("nan")
        verdicts["gain_points"] = {"value": gain, "pass": gain >= 2.0}
        verdicts["gap_closed"] = {"value": closed, "pass": closed >= 0.5}
        print(f"KD + all vs labels only: {gain:+.2f} points -> {'PASS' if gain >= 2 else 'FAIL'} (>= 2); "
              f"closes {closed:.0%} of the gap to the teacher -> {'PASS' if closed >= 0.5 else 'FAIL'} (>= 50%)")  # fmt: skip
    if not args.skip_cache:
        verdicts["cache"] = cache_epochs(args, teacher_path)
    if not args.skip_speed:
        data = teacher["data"]
        student = runs["KD + all"][0]["model"] if runs.get("KD + all") else bilstm(data, teacher_path, args)
        verdicts["inference"] = inference_speed(args, teacher["model"], student, data)
        for preset in args.speed_presets:  # speed and size only: random weights of a bigger teacher
            torch.manual_seed(0)
            big = prose_classifier(data, preset, args.max_length)
            tang = BiLSTMClassifier(vocab_size=data.vocab_size, num_labels=data.num_labels, label_names=data.label_names,
                                    embedding_size=min(300, PRESETS[preset].hidden_size))  # fmt: skip
            verdicts[f"inference_{preset}"] = inference_speed(args, big, tang, data)
    return write_json(args.json, {"arguments": {k: str(v) for k, v in vars(args).items()}, **summary, **verdicts})


if __name__ == "__main__":
    main()
