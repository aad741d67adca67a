"""LAMB and Lion against their papers' formulas, state round trips, the no-decay rule, YAML, bf16, bad input."""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_efficient import BertMLM, ConfigurationError, MLMDataModule, Translation, ViTClassifier
from lightning_efficient.models.base import decay_parameter_groups
from lightning_efficient.optim import LAMB, Lion, no_decay_groups

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# -- references: the papers' formulas, per tensor, in float64 ---------------------------------------
def lamb_reference(w, grads, lr, betas, eps, weight_decay, clamp, trust_ratio=True, bias_correction=True):
    """You et al. 2019, Algorithm 2. Returns the weights after every step and the last trust ratio."""
    beta1, beta2 = betas
    w = w.double()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    ratio = 1.0
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t) if bias_correction else m
        v_hat = v / (1 - beta2**t) if bias_correction else v
        u = m_hat / (v_hat.sqrt() + eps) + weight_decay * w
        w_norm, u_norm = w.norm().item(), u.norm().item()
        phi = min(w_norm, clamp) if clamp is not None else w_norm
        ratio = phi / u_norm if trust_ratio and w_norm > 0 and u_norm > 0 else 1.0
        w = w - lr * ratio * u
    return w, ratio


def lion_reference(w, grads, lr, betas, weight_decay, dtype=torch.float64):
    """Chen et al. 2023, Algorithm 1 (``dtype``: the arithmetic's precision)."""
    beta1, beta2 = betas
    w = w.to(dtype)
    m = torch.zeros_like(w)
    for g in grads:
        g = g.to(dtype)
        update = torch.sign(beta1 * m + (1 - beta1) * g)
        w = w - lr * (update + weight_decay * w)
        m = beta2 * m + (1 - beta2) * g
    return w


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def make_tensors(seed: int = 0) -> list[torch.Tensor]:
    """Odd shapes; the special cases LAMB must survive sit at fixed positions (see ``CASES``)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(7, 5, generator=gen),  # 0: ordinary matrix
        torch.randn(5, generator=gen),  # 1: bias (1-d)
        torch.zeros(3, 4),  # 2: zero-initialised: ||w|| = 0, trust ratio 1
        torch.randn(6, 3, generator=gen) * 40.0,  # 3: ||w|| > clamp: the numerator is clipped
        torch.randn(4, 3, generator=gen),  # 4: gets a zero gradient: with no decay, ||u|| = 0
    ]


def make_grads(steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [t.shape for t in make_tensors()]
    grads = []
    for _ in range(steps):  # tensor 4 always gets a zero gradient
        grads.append([torch.zeros(s) if i == 4 else torch.randn(s, generator=gen) for i, s in enumerate(shapes)])
    return grads


def run(optimizer_class, steps, group_settings: list[dict], indices=(0, 1, 2, 3, 4), dtype=torch.float32, **kwargs):
    """The tensors ``indices`` of ``make_tensors`` as parameters in explicit groups (``group_settings[i]`` each)."""
    params = [torch.nn.Parameter(make_tensors()[i].to(dtype)) for i in indices]
    groups = [{"params": [p], **settings} for p, settings in zip(params, group_settings)]
    optimizer = optimizer_class(groups, **kwargs)
    for grads in make_grads(steps):
        for p, i in zip(params, indices):
            p.grad = grads[i].to(dtype)
        optimizer.step()
    return params, optimizer


# -- LAMB ---------------------------------------------------------------------------------------
LAMB_SETTINGS = {"lr": 0.05, "betas": (0.9, 0.999), "eps": 1e-6, "clamp": 10.0}
GROUPS = [  # per tensor: weight decay on/off, trust ratio on/off (tensor 4 without decay: ||u|| = 0)
    {"weight_decay": 0.1},
    {"weight_decay": 0.0, "trust_ratio": False},
    {"weight_decay": 0.1},
    {"weight_decay": 0.0},
    {"weight_decay": 0.0},
]


GROUPS_DECAY = [  # weight decay on tensors with and without the trust ratio (AdamW's own update when off)
    {"weight_decay": 0.1, "trust_ratio": False},
    {"weight_decay": 0.3},
    {"weight_decay": 0.1, "trust_ratio": False},
    {"weight_decay": 0.1},  # ||w|| > clamp
    {"weight_decay": 0.2},  # zero gradient: u = wd w only
]


def assert_lamb_matches_reference(params, optimizer, groups, steps, bias_correction, settings):
    """Every tensor's weights, step and recorded trust ratio against ``lamb_reference`` (fp64)."""
    for index, (param, start, group) in enumerate(zip(params, make_tensors(), groups)):
        grads = [g[index] for g in make_grads(steps)]
        expected, ratio = lamb_reference(
            start, grads, weight_decay=group["weight_decay"], trust_ratio=group.get("trust_ratio", True),
            bias_correction=bias_correction, **settings,
        )  # fmt: skip
        if expected.norm() > 0:
            assert relative_error(param.detach(), expected) < 1e-6, f"tensor {index}"
        moved = expected - start.double()
        if moved.norm() > 0:  # the step itself (not only the weights) matches
            assert relative_error(param.detach() - start, moved) < 1e-5, f"tensor {index}"
        else:
            assert torch.equal(param.detach(), start), f"tensor {index}"
        recorded = optimizer.state[param]["trust_ratio"]
        assert recorded.dtype == torch.float32 and recorded.shape == ()
        assert recorded.item() == pytest.approx(ratio, rel=1e-6), f"tensor {index}"


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_lamb_equals_algorithm_2(steps, bias_correction):
    params, optimizer = run(LAMB, steps, GROUPS, bias_correction=bias_correction, **LAMB_SETTINGS)
    assert_lamb_matches_reference(params, optimizer, GROUPS, steps, bias_correction, LAMB_SETTINGS)


@pytest.fixture(params=["fused", "foreach"])
def lamb_path(request, monkeypatch):
    """Which kernels LAMB's step runs on: ``torch._fused_adamw_`` (counted) or the ``torch._foreach_*`` path."""
    from lightning_efficient.optim import lamb

    calls = []
    if request.param == "foreach":  # as on a device type without the fused kernel
        monkeypatch.setattr(lamb, "_FUSED_DEVICE_TYPES", frozenset())
    fused = torch._fused_adamw_

    def counted(params, *args, **kwargs):
        calls.append(len(params))
        return fused(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counted)
    return request.param, calls


@pytest.mark.parametrize("groups", [GROUPS, GROUPS_DECAY], ids=["mixed", "decay"])
@pytest.mark.parametrize("clamp", [10.0, None])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_lamb_steps_equal_algorithm_2_on_both_paths(lamb_path, groups, clamp, bias_correction):
    """Five steps of the fused kernel path and of the foreach path against Algorithm 2: weight decay on
    and off, trust ratio on and off, bias correction on and off, the clamp on and off (||w|| of tensor 3 > 10)."""
    path, calls = lamb_path
    steps, settings = 5, {**LAMB_SETTINGS, "clamp": clamp}
    params, optimizer = run(LAMB, steps, groups, bias_correction=bias_correction, **settings)
    assert len(calls) == (steps * len(groups) if path == "fused" else 0)  # one tensor per group here
    assert_lamb_matches_reference(params, optimizer, groups, steps, bias_correction, settings)


def test_lamb_fused_path_is_one_kernel_call_per_bucket(lamb_path):
    """BERT-tiny's two groups: one ``torch._fused_adamw_`` call each, over all of the group's tensors."""
    path, calls = lamb_path
    model = BertMLM(vocab_size=97, preset="tiny")
    optimizer = LAMB(model.parameters(), lr=1e-3)
    model(torch.randint(0, 97, (2, 8))).float().square().mean().backward()
    optimizer.step()
    assert calls == ([len(g["params"]) for g in optimizer.param_groups] if path == "fused" else [])


def test_lamb_non_contiguous_tensors_take_the_foreach_path_with_the_same_result(lamb_path):
    """The CPU kernel walks memory in order: transposed weights go the foreach way, to the same numbers."""
    path, calls = lamb_path
    start = make_tensors()[0]
    plain = torch.nn.Parameter(start.clone())
    transposed = torch.nn.Parameter(start.t().contiguous().t())  # same values, column-major
    assert not transposed.is_contiguous()
    optimizers = [LAMB([p], weight_decay=0.1, lr=0.05, no_decay_1d=False) for p in (plain, transposed)]
    for grads in make_grads(3):
        for p, optimizer in zip((plain, transposed), optimizers):
            p.grad = grads[0].clone()
            optimizer.step()
    torch.testing.assert_close(transposed.detach(), plain.detach(), rtol=1e-6, atol=1e-7)
    assert len(calls) == (3 if path == "fused" else 0)  # the contiguous one only


def test_lamb_empty_parameter_takes_the_foreach_path(lamb_path):
    """A 0-element tensor (which CUDA's fused kernel refuses) moves its bucket to the foreach path; others still step."""
    _, calls = lamb_path
    empty, weight = torch.nn.Parameter(torch.zeros(0, 4)), torch.nn.Parameter(make_tensors()[0].clone())
    optimizer = LAMB([{"params": [weight, empty]}], lr=0.05, weight_decay=0.1)
    weight.grad, empty.grad = make_grads(1)[0][0], torch.zeros(0, 4)
    optimizer.step()
    expected, _ = lamb_reference(make_tensors()[0], [make_grads(1)[0][0]], 0.05, (0.9, 0.999), 1e-6, 0.1, 10.0)
    assert relative_error(weight.detach(), expected) < 1e-6 and empty.shape == (0, 4)
    assert optimizer.state[empty]["trust_ratio"].item() == 1.0 and calls == []


def test_lamb_special_cases_are_exercised():
    """The fixture really hits the zero-norm, clamp and zero-update cases of the trust ratio."""
    params, optimizer = run(LAMB, 1, GROUPS, **LAMB_SETTINGS)
    ratio = [optimizer.state[p]["trust_ratio"].item() for p in params]
    start = make_tensors()
    assert start[2].norm() == 0 and ratio[2] == 1.0 and params[2].detach().norm() > 0  # zero weights still move
    assert start[3].norm() > LAMB_SETTINGS["clamp"]
    u_norm = math.sqrt(start[3].numel())  # first step, no decay: |u| = |g| / (|g| + eps) ~ 1 per element
    assert ratio[3] == pytest.approx(LAMB_SETTINGS["clamp"] / u_norm, rel=1e-4)
    assert ratio[4] == 1.0 and torch.equal(params[4].detach(), start[4])  # zero gradient, no decay: no move
    assert ratio[1] == 1.0  # trust_ratio False


def test_lamb_first_step_moves_each_tensor_by_lr_times_its_norm():
    """The paper's point, independent of the reference: ||delta w|| = lr * min(||w||, clamp) per tensor."""
    params, _ = run(LAMB, 1, [{"weight_decay": 0.1}] * 2, indices=(0, 3), **LAMB_SETTINGS)
    for param, start in zip(params, [make_tensors()[0], make_tensors()[3]]):
        step = (param.detach() - start).norm().item()
        assert step == pytest.approx(LAMB_SETTINGS["lr"] * min(start.norm().item(), 10.0), rel=1e-5)


# -- Lion ---------------------------------------------------------------------------------------
LION_GROUPS = [{"weight_decay": wd} for wd in (0.1, 0.0, 0.1, 0.0, 0.5)]


@pytest.mark.parametrize("steps", [1, 3])
def test_lion_equals_algorithm_1(steps):
    settings = {"lr": 0.01, "betas": (0.9, 0.99)}
    params, optimizer = run(Lion, steps, LION_GROUPS, **settings)
    for index, (param, start, group) in enumerate(zip(params, make_tensors(), LION_GROUPS)):
        grads = [g[index] for g in make_grads(steps)]
        if group["weight_decay"] == 0:  # w - lr sign(c) is exact in fp32: bitwise equal to the formula
            expected = lion_reference(start, grads, weight_decay=0.0, dtype=torch.float32, **settings)
            assert torch.equal(param.detach(), expected), f"tensor {index}"
        exact = lion_reference(start, grads, weight_decay=group["weight_decay"], **settings)
        if exact.norm() > 0:
            assert relative_error(param.detach(), exact) < 1e-6
        momentum = sum((1 - 0.99) * 0.99 ** (steps - 1 - k) * g for k, g in enumerate(grads))
        if momentum.norm() > 0:
            assert relative_error(optimizer.state[param]["exp_avg"], momentum) < 1e-6


def test_lion_moves_every_element_by_lr():
    params, _ = run(Lion, 1, [{"weight_decay": 0.0}] * 2, indices=(0, 1), lr=0.01)
    for param, start in zip(params, make_tensors()[:2]):
        torch.testing.assert_close((param.detach() - start).abs(), torch.full_like(start, 0.01), rtol=1e-4, atol=0)


# -- state_dict round trip ------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer_class", [LAMB, Lion])
def test_state_dict_save_load_continues_identically(optimizer_class, tmp_path):
    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
        model[2].to(torch.bfloat16)  # 16-bit parameters: their fp32 state must survive the round trip
        return model, optimizer_class(model.parameters(), lr=1e-2, weight_decay=0.1)

    def train(model, optimizer, steps, offset):
        for step in range(offset, offset + steps):
            x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step))
            out = model[2](model[1](model[0](x)).to(torch.bfloat16)).float()
            optimizer.zero_grad()
            out.square().mean().backward()
            optimizer.step()

    model, optimizer = model_and_optimizer()
    train(model, optimizer, 5, 0)

    model2, optimizer2 = model_and_optimizer()
    train(model2, optimizer2, 2, 0)
    torch.save({"model": model2.state_dict(), "optimizer": optimizer2.state_dict()}, tmp_path / "ckpt.pt")
    model3, optimizer3 = model_and_optimizer()
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model3.load_state_dict(checkpoint["model"])
    optimizer3.load_state_dict(checkpoint["optimizer"])
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer3.state.values())
    train(model3, optimizer3, 3, 2)

    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), model3.parameters()):
        for key, value in optimizer.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(optimizer3.state[q][key])), key


# -- the no-decay rule on real models -------------------------------------------------------------
def expected_no_decay(model: torch.nn.Module) -> set[str]:
    """By hand: every bias (incl. BERT's MLM output bias) and every LayerNorm weight, by its name."""
    norm = re.compile(r"(LayerNorm|layer_norm|layernorm(_before|_after)?)\.weight$")
    return {n for n, _ in model.named_parameters() if n.endswith(".bias") or norm.search(n)}


@pytest.mark.parametrize(
    "build",
    [
        lambda: BertMLM(vocab_size=97, preset="tiny"),
        lambda: Translation(vocab_size=97, preset="tiny"),
        lambda: ViTClassifier(num_labels=3, preset="tiny"),
    ],
    ids=["bert", "marian", "vit"],
)
def test_no_decay_rule_picks_biases_and_norm_weights(build):
    model = build()
    names = {id(p): n for n, p in model.named_parameters()}
    expected = expected_no_decay(model)
    assert len(expected) > 10 and any("norm" in n.lower() for n in expected)

    groups = no_decay_groups(model.parameters(), weight_decay=0.01)
    assert {names[id(p)] for p in groups[1]["params"]} == expected
    assert {names[id(p)] for p in groups[0]["params"]} == set(names.values()) - expected
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"], groups[1]["trust_ratio"]) == (0.01, 0.0, False)

    for optimizer in (LAMB(model.parameters(), weight_decay=0.01), Lion(model.parameters(), weight_decay=0.1)):
        no_decay = [g for g in optimizer.param_groups if g["weight_decay"] == 0.0]
        assert {names[id(p)] for g in no_decay for p in g["params"]} == expected
    # EfficientModule's AdamW groups use the same rule (trainable parameters only: Marian's positions are frozen)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adamw_groups = decay_parameter_groups(model, 0.01)
    assert {names[id(p)] for p in adamw_groups[1]["params"]} == expected & trainable


def test_explicit_groups_are_respected_and_no_decay_1d_can_be_off():
    layer = torch.nn.Linear(3, 2)
    given = [
        {"params": [layer.weight], "weight_decay": 0.3},
        {"params": [layer.bias], "weight_decay": 0.2, "trust_ratio": True},
    ]
    optimizer = LAMB(given, weight_decay=0.01)
    assert [(g["weight_decay"], g["trust_ratio"]) for g in optimizer.param_groups] == [(0.3, True), (0.2, True)]
    flat = LAMB(layer.parameters(), weight_decay=0.01, no_decay_1d=False)
    assert len(flat.param_groups) == 1 and flat.param_groups[0]["weight_decay"] == 0.01
    assert len(Lion(layer.parameters(), no_decay_1d=False).param_groups) == 1


# -- through LightningCLI -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("class_path", "init_args", "optimizer_class"),
    [("lightning_efficient.optim.LAMB", "{lr: 2.0e-3, weight_decay: 0.01}", LAMB),
     ("lightning_efficient.optim.Lion", "{lr: 3.0e-4, weight_decay: 0.1, betas: [0.9, 0.98]}", Lion)],
    ids=["lamb", "lion"],
)  # fmt: skip
def test_trains_from_yaml_through_the_cli(class_path, init_args, optimizer_class, tmp_path, monkeypatch):
    from lightning_efficient.cli import EfficientCLI

    fragment = tmp_path / "optimizer.yaml"
    fragment.write_text(f"optimizer:\n  class_path: {class_path}\n  init_args: {init_args}\n")
    monkeypatch.chdir(tmp_path)  # the config's relative run paths land in tmp_path
    args = ["fit", "-c", str(CONFIGS / "bert" / "tiny_mlm.yaml"), "-c", str(fragment), "--trainer.max_steps=3",
            "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0"]  # fmt: skip
    cli = EfficientCLI(args=args)
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is optimizer_class and cli.trainer.global_step == 3
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert all(state["step"] == 3 for state in optimizer.state.values())
    (config,) = cli.trainer.lr_scheduler_configs  # the module's warmup-and-decay schedule is kept
    assert config.interval == "step" and config.scheduler.last_epoch == 3
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
    if optimizer_class is LAMB:
        ratios = torch.stack([s["trust_ratio"] for s in optimizer.state.values()])
        assert torch.isfinite(ratios).all() and (ratios != 1.0).any()


# -- 16-bit ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer_class", [LAMB, Lion])
def test_bf16_parameters_step_in_fp32(optimizer_class):
    tensors = [t.to(torch.bfloat16) for t in make_tensors()]
    params, optimizer = run(optimizer_class, 2, GROUPS, dtype=torch.bfloat16, lr=0.05)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params)
    assert all(v.dtype == torch.float32 for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    grads = [[g[0].to(torch.bfloat16).float() for g in make_grads(2)]]
    if optimizer_class is LAMB:
        expected, _ = lamb_reference(tensors[0].float(), grads[0], 0.05, (0.9, 0.999), 1e-6, 0.1, 10.0)
    else:
        expected = lion_reference(tensors[0].float(), grads[0], 0.05, (0.9, 0.99), 0.1)
    # fp32 arithmetic, rounded to bf16 after each step: within a couple of bf16 ulps of the fp64 formula
    torch.testing.assert_close(params[0].detach().float(), expected.float(), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("optimizer_class", [LAMB, Lion])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [0.0, 1e-30])
def test_zero_and_tiny_parameters_stay_finite(optimizer_class, dtype, value):
    params = [torch.nn.Parameter(torch.full(shape, value, dtype=dtype)) for shape in ((4, 3), (3,))]
    optimizer = optimizer_class(params, lr=1e-3, weight_decay=0.01)
    for step in range(3):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=torch.Generator().manual_seed(step)) * 1e-3).to(dtype)
        optimizer.step()
    assert all(torch.isfinite(p).all() and p.ne(value).any() for p in params)
    if optimizer_class is LAMB:
        assert all(torch.isfinite(s["trust_ratio"]) for s in optimizer.state.values())


def test_bf16_mixed_training_keeps_fp32_parameters_and_finite_values(user_files):
    class LambBert(BertMLM):
        def configure_optimizers(self):
            return LAMB(self.parameters(), lr=1e-3)

    data = MLMDataModule(train_files=[user_files["txt"]], vocab_size=300, max_length=17, batch_size=4)
    data.setup("fit")
    model = LambBert(vocab_size=data.vocab_size, preset="tiny", max_length=17)
    trainer = pl.Trainer(
        max_steps=2, precision="bf16-mixed", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, data)
    optimizer = trainer.optimizers[0]
    assert trainer.global_step == 2
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(s["trust_ratio"]) and s["step"] == 2 for s in optimizer.state.values())


# -- bad input ------------------------------------------------------------------------------------
BAD = [
    (LAMB, {"lr": 0.0}, "lr=0.0"),
    (LAMB, {"lr": -1e-3}, "lr=-0.001"),
    (LAMB, {"lr": float("nan")}, "lr=nan"),
    (LAMB, {"lr": float("inf")}, "lr=inf"),
    (LAMB, {"betas": (1.0, 0.999)}, "betas=(1.0, 0.999)"),
    (LAMB, {"betas": (0.9, -0.1)}, "betas=(0.9, -0.1)"),
    (LAMB, {"betas": (0.9,)}, "betas=(0.9,)"),
    (LAMB, {"eps": 0.0}, "eps=0.0"),
    (LAMB, {"eps": -1e-8}, "eps=-1e-08"),
    (LAMB, {"weight_decay": -0.01}, "weight_decay=-0.01"),
    (LAMB, {"clamp": 0.0}, "clamp=0.0"),
    (LAMB, {"clamp": -1.0}, "clamp=-1.0"),
    (Lion, {"lr": 0.0}, "lr=0.0"),
    (Lion, {"lr": -1.0}, "lr=-1.0"),
    (Lion, {"betas": (0.9, 1.0)}, "betas=(0.9, 1.0)"),
    (Lion, {"betas": (-0.5, 0.99)}, "betas=(-0.5, 0.99)"),
    (Lion, {"weight_decay": -1.0}, "weight_decay=-1.0"),
]


@pytest.mark.parametrize(("optimizer_class", "kwargs", "named"), BAD, ids=[f"{c.__name__}-{n}" for c, _, n in BAD])
def test_bad_input_fails_naming_value_and_range(optimizer_class, kwargs, named):
    with pytest.raises(ConfigurationError, match=re.escape(named)) as error:
        optimizer_class(torch.nn.Linear(2, 2).parameters(), **kwargs)
    assert re.search(r"must be|in \[0, 1\)", str(error.value))


@pytest.mark.parametrize("optimizer_class", [LAMB, Lion])
def test_bad_value_in_an_explicit_group_fails(optimizer_class):
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigurationError, match=r"weight_decay=-0\.5 must be"):
        optimizer_class([{"params": [layer.weight], "weight_decay": -0.5}])


# -- benchmark smoke run (structure only; no timing asserted) --------------------------------------
def test_optimizer_step_benchmark_smoke(tmp_path, monkeypatch, capsys):
    import importlib.util
    import json

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))  # the script imports ``harness`` as a top-level module
    spec = importlib.util.spec_from_file_location("optimizer_step", benchmarks / "optimizer_step.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "numbers.json"
    script.main(["--preset", "tiny", "--vocab-size", "301", "--rounds", "2", "--steps", "3", "--warmup", "1",
                 "--json", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"AdamW(foreach=True)", "AdamW(fused=True)", "LAMB (ours)", "Lion (ours)"}
    assert all(v["steps"] == 6 and v["rounds"] == 2 for v in result["variants"].values())
    assert set(result["passed"]) == {"LAMB (ours)", "Lion (ours)"}
    printed = capsys.readouterr().out
    assert "LAMB (ours) step =" in printed and "Lion (ours) step =" in printed
    assert "reference (no claim): AdamW(fused=True) step =" in printed
    assert result["target"] == 1.10  # issue 30
