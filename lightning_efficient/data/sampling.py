"""A sampler and a training loader that resume mid-epoch exactly, without the global RNG.

Lightning stores ``state_dict()`` of every training loader that has one in the checkpoint and
calls ``load_state_dict()`` on the new loader when ``fit(ckpt_path=...)`` resumes. A plain
``DataLoader(shuffle=True)`` has none, so a mid-epoch resume replays the epoch from its start;
and each ``iter()`` of a DataLoader without a ``generator`` draws a seed from the *global* torch
RNG, which shifts dropout after a resume. :class:`ResumableDataLoader` over a
:class:`ResumableSampler` fixes both.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from lightning_efficient.errors import ConfigurationError

__all__ = ["DataParallelSampler", "ResumableDataLoader", "ResumableSampler"]


def _world_and_rank(world_size: int | None, rank: int | None) -> tuple[int, int]:
    """``world_size`` and ``rank`` as given, else those of the initialized process group, else ``(1, 0)``."""
    distributed = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if distributed else 1
    if rank is None:
        rank = dist.get_rank() if distributed else 0
    return world_size, rank


class ResumableSampler(DistributedSampler):
    """This process's share of a permutation fixed by ``(seed, epoch)``; it can start mid-epoch.

    A :class:`~torch.utils.data.distributed.DistributedSampler` (so Lightning keeps it under DDP
    instead of inserting its own): the permutation comes from a generator seeded with
    ``seed + epoch``, never from the global RNG; it is padded with repeats (or, with
    ``drop_last``, cut) to a multiple of ``num_replicas`` and dealt out rank by rank.
    ``num_replicas`` and ``rank`` default to those of ``torch.distributed`` when it is
    initialised, else to a single process. :meth:`set_start` makes the *next* iteration begin
    part-way through this process's share; ``len()`` stays the whole share.

    Args:
        dataset: A sized dataset.
        num_replicas: Processes that share the data; default: the world size, or 1.
        rank: This process's index among them; default: the global rank, or 0.
        shuffle: Permute the indices (``False``: in order).
        seed: Seed of the permutation (epoch ``e`` uses ``seed + e``).
        drop_last: Drop the tail that does not divide evenly among the processes, instead of
            padding it with repeated indices.

    Examples:
        >>> sampler = ResumableSampler(range(6), seed=0)
        >>> sampler.set_epoch(1)
        >>> order = list(sampler)
        >>> sorted(order)
        [0, 1, 2, 3, 4, 5]
        >>> sampler.set_start(4)
        >>> list(sampler) == order[4:], list(sampler) == order  # the start applies once
        (True, True)
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        num_replicas, rank = _world_and_rank(num_replicas, rank)
        if num_replicas < 1:
            raise ConfigurationError(f"num_replicas={num_replicas} must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ConfigurationError(f"rank={rank} must lie in [0, {num_replicas - 1}] (num_replicas={num_replicas})")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Begin the next iteration at position ``start`` of this process's share (0 = whole)."""
        if not 0 <= start <= self.num_samples:
            raise ConfigurationError(f"start={start} must lie in [0, {self.num_samples}] (this rank's share)")
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class DataParallelSampler(ResumableSampler):
    """A :class:`ResumableSampler` sharded over the data-parallel ranks only (tensor parallelism).

    Under tensor parallelism the ``tensor_parallel_size`` ranks of one data-parallel group hold
    shards of one model replica, so they must see the *same* batch; the data is split only among
    the ``world_size / tensor_parallel_size`` groups. Ranks are laid out as Lightning's device mesh
    ``(data_parallel, tensor_parallel)``: global rank ``r`` is in data-parallel group
    ``r // tensor_parallel_size``. Everything else (seeded permutation, mid-epoch resume) is
    :class:`ResumableSampler`'s.

    Args:
        dataset: A sized dataset.
        tensor_parallel_size: Ranks that share one batch (must divide ``world_size``).
        world_size: All processes; default: that of ``torch.distributed``, or 1.
        rank: This process's global rank; default: that of ``torch.distributed``, or 0.
        shuffle: Permute the indices.
        seed: Seed of the permutation (epoch ``e`` uses ``seed + e``).
        drop_last: Drop the tail that does not divide among the data-parallel groups.

    Examples:
        >>> shards = [list(DataParallelSampler(range(8), tensor_parallel_size=2, world_size=4, rank=r)) for r in range(4)]
        >>> shards[0] == shards[1], shards[2] == shards[3], sorted(shards[0] + shards[2])
        (True, True, [0, 1, 2, 3, 4, 5, 6, 7])
    """

    def __init__(
        self,
        dataset: Sized,
        tensor_parallel_size: int = 1,
        world_size: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        world_size, rank = _world_and_rank(world_size, rank)
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1 or world_size % tensor_parallel_size:
            raise ConfigurationError(
                f"tensor_parallel_size={tensor_parallel_size!r} must be a positive integer that divides world_size={world_size}"
            )
        if not 0 <= rank < world_size:
            raise ConfigurationError(f"rank={rank} must lie in [0, {world_size - 1}] (world_size={world_size})")
        self.tensor_parallel_size = tensor_parallel_size
        super().__init__(
            dataset,
            num_replicas=world_size // tensor_parallel_size,
            rank=rank // tensor_parallel_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )

    @classmethod
    def from_mesh(cls, dataset: Sized, device_mesh: Any, **kwargs: Any) -> DataParallelSampler:
        """The sampler for this rank of a Lightning device mesh (``trainer.strategy.device_mesh``)."""
        tp = device_mesh["tensor_parallel"].size()
        dp_mesh = device_mesh["data_parallel"]
        return cls(
            dataset,
            tensor_parallel_size=tp,
            world_size=dp_mesh.size() * tp,
            rank=dp_mesh.get_local_rank() * tp + device_mesh["tensor_parallel"].get_local_rank(),
            **kwargs,
        )


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position within the epoch Lightning checkpoints and restores.

    Give it a :class:`ResumableSampler` (and no ``shuffle``/``batch_sampler``).
    :meth:`state_dict` is ``{"epoch", "seed", "batches"}``: ``batches`` counts the batches this
    epoch's iteration has handed out, counted in the main process as they are consumed (batches
    that workers prefetched are not counted), and back to 0 once an iteration runs to its end.
    After :meth:`load_state_dict`, the next iteration over that same epoch yields only the
    batches after ``batches``; if Lightning has moved the sampler to another epoch by then (the
    checkpoint was taken at an epoch's end), it starts that epoch from its beginning.

    An iteration starts on its first ``next()``, not on ``iter()``: Lightning calls ``iter()``
    before ``set_epoch`` when it resumes. Each iteration reseeds ``generator`` (created when not
    given) with ``seed + epoch``, so ``iter()`` never draws from the global RNG and the worker
    seeds of an epoch do not depend on how many iterations came before. Random operations inside
    workers are seeded, but do not continue exactly after a resume (workers restart).

    Examples:
        >>> sampler = ResumableSampler(range(10), seed=0)
        >>> loader = ResumableDataLoader(range(10), batch_size=3, sampler=sampler)
        >>> run = iter(loader)
        >>> first = next(run)
        >>> state = loader.state_dict()
        >>> state
        {'epoch': 0, 'seed': 0, 'batches': 1}
        >>> resumed = ResumableDataLoader(range(10), batch_size=3, sampler=ResumableSampler(range(10)))
        >>> resumed.load_state_dict(state)
        >>> [b.tolist() for b in resumed] == [b.tolist() for b in run]
        True
    """

    def __init__(self, dataset: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        if self.generator is None:
            self.generator = torch.Generator()
        self._epoch = 0  # epoch of the current iteration, or of the loaded state
        self._batches = 0  # batches of that epoch handed out so far
        self._resume = False  # a loaded position waits for the next iteration

    def state_dict(self) -> dict[str, int]:
        """The position in the epoch: plain ints, loadable with ``torch.load(weights_only=True)``."""
        epoch = self._epoch if self._batches else getattr(self.sampler, "epoch", 0)
        return {"epoch": epoch, "seed": getattr(self.sampler, "seed", 0), "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue the saved epoch after the batches it had handed out (the saved seed wins)."""
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if not isinstance(self.sampler, ResumableSampler):
            if batches:
                warnings.warn(
                    f"{type(self).__name__}: its sampler is a {type(self.sampler).__name__}, not a "
                    f"ResumableSampler; the epoch restarts from its first batch instead of batch {batches}",
                    stacklevel=2,
                )
            return
        self.sampler.seed = int(state_dict["seed"])
        self.sampler.set_epoch(epoch)
        self._epoch, self._batches, self._resume = epoch, batches, True

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()  # a generator: nothing runs before the first next()

    def _iterate(self) -> Iterator[Any]:
        epoch = getattr(self.sampler, "epoch", 0)
        start = self._batches if self._resume and epoch == self._epoch else 0
        self._epoch, self._batches, self._resume = epoch, start, False
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.set_start(min(start * (self.batch_size or 1), self.sampler.num_samples))
        self.generator.manual_seed(getattr(self.sampler, "seed", 0) + epoch)
        for batch in super().__iter__():
            self._batches += 1
            yield batch
        self._batches = 0
