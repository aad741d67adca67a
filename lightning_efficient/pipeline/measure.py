"""Measure a run's final checkpoint as the model a user would deploy: exported, saved, evaluated, timed.

:func:`measure_checkpoint` reads a run's config (a LightningCLI YAML, technique callbacks included) and its
final checkpoint, and

1. builds the model and the data module as ``lightning-efficient validate -c CONFIG --ckpt_path CKPT`` does
   (:class:`~lightning_efficient.cli.EfficientCLI`: class paths, data-derived model arguments, the
   checkpoint's hyperparameters and tokenizer, the early checks of ``--ckpt_path``), without running it;
2. loads the checkpoint's weights (pruning masks are multiplied into their weights and dropped);
3. exports what the run trained for: with a structured ``MagnitudePruning`` (``heads``, ``neurons``,
   ``heads_and_neurons``) :func:`~lightning_efficient.callbacks.export_pruned` slices the pruned units out
   (``"pruned"``: a smaller dense model); unstructured pruning, and the masks of sparse training
   (``DynamicSparsity``, ``PruneAtInit``, ``LotteryTicket``), stay dense with their zero weights (``"sparse"``); with ``QuantizationAwareTraining``
   :func:`~lightning_efficient.callbacks.quantization.export_quantized` converts it into torchao's int8
   model with the callback's settings and the held weight scales of the checkpoint (``"int8"``);
4. saves it into the output directory (``save_pretrained``, or
   :func:`~lightning_efficient.callbacks.quantization.save_quantized` for int8; plus the ``tokenizer.json``
   of a text model) and reads it back from there (``load_pruned`` / ``load_quantized``), so what is
   evaluated and timed is what the files hold;
5. evaluates it on the validation set (the config's ``trainer.limit_val_batches``) with a plain CPU
   ``Trainer`` and no callbacks, and times its forward pass on the CPU at each batch size, on rows of the
   validation set padded to the data module's ``max_length`` (images: the data's image size). An int8
   model is timed compiled (:func:`~lightning_efficient.callbacks.quantization.compile_quantized`, its
   fused int8 kernels; ``compile=False``: torchao's eager layers).

The result (the ``measures`` of the pipeline's stage records) is returned and written to
``<output>/measures.json``::

    {"model_class": "BertClassifier", "exported": ["pruned", "int8"], "params": 123456,
     "nonzero_params": 100000, "disk_bytes": 456789, "latency_ms": {"1": 3.2, "32": 40.1},
     "latency_threads": 2, "metrics": {"val/accuracy": 0.81, "val/loss": 0.5, ...}}

``params`` counts the elements of every parameter and floating-point buffer of the exported model (an
int8 weight counts the elements of the weight it stands for; tied weights once), ``nonzero_params`` those
that are not zero; ``disk_bytes`` is the size of the files of the saved model (``measures.json`` aside).

From the command line (one summary line; a mistake gives one ``error:`` line and exit status 2)::

    python -m lightning_efficient.pipeline.measure --config runs/tiny/prune/stage.yaml \\
        --checkpoint runs/tiny/prune/checkpoints/last.ckpt --output runs/tiny/prune/exported --threads 2

Examples:
    >>> measure_checkpoint("configs/nowhere.yaml", "runs/nowhere.ckpt", "runs/measure")
    Traceback (most recent call last):
    ...
    lightning_efficient.errors.ConfigurationError: config 'configs/nowhere.yaml' does not exist
    >>> main(["--config", "configs/bert/tiny_classify_prose.yaml", "--checkpoint", "runs/nowhere.ckpt",
    ...       "--output", "runs/measure"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    SystemExit: 2
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from transformers.utils import logging as transformers_logging

from lightning_efficient.atomic_write import FILE_MODE, write_atomically
from lightning_efficient.callbacks import MagnitudePruning, export_pruned
from lightning_efficient.checkpoint import PRUNING_MASK_SUFFIXES, load_checkpoint, pruning_mask_keys
from lightning_efficient.cli import TRACEBACK_ENV, EfficientCLI, exit_on_user_error, hide_harmless_noise
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError, check_int
from lightning_efficient.exported import load_pruned

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_REPEATS",
    "MEASURES_FILE",
    "SUPPORTED_MODELS",
    "TOKENIZER_FILE",
    "WARMUP_CALLS",
    "main",
    "measure_checkpoint",
]

#: The file the measures are written to, in the output directory.
MEASURES_FILE = "measures.json"
#: The tokenizer saved beside a text model (the name ``pretrained=`` directories are read with).
TOKENIZER_FILE = "tokenizer.json"
#: The module classes measured (each holds a transformers model in ``.model``).
SUPPORTED_MODELS = ("BertClassifier", "BertMLM", "Translation", "ViTClassifier")
#: Batch sizes timed by default.
DEFAULT_BATCH_SIZES = (1, 32)
#: Timed forward passes per batch size (the median is reported); a tiny model takes well under a second.
DEFAULT_REPEATS = 10
#: Untimed forward passes before the timed ones (the first one of a compiled int8 model compiles it).
WARMUP_CALLS = 2

#: What pads each text input to ``max_length`` (``input_ids``: the data's padding id).
_TEXT_FILL = {"attention_mask": 0, "labels": -100}


def measure_checkpoint(
    config: str | Path,
    checkpoint: str | Path,
    output_dir: str | Path,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    repeats: int = DEFAULT_REPEATS,
    threads: int | None = None,
    compile: bool = True,
) -> dict[str, Any]:
    """Export, save, evaluate and time the model of ``checkpoint`` as a user would deploy it (see the module doc).

    Args:
        config: The run's full LightningCLI YAML (technique callbacks included in ``trainer.callbacks``).
        checkpoint: The run's final checkpoint (``last.ckpt``).
        output_dir: Where the exported model and ``measures.json`` are written (created when missing).
        batch_sizes: The batch sizes timed (each >= 1).
        repeats: Timed forward passes per batch size (the median is reported), after :data:`WARMUP_CALLS`.
        threads: ``torch.set_num_threads`` while timing (restored afterwards); None: the current setting.
        compile: Time an int8 model compiled (its fused int8 kernels, as ``load_quantized`` gives it; the
            first call compiles, seconds to a minute); False: torchao's eager int8 layers.

    Returns:
        ``{"model_class", "exported", "params", "nonzero_params", "disk_bytes", "latency_ms",
        "latency_threads", "metrics"}`` (``latency_ms`` keyed by the batch size as a string).

    Raises:
        ConfigurationError: The config does not exist or is invalid, or its model is not one of
            :data:`SUPPORTED_MODELS`.
        CheckpointMismatchError: The checkpoint does not exist, is broken, or does not fit the config's model.
    """
    config, checkpoint, output_dir = Path(config), Path(checkpoint), Path(output_dir)
    if not config.is_file():
        raise ConfigurationError(f"config {str(config)!r} does not exist")
    if not checkpoint.is_file():
        raise CheckpointMismatchError(f"checkpoint {str(checkpoint)!r} does not exist")
    batch_sizes = [check_int("batch_sizes", size, low=1) for size in batch_sizes]
    if not batch_sizes:
        raise ConfigurationError("batch_sizes=[] must name at least one batch size, e.g. [1, 32]")
    check_int("repeats", repeats, low=1)
    check_int("threads", threads, low=1, optional=True)

    cli = _build_run(config, checkpoint)
    module, datamodule = cli.model, cli.datamodule
    model_class = type(module).__name__
    if model_class not in SUPPORTED_MODELS or not isinstance(getattr(module, "model", None), nn.Module):
        raise ConfigurationError(
            f"config {str(config)!r}: measuring a {model_class} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODELS)}"
        )
    callbacks = cli.trainer.callbacks
    pruning = next((cb for cb in callbacks if isinstance(cb, MagnitudePruning)), None)
    qat = _quantization_callback(callbacks)

    state = load_checkpoint(checkpoint)
    masked = bool(pruning_mask_keys(state))
    _load_weights(module, state, checkpoint)
    module.eval()
    held = _held_scales(qat, state) if qat is not None else {}
    exported: list[str] = []
    if pruning is not None:
        if pruning.structure == "unstructured":
            exported.append("sparse")  # the masks are in the weights; the model keeps its shapes
        else:
            before = _weights(module, held)
            export_pruned(module, shrink=True, block_paths=pruning.block_paths)
            held = _follow_pruning(held, before, module)
            exported.append("pruned")
    elif masked:
        exported.append("sparse")  # sparse training (DynamicSparsity, PruneAtInit, LotteryTicket): masks in the weights
    report = None
    if qat is not None:
        report = _export_int8(module, qat, held, checkpoint)
        exported.append("int8")

    output_dir.mkdir(parents=True, exist_ok=True)
    written = _save_model(module, report, output_dir)
    disk_bytes = sum(path.stat().st_size for path in written)
    module.model = _load_saved(output_dir, int8=report is not None)
    params, nonzero = _count_parameters(module.model)
    metrics = _validate(module, datamodule, cli.trainer.limit_val_batches)
    latency, used_threads = _time_forward(
        module, datamodule, batch_sizes, repeats, threads, compile_int8=report is not None and compile
    )
    measures = {
        "model_class": model_class,
        "exported": exported,
        "params": params,
        "nonzero_params": nonzero,
        "disk_bytes": disk_bytes,
        "latency_ms": latency,
        "latency_threads": used_threads,
        "metrics": metrics,
    }
    write_atomically(output_dir / MEASURES_FILE, json.dumps(measures, indent=1) + "\n")
    return measures


class _BuildOnly(EfficientCLI):
    """:class:`EfficientCLI` that parses and instantiates its subcommand's classes, and runs nothing."""

    def _run_subcommand(self, subcommand: str) -> None:
        return None


def _build_run(config: Path, checkpoint: Path) -> EfficientCLI:
    """The classes of ``lightning-efficient validate -c config --ckpt_path checkpoint``, built but not run.

    Its Trainer (only its callbacks and ``limit_val_batches`` are used) is a plain one on the CPU, whatever
    devices and strategy the run trained with.
    """
    args = [
        "validate", "-c", str(config), "--ckpt_path", str(checkpoint),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.strategy", "auto",
    ]  # fmt: skip
    with warnings.catch_warnings():  # the command line of `python -m ...measure` is not LightningCLI's
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return _BuildOnly(args=args, save_config_callback=None)


def _quantization_callback(callbacks: Sequence[Any]) -> Any:
    """The ``QuantizationAwareTraining`` among ``callbacks`` (None when none, or when torchao is absent)."""
    try:
        from lightning_efficient.callbacks.quantization import QuantizationAwareTraining
    except ImportError:  # pragma: no cover - without torchao no config can hold the callback
        return None
    return next((cb for cb in callbacks if isinstance(cb, QuantizationAwareTraining)), None)


def _load_weights(module: pl.LightningModule, checkpoint: Mapping[str, Any], path: Path) -> None:
    """Load the checkpoint's weights into ``module``: masks multiplied into their weights, then dropped.

    ``on_load_checkpoint`` runs first, as in Lightning's loading (the module class is checked, the
    tokenizer taken).

    Raises:
        CheckpointMismatchError: Another module class wrote it, or its weights do not fit the module.
    """
    state = dict(checkpoint.get("state_dict") or {})
    if not state:
        raise CheckpointMismatchError(f"checkpoint {str(path)!r} holds no weights (no state_dict)")
    for key in [k for k in state if k.endswith(PRUNING_MASK_SUFFIXES)]:
        mask = state.pop(key)
        target = key[: -len("_mask")]
        if target in state:
            state[target] = state[target] * mask.to(state[target].dtype)
    try:
        module.on_load_checkpoint(dict(checkpoint))
        module.load_state_dict(state, strict=True)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"checkpoint {str(path)!r}: {error}") from error
    except RuntimeError as error:  # torch's missing / unexpected keys, size mismatches
        detail = " ".join(str(error).split())[:300]
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} does not fit the config's {type(module).__name__} ({detail})"
        ) from error


def _held_scales(qat: Any, checkpoint: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The weight scales that ``qat`` held from its ``freeze_step`` on, as the checkpoint saved them, by module name."""
    saved = (checkpoint.get("callbacks") or {}).get(qat.state_key) or {}
    return dict(saved.get("frozen_scales") or {})


def _weights(module: nn.Module, names: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A copy of the weight of each module of ``names`` that has one."""
    weights = {}
    for name in names:
        try:
            weights[name] = module.get_submodule(name).weight.detach().clone()
        except AttributeError:  # e.g. a fused in-projection's target, which is no submodule
            continue
    return weights


def _kept_rows(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor | None:
    """The indices of the rows of ``old`` that ``new`` holds, in order (None when ``new`` is not such a selection).

    Examples:
        >>> old = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]])
        >>> _kept_rows(old, old[[0, 2]]).tolist()
        [0, 2]
    """
    kept, row = [], 0
    for values in new:
        while row < len(old) and not torch.equal(old[row], values):
            row += 1
        if row == len(old):
            return None
        kept.append(row)
        row += 1
    return torch.tensor(kept, dtype=torch.long)


def _follow_pruning(
    held: dict[str, dict[str, torch.Tensor]], before: Mapping[str, torch.Tensor], module: nn.Module
) -> dict[str, dict[str, torch.Tensor]]:
    """The held scales of the rows that ``export_pruned`` kept (a layer whose columns were cut keeps its row scales).

    Scales that cannot follow (per-group scales of a layer that lost columns) are left out with a warning:
    the conversion measures them anew from the weights.
    """
    followed = {}
    for name, scales in held.items():
        old = before.get(name)
        new = module.get_submodule(name).weight.detach() if old is not None else None
        if old is None or old.shape == new.shape:
            followed[name] = scales
            continue
        same_rows, same_columns = old.shape[0] == new.shape[0], old.shape[1] == new.shape[1]
        rows = None if same_rows or not same_columns else _kept_rows(old, new)
        if same_rows and scales["scale"].shape[-1] == 1:  # one scale per row: columns of zeros changed none
            followed[name] = scales
        elif rows is not None:
            followed[name] = {key: value[rows] for key, value in scales.items()}
        else:
            warnings.warn(
                f"the held weight scales of {name} do not fit the layer that export_pruned sliced "
                f"({tuple(old.shape)} -> {tuple(new.shape)}); its int8 scales are measured anew from its weights",
                UserWarning,
                stacklevel=3,
            )
    return followed


def _export_int8(
    module: nn.Module, qat: Any, held: Mapping[str, Mapping[str, torch.Tensor]], path: Path
) -> dict[str, Any]:
    """Attach ``qat`` to ``module``, hold the ``held`` weight scales, and convert the model to int8.

    Raises:
        CheckpointMismatchError: The checkpoint held scales of a layer that ``qat`` does not quantize.
    """
    from lightning_efficient.callbacks.quantization import export_quantized

    qat.attach(module)
    unknown = sorted(set(held) - set(qat.targets))
    if unknown:
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} holds held weight scales of {unknown[:3]}, which the config's "
            "QuantizationAwareTraining does not quantize; measure it with the include / exclude / embeddings "
            "settings of the run that wrote it"
        )
    for name, scales in held.items():  # what on_train_start does when a run resumes (the callback's own state)
        qat._quantizers[name].set_frozen(scales["scale"], scales["zero_point"])
    return export_quantized(module, qat)


def _save_model(module: nn.Module, report: dict[str, Any] | None, output_dir: Path) -> list[Path]:
    """Save the exported model (and tokenizer) into ``output_dir``; returns the files written.

    The files are written into a temporary folder first and then moved in, so the list holds exactly them.
    """
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=output_dir))
    try:
        if report is not None:
            from lightning_efficient.callbacks.quantization import save_quantized

            save_quantized(module, staging, report)
        else:
            module.model.save_pretrained(staging)
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save(str(staging / TOKENIZER_FILE))
        written = []
        for file in sorted(staging.iterdir()):
            target = output_dir / file.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(file, target)
            os.chmod(target, FILE_MODE)  # a writer's temporary file may have been created 0600
            written.append(target)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_saved(output_dir: Path, int8: bool) -> nn.Module:
    """The model saved in ``output_dir``, read back as a user would (eager; an int8 model is compiled later)."""
    if int8:
        from lightning_efficient.callbacks.quantization import load_quantized

        return load_quantized(output_dir, compile=False)
    return load_pruned(output_dir).eval()


def _count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(elements, nonzero elements)`` of every parameter and floating-point buffer of ``model`` (tied ones once).

    A torchao int8 weight counts the elements of the weight it stands for (its dequantized values).

    Examples:
        >>> layer = nn.Linear(3, 2)
        >>> with torch.no_grad():
        ...     _ = layer.weight[0].zero_()
        >>> _count_parameters(layer)
        (8, 5)
    """
    seen: set[int] = set()
    total = nonzero = 0
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
        with torch.no_grad():
            values = data.dequantize() if type(data) is not torch.Tensor else data
        total += data.numel()
        nonzero += int(torch.count_nonzero(values))
    return total, nonzero


def _validate(module: pl.LightningModule, datamodule: pl.LightningDataModule, limit: float) -> dict[str, float]:
    """Every metric the module logs in a validation run on the CPU (``limit``: the config's ``limit_val_batches``)."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[],
        limit_val_batches=limit,
    )
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {name: float(value) for name, value in sorted((results[0] if results else {}).items())}


def _pad_id(datamodule: Any, model: nn.Module) -> int:
    """The id the data pads text with (the model's ``pad_token_id``, else 0, when the data does not say)."""
    special = getattr(datamodule, "special_ids", None)
    for value in (getattr(special, "pad_id", None), getattr(datamodule, "pad_id", None)):
        if isinstance(value, int):
            return value
    configured = getattr(getattr(model, "config", None), "pad_token_id", None)
    return configured if isinstance(configured, int) else 0


def _forward_inputs(module: nn.Module, batch: Mapping[str, Any], batch_size: int, length: int | None, pad: int) -> dict:
    """The arguments of ``module.forward`` for ``batch_size`` rows of ``batch`` (repeated as needed).

    Text inputs (``(B, T)``) are padded (or cut) to ``length`` tokens: ``input_ids`` with ``pad``,
    ``attention_mask`` with 0, ``labels`` with -100. Other tensors (images) keep their shape.

    Examples:
        >>> class Classifier(nn.Module):
        ...     def forward(self, input_ids, attention_mask=None): ...
        >>> batch = {"input_ids": torch.tensor([[2, 7, 3]]), "attention_mask": torch.ones(1, 3), "text": ["a"]}
        >>> inputs = _forward_inputs(Classifier(), batch, 2, 5, pad=0)
        >>> inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()
        ([[2, 7, 3, 0, 0], [2, 7, 3, 0, 0]], [[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0]])
    """
    inputs = {}
    for name in inspect.signature(module.forward).parameters:
        value = batch.get(name)
        if not isinstance(value, torch.Tensor):
            continue
        if length is not None and value.dim() == 2 and (name == "input_ids" or name in _TEXT_FILL):
            fill = pad if name == "input_ids" else _TEXT_FILL[name]
            padded = value.new_full((value.shape[0], length), fill)
            width = min(length, value.shape[1])
            padded[:, :width] = value[:, :width]
            value = padded
        inputs[name] = value[torch.arange(batch_size) % value.shape[0]].contiguous()
    return inputs


def _time_forward(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    batch_sizes: Sequence[int],
    repeats: int,
    threads: int | None,
    compile_int8: bool,
) -> tuple[dict[str, float], int]:
    """Median CPU forward latency in ms at each batch size, on validation rows; and the threads used."""
    batch = next(iter(datamodule.val_dataloader()))
    length = getattr(datamodule, "max_length", None)
    pad = _pad_id(datamodule, module.model)
    module.cpu().eval()
    if compile_int8:
        from lightning_efficient.callbacks.quantization import compile_quantized

        compile_quantized(module.model)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        used = torch.get_num_threads()
        latency = {}
        with torch.inference_mode():
            for size in batch_sizes:
                inputs = _forward_inputs(module, batch, size, length, pad)
                for _ in range(WARMUP_CALLS):
                    module(**inputs)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    module(**inputs)
                    times.append(time.perf_counter() - start)
                latency[str(size)] = 1000.0 * statistics.median(times)
    finally:
        torch.set_num_threads(previous)
    return latency, used


def _summary(measures: Mapping[str, Any], output_dir: Path) -> str:
    """One line: the model, what was exported, its size, its metrics and latencies, where the measures are."""
    exported = f" [{', '.join(measures['exported'])}]" if measures["exported"] else ""
    metrics = " ".join(f"{name} {value:.4g}" for name, value in measures["metrics"].items())
    latency = " ".join(f"{value:.3g} ms @{size}" for size, value in measures["latency_ms"].items())
    return (
        f"{measures['model_class']}{exported}: {measures['params']:,} params "
        f"({measures['nonzero_params']:,} nonzero), {measures['disk_bytes'] / 1e6:.3g} MB on disk, {metrics}, "
        f"{latency} (threads={measures['latency_threads']}) -> {output_dir / MEASURES_FILE}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m lightning_efficient.pipeline.measure``: measure one checkpoint, print one line.

    A mistake (a missing config or checkpoint, a checkpoint of another model, a bad value) prints one
    ``error:`` line (:func:`~lightning_efficient.cli.user_error_message`) and exits with status 2;
    ``--traceback`` or ``LIGHTNING_EFFICIENT_TRACEBACK=1`` shows the traceback instead.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m lightning_efficient.pipeline.measure",
        description="Export a run's final checkpoint as it would be deployed, then measure its size, "
        "validation metrics and CPU latency (writes OUTPUT/measures.json).",
    )
    parser.add_argument("--config", required=True, help="the run's full LightningCLI YAML")
    parser.add_argument("--checkpoint", required=True, help="the run's final checkpoint (last.ckpt)")
    parser.add_argument("--output", required=True, help="directory for the exported model and measures.json")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads while timing (default: torch's)")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES), help="batch sizes timed"
    )
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed forward passes per batch size")
    parser.add_argument("--no-compile", action="store_true", help="time an int8 model eager, not compiled")
    parser.add_argument("--traceback", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(None if argv is None else list(argv))
    show_traceback = args.traceback or os.environ.get(TRACEBACK_ENV, "0") not in ("", "0")
    hide_harmless_noise()
    transformers_logging.disable_progress_bar()  # saving and reloading the model: one line of output, not bars
    try:
        measures = measure_checkpoint(
            args.config,
            args.checkpoint,
            args.output,
            batch_sizes=args.batch_sizes,
            repeats=args.repeats,
            threads=args.threads,
            compile=not args.no_compile,
        )
    except Exception as error:  # noqa: BLE001 (exit_on_user_error re-raises anything but a user's mistake)
        exit_on_user_error(error, show_traceback)
    print(_summary(measures, Path(args.output)))


if __name__ == "__main__":
    main()
