"""Dropout on the CPU at a fraction of torch's random-number cost, in the models we build.

On the CPU, ``torch.nn.functional.dropout`` draws one Bernoulli sample per element from the serial
Mersenne Twister (``bernoulli_``): about 5.5 ns per element on a 2-core Xeon, 12.6% of the main
job's training step (BERT-small, batch 32 x 128: 13 dropout sites, 18M draws a step). And with
attention dropout on, ``scaled_dot_product_attention`` leaves its fused CPU kernel for the math
path. Here one 64-bit draw (``random_`` over the full range, same generator) makes four 16-bit
lanes, and an element is kept where its lane is at least a threshold: the drop probability is
``p`` rounded to a multiple of ``2**-16`` (0.1 -> 0.100006) and the kept values are scaled by
``1 / (1 - p_rounded)``, so the expectation is exact. Everything else is the same: the global generator (so
seeding and our checkpoints' random state resume it), train/eval, the sites, the ``p`` of each.
The masks are not the ones torch would draw: a run with a given seed differs from one with
``torch.nn.functional.dropout``, as two seeds do.

:func:`use_fast_dropout` puts it in a model: every ``nn.Dropout`` becomes a :class:`FastDropout`,
and a transformers model on SDPA attention switches to :data:`ATTENTION`, an attention function
registered with transformers' ``AttentionInterface`` that calls SDPA as before when attention
dropout is off (evaluation, ``p = 0``) and otherwise runs SDPA's math (``softmax(Q K^T s + mask)
V``) with this dropout. Off the CPU (CUDA's dropout is fast) both fall back to torch's own
dropout and SDPA. Compiled (Inductor's ``fallback_random``) they draw what eager draws.

Examples:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> x = torch.ones(10_000)
    >>> y = fast_dropout(x, 0.1, training=True)
    >>> round((y == 0).float().mean().item(), 2), sorted({round(v, 4) for v in y.tolist()})
    (0.1, [0.0, 1.1111])
    >>> torch.equal(fast_dropout(x, 0.1, training=False), x)
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ATTENTION", "FastDropout", "fast_dropout", "keep_mask", "use_fast_dropout"]

ATTENTION = "lightning_efficient_sdpa"
"""The name of our attention function in transformers' ``AttentionInterface`` (SDPA with :func:`fast_dropout`)."""

_LANES = 1 << 16  # a 16-bit lane: the resolution of the drop probability


def keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, float]:
    """A bool mask of ``shape`` keeping each element with probability ``1 - p`` (``p`` rounded to ``2**-16``).

    Args:
        shape: The mask's shape.
        p: Drop probability, in [0, 1).
        device: Where the mask is drawn (the global generator of that device).

    Returns:
        ``(mask, scale)``: the mask and ``1 / (1 - p_rounded)``, the factor of the kept values.

    Examples:
        >>> mask, scale = keep_mask((4, 1000), 0.25)
        >>> mask.dtype, mask.shape, round(mask.float().mean().item(), 1), scale
        (torch.bool, torch.Size([4, 1000]), 0.8, 1.3333333333333333)
    """
    dropped = round(p * _LANES)
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:count].view(shape)  # 4 uniform 16-bit lanes per draw
    return lanes >= dropped - _LANES // 2, _LANES / (_LANES - dropped)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Dropout of ``x`` with :func:`keep_mask` on the CPU; ``torch.nn.functional.dropout`` elsewhere.

    Torch's own dropout runs for CUDA and other devices and for tensor subclasses (``DTensor``).

    Args:
        x: The input.
        p: Drop probability, in [0, 1].
        training: Drop only while training (as ``F.dropout``).

    Returns:
        ``x`` with dropped elements zeroed and the others scaled by ``1 / (1 - p)``; ``x`` itself
        when not training or ``p == 0``.
    """
    if not training or p == 0.0:
        return x
    if p >= 1.0 or x.device.type != "cpu" or type(x) is not torch.Tensor:
        return F.dropout(x, p, training=True)
    mask, scale = keep_mask(x.shape, p)
    return x * mask.to(x.dtype).mul_(scale)  # autograd keeps the scaled mask, as torch's dropout does


class FastDropout(nn.Dropout):
    """``nn.Dropout`` on :func:`fast_dropout` (same ``p``, same train/eval behaviour).

    Examples:
        >>> layer = FastDropout(0.5)
        >>> layer.eval()(torch.ones(3)).tolist()
        [1.0, 1.0, 1.0]
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fast_dropout(input, self.p, self.training)


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with :func:`fast_dropout` on the attention probabilities when it drops.

    Same arguments and result as ``transformers.integrations.sdpa_attention.sdpa_attention_forward``
    (``query`` ``(B, H, Tq, D)``, result ``(B, Tq, H, D)``); it runs that function unless attention
    dropout is on for a plain CPU tensor of an encoder attention without grouped keys or a position bias.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (
        dropout > 0.0
        and query.device.type == "cpu"
        and type(query) is torch.Tensor
        and getattr(module, "num_key_value_groups", 1) == 1
        and kwargs.get("position_bias") is None
        and not (is_causal if is_causal is not None else getattr(module, "is_causal", False))
    )
    if not plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probabilities = fast_dropout(torch.softmax(scores, dim=-1), dropout)
    return torch.matmul(probabilities, value).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    """Register :data:`ATTENTION` with transformers (function and mask: SDPA's), once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, _attention)
        AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_fast_dropout(model: nn.Module) -> nn.Module:
    """Put :class:`FastDropout` and SDPA with fast attention dropout into ``model``, in place.

    Every ``nn.Dropout`` submodule is replaced by a :class:`FastDropout` of the same ``p`` (the
    state dict is unchanged: dropout holds no tensors). A transformers model whose configuration
    says ``sdpa`` switches to :data:`ATTENTION`; one on another implementation (``eager``, flash)
    keeps it. Saved configurations do not record the attention implementation, so a model saved
    with ``save_pretrained`` loads anywhere without this package.

    Args:
        model: Any module; transformers models get the attention switch as well.

    Returns:
        ``model``.

    Examples:
        >>> from transformers import BertConfig, BertForMaskedLM
        >>> bert = use_fast_dropout(BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                                                    num_attention_heads=2, intermediate_size=20)))
        >>> bert.config._attn_implementation, type(bert.bert.embeddings.dropout).__name__
        ('lightning_efficient_sdpa', 'FastDropout')
    """
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child.p, child.inplace))
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(model, "set_attn_implementation"):
        _register_attention()
        model.set_attn_implementation(ATTENTION)
    return model
