"""The contract every technique callback of the package follows.

A technique is a Lightning ``Callback`` that changes *how* a model trains (which blocks run,
which weights are masked, which examples are drawn) without changing the user's LightningModule.
:class:`Technique` is its base class. It fixes, once for every technique:

- **Arguments** are validated in ``__init__``; a bad value raises :class:`ConfigurationError`
  naming the value and the allowed set, before any training starts (see :func:`check_choice`,
  :func:`check_range`).
- **Model surgery** (hooks on blocks, masks, wrappers) happens in :meth:`apply`, which the base
  calls from ``setup``: the first hook of a run, before Lightning loads a checkpoint's weights. So a
  fresh run and a resumed run see the same structure when the weights arrive. :meth:`remove`
  undoes it (the base calls it at ``teardown`` unless :attr:`Technique.keep_after_fit`).
- **State** (``state_dict`` / ``load_state_dict``) holds only tensors and plain Python values, so
  a checkpoint loads with ``torch.load(weights_only=True)``; the base checks this each time a
  checkpoint is written (:func:`check_plain_state`).
- **Metrics** are logged as ``<name>/<metric>`` (:meth:`Technique.log_metrics`).
- **Composition** is declared: the Lightning hooks the technique implements
  (:attr:`Technique.hooks`, verified when the class is defined), the techniques it must come
  before in ``trainer.callbacks`` (:attr:`Technique.runs_before`; :func:`sort_techniques` orders a list by them) and those it cannot run with
  (:attr:`Technique.conflicts_with`). ``setup`` checks every technique in the trainer against
  these, and refuses distributed runs for techniques not marked :attr:`Technique.distributed_safe`.
- **Compilation** is declared too: :attr:`Technique.compile_safe` says whether a model compiled with
  ``torch.compile`` trains with the technique as it does uncompiled (:attr:`Technique.compile_note`:
  how, or why not); our modules with ``compile`` on refuse the others at setup (:func:`check_compile_support`).

Examples:
    >>> import torch
    >>> class Scale(Technique):
    ...     '''Multiply every block's output by ``factor`` during training (a toy).'''
    ...     name = "scale"
    ...     def __init__(self, factor: float = 1.0) -> None:
    ...         super().__init__()
    ...         self.factor = check_range("factor", factor, low=0.0, low_inclusive=False)
    ...     def apply(self, pl_module):
    ...         return [b.register_forward_hook(lambda m, i, o: o * self.factor) for b in pl_module]
    >>> Scale(factor=0)
    Traceback (most recent call last):
    ...
    lightning_efficient.errors.ConfigurationError: factor=0 must be > 0.0
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> technique = Scale(factor=2.0)
    >>> technique.attach(model)
    >>> technique.is_applied
    True
    >>> technique.detach(model)
    >>> technique.is_applied
    False
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_efficient.errors import ConfigurationError, check_choice, check_range

__all__ = [
    "Technique",
    "check_choice",
    "check_compile_support",
    "check_composition",
    "check_plain_state",
    "check_range",
    "check_schedule_reached",
    "check_unused_parameters_allowed",
    "sort_techniques",
    "technique_order",
]

#: Hooks of ``Callback`` that a technique may implement (for the declaration check).
CALLBACK_HOOKS: frozenset[str] = frozenset(
    name for name in vars(Callback) if name.startswith("on_") or name in ("setup", "teardown")
)

#: Types a technique's state may hold besides tensors, at any depth (``weights_only`` loadable).
PLAIN_TYPES = (bool, int, float, str, type(None))


def check_plain_state(state: Any, owner: str, where: str = "state") -> None:
    """Fail unless ``state`` holds only tensors and plain values (``weights_only`` loadable).

    Allowed: tensors, ``bool``/``int``/``float``/``str``/``None``, and lists, tuples and dicts
    with string or integer keys of those.

    Examples:
        >>> check_plain_state({"step": 3, "rng": torch.zeros(2)}, "demo")
        >>> check_plain_state({"when": object()}, "demo")
        Traceback (most recent call last):
        ...
        TypeError: demo: state['when'] is a object; a technique's state may hold only tensors, numbers, strings, None, and lists/tuples/dicts of them
    """
    if isinstance(state, (torch.Tensor, *PLAIN_TYPES)):
        return
    if isinstance(state, (list, tuple)):
        for i, item in enumerate(state):
            check_plain_state(item, owner, f"{where}[{i}]")
        return
    if isinstance(state, dict):
        for key, item in state.items():
            if not isinstance(key, (str, int)):
                raise TypeError(
                    f"{owner}: {where} has a key {key!r} of type {type(key).__name__}; keys must be str or int"
                )
            check_plain_state(item, owner, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{owner}: {where} is a {type(state).__name__}; a technique's state may hold only tensors, "
        "numbers, strings, None, and lists/tuples/dicts of them"
    )


def technique_order(techniques: Sequence[Any], sources: Sequence[str] | None = None) -> list[int]:
    """The order in which ``techniques`` must run: their indices, sorted by their declarations.

    A technique comes after every technique that declares it in :attr:`Technique.runs_before`;
    otherwise the given order is kept (a stable topological sort: of the techniques free to go next,
    the one listed first goes). Works on technique classes or instances (any object with ``name``,
    ``runs_before`` and ``conflicts_with``).

    Args:
        techniques: Technique classes or instances, in the order given.
        sources: Where each was given (a config file), for the messages; None: not named.

    Raises:
        ConfigurationError: Two of them conflict (:attr:`Technique.conflicts_with`, declared by either),
            or their declarations form a cycle; the message names both (and their sources).

    Examples:
        >>> class Prune(Technique):
        ...     name = "prune"
        ...     runs_before = ("quantize",)
        >>> class Quantize(Technique):
        ...     name = "quantize"
        >>> technique_order([Quantize, Prune])
        [1, 0]
    """

    def called(index: int) -> str:
        where = f" from {sources[index]}" if sources is not None and sources[index] else ""
        kind = techniques[index] if isinstance(techniques[index], type) else type(techniques[index])
        return f"{techniques[index].name} ({kind.__name__}{where})"

    for i, first in enumerate(techniques):
        for j in range(i + 1, len(techniques)):
            second = techniques[j]
            if second.name in first.conflicts_with or first.name in second.conflicts_with:
                raise ConfigurationError(f"{called(i)} cannot run with {called(j)}; remove one of the two")
    after = {  # index -> the indices that must run before it
        j: {i for i, other in enumerate(techniques) if technique.name in other.runs_before and i != j}
        for j, technique in enumerate(techniques)
    }
    order: list[int] = []
    while len(order) < len(techniques):
        ready = [j for j in range(len(techniques)) if j not in order and after[j] <= set(order)]
        if not ready:
            waiting = [j for j in range(len(techniques)) if j not in order]
            j = waiting[0]
            i = next(i for i in after[j] if i in waiting)
            i, j = min(i, j), max(i, j)
            raise ConfigurationError(
                f"{called(i)} and {called(j)} each declare that they must run before the other (a cycle "
                "in runs_before); remove one of them"
            )
        order.append(ready[0])
    return order


def sort_techniques(callbacks: Sequence[Callback]) -> list[Callback]:
    """``callbacks`` with the techniques among them in the order they must run (:func:`technique_order`).

    Only the techniques move, among the places techniques hold; every other callback keeps its place.
    ``lightning-efficient`` sorts a config's callbacks this way; in Python, pass the sorted list to
    the ``Trainer`` (Lightning runs callbacks in list order, and a technique's ``setup`` refuses a
    wrong order).

    Raises:
        ConfigurationError: See :func:`technique_order`.

    Examples:
        >>> class Prune(Technique):
        ...     name = "prune"
        ...     runs_before = ("quantize",)
        >>> class Quantize(Technique):
        ...     name = "quantize"
        >>> [type(c).__name__ for c in sort_techniques([Quantize(), Callback(), Prune()])]
        ['Prune', 'Callback', 'Quantize']
    """
    places = [i for i, callback in enumerate(callbacks) if isinstance(callback, Technique)]
    techniques = [callbacks[i] for i in places]
    result = list(callbacks)
    for place, index in zip(places, technique_order(techniques)):
        result[place] = techniques[index]
    return result


def check_composition(callbacks: Sequence[Callback], world_size: int = 1) -> None:
    """Check the techniques among ``callbacks`` against each other's declarations.

    Raises:
        ConfigurationError: Two techniques conflict, two instances of one technique are given,
            a technique comes after one it must run before, or a technique that is not
            distributed-safe runs with ``world_size > 1``. The message names both techniques
            and the fix.

    Examples:
        >>> class A(Technique):
        ...     name = "a"
        >>> class B(Technique):
        ...     name = "b"
        ...     runs_before = ("a",)
        >>> check_composition([A(), B()])
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: b must run before a: put B before A in trainer.callbacks (sort_techniques(callbacks) does; lightning-efficient sorts a config's)
    """
    techniques = [cb for cb in callbacks if isinstance(cb, Technique)]
    position = {}
    for index, technique in enumerate(techniques):
        if technique.name in position:
            raise ConfigurationError(
                f"{technique.name} is given twice in trainer.callbacks; pass one {type(technique).__name__}"
            )
        position[technique.name] = index
        if world_size > 1 and not technique.distributed_safe:
            raise ConfigurationError(
                f"{technique.name} is not verified for distributed training (world_size={world_size}); "
                "run it on one device, or remove it"
            )
    for technique in techniques:
        for other in techniques:
            if other is technique:
                continue
            if other.name in technique.conflicts_with:
                raise ConfigurationError(
                    f"{technique.name} cannot run with {other.name}; remove {type(technique).__name__} "
                    f"or {type(other).__name__} from trainer.callbacks"
                )
            if other.name in technique.runs_before and position[other.name] < position[technique.name]:
                raise ConfigurationError(
                    f"{technique.name} must run before {other.name}: put {type(technique).__name__} before "
                    f"{type(other).__name__} in trainer.callbacks (sort_techniques(callbacks) does; "
                    "lightning-efficient sorts a config's)"
                )


def check_compile_support(callbacks: Sequence[Callback]) -> None:
    """Refuse, before training, the techniques among ``callbacks`` that cannot run under ``torch.compile``.

    Our LightningModules call it from ``setup`` when their ``compile`` argument is on.

    Raises:
        ConfigurationError: A technique is not :attr:`Technique.compile_safe`; the message names it
            and its :attr:`Technique.compile_note` (the reason).

    Examples:
        >>> class Shuffle(Technique):
        ...     name = "shuffle"
        ...     compile_note = "it adds hooks after the first step"
        >>> class Noise(Technique):
        ...     name = "noise"
        ...     compile_safe = True
        >>> check_compile_support([Noise()])
        >>> check_compile_support([Noise(), Shuffle()])
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: shuffle (Shuffle) cannot run under compile: it adds hooks after the first step; set the model's compile: false or remove it
    """
    for technique in callbacks:
        if isinstance(technique, Technique) and not technique.compile_safe:
            reason = technique.compile_note or "it is not verified to train compiled as it does uncompiled"
            raise ConfigurationError(
                f"{technique.name} ({type(technique).__name__}) cannot run under compile: {reason}; "
                "set the model's compile: false or remove it"
            )


def check_schedule_reached(
    trainer: pl.Trainer, name: str, step: int | None, strict: bool, relaxed_by: str | None = "strict_schedule"
) -> None:
    """Fail or warn, before training, when the run ends before optimizer step ``step`` of a technique's schedule.

    Args:
        trainer: The trainer about to fit; ``trainer.estimated_stepping_batches`` is the run's optimizer
            steps (infinite: the run is unbounded, every step is reached).
        name: The argument that set ``step`` (``"end_step"``, ``"freeze_step"``, ...), for the message.
        step: The step the schedule needs; None (not set) and 0 (where every run starts) are always reached.
        strict: Raise instead of warning (the technique's ``strict_schedule``; a run that stops early on
            purpose, to continue in a later fit, sets it False).
        relaxed_by: The technique's argument that turns the error into a warning, named in the error;
            None for a step that every run must reach.

    Raises:
        ConfigurationError: ``strict`` and the run has no optimizer step ``step``.

    Examples:
        >>> from types import SimpleNamespace
        >>> trainer = SimpleNamespace(estimated_stepping_batches=4)
        >>> check_schedule_reached(trainer, "end_step", 3, strict=True)
        >>> check_schedule_reached(trainer, "end_step", 4, strict=True)
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: end_step=4 is never reached: the run has 4 optimizer steps (steps 0-3); lower end_step or raise max_steps (or strict_schedule=False to reach it in a later fit)
    """
    total = trainer.estimated_stepping_batches
    if not step or not math.isfinite(total) or step < total:
        return
    total = int(total)
    message = (
        f"{name}={step} is never reached: the run has {total} optimizer steps (steps 0-{total - 1}); "
        f"lower {name} or raise max_steps"
    )
    if strict:
        later = f" (or {relaxed_by}=False to reach it in a later fit)" if relaxed_by else ""
        raise ConfigurationError(message + later)
    warnings.warn(message, UserWarning, stacklevel=3)


def check_unused_parameters_allowed(trainer: pl.Trainer, name: str) -> None:
    """Fail if DDP would be set up to expect a gradient for every parameter on every step.

    Techniques that skip blocks (LayerDrop, ProgressiveStacking) leave those blocks' parameters
    without a gradient on some steps; DDP then stops with "Expected to have finished reduction"
    unless it looks for unused parameters.

    Raises:
        ConfigurationError: ``trainer.strategy`` is DDP without ``find_unused_parameters=True``;
            the message names the strategy string that fixes it.
    """
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
        raise ConfigurationError(
            f"{name} skips blocks, so their parameters get no gradient on some steps, and DDP with "
            "find_unused_parameters=False stops on that; use trainer.strategy='ddp_find_unused_parameters_true' "
            "(or DDPStrategy(find_unused_parameters=True))"
        )


class Technique(Callback):
    """Base class of every technique callback (see the module docstring for the contract).

    Subclasses set :attr:`name`, validate arguments in ``__init__`` (calling
    ``super().__init__()``), and implement :meth:`apply` (return a handle or a list of
    handles with ``.remove()`` for automatic undo, or implement :meth:`remove` themselves).

    Attributes:
        name: Short snake_case name: the prefix of the technique's metrics and the word used in
            composition rules and error messages.
        hooks: The ``Callback`` hooks the subclass implements, including any of the base's
            ``setup``, ``teardown`` and ``on_save_checkpoint`` it overrides (an override must call
            ``super()``); see :meth:`used_hooks`. Checked when the class is defined: an undeclared
            or missing hook raises ``TypeError``.
        runs_before: Names of techniques that must come *after* this one in ``trainer.callbacks``.
        conflicts_with: Names of techniques this one cannot run with.
        distributed_safe: Whether the technique is verified under DDP (every rank makes the same
            decisions). The contract suite runs such techniques on 2 processes.
        keep_after_fit: Keep the surgery after ``fit`` (e.g. pruning masks, which are the
            product) instead of undoing it at ``teardown``.
        masks_weights: Whether it adds the pruning package's mask buffers (``weight_mask``), so
            its checkpoints load only into a run that has it (or after ``export_pruned``).
        compile_safe: Whether a model compiled with ``torch.compile`` (our modules' ``compile``
            argument) trains with the technique as it does uncompiled, across its schedule changes
            (measured by ``tests/test_compile.py``). Our modules refuse the others at setup
            (:func:`check_compile_support`).
        compile_note: For a compile-safe technique, how it works under compile when that is not
            plain tracing (e.g. "recompiles once when fake quantization switches on"); for one
            that is not, the reason, which the refusal names.
    """

    name: ClassVar[str] = "technique"
    hooks: ClassVar[tuple[str, ...]] = ()
    runs_before: ClassVar[tuple[str, ...]] = ()
    conflicts_with: ClassVar[tuple[str, ...]] = ()
    distributed_safe: ClassVar[bool] = False
    keep_after_fit: ClassVar[bool] = False
    masks_weights: ClassVar[bool] = False
    compile_safe: ClassVar[bool] = False
    compile_note: ClassVar[str] = ""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._applied_to: nn.Module | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        base_hooks = {name for name in CALLBACK_HOOKS if name in vars(Technique)}
        implemented = {  # hooks the subclass (or a parent below Technique) overrides
            name
            for name in CALLBACK_HOOKS
            if getattr(cls, name) is not getattr(Callback, name)
            and getattr(cls, name) is not getattr(Technique, name, None)
        }
        declared = set(cls.hooks)
        unknown = declared - CALLBACK_HOOKS
        if unknown:
            raise TypeError(f"{cls.__name__}.hooks names {sorted(unknown)}, which are not Lightning Callback hooks")
        missing, extra = implemented - declared, declared - implemented - base_hooks
        if missing or extra:
            raise TypeError(
                f"{cls.__name__}.hooks must list exactly the Callback hooks it implements: "
                f"undeclared {sorted(missing)}, declared but not implemented {sorted(extra)}"
            )

    @classmethod
    def used_hooks(cls) -> tuple[str, ...]:
        """Every ``Callback`` hook the technique runs in: the base's plus :attr:`hooks`."""
        return tuple(sorted({name for name in CALLBACK_HOOKS if name in vars(Technique)} | set(cls.hooks)))

    @property
    def state_key(self) -> str:
        return f"lightning_efficient.{self.name}"

    # -- surgery --------------------------------------------------------------------------------
    @property
    def is_applied(self) -> bool:
        """Whether :meth:`apply` has run on a model and not been undone."""
        return self._applied_to is not None

    def apply(self, pl_module: nn.Module) -> Any:
        """Change the model (add hooks, masks, wrappers). Called once per model, before weights load.

        Returns:
            Nothing, or a handle / list of handles whose ``remove()`` undoes the change; the base
            keeps them and :meth:`remove` calls them in reverse order.
        """
        return None

    def remove(self, pl_module: nn.Module) -> None:
        """Undo :meth:`apply`. The default removes the handles ``apply`` returned."""
        for handle in reversed(self._handles):
            handle.remove()
        self._handles = []

    def attach(self, pl_module: nn.Module) -> None:
        """Apply the surgery to ``pl_module`` unless it is already applied to it (idempotent).

        Raises:
            ConfigurationError: The technique is already applied to a different model.
        """
        if self._applied_to is pl_module:
            return
        if self._applied_to is not None:
            raise ConfigurationError(
                f"{self.name} is already applied to another model; use one {type(self).__name__} per model"
            )
        handles = self.apply(pl_module)
        if handles is not None:
            self._handles = list(handles) if isinstance(handles, (list, tuple)) else [handles]
        self._applied_to = pl_module

    def detach(self, pl_module: nn.Module) -> None:
        """Undo the surgery on ``pl_module`` if it is applied there."""
        if self._applied_to is pl_module:
            self.remove(pl_module)
            self._applied_to = None

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the composition of techniques, then apply the surgery (before weights load)."""
        check_composition(trainer.callbacks, world_size=trainer.world_size)
        self.attach(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Undo the surgery after the stage, unless :attr:`keep_after_fit`."""
        if not self.keep_after_fit:
            self.detach(pl_module)

    def surgery(self) -> dict[str, Any] | None:
        """What the surgery changes in the model's parameters and modules, or None when it changes none.

        A technique whose checkpoints hold weights that only a model with the same surgery can load
        (added parameters, removed modules) returns a dict of plain values with a ``technique`` entry
        (the constructor call that rebuilds it, for messages). It is recorded in each checkpoint under
        our metadata (:func:`~lightning_efficient.checkpoint.record_structure`), and a checkpoint whose
        record differs from the run's techniques is refused before its weights load
        (:func:`~lightning_efficient.checkpoint.check_structure`).
        """
        return None

    def check_checkpoint(self, checkpoint: Mapping[str, Any], name: str) -> None:
        """Refuse a checkpoint this technique cannot continue from, before its weights load (default: accept).

        Our LightningModules call it for every technique of the run from ``on_load_checkpoint``, in every
        stage (fit, validate, test, predict), after the :meth:`surgery` check. ``name`` is the checkpoint's
        path, for the message.

        Raises:
            CheckpointMismatchError: The checkpoint does not fit (the message names both sides).
        """

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse to write a checkpoint that ``torch.load(weights_only=True)`` could not read; record :meth:`surgery`."""
        check_plain_state(self.state_dict(), type(self).__name__)
        structure = self.surgery()
        if structure is not None:
            from lightning_efficient.checkpoint import record_structure

            record_structure(checkpoint, self.name, structure)

    # -- reporting ------------------------------------------------------------------------------
    def log_metrics(self, pl_module: pl.LightningModule, metrics: Mapping[str, float | torch.Tensor]) -> None:
        """Log ``metrics`` as ``<name>/<metric>`` at the current step, from a training-batch hook.

        Lightning repeats a value logged this way at every later logging step of the epoch, so
        call it on every step (as :class:`~lightning_efficient.testing.BlockOutputNoise` does); for a
        value reported only now and then, write to ``trainer.loggers`` directly.
        """
        pl_module.log_dict(
            {f"{self.name}/{key}": value for key, value in metrics.items()}, on_step=True, on_epoch=False
        )

    def plan_at(self, step: int, total_steps: int, num_blocks: int) -> dict[str, Any]:
        """What the technique does at optimizer step ``step`` of a ``total_steps`` run, for ``lightning-efficient plan``.

        Called without training (the surgery may or may not be applied); read only the arguments.

        Returns:
            Plain values named for what they are (``{"expected_keep": 0.8}``, ``{"sparsity": 0.5}``),
            and optionally ``"block_work"``: a list of ``num_blocks`` fractions, the expected share of
            each Transformer block's forward+backward work that runs at ``step`` (1.0: all of it), from
            which the plan scales the FLOPs per step. Empty (the default): nothing changes over the run.
        """
        return {}

    def adjust_step_flops(self, trainer: pl.Trainer, pl_module: pl.LightningModule, flops: float) -> float:
        """Correct the FLOPs the :class:`~lightning_efficient.monitor.EfficiencyMonitor` counted this step.

        The monitor counts the matrix products that run in the training step's forward pass, so
        skipped blocks, dropped tokens and a grown or pruned structure are already reflected.
        Override only for work the monitor cannot see (e.g. a scoring pass in a data loader).
        """
        return flops
