"""Masked-LM blocks streamed from a corpus larger than the disk cache, resumable exactly mid-stream.

:class:`PackedStream` reads texts from ``datasets`` ``IterableDataset`` sources (each
data-parallel process its own share, by ``split_dataset_by_node``), packs their tokens into
``[CLS] ... [SEP]`` blocks on the fly and shuffles the blocks in a buffer. ``datasets``' own
shuffle buffer is lost when a stream resumes; this one is part of the stream's position, with
the sources' ``state_dict``, the tokens that wait for the next block and the shuffle generator,
so a run resumed from a checkpoint sees the same blocks as one that was never stopped.
:class:`StreamingDataLoader` puts that position in Lightning's checkpoints (every process's).

The stream repeats without end (each pass over the sources continues the same shuffle), so a
run's length is ``trainer.max_steps`` and validation is counted in steps (:func:`check_streaming_trainer`).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

import datasets
import torch
import torch.distributed as dist
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, IterableDataset

from lightning_efficient.data.sampling import _world_and_rank
from lightning_efficient.errors import ConfigurationError, DataError

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_efficient.data.text import PackBlocks

__all__ = [
    "STREAM_TOKENIZER_TEXTS",
    "PackedStream",
    "StreamingDataLoader",
    "check_streaming",
    "check_streaming_trainer",
    "stream_sample",
]

#: Texts from the start of a stream that a new tokenizer is trained on when streaming.
STREAM_TOKENIZER_TEXTS = 50_000
#: Texts read and tokenized at a time.
_TEXTS_PER_READ = 64


def check_streaming(
    datamodule: object, val_files: list[str] | None, val_fraction: float, test_fraction: float, num_workers: int
) -> None:
    """Fail, before anything is read, on settings that a stream of unknown length cannot honour.

    Raises:
        ConfigurationError: Held-out fractions (they need the corpus length) or DataLoader workers
            (the position in the stream must be read in the training process to be checkpointed).
    """
    name = type(datamodule).__name__
    if not val_files and val_fraction > 0:
        raise ConfigurationError(
            f"{name}(streaming=True) cannot hold out val_fraction={val_fraction} of a corpus it reads as it goes "
            "(its length is unknown): give val_files, or set val_fraction: 0 for no validation"
        )
    if test_fraction > 0:
        raise ConfigurationError(
            f"{name}(streaming=True) cannot hold out test_fraction={test_fraction} of a corpus it reads as it goes "
            "(its length is unknown): set test_fraction: 0"
        )
    if num_workers:
        raise ConfigurationError(
            f"{name}(streaming=True) reads in the training process so that checkpoints hold its exact position; "
            f"num_workers={num_workers} must be 0"
        )


def check_streaming_trainer(trainer: pl.Trainer | None) -> None:
    """Fail unless ``trainer`` can run on an endless stream: ``max_steps`` set, validation counted in steps.

    Raises:
        ConfigurationError: ``max_steps`` is unset, or ``val_check_interval`` is a fraction of an epoch.
    """
    if trainer is None:
        return
    if trainer.max_steps is None or trainer.max_steps < 0:
        raise ConfigurationError(
            "streaming=True repeats the corpus without end (its length is unknown), so the run's length and the "
            "learning-rate schedule come from trainer.max_steps; set it (e.g. max_steps: 10000)"
        )
    interval = trainer.val_check_interval
    if isinstance(interval, float) and trainer.limit_val_batches != 0:
        raise ConfigurationError(
            f"streaming=True has no epochs, so trainer.val_check_interval={interval} (a fraction of one) would never "
            "validate; give it in steps (e.g. val_check_interval: 500), or limit_val_batches: 0"
        )


def stream_sample(sources: Sequence[datasets.IterableDataset], column: str, count: int) -> list[str]:
    """The first ``count`` texts of ``sources``, in order (what a tokenizer trains on when streaming)."""
    texts: list[str] = []
    for source in sources:
        texts.extend(str(row[column]) for row in islice(source, count - len(texts)))
        if len(texts) >= count:
            break
    return texts


class PackedStream(IterableDataset):
    """Endless ``[CLS] ... [SEP]`` blocks from streamed texts, shuffled in a buffer, resumable exactly.

    Texts are read :data:`_TEXTS_PER_READ` at a time, tokenized, appended to the tokens left
    over from before and cut into blocks (:class:`~lightning_efficient.data.text.PackBlocks`
    does the cutting); the blocks join a buffer, and while it holds ``buffer_size`` blocks one
    drawn at random (a seeded generator) is yielded. At the end of the sources the next pass
    begins. :meth:`position` is everything that decides the blocks still to come.

    Args:
        sources: ``IterableDataset`` s with ``column``, read one after another.
        column: The text column.
        packer: Tokenizer and block layout.
        buffer_size: Blocks in the shuffle buffer.
        seed: Seed of the shuffle.
        rank: This process's index among the data-parallel processes.
        world_size: Data-parallel processes; each reads a disjoint share of every source.
    """

    def __init__(
        self,
        sources: Sequence[datasets.IterableDataset],
        column: str,
        packer: PackBlocks,
        buffer_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.sources = [split_dataset_by_node(s, rank, world_size) if world_size > 1 else s for s in sources]
        self._fresh_states = [source.state_dict() for source in self.sources]
        self.column = column
        self.packer = packer
        self.buffer_size = buffer_size
        self.seed = seed
        self._current = self._start_position()
        self._resume: dict[str, Any] | None = None

    def _start_position(self) -> dict[str, Any]:
        rng = torch.Generator().manual_seed(self.seed)
        return {
            "pass": 0, "source": 0, "source_state": None, "carry": [], "pending": [], "buffer": [],
            "rng": rng.get_state(),
        }  # fmt: skip

    def position(self) -> dict[str, Any]:
        """Where the stream stands: after the last block it yielded, or where a loaded position resumes it."""
        return self._resume if self._resume is not None else self._current

    def upcoming(self) -> dict[str, Any]:
        """Where the next iteration starts: a loaded position, else the stream's beginning."""
        return self._resume if self._resume is not None else self._start_position()

    @staticmethod
    def encode(position: dict[str, Any]) -> dict[str, Any]:
        """``position`` as plain containers and tensors (loadable with ``torch.load(weights_only=True)``)."""

        def blocks(rows: list[list[int]]) -> torch.Tensor:
            return torch.tensor(rows, dtype=torch.int32) if rows else torch.zeros(0, dtype=torch.int32)

        return {
            **position,
            "carry": torch.tensor(position["carry"], dtype=torch.int64),
            "pending": blocks(position["pending"]),
            "buffer": blocks(position["buffer"]),
        }

    @staticmethod
    def decode(encoded: dict[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`encode`."""
        return {**encoded, **{key: encoded[key].tolist() for key in ("carry", "pending", "buffer")}}

    def resume_from(self, position: dict[str, Any]) -> None:
        """Make the next iteration continue from ``position`` (from :meth:`position`)."""
        self._resume = position

    def __iter__(self) -> Iterator[list[int]]:
        return self._blocks()

    def _blocks(self) -> Iterator[list[int]]:
        start, self._resume = (self._resume or self._start_position()), None
        rng = torch.Generator()
        rng.set_state(start["rng"])
        buffer, pending, carry = list(start["buffer"]), collections.deque(start["pending"]), list(start["carry"])
        pass_index, source_index, source_state = start["pass"], start["source"], start["source_state"]
        tokens_this_pass = 0  # tokens read in this pass: none in a whole pass means an empty corpus
        whole_pass = source_index == 0 and source_state is None  # (a resumed pass may start at its very end)
        while True:
            source = self.sources[source_index]
            source.load_state_dict(source_state if source_state is not None else self._fresh_states[source_index])
            texts = iter(source)
            while True:
                while pending:  # one block at a time into the buffer; when it is full, one drawn at random out
                    buffer.append(pending.popleft())
                    if len(buffer) < self.buffer_size:
                        continue
                    pick = int(torch.randint(len(buffer), (1,), generator=rng))
                    buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
                    block = buffer.pop()
                    self._current = {
                        "pass": pass_index, "source": source_index, "source_state": source_state,
                        "carry": carry, "pending": list(pending), "buffer": list(buffer), "rng": rng.get_state(),
                    }  # fmt: skip
                    yield block
                batch = [row[self.column] for row in islice(texts, _TEXTS_PER_READ)]
                if not batch:
                    break
                source_state = source.state_dict()
                new_ids = self.packer.ids(batch)
                tokens_this_pass += len(new_ids)
                blocks, carry = self.packer.cut(carry + new_ids)  # a new carry list: saved positions share the old
                pending.extend(blocks)
            source_index, source_state = source_index + 1, None
            if source_index == len(self.sources):
                if whole_pass and tokens_this_pass == 0:
                    raise DataError("the streamed corpus holds no text for this process: nothing to train on")
                source_index, pass_index, tokens_this_pass, whole_pass = 0, pass_index + 1, 0, True


class StreamingDataLoader(DataLoader):
    """A DataLoader over a :class:`PackedStream` whose position Lightning checkpoints and restores.

    Lightning's training loop fetches one batch ahead of a loader without a length; with
    ``trainer_prefetch`` the saved position is the one before that batch, so a resumed run
    starts with the batch the stopped run had fetched but not trained on. Under
    ``torch.distributed`` every process's position is gathered into the state (all processes
    save a checkpoint together), and each takes its own back.

    Args:
        stream: The stream.
        trainer_prefetch: A Lightning training loop iterates this loader (one batch ahead).
        **kwargs: ``DataLoader`` arguments (``batch_size``, ``collate_fn``).
    """

    def __init__(self, stream: PackedStream, trainer_prefetch: bool = False, **kwargs: Any) -> None:
        super().__init__(stream, **kwargs)
        self.stream = stream
        self.lag = 1 if trainer_prefetch else 0
        self._positions: collections.deque[dict[str, Any]] = collections.deque([stream.upcoming()], maxlen=1)

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        self._positions = collections.deque([self.stream.upcoming()], maxlen=self.lag + 1)
        for batch in super().__iter__():
            self._positions.append(self.stream.position())
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The stream's position after the batches trained on, for every process."""
        mine = PackedStream.encode(self._positions[0])
        world, _ = _world_and_rank(None, None)
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, mine)
            return {"ranks": gathered}
        return {"ranks": [mine]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue this process's stream where the checkpoint left it."""
        ranks = state_dict["ranks"]
        world, rank = _world_and_rank(None, None)
        if len(ranks) != world:
            raise DataError(
                f"this checkpoint's stream positions were saved by {len(ranks)} process(es), and {world} resume it; "
                "resume a streamed run with the same number of processes"
            )
        position = PackedStream.decode(ranks[rank])
        self.stream.resume_from(position)
        self._positions = collections.deque([position], maxlen=self.lag + 1)
