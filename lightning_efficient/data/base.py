"""What every DataModule of the package shares: a resolved tokenizer and loader construction.

A DataModule tells the LightningModule what the data implies (vocabulary size, label names,
image shape) through :meth:`TextDataModule.model_arguments`; the CLI fills those into the model's
arguments so a YAML file never repeats them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from lightning_efficient.data.files import split_indices
from lightning_efficient.data.sampling import ResumableDataLoader, ResumableSampler
from lightning_efficient.data.tokenizers import cached_tokenizer, check_special_tokens, load_tokenizer
from lightning_efficient.errors import ConfigurationError, DataError

__all__ = ["EfficientDataModule", "ListDataset", "TextDataModule"]


class ListDataset(Dataset):
    """A map-style dataset over an in-memory list of examples."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class EfficientDataModule(pl.LightningDataModule):
    """Base DataModule: batch size, workers and seed checks, and loader construction.

    Our DataModules do not call ``save_hyperparameters``: names such as ``vocab_size`` mean the
    *target* size here and the *actual* size in the model, and Lightning refuses to log two
    different values under one key. The CLI's saved ``config.yaml`` records every argument.
    """

    def __init__(self, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ConfigurationError(f"batch_size={batch_size} must be a positive integer")
        if num_workers < 0:
            raise ConfigurationError(f"num_workers={num_workers} must be >= 0")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed

    #: Drop the last, smaller training batch (MLM blocks: every batch the same shape).
    drop_last_train: bool = False
    #: The keys of :meth:`model_arguments`, known without reading any data.
    model_argument_names: tuple[str, ...] = ()

    def model_arguments(self) -> dict[str, Any]:
        """Arguments that the data decides for the model (e.g. ``vocab_size``, ``num_labels``)."""
        return {}

    def split_items(self, split: str) -> Sequence[Any]:
        """The examples of ``split`` (``train``, ``val``, ``test``) prepared by ``setup``."""
        return self.splits[split]

    def _collate(self, examples: list[Any]) -> Any:
        raise NotImplementedError

    def train_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.split_items("train"), self._collate, shuffle=True, drop_last=self.drop_last_train)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.split_items("val"), self._collate, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.split_items("test"), self._collate, shuffle=False)

    def _loader(self, items: Sequence[Any], collate: Callable, shuffle: bool, drop_last: bool = False) -> DataLoader:
        """A loader over ``items`` whose ``iter()`` never draws from the global RNG.

        ``shuffle=True`` (training) gives a :class:`ResumableDataLoader`: this process's share of
        a permutation fixed by ``(seed, epoch)``, resumed mid-epoch exactly from a checkpoint.
        Otherwise the items come in order (under DDP Lightning shards them, as usual).
        """
        dataset = items if isinstance(items, Dataset) else ListDataset(items)  # ArrowRows: a batch in one read
        options: dict[str, Any] = {
            "batch_size": self.batch_size,
            "drop_last": drop_last,
            "num_workers": self.num_workers,
            "collate_fn": collate,
            "persistent_workers": self.num_workers > 0,
            "generator": torch.Generator().manual_seed(self.seed),
        }
        if not shuffle:
            return DataLoader(dataset, **options)
        sampler = ResumableSampler(dataset, shuffle=True, seed=self.seed, **self._data_parallel_ranks())
        return ResumableDataLoader(dataset, sampler=sampler, **options)

    def check_train_batches(self, count: int, what: str) -> None:
        """Fail unless ``count`` training examples give every data-parallel process a batch.

        With :attr:`drop_last_train` a process whose share is smaller than ``batch_size`` gets an
        empty loader, and Lightning would skip training without an error.

        Args:
            count: Examples in the training split.
            what: What they are and where they come from, e.g. ``"blocks of 128 tokens from ['a.txt']"``.

        Raises:
            DataError: Too few examples for one batch.
        """
        replicas = self._data_parallel_ranks().get("num_replicas", 1)
        per_process = math.ceil(count / replicas)
        needed = self.batch_size if self.drop_last_train else 1
        if per_process < needed:
            processes = f" for each of {replicas} processes" if replicas > 1 else ""
            raise DataError(
                f"the training split holds {count} {what}, fewer than one batch of batch_size={self.batch_size}"
                f"{processes}; lower batch_size or give more data"
            )

    def _data_parallel_ranks(self) -> dict[str, int]:
        """``num_replicas`` and ``rank`` of the data-parallel group, from the Trainer's strategy.

        Empty without a Trainer or with a single-device strategy: the sampler then asks
        ``torch.distributed``. Under tensor parallelism only the data-parallel ranks split the data.
        """
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if not kwargs:
            return {}
        return {"num_replicas": kwargs["num_replicas"], "rank": kwargs["rank"]}


class TextDataModule(EfficientDataModule):
    """Base of the text DataModules: owns the tokenizer and the held-out splits.

    The tokenizer comes from ``tokenizer`` (a ``tokenizer.json`` or one of our checkpoints) or is
    trained on the training texts and cached. It is resolved on first use, so that a ``predict``
    run from a checkpoint never trains one. Validation data comes from ``val_files`` or is held out
    of the training rows with the test rows (:meth:`held_out_indices`).
    """

    tokenizer_kind: str = "wordpiece"
    special_tokens: Sequence[str] = ()
    model_argument_names = ("vocab_size",)

    def __init__(self, tokenizer: str | None, vocab_size: int, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if vocab_size <= len(self.special_tokens):
            raise ConfigurationError(
                f"vocab_size={vocab_size} must be larger than the {len(self.special_tokens)} special tokens"
            )
        self.tokenizer_source = tokenizer
        self.target_vocab_size = vocab_size
        self._tokenizer: Tokenizer | None = None

    def _keep_split_arguments(
        self,
        val_files: list[str] | None,
        val_fraction: float,
        test_fraction: float,
        predict_files: list[str] | None,
        max_length: int,
        min_length: int,
    ) -> None:
        """Check and keep the arguments that every text DataModule takes besides its columns."""
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 0.5:
                raise ConfigurationError(f"{name}={value} must lie in [0, 0.5)")
        if max_length < min_length:
            raise ConfigurationError(f"max_length={max_length} must be at least {min_length}")
        self.val_files = val_files
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.predict_files = predict_files
        self.max_length = max_length

    def held_out_indices(self, count: int, groups: Sequence[Any] | None = None) -> dict[str, list[int]]:
        """Split ``count`` training rows into ``train``, ``test`` and, without ``val_files``, ``val`` (seeded).

        ``val`` and ``test`` hold ``val_fraction`` and ``test_fraction`` of the rows (of whole groups
        when ``groups`` gives each row's group); with ``val_files`` the validation data is read from
        those instead, and only ``test`` is held out.
        """
        if self.val_files:
            train, test = split_indices(count, [self.test_fraction], self.seed, groups)
            return {"train": train, "test": test}
        train, val, test = split_indices(count, [self.val_fraction, self.test_fraction], self.seed, groups)
        return {"train": train, "val": val, "test": test}

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, cut to ``max_length`` with its last (end) token kept."""
        return [e.ids[: self.max_length - 1] + e.ids[-1:] for e in self.tokenizer.encode_batch(list(texts))]

    def prepare_data(self) -> None:
        """Train (or load) the tokenizer once per machine; Lightning calls this on local rank 0
        only, so under DDP the other ranks find it in the cache."""
        _ = self.tokenizer  # resolve: load, or train and cache

    def tokenizer_training_texts(self) -> list[str]:
        """The texts a new tokenizer is trained on (subclasses read their training files)."""
        raise NotImplementedError

    def check_tokenizer(self, tokenizer: Tokenizer, source: str) -> None:
        """Fail unless a given ``tokenizer`` suits this DataModule: here, :attr:`special_tokens` at ids ``0..n-1``.

        Raises:
            ConfigurationError: It does not (the message names ``source``).
        """
        check_special_tokens(tokenizer, self.special_tokens, source)

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer, loaded or trained (and cached) on first access."""
        if self._tokenizer is None:
            if self.tokenizer_source is not None:
                tokenizer = load_tokenizer(self.tokenizer_source)
                self.check_tokenizer(tokenizer, self.tokenizer_source)
            else:
                texts = self.tokenizer_training_texts()
                key = getattr(texts, "fingerprint", None)  # tables read from disk: hash their fingerprint
                tokenizer = cached_tokenizer(self.tokenizer_kind, texts, self.target_vocab_size, key=key)
            tokenizer.no_padding()
            tokenizer.no_truncation()
            self._tokenizer = tokenizer
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of tokens of the resolved tokenizer."""
        return self.tokenizer.get_vocab_size()

    def model_arguments(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size}
