"""Sharded data parallelism (FSDP2) for our Transformers, on Lightning's ``ModelParallelStrategy``.

:class:`FullyShardedStrategy` applies ``torch.distributed.fsdp.fully_shard`` for you at setup
(:func:`shard_data_parallel`): one FSDP unit per Transformer block (from the block locator), then
the whole LightningModule as the root unit, which holds the rest (embeddings, heads, and so both
ends of a tied embedding). Each rank keeps ``1/data_parallel_size`` of every parameter, gradient
and optimizer moment; a unit's parameters are gathered only while it runs.

FSDP2 gathers a unit's parameters in that unit's ``forward``. Our LightningModules call
submodules directly (``model.bert(...)`` then ``model.cls(...)`` on the masked positions), which
would see sharded parameters; so the strategy runs every ``training_step`` / ``validation_step``
/ ``test_step`` / ``predict_step`` *through* the root's forward (Lightning's forward redirection,
as its own FSDP and DeepSpeed strategies do): the root's parameters are gathered for the whole
step, each block's for its own forward and backward.

This module also holds what :class:`~lightning_efficient.strategies.TensorParallelStrategy` (a
subclass, which adds the Megatron plan on a tensor dimension and so gives 2D parallelism) shares:
gradient clipping over DTensor and plain parameters (:func:`clip_grad_norm_`), optimizers built
before the model was sharded pointed at the sharded parameters (:func:`repoint_optimizers`), and
the check that every technique in ``trainer.callbacks`` composes with the strategy
(:func:`check_supported_techniques`).

Examples:
    >>> from lightning_efficient import ActivationCheckpointing, LayerDrop
    >>> check_supported_techniques([ActivationCheckpointing(), LayerDrop(drop_rate=0.1)], FULLY_SHARDED_COMPOSES_WITH,
    ...                            "FSDP2 (FullyShardedStrategy)")  # declared to compose: no error
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lightning_efficient.blocks import find_block_stacks
from lightning_efficient.errors import ConfigurationError, NoTargetModulesError
from lightning_efficient.strategies.megatron_plans import check_parallel_size

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "FULLY_SHARDED_COMPOSES_WITH",
    "FullyShardedStrategy",
    "check_supported_techniques",
    "clip_grad_norm_",
    "mixed_precision_policy",
    "repoint_optimizers",
    "shard_data_parallel",
]

#: Names of the techniques (``Technique.name``) verified under FSDP2 (:class:`FullyShardedStrategy`,
#: and the data dimension of a 2D :class:`~lightning_efficient.strategies.TensorParallelStrategy`):
#: they act through block forwards, inputs, a frozen teacher outside the sharded model, the optimizer
#: or the LR schedule; each trains as under DDP and resumes exactly from a sharded checkpoint. Any
#: other technique in ``trainer.callbacks`` makes the strategy fail at setup: ``residual_init``
#: (ReZero's and SkipInit's gains are 0-d parameters, which FSDP2 cannot shard), ``progressive_stacking``
#: and ``autoprog`` (blocks waiting to grow have no optimizer state, so a sharded checkpoint written
#: before a growth does not load), pruning, QAT, RigL/SET, SNIP and importance sampling (masks,
#: fake-quant scales or a scoring pass meet the sharded parameters outside the root's forward),
#: ``lottery_ticket`` (its rewind weights would be one rank's shards) and ``parameter_efficient``
#: (adapter-only checkpoints are not verified as sharded checkpoints).
FULLY_SHARDED_COMPOSES_WITH: frozenset[str] = frozenset(
    {
        "activation_checkpointing",
        "block_noise",
        "distillation",
        "layer_drop",
        "lr_scaling",
        "progressive_resizing",
        "token_dropping",
        "trust_ratio",
    }
)

#: Trainer precisions that FSDP2 runs as mixed precision: the dtype of the gathered parameters.
MIXED_PRECISION_DTYPES: dict[str, torch.dtype] = {"bf16-mixed": torch.bfloat16}


def check_supported_techniques(callbacks: Iterable[Any], allowed: Iterable[str], strategy: str) -> None:
    """Fail if a technique in ``callbacks`` is not declared to compose with ``strategy``.

    Args:
        callbacks: ``trainer.callbacks``; only techniques are checked.
        allowed: ``Technique.name`` of the techniques that compose with it.
        strategy: The strategy as the message names it, e.g. ``"FSDP2 (FullyShardedStrategy)"``.

    Examples:
        >>> from lightning_efficient import MagnitudePruning
        >>> check_supported_techniques([MagnitudePruning(final_sparsity=0.5)], {"layer_drop"}, "FSDP2 (FullyShardedStrategy)")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: pruning (MagnitudePruning) is not supported under FSDP2 (FullyShardedStrategy); techniques that compose with it: layer_drop; remove it from trainer.callbacks or train with DDP
    """
    from lightning_efficient.technique import Technique

    allowed = frozenset(allowed)
    for callback in callbacks:
        if isinstance(callback, Technique) and callback.name not in allowed:
            raise ConfigurationError(
                f"{callback.name} ({type(callback).__name__}) is not supported under {strategy}; techniques that "
                f"compose with it: {', '.join(sorted(allowed))}; remove it from trainer.callbacks or train with DDP"
            )


# -- gradient clipping over DTensor and plain parameters ------------------------------------------
@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a mix of DTensor and plain parameters.

    Each DTensor gradient contributes the norm of its *full* tensor (``.full_tensor()`` of its
    norm: a collective over its mesh, whether it is sharded over the data dimension, the tensor
    dimension or both), each plain gradient its own norm (plain parameters are replicated, their
    gradients equal on every rank). Every rank gets the same total norm and scales its shards by
    the same factor. Torch's own function fails on such a mix (it stacks DTensor and Tensor norms).

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


# -- sharding -------------------------------------------------------------------------------------
def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for a Trainer ``precision``: ``bf16-mixed`` gathers bf16 parameters, reduces in fp32.

    The sharded parameters (and the optimizer's moments) stay fp32; each unit casts its gathered
    parameters to bf16 for compute, and gradients are reduce-scattered in fp32.

    Examples:
        >>> mixed_precision_policy("bf16-mixed").param_dtype, mixed_precision_policy("32-true").param_dtype
        (torch.bfloat16, None)
    """
    dtype = MIXED_PRECISION_DTYPES.get(str(precision))
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard_data_parallel(
    module: nn.Module,
    mesh: DeviceMesh,
    block_paths: Sequence[str] | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
    offload_policy: OffloadPolicy | None = None,
    reshard_after_forward: bool = True,
) -> list[str]:
    """``fully_shard`` each Transformer block of ``module``, then ``module`` itself, over ``mesh``.

    Bottom-up, as FSDP2 requires: every block is one unit (gathered in its forward, freed after
    it unless ``reshard_after_forward=False``), and ``module`` is the root unit holding every
    parameter outside the blocks. A module without a block stack the locator knows becomes a
    single unit. Parameters already sharded over a tensor-parallel mesh become 2D DTensors.

    Returns:
        The paths of the block units (empty when ``module`` is one unit).

    Examples:
        >>> import torch.distributed as dist
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> from lightning_efficient import ViTClassifier
        >>> if not dist.is_initialized():
        ...     dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
        >>> model = ViTClassifier(num_labels=3, preset="tiny")
        >>> shard_data_parallel(model, init_device_mesh("cpu", (1,)))
        ['model.vit.layers.0', 'model.vit.layers.1', 'model.vit.layers.2']
        >>> dist.destroy_process_group()
    """
    options: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
        "offload_policy": offload_policy or OffloadPolicy(),
    }
    try:
        stacks = find_block_stacks(module, block_paths)
    except NoTargetModulesError:
        if block_paths:
            raise
        stacks = []
    units = []
    for stack in stacks:
        for index, block in enumerate(stack.blocks):
            fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
            units.append(f"{stack.path}.{index}")
    fully_shard(module, **options)
    return units


# -- optimizers built before sharding ---------------------------------------------------------------
def _parameter_names(module: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    """``{id(parameter): (name, parameter)}``; holding the parameter keeps its id from being reused."""
    return {id(param): (name, param) for name, param in module.named_parameters(remove_duplicate=False)}


def _has_dtensor(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def repoint_optimizers(
    optimizers: Iterable[torch.optim.Optimizer], model: nn.Module, before: Mapping[int, tuple[str, nn.Parameter]]
) -> None:
    """Point optimizers built before the model was sharded at the sharded parameters, by name.

    ``parallelize_module`` and ``fully_shard`` replace each parameter by a new DTensor parameter.
    An optimizer built earlier (LightningCLI builds an ``optimizer:`` from YAML from
    ``model.parameters()`` at startup) would step the replaced tensors and leave the model
    untrained, and the distributed checkpoint, which names optimizer state by the model's
    parameters, fails on them (a KeyError).

    Args:
        optimizers: The trainer's optimizers.
        model: The sharded LightningModule.
        before: :func:`_parameter_names` of ``model`` taken before it was sharded.

    Raises:
        ConfigurationError: An optimizer holds a tensor that is not (and was not) a parameter of
            ``model``, or already has state for a replaced parameter.

    Examples:
        >>> model = nn.Linear(2, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> before = _parameter_names(model)
        >>> model.weight = nn.Parameter(model.weight.detach().clone())  # what sharding does
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
                        f"that is not a parameter of {type(model).__name__}; under a sharded strategy the optimizer "
                        "must step the model's own parameters (build it from self.parameters() in configure_optimizers)"
                    )
                if optimizer.state.get(param):
                    raise ConfigurationError(
                        f"{type(optimizer).__name__} already has state for {name}, which the strategy sharded; "
                        "build the optimizer in configure_optimizers, not before fit"
                    )
                group["params"][position] = current[name]


class FullyShardedStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with FSDP2 applied for you: sharded data parallelism.

    At setup (after the LightningModule's ``configure_model`` and the techniques' surgery, before
    the optimizers are built) it applies :func:`shard_data_parallel` on the ``data_parallel``
    dimension of Lightning's device mesh, and runs every step through the root unit's forward.
    Gradients are averaged over the ranks (checked against one process in the tests, for the
    pitfall of pytorch#162338). ``Trainer(precision="bf16-mixed")`` becomes FSDP2's mixed
    precision policy (bf16 compute, fp32 shards and gradient reduction); gradient clipping
    (``gradient_clip_val``) uses :func:`clip_grad_norm_`; checkpoints are Lightning's distributed
    checkpoints (a folder, one shard per rank) that ``fit(ckpt_path=...)`` and our CLI resume.

    From YAML (``configs/strategies/fsdp.yaml``)::

        trainer:
          devices: 2
          strategy:
            class_path: lightning_efficient.strategies.FullyShardedStrategy

    Args:
        data_parallel_size: Ranks the model is sharded over; ``"auto"``: every process.
        block_paths: Attribute paths of the block lists, for models the locator does not know.
        offload: Keep the sharded parameters, gradients and optimizer state in CPU memory
            (FSDP2's ``CPUOffloadPolicy``; the optimizer steps on the CPU). GPU runs only: on a
            CPU run it turns itself off with one info line.
        reshard_after_forward: Free each block's gathered parameters after its forward (and
            gather them again for backward): less memory, one more all-gather per block.
        save_distributed_checkpoint: One shard per rank (a folder); False: one full file from rank 0.
        process_group_backend: ``"gloo"`` on CPU, ``"nccl"`` on GPUs (default: by device).
        timeout: Timeout of collectives.

    Raises:
        ConfigurationError: A bad size, or a technique in ``trainer.callbacks`` that is not in
            :attr:`composes_with` (at setup, on every rank, before any collective).

    Examples:
        >>> FullyShardedStrategy(data_parallel_size=0)
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: data_parallel_size=0 must be a positive integer or 'auto'
        >>> pl.Trainer(accelerator="cpu", devices=3, strategy=FullyShardedStrategy(data_parallel_size=2))
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: data_parallel_size=2 is not the world size 3 (devices x nodes); FullyShardedStrategy shards over every process: set data_parallel_size='auto' or 3, or use TensorParallelStrategy for data x tensor parallelism
    """

    #: Techniques (by ``Technique.name``) that compose with this strategy; others fail at setup.
    composes_with: ClassVar[frozenset[str]] = FULLY_SHARDED_COMPOSES_WITH
    #: How error messages name the strategy.
    description: ClassVar[str] = "FSDP2 (FullyShardedStrategy)"

    def __init__(
        self,
        data_parallel_size: int | Literal["auto"] = "auto",
        block_paths: Sequence[str] | None = None,
        offload: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        check_parallel_size("data_parallel_size", data_parallel_size)
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.block_paths = list(block_paths) if block_paths else None
        self.offload = bool(offload)
        self.reshard_after_forward = bool(reshard_after_forward)
        self._original_clip: Any = None
        self._names_before: dict[int, tuple[str, nn.Parameter]] = {}

    # -- checks before any collective ---------------------------------------------------------
    def _sizes(self) -> tuple[int, int]:
        """``(data_parallel_size, tensor_parallel_size)`` for this world; fails on sizes that do not fit it."""
        world = self.num_nodes * self.num_processes
        dp = self._data_parallel_size
        if dp not in ("auto", world):
            raise ConfigurationError(
                f"data_parallel_size={dp} is not the world size {world} (devices x nodes); FullyShardedStrategy "
                f"shards over every process: set data_parallel_size='auto' or {world}, or use TensorParallelStrategy "
                "for data x tensor parallelism"
            )
        return world, 1

    def _configure_launcher(self) -> None:
        if self.parallel_devices:
            self._sizes()  # at Trainer(...): before any process is started
        super()._configure_launcher()

    def _check(self) -> tuple[int, int]:
        dp, tp = self._sizes()
        module = self.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if trainer is not None:
            self._check_support(trainer.callbacks, dp)
        return dp, tp

    def _check_support(self, callbacks: Any, data_parallel_size: int) -> None:
        """Fail on a technique in ``callbacks`` that is not in :attr:`composes_with`."""
        check_supported_techniques(callbacks, self.composes_with, self.description)

    def setup_environment(self) -> None:
        """Check sizes and techniques on every rank, then start the process group and mesh."""
        dp, tp = self._check()
        self._data_parallel_size, self._tensor_parallel_size = dp, tp
        if self.lightning_module is not None:  # before configure_model may replace parameters
            self._names_before = _parameter_names(self.lightning_module)
        super().setup_environment()

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer) -> None:
        """Shard the model (unless ``configure_model`` did), then Lightning's setup: optimizers etc.

        ``ModelParallelStrategy.setup`` requires a ``configure_model`` that parallelizes; here the
        strategy does it, so that method's body is repeated without that requirement, and the
        optimizers built before are pointed at the sharded parameters (:func:`repoint_optimizers`).
        """
        from lightning.fabric.utilities.init import _materialize_distributed_module
        from lightning.fabric.utilities.optimizer import _optimizers_to_device
        from lightning.pytorch.trainer.states import TrainerFn

        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        self._names_before.update(_parameter_names(self.model))
        if not _has_dtensor(self.model) and not isinstance(self.model, FSDPModule):
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
        """Apply FSDP2 (:func:`shard_data_parallel`) on the ``data_parallel`` dimension of the device mesh."""
        self._check_support(self.lightning_module.trainer.callbacks, self.device_mesh["data_parallel"].size())
        self.shard(model)
        return model

    def shard(self, model: nn.Module) -> None:
        """FSDP2 over the data dimension, with the precision and offload policies of this run."""
        shard_data_parallel(
            model,
            self.device_mesh["data_parallel"],
            self.block_paths,
            mp_policy=mixed_precision_policy(self.precision_plugin.precision),
            offload_policy=self._offload_policy(),
            reshard_after_forward=self.reshard_after_forward,
        )

    def _offload_policy(self) -> OffloadPolicy:
        if not self.offload:
            return OffloadPolicy()
        if self.root_device.type == "cpu":
            rank_zero_info(
                f"{type(self).__name__}(offload=True): this run is on the CPU, so there is nothing to offload to; "
                "offload is off (it keeps parameters, gradients and optimizer state off the GPU)"
            )
            return OffloadPolicy()
        return CPUOffloadPolicy()

    def _install_clipping(self) -> None:
        plugin = self.precision_plugin
        if self._original_clip is not None:
            return
        self._original_clip = plugin.clip_grad_by_norm

        def clip_grad_by_norm(optimizer: torch.optim.Optimizer, clip_val: float) -> None:
            clip_grad_norm_(plugin.main_params(optimizer), clip_val)

        plugin.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]

    # -- steps through the root unit's forward --------------------------------------------------
    def _through_root(self, method: str, context: Any, *args: Any, **kwargs: Any) -> Any:
        module = self.lightning_module
        with context:
            if isinstance(module, FSDPModule):  # FSDP2 gathers the root's parameters in its forward
                return self._forward_redirection(module, module, method, *args, **kwargs)
            return getattr(module, method)(*args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._through_root("training_step", self.precision_plugin.train_step_context(), *args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._through_root("validation_step", self.precision_plugin.val_step_context(), *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._through_root("test_step", self.precision_plugin.test_step_context(), *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._through_root("predict_step", self.precision_plugin.predict_step_context(), *args, **kwargs)

    def teardown(self) -> None:
        """Remove the clipping override, then Lightning's teardown."""
        if self._original_clip is not None:
            vars(self.precision_plugin).pop("clip_grad_by_norm", None)
            self._original_clip = None
        super().teardown()
