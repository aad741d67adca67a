"""LotteryTicket: the dense round keeps the weights of its rewind step; a round prunes, rewinds and trains masked."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_efficient import BertMLM, LastCheckpoint, MLMDataModule, RandomStates
from lightning_efficient.callbacks import LotteryTicket, PruneAtInit, export_pruned
from lightning_efficient.callbacks.lottery_ticket import round_sparsities
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.pipeline.spec import load_pipeline
from lightning_efficient.pipeline.stages import get_value, plan_stages
from lightning_efficient.testing import quiet_trainer

CONFIGS = Path(__file__).parents[1] / "configs"


@functools.cache
def data() -> MLMDataModule:
    """One DataModule for the file: its tokenizer is trained once (~4 s), the loaders are new in every fit."""
    return MLMDataModule(vocab_size=400, max_length=24, batch_size=4)


def model(seed: int = 0, **shape) -> BertMLM:
    pl.seed_everything(seed, verbose=False)
    return BertMLM(vocab_size=400, preset="tiny", max_length=24, warmup_fraction=0.0, **shape)


def fit(module: BertMLM, steps: int, technique: LotteryTicket, *callbacks: pl.Callback, **trainer) -> pl.Trainer:
    run = quiet_trainer(max_steps=steps, callbacks=[technique, *callbacks], limit_val_batches=0, **trainer)
    run.fit(module, data())
    return run


@pytest.fixture(scope="module")
def dense_ticket(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The dense round (4 steps, rewind_step 2) saved as a ticket; and the weights of step 2 of the same run without it."""
    path = tmp_path_factory.mktemp("dense") / "dense.ckpt"
    fit(model(), 4, LotteryTicket(rewind_step=2)).save_checkpoint(path)
    seen = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            if trainer.global_step == 2:
                seen.update({name: p.detach().clone() for name, p in pl_module.named_parameters()})

    quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[Watch()]).fit(model(), data())
    return path, seen


def test_round_sparsities_prune_the_same_share_of_what_is_left_each_round():
    sparsities = round_sparsities(0.8, 3)
    assert sparsities[-1] == 0.8
    densities = [1.0, *(1 - s for s in sparsities)]
    shares = [after / before for before, after in itertools.pairwise(densities)]
    assert shares == pytest.approx([0.2 ** (1 / 3)] * 3, abs=1e-4)  # (1 - 0.8)^(1/3) of the weights survive a round


def test_the_dense_round_keeps_every_weight_of_its_rewind_step(dense_ticket):
    path, at_step_2 = dense_ticket
    state = torch.load(path, weights_only=True)["callbacks"]["lightning_efficient.lottery_ticket"]
    assert state["round"] == 0 and state["rewind_step"] == 2
    assert set(state["rewind_weights"]) == set(at_step_2)
    for name, weight in at_step_2.items():
        torch.testing.assert_close(state["rewind_weights"][name], weight, rtol=0, atol=0, msg=name)
    trained = torch.load(path, weights_only=True)["state_dict"]
    assert not any(key.endswith("weight_mask") for key in trained)  # the dense round adds no masks


def test_a_round_prunes_the_trained_weights_globally_rewinds_the_survivors_and_keeps_them_masked(dense_ticket):
    path, _ = dense_ticket
    checkpoint = torch.load(path, weights_only=True)
    rewound, trained = (
        checkpoint["callbacks"]["lightning_efficient.lottery_ticket"]["rewind_weights"],
        checkpoint["state_dict"],
    )
    technique, module = LotteryTicket(sparsity=0.6, ticket=path), model(seed=5)
    logged = fit(module, 3, technique).callback_metrics
    assert logged["lottery_ticket/round"] == 1
    assert float(logged["lottery_ticket/theoretical_flops_fraction"]) == pytest.approx(0.4, abs=1e-3)

    names = list(technique._targets)
    magnitudes = torch.cat([trained[f"{n}.weight"].abs().flatten() for n in names])
    threshold = magnitudes.kthvalue(round(0.6 * magnitudes.numel())).values  # global: one threshold for all layers
    assert technique.round == 1 and technique.current_sparsity == pytest.approx(0.6, abs=1e-3)
    for name, target in technique._targets.items():
        assert torch.equal(target.weight_mask.bool(), trained[f"{name}.weight"].abs() > threshold), name
        assert torch.all(target.weight[~target.weight_mask.bool()] == 0), name
    # the survivors started from the rewound weights: one round of 3 steps from there, not from the seed-5 init
    start = LotteryTicket(sparsity=0.6, ticket=path)
    fresh = model(seed=5)
    start.attach(fresh)
    start.start_from_ticket(fresh, checkpoint)
    for name, parameter in fresh.named_parameters():
        mask = dict(fresh.named_buffers()).get(name + "_mask")
        expected = rewound[name] * mask if mask is not None else rewound[name]
        torch.testing.assert_close(parameter, expected, rtol=0, atol=0, msg=name)
    assert torch.equal(start.rewind_weights[names[0] + ".weight"], rewound[names[0] + ".weight"])  # passed on


def test_the_next_round_never_revives_a_pruned_weight(dense_ticket, tmp_path):
    path, _ = dense_ticket
    first = LotteryTicket(sparsity=0.5, ticket=path)
    fit(model(), 3, first).save_checkpoint(tmp_path / "round1.ckpt")
    kept_before = {n: m.weight_mask.bool().clone() for n, m in first._targets.items()}
    second = LotteryTicket(sparsity=0.75, ticket=tmp_path / "round1.ckpt")
    fit(model(), 2, second)
    assert second.round == 2 and second.rewind_step == 2
    assert second.current_sparsity == pytest.approx(0.75, abs=1e-3)
    for name, target in second._targets.items():
        assert not torch.any(target.weight_mask.bool() & ~kept_before[name]), name


def test_reinit_keeps_this_runs_initialisation_and_refuses_the_dense_rounds_seed(tmp_path):
    dense = tmp_path / "dense.ckpt"
    fit(model(seed=0), 2, LotteryTicket(rewind_step=0)).save_checkpoint(dense)
    with pytest.raises(ConfigurationError, match=r"start='reinit' got the dense round's initial weights"):
        fit(model(seed=0), 1, LotteryTicket(sparsity=0.5, ticket=dense, start="reinit"))
    technique, module = LotteryTicket(sparsity=0.5, ticket=dense, start="reinit"), model(seed=1)
    initial = {n: m.weight.detach().clone() for n, m in module.named_modules() if hasattr(m, "weight")}
    technique.attach(module)
    technique.start_from_ticket(module, torch.load(dense, weights_only=True))
    for name, target in technique._targets.items():
        torch.testing.assert_close(target.weight, initial[name] * target.weight_mask, rtol=0, atol=0)


def test_an_interrupted_round_resumes_exactly_without_its_ticket(dense_ticket, tmp_path):
    path, _ = dense_ticket
    ticket = tmp_path / "ticket.ckpt"
    ticket.write_bytes(path.read_bytes())

    class StopAfter(pl.Callback):  # an interruption: the same run (and LR schedule), stopped after `step` steps
        def __init__(self, step: int | None) -> None:
            self.step = step

        def on_train_batch_end(self, trainer, *args) -> None:
            trainer.should_stop = trainer.should_stop or trainer.global_step == self.step

    def run(root: Path, stop: int | None = None, ckpt_path: str | None = None) -> BertMLM:
        module = model(seed=3)
        trainer = quiet_trainer(max_steps=4, limit_val_batches=0, enable_checkpointing=True,
                                callbacks=[RandomStates(), LotteryTicket(sparsity=0.6, ticket=ticket),
                                           LastCheckpoint(dirpath=root, every_n_train_steps=1), StopAfter(stop)])  # fmt: skip
        trainer.fit(module, data(), ckpt_path=ckpt_path)
        return module

    whole = run(tmp_path / "whole")
    run(tmp_path / "broken", stop=2)
    assert torch.load(tmp_path / "broken" / "last.ckpt", weights_only=True)["global_step"] == 2
    ticket.unlink()  # the round's own checkpoint holds its masks and the weights to rewind to
    resumed = run(tmp_path / "resumed", ckpt_path=str(tmp_path / "broken" / "last.ckpt"))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_bad_input_fails_before_step_one(dense_ticket, tmp_path):
    path, _ = dense_ticket
    with pytest.raises(ConfigurationError, match=r"sparsity=0.8 needs ticket="):
        LotteryTicket(sparsity=0.8)
    with pytest.raises(ConfigurationError, match=r"start='reinit' is for a pruned round"):
        LotteryTicket(start="reinit")
    with pytest.raises(ConfigurationError, match=r"sparsity=1.0 must lie in \[0.0, 1.0\)"):
        LotteryTicket(sparsity=1.0, ticket=path)
    with pytest.raises(ConfigurationError, match=r"ticket='.*nowhere.ckpt' is not a file"):
        fit(model(), 1, LotteryTicket(sparsity=0.5, ticket=tmp_path / "nowhere.ckpt"))
    plain = tmp_path / "plain.ckpt"
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(model(), data())
    run = quiet_trainer(max_steps=1, limit_val_batches=0)
    run.fit(model(), data())
    run.save_checkpoint(plain)
    with pytest.raises(ConfigurationError, match=r"holds no lottery-ticket weights"):
        fit(model(), 1, LotteryTicket(sparsity=0.5, ticket=plain))
    with pytest.raises(ConfigurationError, match=r"rewind_step=3 differs from the ticket's \(2\)"):
        fit(model(), 1, LotteryTicket(sparsity=0.5, ticket=path, rewind_step=3))
    with pytest.raises(ConfigurationError, match=r"is a checkpoint of another model"):
        fit(model(hidden_size=24), 1, LotteryTicket(sparsity=0.5, ticket=path))
    with pytest.raises(ConfigurationError, match=r"rewind_step=5 is never reached: the run has 3 optimizer steps"):
        fit(model(), 3, LotteryTicket(rewind_step=5))
    with pytest.raises(ConfigurationError, match=r"lottery_ticket cannot run with prune_at_init"):
        fit(model(), 1, LotteryTicket(), PruneAtInit())


def test_the_pipeline_runs_each_round_from_the_previous_rounds_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)  # the file names its configs from the repository root
    spec = load_pipeline(CONFIGS / "pipelines" / "lottery_ticket.yaml", root=tmp_path)
    plans = {plan.name: plan for plan in plan_stages(spec)}
    assert [plans[n].kind.name for n in ("dense", "round1", "round2", "reinit")] == [
        "fit",
        "ticket",
        "ticket",
        "ticket",
    ]
    key = "trainer.callbacks[LotteryTicket].init_args"
    assert get_value(plans["dense"].config, key)["ticket"] is None
    for name, source, sparsity in [("round1", "dense", 0.5528), ("round2", "round1", 0.8), ("reinit", "round1", 0.8)]:
        args = get_value(plans[name].config, key)
        assert args["ticket"] == str(plans[source].checkpoint) and args["sparsity"] == sparsity
        assert get_value(plans[name].config, "model.init_args.pretrained") is None  # the ticket sets the weights
    assert get_value(plans["reinit"].config, key)["start"] == "reinit"
    assert plans["reinit"].config["seed_everything"] != plans["dense"].config["seed_everything"]
    assert round_sparsities(0.8, 2) == [0.5528, 0.8]  # what the file's comment says it uses


def test_a_ticket_exports_like_a_pruned_model(dense_ticket):
    path, _ = dense_ticket
    technique, module = LotteryTicket(sparsity=0.7, ticket=path), model()
    technique.attach(module)
    technique.start_from_ticket(module, torch.load(path, weights_only=True))
    kept = {name: target.weight_mask.bool().clone() for name, target in technique._targets.items()}
    with torch.no_grad():  # training moves the weights; the masks stay: export multiplies them in
        for target in technique._targets.values():
            target.weight.add_(1.0)
    report = export_pruned(module, shrink=False)
    assert report["masked_modules"] == len(kept)
    assert not any(key.endswith("_mask") for key in module.state_dict())
    modules = dict(module.named_modules())
    zeros = sum(int((modules[name].weight == 0).sum()) for name in kept)
    assert zeros == sum(int((~mask).sum()) for mask in kept.values())
    assert zeros == pytest.approx(0.7 * sum(mask.numel() for mask in kept.values()), abs=1)
