"""Quantization-aware training and int8 export: CPU inference speed, saved size, accuracy against fp32.

Claims measured (issue 9):

1. BERT-small and BERT-base shapes, batch 8 x 128 tokens, 2 threads: the exported int8 model infers
   >= 2x faster than fp32 and its saved file is >= 3.5x smaller.
2. Brown prose classification fine-tuned with QAT vs fp32: accuracy within 1 point; post-training
   quantization (the same conversion without QAT) reported beside it.

Part 1, for each ``--presets`` shape (a ``BertClassifier``'s HF model, random weights: speed and size
do not depend on the values), times one classification of a fixed batch under
``torch.inference_mode`` for these variants, interleaved in rounds by ``benchmarks/harness.py``:

- ``fp32``: the model as it is, eager (the baseline);
- ``fp32, compiled``: the same under ``torch.compile`` with freezing (what compiling alone gains);
- ``ours int8``: :func:`~lightning_efficient.callbacks.export_quantized` of a
  ``QuantizationAwareTraining(embeddings=True)`` model (int8 inputs symmetric per tensor, int8
  weights per channel: torchao's ``Int8Tensor``; int8 embedding tables), then
  :func:`~lightning_efficient.callbacks.quantization.compile_quantized`: the claim;
- ``ours int8, eager``: the same without compiling (torchao's eager int8 layers);
- ``ours int8 per token``: ``activations="per_token"``, compiled;
- ``ours Intx (asymmetric per token)``: ``activations="asymmetric_per_token"`` (torchao's
  ``IntxUnpackedToInt8Tensor``, the edge-runtime layout), compiled;
- ``torch.ao quantize_dynamic``: the deprecated ``torch.ao.quantization.quantize_dynamic`` (fbgemm
  kernels, eager) on every Linear, the baseline the issue asks for.

The saved size is the bytes of ``torch.save(state_dict)`` (ours: :func:`save_quantized`'s files).
Also reported: the largest logit difference of ours, converted vs fake-quantized and compiled vs
eager.

Part 2 (skip with ``--skip-accuracy``): a BERT-small classifier trains ``--prefix-steps`` fp32 steps,
then two continuations of ``--qat-steps`` steps from the same weights: fp32, and QAT (fake
quantization from the first step of the continuation). Reported: validation accuracy of the fp32
model, of the QAT model converted to int8, and of the fp32 model converted without QAT (PTQ).

    LIGHTNING_EFFICIENT_CACHE=/tmp/le_cache python benchmarks/quantization.py --threads 2     # ~15 min on 2 cores
    python benchmarks/quantization.py --presets tiny --vocab-size 300 --skip-accuracy --rounds 1 --steps 2 --warmup 1
"""

from __future__ import annotations

import copy
import io
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/x.py): the benchmarks package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch

from benchmarks.harness import Variant, benchmark_trainer, harness_arguments, interleave, report, setup, write_json
from benchmarks.jobs import prose_arguments, prose_classifier, prose_data, validation_accuracy
from lightning_efficient import BertClassifier, TextClassificationDataModule
from lightning_efficient.callbacks.quantization import (
    QuantizationAwareTraining,
    compile_quantized,
    save_quantized,
)
from lightning_efficient.callbacks.quantization import (
    export_quantized as export,
)
from lightning_efficient.models.presets import PRESETS

FP32, FP32_COMPILED, OURS, OURS_EAGER = "fp32", "fp32, compiled", "ours int8", "ours int8, eager"
PER_TOKEN, INTX, AO = "ours int8 per token", "ours Intx (asymmetric per token)", "torch.ao quantize_dynamic"


def parse_args(argv: list[str] | None = None) -> Any:
    parser = harness_arguments(
        "QAT int8 export: CPU inference speed, size and accuracy vs fp32", rounds=4, steps=10, warmup=3
    )
    parser.add_argument("--presets", nargs="+", default=["small", "base"], choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8, help="examples per timed inference batch")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--skip-accuracy", action="store_true", help="skip part 2 (fine-tuning)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="part 2's model size")
    prose_arguments(parser)  # part 2's data
    parser.add_argument("--prefix-steps", type=int, default=300, help="fp32 fine-tuning steps before the two branches")
    parser.add_argument("--qat-steps", type=int, default=150, help="steps of each continuation (fp32, QAT)")
    parser.add_argument("--val-batches", type=int, default=None, help="limit validation batches (default: all)")
    parser.add_argument("--min-speedup", type=float, default=2.0)
    parser.add_argument("--min-size-ratio", type=float, default=3.5)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def saved_bytes(state: dict[str, Any]) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def inference_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    def step() -> None:
        with torch.inference_mode():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    return step


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).logits


def exported(module: BertClassifier, activations: str, batch: dict[str, torch.Tensor]) -> tuple[Any, int, float]:
    """``module``'s HF model through QAT (embeddings too) and :func:`export`: the eager int8 model, its saved
    bytes, and its max |logit difference| to the fake-quantized model."""
    module = copy.deepcopy(module)
    qat = QuantizationAwareTraining(activations=activations, embeddings=True)
    qat.attach(module)
    qat.active = True
    fake = logits(module.model, batch)
    result = export(module, qat)
    difference = float((logits(module.model, batch) - fake).abs().max())
    with tempfile.TemporaryDirectory() as directory:
        save_quantized(module, directory, result)
        size = sum(f.stat().st_size for f in Path(directory).iterdir())
    return module.model, size, difference


def build_variants(preset: str, args: Any) -> tuple[dict[str, torch.nn.Module], dict[str, int], dict[str, float]]:
    """The models of part 1, their saved sizes, and ours' max |logit differences| (converted vs fake-quantized,
    compiled vs eager)."""
    torch.manual_seed(args.seed)
    module = BertClassifier(vocab_size=args.vocab_size, num_labels=2, preset=preset, max_length=args.max_length).eval()
    fp32 = module.model
    batch = example_batch(args)
    models: dict[str, torch.nn.Module] = {FP32: fp32}
    sizes = {FP32: saved_bytes(fp32.state_dict())}
    models[FP32_COMPILED] = compile_quantized(copy.deepcopy(fp32))  # the same compile options, on fp32

    differences: dict[str, float] = {}
    for name, activations in ((OURS, "per_tensor"), (PER_TOKEN, "per_token"), (INTX, "asymmetric_per_token")):
        eager, sizes[name], differences[f"{name}: converted vs fake-quantized"] = exported(module, activations, batch)
        if name == OURS:
            models[OURS_EAGER] = eager
        models[name] = compile_quantized(copy.deepcopy(eager))
        difference = (logits(models[name], batch) - logits(eager, batch)).abs().max()
        differences[f"{name}: compiled vs eager"] = float(difference)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {torch.nn.Linear}, dtype=torch.qint8)
    models[AO], sizes[AO] = ao, saved_bytes(ao.state_dict())
    return models, sizes, differences


def example_batch(args: Any) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(5, args.vocab_size, (args.batch_size, args.max_length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def part1(args: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for preset in args.presets:
        models, sizes, differences = build_variants(preset, args)
        batch = example_batch(args)
        print(f"\nBERT-{preset}: batch {args.batch_size} x {args.max_length}, {torch.get_num_threads()} threads")
        for label, difference in differences.items():
            print(f"  max |logit difference|, {label}: {difference:.1e}")
        variants = [
            Variant(name, lambda m=model, b=batch: inference_step(m, b), seed=args.seed)
            for name, model in models.items()
        ]
        times = interleave(variants, args.rounds, args.steps, args.warmup)
        table = report(
            times, baseline=FP32, metric="throughput", work_per_step=args.batch_size * args.max_length, unit="tokens"
        )
        print(f"{'variant':32s} {'saved MB':>9s} {'size ratio':>10s}")
        for name, size in sizes.items():
            print(f"{name:32s} {size / 1e6:9.2f} {sizes[FP32] / size:10.2f}x")
        speed = table["variants"][OURS]["ratio"]  # throughput ratio: > 1 is faster
        size_ratio = sizes[FP32] / sizes[OURS]
        for claim, value, target in (("faster", speed, args.min_speedup), ("smaller", size_ratio, args.min_size_ratio)):
            print(
                f"{'PASS' if value >= target else 'FAIL'}: BERT-{preset} ours {value:.2f}x {claim} than fp32 (target >= {target}x)"
            )
        compiled_speed = speed / table["variants"][FP32_COMPILED]["ratio"]
        print(f"ours vs fp32 compiled the same way: {compiled_speed:.2f}x")
        table.update(sizes=sizes, speedup=speed, speedup_vs_compiled_fp32=compiled_speed, size_ratio=size_ratio,
                     max_logit_differences=differences)  # fmt: skip
        results[preset] = table
    return results


def fit(
    model: BertClassifier, datamodule: TextClassificationDataModule, steps: int, callbacks: list[pl.Callback]
) -> float:
    trainer = benchmark_trainer(accelerator="cpu", max_steps=steps, callbacks=callbacks)
    trainer.fit(model, datamodule)
    return float(trainer.callback_metrics.get("train/loss", float("nan")))


def part2(args: Any) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    datamodule = prose_data(args, batch_size=32)
    model = prose_classifier(datamodule, args.preset, args.max_length)
    fit(model, datamodule, args.prefix_steps, [])
    fp32, quantized = copy.deepcopy(model), copy.deepcopy(model)
    fit(fp32, datamodule, args.qat_steps, [])
    qat = QuantizationAwareTraining(embeddings=True)
    fit(quantized, datamodule, args.qat_steps, [qat])
    fake_accuracy = validation_accuracy(quantized, datamodule, args.val_batches)
    export(quantized, qat)
    ptq = copy.deepcopy(fp32)
    ptq_qat = QuantizationAwareTraining(embeddings=True)
    ptq_qat.attach(ptq)
    export(ptq, ptq_qat)
    result = {
        "accuracy_fp32": validation_accuracy(fp32, datamodule, args.val_batches),
        "accuracy_qat_fake_quant": fake_accuracy,
        "accuracy_qat_int8": validation_accuracy(quantized, datamodule, args.val_batches),
        "accuracy_ptq_int8": validation_accuracy(ptq, datamodule, args.val_batches),
    }
    drop = result["accuracy_fp32"] - result["accuracy_qat_int8"]
    print(f"\nclassification, BERT-{args.preset}, {args.prefix_steps} fp32 steps then {args.qat_steps} fp32 / QAT steps: accuracy "
          f"fp32 {result['accuracy_fp32']:.4f}, QAT int8 {result['accuracy_qat_int8']:.4f} (fake-quant "
          f"{fake_accuracy:.4f}), PTQ int8 {result['accuracy_ptq_int8']:.4f}")  # fmt: skip
    print(f"{'PASS' if drop <= 0.01 else 'FAIL'}: QAT int8 within 1 point of fp32 (drop {100 * drop:+.2f} points)")
    result["qat_drop_points"] = 100 * drop
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = setup(parse_args(argv))
    result: dict[str, Any] = {"inference": part1(args)}
    if not args.skip_accuracy:
        result["accuracy"] = part2(args)
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
