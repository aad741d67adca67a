"""Quantizing ``nn.MultiheadAttention``: its fused in-projection and its output projection.

``nn.MultiheadAttention`` keeps Q, K and V in one fused parameter (``in_proj_weight``, the
architecture table's ``AttentionLayout(in_proj=...)``) and never calls its ``out_proj`` module
(``F.multi_head_attention_forward`` reads the weights), so wrapping Linear modules quantizes
neither. While fake quantization is on, QuantizationAwareTraining routes the attention module's
forward through :func:`multihead_attention` with fake-quantized projections
(:class:`FusedInProjection` stands for the fused weight as one ``[3 * E, E]`` Linear: per output
row, its scales are those of the three projections). :func:`export_quantized` replaces the module
by :class:`QuantizedMultiheadAttention`, whose ``q_proj``/``k_proj``/``v_proj``/``out_proj`` are
ordinary Linears that torchao converts, and which runs the same :func:`multihead_attention`.

Supported: ``nn.MultiheadAttention`` with one embedding width for Q, K and V (no ``kdim``/``vdim``),
without ``add_bias_kv`` and ``add_zero_attn`` (others fail at setup, naming the module).

Examples:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> attention = nn.MultiheadAttention(8, num_heads=2, batch_first=True).eval()
    >>> x = torch.randn(3, 5, 8)
    >>> converted = QuantizedMultiheadAttention(attention)  # the same weights, split into q/k/v Linears
    >>> torch.allclose(converted(x, x, x)[0], attention(x, x, x)[0], atol=1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_efficient.errors import ConfigurationError

__all__ = [
    "FusedInProjection",
    "QuantizedMultiheadAttention",
    "check_supported_attention",
    "fake_quantized_projections",
    "multihead_attention",
    "no_fast_path",
]

#: ``(query, key, value) -> (q, k, v)``, each ``(batch, length, embed)``.
InProjection = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def check_supported_attention(attention: nn.Module, name: str) -> None:
    """Fail unless ``attention`` is an ``nn.MultiheadAttention`` whose fused in-projection can be quantized.

    Raises:
        ConfigurationError: Naming ``name``, the reason, and how to leave it out.

    Examples:
        >>> check_supported_attention(nn.MultiheadAttention(8, 2, add_zero_attn=True), "layers.0.self_attn")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: layers.0.self_attn (MultiheadAttention) has add_zero_attn=True, which QuantizationAwareTraining cannot quantize; exclude 'layers.0.self_attn.out_proj' to leave this attention in float
    """
    reason = None
    if not isinstance(attention, nn.MultiheadAttention):
        reason = "a fused in-projection outside nn.MultiheadAttention"
    elif not attention._qkv_same_embed_dim:
        reason = f"kdim={attention.kdim} / vdim={attention.vdim} different from embed_dim={attention.embed_dim}"
    elif attention.bias_k is not None:
        reason = "add_bias_kv=True"
    elif attention.add_zero_attn:
        reason = "add_zero_attn=True"
    if reason is not None:
        raise ConfigurationError(
            f"{name} ({type(attention).__name__}) has {reason}, which QuantizationAwareTraining cannot quantize; "
            f"exclude '{name}.out_proj' to leave this attention in float"
        )


class FusedInProjection(nn.Module):
    """The fused Q/K/V in-projection of an ``nn.MultiheadAttention`` seen as one Linear (not part of the model).

    ``weight`` and ``bias`` are the attention's ``in_proj_weight`` and ``in_proj_bias`` themselves.

    Examples:
        >>> attention = nn.MultiheadAttention(8, 2)
        >>> projection = FusedInProjection(attention)
        >>> projection.weight is attention.in_proj_weight, projection.in_features, projection.out_features
        (True, 8, 24)
    """

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attention = attention

    @property
    def weight(self) -> torch.Tensor:
        return self.attention.in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.attention.in_proj_bias

    @property
    def in_features(self) -> int:
        return self.attention.embed_dim

    @property
    def out_features(self) -> int:
        return 3 * self.attention.embed_dim


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: not attended) as 0 / -inf; a float mask as it is (added to the scores)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _same_map(function: Callable[[torch.Tensor], torch.Tensor], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``function`` of each tensor, computed once per distinct tensor (self-attention stays one tensor)."""
    done: dict[int, torch.Tensor] = {}
    for tensor in tensors:
        if id(tensor) not in done:
            done[id(tensor)] = function(tensor)
    return tuple(done[id(tensor)] for tensor in tensors)


def multihead_attention(
    attention: nn.Module,
    project_in: InProjection,
    project_out: Callable[[torch.Tensor], torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``nn.MultiheadAttention.forward`` with the projections given as functions.

    ``attention`` supplies ``num_heads``, ``head_dim``, ``dropout`` and ``batch_first`` (an
    ``nn.MultiheadAttention`` or :class:`QuantizedMultiheadAttention`); the arguments and the result
    are those of ``nn.MultiheadAttention.forward``. ``is_causal`` without ``attn_mask`` applies a
    causal mask.
    """
    batched = query.dim() == 3
    if not batched:  # one sequence: (L, E)
        query, key, value = _same_map(lambda x: x.unsqueeze(0), query, key, value)
        key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
    elif not attention.batch_first:  # (L, N, E) -> (N, L, E)
        query, key, value = _same_map(lambda x: x.transpose(0, 1), query, key, value)
    batch, target, embed = query.shape
    source = key.shape[1]
    heads, head_dim = attention.num_heads, attention.head_dim
    q, k, v = project_in(query, key, value)
    q, k, v = (x.reshape(batch, -1, heads, head_dim).transpose(1, 2) for x in (q, k, v))  # (N, H, L, D)
    scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)  # (N, H, L, S)
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(target, source, dtype=torch.bool, device=q.device).triu(1)
    mask = _additive_mask(attn_mask, scores.dtype)
    if mask is not None:
        scores = scores + (mask.view(batch, heads, target, source) if mask.dim() == 3 else mask)
    padding = _additive_mask(key_padding_mask, scores.dtype)
    if padding is not None:
        scores = scores + padding.view(batch, 1, 1, source)
    weights = scores.softmax(dim=-1)
    dropped = F.dropout(weights, attention.dropout, training=attention.training) if attention.dropout else weights
    output = project_out((dropped @ v).transpose(1, 2).reshape(batch, target, embed))
    if not batched:
        output = output.squeeze(0)
    elif not attention.batch_first:
        output = output.transpose(0, 1)
    if not need_weights:
        return output, None
    weights = weights.mean(dim=1) if average_attn_weights else weights
    return output, weights if batched else weights.squeeze(0)


class QuantizedMultiheadAttention(nn.Module):
    """An ``nn.MultiheadAttention`` with its fused in-projection split into ``q_proj``, ``k_proj``, ``v_proj``.

    What :func:`~lightning_efficient.callbacks.quantization.export_quantized` puts in place of a
    quantized ``nn.MultiheadAttention``: the four projections are ordinary ``nn.Linear`` modules
    (torchao converts them to int8), the forward takes ``nn.MultiheadAttention``'s arguments. Its
    ``in_proj_weight`` and ``in_proj_bias`` are None, so ``nn.TransformerEncoderLayer`` and
    ``nn.TransformerEncoder`` take their ordinary (not the fused "fast") path through it.

    Args:
        attention: The attention to convert (its weights are copied; ``out_proj`` is taken over).
    """

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        check_supported_attention(attention, type(attention).__name__)
        self.embed_dim, self.num_heads, self.head_dim = attention.embed_dim, attention.num_heads, attention.head_dim
        self.dropout, self.batch_first = attention.dropout, attention.batch_first
        self._qkv_same_embed_dim = True
        self.register_parameter("in_proj_weight", None)
        self.register_parameter("in_proj_bias", None)
        weights = attention.in_proj_weight.detach().chunk(3)
        biases = attention.in_proj_bias.detach().chunk(3) if attention.in_proj_bias is not None else (None,) * 3
        projections = []
        for weight, bias in zip(weights, biases):
            linear = nn.Linear(self.embed_dim, self.embed_dim, bias=bias is not None, device=weight.device)
            linear.to(weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            projections.append(linear)
        self.q_proj, self.k_proj, self.v_proj = projections
        self.out_proj = attention.out_proj
        self.train(attention.training)

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(query), self.k_proj(key), self.v_proj(value)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: ``(output, attention weights or None)``.

        The arguments after ``value`` (``key_padding_mask``, ``need_weights``, ``attn_mask``, ...) are
        those of ``nn.MultiheadAttention.forward``, passed to :func:`multihead_attention`.
        """
        return multihead_attention(self, self._project, self.out_proj, query, key, value, *args, **kwargs)


def fake_quantized_projections(
    attention: nn.MultiheadAttention,
    quantize_in: Callable[[torch.Tensor], torch.Tensor],
    quantize_in_weight: Callable[[torch.Tensor], torch.Tensor],
    quantize_out: Callable[[torch.Tensor], torch.Tensor],
    quantize_out_weight: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[InProjection, Callable[[torch.Tensor], torch.Tensor]]:
    """The in- and output projections of ``attention`` with fake-quantized inputs and weights.

    The fused weight is quantized whole (per output row or group: the same as each of its thirds),
    each input once; Q, K and V are the thirds, as :class:`QuantizedMultiheadAttention` computes them.
    """

    def project_in(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights = quantize_in_weight(attention.in_proj_weight).chunk(3)
        bias = attention.in_proj_bias
        biases = bias.chunk(3) if bias is not None else (None,) * 3
        inputs = _same_map(quantize_in, query, key, value)  # self-attention: its input quantized once
        q, k, v = (F.linear(x, weight, b) for x, weight, b in zip(inputs, weights, biases))
        return q, k, v

    def project_out(x: torch.Tensor) -> torch.Tensor:
        out = attention.out_proj
        return F.linear(quantize_out(x), quantize_out_weight(out.weight), out.bias)

    return project_in, project_out


def no_fast_path(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that does nothing: with it, ``nn.TransformerEncoderLayer`` skips its fused fast path
    (which reads the weights directly and would bypass fake quantization)."""
