"""Find the stacks of Transformer blocks in any model.

This is the one place that every depth, memory and parallel technique asks "where are the
blocks?". It knows the block containers of HF BERT, RoBERTa (and XLM-RoBERTa, CamemBERT, ELECTRA),
DistilBERT, ViT, Marian, BART and T5 (encoder and decoder stacks separately) and of
``torch.nn.TransformerEncoder`` / ``TransformerDecoder``, and takes a user-given attribute path
(``"model.encoder.layers"``) for anything else. Finding nothing is an error that names what was
searched, never a silent no-op.

Examples:
    >>> from lightning_efficient import BertMLM
    >>> [(s.path, s.role, len(s)) for s in find_block_stacks(BertMLM(vocab_size=50, preset="tiny"))]
    [('model.bert.encoder.layer', 'encoder', 3)]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch
from torch import nn

from lightning_efficient.architectures import BlockArchitecture, architecture_of, registered_block_classes
from lightning_efficient.errors import NoTargetModulesError

__all__ = [
    "KNOWN_STACKS",
    "SKIP_PRIORITY",
    "BlockStack",
    "Priority",
    "block_hidden_states",
    "find_block_stacks",
    "passthrough_output",
    "wrap_forward",
]

#: Container class name -> (attribute holding its blocks, role). T5's ``T5Stack`` serves both
#: stacks; its role comes from ``is_decoder``. transformers 5 keeps ViT's blocks on
#: ``ViTModel.layers``; transformers 4 on ``ViTEncoder.layer``: both are listed.
KNOWN_STACKS: dict[str, tuple[str, str | None]] = {
    "BertEncoder": ("layer", "encoder"),
    "RobertaEncoder": ("layer", "encoder"),
    "XLMRobertaEncoder": ("layer", "encoder"),
    "CamembertEncoder": ("layer", "encoder"),
    "ElectraEncoder": ("layer", "encoder"),
    "Transformer": ("layer", "encoder"),  # DistilBERT's container (a generic name: taken only with a list at .layer)
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

    Examples:
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
    stacks += _registered_stacks(model, {id(stack.blocks) for stack in stacks})
    if not stacks:
        raise NoTargetModulesError(
            f"found no Transformer block stack in {type(model).__name__}: searched its modules for "
            f"{', '.join(KNOWN_STACKS)}; for another architecture pass the attribute path of the block "
            "list, e.g. paths=['model.encoder.layers']"
        )
    return stacks


def _registered_stacks(model: nn.Module, found: set[int]) -> list[BlockStack]:
    """Lists of blocks whose class a user described with ``register_architecture`` (not yet ``found``)."""
    classes = registered_block_classes()
    if not classes:
        return []
    stacks = []
    for name, module in model.named_modules():
        if not name or id(module) in found or not isinstance(module, (nn.ModuleList, nn.Sequential)) or not len(module):
            continue
        if all(isinstance(block, classes) for block in module):
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            cross = any(a.cross for a in (architecture_of(module[0]) or BlockArchitecture()).attentions)
            stacks.append(
                BlockStack(name, "decoder" if cross else "encoder", type(module[0]).__name__, module, parent, attribute)
            )
    return stacks


# -- wrapping a block's forward ----------------------------------------------------------------
class Priority(IntEnum):
    """The one order of every forward wrapper of the package: a higher value is further out.

    A wrapper further out decides whether the ones inside it run at all. Read from the outside in:

    - ``TOKEN_DROP`` (110): TokenDropping routes a subset of the tokens into the block, so what
      runs inside (skipping, checkpointing, quantization) sees only the kept tokens.
    - ``SKIP`` (100): LayerDrop and ProgressiveStacking decide whether the block runs; a skipped
      block is neither run, nor checkpointed, nor otherwise wrapped.
    - ``CHECKPOINT`` (50): ActivationCheckpointing recomputes everything inside it in backward.
    - ``QUANTIZE`` (10): QuantizationAwareTraining replaces a Linear's matmul (innermost).

    A new technique that wraps a forward takes its place in this list, here, with a reason.

    Examples:
        >>> sorted(Priority, reverse=True)[0].name, Priority.SKIP > Priority.CHECKPOINT > Priority.QUANTIZE
        ('TOKEN_DROP', True)
    """

    QUANTIZE = 10
    CHECKPOINT = 50
    SKIP = 100
    TOKEN_DROP = 110


#: Priority of wrappers that decide whether a block runs at all (kept for code written before :class:`Priority`).
SKIP_PRIORITY = Priority.SKIP

#: Keyword names under which blocks take their hidden states (HF layers, ``nn.Transformer*Layer``).
HIDDEN_KEYWORDS = ("hidden_states", "src", "tgt", "x")

ForwardWrapper = Callable[..., Any]


class _ForwardChain:
    """Installed as ``block.forward``: calls the block's own forward through the wrappers.

    Wrappers with a higher priority are further out. The chain is rebuilt on every call, so
    wrappers can be added and removed in any order without losing one another.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.previous = block.__dict__.get("forward")  # an instance forward set by someone else
        self.wrappers: dict[int, tuple[int, ForwardWrapper]] = {}
        self.next_key = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A partial, not type(block).forward.__get__(block): after a graph break inside a wrapper, torch.compile
        # rebuilds a bound method as block.forward, which is this chain, and the wrappers would run twice.
        forward = (
            self.previous if self.previous is not None else functools.partial(type(self.block).forward, self.block)
        )
        for _, wrapper in sorted(self.wrappers.values(), key=lambda item: item[0]):
            forward = functools.partial(wrapper, forward)
        return forward(*args, **kwargs)


class _WrapperHandle:
    """Removes one wrapper from a block's chain (``.remove()``, like a hook handle)."""

    def __init__(self, chain: _ForwardChain, key: int) -> None:
        self.chain, self.key = chain, key

    def remove(self) -> None:
        chain = self.chain
        chain.wrappers.pop(self.key, None)
        if not chain.wrappers and chain.block.__dict__.get("forward") is chain:
            if chain.previous is None:
                del chain.block.forward
            else:
                chain.block.forward = chain.previous


def wrap_forward(block: nn.Module, wrapper: ForwardWrapper, priority: int | Priority) -> _WrapperHandle:
    """Route ``block``'s forward through ``wrapper(forward, *args, **kwargs)``; undo with ``.remove()``.

    The block's class, parameters and checkpoint keys do not change (the wrapper lives in the
    instance's ``forward`` attribute). Several techniques may wrap one block: the wrapper with the
    higher ``priority`` is further out and decides whether the inner ones run at all (take it
    from :class:`Priority`). Handles may be removed in any order.

    Examples:
        >>> block = nn.Linear(2, 2)
        >>> handle = wrap_forward(block, lambda forward, x: 2 * forward(x), priority=0)
        >>> x = torch.ones(1, 2)
        >>> torch.equal(block(x), 2 * nn.Linear.forward(block, x))
        True
        >>> handle.remove(); "forward" in vars(block)
        False
    """
    chain = block.__dict__.get("forward")
    if not isinstance(chain, _ForwardChain):
        chain = _ForwardChain(block)
        block.forward = chain
    key = chain.next_key
    chain.next_key += 1
    chain.wrappers[key] = (priority, wrapper)
    return _WrapperHandle(chain, key)


def block_hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a block was called with: its first positional argument or hidden keyword.

    Examples:
        >>> block_hidden_states((), {"hidden_states": torch.zeros(1)}).shape
        torch.Size([1])
    """
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for name in HIDDEN_KEYWORDS:
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    raise TypeError(
        f"cannot find the hidden states of a block call: no tensor first argument or keyword in {HIDDEN_KEYWORDS}"
    )


def _returns_tuple(block: nn.Module) -> bool:
    """Whether ``block`` returns ``(hidden, ...)`` rather than ``hidden``: HF layers before transformers 5."""
    if not type(block).__module__.startswith("transformers."):
        return False
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5


def passthrough_output(block: nn.Module, hidden: torch.Tensor) -> Any:
    """What ``block`` returns when it is skipped: its input, in the form its stack expects.

    Examples:
        >>> layer = nn.TransformerEncoderLayer(d_model=4, nhead=2)
        >>> h = torch.zeros(3, 1, 4)
        >>> passthrough_output(layer, h) is h
        True
    """
    return (hidden,) if _returns_tuple(block) else hidden
