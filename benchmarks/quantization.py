"""Quantization-aware training and int8 export: CPU inference speed, saved size, accuracy against fp32.

Claims measured (issue 9):

1. BERT-small and BERT-base shapes, batch 8 x 128 tokens, 2 threads: the exported int8 model infers
   >= 2x faster than fp32 and its saved file is >= 3.5x smaller.
2. Brown prose classification fine-tuned with QAT vs fp32: accuracy within 1 point; post-training
   quantization (the same conversion without QAT) reported beside it.

Part 1, for each ``--presets`` shape (a ``BertClassifier``'s HF model, random weights: speed and size
do not depend on the values), times one classification of a fixed batch under
``torch.inference_mode`` for these variants, interleaved in rounds by ``benchmarks/harness.py``:

- ``fp32``: the model as it is (the baseline);
- ``ours (torchao Intx)``: :func:`~lightning_efficient.callbacks.quantization.export` of a
  ``QuantizationAwareTraining(embeddings=True)`` model: torchao's conversion of the QAT scheme
  (``Int8DynamicActivationIntxWeightConfig``, int8 weights per channel, plus int8 embedding tables);
  outputs equal to the fake-quantized model's;
- ``torchao int8 matmul``: torchao's ``Int8DynamicActivationInt8WeightConfig`` on the same layers
  (int8 x int8 matrix products through ``torch._int_mm``), torchao's other CPU int8 path;
- ``torch.ao quantize_dynamic``: the deprecated ``torch.ao.quantization.quantize_dynamic`` (fbgemm
  kernels, per-tensor activations) on every Linear, the baseline the issue asks for;
- with ``--compile``, also each torchao variant under ``torch.compile``.

The saved size is the bytes of ``torch.save(state_dict)`` (ours: :func:`save_quantized`'s files).

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
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from harness import Variant, harness_arguments, interleave, report, setup, write_json

from lightning_efficient import BROWN_PROSE, BertClassifier, TextClassificationDataModule
from lightning_efficient.callbacks.quantization import QuantizationAwareTraining, export, save_quantized
from lightning_efficient.models.presets import PRESETS

FP32, OURS, INT_MM, AO = "fp32", "ours (torchao Intx)", "torchao int8 matmul", "torch.ao quantize_dynamic"


def parse_args(argv: list[str] | None = None) -> Any:
    parser = harness_arguments(
        "QAT int8 export: CPU inference speed, size and accuracy vs fp32", rounds=4, steps=10, warmup=3
    )
    parser.add_argument("--presets", nargs="+", default=["small", "base"], choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8, help="examples per timed inference batch")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--compile", action="store_true", help="also time the torchao variants under torch.compile")
    parser.add_argument("--skip-accuracy", action="store_true", help="skip part 2 (fine-tuning)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="part 2's model size")
    parser.add_argument(
        "--train-files", nargs="+", default=None, help="part 2's labelled files (default: embedded Brown)"
    )
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="genre")
    parser.add_argument("--no-label-map", action="store_true", help="part 2: labels as they are (not BROWN_PROSE)")
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


def block_linears(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and ".encoder.layer." in f".{name}"


def inference_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    def step() -> None:
        with torch.inference_mode():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    return step


def build_variants(preset: str, args: Any) -> tuple[dict[str, torch.nn.Module], dict[str, int], float]:
    """The models of part 1, their saved sizes, and ours' max |logit difference| to its fake-quantized model."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, MappingType, PerRow, quantize_

    torch.manual_seed(args.seed)
    module = BertClassifier(vocab_size=args.vocab_size, num_labels=2, preset=preset, max_length=args.max_length).eval()
    fp32 = module.model
    batch = example_batch(args)
    models: dict[str, torch.nn.Module] = {FP32: fp32}
    sizes = {FP32: saved_bytes(fp32.state_dict())}

    ours_module = copy.deepcopy(module)
    qat = QuantizationAwareTraining(embeddings=True)
    qat.attach(ours_module)
    qat.active = True
    with torch.inference_mode():
        fake = ours_module.model(**batch).logits
    result = export(ours_module, qat)
    with torch.inference_mode():
        difference = float((ours_module.model(**batch).logits - fake).abs().max())
    with tempfile.TemporaryDirectory() as directory:
        save_quantized(ours_module, directory, result)
        sizes[OURS] = sum(f.stat().st_size for f in Path(directory).iterdir())
    models[OURS] = ours_module.model

    int_mm = copy.deepcopy(fp32)
    config = Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC, granularity=PerRow())
    quantize_(int_mm, config, filter_fn=block_linears)
    models[INT_MM], sizes[INT_MM] = int_mm, saved_bytes(int_mm.state_dict())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {torch.nn.Linear}, dtype=torch.qint8)
    models[AO], sizes[AO] = ao, saved_bytes(ao.state_dict())
    if args.compile:
        for name in (OURS, INT_MM):
            compiled = copy.deepcopy(models[name])
            compiled.compile()
            models[f"{name}, compiled"] = compiled
    return models, sizes, difference


def example_batch(args: Any) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(5, args.vocab_size, (args.batch_size, args.max_length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def part1(args: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for preset in args.presets:
        models, sizes, difference = build_variants(preset, args)
        batch = example_batch(args)
        print(f"\nBERT-{preset}: batch {args.batch_size} x {args.max_length}, {torch.get_num_threads()} threads; "
              f"ours: max |logit| difference converted vs fake-quantized {difference:.1e}")  # fmt: skip
        variants = [
            Variant(name, lambda m=model, b=batch: inference_step(m, b), seed=args.seed) for name, model in models.items()
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
        table.update(sizes=sizes, speedup=speed, size_ratio=size_ratio, max_logit_difference=difference)
        results[preset] = table
    return results


def accuracy(model: BertClassifier, datamodule: TextClassificationDataModule, args: Any) -> float:
    limit = args.val_batches if args.val_batches is not None else 1.0
    validator = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                           limit_val_batches=limit)  # fmt: skip
    (metrics,) = validator.validate(model, datamodule, verbose=False)
    return float(metrics["val/accuracy"])


def fit(
    model: BertClassifier, datamodule: TextClassificationDataModule, steps: int, callbacks: list[pl.Callback]
) -> float:
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks)  # fmt: skip
    trainer.fit(model, datamodule)
    return float(trainer.callback_metrics.get("train/loss", float("nan")))


def part2(args: Any) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    datamodule = TextClassificationDataModule(
        train_files=args.train_files, text_column=args.text_column, label_column=args.label_column,
        label_map=None if args.no_label_map else BROWN_PROSE, vocab_size=args.vocab_size, max_length=args.max_length,
        batch_size=32, seed=args.seed,
    )  # fmt: skip
    datamodule.setup("fit")
    model = BertClassifier(vocab_size=datamodule.vocab_size, num_labels=len(datamodule.label_names),
                           label_names=datamodule.label_names, preset=args.preset, max_length=args.max_length)  # fmt: skip
    fit(model, datamodule, args.prefix_steps, [])
    fp32, quantized = copy.deepcopy(model), copy.deepcopy(model)
    fit(fp32, datamodule, args.qat_steps, [])
    qat = QuantizationAwareTraining(embeddings=True)
    fit(quantized, datamodule, args.qat_steps, [qat])
    fake_accuracy = accuracy(quantized, datamodule, args)
    export(quantized, qat)
    ptq = copy.deepcopy(fp32)
    ptq_qat = QuantizationAwareTraining(embeddings=True)
    ptq_qat.attach(ptq)
    export(ptq, ptq_qat)
    result = {
        "accuracy_fp32": accuracy(fp32, datamodule, args),
        "accuracy_qat_fake_quant": fake_accuracy,
        "accuracy_qat_int8": accuracy(quantized, datamodule, args),
        "accuracy_ptq_int8": accuracy(ptq, datamodule, args),
    }
    drop = result["accuracy_fp32"] - result["accuracy_qat_int8"]
    print(f"\nclassification, BERT-{args.preset}, {args.prefix_steps} fp32 steps then {args.qat_steps} fp32 / QAT steps: accuracy "
          f"fp32 {result['accuracy_fp32']:.4f}, QAT int8 {result['accuracy_qat_int8']:.4f} (fake-quant "
          f"{fake_accuracy:.4f}), PTQ int8 {result['accuracy_ptq_int8']:.4f}")  # fmt: skip
    print(f"{'PASS' if drop <= 0.01 else 'FAIL'}: QAT int8 within 1 point of fp32 (drop {100 * drop:+.2f} points)")
    result["qat_drop_points"] = 100 * drop
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup(args)
    result: dict[str, Any] = {"inference": part1(args)}
    if not args.skip_accuracy:
        result["accuracy"] = part2(args)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
