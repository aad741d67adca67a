"""The plan of a run: what ``fit`` would do, measured in a few seconds without training.

``lightning-efficient plan`` (``fit --dry_run``) builds the model, the data, the trainer and the
technique callbacks from a config and prints :meth:`RunPlan.text`; every ``fit`` starts with
:meth:`RunPlan.summary_block`. :func:`build_plan` measures on a private deep copy of the model, so
the model itself (weights, modules, hooks, ``requires_grad``, train/eval mode, its own generators)
is never touched, and it restores the global random states (torch CPU and CUDA, Python, NumPy)
and the generators the trainer's callbacks own: a run that prints a plan trains bit-identically
to one that does not. It writes nothing but the caches that ``fit`` fills too: the device's peak
FLOP/s (measured once, as the :class:`~lightning_efficient.monitor.EfficiencyMonitor` does) and the
data module's tokenizer (``setup("fit")`` runs as in ``fit``). The copy holds the model's memory
twice while the plan runs; what the plan frees stays in the allocator's heap, where the run that
follows reuses it (BERT-small, 20 steps: the monitor's peak 2.49 GB with the plan before, 2.41 without).

What it does, on the copy:

1. Applies every technique of ``trainer.callbacks`` with its own ``attach`` (after
   :func:`~lightning_efficient.technique.check_composition`, as ``setup`` does) and counts the
   parameters (total, trainable, per Transformer block), the checkpoint's tensors and the
   optimizer's state (the optimizer ``configure_optimizers`` builds: Adam, AdamW and LAMB keep 2
   copies of the trainable parameters, Lion and SGD with momentum 1).
2. Runs ``training_step`` on one real training batch inside a
   :class:`~lightning_efficient.flops.FlopCounter`, exactly what the monitor counts on a step (the
   backward is charged from the forward), with the techniques that report a ``block_work``
   schedule (:meth:`~lightning_efficient.technique.Technique.plan_at`: LayerDrop, TokenDropping,
   ProgressiveStacking) taken off, so that every block does its full work. Hooks on each block
   give its FLOPs, and ``torch.autograd.graph.saved_tensors_hooks`` the bytes it keeps for the
   backward. The FLOPs of step ``t`` are then ``non-block + sum_b block_b * work_b(t)``, with
   ``work_b(t)`` the product of the techniques' ``block_work``; the run's total adds up every step
   (at most :data:`SAMPLED_STEPS` steps, evenly spaced, for a longer run).
3. Backpropagates that step once, untimed (the backward's first run allocates fresh memory), then
   times a second forward and backward of the same batch (no optimizer step): a step at ``t``
   takes that time x ``FLOPs(t) / full step``. The backward is timed, not assumed to cost twice the
   forward: its speed differs (a frozen base; activation checkpointing's recomputation, which the
   FLOPs leave out). The optimizer step and the loop are left out (about 4% of a BERT-small step).
   The FLOPs over the peak FLOP/s (the monitor's: given, else measured and cached) are a lower bound.

A callback that ends the run by its own measure says how long the run will be with a method
``plan_total_steps(total_steps, flops_per_step) -> total_steps`` (a pipeline stage's
:class:`~lightning_efficient.pipeline.budget.FlopBudget`: its FLOPs over the counted step's).

Memory (the peak the monitor reports: the process's peak RSS on the CPU, ``max_memory_allocated``
on CUDA) is estimated as the process's RSS now (model, data, libraries; on CUDA the model's bytes)
+ the bytes the step keeps for the backward (each block's scaled by its largest work over the run)
+ the gradients + the optimizer state + twice the largest tensor kept for the backward (the
backward's transients: that tensor's gradient and one temporary beside it). Measured against the
peak RSS of runs whose allocator returns freed memory (``benchmarks/plan.py``), this is within 5%
for BERT-small alone, with LayerDrop and with activation checkpointing (whose recomputed block
the term also covers there). glibc's default allocator keeps and fragments freed memory, so over a
long CPU run the RSS grows past this working set (BERT-small: 2.5 GB after 20 steps, 3.8 GB after
200, for a 1.6 GB working set): ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment holds it
there, at a cost in speed (every large allocation is mapped afresh: measured 4% slower steps for
BERT-small, 50% with activation checkpointing).

The plan applies the techniques' surgery and reads their schedules; it runs none of their
Lightning hooks, so what a technique does only there (a distillation teacher's forward, a scoring
pass) is missing, and said so for techniques with neither surgery nor ``plan_at``.

Examples:
    >>> from lightning_efficient import BertMLM, MLMDataModule
    >>> from lightning_efficient.callbacks import LayerDrop
    >>> from lightning_efficient.testing import quiet_trainer
    >>> dm = MLMDataModule(vocab_size=2000, max_length=32, batch_size=8)
    >>> trainer = quiet_trainer(max_steps=10, callbacks=[LayerDrop(drop_rate=0.5, schedule="linear")])
    >>> model = BertMLM(vocab_size=dm.vocab_size, preset="tiny")
    >>> plan = build_plan(trainer, model, dm, run={"name": "tiny"}, techniques=[], notes=[])
    >>> plan.parameters["total"] == sum(p.numel() for p in model.parameters())
    True
    >>> [round(w, 3) for w in plan.flops["schedule"][0]["block_work"]]  # 3 blocks, linear drop rates
    [0.833, 0.667, 0.5]
    >>> plan.flops["schedule"][0]["flops"] < plan.flops["full_step"]
    True
    >>> print(plan.summary_block().splitlines()[1])
      techniques: layer_drop (LayerDrop)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_efficient.blocks import find_block_stacks
from lightning_efficient.errors import ConfigurationError, NoTargetModulesError
from lightning_efficient.flops import FlopCounter, _synchronize, device_name, measure_peak_flops
from lightning_efficient.monitor import EfficiencyMonitor, _autocast_dtype, batch_counts, process_memory
from lightning_efficient.safeguards import capture_random_states, restore_random_states
from lightning_efficient.technique import Technique, check_composition

__all__ = [
    "GLIBC_NOTE",
    "OPTIMIZER_STATE_COPIES",
    "SAMPLED_STEPS",
    "SCHEDULE_POINTS",
    "RunPlan",
    "build_plan",
    "optimizer_state_copies",
    "run_steps",
    "schedule_steps",
]

#: Where in the run the plan reports each step's figures: the first step, a quarter, half, three quarters, the last.
SCHEDULE_POINTS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)

#: The run's total FLOPs and time add up every step of runs up to this long; longer runs, this many evenly spaced.
SAMPLED_STEPS = 2048

#: The plan's memory line on the CPU: what its estimate (the working set) leaves out.
GLIBC_NOTE = (
    "glibc keeps freed memory: the RSS grows past this over a long run (MALLOC_MMAP_THRESHOLD_=131072 stops it, "
    "at a cost in speed)"
)

#: Copies of the trainable parameters an optimizer keeps as state, by class name, at its defaults
#: (:func:`optimizer_state_copies` adds SGD's and RMSprop's momentum, RMSprop's ``centered``, ``amsgrad``).
OPTIMIZER_STATE_COPIES: dict[str, int] = {
    "Adam": 2,
    "AdamW": 2,
    "Adamax": 2,
    "NAdam": 2,
    "RAdam": 2,
    "LAMB": 2,
    "Adadelta": 2,
    "Adagrad": 1,
    "RMSprop": 1,
    "Lion": 1,
    "SGD": 0,
}


# -- schedule -----------------------------------------------------------------------------------
def run_steps(trainer: pl.Trainer, train_batches: int | None) -> int | None:
    """The optimizer steps ``fit`` will run (Lightning's ``estimated_stepping_batches``, without the data loader).

    ``max_steps`` when the epochs are unbounded; else ``max_epochs`` x the optimizer steps of an
    epoch (``train_batches`` cut by ``limit_train_batches``, over ``accumulate_grad_batches``), and
    at most ``max_steps``. ``max_epochs`` unset means 1000 without ``max_steps``, unbounded with it.

    Args:
        trainer: The run's trainer (before ``fit``).
        train_batches: Batches of the training loader (None: unknown, e.g. an iterable dataset).

    Returns:
        The steps, or None when the run is unbounded or its length unknown.

    Examples:
        >>> from lightning_efficient.testing import quiet_trainer
        >>> run_steps(quiet_trainer(max_steps=200), 50), run_steps(quiet_trainer(max_epochs=3), 50)
        (200, 150)
        >>> run_steps(quiet_trainer(max_epochs=2, accumulate_grad_batches=4, limit_train_batches=0.5), 50)
        14
    """
    max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
    if max_epochs is None:
        max_epochs = 1000 if max_steps == -1 else -1
    if max_epochs == -1 or train_batches is None:
        return max_steps if max_steps >= 0 else None
    limit = trainer.limit_train_batches
    batches = min(train_batches, limit) if isinstance(limit, int) else int(train_batches * limit)
    steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(max_epochs, 1)
    return min(steps, max_steps) if max_steps != -1 else steps


def schedule_steps(total_steps: int) -> list[int]:
    """The steps at :data:`SCHEDULE_POINTS` of a ``total_steps`` run (steps 0 to ``total_steps - 1``), without repeats.

    Examples:
        >>> schedule_steps(200), schedule_steps(2)
        ([0, 50, 100, 150, 199], [0, 1])
    """
    last = max(total_steps - 1, 0)
    return sorted({min(round(point * total_steps), last) for point in SCHEDULE_POINTS})


def _sampled_steps(total_steps: int) -> list[int]:
    """Every step of the run, or :data:`SAMPLED_STEPS` evenly spaced ones over a longer run."""
    if total_steps <= SAMPLED_STEPS:
        return list(range(total_steps))
    return [round(i * (total_steps - 1) / (SAMPLED_STEPS - 1)) for i in range(SAMPLED_STEPS)]


def optimizer_state_copies(optimizer: torch.optim.Optimizer) -> int | None:
    """Copies of its trainable parameters ``optimizer`` keeps as state, from its class and settings; None: unknown.

    Adam's ``amsgrad`` adds one; SGD and RMSprop keep a momentum buffer only with ``momentum > 0``,
    and RMSprop a mean more when ``centered``.

    Examples:
        >>> params = [nn.Parameter(torch.zeros(2))]
        >>> optimizer_state_copies(torch.optim.AdamW(params)), optimizer_state_copies(torch.optim.SGD(params, lr=0.1))
        (2, 0)
        >>> optimizer_state_copies(torch.optim.SGD(params, lr=0.1, momentum=0.9))
        1
    """
    name = type(optimizer).__name__
    copies = OPTIMIZER_STATE_COPIES.get(name)
    if copies is None:
        return None
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    momentum = name in ("SGD", "RMSprop") and bool(group.get("momentum"))
    return copies + int(momentum) + int(bool(group.get("centered"))) + int(bool(group.get("amsgrad")))


# -- the plan -----------------------------------------------------------------------------------
@dataclass
class RunPlan:
    """What ``fit`` would do: the run's facts (from the CLI) and the measured figures; plain values only.

    Attributes:
        run: ``name``, ``directory``, ``writes`` (``checkpoints``, ``tensorboard``, ``config``,
            ``efficiency``) and ``existing_checkpoint``, as given.
        techniques: The techniques in the order they run (``name``, ``class_path``, ``source``,
            ``arguments``), as given (or, when none are given, the trainer's, by name and class).
        notes: How the config was composed, as given.
        device: Where the step was measured (``"cpu: <model>"``, ``"cuda: <name>"``).
        precision: The trainer's precision.
        batch: ``samples`` and ``tokens`` of the measured training batch.
        total_steps: Optimizer steps of the run (None: unbounded or unknown).
        parameters: ``total``, ``trainable`` and per block (``blocks``: ``name``, ``total``,
            ``trainable``), with the techniques' surgery applied.
        flops: ``full_step`` (the counted step, every block at full work), ``non_block``,
            ``blocks`` (each block's FLOPs), ``schedule`` (at :func:`schedule_steps`: ``step``,
            ``flops``, ``time_s``, ``lower_bound_s``, ``block_work`` and each technique's
            :meth:`~lightning_efficient.technique.Technique.plan_at` values), ``total`` and
            ``total_steps_summed`` (how many steps were added up for it).
        memory: ``estimate_bytes``, ``kind`` (as the monitor's ``memory_kind``) and the parts.
        time: ``peak_flops_per_s`` (and its ``peak_source``), ``measured_s`` (the timed forward and
            backward at full work), ``total_s`` and ``total_lower_bound_s`` (the whole run).
        checkpoint: ``estimate_bytes``: ``model_bytes`` (the state dict, masks included) +
            ``optimizer_bytes`` + ``callback_bytes`` (the callbacks' tensors).
        caveats: What the measurement could not see.
        seconds: How long :func:`build_plan` took.
    """

    run: dict[str, Any]
    techniques: list[dict[str, Any]]
    notes: list[str]
    device: str
    precision: str
    batch: dict[str, int]
    total_steps: int | None
    parameters: dict[str, Any]
    flops: dict[str, Any]
    memory: dict[str, Any]
    time: dict[str, Any]
    checkpoint: dict[str, Any]
    caveats: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The plan as a JSON-serialisable dict (``lightning-efficient plan --format json``)."""
        return asdict(self)

    def text(self) -> str:
        """The printed plan: short titled sections, human units."""
        lines = [*self._run_lines(), "Techniques, in the order they run"]
        lines += [f"  {i}. {_technique_line(t)}" for i, t in enumerate(self.techniques, 1)] or ["  none"]
        if self.notes:
            lines += ["Notes", *(f"  - {note}" for note in self.notes)]
        lines += self._parameter_lines()
        lines += self._flops_lines()
        lines.append(f"Memory  ~{_bytes(self.memory['estimate_bytes'])} peak {_memory_kind(self.memory['kind'])}")
        lines.append(f"  = {_memory_parts(self.memory)}")
        if self.memory["kind"] == "process_peak_rss":
            lines.append(f"  {GLIBC_NOTE}")
        lines += self._time_lines()
        c = self.checkpoint
        lines.append(
            f"Checkpoint  ~{_bytes(c['estimate_bytes'])} (model {_bytes(c['model_bytes'])}, "
            f"optimizer {_bytes(c['optimizer_bytes'])}, callbacks {_bytes(c['callback_bytes'])})"
        )
        if self.caveats:
            lines += ["Not measured", *(f"  - {caveat}" for caveat in self.caveats)]
        return "\n".join(lines)

    def summary_block(self) -> str:
        """A few lines for the first screen of ``fit``: the run, its techniques, its FLOPs, TensorBoard, the notes."""
        name, directory = self.run.get("name"), self.run.get("directory")
        lines = [f"Run {name or '(unnamed)'}" + (f" -> {directory}" if directory else "")]
        names = [_technique_name(t) for t in self.techniques]
        lines.append(f"  techniques: {' -> '.join(names) if names else 'none'}")
        schedule = self.flops["schedule"]
        if schedule:
            first, last = schedule[0], schedule[-1]
            per_step = _si(first["flops"], "FLOP")
            if last["flops"] != first["flops"]:
                per_step += f" at step 0, {_si(last['flops'], 'FLOP')} at step {last['step']:,}"
            total = f"; {_si(self.flops['total'], 'FLOP')} over {self.total_steps:,} steps" if self.total_steps else ""
            lines.append(f"  FLOPs per step: {per_step}{total}")
            lines.append(
                f"  ~{_bytes(self.memory['estimate_bytes'])} peak memory, ~{_seconds(first['time_s'])} per step"
                + (f", ~{_seconds(self.time['total_s'])} in all" if self.total_steps else "")
            )
        tensorboard = (self.run.get("writes") or {}).get("tensorboard")
        if tensorboard:
            lines.append(f"  TensorBoard: tensorboard --logdir {tensorboard}")
        lines += [f"  note: {note}" for note in self.notes]  # how the fragments were stacked: which value won
        return "\n".join(lines)

    # -- text parts -------------------------------------------------------------------------------
    def _run_lines(self) -> list[str]:
        name, directory = self.run.get("name"), self.run.get("directory")
        lines = [f"Run {name or '(unnamed)'}" + (f" in {directory}" if directory else "")]
        writes = self.run.get("writes") or {}
        checkpoints = list(dict.fromkeys(writes.get("checkpoints") or []))  # each directory once
        if checkpoints:
            lines.append(f"  checkpoints  {', '.join(checkpoints)}")
        for key in ("config", "efficiency"):
            if writes.get(key):
                lines.append(f"  {key:<11}  {writes[key]}")
        if writes.get("tensorboard"):
            lines.append(f"  TensorBoard  tensorboard --logdir {writes['tensorboard']}")
        existing = self.run.get("existing_checkpoint")
        if existing:
            lines.append(f"  ! {existing} exists: fit will stop unless --resume, --overwrite or another --run_name")
        return lines

    def _parameter_lines(self) -> list[str]:
        p = self.parameters
        line = f"Parameters  {_si(p['total'])} ({_si(p['trainable'])} trainable)"
        blocks = p["blocks"]
        if not blocks:
            return [line]
        sizes = {(b["total"], b["trainable"]) for b in blocks}
        if len(sizes) == 1:
            total, trainable = sizes.pop()
            each = f"{_si(total)} each ({_si(trainable)} trainable)"
            return [line, f"  {len(blocks)} blocks ({blocks[0]['name']} ... {blocks[-1]['name']}), {each}"]
        listed = ", ".join(f"{_si(b['total'])}/{_si(b['trainable'])}" for b in blocks)
        return [line, f"  {len(blocks)} blocks, total/trainable: {listed}"]

    def _flops_lines(self) -> list[str]:
        f, schedule = self.flops, self.flops["schedule"]
        batch = f"{self.batch['samples']:,} samples, {self.batch['tokens']:,} tokens"
        lines = [f"FLOPs per step (forward + backward, one batch of {batch})"]
        if not schedule:
            return [*lines, f"  {_si(f['full_step'], 'FLOP')} per step (the run's length is unknown)"]
        rows = [("step", [f"{point['step']:,}" for point in schedule]), ("FLOPs", [_si(p["flops"]) for p in schedule])]
        for name in schedule[0]["techniques"]:
            for key in schedule[0]["techniques"][name]:
                rows.append((f"{name} {key}", [_value(point["techniques"][name][key]) for point in schedule]))
        width = max(len(label) for label, _ in rows)
        cell = max(len(value) for _, values in rows for value in values) + 2
        lines += [f"  {label:<{width}}" + "".join(value.rjust(cell) for value in values) for label, values in rows]
        blocks = f["blocks"]
        split = f"{_si(f['non_block'])} outside the blocks + {len(blocks)} blocks of {_si(max(blocks, default=0))}"
        lines.append(f"  total {_si(f['total'], 'FLOP')} over {self.total_steps:,} steps; a full step: {split}")
        return lines

    def _time_lines(self) -> list[str]:
        t, schedule = self.time, self.flops["schedule"]
        peak = f"{_si(t['peak_flops_per_s'], 'FLOP/s')} peak ({t['peak_source']})"
        if not schedule:
            return [f"Time  ~{_seconds(t['measured_s'])} per full step (lower bound at {peak})"]
        first = schedule[0]
        run = f", ~{_seconds(t['total_s'])} for the run" if self.total_steps else ""
        return [
            f"Time  ~{_seconds(first['time_s'])} per step at step 0{run}",
            f"  lower bound {_seconds(first['lower_bound_s'])} per step (FLOPs / {peak})",
        ]


def _si(value: float, unit: str = "") -> str:
    """``value`` in 3 significant digits with a k/M/G/T/P prefix: ``11.2M``, ``112G``; with a unit ``112 GFLOP``."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")):
        if abs(value) >= factor or factor == 1.0:
            number = f"{value / factor:.3g}"
            return f"{number} {prefix}{unit}" if unit else f"{number}{prefix}"
    raise AssertionError("unreachable")


def _bytes(value: float) -> str:
    return f"{value / 1e9:.2f} GB" if value >= 1e8 else f"{value / 1e6:.1f} MB"


def _seconds(value: float) -> str:
    if value < 0.1:
        return f"{value * 1e3:.3g} ms"
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 120:
        return f"{value / 60:.1f} min"
    return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _memory_kind(kind: str) -> str:
    return "CUDA memory allocated" if kind == "cuda_max_allocated" else "process RSS"


def _memory_parts(memory: Mapping[str, Any]) -> str:
    parts = memory["parts"]
    names = {
        "process_bytes": "process now",
        "model_bytes": "model",
        "saved_activation_bytes": "activations",
        "gradient_bytes": "gradients",
        "optimizer_state_bytes": f"{memory['optimizer']} state",
        "backward_transient_bytes": "backward",
    }
    return " + ".join(f"{_bytes(parts[key])} {label}" for key, label in names.items() if key in parts)


def _technique_name(technique: Mapping[str, Any]) -> str:
    """``layer_drop (LayerDrop)``: the name and the class."""
    kind = str(technique.get("class_path") or "").rpartition(".")[2]
    return f"{technique.get('name')} ({kind})" if kind else str(technique.get("name"))


def _technique_line(technique: Mapping[str, Any]) -> str:
    arguments = " ".join(f"{key}={value}" for key, value in (technique.get("arguments") or {}).items())
    source = f"  [{technique['source']}]" if technique.get("source") else ""
    return _technique_name(technique) + (f" {arguments}" if arguments else "") + source


# -- measuring ----------------------------------------------------------------------------------
class _PlanningTrainer:
    """The trainer as the model's copy sees it in the plan: the run's trainer, with the run's step count and step 0."""

    def __init__(self, trainer: pl.Trainer, total_steps: int | None) -> None:
        self._trainer = trainer
        self._total_steps = total_steps

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)

    @property
    def estimated_stepping_batches(self) -> float:
        return float("inf") if self._total_steps is None else float(self._total_steps)

    @property
    def global_step(self) -> int:
        return 0

    @property
    def current_epoch(self) -> int:
        return 0


def _ignore(*args: Any, **kwargs: Any) -> None:
    """Stands for ``log`` and ``log_dict`` on the copy: a step logged outside ``fit`` has nowhere to go."""


@contextmanager
def _kept_generators(objects: Sequence[Any]) -> Iterator[None]:
    """Restore, on leaving, the state of every ``torch.Generator`` held as an attribute of ``objects``."""
    generators = [value for obj in objects for value in vars(obj).values() if isinstance(value, torch.Generator)]
    states = [generator.get_state() for generator in generators]
    try:
        yield
    finally:
        for generator, state in zip(generators, states):
            generator.set_state(state)


def _storage(tensor: torch.Tensor) -> tuple[int, int, Any]:
    """``(key, bytes, owner)`` of the memory a tensor keeps alive: its storage (a tensor subclass without one: itself)."""
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes(), storage
    except (RuntimeError, NotImplementedError, TypeError):
        return id(tensor), tensor.numel() * tensor.element_size(), tensor


def _unique_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages of ``tensors`` (tied weights once), as ``torch.save`` writes them."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        key, size, _ = _storage(tensor)
        seen[key] = size
    return sum(seen.values())


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors inside nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _optimizers(configured: Any) -> list[torch.optim.Optimizer]:
    """The optimizers in what ``configure_optimizers`` returned (any of Lightning's forms)."""
    if isinstance(configured, torch.optim.Optimizer):
        return [configured]
    if isinstance(configured, Mapping):
        return _optimizers(configured.get("optimizer"))
    if isinstance(configured, (list, tuple)):
        return [optimizer for item in configured for optimizer in _optimizers(item)]
    return []


def _shallow_copy(batch: Any) -> Any:
    """A batch whose top-level container is new, so a step that adds keys to it leaves the next step's batch alone."""
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, list):
        return list(batch)
    return batch


def _loss(output: Any) -> torch.Tensor | None:
    if isinstance(output, Mapping):
        output = output.get("loss")
    return output if isinstance(output, torch.Tensor) else None


@dataclass
class _Step:
    """What one counted training step showed."""

    flops: float
    block_flops: list[float]
    saved_bytes: int
    block_saved_bytes: list[int]
    largest_saved_bytes: int


@contextmanager
def _block_hooks(blocks: Sequence[nn.Module], counter: FlopCounter, step: _Step) -> Iterator[list[int]]:
    """Add each block's FLOPs to ``step.block_flops`` while it runs; yields the stack of running blocks."""
    running: list[int] = []
    started: list[float] = []

    def enter(index: int) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            running.append(index)
            started.append(counter.flops)

        return hook

    def leave(index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            running.pop()
            flops = counter.flops - started.pop()
            if not running:  # the outermost block: a block inside another is counted in it
                step.block_flops[index] += flops

        return hook

    handles = [block.register_forward_pre_hook(enter(i)) for i, block in enumerate(blocks)]
    handles += [block.register_forward_hook(leave(i)) for i, block in enumerate(blocks)]
    try:
        yield running
    finally:
        for handle in handles:
            handle.remove()


def _count_step(trainer: pl.Trainer, replica: pl.LightningModule, batch: Any, blocks: Sequence[nn.Module]) -> _Step:
    """Run ``training_step`` inside a FlopCounter, recording each block's FLOPs and the bytes kept for backward.

    The step is then backpropagated once, outside the counter: untimed, it warms the backward up
    (its first run allocates and faults in fresh memory) for :func:`_time_step`.
    """
    step = _Step(0.0, [0.0] * len(blocks), 0, [0] * len(blocks), 0)
    resident = {_storage(t)[0] for t in (*replica.parameters(), *replica.buffers())}
    saved: dict[int, tuple[int, int | None, Any]] = {}  # storage -> (bytes, block, the storage: held, so not reused)
    counter = FlopCounter()
    with _block_hooks(blocks, counter, step) as running:

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            key, size, owner = _storage(tensor)
            if key not in resident and key not in saved:
                saved[key] = (size, running[-1] if running else None, owner)
            return (
                tensor.detach()
            )  # the value only (as save_on_cpu keeps a copy): no reference from the graph to itself

        saving = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        with saving, trainer.precision_plugin.train_step_context(), counter:
            output = replica.training_step(_shallow_copy(batch), 0)
    loss = _loss(output)
    del output
    if loss is not None and loss.requires_grad:
        loss.backward()
    del loss
    replica.zero_grad(set_to_none=True)
    step.flops = counter.flops
    for size, block, _ in saved.values():
        step.saved_bytes += size
        step.largest_saved_bytes = max(step.largest_saved_bytes, size)
        if block is not None:
            step.block_saved_bytes[block] += size
    return step


def _time_step(trainer: pl.Trainer, replica: pl.LightningModule, batch: Any, device: torch.device) -> float:
    """Seconds of one forward and backward of ``training_step`` (no optimizer step); the copy's gradients are dropped."""
    _synchronize(device)
    started = time.perf_counter()
    with trainer.precision_plugin.train_step_context():
        loss = _loss(replica.training_step(_shallow_copy(batch), 0))
    if loss is not None and loss.requires_grad:
        loss.backward()
    _synchronize(device)
    elapsed = time.perf_counter() - started
    replica.zero_grad(set_to_none=True)
    return elapsed


def _training_batch(datamodule: pl.LightningDataModule | None) -> tuple[Any, int | None]:
    """The first training batch of ``datamodule`` (set up for ``fit``) and the length of its training loader."""
    if datamodule is None:
        raise ConfigurationError("build_plan measures a training step on real data: pass the datamodule (or a batch)")
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    try:
        length: int | None = len(loader)
    except TypeError:  # an iterable dataset
        length = None
    iterator = iter(loader)
    batch = next(iterator)
    del iterator, loader  # worker processes, if any, stop here
    return batch, length


def _work_at(
    techniques: Sequence[Technique], step: int, total_steps: int, depths: Sequence[int]
) -> tuple[list[float], dict[str, dict[str, Any]]]:
    """The work of every block at ``step`` (the product over techniques) and each technique's other ``plan_at`` values."""
    work = [1.0] * sum(depths)
    values: dict[str, dict[str, Any]] = {}
    for technique in techniques:
        reported: dict[str, Any] = {}
        offset = 0
        for depth in depths or [0]:
            plan = dict(technique.plan_at(step, total_steps, depth))
            block_work = plan.pop("block_work", None)
            if block_work is not None:
                if len(block_work) != depth:
                    raise ValueError(
                        f"{technique.name}.plan_at returned {len(block_work)} block_work values for a stack of {depth} blocks"
                    )
                for index, fraction in enumerate(block_work):
                    work[offset + index] *= float(fraction)
            reported = reported or plan  # a model with several stacks: the first stack's values
            offset += depth
        if reported:
            values[technique.name] = reported
    return work, values


def _parameters(replica: nn.Module, names: Sequence[str], blocks: Sequence[nn.Module]) -> dict[str, Any]:
    """Total and trainable parameters of the model and of each block."""

    def count(module: nn.Module) -> tuple[int, int]:
        params = list(module.parameters())
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    total, trainable = count(replica)
    rows = [dict(zip(("name", "total", "trainable"), (name, *count(block)))) for name, block in zip(names, blocks)]
    return {"total": total, "trainable": trainable, "blocks": rows}


def _optimizer_state(optimizers: Sequence[torch.optim.Optimizer], caveats: list[str]) -> tuple[str, int]:
    """The optimizers' names and the bytes of their state (copies of the trainable parameters they update)."""
    names, total = [], 0
    for optimizer in optimizers:
        name = type(optimizer).__name__
        copies = optimizer_state_copies(optimizer)
        if copies is None:
            copies = 2
            caveats.append(f"optimizer {name}: state size unknown, taken as Adam's (2 copies of the trainable weights)")
        params = {id(p): p for group in optimizer.param_groups for p in group["params"] if p.requires_grad}
        total += copies * sum(p.numel() * p.element_size() for p in params.values())
        names.append(name)
    if not optimizers:
        caveats.append("configure_optimizers returned no optimizer: no optimizer state counted")
    return " + ".join(names) or "no optimizer", total


def _peak_flops(trainer: pl.Trainer, device: torch.device) -> tuple[float, str]:
    """The peak FLOP/s the monitor uses: its ``peak_flops`` when given, else measured (and cached) in the run's dtype."""
    monitor = next((cb for cb in trainer.callbacks if isinstance(cb, EfficiencyMonitor)), None)
    if monitor is not None and monitor.peak_flops is not None:
        return monitor.peak_flops, "given"
    return measure_peak_flops(device, _autocast_dtype(str(trainer.precision))), "measured"


def _memory(
    process_bytes: int | None,
    model_bytes: int,
    saved_bytes: float,
    gradient_bytes: int,
    optimizer_state_bytes: int,
    transient_bytes: int,
    optimizer: str,
) -> dict[str, Any]:
    """The peak memory estimate and its parts: the process (CPU) or the model (CUDA), and what training adds."""
    parts = {"process_bytes": process_bytes} if process_bytes is not None else {"model_bytes": model_bytes}
    parts.update(
        saved_activation_bytes=int(saved_bytes),
        gradient_bytes=gradient_bytes,
        optimizer_state_bytes=optimizer_state_bytes,
        backward_transient_bytes=transient_bytes,
    )
    kind = "process_peak_rss" if process_bytes is not None else "cuda_max_allocated"
    return {"estimate_bytes": sum(parts.values()), "kind": kind, "optimizer": optimizer, "parts": parts}


def _schedule(
    techniques: Sequence[Technique],
    total_steps: int | None,
    depths: Sequence[int],
    step: _Step,
    flops: float,
    measured_s: float,
    peak: float,
) -> dict[str, Any]:
    """The figures at :func:`schedule_steps`, the run's total FLOPs and each block's largest work over the run.

    A step's FLOPs are the counted full step's with each block's scaled by its work then
    (:func:`_work_at`); its time is the measured full step's, scaled alike.
    """
    non_block = flops - sum(step.block_flops)

    def at(index: int) -> tuple[float, list[float], dict[str, dict[str, Any]]]:
        work, values = _work_at(techniques, index, total_steps or 1, depths)
        return non_block + sum(f * w for f, w in zip(step.block_flops, work)), work, values

    if not total_steps:
        return {"points": [], "total_flops": 0.0, "summed": 0, "max_work": [1.0] * len(step.block_flops)}
    sampled = _sampled_steps(total_steps)
    total, max_work = 0.0, [0.0] * len(step.block_flops)
    for index in sampled:
        step_flops, work, _ = at(index)
        total += step_flops
        max_work = [max(m, w) for m, w in zip(max_work, work)]
    points = []
    for index in schedule_steps(total_steps):
        step_flops, work, values = at(index)
        points.append(
            {
                "step": index,
                "flops": step_flops,
                "time_s": measured_s * step_flops / flops if flops else measured_s,
                "lower_bound_s": step_flops / peak,
                "block_work": work,
                "techniques": values,
            }
        )
    return {
        "points": points,
        "total_flops": total * total_steps / len(sampled),
        "summed": len(sampled),
        "max_work": max_work,
    }


def build_plan(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    run: Mapping[str, Any],
    techniques: Sequence[Mapping[str, Any]],
    notes: Sequence[str],
    *,
    batch: Any = None,
) -> RunPlan:
    """Measure what ``trainer.fit(model, datamodule)`` would do, without training (see the module docstring).

    Args:
        trainer: The run's trainer; its ``callbacks`` hold the techniques, in the order they run.
        model: The run's LightningModule (left exactly as it is).
        datamodule: The run's data: its first training batch is measured (``setup("fit")`` is called,
            as ``fit`` does). May be None when ``batch`` is given.
        run: The run's name, directory, outputs and existing checkpoint (the CLI's facts), rendered as given.
        techniques: The techniques in the order they run, with their source (the CLI's facts), rendered as given.
        notes: How the config was composed (the CLI's facts), rendered as given.
        batch: A training batch to measure instead of the datamodule's first one.

    Returns:
        The :class:`RunPlan`.

    Raises:
        ConfigurationError: What ``fit`` would refuse before the first step: techniques that do not
            compose, a technique that does not fit the model; or no data to measure.
    """
    started = time.perf_counter()
    run_techniques = [callback for callback in trainer.callbacks if isinstance(callback, Technique)]
    check_composition(trainer.callbacks, world_size=trainer.world_size)
    applied = [technique.name for technique in run_techniques if technique.is_applied]
    if applied:
        raise ConfigurationError(
            f"{', '.join(applied)} already changed a model; build the plan before fit (or with fresh techniques)"
        )
    random_states = capture_random_states()
    with _kept_generators(trainer.callbacks):
        try:
            plan = _measure(trainer, model, datamodule, batch, run_techniques)
        finally:
            restore_random_states(random_states)
    given = [dict(t) for t in techniques] or [
        {"name": t.name, "class_path": f"{type(t).__module__}.{type(t).__qualname__}", "source": None, "arguments": {}}
        for t in run_techniques
    ]
    return RunPlan(run=dict(run), techniques=given, notes=list(notes), **plan, seconds=time.perf_counter() - started)


def _measure(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    batch: Any,
    run_techniques: Sequence[Technique],
) -> dict[str, Any]:
    """Every figure of the plan but the given facts (see the module docstring), on a deep copy of ``model``."""
    caveats: list[str] = []
    length = None
    if batch is None:
        batch, length = _training_batch(datamodule)
    total_steps = run_steps(trainer, length)
    device = trainer.strategy.root_device
    process_bytes = process_memory("VmRSS") if device.type == "cpu" else None
    shared = getattr(model, "_trainer", None)
    replica = copy.deepcopy(model, {id(shared): shared} if shared is not None else {})
    replica.to(device)
    replica.trainer = _PlanningTrainer(trainer, total_steps)  # type: ignore[assignment]
    replica.log = _ignore  # type: ignore[method-assign]
    replica.log_dict = _ignore  # type: ignore[method-assign]
    batch = replica.on_before_batch_transfer(batch, 0)
    batch = replica.transfer_batch_to_device(batch, device, 0)
    batch = replica.on_after_batch_transfer(batch, 0)
    counter = getattr(replica, "count_batch", None)
    samples, tokens = counter(batch) if callable(counter) else batch_counts(batch)

    attached: list[Technique] = []
    try:
        for technique in run_techniques:
            try:
                technique.attach(replica)
            except ConfigurationError:
                raise  # what fit would refuse too
            except Exception as error:  # noqa: BLE001 (a surgery that needs a live run: say so and go on)
                caveats.append(
                    f"{technique.name} could not be applied without training ({error}): not in these figures"
                )
                continue
            attached.append(technique)
        try:
            stacks = find_block_stacks(replica)
        except NoTargetModulesError:
            stacks = []
            caveats.append(f"no Transformer block stack found in {type(model).__name__}: FLOPs are not split by block")
        blocks = [block for stack in stacks for block in stack.blocks]
        names = [f"{stack.path}.{i}" for stack in stacks for i in range(len(stack))]
        depths = [len(stack) for stack in stacks]
        parameters = _parameters(replica, names, blocks)
        optimizers = _optimizers(replica.configure_optimizers())
        optimizer, state_bytes = _optimizer_state(optimizers, caveats)
        checkpoint = {
            "model_bytes": _unique_bytes(_tensors(replica.state_dict())),
            "optimizer_bytes": state_bytes,
            "callback_bytes": _unique_bytes([t for cb in trainer.callbacks for t in _tensors(cb.state_dict())]),
        }
        checkpoint["estimate_bytes"] = sum(checkpoint.values())
        scheduled = [
            t for t in run_techniques if "block_work" in t.plan_at(0, total_steps or 1, max(depths, default=1))
        ]
        for technique in scheduled:  # their work is scaled by block_work: the counted step runs every block in full
            technique.detach(replica)
        # In the train/eval modes the model is in: fit does not change them (it warns about modules in eval mode).
        step = _count_step(trainer, replica, batch, blocks)
        flops = step.flops
        for callback in trainer.callbacks:
            adjust = getattr(callback, "adjust_step_flops", None)
            if callable(adjust):
                flops = float(adjust(trainer, replica, flops))
        for callback in trainer.callbacks:  # a callback that ends the run by its own measure (a FLOP budget)
            limit = getattr(callback, "plan_total_steps", None)
            if callable(limit):
                total_steps = limit(total_steps, flops)
        measured_s = _time_step(trainer, replica, batch, device)
        gradient_bytes = sum(p.numel() * p.element_size() for p in replica.parameters() if p.requires_grad)
        model_bytes = _unique_bytes([*replica.parameters(), *replica.buffers()])
    finally:
        for technique in reversed(attached):
            technique.detach(replica)
        del replica

    hooked = [
        t.name for t in run_techniques if type(t).apply is Technique.apply and type(t).plan_at is Technique.plan_at
    ]
    if hooked:
        caveats.append(
            f"{', '.join(hooked)}: no surgery and no plan_at schedule; what it does in setup and training hooks "
            "(e.g. a teacher's forward, a scoring pass) is not in these figures"
        )
    peak, peak_source = _peak_flops(trainer, device)
    schedule = _schedule(run_techniques, total_steps, depths, step, flops, measured_s, peak)
    if total_steps is None:
        caveats.append("the run's length is unknown (no max_steps, or an iterable dataset): no totals")
    max_work = schedule["max_work"]
    saved = step.saved_bytes + sum(s * (w - 1) for s, w in zip(step.block_saved_bytes, max_work))
    memory = _memory(
        process_bytes, model_bytes, saved, gradient_bytes, state_bytes, 2 * step.largest_saved_bytes, optimizer
    )
    return {
        "device": device_name(device),
        "precision": str(trainer.precision),
        "batch": {"samples": int(samples), "tokens": int(tokens)},
        "total_steps": total_steps,
        "parameters": parameters,
        "flops": {
            "full_step": flops,
            "non_block": flops - sum(step.block_flops),
            "blocks": step.block_flops,
            "schedule": schedule["points"],
            "total": schedule["total_flops"],
            "total_steps_summed": schedule["summed"],
        },
        "memory": memory,
        "time": {
            "peak_flops_per_s": peak,
            "peak_source": peak_source,
            "measured_s": measured_s,
            "total_s": measured_s * schedule["total_flops"] / flops if flops else 0.0,
            "total_lower_bound_s": schedule["total_flops"] / peak,
        },
        "checkpoint": checkpoint,
        "caveats": caveats,
    }
