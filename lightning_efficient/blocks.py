"""Find the stacks of Transformer blocks in any model.

This is the one place that every depth, memory and parallel technique asks "where are the
blocks?". It knows the block containers of HF BERT, RoBERTa, ViT, Marian, BART and T5 (encoder and
decoder stacks separately) and of ``torch.nn.TransformerEncoder`` / ``TransformerDecoder``, and
takes a user-given attribute path (``"model.encoder.layers"``) for anything else. Finding nothing
is an error that names what was searched, never a silent no-op.

Example:
    >>> from lightning_efficient import BertMLM
    >>> [(s.path, s.role, len(s)) for s in find_block_stacks(BertMLM(vocab_size=50, preset="tiny"))]
    [('model.bert.encoder.layer', 'encoder', 3)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lightning_efficient.errors import NoTargetModulesError

__all__ = ["BlockStack", "KNOWN_STACKS", "find_block_stacks"]

#: Container class name -> (attribute holding its blocks, role). T5's ``T5Stack`` serves both
#: stacks; its role comes from ``is_decoder``. transformers 5 keeps ViT's blocks on
#: ``ViTModel.layers``; transformers 4 on ``ViTEncoder.layer``: both are listed.
KNOWN_STACKS: dict[str, tuple[str, str | None]] = {
    "BertEncoder": ("layer", "encoder"),
    "RobertaEncoder": ("layer", "encoder"),
    "ViTEncoder": ("layer", "encoder"),
    "ViTModel": ("layers", "encoder"),
    "MarianEncoder": ("layers", "encoder"),
    "MarianDecoder": ("layers", "decoder"),
    "BartEncoder": ("layers", "encoder"),
    "BartDecoder": ("layers", "decoder"),
    "T5Stack": ("block", None),
    "TransformerEncoder": ("layers", "encoder"),
    "TransformerDecoder": ("layers", "decoder"),
}


@dataclass(frozen=True)
class BlockStack:
    """One stack of Transformer blocks found in a model.

    Attributes:
        path: Dotted attribute path from the searched root to the block list
            (e.g. ``"model.bert.encoder.layer"``).
        role: ``"encoder"``, ``"decoder"``, or ``"custom"`` for a user-given path.
        kind: The container class that matched (e.g. ``"BertEncoder"``), or ``"path"``.
        blocks: The ``nn.ModuleList`` (or ``nn.Sequential``) holding the blocks, in order.
        parent: The module that owns ``blocks`` as attribute ``attribute``; a technique that
            replaces the list (e.g. to grow depth) sets ``setattr(parent, attribute, new_list)``.
        attribute: The name of ``blocks`` on ``parent``.
    """

    path: str
    role: str
    kind: str
    blocks: nn.Module
    parent: nn.Module
    attribute: str

    def __len__(self) -> int:
        return len(self.blocks)


def _resolve(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    """Return ``(parent, attribute, module)`` for a dotted path, or fail naming the missing step."""
    parent: nn.Module = model
    names = path.split(".")
    for depth, name in enumerate(names):
        child = getattr(parent, name, None) if name else None
        if not isinstance(child, nn.Module):
            reached = ".".join(names[:depth]) or "(the model itself)"
            available = ", ".join(n for n, _ in parent.named_children()) or "none"
            raise NoTargetModulesError(
                f"block path {path!r}: {type(model).__name__} has no submodule {name!r} under {reached}; "
                f"children there: {available}"
            )
        if depth == len(names) - 1:
            return parent, name, child
        parent = child
    raise NoTargetModulesError(f"block path {path!r} is empty")


def find_block_stacks(model: nn.Module, paths: Sequence[str] | None = None) -> list[BlockStack]:
    """Find the Transformer block stacks of ``model``, in module order (encoder before decoder).

    Args:
        model: Any module: a LightningModule, an HF model, a ``nn.TransformerEncoder``, or one
            of the user's own.
        paths: Dotted attribute paths of block lists to use instead of searching (for models
            whose containers are not in :data:`KNOWN_STACKS`).

    Returns:
        One :class:`BlockStack` per stack found.

    Raises:
        NoTargetModulesError: A path does not exist or is not a list of modules, or the search
            found no known stack (the message lists what was searched for).

    Example:
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True)
        >>> stack, = find_block_stacks(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False))
        >>> stack.path, stack.kind, len(stack)
        ('layers', 'TransformerEncoder', 2)
    """
    if paths:
        stacks = []
        for path in paths:
            parent, attribute, blocks = _resolve(model, path)
            if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
                raise NoTargetModulesError(
                    f"block path {path!r} is a {type(blocks).__name__}; it must be a non-empty nn.ModuleList or nn.Sequential"
                )
            stacks.append(BlockStack(path, "custom", "path", blocks, parent, attribute))
        return stacks
    stacks = []
    for name, module in model.named_modules():
        spec = KNOWN_STACKS.get(type(module).__name__)
        if spec is None:
            continue
        attribute, role = spec
        blocks = getattr(module, attribute, None)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            continue  # a class of the same name that is not a block container
        if role is None:  # T5Stack
            role = "decoder" if getattr(module, "is_decoder", False) else "encoder"
        path = f"{name}.{attribute}" if name else attribute
        stacks.append(BlockStack(path, role, type(module).__name__, blocks, module, attribute))
    if not stacks:
        raise NoTargetModulesError(
            f"found no Transformer block stack in {type(model).__name__}: searched its modules for "
            f"{', '.join(KNOWN_STACKS)}; for another architecture pass the attribute path of the block "
            "list, e.g. paths=['model.encoder.layers']"
        )
    return stacks
