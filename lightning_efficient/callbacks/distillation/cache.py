"""The teacher-output cache: the teacher runs once per distinct example, not once per epoch.

On a fixed transfer set (Tang et al. build theirs once, before training), every epoch after the
first would run the teacher on inputs it has already seen. :class:`TeacherOutputCache` keeps the
teacher's logits of each example under a hash of the example's inputs (:func:`example_keys`: its
non-pad tokens, so the same sentence padded into another batch hits), in memory or also on disk,
up to a size limit. Each augmented variant of a sentence is its own key, so augmentation stays
correct; augmentation drawn afresh every epoch just never hits. The contents are not training
state: a resumed run rebuilds them (or reads the disk file).

Examples:
    >>> batch = {"input_ids": torch.tensor([[5, 6, 0], [5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    >>> keys = example_keys(batch)
    >>> keys == example_keys({"input_ids": batch["input_ids"][:, :2], "attention_mask": batch["attention_mask"][:, :2]})
    False
    >>> example_keys({k: v[:1, :2] for k, v in batch.items()})[0] == keys[0]  # padding does not change the key
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_efficient.atomic_write import write_atomically
from lightning_efficient.checkpoint import load_checkpoint

__all__ = ["TeacherOutputCache", "example_keys", "tensor_bytes"]

#: Batch entries that do not change what the teacher computes (labels, and what techniques add).
NOT_INPUTS = frozenset(
    {"labels", "importance_weights", "importance_score_request", "importance_scores", "soft_targets"}
)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values (any dtype, any device), for hashing.

    Examples:
        >>> tensor_bytes(torch.tensor([1, 2], dtype=torch.int16))
        b'\\x01\\x00\\x02\\x00'
    """
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _row_bytes(value: torch.Tensor, row: int, mask: torch.Tensor | None) -> bytes:
    item = value[row]
    if mask is not None and value.dim() >= 2 and value.shape[:2] == mask.shape:
        item = item[mask[row].bool()]  # only the real tokens: padding does not change the key
    return tensor_bytes(item)


def example_keys(batch: Mapping[str, Any], exclude: Collection[str] = NOT_INPUTS) -> list[str]:
    """A key per example of a dict batch: a SHA-1 of its input tensors' rows (padding stripped).

    Every tensor whose first dimension is the batch size takes part, except ``exclude``; a tensor
    aligned with ``attention_mask`` contributes only the example's real tokens.
    """
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and k not in exclude}
    size = next(iter(tensors.values())).shape[0]
    # To the CPU once per tensor (not once per row: on a GPU each copy is a synchronisation).
    tensors = {k: v.detach().cpu() for k, v in sorted(tensors.items()) if v.shape[0] == size}
    mask = tensors.get("attention_mask")
    keys = []
    for row in range(size):
        digest = hashlib.sha1(usedforsecurity=False)
        for name, value in tensors.items():
            digest.update(f"{name}:{value.dtype}:".encode())
            digest.update(_row_bytes(value, row, mask))
        keys.append(digest.hexdigest())
    return keys


class TeacherOutputCache:
    """Teacher logits by example key, in memory, optionally saved to and read from one file.

    Args:
        max_bytes: Stop adding entries once they hold this many bytes (entries already in stay).
        path: A file to read at start (when it exists) and write by :meth:`save`; None: memory only.

    Examples:
        >>> cache = TeacherOutputCache(max_bytes=1024)
        >>> cache.get(["a", "b"])
        [None, None]
        >>> cache.put(["a"], torch.tensor([[1.0, 2.0]]))
        >>> [None if x is None else x.tolist() for x in cache.get(["a", "b"])], cache.hits, cache.misses
        ([[1.0, 2.0], None], 1, 3)
    """

    def __init__(self, max_bytes: int, path: str | Path | None = None) -> None:
        self.max_bytes = max_bytes
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._unsaved = False
        if self.path is not None and self.path.is_file():
            stored = load_checkpoint(self.path)
            self.entries = dict(stored["entries"])
            self.bytes = sum(t.numel() * t.element_size() for t in self.entries.values())

    def get(self, keys: list[str]) -> list[torch.Tensor | None]:
        """The stored logits of each key (None for a miss); counts hits and misses."""
        found = [self.entries.get(key) for key in keys]
        hits = sum(item is not None for item in found)
        self.hits += hits
        self.misses += len(keys) - hits
        return found

    def put(self, keys: list[str], logits: torch.Tensor) -> None:
        """Store row ``i`` of ``logits`` (on CPU) under ``keys[i]`` while the size limit allows."""
        rows = logits.detach().float().cpu()
        for key, row in zip(keys, rows):
            size = row.numel() * row.element_size()
            if self.bytes + size > self.max_bytes:
                return
            self.entries[key] = row.clone()
            self.bytes += size
            self._unsaved = True

    def save(self) -> None:
        """Write the entries to :attr:`path` atomically (nothing to do in memory mode or when unchanged)."""
        if self.path is None or not self._unsaved:
            return
        write_atomically(self.path, lambda file: torch.save({"entries": self.entries}, file))
        self._unsaved = False

    @property
    def hit_rate(self) -> float:
        """Hits over lookups so far (0 before any)."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0
