"""ParameterEfficientTuning: Hugging Face peft adapters (LoRA, DoRA, IA3, LoHa, ...) as a technique.

peft does the adapter maths; this module puts it inside a Lightning run that may also prune,
quantize, drop layers or distil:

- **Injection** in ``setup`` (before a checkpoint's weights load) with ``peft.inject_adapter_in_model``,
  in place: the LightningModule keeps its class and the optimizer of ``configure_optimizers`` sees the
  adapters (and the task head, ``train_modules``) only, since every other parameter is frozen. The
  adapted layers come from the architecture table (``targets``: the attention's ``query`` and
  ``value`` by default, as in LoRA's paper and peft's BERT default; any of ``query key value output
  ffn_first ffn_second``, or ``"linear"`` for every ``Linear`` of the blocks), from the kit's selector
  (``include``/``exclude`` patterns), or from the peft config's own ``target_modules``.
- **Adapter-only checkpoints** (``adapter_only=True``): the frozen base weights are left out of every
  ``.ckpt`` (a LoRA checkpoint of BERT-small is ~2% of the full one); our metadata records the base's
  SHA-256 (:func:`base_fingerprint`) and where it came from (``pretrained=``). Resuming, validating or
  predicting with such a checkpoint loads it on the same base (the run's ``pretrained``), and a
  different base is refused naming both. Keys missing from the checkpoint are accepted only when they
  are exactly the frozen base's: a missing adapter weight still fails.
- **Applying an adapter** to its base in any stage: ``adapter=`` an adapter checkpoint of ours or a
  directory written by :meth:`ParameterEfficientTuning.save_pretrained` (peft's own format, which
  ``peft.PeftModel.from_pretrained`` loads too).
- **Merging that keeps the other techniques' work**: :meth:`ParameterEfficientTuning.merge` folds the
  update into the base with peft's own ``merge`` and then multiplies it by the base's mask, so a pruned
  base (zeros, or the pruning package's ``weight_mask``) keeps its sparsity exactly; on an int8 base
  (``int8_base=True``: torchao weight-only int8, QLoRA-style, the base frozen in int8 while the
  adapters train in float) the weight is dequantized, merged in float and quantized again.

Examples:
    >>> import lightning.pytorch as pl
    >>> from lightning_efficient import BertClassifier, TextClassificationDataModule
    >>> dm = TextClassificationDataModule(vocab_size=500, max_length=32, batch_size=8)
    >>> lora = ParameterEfficientTuning()  # LoRA r=8, alpha=8 on query and value; the classifier head trains
    >>> trainer = pl.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
    ...                      enable_checkpointing=False, enable_model_summary=False, callbacks=[lora])
    >>> model = BertClassifier(vocab_size=dm.vocab_size, num_labels=dm.num_labels, preset="tiny")
    >>> trainer.fit(model, dm)
    >>> lora.trainable_parameters < 0.2 * sum(p.numel() for p in model.parameters())
    True
    >>> report = lora.merge(model)  # a plain model again, with the update folded in
    >>> report["merged"], lora.is_applied
    (6, False)
"""

from __future__ import annotations

import copy
import enum
import fnmatch
import hashlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import peft
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lightning_efficient.architectures import architecture_of, block_view
from lightning_efficient.checkpoint import (
    ADAPTER_FIELD,
    adapter_record,
    load_checkpoint,
    recorded_structure,
    write_metadata,
)
from lightning_efficient.errors import (
    CheckpointMismatchError,
    ConfigurationError,
    DataError,
    check_patterns,
)
from lightning_efficient.targets import match_names, select_blocks, select_modules
from lightning_efficient.technique import Technique, check_choice

__all__ = [
    "TARGET_PARTS",
    "ParameterEfficientTuning",
    "adapter_layers",
    "base_fingerprint",
    "plain_peft_config",
]

#: The words of ``targets``: parts of every block, found through the architecture table.
TARGET_PARTS = ("query", "key", "value", "output", "ffn_first", "ffn_second")
#: Which model tasks (``EfficientModule.task``) each peft ``task_type`` fits.
PEFT_TASKS = {
    "SEQ_CLS": ("sequence_classification", "image_classification"),
    "SEQ_2_SEQ_LM": ("seq2seq",),
    "TOKEN_CLS": (),
    "CAUSAL_LM": (),
    "QUESTION_ANS": (),
    "FEATURE_EXTRACTION": ("masked_lm", "sequence_classification", "seq2seq", "image_classification"),
}
#: ``train_modules="auto"``: the head of a classifier (fresh at fine-tuning start), by parameter-name pattern.
CLASSIFIER_HEADS = ("*.classifier.*", "*.pooler.*", "*.score.*")
#: Fields of a peft config that describe where it was saved, not what it does (left out of comparisons).
_PROVENANCE = ("peft_version", "base_model_name_or_path", "revision", "auto_mapping", "inference_mode")
_SAFETENSORS = "adapter_model.safetensors"


def plain_peft_config(config: peft.PeftConfig) -> dict[str, Any]:
    """The config as plain values (sets sorted, enums as strings), without its provenance fields.

    What checkpoints record, so a run resumes only with the same adapter.

    Examples:
        >>> plain_peft_config(peft.LoraConfig(r=4, target_modules=["value", "query"]))["target_modules"]
        ['query', 'value']
    """

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (set, frozenset)):
            return sorted(plain(v) for v in value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return repr(value)

    return {k: plain(v) for k, v in config.to_dict().items() if k not in _PROVENANCE}


def adapter_layers(model: nn.Module) -> dict[str, BaseTunerLayer]:
    """The layers of ``model`` that carry a peft adapter, by qualified name.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> _ = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["0"]), model)
        >>> list(adapter_layers(model))
        ['0']
    """
    return {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().dequantize()  # a torchao int8 weight gives its float values; a float tensor itself
    return tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes()


def base_fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of named tensors (names, shapes, dtypes and bytes, in the order given), as hex.

    Examples:
        >>> a = base_fingerprint([("w", torch.ones(2))])
        >>> a == base_fingerprint([("w", torch.ones(2))]), a == base_fingerprint([("w", torch.zeros(2))])
        (True, False)
    """
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _adapter_root(pl_module: nn.Module) -> tuple[nn.Module, str]:
    """Where the adapters go: a LightningModule's transformers model (``.model``), else the module itself."""
    from transformers import PreTrainedModel

    inner = getattr(pl_module, "model", None)
    if isinstance(inner, PreTrainedModel):
        return inner, "model."
    return pl_module, ""


def _check_peft_config(config: peft.PeftConfig) -> None:
    """Refuse values peft would take silently or fail on late (rank, alpha, dropout, prompt methods)."""
    if not isinstance(config, peft.PeftConfig):
        raise ConfigurationError(
            f"peft_config={config!r} is not a peft config; give e.g. peft.LoraConfig(r=8) "
            "(in YAML: class_path: peft.LoraConfig, init_args: {r: 8})"
        )
    if config.is_prompt_learning:
        raise ConfigurationError(
            f"peft_config is a {type(config).__name__}, a prompt-learning method that needs peft's PeftModel "
            "wrapper and a task; use an adapter that changes layers: LoraConfig (use_dora=True for DoRA), "
            "IA3Config, LoHaConfig, LoKrConfig"
        )
    kind = type(config).__name__
    if isinstance(getattr(config, "r", None), int) and config.r < 1:
        raise ConfigurationError(f"{kind}(r={config.r}): the rank must be >= 1")
    alpha = getattr(config, "lora_alpha", getattr(config, "alpha", None))
    if isinstance(alpha, (int, float)) and alpha <= 0:
        raise ConfigurationError(f"{kind}: alpha={alpha} must be > 0")
    for field in ("lora_dropout", "rank_dropout", "module_dropout"):
        value = getattr(config, field, None)
        if isinstance(value, (int, float)) and not 0.0 <= value < 1.0:
            raise ConfigurationError(f"{kind}({field}={value}) must lie in [0, 1)")


def _layer_mask(layer: nn.Module) -> torch.Tensor | None:
    """Which weights of a base layer may be non-zero: the pruning package's mask, else its non-zero entries.

    None for a layer without a ``weight`` (a fused attention: peft merges into its in-projection).
    """
    mask = getattr(layer, "weight_mask", None)
    if mask is not None:
        return mask.to(torch.bool)
    weight = getattr(layer, "weight", None)
    return None if weight is None else weight.detach().dequantize() != 0


class ParameterEfficientTuning(Technique):
    """Train peft adapters on a frozen base (see the module docstring).

    Args:
        peft_config: Any peft adapter config (``peft.LoraConfig``, with ``use_dora=True`` for DoRA,
            ``peft.IA3Config``, ``peft.LoHaConfig``, ...); in YAML ``class_path``/``init_args``.
            Default: ``LoraConfig(r=8, lora_alpha=8, lora_dropout=0.1)``. Its ``target_modules``, when
            set, choose the layers (then ``targets``/``include`` must be left at their defaults).
        targets: Parts of every Transformer block to adapt, from the architecture table: any of
            ``query``, ``key``, ``value``, ``output`` (the attention's), ``ffn_first``, ``ffn_second``;
            or ``"linear"``: every ``Linear`` of the blocks. An attention with one fused in-projection
            (``nn.MultiheadAttention``) is adapted as a whole for ``query``/``key``/``value`` (LoRA only).
        include: Shell-style patterns of module names, searched in the whole model (instead of ``targets``).
        exclude: Patterns of names to leave out of the chosen ones.
        train_modules: Patterns of parameter names that train besides the adapters; ``"auto"``: a
            classifier's head (``classifier``, ``pooler``: fresh weights when fine-tuning starts), none for
            a masked LM or a translation model. ``modules_to_save`` of the peft config are added.
        adapter_only: Leave the frozen base weights out of checkpoints (see the module docstring).
        int8_base: Quantize the frozen base's block ``Linear`` weights to int8 (torchao weight-only, per
            row) before the adapters are added: QLoRA-style, for memory; LoRA only. Not undone by removal.
        adapter: Start from the adapter weights of an adapter checkpoint of ours (``.ckpt``) or of a
            :meth:`save_pretrained` directory, on this run's base (checked by its hash for a checkpoint).
        sparse_update: Train LoRA's update masked by the base's mask (the pruning masks, else the base's zero
            weights), ``W x + (M * B A) x``, so a pruned base stays pruned and :meth:`merge` gives exactly the trained
            model; each adapted layer then also multiplies by the dense update (as a full fine-tune's layer does).
            Plain LoRA only. Without it a merge into a pruned base still keeps its zeros, but drops the update
            there, so the merged model differs from the trained one (``benchmarks/adapters.py`` measures it).
        peft_dir: When a fit ends, write the adapters there in peft's format (:meth:`save_pretrained`); a
            relative path is taken from ``trainer.default_root_dir`` (the run's directory). None: not written.
        block_paths: Attribute paths of the block lists, for models the block locator does not know.

    Attributes:
        trainable_parameters: Parameters that train (adapters and ``train_modules``), after injection.
        base_sha256: The frozen base's fingerprint (:func:`base_fingerprint`), taken before injection.
        merged: Whether :meth:`merge` folded the adapters into the base.

    Logged once at the start of training: ``parameter_efficient/trainable_parameters`` and
    ``parameter_efficient/trainable_fraction``.
    """

    name = "parameter_efficient"
    hooks = ("on_train_start", "on_fit_end", "on_save_checkpoint", "on_load_checkpoint")
    conflicts_with = ("progressive_stacking", "qat")
    distributed_safe = True
    keep_after_fit = True
    compile_safe = True  # tests/test_compile.py: compiled training equals eager
    compile_note = "the adapters are injected at setup, before the model is compiled"

    def __init__(
        self,
        peft_config: peft.PeftConfig | None = None,
        targets: str | Sequence[str] = ("query", "value"),
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        train_modules: str | Sequence[str] = "auto",
        adapter_only: bool = True,
        int8_base: bool = False,
        adapter: str | None = None,
        peft_dir: str | None = None,
        sparse_update: bool = False,
        block_paths: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.peft_config = (
            peft_config if peft_config is not None else peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.1)
        )
        _check_peft_config(self.peft_config)
        words = [targets] if isinstance(targets, str) else list(targets)
        if words != ["linear"]:
            for word in words:
                check_choice("targets", word, (*TARGET_PARTS, "linear"))
            if "linear" in words or not words:
                raise ConfigurationError(
                    f"targets={targets!r}: give 'linear' alone, or parts among {', '.join(TARGET_PARTS)}"
                )
        self.targets = words
        self.include = check_patterns("include", include or None)
        self.exclude = check_patterns("exclude", exclude or None)
        given_targets = self.include or words != ["query", "value"]
        if self.peft_config.target_modules is not None and given_targets:
            raise ConfigurationError(
                f"peft_config.target_modules={self.peft_config.target_modules!r} and targets/include both choose the "
                "layers; give one of them"
            )
        if isinstance(train_modules, str) and train_modules != "auto":
            raise ConfigurationError(f"train_modules={train_modules!r} must be 'auto' or a list of name patterns")
        self.train_modules = (
            train_modules
            if isinstance(train_modules, str)
            else check_patterns("train_modules", list(train_modules)) or []
        )
        self.adapter_only = bool(adapter_only)
        self.int8_base = bool(int8_base)
        if self.int8_base and type(self.peft_config) is not peft.LoraConfig:
            raise ConfigurationError(
                f"int8_base=True works with LoraConfig only (peft's torchao path), not {type(self.peft_config).__name__}"
            )
        if self.int8_base and getattr(self.peft_config, "use_dora", False):
            raise ConfigurationError(
                "int8_base=True with use_dora=True is not supported by peft on CPU; use plain LoRA"
            )
        self.adapter = str(adapter) if adapter else None
        self.peft_dir = str(peft_dir) if peft_dir else None
        self.sparse_update = bool(sparse_update)
        if self.sparse_update and (type(self.peft_config) is not peft.LoraConfig or self.peft_config.use_dora):
            raise ConfigurationError(
                f"sparse_update=True masks LoRA's update B A; {type(self.peft_config).__name__}"
                f"{' with use_dora=True' if getattr(self.peft_config, 'use_dora', False) else ''} has no such update: "
                "use a plain LoraConfig"
            )
        self.block_paths = list(block_paths) if block_paths else None
        self.trainable_parameters = 0
        self.base_sha256: str | None = None
        self._base_source: str | None = None
        self.merged = False
        self._resolved: peft.PeftConfig | None = None
        self._requires_grad: dict[str, bool] = {}
        self._masks: dict[str, torch.Tensor] = {}

    @classmethod
    def from_checkpoint(cls, path: str | Path, **overrides: Any) -> ParameterEfficientTuning:
        """The technique that trained the adapter checkpoint at ``path``, set to apply it (``adapter=path``).

        What ``lightning-efficient predict --adapter <ckpt>`` adds to a run: the peft config (its resolved
        ``target_modules``) and ``int8_base`` as recorded in the checkpoint.

        Raises:
            DataError: Nothing is at ``path``.
            CheckpointMismatchError: The checkpoint was not trained with ParameterEfficientTuning.
        """
        checkpoint = load_checkpoint(path, mmap=True)
        recorded = recorded_structure(checkpoint).get(cls.name)
        if recorded is None:
            raise CheckpointMismatchError(
                f"checkpoint {str(path)!r} holds no adapter: it was not trained with ParameterEfficientTuning"
            )
        config = peft.PeftConfig.from_peft_type(**recorded["peft_config"])
        train_modules = adapter_record(checkpoint).get("train_modules", "auto")
        arguments = {
            "int8_base": recorded.get("int8_base", False),
            "sparse_update": recorded.get("sparse_update", False),
            "train_modules": train_modules,
            **overrides,
        }
        return cls(config, adapter=str(path), **arguments)

    @staticmethod
    def check_sources(init_args: Mapping[str, Any]) -> None:
        """Before anything is built (the CLI calls it): ``adapter`` must exist."""
        adapter = init_args.get("adapter")
        if adapter and not Path(adapter).exists():
            raise DataError(f"ParameterEfficientTuning: adapter={str(adapter)!r} does not exist")

    # -- choosing the layers --------------------------------------------------------------------
    def _target_names(self, pl_module: nn.Module) -> list[str]:
        """The qualified names (from ``pl_module``) of the modules to adapt (ours; peft's target_modules otherwise)."""
        owner = type(pl_module).__name__
        if self.include:
            return list(
                select_modules(pl_module, self.include, self.exclude, ("Linear",), block_paths=self.block_paths)
            )
        if self.targets == ["linear"]:
            return list(select_modules(pl_module, None, self.exclude, ("Linear",), block_paths=self.block_paths))
        names = []
        for block_name, block in select_blocks(pl_module, block_paths=self.block_paths).items():
            if architecture_of(block) is None:
                raise ConfigurationError(
                    f"ParameterEfficientTuning(targets={self.targets}) needs the architecture table's entry for "
                    f"{type(block).__name__} ({block_name}); register it, or choose layers with include=[...]"
                )
            view = block_view(block)
            modules = {module: name for name, module in block.named_modules()}
            chosen: list[nn.Module] = []
            for attention in view.attentions:
                if attention.fused and {"query", "key", "value"} & set(self.targets):
                    chosen.append(attention.module)
                elif not attention.fused:
                    parts = dict(zip(("query", "key", "value"), attention.projections))
                    chosen += [parts[word] for word in ("query", "key", "value") if word in self.targets]
                if "output" in self.targets:
                    chosen.append(attention.output)
            if view.ffn is not None:
                chosen += [getattr(view.ffn, part) for part in ("first", "second") if f"ffn_{part}" in self.targets]
            names += [f"{block_name}.{modules[module]}" for module in chosen]
        return match_names(names, None, self.exclude, "target layer", owner)

    def _ffn_second_layers(self, pl_module: nn.Module) -> list[nn.Module]:
        """The narrowing FFN projection of every known block (where IA3 rescales the FFN's activation)."""
        views = [
            block_view(block)
            for block in select_blocks(pl_module, block_paths=self.block_paths).values()
            if architecture_of(block) is not None
        ]
        return [view.ffn.second for view in views if view.ffn is not None]

    def _train_names(self, pl_module: nn.Module) -> list[str]:
        """The parameter names that train besides the adapters."""
        names = [name for name, _ in pl_module.named_parameters()]
        patterns = list(self.train_modules) if not isinstance(self.train_modules, str) else []
        patterns += [f"*{module}.*" for module in self.peft_config.modules_to_save or []]
        classifier = getattr(pl_module, "task", None) in ("sequence_classification", "image_classification")
        if self.train_modules == "auto" and classifier:
            patterns += [p for p in CLASSIFIER_HEADS if any(fnmatch.fnmatchcase(n, p) for n in names)]
        if not patterns:
            return []
        return match_names(names, patterns, None, "parameter", type(pl_module).__name__, "train_modules")

    def _check_task(self, pl_module: nn.Module) -> None:
        task_type = self.peft_config.task_type
        task = getattr(pl_module, "task", None)
        if task_type is None or task is None:
            return
        key = getattr(task_type, "value", task_type)
        if task not in PEFT_TASKS.get(key, ()):
            raise ConfigurationError(
                f"peft_config.task_type={key!r} does not fit {type(pl_module).__name__}, a {task} model; "
                f"leave task_type unset (we choose the layers), or use a model of that task"
            )

    # -- surgery --------------------------------------------------------------------------------
    def apply(self, pl_module: nn.Module) -> Any:
        """Inject the adapters (the base fingerprinted first, quantized for ``int8_base``); freeze all else but the head.

        Returns:
            The handles of the ``load_state_dict`` hook that accepts adapter-only state dicts and, with
            ``sparse_update``, of the layers' masked-update hooks.
        """
        self._check_task(pl_module)
        root, prefix = _adapter_root(pl_module)
        config = copy.deepcopy(self.peft_config)
        config.modules_to_save = None  # the head trains in place (train_modules), without peft's copy
        if config.target_modules is None:
            names = self._target_names(pl_module)
            config.target_modules = {name[len(prefix) :] for name in names}  # a set, as peft keeps a list it is given
            if isinstance(config, peft.IA3Config) and config.feedforward_modules is None:
                ffn = {id(module) for module in self._ffn_second_layers(pl_module)}  # IA3 scales their input
                modules = dict(pl_module.named_modules())
                config.feedforward_modules = {n[len(prefix) :] for n in names if id(modules[n]) in ffn}
        train = set(self._train_names(pl_module))
        self._requires_grad = {name: p.requires_grad for name, p in pl_module.named_parameters()}
        frozen = [(n, p) for n, p in pl_module.named_parameters() if n not in train]
        self.base_sha256 = base_fingerprint(frozen)
        self._base_source = getattr(pl_module, "initialised_from", None)
        if self.int8_base:
            self._quantize_base(pl_module)
        try:
            with warnings.catch_warnings():  # int8 base: peft says its own merge would fail; ours merges instead
                warnings.filterwarnings("ignore", message=".*instantiated without `get_apply_tensor_subclass`")
                peft.inject_adapter_in_model(config, root, adapter_name="default")
        except ValueError as error:  # peft's "Target modules ... not found": ours says which ones there are
            first = str(error).splitlines()[0][:300]
            raise ConfigurationError(f"ParameterEfficientTuning: peft could not place the adapters: {first}") from None
        self._resolved = config
        adapters = _adapter_parameter_names(pl_module)
        for name, parameter in pl_module.named_parameters():
            parameter.requires_grad_(name in train or name in adapters)
        self.trainable_parameters = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self.merged = False
        self._masks = {}
        if self.adapter:
            self.load_adapter(pl_module, self.adapter)
        handles = [pl_module.register_load_state_dict_post_hook(self._accept_missing_base)]
        if self.sparse_update:
            for layer in adapter_layers(pl_module).values():
                layer._active_adapter = []  # peft's own update off: the hook adds the masked one
                handles.append(layer.register_forward_hook(_add_masked_update))
        return handles

    def _quantize_base(self, pl_module: nn.Module) -> None:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        names = set(select_modules(pl_module, None, None, ("Linear",), block_paths=self.block_paths))
        quantize_(pl_module, Int8WeightOnlyConfig(), filter_fn=lambda module, name: name in names)

    def remove(self, pl_module: nn.Module) -> None:
        """Take the adapters out (unmerging them first) and give every parameter its ``requires_grad`` back.

        The int8 quantization of ``int8_base`` is not undone (it was lossy by design).
        """
        if self.merged:
            self.unmerge(pl_module)
        super().remove(pl_module)
        self._unload(pl_module)
        self._restore_requires_grad(pl_module)

    def _unload(self, pl_module: nn.Module) -> None:
        for name, layer in adapter_layers(pl_module).items():
            parent, _, child = name.rpartition(".")
            setattr(pl_module.get_submodule(parent) if parent else pl_module, child, layer.get_base_layer())

    def _restore_requires_grad(self, pl_module: nn.Module) -> None:
        for name, parameter in pl_module.named_parameters():
            parameter.requires_grad_(self._requires_grad.get(name, True))

    def surgery(self) -> dict[str, Any] | None:
        config = self._resolved or self.peft_config
        plain = plain_peft_config(config)
        targets = plain.get("target_modules")
        where = f"{len(targets)} layers" if isinstance(targets, list) else repr(targets)
        rank = f"r={plain['r']}" if "r" in plain else ""
        return {
            "technique": f"ParameterEfficientTuning({type(config).__name__}({rank}) on {where}"
            f"{', int8 base' if self.int8_base else ''})",
            "peft_config": plain,
            "int8_base": self.int8_base,
            "sparse_update": self.sparse_update,
        }

    # -- checkpoints ----------------------------------------------------------------------------
    def _frozen_keys(self, pl_module: nn.Module) -> set[str]:
        """State-dict keys of the frozen parameters (tied copies included)."""
        return {n for n, p in pl_module.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Record the base (hash, source); with ``adapter_only``, leave its frozen weights out."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        dropped = 0
        if self.adapter_only and self.is_applied:
            state = checkpoint.get("state_dict") or {}
            for key in self._frozen_keys(pl_module) & set(state):
                del state[key]
                dropped += 1
        write_metadata(
            checkpoint,
            **{
                ADAPTER_FIELD: {
                    "base_sha256": self.base_sha256,
                    "base": self._base_source,
                    "adapter_only": bool(dropped),
                    "train_modules": _plain_train_modules(self.train_modules),
                }
            },
        )

    def check_checkpoint(self, checkpoint: Mapping[str, Any], name: str) -> None:
        """Fail when an adapter-only ``checkpoint`` was trained on another base than this run's.

        Raises:
            CheckpointMismatchError: The recorded base hash differs from :attr:`base_sha256`; names both bases.
        """
        record = adapter_record(checkpoint)
        if not record.get("adapter_only") or self.base_sha256 is None:
            return  # a full checkpoint carries its base
        if record.get("base_sha256") != self.base_sha256:
            theirs = record.get("base") or "weights of their own (no pretrained=)"
            ours = self._base_source or "weights of its own (no pretrained=)"
            raise CheckpointMismatchError(
                f"adapter checkpoint {name!r} was trained on base {theirs} (sha256 {str(record.get('base_sha256'))[:12]}), "
                f"but this run's base is {ours} (sha256 {self.base_sha256[:12]}): start the run from the base it "
                "was trained on (model.pretrained)"
            )

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Fit from a checkpoint: the base check, for a user's module too (ours check it before weights load)."""
        self.check_checkpoint(checkpoint, str(trainer.ckpt_path))

    def _accept_missing_base(self, module: nn.Module, incompatible: Any) -> None:
        """A ``load_state_dict`` post-hook: an adapter-only state dict may lack the frozen base's keys, all of them.

        Anything else missing (an adapter weight, part of the base) stays an error of a strict load.
        """
        frozen = self._frozen_keys(module)
        if frozen and frozen <= set(incompatible.missing_keys):
            incompatible.missing_keys[:] = [key for key in incompatible.missing_keys if key not in frozen]

    # -- applying saved adapters ----------------------------------------------------------------
    def load_adapter(self, pl_module: nn.Module, path: str | Path) -> None:
        """Load adapter weights (and trained head) from an adapter checkpoint or a :meth:`save_pretrained` directory.

        Raises:
            DataError: ``path`` does not exist.
            CheckpointMismatchError: Another base (a checkpoint's hash), another adapter config, or keys
                that do not fit this model.
        """
        path = Path(path)
        if not path.exists():
            raise DataError(f"adapter {str(path)!r} does not exist")
        prefix = _adapter_root(pl_module)[1]
        trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        if path.is_dir():
            from safetensors.torch import load_file

            saved = load_file(str(path / _SAFETENSORS))
            saved = {k.removeprefix("base_model.model."): v for k, v in saved.items()}
            state = {}
            for key, value in saved.items():  # adapter weights gain the adapter's name; the head keeps its own
                name = prefix + _with_adapter_name(key)
                state[name if name in trainable else prefix + key] = value
        else:
            checkpoint = load_checkpoint(path)
            self.check_checkpoint(checkpoint, str(path))
            recorded = recorded_structure(checkpoint).get(self.name)
            ours = self.surgery()
            if recorded is not None and recorded.get("peft_config") != ours["peft_config"]:
                raise CheckpointMismatchError(
                    f"adapter {str(path)!r} was trained with {recorded['technique']}, not {ours['technique']}"
                )
            state = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        missing = sorted(trainable - set(state))
        unexpected = sorted(set(state) - trainable)
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"adapter {str(path)!r} does not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        with torch.no_grad():
            parameters = dict(pl_module.named_parameters())
            for key, value in state.items():
                parameters[key].copy_(value)

    def save_pretrained(self, pl_module: nn.Module, directory: str | Path) -> Path:
        """Write the adapters (and trained head) in peft's format: ``adapter_config.json`` and ``adapter_model.safetensors``.

        ``peft.PeftModel.from_pretrained(base_model, directory)`` loads it on the transformers base
        model (``pl_module.model``); the head trained through ``train_modules`` is saved as peft's
        ``modules_to_save``. peft's format has no mask: a ``sparse_update`` adapter loaded by peft applies
        its update densely (a warning says so).

        Raises:
            ConfigurationError: The adapters are not applied to ``pl_module``, or are merged.
        """
        from safetensors.torch import save_file

        self._require_applied(pl_module, "save_pretrained")
        if self.sparse_update:
            warnings.warn(
                "save_pretrained: peft's format has no mask, so PeftModel applies this sparse_update adapter densely "
                "(another model); ParameterEfficientTuning(adapter=...) applies it masked, or export the merged model",
                UserWarning,
                stacklevel=2,
            )
        root, prefix = _adapter_root(pl_module)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {f"base_model.model.{k}": v.contiguous() for k, v in peft.get_peft_model_state_dict(root).items()}
        adapters = _adapter_parameter_names(pl_module)
        heads = sorted(
            n for n, p in pl_module.named_parameters() if p.requires_grad and n not in adapters and n.startswith(prefix)
        )
        for name in heads:
            state[f"base_model.model.{name[len(prefix) :]}"] = pl_module.get_parameter(name).detach().contiguous()
        config = copy.deepcopy(self._resolved)
        config.modules_to_save = sorted({n[len(prefix) :].rpartition(".")[0] for n in heads}) or None  # module paths
        config.base_model_name_or_path = getattr(pl_module, "initialised_from", None)
        config.save_pretrained(str(directory))
        save_file({k: v.detach().cpu() for k, v in state.items()}, str(directory / _SAFETENSORS))
        return directory

    # -- merging --------------------------------------------------------------------------------
    def _require_applied(self, pl_module: nn.Module, verb: str) -> None:
        if self.merged:
            raise ConfigurationError(f"{verb}: the adapters are already merged into the base; merge once")
        if self._applied_to is not pl_module or not adapter_layers(pl_module):
            raise ConfigurationError(f"{verb}: ParameterEfficientTuning's adapters are not applied to this model")

    @torch.no_grad()
    def merge(self, pl_module: nn.Module, keep_zeros: bool = True, unload: bool = True) -> dict[str, Any]:
        """Fold the adapters into the base weights (peft's ``merge``), keeping the base's zeros.

        Args:
            pl_module: The model the adapters are applied to.
            keep_zeros: Multiply each merged weight by its base's mask (the pruning package's
                ``weight_mask``, else the base's non-zero entries), so a pruned base keeps its sparsity
                exactly; False adds the dense update everywhere.
            unload: Replace each adapted layer by its merged base layer (a plain model; the technique lets
                go of it). False keeps the adapter layers, inactive, so :meth:`unmerge` can take the update out
                again (float bases only).

        Returns:
            ``{"merged": layers, "int8": whether the base was int8 (merged in float, quantized again),
            "zeros_kept": zero weights of the merged layers kept zero}``.

        Raises:
            ConfigurationError: Merged already, not applied, or ``unload=False`` on an int8 base.
        """
        self._require_applied(pl_module, "merge")
        if self.int8_base and not unload:
            raise ConfigurationError("merge(unload=False) on an int8 base: an int8 merge quantizes again; unload=True")
        layers = adapter_layers(pl_module)
        kept = 0
        for name, layer in layers.items():
            base = layer.get_base_layer()
            mask = _layer_mask(base) if keep_zeros else None
            if self.int8_base:
                self._merge_int8(layer, base, mask)
            else:
                layer._active_adapter = ["default"]  # (sparse_update turned peft's own update off)
                layer.merge(safe_merge=True)
            if mask is not None:
                if not self.int8_base:  # (an int8 merge masks before quantizing again)
                    base.weight.data.mul_(mask.to(base.weight.dtype))
                self._masks[name] = mask
                kept += int((~mask).sum())
        self.merged = True
        report = {"merged": len(layers), "int8": self.int8_base, "zeros_kept": kept}
        if unload:
            Technique.remove(self, pl_module)  # the load hook
            self._unload(pl_module)
            self._restore_requires_grad(pl_module)
            self._applied_to = None
        return report

    @staticmethod
    def _merge_int8(layer: BaseTunerLayer, base: nn.Module, mask: torch.Tensor | None) -> None:
        """Dequantize the int8 base weight, add the LoRA update (times ``mask``), and quantize it again."""
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        weight = base.weight.detach().dequantize()
        merged = weight + layer.get_delta_weight("default").to(weight.dtype)
        if mask is not None:
            merged = merged * mask.to(weight.dtype)
        base.weight = nn.Parameter(merged, requires_grad=False)
        quantize_(base, Int8WeightOnlyConfig())

    @torch.no_grad()
    def unmerge(self, pl_module: nn.Module) -> None:
        """Take a merged update (``merge(unload=False)``) out of the base again.

        Raises:
            ConfigurationError: Nothing is merged, or the merge was unloaded or quantized (int8).
        """
        if not self.merged:
            raise ConfigurationError("unmerge: the adapters are not merged")
        if self.int8_base:
            raise ConfigurationError(
                "unmerge: a merged int8 model cannot be unmerged (quantizing the merged weight rounded the update "
                "into it); load the base and the adapter again instead"
            )
        layers = adapter_layers(pl_module)
        if self._applied_to is not pl_module or not layers:
            raise ConfigurationError("unmerge: the merge unloaded the adapters (merge(unload=False) keeps them)")
        for name, layer in layers.items():
            layer.unmerge()
            if name in self._masks:
                base = layer.get_base_layer()
                base.weight.data.mul_(self._masks[name].to(base.weight.dtype))
            if self.sparse_update:
                layer._active_adapter = []
        self._masks = {}
        self.merged = False

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the adapters in peft's format to ``peft_dir`` (rank 0), when it is set."""
        if self.peft_dir and trainer.is_global_zero and self._applied_to is pl_module and not self.merged:
            directory = self.save_pretrained(pl_module, Path(trainer.default_root_dir) / self.peft_dir)
            rank_zero_info(f"ParameterEfficientTuning: adapters in peft's format in {directory}")

    # -- reporting ------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Say what trains (one info line, and the logged counts); warn when the frozen base was never trained."""
        if hasattr(pl_module, "initialised_from") and pl_module.initialised_from is None and not self.adapter:
            warnings.warn(
                f"ParameterEfficientTuning: {type(pl_module).__name__} was built without pretrained weights, so the "
                "frozen base is its random initialisation; set model.pretrained to fine-tune trained weights",
                UserWarning,
                stacklevel=2,
            )
        total = sum(p.numel() for p in pl_module.parameters())
        fraction = self.trainable_parameters / max(total, 1)
        config = self._resolved
        rank_zero_info(
            f"ParameterEfficientTuning: {type(config).__name__} on {len(adapter_layers(pl_module))} layers; "
            f"{self.trainable_parameters:,} of {total:,} parameters train ({fraction:.2%})"
        )
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"{self.name}/trainable_parameters": float(self.trainable_parameters),
                 f"{self.name}/trainable_fraction": fraction},
                step=trainer.global_step,
            )  # fmt: skip


def _with_adapter_name(key: str) -> str:
    """A peft-format key (no adapter name) as the in-memory key of adapter ``default`` (``lora_A.weight`` ->
    ``lora_A.default.weight``)."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "hada_w1_a", "hada_w1_b",
                    "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w2"):  # fmt: skip
            return ".".join([*parts[: i + 1], "default", *parts[i + 1 :]])
    if parts[-1] in ("ia3_l", "lora_magnitude_vector", "hada_t1", "hada_t2"):
        return ".".join([*parts, "default"])
    return key


def _add_masked_update(layer: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a LoRA layer under ``sparse_update``: its base's output plus ``(M * B A) x`` (scaled).

    ``M`` is read from the base at every call (:func:`_layer_mask`), so masks that a pruning technique changes
    during the run are followed. A merged layer's base already holds the update.
    """
    if layer.merged:
        return output
    delta = layer.get_delta_weight("default")
    mask = _layer_mask(layer.get_base_layer())
    inputs = layer.lora_dropout["default"](args[0].to(delta.dtype))
    return output + F.linear(inputs, delta * mask.to(delta.dtype)).to(output.dtype)


def _plain_train_modules(train_modules: str | Sequence[str]) -> str | list[str]:
    return train_modules if isinstance(train_modules, str) else list(train_modules)


def _adapter_parameter_names(model: nn.Module) -> set[str]:
    """Qualified names of the adapters' own parameters (every parameter of an adapter layer but its base layer's)."""
    return {
        f"{layer_name}.{name}"
        for layer_name, layer in adapter_layers(model).items()
        for name, _ in layer.named_parameters()
        if not name.startswith("base_layer.")
    }
