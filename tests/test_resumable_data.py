"""Exact mid-epoch resume of our training loaders; no loader draws from the global torch RNG."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_efficient import BertMLM, ConfigurationError, MLMDataModule
from lightning_efficient.data.base import EfficientDataModule
from lightning_efficient.data.sampling import ResumableDataLoader, ResumableSampler
from lightning_efficient.testing import quiet_trainer


class IntData(EfficientDataModule):
    """The integers ``0..n-1`` for training; a batch is a tensor of them."""

    def __init__(
        self, n: int = 11, batch_size: int = 3, num_workers: int = 0, seed: int = 5, drop_last: bool = False
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.drop_last_train = drop_last
        self.splits = {"train": list(range(n)), "val": list(range(100, 104)), "test": list(range(200, 205))}

    def _collate(self, items: list[int]) -> torch.Tensor:
        return torch.tensor(items)


class WorkerSeedData(IntData):
    """Batches also carry the torch seed of the process that collated them."""

    def _collate(self, items: list[int]) -> tuple[torch.Tensor, int]:
        return torch.tensor(items), torch.initial_seed()


def as_lists(batches) -> list[list[int]]:
    return [batch.tolist() for batch in batches]


def epoch_order(seed: int, epoch: int, n: int = 11) -> list[int]:
    """The reference permutation: ``torch.randperm`` on a generator seeded with ``seed + epoch``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


# -- sampler --------------------------------------------------------------------------------------
def test_sampler_order_is_fixed_by_seed_and_epoch():
    def order(seed: int, epoch: int) -> list[int]:
        sampler = ResumableSampler(range(11), seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    rng = torch.get_rng_state()
    assert order(7, 2) == epoch_order(7, 2) == order(7, 2)
    assert order(7, 3) == epoch_order(7, 3) != epoch_order(7, 2)
    assert sorted(order(7, 3)) == list(range(11))
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator is never used


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_shards_of_two_ranks_deal_out_the_permutation(drop_last):
    order = epoch_order(3, 1)
    dealt = order[:10] if drop_last else order + order[:1]  # cut the tail, or pad with the first index
    shards = []
    for rank in (0, 1):
        sampler = ResumableSampler(range(11), num_replicas=2, rank=rank, seed=3, drop_last=drop_last)
        sampler.set_epoch(1)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1]) == (5 if drop_last else 6)
    assert shards == [dealt[0::2], dealt[1::2]]
    if drop_last:
        assert set(shards[0]).isdisjoint(shards[1])
    else:
        assert set(shards[0]) | set(shards[1]) == set(range(11))  # only the padding repeats an index


def test_sampler_starts_mid_share_once_and_defaults_to_one_process():
    sampler = ResumableSampler(range(11), num_replicas=2, rank=1, seed=3)
    share = list(sampler)
    sampler.set_start(4)
    assert list(sampler) == share[4:]
    assert list(sampler) == share and len(sampler) == 6
    alone = ResumableSampler(range(11))  # torch.distributed is not initialised here
    assert (alone.num_replicas, alone.rank, len(alone)) == (1, 0, 11)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_replicas=2, rank=2), r"rank=2 must lie in \[0, 1\]"),
        (dict(num_replicas=0, rank=0), r"num_replicas=0 must be >= 1"),
    ],
)
def test_sampler_bad_arguments(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        ResumableSampler(range(11), **kwargs)


def test_sampler_bad_start():
    with pytest.raises(ConfigurationError, match=r"start=7 must lie in \[0, 6\]"):
        ResumableSampler(range(11), num_replicas=2, rank=0).set_start(7)


# -- loader state ---------------------------------------------------------------------------------
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("k", [0, 2, 3])
def test_loader_resumes_after_k_batches(k, drop_last):
    full = as_lists(IntData(drop_last=drop_last).train_dataloader())
    assert [len(batch) for batch in full] == ([3, 3, 3] if drop_last else [3, 3, 3, 2])
    assert sorted(i for batch in full for i in batch) == sorted(epoch_order(5, 0)[: 9 if drop_last else 11])

    loader = IntData(drop_last=drop_last).train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    iterator = iter(loader)
    seen = [next(iterator).tolist() for _ in range(k)]
    state = loader.state_dict()
    assert state == {"epoch": 0, "seed": 5, "batches": k}

    resumed = IntData(drop_last=drop_last).train_dataloader()
    resumed.load_state_dict(state)
    assert len(resumed) == len(full)  # Lightning counts the epoch's batches from len()
    assert seen + as_lists(resumed) == full
    assert resumed.state_dict() == {"epoch": 0, "seed": 5, "batches": 0}  # the epoch ran to its end
    assert as_lists(resumed) == full  # and the next iteration is whole again


def test_loader_resumes_across_an_epoch_boundary():
    reference = IntData().train_dataloader()
    epochs = []
    for epoch in range(3):
        reference.sampler.set_epoch(epoch)
        epochs.append(as_lists(reference))
    assert epochs[0] != epochs[1] != epochs[2]

    loader = IntData().train_dataloader()
    assert as_lists(loader) == epochs[0]
    assert loader.state_dict() == {"epoch": 0, "seed": 5, "batches": 0}
    loader.sampler.set_epoch(1)
    iterator = iter(loader)
    seen = [next(iterator).tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state == {"epoch": 1, "seed": 5, "batches": 2}

    resumed = IntData().train_dataloader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # Lightning sets the epoch again after loading the state
    assert seen + as_lists(resumed) == epochs[1]
    resumed.sampler.set_epoch(2)
    assert as_lists(resumed) == epochs[2]


def test_loader_state_from_an_epoch_end_starts_the_next_epoch_whole():
    reference = IntData().train_dataloader()
    reference.sampler.set_epoch(2)
    epoch_2 = as_lists(reference)
    loader = IntData().train_dataloader()
    loader.sampler.set_epoch(1)
    iterator = iter(loader)
    for _ in range(len(loader)):  # Lightning takes len() batches and never asks for one more
        next(iterator)
    state = loader.state_dict()
    assert state == {"epoch": 1, "seed": 5, "batches": 4}
    resumed = IntData().train_dataloader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # ...and moves on to the next epoch
    assert as_lists(resumed) == epoch_2


def test_loader_state_loads_with_weights_only(tmp_path):
    loader = IntData().train_dataloader()
    loader.sampler.set_epoch(4)
    iterator = iter(loader)
    seen = [next(iterator).tolist() for _ in range(2)]
    torch.save({"loader": loader.state_dict()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)["loader"]
    assert state == {"epoch": 4, "seed": 5, "batches": 2}

    resumed = IntData(seed=9).train_dataloader()  # the checkpoint's seed wins
    resumed.load_state_dict(state)
    expected = [epoch_order(5, 4)[i : i + 3] for i in range(0, 11, 3)]
    assert seen + as_lists(resumed) == expected


def test_loader_with_a_worker_counts_consumed_batches():
    full = as_lists(IntData(n=23, batch_size=2).train_dataloader())
    data = WorkerSeedData(n=23, batch_size=2, num_workers=1)
    loader = data.train_dataloader()
    rng = torch.get_rng_state()
    iterator = iter(loader)
    first = [next(iterator) for _ in range(3)]  # the worker has prefetched more than these
    assert torch.equal(torch.get_rng_state(), rng)
    state = loader.state_dict()
    assert state == {"epoch": 0, "seed": 5, "batches": 3}
    # The worker's seed comes from the loader's generator, reseeded with seed + epoch.
    base_seed = torch.empty((), dtype=torch.int64).random_(generator=torch.Generator().manual_seed(5 + 0)).item()
    assert {seed for _, seed in first} == {base_seed}  # worker 0: base seed + 0

    resumed = WorkerSeedData(n=23, batch_size=2, num_workers=1).train_dataloader()
    resumed.load_state_dict(state)
    rest = [batch.tolist() for batch, _ in resumed]
    assert [batch.tolist() for batch, _ in first] + rest == full
    assert torch.equal(torch.get_rng_state(), rng)


def test_loaders_leave_the_global_rng_alone():
    data = IntData()
    rng = torch.get_rng_state()
    assert as_lists(data.val_dataloader()) == [[100, 101, 102], [103]]  # in order
    assert as_lists(data.test_dataloader()) == [[200, 201, 202], [203, 204]]
    as_lists(data.train_dataloader())
    assert torch.equal(torch.get_rng_state(), rng)
    list(DataLoader(range(4)))  # control: a DataLoader without a generator draws from it
    assert not torch.equal(torch.get_rng_state(), rng)


# -- with Lightning -------------------------------------------------------------------------------
class SaveAt(Callback):
    """Write a checkpoint after optimizer step ``step``, as a run killed right after it would have."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


class Recorder(Callback):
    """Per step: the batch (its items, or a hash of the input ids), the loss, the global RNG state."""

    def __init__(self) -> None:
        self.batches: list = []
        self.losses: list[float] = []
        self.rng_states: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if isinstance(batch, dict):
            self.batches.append(hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest())
        else:
            self.batches.append(batch.tolist())
        self.rng_states.append(torch.get_rng_state())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class Scale(pl.LightningModule):
    """One parameter: loss = w * sum(batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.w * batch.float()).sum()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val", batch.float().sum())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_and_resume(make_model, make_data, steps: int, save_at: int, path: Path, **trainer_kwargs):
    """An uninterrupted run that also writes a checkpoint at ``save_at``, and a run resumed from it."""
    whole = Recorder()
    trainer = quiet_trainer(max_steps=steps, callbacks=[whole, SaveAt(save_at, path)], **trainer_kwargs)
    trainer.fit(make_model(), make_data())
    resumed = Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(max_steps=steps, callbacks=[resumed], **trainer_kwargs)
        trainer.fit(make_model(), make_data(), ckpt_path=path)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert trainer.global_step == steps
    return whole, resumed


@pytest.mark.parametrize(
    "save_at, limit, position",
    [(6, 1.0, (1, 2)), (4, 1.0, (0, 4)), (5, 3, (1, 2))],
    ids=["mid-epoch", "epoch-end", "mid-epoch-limited"],
)
def test_lightning_resume_sees_the_batches_of_the_uninterrupted_run(tmp_path, save_at, limit, position):
    # 11 items in batches of 3: epochs of 4 batches (or 3 with limit_train_batches=3), validation after each.
    path = tmp_path / "mid.ckpt"
    whole, resumed = fit_and_resume(Scale, IntData, 10, save_at, path, limit_train_batches=limit, limit_val_batches=1)
    per_epoch = 4 if limit == 1.0 else 3
    saved = torch.load(path, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert saved == [{"epoch": position[0], "seed": 5, "batches": position[1]}]
    assert len(whole.batches) == 10 and whole.batches[0] != whole.batches[per_epoch]  # > 2 epochs, reshuffled
    assert resumed.batches == whole.batches[save_at:]
    assert resumed.losses == whole.losses[save_at:]
    # Nothing in training, validation or the epoch changes drew from the global generator.
    assert all(torch.equal(state, whole.rng_states[0]) for state in whole.rng_states)


def test_lightning_resume_of_tiny_bert_mlm(tmp_path, user_files):
    def data() -> MLMDataModule:
        return MLMDataModule(
            train_files=[user_files["txt"]], text_column="sentence", vocab_size=400, max_length=33, batch_size=8
        )

    probe = data()

    def model() -> BertMLM:
        return BertMLM(vocab_size=probe.vocab_size, preset="tiny", max_length=33, dropout=0.0)

    # Epochs of 3 batches: the checkpoint is one batch into the second epoch.
    path = tmp_path / "mlm.ckpt"
    whole, resumed = fit_and_resume(model, data, 7, 4, path, limit_train_batches=3, limit_val_batches=0)
    assert len(set(whole.batches)) == len(whole.batches)  # every step a different batch
    assert resumed.batches == whole.batches[4:]
    assert resumed.losses == whole.losses[4:]  # weights, optimizer, masking and data all continue
