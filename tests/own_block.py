"""A user's hand-written Transformer block that no technique of the package knows, and a model built of it.

The tests of each technique use it to show that describing the block once with
``register_architecture`` is enough for that technique to work on it (``registered_own_block``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_efficient.architectures import (
    AttentionLayout,
    FeedForwardLayout,
    register_architecture,
    unregister_architecture,
)

WIDTH, HEADS, FFN, VOCAB, DEPTH = 32, 4, 37, 41, 3


class OwnBlock(nn.Module):
    """A pre-LN block with its own names: ``wq``/``wk``/``wv``/``wo``, ``ff_in``/``ff_out``, ``ln1``/``ln2``."""

    def __init__(self, width: int = WIDTH, heads: int = HEADS, ffn: int = FFN) -> None:
        super().__init__()
        self.n_heads, self.d_head = heads, width // heads
        self.wq, self.wk, self.wv = (nn.Linear(width, width) for _ in range(3))
        self.wo = nn.Linear(width, width)
        self.ff_in, self.ff_out = nn.Linear(width, ffn), nn.Linear(ffn, width)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        h = self.ln1(x)
        b, t, _ = h.shape
        q, k, v = (proj(h).view(b, t, -1, self.d_head).transpose(1, 2) for proj in (self.wq, self.wk, self.wv))
        attention = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d_head)
        x = x + self.wo(attention.transpose(1, 2).reshape(b, t, -1))
        return x + self.ff_out(F.gelu(self.ff_in(self.ln2(x))))


class OwnModel(pl.LightningModule):
    """Token embedding, a ``nn.ModuleList`` of :class:`OwnBlock`, a vocabulary head; next-token-free LM loss."""

    def __init__(self, depth: int = DEPTH) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(OwnBlock() for _ in range(depth))
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        return F.cross_entropy(logits.flatten(0, 1), batch.flatten())

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        ids = torch.randint(0, VOCAB, (16, 9), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(ids, batch_size=4)


@contextmanager
def registered_own_block() -> Iterator[None]:
    """Describe :class:`OwnBlock` to the package for the duration of a test."""
    register_architecture(
        OwnBlock,
        attentions=[AttentionLayout("", "wq", "wk", "wv", output="wo", heads="n_heads", head_size="d_head")],
        ffn=FeedForwardLayout("ff_in", "ff_out"),
        norms=("ln1", "ln2"),
        residual="pre",
    )
    try:
        yield
    finally:
        unregister_architecture(OwnBlock)
