"""Sequence-level distillation for translation (Kim & Rush 2016): a student with half the layers on the teacher's beams.

What is run, in one process (the embedded World English Bible -> Louis Segond 1910 pairs):

1. ``teacher``: a ``Translation`` model (``--preset``, ``--teacher-layers`` in each stack) trained for
   ``--teacher-steps`` on the whole training split; its test BLEU (beam ``--num-beams``, the first
   ``--test-batches`` test batches).
2. ``student, references``: the same width with ``--teacher-layers // 2`` layers, trained
   ``--student-steps`` on the references of the first ``--train-pairs`` training pairs.
3. ``student, sequence-level KD``: the same student trained as long on the teacher's beam-search
   translations of the same sources (``Distillation(sequence_level=True, alpha=1.0)``; the
   translations are generated once before training, and their generation time is reported).

Claims (issue 21), each printed with PASS/FAIL: the distilled student keeps >= 90% of the
teacher's BLEU, and beats the student trained on the references.

Command (the figures in the issue's closing note):

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/sequence_distillation.py --threads 2 --json /tmp/seqkd.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl

from benchmarks.harness import benchmark_trainer, harness_arguments, setup, write_json
from lightning_efficient import Distillation, Translation, TranslationDataModule
from lightning_efficient.models.presets import PRESETS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness_arguments(__doc__)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--student-steps", type=int, default=1000)
    parser.add_argument(
        "--train-pairs", type=int, default=12000, help="pairs the teacher translates (and all train on)"
    )
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--test-batches", type=int, default=8, help="test batches decoded for BLEU")
    parser.add_argument("--train-file", default=None, help="a jsonl of {en, fr} pairs (default: the embedded Bible)")
    parser.add_argument("--source-column", default="en")
    parser.add_argument("--target-column", default="fr")
    return parser.parse_args(argv)


def data(args: argparse.Namespace, cut: bool = True) -> TranslationDataModule:
    """The pairs, set up for fit; with ``cut`` the training split is its first ``--train-pairs`` (val and test whole)."""
    datamodule = TranslationDataModule(
        train_files=[args.train_file] if args.train_file else None, source_column=args.source_column, target_column=args.target_column,
        vocab_size=args.vocab_size, max_length=args.max_length, batch_size=args.batch_size,
    )  # fmt: skip
    datamodule.setup("fit")
    if cut:
        datamodule.splits["train"] = datamodule.splits["train"][: args.train_pairs]
    return datamodule


def model(args: argparse.Namespace, datamodule: TranslationDataModule, layers: int) -> Translation:
    return Translation(
        vocab_size=datamodule.vocab_size, preset=args.preset, num_layers=layers, max_length=args.max_length,
        num_beams=args.num_beams, bleu_batches=0, learning_rate=args.learning_rate,
    )  # fmt: skip


def train(module: Translation, datamodule: Any, steps: int, callbacks: list) -> tuple[pl.Trainer, float]:
    start = time.perf_counter()
    trainer = benchmark_trainer(max_steps=steps, callbacks=callbacks, enable_checkpointing=False)
    trainer.fit(module, datamodule)
    return trainer, time.perf_counter() - start


def bleu(args: argparse.Namespace, module: Translation, datamodule: TranslationDataModule) -> float:
    tester = benchmark_trainer(accelerator="cpu", limit_test_batches=args.test_batches)
    (metrics,) = tester.test(module, datamodule, verbose=False)
    return 100 * float(metrics["test/bleu"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = setup(parse_args(argv))
    work = Path(tempfile.mkdtemp(prefix="sequence_distillation_"))
    student_layers = max(1, args.teacher_layers // 2)
    results: dict[str, Any] = {}

    pl.seed_everything(0, verbose=False)
    datamodule = data(args, cut=False)  # the teacher learns from every training pair
    teacher = model(args, datamodule, args.teacher_layers)
    trainer, seconds = train(teacher, datamodule, args.teacher_steps, [])
    teacher_path = work / "teacher.ckpt"
    trainer.save_checkpoint(teacher_path)
    results["teacher"] = {"layers": args.teacher_layers, "bleu": bleu(args, teacher, datamodule), "train_s": seconds}
    print(f"teacher ({args.teacher_layers} layers): BLEU {results['teacher']['bleu']:.2f} ({seconds:.0f} s)")

    pl.seed_everything(1, verbose=False)
    references = data(args)
    student = model(args, references, student_layers)
    _, seconds = train(student, references, args.student_steps, [])
    results["references"] = {"layers": student_layers, "bleu": bleu(args, student, references), "train_s": seconds}
    print(f"student ({student_layers} layers), references: BLEU {results['references']['bleu']:.2f} ({seconds:.0f} s)")

    pl.seed_everything(1, verbose=False)
    distilled_data = data(args)
    student = model(args, distilled_data, student_layers)
    distillation = Distillation(
        teacher=str(teacher_path), sequence_level=True, num_beams=args.num_beams, alpha=1.0,
        cache_dir=str(work / "translations"),
    )  # fmt: skip
    _, seconds = train(student, distilled_data, args.student_steps, [distillation])
    results["sequence_kd"] = {"layers": student_layers, "bleu": bleu(args, student, distilled_data), "train_s": seconds}
    print(f"student ({student_layers} layers), sequence-level KD: BLEU {results['sequence_kd']['bleu']:.2f} "
          f"({seconds:.0f} s, the teacher's translations included)")  # fmt: skip

    kept = results["sequence_kd"]["bleu"] / max(results["teacher"]["bleu"], 1e-9)
    beats = results["sequence_kd"]["bleu"] > results["references"]["bleu"]
    results["verdicts"] = {"kept_fraction": kept, "kept_pass": kept >= 0.9, "beats_references": beats}
    print(f"sequence-level KD keeps {kept:.0%} of the teacher's BLEU -> {'PASS' if kept >= 0.9 else 'FAIL'} (>= 90%); "
          f"{'beats' if beats else 'does not beat'} the student on references -> {'PASS' if beats else 'FAIL'}")  # fmt: skip
    return write_json(args.json, results)


if __name__ == "__main__":
    main()
