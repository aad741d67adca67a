"""Tensor parallelism (Megatron-LM) for our Transformers, on ``torch.distributed.tensor.parallel``.

:class:`TensorParallelStrategy` is Lightning's ``ModelParallelStrategy`` that writes the plan
itself: at setup it applies :func:`~lightning_efficient.strategies.megatron_plans.megatron_plan`
(the attention heads and FFN neurons of every block split over the ranks, read from the
architecture table; optionally the vocabulary and the sequence) with ``parallelize_module``. This
module holds the strategy and what it installs: gradient clipping over DTensor and plain
parameters (:func:`clip_grad_norm_`), the sequence-parallel hooks at the entry and exit of each
block stack, re-tying of tied weights, and the check that every technique in
``trainer.callbacks`` composes with tensor parallelism (:func:`check_strategy_support`).

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

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from lightning_efficient.blocks import block_hidden_states, find_block_stacks
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.strategies.megatron_plans import (
    STYLES,
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

    Examples:
        >>> from lightning_efficient import LayerDrop
        >>> check_strategy_support([LayerDrop(drop_rate=0.1)])
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: layer_drop (LayerDrop) is not supported under tensor parallelism (TensorParallelStrategy); techniques that compose with it: activation_checkpointing, lr_scaling, trust_ratio; remove it from trainer.callbacks or train with DDP
    """
    from lightning_efficient.technique import Technique

    allowed = frozenset(allowed)
    for callback in callbacks:
        if isinstance(callback, Technique) and callback.name not in allowed:
            raise ConfigurationError(
                f"{callback.name} ({type(callback).__name__}) is not supported under tensor parallelism "
                f"(TensorParallelStrategy); techniques that compose with it: {', '.join(sorted(allowed))}; "
                "remove it from trainer.callbacks or train with DDP"
            )


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


# -- gradient clipping over DTensor and plain parameters ------------------------------------------
@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a mix of DTensor and plain parameters.

    Each DTensor gradient contributes the norm of its *full* tensor (``.full_tensor()`` of its
    norm: a collective over its mesh), each plain gradient its own norm (under tensor parallelism
    plain parameters are replicated, their gradients equal on every rank). Every rank gets the
    same total norm and scales its shards by the same factor. Torch's own function fails on such
    a mix (it stacks DTensor and Tensor norms).

    Returns:
        The total norm of all gradients (a plain 0-d tensor), before clipping.

    Examples:
        >>> w = torch.nn.Parameter(torch.ones(4)); w.grad = torch.full((4,), 2.0)
        >>> round(clip_grad_norm_([w], max_norm=1.0).item(), 4), round(w.grad.norm().item(), 4)
        (4.0, 1.0)
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    norms = []
    for grad in grads:
        norm = torch.linalg.vector_norm(grad, norm_type, dtype=torch.float32)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        local.mul_(coefficient.to(local.dtype))
    return total


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


class TensorParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with the Megatron plan applied for you.

    At setup (after the LightningModule's ``configure_model`` and the techniques' surgery, before
    the optimizers are built) it applies :func:`megatron_plan` (or your ``plan``) with
    ``parallelize_module`` on the ``tensor_parallel`` dimension of Lightning's device mesh.
    ``data_parallel_size > 1`` (a 2D mesh) is refused for now (see :meth:`_sizes`). Gradient clipping (``Trainer(gradient_clip_val=...)``) uses
    :func:`clip_grad_norm_`; checkpoints are Lightning's distributed checkpoints (a folder, one
    shard per rank) that ``fit(ckpt_path=...)`` resumes. Our DataModules shard the training data
    over the data-parallel ranks only (every tensor-parallel rank sees the same batches); for your
    own loaders use :class:`~lightning_efficient.data.sampling.DataParallelSampler`.

    Everything is checked on every rank before the first collective: the world factors into
    ``dp x tp`` (at ``Trainer`` construction), the plan matches modules whose heads and widths
    ``tp`` divides, and every technique in ``trainer.callbacks`` is in :attr:`composes_with`.

    From YAML::

        trainer:
          devices: 2
          strategy:
            class_path: lightning_efficient.strategies.TensorParallelStrategy
            init_args: {tensor_parallel_size: 2}

    Args:
        tensor_parallel_size: Ranks each block is split over; ``"auto"``: all devices of a node.
        data_parallel_size: Data-parallel replicas; only 1 is supported yet (2D fails with a
            ConfigurationError at ``Trainer(...)``); ``"auto"``: the rest of the world.
        plan: Your own plan instead of the built-in one: ``{module path or glob: style}``, paths
            relative to the LightningModule, styles named in :data:`STYLES` or ``ParallelStyle``
            objects. Needed for blocks the architecture table does not describe, or with a fused
            in-projection (``nn.TransformerEncoderLayer``).
        block_paths: Attribute paths of the block lists, for models the locator does not know.
        vocab_parallel: Shard the word embedding(s) and output head over the vocabulary.
        sequence_parallel: Shard LayerNorm/dropout regions over the sequence (length divisible by
            ``tensor_parallel_size``).
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

    def __init__(
        self,
        tensor_parallel_size: int | Literal["auto"] = "auto",
        data_parallel_size: int | Literal["auto"] = "auto",
        plan: Mapping[str, str | ParallelStyle] | None = None,
        block_paths: Sequence[str] | None = None,
        vocab_parallel: bool = False,
        sequence_parallel: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        for name, value in (("tensor_parallel_size", tensor_parallel_size), ("data_parallel_size", data_parallel_size)):
            if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigurationError(f"{name}={value!r} must be a positive integer or 'auto'")
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
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.plan = dict(plan) if plan is not None else None
        self.block_paths = list(block_paths) if block_paths else None
        self.vocab_parallel = vocab_parallel
        self.sequence_parallel = sequence_parallel
        self._handles: list[Any] = []
        self._original_clip: Any = None
        self._names_before: dict[int, tuple[str, nn.Parameter]] = {}

    # -- checks before any collective ---------------------------------------------------------
    def _sizes(self) -> tuple[int, int]:
        world = self.num_nodes * self.num_processes
        dp, tp = parallel_sizes(world, self._data_parallel_size, self._tensor_parallel_size, self.num_nodes)
        if dp > 1:
            raise ConfigurationError(
                f"data_parallel_size={dp}: 2D (data x tensor) parallelism is not supported yet; DDP cannot wrap "
                "DTensor parameters, and FSDP2 (fully_shard) gathers parameters only when a sharded module's "
                "forward() runs, which our LightningModules bypass (training_step calls submodules directly); "
                f"use tensor_parallel_size={world} (data_parallel_size=1), or DDP without tensor parallelism"
            )
        return dp, tp

    def _configure_launcher(self) -> None:
        if self.parallel_devices:
            self._sizes()  # at Trainer(...): before any process is started
        super()._configure_launcher()

    def build_plan(self, model: nn.Module, tensor_parallel_size: int) -> dict[str, ParallelStyle]:
        """The plan the strategy applies to ``model``: ``plan`` if given, else :func:`megatron_plan`; checked."""
        if self.plan is not None:
            plan = resolve_plan(model, self.plan)
            check_plan(model, plan, tensor_parallel_size)
            return plan
        return megatron_plan(model, tensor_parallel_size, self.block_paths, self.vocab_parallel, self.sequence_parallel)

    def _check(self) -> tuple[int, int]:
        dp, tp = self._sizes()
        module = self.lightning_module
        if module is not None:
            trainer = getattr(module, "_trainer", None)
            if trainer is not None:
                check_strategy_support(trainer.callbacks, self.composes_with)
            if any(True for _ in module.parameters()) and not _has_dtensor(module):
                self.build_plan(module, tp)
        return dp, tp

    def setup_environment(self) -> None:
        """Check sizes, techniques and plan on every rank, then start the process group and mesh."""
        dp, tp = self._check()
        self._data_parallel_size, self._tensor_parallel_size = dp, tp
        if self.lightning_module is not None:  # before configure_model may replace parameters
            self._names_before = _parameter_names(self.lightning_module)
        super().setup_environment()

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer) -> None:
        """Parallelize the model (unless ``configure_model`` did), then Lightning's setup: optimizers etc.

        ``ModelParallelStrategy.setup`` requires a ``configure_model`` that parallelizes; here the
        strategy does it, so that method's body is repeated without that requirement.
        """
        from lightning.fabric.utilities.init import _materialize_distributed_module
        from lightning.fabric.utilities.optimizer import _optimizers_to_device
        from lightning.pytorch.trainer.states import TrainerFn

        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        self._names_before.update(_parameter_names(self.model))
        if not _has_dtensor(self.model):
            self.parallelize(self.model)
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            repoint_optimizers(self.optimizers, self.model, self._names_before)
        self._names_before = {}
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
        self._install_clipping()

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Apply the plan on the ``tensor_parallel`` dimension of the device mesh; re-tie tied weights."""
        mesh = self.device_mesh
        tp_mesh = mesh["tensor_parallel"]
        plan = self.build_plan(model, tp_mesh.size())  # pure: fails alike on every rank
        if self.plan is None:
            check_strategy_support(self.lightning_module.trainer.callbacks, self.composes_with)
        tied = _tied_groups(model)
        if tp_mesh.size() > 1:
            parallelize_module(model, tp_mesh, plan)
            _retie(model, tied)
            if self.sequence_parallel and self.plan is None:
                self._handles += _sequence_hooks(model, tp_mesh, self.block_paths)
        return model

    def _install_clipping(self) -> None:
        plugin = self.precision_plugin
        if self._original_clip is not None:
            return
        self._original_clip = plugin.clip_grad_by_norm

        def clip_grad_by_norm(optimizer: torch.optim.Optimizer, clip_val: float) -> None:
            clip_grad_norm_(plugin.main_params(optimizer), clip_val)

        plugin.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]

    def teardown(self) -> None:
        """Remove the clipping override and the sequence-parallel hooks, then Lightning's teardown."""
        if self._original_clip is not None:
            vars(self.precision_plugin).pop("clip_grad_by_norm", None)
            self._original_clip = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        super().teardown()


def _has_dtensor(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def _parameter_names(module: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    """``{id(parameter): (name, parameter)}``; holding the parameter keeps its id from being reused."""
    return {id(param): (name, param) for name, param in module.named_parameters(remove_duplicate=False)}


def repoint_optimizers(
    optimizers: Iterable[torch.optim.Optimizer], model: nn.Module, before: Mapping[int, tuple[str, nn.Parameter]]
) -> None:
    """Point optimizers built before the plan was applied at the parallelized parameters, by name.

    ``parallelize_module`` replaces each sharded parameter by a new DTensor parameter. An optimizer
    built earlier (LightningCLI builds an ``optimizer:`` from YAML from ``model.parameters()`` at
    startup) would step the replaced tensors and leave the model untrained, and the distributed
    checkpoint, which names optimizer state by the model's parameters, fails on them (a KeyError).

    Args:
        optimizers: The trainer's optimizers.
        model: The parallelized LightningModule.
        before: :func:`_parameter_names` of ``model`` taken before it was parallelized.

    Raises:
        ConfigurationError: An optimizer holds a tensor that is not (and was not) a parameter of
            ``model``, or already has state for a replaced parameter.

    Examples:
        >>> model = nn.Linear(2, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> before = _parameter_names(model)
        >>> model.weight = nn.Parameter(model.weight.detach().clone())  # what parallelize_module does
        >>> repoint_optimizers([optimizer], model, before)
        >>> optimizer.param_groups[0]["params"][0] is model.weight
        True
    """
    current = dict(model.named_parameters(remove_duplicate=False))
    live = {id(param) for param in current.values()}
    for optimizer in optimizers:
        for index, group in enumerate(optimizer.param_groups):
            for position, param in enumerate(group["params"]):
                if id(param) in live:
                    continue
                name, _ = before.get(id(param), (None, None))
                if name is None or name not in current:
                    raise ConfigurationError(
                        f"{type(optimizer).__name__} param_groups[{index}] holds a tensor of shape {tuple(param.shape)} "
                        f"that is not a parameter of {type(model).__name__}; under tensor parallelism the optimizer "
                        "must step the model's own parameters (build it from self.parameters() in configure_optimizers)"
                    )
                if optimizer.state.get(param):
                    raise ConfigurationError(
                        f"{type(optimizer).__name__} already has state for {name}, which tensor parallelism "
                        "sharded; build the optimizer in configure_optimizers, not before fit"
                    )
                group["params"][position] = current[name]
