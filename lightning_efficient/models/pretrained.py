"""Where a module's starting weights come from: ``pretrained=`` a checkpoint of ours, a directory, or a hub id.

Every LightningModule of the package takes ``pretrained``:

- one of our ``.ckpt`` files: the module is built from its own arguments (checked against the
  checkpoint's shape, naming every differing field) and the checkpoint's weights are copied in;
  a checkpoint of a model that itself started from a transformers directory carries that model's
  config, and the module is built from it;
- a directory written by transformers' ``save_pretrained`` (or by
  :func:`~lightning_efficient.callbacks.export_pruned` then ``save_pretrained``): the model class
  comes from its ``config.json`` through transformers' ``Auto*`` classes (any BERT-like encoder for
  the masked LM and the classifier, BART / Marian for translation, ViT for images); its
  ``tokenizer.json``, when there is one, is the model's tokenizer;
- a Hugging Face hub id (``"distilbert-base-uncased"``): downloaded into the Hugging Face cache,
  then read as a directory. Without a network an id that is not cached fails with one short message.

Tokenizers: the BERT data modules and models take a public BERT's or RoBERTa's ``tokenizer.json``
as it is. They find the special tokens by name (``[PAD] [CLS] [SEP] [MASK]`` or ``<pad> <s> </s>
<mask>``) at any ids, pad with its pad id, and mask with its mask id
(:func:`~lightning_efficient.data.tokenizers.find_special_ids`). The model's ``config.pad_token_id``
must be the tokenizer's pad id (checked in ``setup``). The translation data module still needs its
own layout, ``<pad> </s> <unk>`` at ids 0..2, so BART's tokenizer (``<s>`` 0, ``<pad>`` 1) is refused.

Examples:
    >>> describe_source("runs/mlm/last.ckpt")
    Traceback (most recent call last):
    ...
    lightning_efficient.errors.DataError: pretrained='runs/mlm/last.ckpt' does not exist; give one of our .ckpt files, a directory written by save_pretrained, or a Hugging Face hub id
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from torch import nn

from lightning_efficient.checkpoint import checkpoint_module_class, load_checkpoint, read_tokenizer
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError, DataError
from lightning_efficient.exported import QUANTIZATION_FILE, apply_recorded_shapes, load_pruned

__all__ = [
    "AUTO_CLASSES",
    "HUB_FILES",
    "PretrainedSource",
    "describe_source",
    "directory_tokenizer",
    "model_from_config",
    "model_from_directory",
    "resolve_pretrained",
    "tokenizer_source",
]

#: The transformers ``Auto*`` class that picks the model class of each task from a config.
AUTO_CLASSES: dict[str, str] = {
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "image_classification": "AutoModelForImageClassification",
}
#: Files fetched for a hub id: config, weights, tokenizer and image-processor files.
HUB_FILES = ["*.json", "*.safetensors", "*.spm", "*.model", "vocab.txt", "merges.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PATH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".json")
_HINT = "give one of our .ckpt files, a directory written by save_pretrained, or a Hugging Face hub id"


@dataclass
class PretrainedSource:
    """A resolved ``pretrained`` argument.

    Attributes:
        name: The argument as given (a path or a hub id), for messages and ``initialised_from``.
        kind: ``"checkpoint"`` (one of our ``.ckpt`` files) or ``"directory"`` (``save_pretrained``).
        path: The local file or directory (a hub id resolves to its Hugging Face cache directory).
        checkpoint: The loaded checkpoint (``kind == "checkpoint"``), else None.
    """

    name: str
    kind: str
    path: Path
    checkpoint: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def module(self) -> str | None:
        """The module class of ours that wrote a checkpoint (None for a directory or a foreign file)."""
        return checkpoint_module_class(self.checkpoint) if self.checkpoint is not None else None

    @property
    def hyper_parameters(self) -> dict[str, Any]:
        """The checkpoint's hyperparameters (empty for a directory)."""
        return dict((self.checkpoint or {}).get("hyper_parameters", {}))

    @property
    def model_config(self) -> dict[str, Any] | None:
        """The transformers config a checkpoint carries when its model started from a directory, else None."""
        return self.hyper_parameters.get("model_config")

    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer that comes with the weights: a checkpoint's, or a directory's (None when it has none)."""
        if self.checkpoint is not None:
            return read_tokenizer(self.checkpoint)
        return directory_tokenizer(self.path, self.name)


def describe_source(source: str | Path) -> tuple[str, Path]:
    """``(kind, local path)`` of a ``pretrained`` argument, without loading it: ``checkpoint``, ``directory`` or ``hub``.

    A hub id is not looked up here (its path is the id itself).

    Raises:
        DataError: A path that does not exist (anything that is not shaped like a hub id), or a
            directory without ``config.json``.

    Examples:
        >>> describe_source("distilbert-base-uncased")
        ('hub', PosixPath('distilbert-base-uncased'))
    """
    path = Path(source).expanduser()
    if path.is_file():
        return "checkpoint", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DataError(f"pretrained={str(source)!r} is a directory without config.json; {_HINT}")
        return "directory", path
    text = str(source)
    if not _HUB_ID.match(text) or text.endswith(_PATH_SUFFIXES) or text.startswith("."):
        raise DataError(f"pretrained={text!r} does not exist; {_HINT}")
    return "hub", path


def _download(repo_id: str) -> Path:
    """The local snapshot of hub model ``repo_id`` (config, weights, tokenizer), downloaded when not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
        if not any(path.glob("*.safetensors")):  # an older repository with PyTorch weights only
            path = Path(snapshot_download(repo_id, allow_patterns=[*HUB_FILES, "*.bin"]))
        return path
    except LocalEntryNotFoundError:
        message = (
            f"pretrained={repo_id!r} is not a local file or directory, and the hub id could not be found locally "
            "(not in the Hugging Face cache) and there is no network to download it; "
            f"{_HINT} on this machine, or run once where there is a network"
        )
    except RepositoryNotFoundError:
        message = f"pretrained={repo_id!r}: no such model on the Hugging Face hub (or it is private); {_HINT}"
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        message = f"pretrained={repo_id!r} could not be downloaded from the Hugging Face hub ({first_line}); {_HINT}"
    raise DataError(message) from None  # one line, not the hub client's chained tracebacks


def resolve_pretrained(source: str | Path) -> PretrainedSource:
    """Resolve a ``pretrained`` argument: load a checkpoint of ours, check a directory, or download a hub id.

    Raises:
        DataError: The path does not exist, is not a checkpoint torch can read, or the hub id
            cannot be found (see :func:`describe_source`).
    """
    kind, path = describe_source(source)
    if kind == "hub":
        return PretrainedSource(str(source), "directory", _download(str(source)))
    if kind == "directory":
        return PretrainedSource(str(source), kind, path)
    checkpoint = load_checkpoint(path)  # a truncated or foreign file: "checkpoint <path> is truncated or not ..."
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise DataError(f"pretrained={str(source)!r} is not a Lightning checkpoint (no state_dict); {_HINT}")
    return PretrainedSource(str(source), kind, path, dict(checkpoint))


def tokenizer_source(pretrained: str | Path | None) -> str | None:
    """What a text DataModule's ``tokenizer`` argument should be for a model started from ``pretrained``.

    Our checkpoint itself, a directory's ``tokenizer.json``, or None (no tokenizer comes with the
    weights: the data module trains one, whose size the model then checks). Looks nothing up on the hub.

    Examples:
        >>> tokenizer_source(None), tokenizer_source("distilbert-base-uncased")
        (None, None)
    """
    if not pretrained:
        return None
    try:
        kind, path = describe_source(pretrained)
    except DataError:
        return None  # the model reports it, with the whole message
    if kind == "checkpoint":
        return str(path)
    if kind == "directory" and (path / "tokenizer.json").is_file():
        return str(path / "tokenizer.json")
    return None


def directory_tokenizer(path: Path, name: str) -> Tokenizer | None:
    """The tokenizer saved beside a model: ``tokenizer.json``, or a sentencepiece one converted; None without one.

    Raises:
        ConfigurationError: The directory holds a sentencepiece tokenizer (``*.spm``, Marian's) and
            the optional package ``sentencepiece`` is missing, or that tokenizer has no
            ``tokenizers`` form our data modules can use.
    """
    file = path / "tokenizer.json"
    if file.is_file():
        return Tokenizer.from_file(str(file))
    if not any(path.glob("*.spm")) and not any(path.glob("*.model")):
        return None
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            f"pretrained={name!r} has a sentencepiece tokenizer (e.g. Marian's source.spm), which needs the optional "
            "package sentencepiece: pip install 'lightning-efficient[sentencepiece]'"
        ) from None
    from transformers import AutoTokenizer

    slow = AutoTokenizer.from_pretrained(path)
    backend = getattr(slow, "backend_tokenizer", None)
    if backend is None:
        try:
            from transformers.convert_slow_tokenizer import convert_slow_tokenizer

            backend = convert_slow_tokenizer(slow)
        except Exception as err:  # noqa: BLE001 - the converters raise anything for an unknown tokenizer
            raise ConfigurationError(
                f"pretrained={name!r}: its {type(slow).__name__} has no tokenizers (tokenizer.json) form that our "
                f"data modules can use ({err}); give the data module a tokenizer .json of the same vocabulary"
            ) from None
    return backend


def _auto_class(task: str) -> Any:
    import transformers

    return getattr(transformers, AUTO_CLASSES[task])


def _model_class(config: Any, task: str, name: str) -> type:
    """The transformers class that ``Auto*`` picks for ``config`` and ``task``, or a clear error."""
    auto = _auto_class(task)
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        raise ConfigurationError(
            f"pretrained={name!r} is a {config.model_type!r} model, which {auto.__name__} cannot load "
            f"(no {task.replace('_', ' ')} class for it in transformers)"
        ) from None


def model_from_config(config: Mapping[str, Any], task: str, name: str = "model_config") -> nn.Module:
    """A randomly initialised transformers model of ``task`` from a config dict (``config.to_dict()``).

    Layer shapes recorded by :func:`~lightning_efficient.callbacks.export_pruned` are applied, so a
    checkpoint of a pruned model rebuilds with its own shapes before its weights load.

    Examples:
        >>> from transformers import DistilBertConfig
        >>> config = DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=20).to_dict()
        >>> type(model_from_config(config, "masked_lm")).__name__
        'DistilBertForMaskedLM'
    """
    from transformers import AutoConfig

    values = dict(config)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ConfigurationError(f"{name} has no model_type; it must be a transformers config.to_dict()")
    built = AutoConfig.for_model(model_type, **values)
    model = _model_class(built, task, name)(built)
    apply_recorded_shapes(model, built)
    return model


def model_from_directory(source: PretrainedSource, task: str, **overrides: Any) -> nn.Module:
    """Load a ``save_pretrained`` directory as the ``task`` model that transformers' ``Auto*`` class picks.

    ``overrides`` replace config fields (``num_labels``, ``id2label``); a head whose shape they
    change (a classifier with another label count) starts fresh, as do heads the directory lacks
    (a classifier started from a masked LM). A directory written after
    :func:`~lightning_efficient.callbacks.export_pruned` with per-layer shapes loads through
    :func:`~lightning_efficient.callbacks.load_pruned`.

    Raises:
        ConfigurationError: The config's model type has no class for ``task``, or the directory
            holds an int8 model of ``save_quantized`` (for inference only).
    """
    from transformers import AutoConfig

    if (source.path / QUANTIZATION_FILE).is_file():
        raise ConfigurationError(
            f"pretrained={source.name!r} holds an int8 model written by save_quantized: it is for inference "
            "(lightning_efficient.callbacks.load_quantized); start training from the float model it was converted from"
        )
    config = AutoConfig.from_pretrained(source.path, local_files_only=True)
    model_class = _model_class(config, task, source.name)
    if getattr(config, "pruned_linears", None):
        model = load_pruned(source.path, model_class).train()
        differing = {k: (v, getattr(model.config, k, None)) for k, v in overrides.items() if k in ("num_labels",)}
        differing = {k: pair for k, pair in differing.items() if pair[0] != pair[1]}
        if differing:
            detail = ", ".join(f"{k}: ours {a} vs saved {b}" for k, (a, b) in differing.items())
            raise CheckpointMismatchError(f"pretrained={source.name!r} is a pruned model of another head ({detail})")
        return model
    for key, value in overrides.items():
        setattr(config, key, value)
    return model_class.from_pretrained(
        source.path, config=config, ignore_mismatched_sizes=True, local_files_only=True
    ).train()
