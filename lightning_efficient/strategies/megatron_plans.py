"""Megatron-LM tensor-parallel plans read from the architecture table, and the checks run before any collective.

:func:`megatron_plan` asks the block locator (:func:`~lightning_efficient.blocks.find_block_stacks`)
where the Transformer blocks are and reads each block's attentions, FFN and norms from
:func:`~lightning_efficient.architectures.block_view` (so a block described once with
:func:`~lightning_efficient.architectures.register_architecture` gets a plan too). It shards

- the attention Q/K/V projections column-wise (each rank holds ``heads / tp`` heads) and the
  attention output projection row-wise (one all-reduce per attention),
- the FFN's first projection column-wise and its second row-wise (one all-reduce per FFN),
- optionally (``vocab_parallel``) the word embedding(s) and the output head over the vocabulary
  (from :func:`~lightning_efficient.architectures.model_architecture_of`),
- optionally (``sequence_parallel``) the norm/dropout regions between them over the sequence
  (the all-reduces become all-gather + reduce-scatter; activations there are ``1/tp`` the size).

These functions (:func:`megatron_plan`, :func:`resolve_plan`, :func:`check_plan`,
:func:`parallel_sizes`) are pure: they need no process group, so the strategy calls them on every
rank before any collective and a bad configuration fails everywhere with a
:class:`~lightning_efficient.errors.ConfigurationError` instead of hanging.

Examples:
    >>> from lightning_efficient import BertMLM
    >>> model = BertMLM(vocab_size=50, preset="tiny", ffn_size=38)
    >>> plan = megatron_plan(model, tensor_parallel_size=2)
    >>> {fqn: type(style).__name__ for fqn, style in plan.items() if ".layer.0." in fqn}  # doctest: +NORMALIZE_WHITESPACE
    {'model.bert.encoder.layer.0.attention.self.query': 'ColwiseParallel',
     'model.bert.encoder.layer.0.attention.self.key': 'ColwiseParallel',
     'model.bert.encoder.layer.0.attention.self.value': 'ColwiseParallel',
     'model.bert.encoder.layer.0.attention.output.dense': 'RowwiseParallel',
     'model.bert.encoder.layer.0.intermediate.dense': 'ColwiseParallel',
     'model.bert.encoder.layer.0.output.dense': 'RowwiseParallel'}
    >>> megatron_plan(BertMLM(vocab_size=50, preset="tiny"), tensor_parallel_size=2)
    Traceback (most recent call last):
    ...
    lightning_efficient.errors.ConfigurationError: model.bert.encoder.layer.0.intermediate.dense: FFN width (out_features=37) is not divisible by tensor_parallel_size=2; use a tensor_parallel_size that divides it (1, 37) or change the model's FFN width
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from lightning_efficient.architectures import architecture_of, block_view, known_block_classes, model_architecture_of
from lightning_efficient.blocks import find_block_stacks
from lightning_efficient.errors import ConfigurationError, NoTargetModulesError

__all__ = ["STYLES", "check_parallel_size", "check_plan", "megatron_plan", "parallel_sizes", "resolve_plan"]


def _styles() -> dict[str, ParallelStyle]:
    return {
        "colwise": ColwiseParallel(),
        "rowwise": RowwiseParallel(),
        "colwise_gather": ColwiseParallel(output_layouts=Replicate()),  # e.g. an output head: full logits
        "vocab_embedding": RowwiseParallel(input_layouts=Replicate()),  # nn.Embedding sharded over the vocabulary
        "sequence_parallel": SequenceParallel(use_local_output=True),
        "colwise_from_sequence": ColwiseParallel(input_layouts=Shard(1)),
        "rowwise_to_sequence": RowwiseParallel(output_layouts=Shard(1)),
    }


#: The style names a user plan (e.g. from YAML) may use, and the ``torch.distributed.tensor.parallel``
#: style each stands for. A plan given in Python may also use ``ParallelStyle`` objects directly.
STYLES: dict[str, ParallelStyle] = _styles()


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def check_parallel_size(name: str, value: Any) -> None:
    """Fail unless a mesh dimension's size ``value`` (argument ``name``) is a positive integer or ``"auto"``.

    Examples:
        >>> check_parallel_size("data_parallel_size", "auto")
        >>> check_parallel_size("data_parallel_size", 0)
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: data_parallel_size=0 must be a positive integer or 'auto'
    """
    if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigurationError(f"{name}={value!r} must be a positive integer or 'auto'")


def parallel_sizes(
    world_size: int,
    data_parallel_size: int | Literal["auto"] = "auto",
    tensor_parallel_size: int | Literal["auto"] = "auto",
    num_nodes: int = 1,
) -> tuple[int, int]:
    """Resolve ``(data_parallel_size, tensor_parallel_size)`` for ``world_size`` processes.

    ``"auto"`` for both is Lightning's rule: data-parallel across nodes, tensor-parallel within a
    node; ``"auto"`` for one of them is the world size divided by the other.

    Raises:
        ConfigurationError: A size is not a positive int or ``"auto"``, or the world does not factor
            into ``dp x tp``.

    Examples:
        >>> parallel_sizes(4), parallel_sizes(4, data_parallel_size=2), parallel_sizes(4, 1, 4)
        ((1, 4), (2, 2), (1, 4))
        >>> parallel_sizes(3, tensor_parallel_size=2)
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: world size 3 does not factor into data_parallel_size x tensor_parallel_size=2; use a tensor_parallel_size that divides 3 (1, 3), or change the number of devices
    """
    check_parallel_size("data_parallel_size", data_parallel_size)
    check_parallel_size("tensor_parallel_size", tensor_parallel_size)
    if data_parallel_size == "auto" and tensor_parallel_size == "auto":
        data_parallel_size = num_nodes
    for name, known, other in (
        ("tensor_parallel_size", tensor_parallel_size, "data_parallel_size"),
        ("data_parallel_size", data_parallel_size, "tensor_parallel_size"),
    ):
        if known != "auto" and world_size % known:
            raise ConfigurationError(
                f"world size {world_size} does not factor into {other} x {name}={known}; use a {name} that "
                f"divides {world_size} ({_divisors(world_size)}), or change the number of devices"
            )
    dp = world_size // tensor_parallel_size if data_parallel_size == "auto" else data_parallel_size
    tp = world_size // dp if tensor_parallel_size == "auto" else tensor_parallel_size
    if dp * tp != world_size:
        raise ConfigurationError(
            f"data_parallel_size={dp} x tensor_parallel_size={tp} = {dp * tp} is not the world size {world_size}; "
            "choose sizes whose product is the number of processes (devices x nodes)"
        )
    return dp, tp


def megatron_plan(
    model: nn.Module,
    tensor_parallel_size: int,
    block_paths: Sequence[str] | None = None,
    vocab_parallel: bool = False,
    sequence_parallel: bool = False,
) -> dict[str, ParallelStyle]:
    """The Megatron-LM plan of ``model``: ``{module path: ParallelStyle}`` for ``parallelize_module``.

    Blocks come from :func:`~lightning_efficient.blocks.find_block_stacks`; each block class needs
    an entry in the architecture table (built in: HF BERT, RoBERTa, ViT, Marian, BART; yours with
    :func:`~lightning_efficient.architectures.register_architecture`) with separate Q/K/V
    projections. Paths are relative to ``model`` (pass the LightningModule). The plan is checked
    with :func:`check_plan`.

    Args:
        model: The model (a LightningModule or an HF model).
        tensor_parallel_size: Ranks a block is split over; heads and FFN width must be divisible.
        block_paths: Attribute paths of the block lists, for the locator (default: search).
        vocab_parallel: Also shard the word embedding(s) and the output head over the vocabulary
            (the head's logits are gathered); tied weights stay tied.
        sequence_parallel: Also shard the norm/dropout regions over the sequence dimension
            (the sequence length must then be divisible by ``tensor_parallel_size``).

    Raises:
        ConfigurationError: A block class has no architecture entry or a fused in-projection (pass
            ``plan=`` to the strategy), or a head count, FFN width or vocabulary is not divisible by
            ``tensor_parallel_size``.
        NoTargetModulesError: No block stack was found.
    """
    plan: dict[str, ParallelStyle] = {}
    for stack in find_block_stacks(model, block_paths):
        for index, block in enumerate(stack.blocks):
            if architecture_of(block) is None:
                raise ConfigurationError(
                    f"{type(block).__name__} (in {stack.path}) has no architecture entry, so no tensor-parallel plan; "
                    f"known block classes: {', '.join(known_block_classes())}; describe it once with "
                    "lightning_efficient.architectures.register_architecture, or pass "
                    f"TensorParallelStrategy(plan={{module path: style}}) with styles from: {', '.join(STYLES)}"
                )
            plan.update(_block_plan(block, f"{stack.path}.{index}", tensor_parallel_size, sequence_parallel))
    if vocab_parallel:
        plan.update(_vocab_plan(model))
    check_plan(model, plan, tensor_parallel_size)
    return plan


def _block_plan(
    block: nn.Module, prefix: str, tensor_parallel_size: int, sequence_parallel: bool
) -> dict[str, ParallelStyle]:
    """One block's plan (paths under ``prefix``), from its architecture entry."""
    view = block_view(block)
    plan: dict[str, ParallelStyle] = {}
    for attention in view.attentions:
        where = _join(prefix, attention.path)
        if attention.fused:
            raise ConfigurationError(
                f"{where} ({type(block).__name__}) has a fused in-projection ({attention.layout.in_proj}), which a "
                "Megatron plan cannot shard into heads; pass TensorParallelStrategy(plan={module path: style}) "
                f"(e.g. only the FFN) with styles from: {', '.join(STYLES)}"
            )
        if attention.heads % tensor_parallel_size:
            raise ConfigurationError(
                f"{where}: {attention.heads} attention heads are not divisible by tensor_parallel_size="
                f"{tensor_parallel_size}; use a tensor_parallel_size that divides them ({_divisors(attention.heads)}) "
                "or change num_heads"
            )
        if sequence_parallel:  # gather the sequence once, before the attention (its reshapes need all of it)
            if not attention.path:
                raise ConfigurationError(
                    f"sequence_parallel: {prefix} ({type(block).__name__}) computes its attention in the block itself; "
                    "the sequence is gathered at the entry of an attention submodule; set sequence_parallel=False "
                    "or pass TensorParallelStrategy(plan={module path: style})"
                )
            others = (None,) * (attention.layout.positional_inputs - 1)
            plan[where] = PrepareModuleInput(
                input_layouts=(Shard(1), *others), desired_input_layouts=(Replicate(), *others), use_local_output=True
            )
        for path in attention.layout.projection_paths():
            plan[_join(prefix, path)] = ColwiseParallel()
        output = _join(prefix, attention.layout.output)
        plan[output] = RowwiseParallel(output_layouts=Shard(1)) if sequence_parallel else RowwiseParallel()
    if view.ffn is not None:
        first, second = _join(prefix, view.ffn.layout.first), _join(prefix, view.ffn.layout.second)
        plan[first] = ColwiseParallel(input_layouts=Shard(1)) if sequence_parallel else ColwiseParallel()
        plan[second] = RowwiseParallel(output_layouts=Shard(1)) if sequence_parallel else RowwiseParallel()
    if sequence_parallel:
        for norm in view.architecture.norms:
            plan[_join(prefix, norm)] = SequenceParallel(use_local_output=True)
    return plan


def _vocab_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    for path, module in model.named_modules():
        known = model_architecture_of(module)
        if known is None:
            continue
        plan: dict[str, ParallelStyle] = {
            _join(path, e): RowwiseParallel(input_layouts=Replicate()) for e in known.embeddings
        }
        plan.update({_join(path, h): ColwiseParallel(output_layouts=Replicate()) for h in known.heads})
        return plan
    raise ConfigurationError(
        f"vocab_parallel=True: {type(model).__name__} holds no model whose vocabulary modules are known (describe "
        "its class with lightning_efficient.architectures.register_model_architecture); set vocab_parallel=False "
        "or give the embedding a 'vocab_embedding' entry in plan="
    )


def resolve_plan(model: nn.Module, plan: Mapping[str, str | ParallelStyle]) -> dict[str, ParallelStyle]:
    """Expand a user plan: glob patterns (``*``) to module paths, style names to ``ParallelStyle`` objects.

    Raises:
        NoTargetModulesError: An entry matches no module of ``model``.
        ConfigurationError: A style name is not one of :data:`STYLES`.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> {k: type(v).__name__ for k, v in resolve_plan(model, {"0": "colwise", "2": "rowwise"}).items()}
        {'0': 'ColwiseParallel', '2': 'RowwiseParallel'}
        >>> resolve_plan(model, {"3": "colwise"})
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.NoTargetModulesError: plan entry '3' matches no module of Sequential; modules there: 0, 1, 2
    """
    names = [name for name, _ in model.named_modules() if name]
    resolved: dict[str, ParallelStyle] = {}
    for pattern, style in plan.items():
        if isinstance(style, str):
            if style not in STYLES:
                raise ConfigurationError(
                    f"plan[{pattern!r}]={style!r} is not a known style; choose one of: {', '.join(STYLES)}"
                )
            style = _styles()[style]  # a fresh object per entry
        elif not isinstance(style, ParallelStyle):
            raise ConfigurationError(
                f"plan[{pattern!r}] is a {type(style).__name__}; it must be a style name ({', '.join(STYLES)}) "
                "or a ParallelStyle"
            )
        matches = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise NoTargetModulesError(
                f"plan entry {pattern!r} matches no module of {type(model).__name__}; modules there: {shown}"
            )
        for name in matches:
            resolved[name] = style
    return resolved


def _ffn_inputs(model: nn.Module) -> set[str]:
    """Paths of the FFN first projections of every block in ``model`` that has an architecture entry."""
    paths = set()
    for name, module in model.named_modules():
        architecture = architecture_of(module)
        if architecture is not None and architecture.ffn is not None:
            paths.add(_join(name, architecture.ffn.first))
    return paths


def check_plan(model: nn.Module, plan: Mapping[str, ParallelStyle], tensor_parallel_size: int) -> None:
    """Check that every entry names a module whose sharded dimension ``tensor_parallel_size`` divides.

    Column-wise ``nn.Linear``: ``out_features``; row-wise ``nn.Linear``: ``in_features``;
    row-wise ``nn.Embedding``: ``num_embeddings`` (vocabulary); column-wise ``nn.Embedding``:
    ``embedding_dim``. Uneven shards would give ranks different head counts or break the
    reshapes of HF attention. A block's FFN (from the architecture table) is named as such.

    Raises:
        NoTargetModulesError: An entry names no module.
        ConfigurationError: A sharded dimension is not divisible.

    Examples:
        >>> check_plan(nn.Sequential(nn.Linear(4, 6)), {"0": ColwiseParallel()}, tensor_parallel_size=4)
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: 0: out_features=6 is not divisible by tensor_parallel_size=4; use a tensor_parallel_size that divides it (1, 2, 3, 6) or change the model's width
    """
    for path, style in plan.items():
        try:
            module = model.get_submodule(path)
        except AttributeError as error:
            raise NoTargetModulesError(
                f"plan entry {path!r} matches no module of {type(model).__name__}: {error}"
            ) from None
        sharded: tuple[str, int] | None = None
        if isinstance(module, nn.Linear):
            if isinstance(style, ColwiseParallel):
                sharded = ("out_features", module.out_features)
            elif isinstance(style, RowwiseParallel):
                sharded = ("in_features", module.in_features)
        elif isinstance(module, nn.Embedding):
            if isinstance(style, RowwiseParallel):
                sharded = ("num_embeddings (the vocabulary)", module.num_embeddings)
            elif isinstance(style, ColwiseParallel):
                sharded = ("embedding_dim", module.embedding_dim)
        if sharded is not None and sharded[1] % tensor_parallel_size:
            what, size = sharded
            is_ffn = isinstance(style, ColwiseParallel) and path in _ffn_inputs(model)
            label = f"FFN width (out_features={size})" if is_ffn else f"{what}={size}"
            raise ConfigurationError(
                f"{path}: {label} is not divisible by tensor_parallel_size={tensor_parallel_size}; use a "
                f"tensor_parallel_size that divides it ({_divisors(size)}) or change the model's "
                f"{'FFN width' if is_ffn else 'width'}"
            )
