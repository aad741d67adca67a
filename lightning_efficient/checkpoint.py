"""Our checkpoint metadata, written and read in one place.

Every checkpoint written by one of the package's LightningModules carries a dict under
``checkpoint["lightning_efficient"]`` (:data:`CHECKPOINT_KEY`): the name of the module class that
wrote it (``module``), the tokenizer of text models (``tokenizer``, its JSON string), and the
module's own records (random states, ``mask_generator``, ``initialised_from``). A checkpoint
without it was not written by us and loads as Lightning would load it.

Writers add fields with :func:`write_metadata` (and :func:`write_tokenizer`); readers take the
dict of a loaded checkpoint with :func:`read_metadata`, or of a file, without loading its
tensors or building anything, with :func:`read_checkpoint_metadata`. The key and the field names
are those of release 0.1.0, so its checkpoints load unchanged.

Examples:
    >>> checkpoint = {"state_dict": {}}
    >>> write_metadata(checkpoint, module="BertMLM")
    {'module': 'BertMLM'}
    >>> read_metadata(checkpoint), checkpoint_module_class(checkpoint)
    ({'module': 'BertMLM'}, 'BertMLM')
    >>> check_module(checkpoint, "Translation")
    Traceback (most recent call last):
    ...
    lightning_efficient.errors.CheckpointMismatchError: the checkpoint was written by BertMLM, not by Translation; use a BertMLM config for it, or a Translation checkpoint
    >>> read_metadata({"state_dict": {}}) is None  # a plain Lightning checkpoint
    True
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lightning_efficient.errors import CheckpointMismatchError, DataError

__all__ = [
    "CHECKPOINT_KEY",
    "check_module",
    "checkpoint_module_class",
    "checkpoint_tokenizer",
    "read_checkpoint_metadata",
    "read_metadata",
    "read_tokenizer",
    "write_metadata",
    "write_tokenizer",
]

#: Key of the dict that our LightningModules add to every checkpoint (module name, tokenizer, records).
CHECKPOINT_KEY = "lightning_efficient"


def write_metadata(checkpoint: MutableMapping[str, Any], **fields: Any) -> dict[str, Any]:
    """Add ``fields`` to our metadata of ``checkpoint`` (creating it when absent); returns the metadata.

    Fields already there and not named keep their value, so a technique's records written
    earlier in the same save survive the module's.

    Examples:
        >>> checkpoint = {}
        >>> _ = write_metadata(checkpoint, module="ViTClassifier")
        >>> write_metadata(checkpoint, initialised_from=None)
        {'module': 'ViTClassifier', 'initialised_from': None}
    """
    metadata = checkpoint.setdefault(CHECKPOINT_KEY, {})
    metadata.update(fields)
    return metadata


def read_metadata(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """Our metadata of a loaded checkpoint, or None when none of our modules wrote it."""
    return checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, Mapping) else None


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any] | None:
    """Our metadata of a checkpoint file (None when none of our modules wrote it), building nothing.

    The file is memory-mapped with ``weights_only=True``: no tensor of its weights is read and no
    code of it runs.

    Raises:
        DataError: The file does not exist or is not a checkpoint torch can read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors stay on disk
    except Exception as err:
        raise DataError(f"checkpoint {str(path)!r} cannot be read: {err}") from err
    return read_metadata(checkpoint)


def checkpoint_module_class(checkpoint: Mapping[str, Any] | str | Path) -> str | None:
    """Name of the LightningModule class that wrote a checkpoint of ours (None for foreign ones).

    Args:
        checkpoint: A loaded checkpoint, or the path of a file (read with :func:`read_checkpoint_metadata`).
    """
    metadata = read_metadata(checkpoint) if isinstance(checkpoint, Mapping) else read_checkpoint_metadata(checkpoint)
    return (metadata or {}).get("module")


def check_module(checkpoint: Mapping[str, Any], module: str) -> None:
    """Fail unless a checkpoint of ours was written by the module class named ``module``.

    A checkpoint without our metadata passes (it loads as Lightning would load it).

    Raises:
        CheckpointMismatchError: Another of our module classes wrote it.
    """
    metadata = read_metadata(checkpoint)
    if metadata is not None and metadata.get("module") != module:
        written_by = metadata.get("module")
        raise CheckpointMismatchError(
            f"the checkpoint was written by {written_by}, not by {module}; "
            f"use a {written_by} config for it, or a {module} checkpoint"
        )


def write_tokenizer(checkpoint: MutableMapping[str, Any], tokenizer: Tokenizer) -> None:
    """Store ``tokenizer`` in our metadata of ``checkpoint`` (as its JSON string)."""
    write_metadata(checkpoint, tokenizer=tokenizer.to_str())


def read_tokenizer(checkpoint: Mapping[str, Any]) -> Tokenizer | None:
    """The tokenizer stored in a loaded checkpoint, or None when it holds none.

    Examples:
        >>> from tokenizers import models
        >>> checkpoint = {}
        >>> write_tokenizer(checkpoint, Tokenizer(models.WordLevel({"[PAD]": 0, "cat": 1}, unk_token="[PAD]")))
        >>> read_tokenizer(checkpoint).token_to_id("cat"), read_tokenizer({})
        (1, None)
    """
    text = (read_metadata(checkpoint) or {}).get("tokenizer")
    return Tokenizer.from_str(text) if text else None


def checkpoint_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer stored in a checkpoint file of ours (its tensors are not read).

    Raises:
        DataError: The file does not exist or cannot be read.
        CheckpointMismatchError: The checkpoint holds no tokenizer (e.g. a ViT checkpoint).
    """
    metadata = read_checkpoint_metadata(path) or {}
    if not metadata.get("tokenizer"):
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} holds no tokenizer (written by {metadata.get('module', 'an unknown module')}); "
            "text models need a checkpoint of BertMLM, BertClassifier or Translation"
        )
    return Tokenizer.from_str(metadata["tokenizer"])
