"""ActivationCheckpointing: trade compute for memory by recomputing chosen Transformer blocks.

During training a block normally keeps every intermediate tensor of its forward pass (attention
scores, FFN activations, dropout masks) until the backward pass needs them: that is most of a
Transformer's training memory. A checkpointed block keeps only its inputs; the backward pass runs
its forward a second time to rebuild the rest. Each checkpointed block therefore costs one extra
forward (about a third more compute for that block) and frees its activations.

How it is built: each chosen block's forward is routed (:func:`~lightning_efficient.blocks.wrap_forward`,
so the block's class, parameters and checkpoint keys do not change) through non-reentrant
``torch.utils.checkpoint.checkpoint``, only while the block is in training mode and gradients are
enabled (evaluation and ``torch.no_grad`` run unchanged). The checkpoint saves and restores the
RNG state (``preserve_rng_state``), so the recomputed forward draws the same dropout masks and the
gradients equal those of the unchanged model. Lightning offers activation checkpointing only
inside its FSDP strategy (GPU-only); this callback works with any strategy, on CPU and GPU.

Which blocks (of every stack :func:`~lightning_efficient.blocks.find_block_stacks` finds, e.g. both
stacks of an encoder-decoder):

- ``every=k``: blocks ``0, k, 2k, ...`` of each stack (``every=1``: all blocks; ``every=2``: half
  of them, about half the memory saving for half the recompute);
- ``names``: shell-style patterns (``fnmatch``, case-sensitive) matched against the whole
  qualified name of each block, its dotted path from the LightningModule, e.g.
  ``model.bert.encoder.layer.3``; ``*`` matches any characters *including dots*, so
  ``"*.layer.0"`` picks block 0 of a BERT encoder and ``"*.decoder.layers.*"`` every decoder
  block of a Marian model. Each pattern must match at least one block.

Composition: skipping techniques (LayerDrop, ProgressiveStacking) wrap the blocks further out
(:class:`~lightning_efficient.blocks.Priority`), so a block they skip is neither run nor
checkpointed nor recomputed. Wrappers with a priority below ``Priority.CHECKPOINT`` run inside
the checkpoint and therefore twice per step: they must draw their randomness from the global RNG
(restored for the recompute), not from a generator of their own. Forward hooks of a block run
outside the checkpoint, once.

HF models: while the callback is attached, ``config.use_cache`` of every ``PreTrainedModel`` in
the LightningModule is set to False (restored when it is removed): a key/value cache written by a
checkpointed decoder block would be written again by the recompute. Generation reads its own
``generation_config.use_cache`` and keeps its cache. Do not also turn on HF's own checkpointing
(``activation_checkpointing_enable()``, formerly ``gradient_checkpointing_enable()``): the
callback refuses blocks that already checkpoint.

``offload=True`` is activation offload, a mode of the callback: it additionally keeps the tensors
the checkpoints save (the blocks' inputs) in pinned CPU memory instead of GPU memory
(``torch.autograd.graph.save_on_cpu``). It only helps when the model runs on a GPU. On a CPU-only
run there is nothing to offload to (the activations already live in host memory), so offload turns
itself off, never silently: one info line at the start of ``fit`` says so, no ``save_on_cpu``
context is entered, and checkpointing still applies.

Peak memory with and without the callback is what
:class:`~lightning_efficient.monitor.EfficiencyMonitor` logs (``peak_memory``: the CUDA
allocator's peak, or the process's peak RSS on the CPU). The callback logs
``activation_checkpointing/checkpointed_blocks``: blocks checkpointed in the step's forward pass.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=13, batch_first=True)
    >>> model = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
    >>> ac = ActivationCheckpointing(every=2)  # blocks 0 and 2 of the stack
    >>> ac.attach(model)  # what the callback's setup does; a plain PyTorch loop can call it too
    >>> model(torch.randn(3, 5, 8)).sum().backward()
    >>> ac.checkpointed_blocks, ac.selected
    (2, ['layers.0', 'layers.2'])
    >>> ac.detach(model)
    >>> ActivationCheckpointing(every=0)
    Traceback (most recent call last):
    ...
    lightning_efficient.errors.ConfigurationError: every=0 must be an integer >= 1
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_efficient import targets
from lightning_efficient.blocks import BlockStack, Priority, wrap_forward
from lightning_efficient.errors import ConfigurationError, check_int, check_patterns
from lightning_efficient.targets import match_names
from lightning_efficient.technique import Technique

__all__ = ["CHECKPOINT_PRIORITY", "ActivationCheckpointing", "disable_hf_cache", "select_blocks"]

#: Priority of the checkpoint wrapper (an alias of ``Priority.CHECKPOINT``, below the skipping
#: techniques' ``Priority.SKIP``), so a skipped block is never checkpointed or recomputed.
CHECKPOINT_PRIORITY = Priority.CHECKPOINT


def select_blocks(
    stacks: Sequence[BlockStack], every: int = 1, names: Sequence[str] | None = None
) -> dict[str, nn.Module]:
    """The blocks to checkpoint, by qualified name (``"<stack path>.<index>"``), in model order.

    Args:
        stacks: The block stacks of the model (:func:`~lightning_efficient.blocks.find_block_stacks`).
        every: Take blocks ``0, every, 2 * every, ...`` of each stack (ignored when ``names`` is given).
        names: ``fnmatch`` patterns matched against the whole qualified name (``*`` matches dots too).

    Raises:
        NoTargetModulesError: A pattern matches no block (the message lists the block names).

    Examples:
        >>> from lightning_efficient.blocks import find_block_stacks
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True)
        >>> stacks = find_block_stacks(nn.TransformerEncoder(layer, num_layers=5, enable_nested_tensor=False))
        >>> list(select_blocks(stacks, every=2))
        ['layers.0', 'layers.2', 'layers.4']
        >>> list(select_blocks(stacks, names=["*.3", "layers.1"]))
        ['layers.1', 'layers.3']
    """
    blocks = {
        f"{stack.path}.{index}": block
        for stack in stacks
        for index, block in enumerate(stack.blocks)
        if names or index % every == 0
    }
    return {name: blocks[name] for name in match_names(blocks, names, what="Transformer block", option="names")}


class _RestoreCache:
    """Handle that puts back the ``use_cache`` values :func:`disable_hf_cache` changed."""

    def __init__(self, previous: list[tuple[Any, Any]]) -> None:
        self.previous = previous

    def remove(self) -> None:
        for config, value in reversed(self.previous):
            config.use_cache = value
        self.previous = []


def disable_hf_cache(model: nn.Module) -> _RestoreCache:
    """Set ``config.use_cache = False`` on every HF ``PreTrainedModel`` in ``model``; ``.remove()`` restores.

    Examples:
        >>> from lightning_efficient import Translation
        >>> mt = Translation(vocab_size=60, preset="tiny")
        >>> handle = disable_hf_cache(mt)
        >>> mt.model.config.use_cache
        False
        >>> handle.remove(); mt.model.config.use_cache
        True
    """
    from transformers import PreTrainedModel

    previous: list[tuple[Any, Any]] = []
    seen: set[int] = set()  # an encoder-decoder's stacks share their parent's config
    for module in model.modules():
        config = getattr(module, "config", None)
        if not isinstance(module, PreTrainedModel) or id(config) in seen or not hasattr(config, "use_cache"):
            continue
        seen.add(id(config))
        previous.append((config, config.use_cache))
        config.use_cache = False
    return _RestoreCache(previous)


class ActivationCheckpointing(Technique):
    """Recompute chosen Transformer blocks in the backward pass instead of keeping their activations.

    Args:
        every: Checkpoint blocks ``0, every, 2 * every, ...`` of each block stack (``1``: all).
        names: Instead of ``every``: ``fnmatch`` patterns matched against the blocks' qualified
            names, e.g. ``["*.encoder.layer.0", "*.decoder.layers.*"]`` (see the module docstring).
        offload: Also move the tensors the checkpoints save to pinned CPU memory (GPU runs only;
            on a CPU run it turns itself off, with one info line per fit).
        block_paths: Attribute paths of the block lists, for models the block locator does not
            know (e.g. ``["model.layers"]``); by default every stack found.

    Attributes:
        selected: Qualified names of the checkpointed blocks (set when the callback is applied).
        checkpointed_blocks: Block forwards checkpointed since the last training batch started.
    """

    name = "activation_checkpointing"
    hooks = ("setup", "on_train_batch_start", "on_train_batch_end")
    distributed_safe = True
    compile_safe = True  # tests/test_compile.py: compiled training equals eager
    compile_note = "the non-reentrant checkpoint is traced into the graph (offload on a GPU: not verified)"

    def __init__(
        self,
        every: int = 1,
        names: Sequence[str] | None = None,
        offload: bool = False,
        block_paths: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        every = check_int("every", every, low=1)
        names = check_patterns("names", names)
        if names is not None and every != 1:
            raise ConfigurationError(f"every={every} and names={list(names)!r} both choose blocks; give one of them")
        self.every = every
        self.names = list(names) if names is not None else None
        self.offload = bool(offload)
        self.block_paths = list(block_paths) if block_paths else None
        self.selected: list[str] = []
        self.checkpointed_blocks = 0

    def apply(self, pl_module: nn.Module) -> list[Any]:
        blocks = targets.select_blocks(
            pl_module, self.names, every=self.every, block_paths=self.block_paths, option="names"
        )
        already = [name for name, block in blocks.items() if getattr(block, "gradient_checkpointing", False)]
        if already:
            raise ConfigurationError(
                f"blocks {already[:3]} already checkpoint themselves (HF's activation_checkpointing_enable() or "
                "gradient_checkpointing_enable() is on): turn it off on the HF model "
                "(activation_checkpointing_disable()) or remove ActivationCheckpointing"
            )
        self.selected = list(blocks)
        handles: list[Any] = [disable_hf_cache(pl_module)]
        for block in blocks.values():
            handles.append(wrap_forward(block, functools.partial(self._forward, block), CHECKPOINT_PRIORITY))
        return handles

    def _forward(self, block: nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        self.checkpointed_blocks += 1
        # Offload is off for a block on the CPU (setup says so once per fit): nothing to offload to.
        offload = self.offload and any(p.device.type != "cpu" for p in block.parameters())
        context = torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext()
        with context:
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.offload and stage == "fit" and trainer.strategy.root_device.type == "cpu":
            rank_zero_info(
                "ActivationCheckpointing: offload is off because this run is on the CPU: there is no GPU memory to "
                "offload saved activations from (checkpointing still applies)"
            )
        super().setup(trainer, pl_module, stage)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.checkpointed_blocks = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.log_metrics(pl_module, {"checkpointed_blocks": float(self.checkpointed_blocks)})
