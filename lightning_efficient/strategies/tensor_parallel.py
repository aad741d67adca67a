"""Tensor parallelism (Megatron-LM) for our Transformers, on ``torch.distributed.tensor.parallel``.

:class:`TensorParallelStrategy` is Lightning's ``ModelParallelStrategy`` that writes the plan
itself: at setup it applies :func:`~lightning_efficient.strategies.megatron_plans.megatron_plan`
(the attention heads and FFN neurons of every block split over the ranks, read from the
architecture table; optionally the vocabulary and the sequence) with ``parallelize_module``, and
with a data dimension above 1 shards each replica with FSDP2 (it extends
:class:`~lightning_efficient.strategies.fully_sharded.FullyShardedStrategy`, which holds gradient
clipping over DTensors, :func:`clip_grad_norm_`, and :func:`repoint_optimizers`, importable from
here too). This module holds the strategy and what it installs: the sequence-parallel hooks at
the entry and exit of each block stack, re-tying of tied weights, and the check that every
technique in ``trainer.callbacks`` composes with tensor parallelism (:func:`check_strategy_support`).

The plans and the size checks (:func:`megatron_plan`, :func:`resolve_plan`, :func:`check_plan`,
:func:`parallel_sizes`) live in :mod:`~lightning_efficient.strategies.megatron_plans` and are
importable from here too.

On a CPU with gloo, tensor parallelism is *slower* than one process (every block adds two
collectives through gloo); there it is for correctness checks. The speed-up is a multi-GPU matter.

Examples:
    >>> from lightning_efficient import ActivationCheckpointing, ViTClassifier
    >>> plan = megatron_plan(ViTClassifier(num_labels=10, preset="tiny", ffn_size=38), tensor_parallel_size=2)
    >>> sorted({type(style).__name__ for style in plan.values()})
    ['ColwiseParallel', 'RowwiseParallel']
    >>> check_strategy_support([ActivationCheckpointing()])  # declared to compose: no error
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from lightning_efficient.blocks import block_hidden_states, find_block_stacks
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.strategies.fully_sharded import (
    FULLY_SHARDED_COMPOSES_WITH,
    FullyShardedStrategy,
    _has_dtensor,
    check_supported_techniques,
    clip_grad_norm_,
    repoint_optimizers,
)
from lightning_efficient.strategies.megatron_plans import (
    STYLES,
    check_parallel_size,
    check_plan,
    megatron_plan,
    parallel_sizes,
    resolve_plan,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "COMPOSES_WITH",
    "STYLES",
    "TensorParallelStrategy",
    "check_composition",
    "check_plan",
    "check_strategy_support",
    "clip_grad_norm_",
    "megatron_plan",
    "parallel_sizes",
    "repoint_optimizers",
    "resolve_plan",
]

#: Names of the techniques (``Technique.name``) verified under tensor parallelism. Any other
#: technique in ``trainer.callbacks`` makes :class:`TensorParallelStrategy` fail at setup.
COMPOSES_WITH: frozenset[str] = frozenset({"activation_checkpointing", "lr_scaling", "trust_ratio"})


def check_strategy_support(callbacks: Iterable[Any], allowed: Iterable[str] = COMPOSES_WITH) -> None:
    """Fail if a technique in ``callbacks`` is not declared to compose with tensor parallelism.

    :func:`~lightning_efficient.strategies.fully_sharded.check_supported_techniques` for this strategy.

    Examples:
        >>> from lightning_efficient import LayerDrop
        >>> check_strategy_support([LayerDrop(drop_rate=0.1)])
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: layer_drop (LayerDrop) is not supported under tensor parallelism (TensorParallelStrategy); techniques that compose with it: activation_checkpointing, lr_scaling, trust_ratio; remove it from trainer.callbacks or train with DDP
    """
    check_supported_techniques(callbacks, allowed, TensorParallelStrategy.description)


def check_composition(callbacks: Iterable[Any], allowed: Iterable[str] = COMPOSES_WITH) -> None:
    """Deprecated name of :func:`check_strategy_support` (kept for one release): warns, then checks.

    Not to be confused with :func:`lightning_efficient.technique.check_composition` (techniques
    against each other).

    Examples:
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     check_composition([])
        >>> caught[0].category.__name__
        'DeprecationWarning'
    """
    warnings.warn(
        "lightning_efficient.strategies.tensor_parallel.check_composition is deprecated; use "
        "lightning_efficient.strategies.tensor_parallel.check_strategy_support",
        DeprecationWarning,
        stacklevel=2,
    )
    check_strategy_support(callbacks, allowed)


# -- sequence-parallel stack entry and exit -------------------------------------------------------
def _shard_stack_input(mesh: DeviceMesh, path: str) -> Any:
    """A forward pre-hook for a stack's first block: its (replicated) input becomes this rank's sequence shard."""

    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        hidden = block_hidden_states(args, kwargs)
        if hidden.shape[1] % mesh.size():
            raise ConfigurationError(
                f"sequence_parallel: {path} got a sequence of length {hidden.shape[1]}, not divisible by "
                f"tensor_parallel_size={mesh.size()}; pad the batches to a multiple of {mesh.size()} or set sequence_parallel=False"
            )
        local = (
            DTensor.from_local(hidden, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()
        )
        if args and args[0] is hidden:
            return (local, *args[1:]), kwargs
        return args, {**kwargs, next(k for k, v in kwargs.items() if v is hidden): local}

    return hook


def _gather_stack_output(mesh: DeviceMesh) -> Any:
    """A forward hook for a stack's last block: its sequence shard is gathered to the full sequence."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        full = DTensor.from_local(hidden, mesh, [Shard(1)], run_check=False).full_tensor()
        return (full, *output[1:]) if isinstance(output, tuple) else full

    return hook


# -- applying a plan ------------------------------------------------------------------------------
def _tied_groups(model: nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _set_parameter(model: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, attribute = name.rpartition(".")
    model.get_submodule(owner).register_parameter(attribute, value)


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Tie again the parameters that were one before parallelizing (e.g. embedding and output head)."""
    for names in groups:
        params = {name: model.get_parameter(name) for name in names}
        distinct = {id(p): p for p in params.values()}
        if len(distinct) == 1:
            continue
        sharded = [p for p in distinct.values() if isinstance(p, DTensor)]
        keep = sharded[0] if sharded else next(iter(distinct.values()))
        for other in sharded[1:]:
            if other.placements != keep.placements:
                raise ConfigurationError(
                    f"tied parameters {', '.join(names)} got different placements ({keep.placements} vs "
                    f"{other.placements}); shard them alike (e.g. embedding 'vocab_embedding' with head 'colwise_gather')"
                )
        for name in names:
            if params[name] is not keep:
                _set_parameter(model, name, keep)


def _sequence_hooks(model: nn.Module, mesh: DeviceMesh, block_paths: Sequence[str] | None) -> list[Any]:
    handles = []
    for stack in find_block_stacks(model, block_paths):
        handles.append(
            stack.blocks[0].register_forward_pre_hook(_shard_stack_input(mesh, stack.path), with_kwargs=True)
        )
        handles.append(stack.blocks[len(stack.blocks) - 1].register_forward_hook(_gather_stack_output(mesh)))
    return handles


class TensorParallelStrategy(FullyShardedStrategy):
    """Megatron tensor parallelism, and with ``data_parallel_size > 1`` 2D (data x tensor) parallelism.

    At setup (after the LightningModule's ``configure_model`` and the techniques' surgery, before
    the optimizers are built) it applies :func:`megatron_plan` (or your ``plan``) with
    ``parallelize_module`` on the ``tensor_parallel`` dimension of Lightning's device mesh. With
    ``data_parallel_size > 1`` it then shards every replica over the ``data_parallel`` dimension
    with FSDP2, as :class:`~lightning_efficient.strategies.FullyShardedStrategy` does (a block per
    unit, the LightningModule as the root unit holding the embeddings and heads, every step run
    through the root's forward), so parameters become 2D DTensors. Gradient clipping
    (``Trainer(gradient_clip_val=...)``) uses :func:`clip_grad_norm_`; checkpoints are Lightning's
    distributed checkpoints (a folder, one shard per rank) that ``fit(ckpt_path=...)`` resumes. Our
    DataModules shard the training data over the data-parallel ranks only (every tensor-parallel
    rank of a replica sees the same batches); for your own loaders use
    :class:`~lightning_efficient.data.sampling.DataParallelSampler`.

    Everything is checked on every rank before the first collective: the world factors into
    ``dp x tp`` (at ``Trainer`` construction), the plan matches modules whose heads and widths
    ``tp`` divides, and every technique in ``trainer.callbacks`` is in :attr:`composes_with`
    (with ``dp > 1`` also in the FSDP2 set).

    From YAML (``configs/strategies/tensor_parallel.yaml``, ``configs/strategies/2d.yaml``)::

        trainer:
          devices: 4
          strategy:
            class_path: lightning_efficient.strategies.TensorParallelStrategy
            init_args: {data_parallel_size: 2, tensor_parallel_size: 2}

    Args:
        tensor_parallel_size: Ranks each block is split over; ``"auto"``: all devices of a node.
        data_parallel_size: Model replicas, each sharded with FSDP2 when above 1; ``"auto"``: the
            rest of the world.
        plan: Your own plan instead of the built-in one: ``{module path or glob: style}``, paths
            relative to the LightningModule, styles named in :data:`STYLES` or ``ParallelStyle``
            objects. Needed for blocks the architecture table does not describe, or with a fused
            in-projection (``nn.TransformerEncoderLayer``).
        block_paths: Attribute paths of the block lists, for models the locator does not know.
        vocab_parallel: Shard the word embedding(s) and output head over the vocabulary.
        sequence_parallel: Shard LayerNorm/dropout regions over the sequence (length divisible by
            ``tensor_parallel_size``).
        offload: With ``data_parallel_size > 1``: FSDP2's CPU offload (GPU runs only; see
            :class:`~lightning_efficient.strategies.FullyShardedStrategy`).
        save_distributed_checkpoint: One shard per rank (a folder); False: one full file from rank 0.
        process_group_backend: ``"gloo"`` on CPU, ``"nccl"`` on GPUs (default: by device).
        timeout: Timeout of collectives.

    Raises:
        ConfigurationError: A bad size or plan (see :func:`parallel_sizes`, :func:`megatron_plan`).

    Examples:
        >>> TensorParallelStrategy(tensor_parallel_size=0)
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: tensor_parallel_size=0 must be a positive integer or 'auto'
        >>> import lightning.pytorch as pl
        >>> pl.Trainer(accelerator="cpu", devices=3, strategy=TensorParallelStrategy(tensor_parallel_size=2))
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: world size 3 does not factor into data_parallel_size x tensor_parallel_size=2; use a tensor_parallel_size that divides 3 (1, 3), or change the number of devices
    """

    #: Techniques (by ``Technique.name``) that compose with tensor parallelism; others fail at setup.
    composes_with: ClassVar[frozenset[str]] = COMPOSES_WITH
    description: ClassVar[str] = "tensor parallelism (TensorParallelStrategy)"

    def __init__(
        self,
        tensor_parallel_size: int | Literal["auto"] = "auto",
        data_parallel_size: int | Literal["auto"] = "auto",
        plan: Mapping[str, str | ParallelStyle] | None = None,
        block_paths: Sequence[str] | None = None,
        vocab_parallel: bool = False,
        sequence_parallel: bool = False,
        offload: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        check_parallel_size("tensor_parallel_size", tensor_parallel_size)
        if plan is not None:
            if not isinstance(plan, Mapping) or not plan:
                raise ConfigurationError(f"plan={plan!r} must be a non-empty mapping of module path -> style")
            for pattern, style in plan.items():
                if isinstance(style, str) and style not in STYLES:
                    raise ConfigurationError(
                        f"plan[{pattern!r}]={style!r} is not a known style; choose one of: {', '.join(STYLES)}"
                    )
        super().__init__(
            data_parallel_size=data_parallel_size,
            block_paths=block_paths,
            offload=offload,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._tensor_parallel_size = tensor_parallel_size
        self.plan = dict(plan) if plan is not None else None
        self.vocab_parallel = vocab_parallel
        self.sequence_parallel = sequence_parallel
        self._handles: list[Any] = []

    # -- checks before any collective ---------------------------------------------------------
    def _sizes(self) -> tuple[int, int]:
        world = self.num_nodes * self.num_processes
        return parallel_sizes(world, self._data_parallel_size, self._tensor_parallel_size, self.num_nodes)

    def build_plan(self, model: nn.Module, tensor_parallel_size: int) -> dict[str, ParallelStyle]:
        """The plan the strategy applies to ``model``: ``plan`` if given, else :func:`megatron_plan`; checked."""
        if self.plan is not None:
            plan = resolve_plan(model, self.plan)
            check_plan(model, plan, tensor_parallel_size)
            return plan
        return megatron_plan(model, tensor_parallel_size, self.block_paths, self.vocab_parallel, self.sequence_parallel)

    def _check(self) -> tuple[int, int]:
        dp, tp = super()._check()
        module = self.lightning_module
        if module is not None and any(True for _ in module.parameters()) and not _has_dtensor(module):
            self.build_plan(module, tp)
        return dp, tp

    def _check_support(self, callbacks: Any, data_parallel_size: int) -> None:
        """Fail on a technique not in :attr:`composes_with`, or with ``dp > 1`` not composing with FSDP2 either."""
        super()._check_support(callbacks, data_parallel_size)
        if data_parallel_size > 1:
            check_supported_techniques(
                callbacks, FULLY_SHARDED_COMPOSES_WITH, "the data dimension of TensorParallelStrategy (FSDP2)"
            )

    # -- setup ----------------------------------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        """Apply the plan on the ``tensor_parallel`` dimension (re-tying tied weights), then FSDP2 on ``data_parallel``."""
        mesh = self.device_mesh
        tp_mesh = mesh["tensor_parallel"]
        plan = self.build_plan(model, tp_mesh.size())  # pure: fails alike on every rank
        if self.plan is None:
            self._check_support(self.lightning_module.trainer.callbacks, mesh["data_parallel"].size())
        tied = _tied_groups(model)
        if tp_mesh.size() > 1:
            parallelize_module(model, tp_mesh, plan)
            _retie(model, tied)
            if self.sequence_parallel and self.plan is None:
                self._handles += _sequence_hooks(model, tp_mesh, self.block_paths)
        if mesh["data_parallel"].size() > 1:
            self.shard(model)
        return model

    def teardown(self) -> None:
        """Remove the sequence-parallel hooks, then the base's teardown (clipping, Lightning's)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        super().teardown()
