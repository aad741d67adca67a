"""Log per-layer weight norms, update norms and trust ratios every N optimizer steps.

Large-batch optimizers (LAMB, LARS) work per layer: they rescale each tensor's update so that
``||update|| / ||weight||`` stays in a sane range. :class:`TrustRatioMonitor` shows that ratio for
*any* optimizer, from what actually happened to the weights: on a monitored step it copies the
watched tensors just before the optimizer step (``on_before_optimizer_step``) and compares after
it (``on_train_batch_end``), in fp32. Where the optimizer keeps its own trust ratio per parameter
(``state["trust_ratio"]``, as :class:`lightning_efficient.optim.LAMB` does), that is logged too.
On all other steps it does nothing.

Examples:
    >>> import lightning.pytorch as pl
    >>> from lightning.pytorch.demos.boring_classes import BoringModel  # one Linear(32, 2), SGD
    >>> monitor = TrustRatioMonitor(every_n_steps=2, include_1d=True)
    >>> trainer = pl.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_progress_bar=False,
    ...                      enable_checkpointing=False, enable_model_summary=False, callbacks=[monitor])
    >>> trainer.fit(BoringModel())
    >>> monitor.reports  # after optimizer steps 2 and 4
    2
    >>> sorted(monitor.latest)[:3]
    ['trust_ratio/layer.bias/ratio', 'trust_ratio/layer.bias/update_norm', 'trust_ratio/layer.bias/weight_norm']
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_efficient.blocks import find_block_stacks
from lightning_efficient.errors import check_patterns
from lightning_efficient.targets import match_names
from lightning_efficient.technique import Technique, check_choice, check_range

__all__ = ["AGGREGATIONS", "TrustRatioMonitor", "layer_norms"]

#: How tensors are reported: one row per parameter tensor, or one per Transformer block.
AGGREGATIONS = ("tensor", "block")


def layer_norms(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float]:
    """``(||before||, ||after - before||)`` in fp32: a tensor's weight norm and its update's norm.

    Examples:
        >>> layer_norms(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5]))
        (5.0, 0.5)
    """
    before, after = before.float(), after.float()
    return float(torch.linalg.vector_norm(before)), float(torch.linalg.vector_norm(after - before))


class TrustRatioMonitor(Technique):
    """Log ``||update|| / ||weight||`` per layer (and the optimizer's own trust ratio) every N steps.

    On every ``every_n_steps``-th optimizer step (the steps that bring ``trainer.global_step`` to a
    multiple of ``every_n_steps``) it logs, straight to ``trainer.loggers`` at that global step:

    - ``trust_ratio/<name>/weight_norm``: the fp32 norm of the tensor before the step;
    - ``trust_ratio/<name>/update_norm``: the norm of the change the step made to it;
    - ``trust_ratio/<name>/ratio``: ``update_norm / weight_norm`` (left out where the weight norm is
      0, e.g. a zero-initialised bias, where it is undefined);
    - ``trust_ratio/<name>/trust_ratio``: the optimizer's ``state["trust_ratio"]`` of the tensor,
      where it keeps one (LAMB); per block, the mean over the block's tensors;
    - ``trust_ratio/ratio_median`` and ``trust_ratio/ratio_max`` over the logged ratios.

    ``<name>`` is the parameter's name in the LightningModule, or with ``aggregate="block"`` the
    block's path (``model.bert.encoder.layer.0``; norms combined as the root of the sum of
    squares), tensors outside any block staying per tensor. The copy of the watched tensors is
    taken on monitored steps only, and :attr:`latest` keeps the last report's values.

    Args:
        every_n_steps: Report every this many optimizer steps (>= 1).
        params: ``fnmatch`` patterns of parameter names to watch among the candidates (default: all
            candidates). A pattern that matches no candidate is an error.
        include_1d: Also watch vectors (biases, LayerNorm weights: the no-decay tensors); by default
            only matrices (``ndim >= 2``) of trainable parameters are candidates.
        aggregate: ``"tensor"`` or ``"block"``.

    Examples:
        >>> TrustRatioMonitor(every_n_steps=0)
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: every_n_steps=0 must be >= 1
    """

    name = "trust_ratio"
    hooks = ("on_before_optimizer_step", "on_train_batch_end")
    distributed_safe = True
    compile_safe = True  # tests/test_compile.py: compiled training equals eager
    compile_note = "it reads weights and gradients after the backward, nothing in the forward"

    def __init__(
        self,
        every_n_steps: int = 50,
        params: Sequence[str] | None = None,
        include_1d: bool = False,
        aggregate: str = "tensor",
    ) -> None:
        super().__init__()
        self.every_n_steps = int(check_range("every_n_steps", every_n_steps, low=1))
        self.params = check_patterns("params", params or None)
        self.include_1d = include_1d
        self.aggregate = check_choice("aggregate", aggregate, AGGREGATIONS)
        self.reports = 0
        self.latest: dict[str, float] = {}
        self._names: list[str] = []
        self._labels: dict[str, str] = {}
        self._snapshot: dict[str, torch.Tensor] | None = None

    # -- which tensors ------------------------------------------------------------------------
    def apply(self, pl_module: nn.Module) -> None:
        """Resolve the watched parameter names (and their blocks); fail on a pattern that matches nothing."""
        candidates = [
            name for name, p in pl_module.named_parameters() if p.requires_grad and (p.ndim >= 2 or self.include_1d)
        ]
        what = "trainable matrix" if not self.include_1d else "trainable parameter"
        what += "" if self.include_1d else " (matrices only: include_1d=False)"
        names = match_names(candidates, self.params, what=what, owner=type(pl_module).__name__, option="params")
        self._names = names
        self._labels = {name: name for name in names}
        if self.aggregate == "block":
            blocks = [f"{stack.path}.{i}" for stack in find_block_stacks(pl_module) for i in range(len(stack))]
            for name in names:
                self._labels[name] = next((b for b in blocks if name.startswith(b + ".")), name)

    def remove(self, pl_module: nn.Module) -> None:
        """Drop the names and any pending copy (at teardown)."""
        super().remove(pl_module)
        self._names, self._labels, self._snapshot = [], {}, None

    # -- hooks --------------------------------------------------------------------------------
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """On a monitored step, copy the watched tensors (fp32) before the optimizer changes them."""
        if (trainer.global_step + 1) % self.every_n_steps or self._snapshot is not None:
            return
        params = dict(pl_module.named_parameters())
        self._snapshot = {name: params[name].detach().to(torch.float32, copy=True) for name in self._names}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After a monitored step, compare with the copy and log to the loggers."""
        if self._snapshot is None:
            return
        metrics = self.report(pl_module, trainer.optimizers)
        self._snapshot = None
        self.reports += 1
        self.latest = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def report(self, pl_module: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, float]:
        """The metrics of the pending copy against the module's current weights."""
        assert self._snapshot is not None
        params = dict(pl_module.named_parameters())
        weight_sq: dict[str, float] = {}
        update_sq: dict[str, float] = {}
        trust: dict[str, list[float]] = {}
        for name, before in self._snapshot.items():
            weight, update = layer_norms(before, params[name].detach())
            label = self._labels[name]
            weight_sq[label] = weight_sq.get(label, 0.0) + weight**2
            update_sq[label] = update_sq.get(label, 0.0) + update**2
            for optimizer in optimizers:
                stored = optimizer.state.get(params[name], {}).get("trust_ratio")
                if stored is not None:
                    trust.setdefault(label, []).append(float(stored))
        metrics: dict[str, float] = {}
        ratios = []
        for label, squares in weight_sq.items():
            weight, update = squares**0.5, update_sq[label] ** 0.5
            metrics[f"{self.name}/{label}/weight_norm"] = weight
            metrics[f"{self.name}/{label}/update_norm"] = update
            if weight > 0:
                ratios.append(update / weight)
                metrics[f"{self.name}/{label}/ratio"] = ratios[-1]
            if label in trust:
                metrics[f"{self.name}/{label}/trust_ratio"] = statistics.fmean(trust[label])
        if ratios:
            metrics[f"{self.name}/ratio_median"] = statistics.median(ratios)
            metrics[f"{self.name}/ratio_max"] = max(ratios)
        return metrics

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"reports": self.reports}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reports = state_dict["reports"]
