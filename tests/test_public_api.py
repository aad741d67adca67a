"""The public API: one object per class under its two spellings, canonical fragments, old spellings that warn."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonargparse import Namespace
from torch import nn

import lightning_efficient
from lightning_efficient import callbacks, optim, strategies
from lightning_efficient.cli import canonical_class_paths
from lightning_efficient.technique import Technique

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SUBPACKAGES = {"callbacks": callbacks, "strategies": strategies, "optim": optim}


def class_paths(config: Any) -> list[str]:
    """Every ``class_path`` value in a loaded YAML document."""
    if isinstance(config, dict):
        found = [config["class_path"]] if isinstance(config.get("class_path"), str) else []
        return found + [path for value in config.values() for path in class_paths(value)]
    if isinstance(config, list):
        return [path for item in config for path in class_paths(item)]
    return []


def test_every_exported_name_resolves() -> None:
    for module in (lightning_efficient, *SUBPACKAGES.values()):
        assert len(module.__all__) == len(set(module.__all__)), module.__name__
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"
    assert {"ImportanceSampling", "LRScaling", "TrustRatioMonitor", "export_pruned", "export_quantized"} <= set(
        lightning_efficient.__all__
    )


@pytest.mark.parametrize("subpackage", sorted(SUBPACKAGES))
def test_top_level_and_subpackage_spellings_are_the_same_object(subpackage: str) -> None:
    module = SUBPACKAGES[subpackage]
    classes = [name for name in module.__all__ if inspect.isclass(getattr(module, name))]
    assert classes, subpackage
    for name in classes:
        obj = getattr(module, name)
        if issubclass(obj, Technique) or subpackage != "callbacks":  # every technique, strategy, optimizer
            assert name in lightning_efficient.__all__, f"{subpackage}.{name} is not exported at the top level"
            assert getattr(lightning_efficient, name) is obj, name
    for name in ("export_pruned", "export_quantized"):
        assert getattr(lightning_efficient, name) is getattr(callbacks, name)


OLD_SPELLINGS = [
    ("lightning_efficient.optim", "LRScaling", "lightning_efficient.callbacks.LRScaling"),
    ("lightning_efficient.optim", "TrustRatioMonitor", "lightning_efficient.callbacks.TrustRatioMonitor"),
    ("lightning_efficient.optim", "scaled_lr", "lightning_efficient.callbacks.lr_scaling.scaled_lr"),
    ("lightning_efficient.optim.lr_scaling", "LRScaling", "lightning_efficient.callbacks.LRScaling"),
    ("lightning_efficient.optim.lr_scaling", "warmup_factor", "lightning_efficient.callbacks.lr_scaling.warmup_factor"),
    ("lightning_efficient.optim.trust_ratio", "TrustRatioMonitor", "lightning_efficient.callbacks.TrustRatioMonitor"),
]


@pytest.mark.parametrize(("module", "name", "new"), OLD_SPELLINGS, ids=lambda x: x.rpartition(".")[2])
def test_old_spellings_warn_with_the_new_path_and_are_the_same_object(module: str, name: str, new: str) -> None:
    new_module, _, new_name = new.rpartition(".")
    with pytest.warns(DeprecationWarning, match=re.escape(f"{module}.{name} is deprecated; use {new}") + "$"):
        old = getattr(importlib.import_module(module), name)
    assert old is getattr(importlib.import_module(new_module), new_name)
    assert name not in optim.__all__
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        importlib.import_module(module).nothing  # noqa: B018 - the attribute access is the test


def test_renamed_functions_keep_their_old_names_with_a_warning() -> None:
    from lightning_efficient.callbacks import pruning
    from lightning_efficient.strategies import tensor_parallel

    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.warns(DeprecationWarning, match="use lightning_efficient.callbacks.export_pruned"):
        report = pruning.export(model, shrink=False)
    assert report["masked_modules"] == 0 and report["parameters_after"] == 20
    with pytest.warns(
        DeprecationWarning, match="use lightning_efficient.strategies.tensor_parallel.check_strategy_support"
    ):
        tensor_parallel.check_composition([])
    with pytest.raises(Exception, match="layer_drop .* is not supported under tensor parallelism"):
        strategies.check_strategy_support([callbacks.LayerDrop(drop_rate=0.1)])


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_configs_use_canonical_class_paths(path: Path) -> None:
    """Fragments spell techniques, strategies, optimizers (and data) by subpackage; base configs use the top level."""
    config = yaml.safe_load(path.read_text())
    ours = [p for p in class_paths(config) if p.startswith("lightning_efficient.")]
    for class_path in ours:
        module, _, name = class_path.rpartition(".")
        if path.parent.name == "techniques":  # a fragment that brings its data names it by subpackage too
            assert module in {f"lightning_efficient.{s}" for s in (*SUBPACKAGES, "data")}, class_path
            assert name in importlib.import_module(module).__all__, class_path
        else:
            assert module == "lightning_efficient" and name in lightning_efficient.__all__, class_path
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert class_paths(canonical_class_paths(config)) == class_paths(yaml.safe_load(path.read_text()))


def test_canonical_class_paths_rewrites_deprecated_spellings_only() -> None:
    config = Namespace(
        model=Namespace(class_path="lightning_efficient.models.bert.BertMLM"),
        optimizer={"class_path": "lightning_efficient.optim.lamb.LAMB"},
        callbacks=[
            Namespace(class_path="lightning_efficient.optim.LRScaling", init_args=Namespace(reference_batch_size=32)),
            {"class_path": "lightning_efficient.LayerDrop"},  # valid: the top level
            {"class_path": "lightning_efficient.models.BertMLM"},  # valid: the subpackage
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"},  # not ours
            {"class_path": "lightning_efficient.callbacks.layer_drop.NoSuchClass"},  # left for LightningCLI to report
        ],
    )
    with pytest.warns(DeprecationWarning) as caught:
        canonical_class_paths(config)
    assert [str(w.message) for w in caught if "class_path" in str(w.message)] == [
        "class_path lightning_efficient.models.bert.BertMLM is deprecated; use lightning_efficient.BertMLM",
        "class_path lightning_efficient.optim.lamb.LAMB is deprecated; use lightning_efficient.optim.LAMB",
        "class_path lightning_efficient.optim.LRScaling is deprecated; use lightning_efficient.callbacks.LRScaling",
    ]
    assert config.model.class_path == "lightning_efficient.BertMLM"
    assert config.optimizer["class_path"] == "lightning_efficient.optim.LAMB"
    assert [c["class_path"] if isinstance(c, dict) else c.class_path for c in config.callbacks] == [
        "lightning_efficient.callbacks.LRScaling",
        "lightning_efficient.LayerDrop",
        "lightning_efficient.models.BertMLM",
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "lightning_efficient.callbacks.layer_drop.NoSuchClass",
    ]
    assert config.callbacks[0].init_args.reference_batch_size == 32


def test_old_class_path_in_yaml_loads_through_the_cli_with_a_visible_warning(tmp_path: Path) -> None:
    """A user's fragment with old spellings: the CLI (a fresh process, default warning filters) says what to write."""
    fragment = tmp_path / "old.yaml"
    fragment.write_text(
        "trainer:\n  callbacks+:\n"
        "    - class_path: lightning_efficient.callbacks.layer_drop.LayerDrop\n      init_args: {drop_rate: 0.3}\n"
        "    - class_path: lightning_efficient.optim.LRScaling\n      init_args: {reference_batch_size: 32}\n"
    )
    code = "import sys; from lightning_efficient.cli import main; main(sys.argv[1:])"
    result = subprocess.run(
        [sys.executable, "-c", code, "fit", "-c", str(CONFIGS / "bert/tiny_mlm.yaml"), "-c", str(fragment), "--print_config"],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "class_path lightning_efficient.callbacks.layer_drop.LayerDrop is deprecated; "
        "use lightning_efficient.callbacks.LayerDrop" in result.stderr
    )
    moved = "class_path lightning_efficient.optim.LRScaling is deprecated; use lightning_efficient.callbacks.LRScaling"
    assert moved in result.stderr
    printed = yaml.safe_load(result.stdout)
    callbacks_printed = {c["class_path"]: c.get("init_args", {}) for c in printed["trainer"]["callbacks"]}
    assert callbacks_printed["lightning_efficient.callbacks.LayerDrop"]["drop_rate"] == 0.3
    assert callbacks_printed["lightning_efficient.callbacks.LRScaling"]["reference_batch_size"] == 32
