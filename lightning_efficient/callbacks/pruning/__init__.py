"""MagnitudePruning: gradual magnitude pruning, unstructured or of whole heads and FFN neurons, exact across resume.

The sparsity follows the cubic schedule of Zhu & Gupta (2017): pruning events happen at optimizer
steps ``t = t0, t0 + dt, ..., t0 + n dt`` (``start_step``, every ``frequency`` steps, and always at
``end_step = t0 + n dt``), and the event at step ``t`` raises the sparsity to

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt)) ** 3

(``s_i = initial_sparsity``, ``s_f = final_sparsity``); ``start_step == end_step`` is one-shot
pruning. An event at step ``t`` runs before the optimizer step ``t + 1``, on the weights after
``t`` steps. Weights are ranked by magnitude within each layer (``scope="per_layer"``) or across
all target layers (``"global"``); a pruned weight is never revived.

``structure`` chooses what is pruned: single weights (``"unstructured"``) or whole attention heads
and FFN neurons (``"heads"``, ``"neurons"``, ``"heads_and_neurons"``: ``final_sparsity`` is then the
share of heads and/or neurons). A head is ranked by the L2 norm of its query, key and value rows
and its columns of the attention output projection; an FFN neuron by the norm of its row of the
first FFN layer and its column of the second. No layer ever loses all its heads. Where a block
keeps its heads and neurons comes from its entry in :mod:`lightning_efficient.architectures`, so a
block class of your own, described once with
:func:`~lightning_efficient.architectures.register_architecture`, is pruned (and exported) like
the built-in ones; an attention with a fused Q/K/V parameter (``nn.TransformerEncoderLayer``)
cannot lose heads. Which modules or blocks are pruned is chosen by
:mod:`lightning_efficient.targets` (``include``/``exclude`` patterns, ``module_types``).

Masks are buffers (``weight_mask``, and ``bias_mask`` for rows of structured pruning) registered
on the pruned ``nn.Linear`` modules when the callback is set up (before Lightning loads a
checkpoint), so a checkpoint holds and reloads them. Weights are multiplied by their masks after
every optimizer step (``on_train_batch_end``, which Lightning runs before ``ModelCheckpoint``
saves) and gradients before it (``on_before_optimizer_step``, before clipping), with one foreach
multiply each: pruned weights stay exactly zero, right after a resume too, and they neither move
the optimizer's moments nor count in the gradient norm. Masks do not skip any computation, so
training FLOPs (and the :class:`~lightning_efficient.monitor.EfficiencyMonitor`'s count) do not
drop; :func:`export_pruned` makes the pruning permanent and, for structured pruning, slices the Linear
layers so the blocks become smaller dense modules, which run (and are counted) with fewer FLOPs.

Optional lottery-ticket rewinding (Frankle et al. 2019): with ``rewind_step=k``, the target
weights of step ``k`` are kept in the callback's state, and at the final pruning event
(``end_step``) the surviving weights are reset to them; training then continues from the rewound,
masked weights (the optimizer's moments and the LR schedule are not rewound).

The package, by job: :mod:`~lightning_efficient.callbacks.pruning.schedule` (when, how much),
:mod:`~lightning_efficient.callbacks.pruning.masks` (mask buffers, magnitude ranking),
:mod:`~lightning_efficient.callbacks.pruning.structured` (heads and neurons),
:mod:`~lightning_efficient.callbacks.pruning.exporting` (slicing, saving, loading) and
:mod:`~lightning_efficient.callbacks.pruning.callback` (the technique).

Examples:
    >>> import lightning.pytorch as pl
    >>> from lightning_efficient import BertMLM, MLMDataModule
    >>> dm = MLMDataModule(vocab_size=2000, max_length=32, batch_size=8)
    >>> pruning = MagnitudePruning(final_sparsity=0.5, start_step=1, end_step=3, frequency=1)
    >>> trainer = pl.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_progress_bar=False,
    ...                      enable_checkpointing=False, enable_model_summary=False, callbacks=[pruning])
    >>> model = BertMLM(vocab_size=dm.vocab_size, preset="tiny")
    >>> trainer.fit(model, dm)
    >>> round(pruning.sparsity, 3)  # share of zero weights in the Linear layers of the blocks
    0.5
"""

from lightning_efficient.callbacks.pruning.callback import STRUCTURES, MagnitudePruning
from lightning_efficient.callbacks.pruning.exporting import export, export_pruned, load_pruned
from lightning_efficient.callbacks.pruning.masks import (
    SCOPES,
    add_masks,
    apply_masks,
    magnitude_masks,
    mask_gradients,
    masked_modules,
    remove_masks,
)
from lightning_efficient.callbacks.pruning.schedule import cubic_sparsity, pruning_steps
from lightning_efficient.callbacks.pruning.structured import (
    AttentionUnit,
    BlockUnits,
    FeedForwardUnit,
    block_units,
    head_scores,
    neuron_scores,
    structured_masks,
)

__all__ = [
    "SCOPES",
    "STRUCTURES",
    "AttentionUnit",
    "BlockUnits",
    "FeedForwardUnit",
    "MagnitudePruning",
    "add_masks",
    "apply_masks",
    "block_units",
    "cubic_sparsity",
    "export",
    "export_pruned",
    "head_scores",
    "load_pruned",
    "magnitude_masks",
    "mask_gradients",
    "masked_modules",
    "neuron_scores",
    "pruning_steps",
    "remove_masks",
    "structured_masks",
]
