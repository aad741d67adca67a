"""AutoProg: grow a ViT's depth and image size in stages, each growth chosen by a short one-shot search.

Li et al. (2022, "Automated Progressive Learning for Efficient Training of Vision Transformers")
train a ViT progressively, growing the depth and the input resolution together, and decide at each
stage boundary *how much* to grow: they train the largest model as an elastic supernet for a short
while, sampling its sub-networks, and take the cheapest sub-network whose loss stays close to the
largest one's. New blocks start from a moving average of the weights they copy (momentum growth,
MoGrow). They report up to 1.85x training throughput (the "85.1%" of the abstract) with no accuracy
loss on ImageNet (DeiT, VOLO).

What this callback does, with ``stages = [s_0 = 0, s_1, ..., s_K]``:

- **Stage 0** trains the smallest candidate: ``depths[0]`` blocks per stack on ``image_sizes[0]``
  sides.
- **At each boundary ``s_1 .. s_{K-1}`` a search runs**, as ordinary training steps (so the
  :class:`~lightning_efficient.monitor.EfficiencyMonitor` counts its FLOPs and wall-clock: no hidden
  cost). The stacks first grow to the largest candidate depth, new blocks copied from the trained ones
  (:func:`~lightning_efficient.callbacks.progressive_stacking.grow_stacks`, from their moving average
  with ``init="momentum"``), which makes the supernet. The candidates are every ``(depth, side)`` of
  ``depths x image_sizes`` at least as large as the current one. For ``search_steps`` rounds, each
  candidate trains one step in turn (round robin, one-shot from the shared weights: a candidate of
  depth ``d`` runs the first ``d`` blocks). Each candidate's score is its mean training loss over the
  second half of the rounds (each loss averaged across DDP ranks, so every rank chooses alike).
- **The choice** is the candidate of least cost whose score is within ``tolerance`` (relative) of the
  largest candidate's; the cost is the analytic forward FLOPs of an image
  (:func:`candidate_cost`). The stage then trains it.
- **From ``s_K`` the full model trains at the full size** (AutoProg's last stage is the full network).

A short search favours the candidate the last stage trained: the others have just been grown or
interpolated. Give ``search_steps`` room (AutoProg searches for epochs) when the choice matters.

Which candidates were scored and chosen is logged (rank zero, INFO) and kept in :attr:`AutoProg.choices`
and in checkpoints; resume is exact anywhere, mid-search included.

Examples:
    >>> import lightning.pytorch as pl
    >>> from lightning_efficient import ImageClassificationDataModule, ViTClassifier
    >>> auto = AutoProg(stages=[0, 2, 8], image_sizes=[20, 28], depths=[2, 3], search_steps=1)
    >>> trainer = pl.Trainer(max_steps=9, limit_val_batches=0, logger=False, enable_progress_bar=False,
    ...                      enable_checkpointing=False, enable_model_summary=False, callbacks=[auto])
    >>> trainer.fit(ViTClassifier(num_labels=10, preset="tiny"), ImageClassificationDataModule(batch_size=8))
    >>> len(auto.choices[0]["candidates"]), (auto.depth, auto.side)  # 4 candidates searched at step 2; full at 8
    (4, (3, 28))
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_efficient.architectures import block_view
from lightning_efficient.blocks import (
    Priority,
    block_hidden_states,
    find_block_stacks,
    passthrough_output,
    wrap_forward,
)
from lightning_efficient.callbacks.progressive_resizing import (
    ImageResolution,
    interpolatable_embeddings,
    resolve_schedule,
    validate_starts,
)
from lightning_efficient.callbacks.progressive_stacking import INITS, RULES, BlockEMA, grow_stacks, growth_optimizer
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError
from lightning_efficient.technique import Technique, check_choice, check_range, check_unused_parameters_allowed

__all__ = ["AutoProg", "candidate_cost", "choose_candidate"]


def candidate_cost(depth: int, side: int, patch_size: int, hidden_size: int, ffn_size: int) -> float:
    """Forward FLOPs of one image through ``depth`` ViT blocks at ``side x side`` (projections, FFN, attention).

    With ``n = (side / patch_size)^2 + 1`` tokens (the class token included), hidden ``h`` and FFN
    width ``f``: ``depth * (2 n (4 h^2 + 2 h f) + 4 n^2 h)`` (the four attention projections and the two
    FFN layers, then the scores and their product with the values). The patch embedding and the
    head are the same for every depth and nearly so for every side, and are left out.

    Examples:
        >>> candidate_cost(depth=1, side=8, patch_size=4, hidden_size=2, ffn_size=4)  # n = 5
        520.0
    """
    tokens = (side // patch_size) ** 2 + 1
    return float(depth * (2 * tokens * (4 * hidden_size**2 + 2 * hidden_size * ffn_size) + 4 * tokens**2 * hidden_size))


def choose_candidate(scores: Sequence[float], costs: Sequence[float], largest: int, tolerance: float) -> int:
    """The index of the cheapest candidate whose score is within ``tolerance`` of candidate ``largest``'s.

    ``score <= largest's score * (1 + tolerance)`` (scores are losses: lower is better); ties in cost go
    to the lower score.

    Examples:
        >>> choose_candidate(scores=[2.3, 2.05, 2.0], costs=[1.0, 2.0, 4.0], largest=2, tolerance=0.05)
        1
    """
    bound = scores[largest] * (1.0 + tolerance)
    within = [i for i, score in enumerate(scores) if score <= bound]
    return min(within, key=lambda i: (costs[i], scores[i]))


def _increasing(name: str, values: Sequence[int]) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ConfigurationError(f"{name}={values!r} must be a non-empty list of integers")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ConfigurationError(f"{name}={list(values)} must hold integers >= 1")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ConfigurationError(f"{name}={list(values)} must increase")
    return list(values)


class AutoProg(Technique):
    """Progressive depth and resolution growth with a one-shot search at each stage (see the module docstring).

    Args:
        stages: Stage starts, optimizer steps (``int``) or fractions of the run (``float`` in
            ``[0, 1)``), beginning at 0: stage 0 trains the smallest candidate, each later start but
            the last runs a search, and the last start switches to the full model at the full size
            (AutoProg's four stages: ``[0, 0.25, 0.5, 0.75]``).
        image_sizes: Candidate image sides, increasing, multiples of the patch size, the last one the
            model's image size.
        depths: Candidate depths of every block stack, increasing, the last one the model's depth;
            None keeps the depth (only the resolution grows).
        search_steps: Rounds of each search: every candidate trains this many steps in it.
        tolerance: Relative loss tolerance of the choice (0.02: within 2% of the largest candidate's).
        init: How new blocks start: ``"momentum"`` (MoGrow: from the moving average of the block they
            copy) or ``"copy"`` (its current weights).
        ema_decay: Decay of the moving average with ``init="momentum"`` (AutoProg: 0.998-0.9996).
        rule: Where copies go when the depth grows: ``"stack"`` or ``"interleave"`` (as
            :class:`~lightning_efficient.callbacks.ProgressiveStacking`).

    Logged every training step: ``autoprog/depth``, ``autoprog/image_size``, ``autoprog/searching``.

    Attributes:
        choices: One entry per finished search: its step, candidates ``[depth, side]``, their scores and
            costs, and the chosen index.

    Raises:
        ConfigurationError: Bad arguments or no candidate to search (in ``__init__``); at ``setup``, a
            model the sides or depths do not fit; at the start of training, a stage too short for its
            search.
    """

    name = "autoprog"
    hooks = ("setup", "teardown", "on_train_start", "on_train_batch_start", "on_train_batch_end")
    conflicts_with = ("progressive_resizing", "progressive_stacking", "layer_drop")
    distributed_safe = True  # search losses are averaged across ranks: every rank chooses alike
    keep_after_fit = True  # validate / test / predict after fit see the depth that was trained
    compile_safe = True  # tests/test_compile.py: compiled training equals eager
    compile_note = "recompiles at each change of depth or image size"

    def __init__(
        self,
        stages: Sequence[int | float],
        image_sizes: Sequence[int],
        depths: Sequence[int] | None = None,
        search_steps: int = 4,
        tolerance: float = 0.02,
        init: str = "momentum",
        ema_decay: float = 0.999,
        rule: str = "stack",
    ) -> None:
        super().__init__()
        if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or len(stages) < 3:
            raise ConfigurationError(
                f"stages={stages!r} must list at least 3 starts: stage 0, one search, the full model "
                "(e.g. [0, 0.25, 0.5, 0.75])"
            )
        self.image_sizes = _increasing("image_sizes", image_sizes)
        self.depths = _increasing("depths", depths) if depths is not None else None
        if len(self.image_sizes) == 1 and (self.depths is None or len(self.depths) == 1):
            raise ConfigurationError(
                f"autoprog has no candidates: image_sizes={self.image_sizes} and depths={self.depths} leave one "
                "size; give at least two sides or two depths"
            )
        self.stages = validate_starts(stages, "stages")
        if isinstance(search_steps, bool) or not isinstance(search_steps, int) or search_steps < 1:
            raise ConfigurationError(f"search_steps={search_steps!r} must be an integer >= 1")
        self.search_steps = search_steps
        self.tolerance = check_range("tolerance", tolerance, low=0.0)
        self.init = check_choice("init", init, INITS)
        self.ema_decay = check_range(
            "ema_decay", ema_decay, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
        )
        self.rule = check_choice("rule", rule, RULES)
        self.resolution = ImageResolution(self.name, self.image_sizes)
        self.ema = BlockEMA(self.ema_decay) if self.init == "momentum" and self.depths is not None else None
        self._model_depth = 0
        self._index: int | None = None  # the candidate this step trains, during a search
        self.choices: list[dict[str, Any]] = []
        self._stacks: list[Sequence[nn.Module]] = []
        self._cost_shape: tuple[int, int, int] = (1, 1, 1)  # patch size, hidden size, FFN width
        self._reset_progress()

    def _reset_progress(self) -> None:
        self.depth = self.depths[0] if self.depths else 0  # 0: every block (the depth is not grown)
        self.side = self.image_sizes[0]
        self.stage = 0  # stages begun
        self.search: dict[str, Any] | None = None  # the running search: start, candidates, losses
        self.choices = []
        self._steps: list[int] | None = None
        self._step_at_batch_start: int | None = None

    # -- candidates -------------------------------------------------------------------------------
    def candidates(self) -> list[tuple[int, int]]:
        """``(depth, side)`` of every candidate at least as large as the current size, smallest first.

        Examples:
            >>> AutoProg(stages=[0, 10, 20], image_sizes=[16, 24, 28], depths=[2, 3]).candidates()
            [(2, 16), (2, 24), (2, 28), (3, 16), (3, 24), (3, 28)]
        """
        depths = [d for d in self.depths if d >= self.depth] if self.depths else [self.depth]
        return [(d, s) for d in depths for s in self.image_sizes if s >= self.side]

    # -- surgery ----------------------------------------------------------------------------------
    def apply(self, pl_module: nn.Module) -> list[Any]:
        stacks = find_block_stacks(pl_module)
        for stack in stacks if self.depths is not None else []:  # checked before any hook goes on
            if len(stack) != self.depths[-1]:
                relation = "is past" if self.depths[-1] > len(stack) else "stops short of"
                raise ConfigurationError(
                    f"{self.name}: the largest depth {self.depths[-1]} {relation} the {len(stack)} blocks of "
                    f"{stack.path}; make the last depth {len(stack)}"
                )
        handles = self.resolution.attach(pl_module)
        self._cost_shape = self._shape(pl_module)
        self._model_depth = len(stacks[0])
        if self.depths is None:
            return handles
        self._stacks = [stack.blocks for stack in stacks]
        if self.ema is not None:
            self.ema.reset(self._stacks, self.depth)
        return handles + [
            wrap_forward(block, functools.partial(self._forward, i, block), Priority.SKIP)
            for stack in stacks
            for i, block in enumerate(stack.blocks)
        ]

    def _shape(self, pl_module: nn.Module) -> tuple[int, int, int]:
        """Patch size, hidden size and FFN width of the model, for :func:`candidate_cost`."""
        embeddings = interpolatable_embeddings(pl_module)[0]
        patch = embeddings.patch_embeddings.patch_size
        patch = int(patch[0] if isinstance(patch, Sequence) else patch)
        hidden = int(embeddings.position_embeddings.shape[-1])
        blocks = find_block_stacks(pl_module)[0].blocks
        return patch, hidden, block_view(blocks[0]).ffn.width

    def _forward(self, index: int, block: nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.depth or index < self.depth:
            return forward(*args, **kwargs)
        return passthrough_output(block, block_hidden_states(args, kwargs))

    @property
    def grown(self) -> int:
        """Blocks per stack holding trained or grown weights: the largest candidate's during a search (0: all)."""
        return max(depth for depth, _ in self.search["candidates"]) if self.search else self.depth

    # -- Lightning hooks --------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.depths is not None:
            check_unused_parameters_allowed(trainer, self.name)
        if stage == "fit":
            self._reset_progress()  # a resumed run loads its progress after this
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._steps is None:  # a fresh run (a resumed one loaded its progress)
            if self.ema is not None:  # after every technique's surgery (ResidualInit adds parameters to blocks)
                self.ema.reset(self._stacks, self.depth)
            schedule = resolve_schedule(
                [(start, i) for i, start in enumerate(self.stages)], trainer.estimated_stepping_batches
            )
            self._steps = [step for step, _ in schedule]
        longest = (len(self.depths) if self.depths else 1) * len(self.image_sizes)  # the first search's candidates
        for start, end in zip(self._steps[1:-1], self._steps[2:]):
            if end - start <= longest * self.search_steps:
                raise ConfigurationError(
                    f"{self.name}: the stage from step {start} to {end} is shorter than its search of up to "
                    f"{longest} candidates x search_steps={self.search_steps} (+1 step to train the choice); "
                    "lengthen the stage or lower search_steps"
                )
        self.resolution.set_side(pl_module, self.side)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._step_at_batch_start = step
        if self.stage < len(self._steps) and step >= self._steps[self.stage]:
            if self.stage == len(self._steps) - 1:  # the last stage: the full model
                self.search = None
                if self.depths is not None:
                    self._grow(trainer, self.depths[-1])
                    self.depth = self.depths[-1]
                self.side = self.image_sizes[-1]
            elif self.stage > 0:
                self._start_search(trainer, step)
            self.stage += 1
        self._index = None
        if self.search is not None:
            done = step - self.search["start"]
            candidates = self.search["candidates"]
            if done < len(candidates) * self.search_steps:
                self._index = done % len(candidates)
                self.depth, self.side = candidates[self._index]
            else:
                self._finish_search(trainer, step)
        self.resolution.set_side(pl_module, self.side)
        metrics = {"depth": float(self.depth or self._model_depth), "image_size": float(self.side)}
        self.log_metrics(pl_module, {**metrics, "searching": float(self.search is not None)})

    def _grow(self, trainer: pl.Trainer, new_depth: int) -> None:
        """Grow every stack from the current depth to ``new_depth`` blocks (MoGrow with ``init="momentum"``).

        Blocks past the current depth (a larger candidate's, trained only in the last search) are
        copied again from the trained ones.
        """
        grow_stacks(self._stacks, self.depth, new_depth, self.rule, growth_optimizer(trainer, self.name), self.ema)

    def _start_search(self, trainer: pl.Trainer, step: int) -> None:
        candidates = self.candidates()
        if self.depths is not None:
            self._grow(trainer, max(depth for depth, _ in candidates))
        self.search = {"start": step, "candidates": [list(c) for c in candidates], "losses": [[] for _ in candidates]}

    def _finish_search(self, trainer: pl.Trainer, step: int) -> None:
        search, self.search = self.search, None
        keep = self.search_steps // 2  # the second half of the rounds
        scores = [sum(losses[keep:]) / len(losses[keep:]) for losses in search["losses"]]
        costs = [
            candidate_cost(depth or self._model_depth, side, *self._cost_shape) for depth, side in search["candidates"]
        ]
        largest = max(range(len(costs)), key=costs.__getitem__)
        chosen = choose_candidate(scores, costs, largest, self.tolerance)
        self.depth, self.side = search["candidates"][chosen]
        self.choices.append(
            {"step": step, "candidates": search["candidates"], "scores": scores, "costs": costs, "chosen": chosen}
        )
        table = ", ".join(
            f"{d or 'all'} blocks x {s} px: {score:.4f}" for (d, s), score in zip(search["candidates"], scores)
        )
        rank_zero_info(
            f"{self.name}: at step {step} chose {self.depth or 'all'} blocks x {self.side} px (losses: {table})"
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.search is not None and self._index is not None:  # the mean over ranks: every rank chooses alike
            loss = trainer.strategy.reduce(outputs["loss"].detach().float(), reduce_op="mean")
            self.search["losses"][self._index].append(float(loss))
        # once per optimizer step: a batch that only accumulated gradients left global_step where it was
        growing = self.stage < len(self._steps)  # the average is read only by a growth still to come
        if self.ema is not None and growing and self._step_at_batch_start not in (None, trainer.global_step):
            self.ema.update(self._stacks, self.depth)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._steps is not None and self.stage < len(self._steps):
            rank_zero_warn(
                f"{self.name}: fit ended at step {trainer.global_step}, before the full model's stage (step "
                f"{self._steps[-1]}): the model trained at depth {self.depth or 'all'}, side {self.side}"
            )
        super().teardown(trainer, pl_module, stage)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "stage_steps": self._steps,
            "depth": self.depth,
            "side": self.side,
            "stage": self.stage,
            "search": self.search,
            "choices": self.choices,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if ("ema" in state_dict) != (self.ema is not None):
            saved = "momentum" if "ema" in state_dict else "copy"
            raise CheckpointMismatchError(
                f"{self.name}: the checkpoint was trained with init={saved!r}, this run has init={self.init!r}"
            )
        self._steps = state_dict["stage_steps"]
        self.depth, self.side = int(state_dict["depth"]), int(state_dict["side"])
        self.stage = int(state_dict["stage"])
        self.search = state_dict["search"]
        self.choices = list(state_dict["choices"])
        if self.ema is not None:
            self.ema.load_state_dict(state_dict["ema"])
