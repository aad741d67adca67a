"""QuantizationAwareTraining: torchao fake quantization during training, then a real int8 model.

From ``start_step`` on, the chosen Linear layers (default: those of the Transformer blocks) compute
``linear(fq_a(x), fq_w(W), b)``: the weight is fake-quantized to int8 per output channel or to int4
(or int8) in groups of ``group_size`` input columns (symmetric), and the input to int8, dynamic
(its range is measured as it comes), in one of three schemes (``activations``):

- ``"per_tensor"`` (the default for int8 weights per channel): symmetric, one scale per tensor.
  It converts to torchao's ``Int8Tensor`` (``Int8DynamicActivationInt8WeightConfig``), whose
  int8 x int8 matrix products :func:`compile_quantized` turns into fused int8 kernels: on an x86
  CPU the fastest scheme (measured on 2 Xeon cores: BERT-base 4.4x, BERT-small 2.3x the eager
  fp32 speed).
- ``"per_token"``: symmetric, one scale per token; the same conversion, finer ranges, slower
  kernels (3.3x and 1.9x).
- ``"asymmetric_per_token"`` (the default, and the only scheme, for int4 or grouped weights):
  converts to torchao's ``IntxUnpackedToInt8Tensor`` (``Int8DynamicActivationIntxWeightConfig``),
  the layout for edge runtimes; on a CPU under PyTorch it has no int8 kernel and runs slower than
  fp32.

Rounding is in the forward pass and the gradient is straight-through. The weight and asymmetric
quantizers are torchao's ``IntxFakeQuantizer``; the symmetric activation quantizer is the
conversion's own (``Int8Tensor.from_hp``), so training sees the codes inference will use.

With ``embeddings=True`` the model's embedding tables are fake-quantized too (int8 per row, weight
only): most of a small BERT's bytes are its vocabulary table, so this is what makes the saved
model about 4x smaller. With ``freeze_step`` the weight scales are measured once at that step and
then held (the classic "freeze the observers" of the last part of QAT); the activation ranges stay
dynamic, as at inference.

How it is built: the Linear modules are not swapped; their ``forward`` is routed through the fake
quantizers (:func:`~lightning_efficient.blocks.wrap_forward`), so parameters and checkpoint keys
never change, other techniques' masks and wrappers on the same modules keep working, and a
checkpoint from before, at or after the switch resumes exactly (whether fake quantization is on
follows the step; frozen scales are in the callback's state). Pruned weights stay exactly zero:
a symmetric quantizer maps 0 to 0.

:func:`export_quantized` converts the layers into torchao's int8 model (the scheme's conversion
target; embeddings: ``IntxWeightOnlyConfig``) with outputs equal to the fake-quantized model's up
to the float rounding of the int8 products; :func:`compile_quantized` compiles it for CPU
inference; :func:`save_quantized` / :func:`load_quantized` write and read (and compile) it.
(:func:`export` is its old name, deprecated.)

The package: :mod:`.fake_quant` (torchao's configs and the fake quantizers), :mod:`.callback`
(the callback: selection, switch, held scales), :mod:`.conversion` (int8 conversion and files).

torchao is an optional dependency: ``pip install "lightning-efficient[quant]"``.

Examples:
    >>> import lightning.pytorch as pl
    >>> from lightning_efficient import BertMLM, MLMDataModule
    >>> dm = MLMDataModule(vocab_size=2000, max_length=32, batch_size=8)
    >>> qat = QuantizationAwareTraining(start_step=2)
    >>> trainer = pl.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_progress_bar=False,
    ...                      enable_checkpointing=False, enable_model_summary=False, callbacks=[qat])
    >>> model = BertMLM(vocab_size=dm.vocab_size, preset="tiny")
    >>> trainer.fit(model, dm)
    >>> qat.active, len(qat.targets)  # 6 Linear layers in each of the 3 blocks
    (True, 18)
    >>> report = export_quantized(model, qat)
    >>> report["converted"], type(model.model.bert.encoder.layer[0].output.dense.weight.data).__name__
    (18, 'Int8Tensor')
    >>> fast = compile_quantized(model.model)  # int8 kernels from the first call on (it compiles, seconds)
"""

from lightning_efficient.callbacks.quantization.callback import QAT_PRIORITY, QuantizationAwareTraining
from lightning_efficient.callbacks.quantization.conversion import QUANTIZATION_FILE as QUANTIZATION_FILE
from lightning_efficient.callbacks.quantization.conversion import WEIGHTS_FILE as WEIGHTS_FILE
from lightning_efficient.callbacks.quantization.conversion import (
    compile_quantized,
    export,
    export_quantized,
    load_quantized,
    save_quantized,
)
from lightning_efficient.callbacks.quantization.fake_quant import (
    ACTIVATIONS,
    GRANULARITIES,
    WEIGHT_DTYPES,
    fake_quantize_configs,
)

__all__ = [
    "ACTIVATIONS",
    "GRANULARITIES",
    "QAT_PRIORITY",
    "WEIGHT_DTYPES",
    "QuantizationAwareTraining",
    "compile_quantized",
    "export",
    "export_quantized",
    "fake_quantize_configs",
    "load_quantized",
    "save_quantized",
]
