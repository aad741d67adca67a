"""ProgressiveResizing: train a ViT on smaller images first (fewer patches per image), then grow to the full size.

A ViT's cost per image follows its patch count: at half the side there are a quarter of the patches,
so every block's projections cost about a quarter and its attention scores about a sixteenth.
Progressive resizing (as in fast.ai's and MosaicML's recipes, and AutoProg's resolution growth, Li et
al. 2022) trains the early steps at a lower resolution and grows it on a schedule ``[(step, side),
...]``, ending at the model's own size.

How it is built:

- **The full-size position embedding stays the trained parameter.** A lower resolution uses its
  bicubic interpolation to the smaller patch grid, which transformers' ViT embeddings compute when
  called with ``interpolate_pos_encoding=True`` (the same map as timm's ``resample_abs_pos_embed``;
  the interpolation is differentiable, so the gradient reaches the full-size parameter). A forward
  pre-hook on every such embeddings module sets the flag while a lower size is active. Nothing is
  resized in the model, so nothing is lost going down and back up, and checkpoints keep their keys.
- **The images follow.** The same pre-hook resizes the batch's images to the current side
  (bilinear, antialiased when shrinking, as torchvision's ``Resize`` on tensors). Our
  :class:`~lightning_efficient.ViTClassifier` resizes once, to its ``train_image_size`` (which the
  technique sets), and counts the tokens of the current size for the monitor; the data module is
  unchanged, so a resumed run sees the same batches.
- **Evaluation runs at the full size** (``eval_size="full"``); ``"current"`` evaluates at the size
  of the current training step.
- **Resume is exact mid-schedule:** the size is a function of the optimizer step and the schedule
  (kept in the checkpoint, with fractions already turned into steps).
- The :class:`~lightning_efficient.monitor.EfficiencyMonitor` counts the FLOPs that run, so its
  counts follow the resolution without being told.

Which models: any model holding embeddings in transformers' ViT-family layout, a module with a
``position_embeddings`` parameter ``(1, 1 + patches, hidden)`` (one class position first), a
``patch_embeddings`` module with ``patch_size`` and ``image_size``, and a ``forward`` that takes
``interpolate_pos_encoding`` (``ViTEmbeddings``; DeiT's and others that share it). A model without
one is refused at ``setup``.

Patch-size growth (FlexiViT's pseudo-inverse resize of the patch embedding) is not offered. At a
fixed image size, patches of side ``k * p`` with the resized kernel give the same token grid as side
``size / k`` with patches of ``p``, and FlexiViT builds the resized kernel so that the two embeddings
agree on images the resize maps between: the variant would change only the downsampling filter, at
the price of a patched ``forward`` for transformers' patch embedding (its stride is fixed in a
``Conv2d``), where resolution growth uses transformers' own supported path.

Examples:
    >>> import lightning.pytorch as pl
    >>> from lightning_efficient import ImageClassificationDataModule, ViTClassifier
    >>> resize = ProgressiveResizing(schedule=[(0, 16), (2, 28)])  # 16x16 (16 patches of 4) for 2 steps, then 28x28
    >>> trainer = pl.Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_progress_bar=False,
    ...                      enable_checkpointing=False, enable_model_summary=False, callbacks=[resize])
    >>> trainer.fit(ViTClassifier(num_labels=10, preset="tiny"), ImageClassificationDataModule(batch_size=8))
    >>> resize.size_at(1), resize.size_at(2)
    (16, 28)
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_efficient.data.images import resize_images
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError
from lightning_efficient.technique import Technique, check_choice

__all__ = [
    "EVAL_SIZES",
    "ImageResolution",
    "ProgressiveResizing",
    "interpolatable_embeddings",
    "resolve_schedule",
    "validate_schedule",
    "validate_starts",
]

EVAL_SIZES = ("full", "current")


def validate_starts(starts: Sequence[int | float], name: str) -> list[int | float]:
    """Check the starts of a schedule's stages: optimizer steps (``int``) or fractions of the run (``float``).

    Raises:
        ConfigurationError: A start that is neither, a negative step, a fraction outside ``[0, 1)``, a first
            start other than 0, or starts of one kind that do not increase (steps and fractions are
            compared once the run's length is known, by :func:`resolve_schedule`). ``name`` is the argument,
            for the message.

    Examples:
        >>> validate_starts([0, 0.25, 0.5], "stages")
        [0, 0.25, 0.5]
        >>> validate_starts([0, 20, 10], "stages")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: stages: start 10 comes after 20; starts must increase
    """
    for start in starts:
        if isinstance(start, bool) or not isinstance(start, (int, float)):
            raise ConfigurationError(f"{name}: start {start!r} must be an optimizer step (int) or a fraction (float)")
        if isinstance(start, float) and not 0.0 <= start < 1.0:
            raise ConfigurationError(
                f"{name}: fraction {start} must lie in [0, 1) (a share of the run's steps); give a step as an int"
            )
        if start < 0:
            raise ConfigurationError(f"{name}: step {start} is negative; steps are optimizer steps >= 0")
    if starts[0] != 0:
        raise ConfigurationError(f"{name}={list(starts)} must start at step 0")
    for previous, start in itertools.pairwise(starts):
        if type(start) is type(previous) and start <= previous:
            raise ConfigurationError(f"{name}: start {start} comes after {previous}; starts must increase")
    return list(starts)


def validate_schedule(schedule: Sequence[Sequence[int | float]]) -> list[tuple[int | float, int]]:
    """Check a resizing schedule ``[(step or fraction, side), ...]``; return it as a list of pairs.

    A step is an optimizer step (an ``int``); a fraction (a ``float`` in ``[0, 1)``) is a share of the
    run's optimizer steps. The first entry starts at 0; starts and sides must increase
    (:func:`validate_starts`).

    Raises:
        ConfigurationError: An empty schedule, an entry that is not a pair, a side below 1, bad starts,
            sides that do not increase.

    Examples:
        >>> validate_schedule([(0, 16), (0.5, 28)])
        [(0, 16), (0.5, 28)]
        >>> validate_schedule([(0, 28), (100, 16)])
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: schedule: side 16 at 100 does not grow from 28; sides must increase
    """
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or not schedule:
        raise ConfigurationError(
            f"schedule={schedule!r} must be a non-empty list of [step or fraction, side], e.g. [[0, 16], [0.5, 28]]"
        )
    pairs: list[tuple[int | float, int]] = []
    for entry in schedule:
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise ConfigurationError(f"schedule entry {entry!r} must be a pair [step or fraction, side]")
        start, side = entry
        if isinstance(side, bool) or not isinstance(side, int) or side < 1:
            raise ConfigurationError(f"schedule: side {side!r} at {start!r} must be an integer >= 1")
        pairs.append((start, side))
    validate_starts([start for start, _ in pairs], "schedule")
    for (previous_start, previous_side), (start, side) in itertools.pairwise(pairs):
        if side <= previous_side:
            raise ConfigurationError(
                f"schedule: side {side} at {start} does not grow from {previous_side}; sides must increase"
            )
    return pairs


def resolve_schedule(schedule: Sequence[tuple[int | float, int]], total_steps: float) -> list[tuple[int, int]]:
    """``[(step, side), ...]``: the schedule's fractions as optimizer steps of a run of ``total_steps``.

    Raises:
        ConfigurationError: A fraction with a run of unknown length, or starts out of order once resolved.

    Examples:
        >>> resolve_schedule([(0, 16), (0.5, 24), (150, 28)], total_steps=200)
        [(0, 16), (100, 24), (150, 28)]
    """
    fractions = [start for start, _ in schedule if isinstance(start, float)]
    if fractions and not (math.isfinite(total_steps) and total_steps >= 1):
        raise ConfigurationError(
            f"schedule: fractions {fractions} need the run's length, which is {total_steps}; set trainer.max_steps "
            "or give optimizer steps"
        )
    steps = [(round(start * total_steps) if isinstance(start, float) else start, side) for start, side in schedule]
    for (step, side), (previous, _) in zip(steps[1:], steps):
        if step <= previous:
            raise ConfigurationError(
                f"schedule: side {side} starts at step {step}, not after step {previous} (resolved for a run of "
                f"{int(total_steps)} steps); starts must increase"
            )
    return steps


def interpolatable_embeddings(model: nn.Module) -> list[nn.Module]:
    """Every ViT-family embeddings module of ``model`` whose position embedding can be interpolated.

    Such a module has a ``position_embeddings`` parameter, a ``patch_embeddings`` module with
    ``patch_size`` and ``image_size``, and a ``forward`` that takes ``interpolate_pos_encoding``
    (transformers' ``ViTEmbeddings`` and those that copy it).

    Examples:
        >>> from lightning_efficient import ViTClassifier
        >>> [type(m).__name__ for m in interpolatable_embeddings(ViTClassifier(num_labels=3, preset="tiny"))]
        ['ViTEmbeddings']
    """
    found = []
    for module in model.modules():
        position = getattr(module, "position_embeddings", None)
        patches = getattr(module, "patch_embeddings", None)
        if not isinstance(position, nn.Parameter) or patches is None or not hasattr(patches, "patch_size"):
            continue
        if "interpolate_pos_encoding" in inspect.signature(module.forward).parameters:
            found.append(module)
    return found


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, Sequence) else (int(value), int(value))


class ImageResolution:
    """The surgery that runs a ViT's forwards at a chosen image side (shared by ProgressiveResizing and AutoProg).

    :meth:`attach` puts a forward pre-hook on every interpolatable embeddings module of the model
    (:func:`interpolatable_embeddings`); while :attr:`side` is below the model's size, the hook resizes
    the images and sets ``interpolate_pos_encoding=True``, in training (and in evaluation when
    ``eval_size="current"``). A module with a ``train_image_size`` attribute
    (:class:`~lightning_efficient.ViTClassifier`) is told the side by :meth:`set_side` and resizes its own
    inputs, once.

    Args:
        owner: The technique's name, for messages.
        sides: Every side the owner may set; each must be a multiple of the model's patch size, and the
            largest must be the model's image size.
        eval_size: ``"full"`` or ``"current"`` (see :class:`ProgressiveResizing`).

    Examples:
        >>> from lightning_efficient import ViTClassifier
        >>> model = ViTClassifier(num_labels=3, preset="tiny")
        >>> resolution = ImageResolution("demo", sides=[16, 28])
        >>> handles = resolution.attach(model)
        >>> resolution.set_side(model, 16); model.train_image_size
        (16, 16)
        >>> resolution.detach(model, handles); model.train_image_size is None
        True
    """

    def __init__(self, owner: str, sides: Sequence[int], eval_size: str = "full") -> None:
        self.owner = owner
        self.sides = list(sides)
        self.eval_size = check_choice("eval_size", eval_size, EVAL_SIZES)
        self.side = self.sides[0]
        self.full: int | None = None

    def attach(self, pl_module: nn.Module) -> list[Any]:
        """Check the sides against the model and hook its embeddings; return the hooks' handles.

        Raises:
            ConfigurationError: The model has no interpolatable position embeddings, takes non-square
                images or patches, or a side is not a multiple of the patch size or the largest side is
                not the model's image size.
        """
        embeddings = interpolatable_embeddings(pl_module)
        if not embeddings:
            raise ConfigurationError(
                f"{self.owner} needs ViT-style position embeddings that can be interpolated (a module with "
                f"position_embeddings, patch_embeddings and forward(..., interpolate_pos_encoding)); "
                f"{type(pl_module).__name__} has none"
            )
        for module in embeddings:
            self._check_sides(module.patch_embeddings)
        return [module.register_forward_pre_hook(self._pre_hook, with_kwargs=True) for module in embeddings]

    def _check_sides(self, patches: nn.Module) -> None:
        height, width = _pair(patches.image_size)
        patch = _pair(patches.patch_size)
        if height != width or patch[0] != patch[1]:
            raise ConfigurationError(
                f"{self.owner} resizes square images with square patches; the model takes {height}x{width} images "
                f"with {patch[0]}x{patch[1]} patches"
            )
        odd = [side for side in self.sides if side % patch[0]]
        if odd:
            raise ConfigurationError(
                f"{self.owner}: sides {odd} are not multiples of the model's patch size {patch[0]}"
            )
        if max(self.sides) != height:
            relation = "is past" if max(self.sides) > height else "stops short of"
            raise ConfigurationError(
                f"{self.owner}: the largest side {max(self.sides)} {relation} the model's image size {height}; "
                f"make it {height}"
            )
        self.full = height

    def set_side(self, pl_module: nn.Module, side: int) -> None:
        """Train at ``side`` from the next forward."""
        self.side = side
        if hasattr(pl_module, "train_image_size"):
            pl_module.train_image_size = None if side == self.full else (side, side)

    def detach(self, pl_module: nn.Module, handles: Sequence[Any]) -> None:
        """Remove the hooks ``handles`` and give the module back its own size."""
        for handle in handles:
            handle.remove()
        if hasattr(pl_module, "train_image_size"):
            pl_module.train_image_size = None

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        side = self.side if module.training or self.eval_size == "current" else self.full
        if side == self.full:
            return None
        if args:
            args = (resize_images(args[0], (side, side)), *args[1:])
        else:
            kwargs["pixel_values"] = resize_images(kwargs["pixel_values"], (side, side))
        kwargs["interpolate_pos_encoding"] = True
        return args, kwargs


class ProgressiveResizing(Technique):
    """Train at growing image sides on a schedule, ending at the model's size (see the module docstring).

    Args:
        schedule: ``[(start, side), ...]``: from optimizer step ``start`` (an ``int``) or fraction of
            the run's steps ``start`` (a ``float`` in ``[0, 1)``), train on ``side x side`` images. It
            starts at 0, starts and sides increase, every side is a multiple of the patch size, and the
            last side is the model's image size (e.g. ``[[0, 32], [0.4, 48], [0.8, 64]]`` for a 64x64
            model with patches of 4 or 8, or 16).
        eval_size: ``"full"``: validation, test and predict at the model's size; ``"current"``: at the
            side of the current training step.

    Logged every training step: ``progressive_resizing/image_size``.

    Raises:
        ConfigurationError: A bad schedule or ``eval_size`` (in ``__init__``); at ``setup``, a model
            without interpolatable position embeddings, or a side that is not a multiple of its patch
            size or does not end at its image size; at the start of training, fractions in a run of
            unknown length.
        CheckpointMismatchError: A checkpoint trained with other sides.
    """

    name = "progressive_resizing"
    hooks = ("setup", "on_train_start", "on_train_batch_start")
    conflicts_with = ("autoprog",)  # AutoProg chooses the sides itself
    distributed_safe = True  # the size is a function of the step: every rank resizes alike
    compile_safe = True  # tests/test_compile.py: compiled training equals eager
    compile_note = "recompiles when the image size changes"

    def __init__(self, schedule: Sequence[Sequence[int | float]], eval_size: str = "full") -> None:
        super().__init__()
        self.schedule = validate_schedule(schedule)
        self.resolution = ImageResolution(self.name, [side for _, side in self.schedule], eval_size)
        self._steps: list[tuple[int, int]] | None = None  # the schedule in optimizer steps, fixed at the first fit

    @property
    def size(self) -> int:
        """The side of the latest training step's images."""
        return self.resolution.side

    def size_at(self, step: int) -> int:
        """The side of the images trained at optimizer step ``step`` (the fractions as resolved for this run).

        Examples:
            >>> resize = ProgressiveResizing([(0, 16), (10, 28)])
            >>> resize.size_at(9), resize.size_at(10)
            (16, 28)
        """
        schedule = self._steps if self._steps is not None else resolve_schedule(self.schedule, math.inf)
        return [side for start, side in schedule if start <= step][-1]

    def apply(self, pl_module: nn.Module) -> list[Any]:
        return self.resolution.attach(pl_module)

    def remove(self, pl_module: nn.Module) -> None:
        self.resolution.detach(pl_module, self._handles)
        self._handles = []

    # -- Lightning hooks --------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._steps = None  # a resumed run loads its schedule after this
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._steps is None:
            self._steps = resolve_schedule(self.schedule, trainer.estimated_stepping_batches)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.resolution.set_side(pl_module, self.size_at(trainer.global_step))
        self.log_metrics(pl_module, {"image_size": float(self.size)})

    def state_dict(self) -> dict[str, Any]:
        return {"schedule_steps": None if self._steps is None else [list(pair) for pair in self._steps]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        steps = state_dict["schedule_steps"]
        if steps is None:
            self._steps = None
            return
        steps = [(int(step), int(side)) for step, side in steps]
        if [side for _, side in steps] != [side for _, side in self.schedule]:
            raise CheckpointMismatchError(
                f"{self.name}: the checkpoint was trained with sides {[side for _, side in steps]} (at steps "
                f"{[step for step, _ in steps]}), this run's schedule has {[side for _, side in self.schedule]}; "
                "resume with the checkpoint's schedule"
            )
        self._steps = steps
