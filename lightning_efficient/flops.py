"""Model FLOPs of what actually runs (a counter read from tensor shapes, the analytic formula) and a device's peak.

:class:`FlopCounter` is a ``torch.overrides.TorchFunctionMode``: while it is active it sees every
call of the functions that carry nearly all of a Transformer's compute and adds their FLOPs from
the shapes of the call's arguments and result. Everything else passes through untouched. Because
the count comes from the shapes *as they are at that call*, a technique that skips a layer, drops
tokens, grows depth or prunes heads changes the count without telling anyone.

Counted functions: ``F.linear``, ``torch.matmul`` / ``Tensor.matmul`` / ``@``, ``mm``, ``bmm``,
``addmm``, ``baddbmm``, ``F.scaled_dot_product_attention``, ``F.conv1d/2d/3d``, ``torch.einsum``,
``torch.tensordot`` and ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``,
``nn.TransformerEncoder/Decoder``). Element-wise work (norms, softmax, activations) counts
nothing, as is usual for model FLOPs.

Convention (the one of ``torch.utils.flop_counter.FlopCounterMode`` and of MFU): a matmul of
``(M, K) @ (K, N)`` costs ``F = 2*M*K*N`` forward; attention costs ``F = 4*B*H*Tq*Tk*D`` forward,
masks and causality ignored. The backward pass is charged when the forward runs: ``+F`` for every
matmul operand that will receive a gradient (grad mode on and ``operand.requires_grad``), and
``+2F`` for attention when any of query, key or value needs one. So a trained layer counts ``3F``,
a frozen layer whose input needs a gradient ``2F``, and work under ``torch.no_grad()`` ``F``.
Activation-checkpointing recomputation runs in the backward, which the counter does not see (and
:class:`~lightning_efficient.monitor.EfficiencyMonitor` leaves it before the backward): it is not
model FLOPs and is not counted.

The counter reads shapes only, so it also counts models on the ``meta`` device. With tensor
parallelism (DTensor) it reads the local shards: each device counts its own share. It keeps
counting correctly through ``torch.compile`` (checked with the ``eager`` backend).

Limits: a Python function outside the list above that does its own ``__torch_function__``
dispatch hides the matmuls inside it (the mode cannot be re-entered for it, see
``_multi_head_attention``); reentrant activation checkpointing (``use_reentrant=True``) runs its
forward under ``no_grad``, so those blocks count ``F`` instead of ``3F`` (the non-reentrant kind,
the default of transformers' gradient checkpointing, is counted right).

:func:`measure_peak_flops` times a device's matmuls: the peak FLOP/s against which MFU is reported.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lightning_efficient.atomic_write import write_atomically
from lightning_efficient.errors import ConfigurationError

__all__ = ["FlopCounter", "count_flops", "device_name", "measure_peak_flops", "transformer_flops"]

Rule = Callable[[tuple, dict, Any, bool], float]
_PEAK_CACHE_FILE = "peak_flops.json"
_PROBE_SECONDS = 1.0


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    """Argument ``index`` of a call, given positionally or by ``name``."""
    return args[index] if len(args) > index else kwargs.get(name)


def _numel(tensor: torch.Tensor) -> int:
    """Elements held by this process (the local shard of a DTensor: the work this device does)."""
    return getattr(tensor, "_local_tensor", tensor).numel()


def _shape(tensor: torch.Tensor) -> torch.Size:
    return getattr(tensor, "_local_tensor", tensor).shape


def _needs_grad(tensor: Any, grad: bool) -> bool:
    return grad and isinstance(tensor, torch.Tensor) and tensor.requires_grad


def _contraction(forward: float, operands: Sequence[Any], grad: bool) -> float:
    """Forward FLOPs plus one more ``forward`` per operand that will receive a gradient."""
    return forward * (1 + sum(_needs_grad(t, grad) for t in operands))


def _linear(args: tuple, kwargs: dict, out: Any, grad: bool) -> float:
    x, weight = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    return _contraction(2.0 * _numel(out) * _shape(weight)[-1], (x, weight), grad)


def _matmul_rule(first: int, second: int, names: tuple[str, str]) -> Rule:
    """Rule for a product ``args[first] @ args[second]``: ``2 * out.numel() * K``."""

    def rule(args: tuple, kwargs: dict, out: Any, grad: bool) -> float:
        a, b = _arg(args, kwargs, first, names[0]), _arg(args, kwargs, second, names[1])
        return _contraction(2.0 * _numel(out) * _shape(a)[-1], (a, b), grad)

    return rule


def _rmatmul(args: tuple, kwargs: dict, out: Any, grad: bool) -> float:
    b, a = args[0], args[1]  # Tensor.__rmatmul__(self, other) computes other @ self
    return _contraction(2.0 * _numel(out) * _shape(a)[-1], (a, b), grad)


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out_numel: int, grad: bool) -> float:
    """``Q K^T`` and ``P V`` forward; backward (4 products) when any input needs a gradient."""
    q_dim, v_dim, kv_len = _shape(query)[-1], _shape(value)[-1], _shape(key)[-2]
    rows = out_numel // v_dim  # batch * heads * Tq
    forward = 2.0 * rows * kv_len * (q_dim + v_dim)
    return forward * (3 if any(_needs_grad(t, grad) for t in (query, key, value)) else 1)


def _sdpa(args: tuple, kwargs: dict, out: Any, grad: bool) -> float:
    query, key, value = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    return _attention(query, key, value, _numel(out), grad)


def _conv(args: tuple, kwargs: dict, out: Any, grad: bool) -> float:
    x, weight = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    per_output = _numel(weight) // _shape(weight)[0]  # C_in / groups * kernel volume
    return _contraction(2.0 * _numel(out) * per_output, (x, weight), grad)


def _einsum_terms(args: tuple) -> tuple[list[str], set[str], dict[str, int], list[torch.Tensor]]:
    """Index letters of each operand, the output's letters, the size of every letter, the operands.

    The dimensions of an ellipsis are named by non-ASCII letters, aligned from the right as
    broadcasting aligns them.
    """
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    inputs, arrow, output = args[0].replace(" ", "").partition("->")
    terms, sizes = [], {}
    for term, operand in zip(inputs.split(","), operands):
        shape = _shape(operand)
        extra = len(shape) - (len(term) - 3) if "..." in term else 0
        term = term.replace("...", "".join(chr(0x100 + extra - 1 - j) for j in range(extra)))
        for letter, size in zip(term, shape):
            sizes[letter] = max(sizes.get(letter, 1), size)
        terms.append(term)
    broadcast = {c for c in sizes if not c.isascii()}
    if arrow:
        kept = set(output.replace("...", "")) | (broadcast if "..." in output else set())
    else:
        kept = {c for c in sizes if sum(c in t for t in terms) == 1} | broadcast
    return terms, kept, sizes, operands


def _einsum(args: tuple, kwargs: dict, out: Any, grad: bool) -> float:
    """Pairwise contractions left to right (torch's order without opt_einsum): 2 x product of their indices.

    Exact for two operands, the usual case; with more, opt_einsum (when installed) may pick a
    cheaper order than the one counted.
    """
    terms, kept, sizes, operands = _einsum_terms(args)
    total, current, current_needs_grad = 0.0, set(terms[0]), _needs_grad(operands[0], grad)
    for position in range(1, len(terms)):
        union = current | set(terms[position])
        right_needs_grad = _needs_grad(operands[position], grad)
        total += 2.0 * math.prod(sizes[c] for c in union) * (1 + current_needs_grad + right_needs_grad)
        later = set("".join(terms[position + 1 :]))
        current = {c for c in union if c in kept or c in later}
        current_needs_grad = current_needs_grad or right_needs_grad
    return total


def _tensordot(args: tuple, kwargs: dict, out: Any, grad: bool) -> float:
    a, b = _arg(args, kwargs, 0, "a"), _arg(args, kwargs, 1, "b")
    if _numel(out) == 0:
        return 0.0
    contracted = round(math.sqrt(_numel(a) * _numel(b) / _numel(out)))  # a = free_a*K, b = K*free_b
    return _contraction(2.0 * _numel(out) * contracted, (a, b), grad)


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _multi_head_attention(args: tuple, kwargs: dict, out: Any, grad: bool) -> float:
    """Projections, attention and output projection of ``F.multi_head_attention_forward``.

    It is a Python composite: inside a TorchFunctionMode its inner calls are not seen (and the
    mode cannot be re-entered for it: its own ``has_torch_function`` check would dispatch back
    here forever), so it is counted as a whole from its arguments.
    """
    a = _MHA_SIGNATURE.bind(*args, **kwargs).arguments
    query, key, value = a["query"], a["key"], a["value"]
    q_rows = _numel(query) // _shape(query)[-1]  # Tq * batch
    k_rows = _numel(key) // _shape(key)[-1]
    embed = a["embed_dim_to_check"]
    if a.get("use_separate_proj_weight"):
        weights = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
    else:
        weights = (a["in_proj_weight"],) * 3
    total = _contraction(2.0 * q_rows * _shape(query)[-1] * embed, (query, weights[0]), grad)
    if a.get("static_k") is None:
        total += _contraction(2.0 * k_rows * _shape(key)[-1] * embed, (key, weights[1]), grad)
    if a.get("static_v") is None:
        total += _contraction(2.0 * k_rows * _shape(value)[-1] * embed, (value, weights[2]), grad)
    batch = _numel(query) // _shape(query)[-1] // _shape(query)[0]
    kv_len = _shape(key)[0] + (a.get("bias_k") is not None) + bool(a.get("add_zero_attn"))
    attention_forward = 4.0 * batch * _shape(query)[0] * kv_len * embed
    projected_need_grad = any(_needs_grad(t, grad) for t in (query, key, value, *weights))
    total += attention_forward * (3 if projected_need_grad else 1)
    out_forward = 2.0 * q_rows * embed * embed
    out_weight = a["out_proj_weight"]
    total += out_forward * (1 + projected_need_grad + _needs_grad(out_weight, grad))
    return total


def _rules() -> dict[Callable, tuple[str, Rule]]:
    """Each counted function (torch, Tensor method and in-place forms) -> (family, rule)."""
    matmul = _matmul_rule(0, 1, ("input", "other"))
    mm = _matmul_rule(0, 1, ("input", "mat2"))
    addmm = _matmul_rule(1, 2, ("mat1", "mat2"))
    baddbmm = _matmul_rule(1, 2, ("batch1", "batch2"))
    table: dict[Callable, tuple[str, Rule]] = {
        F.linear: ("linear", _linear),
        torch.matmul: ("matmul", matmul),
        torch.Tensor.matmul: ("matmul", matmul),  # also `a @ b`
        torch.Tensor.__matmul__: ("matmul", matmul),
        torch.Tensor.__rmatmul__: ("matmul", _rmatmul),
        torch.mm: ("mm", mm),
        torch.Tensor.mm: ("mm", mm),
        torch.bmm: ("bmm", mm),
        torch.Tensor.bmm: ("bmm", mm),
        torch.addmm: ("addmm", addmm),
        torch.Tensor.addmm: ("addmm", addmm),
        torch.Tensor.addmm_: ("addmm", addmm),
        torch.baddbmm: ("baddbmm", baddbmm),
        torch.Tensor.baddbmm: ("baddbmm", baddbmm),
        torch.Tensor.baddbmm_: ("baddbmm", baddbmm),
        F.scaled_dot_product_attention: ("attention", _sdpa),
        F.conv1d: ("conv", _conv),
        F.conv2d: ("conv", _conv),
        F.conv3d: ("conv", _conv),
        torch.einsum: ("einsum", _einsum),
        torch.tensordot: ("tensordot", _tensordot),
        F.multi_head_attention_forward: ("multi_head_attention", _multi_head_attention),
    }
    return table


_RULES = _rules()


class FlopCounter(TorchFunctionMode):
    """Counts the model FLOPs (forward, plus the backward they imply) of the code run inside it.

    Attributes:
        flops: Total FLOPs counted since creation or the last :meth:`reset`.
        breakdown: The same total split by function family (``linear``, ``attention``, ...).

    Examples:
        >>> layer = torch.nn.Linear(8, 4)
        >>> with FlopCounter() as counter:
        ...     _ = layer(torch.randn(3, 8))  # forward 2*3*8*4 = 192; weight trains: backward 192 more
        >>> counter.flops, counter.breakdown
        (384.0, {'linear': 384.0})
        >>> with torch.no_grad(), FlopCounter() as counter:
        ...     _ = layer(torch.randn(3, 8))
        >>> counter.flops
        192.0
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0.0
        self.breakdown: dict[str, float] = {}

    def reset(self) -> None:
        """Set the count back to zero."""
        self.flops = 0.0
        self.breakdown = {}

    def __torch_function__(
        self, func: Callable, types: Sequence[type], args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        out = func(*args, **kwargs)
        entry = _RULES.get(func)
        if entry is not None:
            name, rule = entry
            flops = rule(args, kwargs, out, torch.is_grad_enabled())
            self.flops += flops
            self.breakdown[name] = self.breakdown.get(name, 0.0) + flops
        return out


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Run ``fn(*args, **kwargs)`` and return its result and the model FLOPs it implies.

    The count includes the backward pass that the forward's gradients imply (see the module
    docstring), without running it.

    Examples:
        >>> out, flops = count_flops(torch.matmul, torch.randn(2, 3), torch.randn(3, 5))
        >>> out.shape, flops  # 2 * 2*3*5, no operand needs a gradient
        (torch.Size([2, 5]), 60.0)
    """
    with FlopCounter() as counter:
        result = fn(*args, **kwargs)
    return result, counter.flops


def transformer_flops(
    batch_size: int,
    seq_len: int,
    hidden_size: int,
    num_layers: int,
    ffn_size: int,
    *,
    decoder_layers: int = 0,
    target_len: int | None = None,
    extra_matmuls: Sequence[tuple[int, int]] = (),
    training: bool = True,
) -> float:
    """Analytic model FLOPs of a Transformer step (PaLM appendix B / Megatron-LM convention).

    Training costs ``6 x matmul parameters x tokens`` plus attention ``12 x layers x seq^2 x
    hidden x batch`` (``2 x`` and ``4 x`` for the forward alone). An encoder-decoder adds the
    decoder's self-attention over ``target_len`` and cross-attention from the target to the
    source (its key/value projections run over the source tokens). Heads and embeddings that are
    matmuls (an MLM head on the masked positions, an LM head, a patch embedding) are given as
    ``extra_matmuls``: ``(parameters, tokens)`` pairs.

    Args:
        batch_size: Sequences per step.
        seq_len: Tokens per sequence (the encoder's, for an encoder-decoder).
        hidden_size: Width of the residual stream.
        num_layers: Encoder blocks (or the decoder-only / encoder-only stack).
        ffn_size: Inner width of the feed-forward network.
        decoder_layers: Decoder blocks with cross-attention to the encoder (0: none).
        target_len: Tokens per target sequence (decoder); required with ``decoder_layers``.
        extra_matmuls: ``(matmul parameters, tokens per step)`` of further projections.
        training: Forward + backward (``3 x`` forward) when True, forward only when False.

    Returns:
        FLOPs of one step.

    Examples:
        >>> transformer_flops(batch_size=1, seq_len=4, hidden_size=8, num_layers=1, ffn_size=16, training=False)
        4608.0
    """
    h, f = hidden_size, ffn_size
    source_tokens = batch_size * seq_len
    forward = num_layers * (2.0 * source_tokens * (4 * h * h + 2 * h * f) + 4.0 * batch_size * seq_len**2 * h)
    if decoder_layers:
        if target_len is None:
            raise ConfigurationError(f"target_len={target_len} must be given when decoder_layers={decoder_layers} > 0")
        target_tokens = batch_size * target_len
        per_layer = (
            2.0 * target_tokens * (6 * h * h + 2 * h * f)  # self-attention q,k,v,o + cross q,o + FFN
            + 2.0 * source_tokens * 2 * h * h  # cross-attention keys and values over the source
            + 4.0 * batch_size * target_len * (target_len + seq_len) * h  # self- and cross-attention
        )
        forward += decoder_layers * per_layer
    forward += sum(2.0 * params * tokens for params, tokens in extra_matmuls)
    return 3.0 * forward if training else forward


# -- what the device can do: its peak matmul FLOP/s ---------------------------------------------
def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on an accelerator (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_name(device: torch.device) -> str:
    """``"cuda: NVIDIA H100 ..."``, ``"cpu: Intel(R) Xeon(R) ..."`` or the device type.

    Examples:
        >>> device_name(torch.device("cpu")).startswith("cpu: ")
        True
    """
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        model = platform.processor()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as handle:
                model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
        except OSError:
            pass
        return f"cpu: {model or platform.machine()}"
    return device.type


def _cache_file() -> Path:
    """``$LIGHTNING_EFFICIENT_CACHE/peak_flops.json`` (default cache ``~/.cache/lightning_efficient``)."""
    default = Path.home() / ".cache" / "lightning_efficient"
    return Path(os.environ.get("LIGHTNING_EFFICIENT_CACHE", default)) / _PEAK_CACHE_FILE


def _random_matrix(n: int, device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """An ``(n, n)`` normal matrix drawn on the CPU from ``generator``, then moved: no global RNG is touched."""
    return torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)


def _time_matmuls(a: torch.Tensor, calls: int) -> float:
    _synchronize(a.device)
    start = time.perf_counter()
    for _ in range(calls):
        torch.mm(a, a)
    _synchronize(a.device)
    return (time.perf_counter() - start) / calls


def measure_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Peak matmul FLOP/s of ``device`` in ``dtype``: the best of a few square matmuls (about 1 s).

    The size is 2048 on a CPU (smaller if one product would take over 0.5 s, as with emulated
    half precision), 4096 on an accelerator (10 back-to-back products per timing). The result
    is cached per (device name, threads, dtype) in ``$LIGHTNING_EFFICIENT_CACHE/peak_flops.json``.
    The matrices come from a private generator: the caller's random streams (torch's global
    CPU and CUDA generators) are left as they were, so measuring after a resume changes nothing.

    Examples:
        >>> measure_peak_flops("cpu") > 1e8  # measured once, then read from the cache
        True
    """
    device = torch.device(device)
    key = f"{device_name(device)}|threads={torch.get_num_threads()}|{dtype}".replace("torch.", "")
    path = _cache_file()
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached.get(key), (int, float)):
        return float(cached[key])
    generator = torch.Generator().manual_seed(0)  # private: measuring never moves a user's random streams
    with torch.no_grad():
        if device.type == "cpu":
            probe = _random_matrix(256, device, dtype, generator)
            _time_matmuls(probe, 1)
            rate = 2 * 256**3 / max(_time_matmuls(probe, 2), 1e-9)
            n = next((m for m in (2048, 1024, 512) if 2 * m**3 / rate <= 0.5), 256)  # the probe underrates
            calls = 1
        else:
            n, calls = 4096, 10
        a = _random_matrix(n, device, dtype, generator)
        best, started = _time_matmuls(a, calls), time.perf_counter()  # the first one warms up
        for _ in range(5):
            best = min(best, _time_matmuls(a, calls))
            if time.perf_counter() - started > _PROBE_SECONDS:
                break
    peak = 2 * n**3 / best
    cached[key] = peak
    try:
        write_atomically(path, json.dumps(cached, indent=1, sort_keys=True))
    except OSError as err:
        warnings.warn(f"could not cache the measured peak in {path}: {err}", stacklevel=2)
    return peak
