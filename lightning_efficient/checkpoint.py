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

import pickle
import zipfile
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO
from tokenizers import Tokenizer

from lightning_efficient.atomic_write import write_atomically
from lightning_efficient.errors import CheckpointMismatchError, CorruptCheckpointError, DataError

__all__ = [
    "ADAPTER_FIELD",
    "CHECKPOINT_KEY",
    "DISTRIBUTED_METADATA",
    "PRUNING_MASK_SUFFIXES",
    "PRUNING_STATE_KEY",
    "STRUCTURE_FIELD",
    "AtomicCheckpointIO",
    "adapter_record",
    "check_module",
    "check_pruning_masks",
    "check_structure",
    "checkpoint_module_class",
    "checkpoint_tokenizer",
    "is_distributed_checkpoint",
    "load_checkpoint",
    "pruning_hint",
    "pruning_mask_keys",
    "read_checkpoint_metadata",
    "read_metadata",
    "read_tokenizer",
    "record_structure",
    "recorded_structure",
    "trained_with_pruning",
    "write_metadata",
    "write_tokenizer",
]

#: Our metadata's field describing the adapters of a ParameterEfficientTuning run (base hash and source, adapter-only).
ADAPTER_FIELD = "adapter"

#: Key of the dict that our LightningModules add to every checkpoint (module name, tokenizer, records).
CHECKPOINT_KEY = "lightning_efficient"

#: The file of a distributed checkpoint's folder that holds everything but the sharded tensors (Lightning's name).
DISTRIBUTED_METADATA = "meta.pt"

#: Our metadata's field recording the techniques that changed the model's structure (:func:`record_structure`).
STRUCTURE_FIELD = "structure"

#: Where a checkpoint keeps MagnitudePruning's callback state (its ``state_key``), and how its mask buffers end.
PRUNING_STATE_KEY = "lightning_efficient.pruning"
PRUNING_MASK_SUFFIXES = (".weight_mask", ".bias_mask")


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


def is_distributed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a distributed checkpoint: a folder of shards with the rest in :data:`DISTRIBUTED_METADATA`.

    Tensor-parallel runs (``TensorParallelStrategy``, Lightning's ``ModelParallelStrategy``) write these.
    """
    path = Path(path)
    return path.is_dir() and (path / DISTRIBUTED_METADATA).is_file()


def _not_a_checkpoint(path: Path) -> str | None:
    """Why the file at ``path`` cannot be a checkpoint written by ``torch.save``, or None when it may be one."""
    with path.open("rb") as file:
        head = file.read(4)
    if not head:
        return "the file is empty"
    if zipfile.is_zipfile(path):
        return None
    if head == b"PK\x03\x04":
        return "its zip archive is cut short: the end of the file is missing"
    if head[:1] != b"\x80":  # neither torch.save's zip format nor its legacy pickle format
        return "it is not a file written by torch.save"
    return None


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu", weights_only: bool = True, mmap: bool = False
) -> dict[str, Any]:
    """Load a checkpoint file with ``torch.load``, failing with a readable error on a missing or broken one.

    A distributed checkpoint (a folder, see :func:`is_distributed_checkpoint`) gives its
    :data:`DISTRIBUTED_METADATA` file: everything but the sharded ``state_dict`` and optimizer states.

    Args:
        path: The checkpoint file, or a distributed checkpoint's folder.
        map_location: Where tensors go (as in ``torch.load``).
        weights_only: Refuse to run code stored in the file (as in ``torch.load``).
        mmap: Memory-map the file: tensors are read only when used.

    Raises:
        DataError: Nothing exists at ``path``.
        CorruptCheckpointError: The file is truncated or is not a checkpoint; a folder is not a distributed checkpoint.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "last.ckpt"
        >>> torch.save({"state_dict": {}, "global_step": 3}, path)
        >>> load_checkpoint(path)["global_step"]
        3
        >>> _ = path.write_bytes(path.read_bytes()[:100])  # a copy cut short
        >>> load_checkpoint(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.CorruptCheckpointError: checkpoint '...last.ckpt' is truncated or not a checkpoint (its zip archive is cut short: the end of the file is missing)
    """
    path = Path(path)
    if path.is_dir():
        if not is_distributed_checkpoint(path):
            raise CorruptCheckpointError(
                f"checkpoint {str(path)!r} is truncated or not a checkpoint "
                f"(a folder without {DISTRIBUTED_METADATA}, so not a distributed checkpoint)"
            )
        path = path / DISTRIBUTED_METADATA
    elif not path.is_file():
        raise DataError(f"checkpoint {str(path)!r} does not exist")
    reason = _not_a_checkpoint(path)
    if reason is None:
        try:
            checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
        except pickle.UnpicklingError as err:
            if "Weights only load failed" in str(err):
                raise  # a readable file holding objects that weights_only refuses: torch's message says what to do
            reason = str(err)
        except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as err:
            reason = str(err) or type(err).__name__
        else:
            if isinstance(checkpoint, Mapping):
                return checkpoint
            reason = f"it holds a {type(checkpoint).__name__}, not a checkpoint dict"
        reason = reason.split(". ")[0].splitlines()[0][:160]  # torch's first sentence
    raise CorruptCheckpointError(f"checkpoint {str(path)!r} is truncated or not a checkpoint ({reason})")


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any] | None:
    """Our metadata of a checkpoint file (None when none of our modules wrote it), building nothing.

    The file is memory-mapped with ``weights_only=True``: no tensor of its weights is read and no
    code of it runs. A distributed checkpoint (a folder) gives the metadata in its
    :data:`DISTRIBUTED_METADATA` file.

    Raises:
        DataError: The file does not exist.
        CorruptCheckpointError: It is truncated or is not a checkpoint (see :func:`load_checkpoint`).
    """
    return read_metadata(load_checkpoint(path, mmap=True))  # tensors stay on disk


def checkpoint_module_class(checkpoint: Mapping[str, Any] | str | Path) -> str | None:
    """Name of the LightningModule class that wrote a checkpoint of ours (None for foreign ones).

    Args:
        checkpoint: A loaded checkpoint, or the path of a file (read with :func:`read_checkpoint_metadata`).
    """
    metadata = read_metadata(checkpoint) if isinstance(checkpoint, Mapping) else read_checkpoint_metadata(checkpoint)
    return (metadata or {}).get("module")


def adapter_record(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """What a ParameterEfficientTuning run recorded about its base (:data:`ADAPTER_FIELD`); empty for other checkpoints.

    Keys: ``base_sha256``, ``base`` (where the base came from), ``adapter_only`` (the base's weights left out),
    ``train_modules``.

    Examples:
        >>> adapter_record({CHECKPOINT_KEY: {"adapter": {"adapter_only": True}}}), adapter_record({})
        ({'adapter_only': True}, {})
    """
    return dict((read_metadata(checkpoint) or {}).get(ADAPTER_FIELD) or {})


def pruning_mask_keys(checkpoint: Mapping[str, Any]) -> list[str]:
    """The keys of MagnitudePruning's mask buffers (``*.weight_mask``, ``*.bias_mask``) in a loaded checkpoint.

    Examples:
        >>> pruning_mask_keys({"state_dict": {"model.fc.weight": 0, "model.fc.weight_mask": 1}})
        ['model.fc.weight_mask']
    """
    return [key for key in checkpoint.get("state_dict") or {} if key.endswith(PRUNING_MASK_SUFFIXES)]


def trained_with_pruning(checkpoint: Mapping[str, Any]) -> bool:
    """Whether MagnitudePruning ran in the run that wrote ``checkpoint`` (its callback state, or its masks, are in it).

    A distributed checkpoint's :data:`DISTRIBUTED_METADATA` holds the callback states, not the masks.
    """
    return PRUNING_STATE_KEY in (checkpoint.get("callbacks") or {}) or bool(pruning_mask_keys(checkpoint))


def pruning_hint(name: str) -> str:
    """What to do with a masked checkpoint (``name``) loaded into a run without the technique that masked it."""
    return (
        f"checkpoint {name!r} was trained with MagnitudePruning or sparse training (it holds weight masks): "
        "add the technique it was trained with to the run (its fragment: configs/techniques/pruning_gradual.yaml, "
        "pruning_structured.yaml, rigl.yaml, set.yaml, snip.yaml or lottery_ticket.yaml; in Python, its callback), "
        "or export it with export_pruned"
    )


def check_pruning_masks(checkpoint: Mapping[str, Any], model_keys: Iterable[str], name: str = "being loaded") -> None:
    """Fail with :func:`pruning_hint` when ``checkpoint`` holds pruning masks that the model (``model_keys``) lacks.

    Raises:
        CheckpointMismatchError: A mask buffer of the checkpoint is not among ``model_keys``.

    Examples:
        >>> check_pruning_masks({"state_dict": {"fc.weight": 0, "fc.weight_mask": 1}}, ["fc.weight"], "last.ckpt")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.CheckpointMismatchError: checkpoint 'last.ckpt' was trained with MagnitudePruning or sparse training (it holds weight masks): add the technique it was trained with to the run (its fragment: configs/techniques/pruning_gradual.yaml, pruning_structured.yaml, rigl.yaml, set.yaml, snip.yaml or lottery_ticket.yaml; in Python, its callback), or export it with export_pruned
    """
    if set(pruning_mask_keys(checkpoint)) - set(model_keys):
        raise CheckpointMismatchError(pruning_hint(name))


def record_structure(checkpoint: MutableMapping[str, Any], technique: str, structure: Mapping[str, Any]) -> None:
    """Record that ``technique`` changed the model's structure as ``structure`` says (:meth:`Technique.surgery`)."""
    write_metadata(checkpoint).setdefault(STRUCTURE_FIELD, {})[technique] = dict(structure)


def recorded_structure(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The model surgery recorded in ``checkpoint`` (technique name -> :meth:`Technique.surgery`), empty when none."""
    return dict((read_metadata(checkpoint) or {}).get(STRUCTURE_FIELD) or {})


def check_structure(
    checkpoint: Mapping[str, Any], ours: Mapping[str, Mapping[str, Any]], name: str = "being loaded"
) -> None:
    """Fail unless ``checkpoint`` was written with the model surgery of ``ours`` (technique name -> structure).

    A checkpoint not written by us (no metadata) is not checked.

    Raises:
        CheckpointMismatchError: A technique changed the checkpoint's model and is not in this run, is in
            this run and did not change it, or changed it differently; the message names both.

    Examples:
        >>> checkpoint = {}
        >>> record_structure(checkpoint, "residual_init", {"technique": "ResidualInit(scheme='rezero')"})
        >>> check_structure(checkpoint, {}, "last.ckpt")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.CheckpointMismatchError: checkpoint 'last.ckpt' was trained with ResidualInit(scheme='rezero'), which changes the model's blocks: add it to the run's trainer.callbacks
    """
    if read_metadata(checkpoint) is None:
        return
    theirs = recorded_structure(checkpoint)
    for technique in sorted(set(theirs) | set(ours)):
        recorded, wanted = theirs.get(technique), ours.get(technique)
        if recorded == wanted:
            continue
        if wanted is None:
            raise CheckpointMismatchError(
                f"checkpoint {name!r} was trained with {recorded['technique']}, which changes the model's blocks: "
                "add it to the run's trainer.callbacks"
            )
        if recorded is None:
            raise CheckpointMismatchError(
                f"checkpoint {name!r} was trained without {wanted['technique']}: remove it from the run, "
                "or start a new run"
            )
        raise CheckpointMismatchError(
            f"checkpoint {name!r} was trained with {recorded['technique']}, not {wanted['technique']}: "
            "use the one it was trained with"
        )


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, writing every checkpoint atomically beside its target.

    The checkpoint is streamed into a temporary file in the target's own directory, flushed to
    disk, and moved over the target with ``os.replace``: a reader, or a run killed mid-save, sees
    either the old file or the new one, never a truncated one, and a failed save leaves no
    temporary file behind. (Lightning's own save serialises the whole checkpoint into memory and
    writes it through a temporary file in the system's temp directory; when that is another
    filesystem, the final move is a copy, which a kill can cut short.) Remote paths (``s3://``, ...)
    are left to Lightning's writer.

    Our configs set it as ``trainer.plugins``; in Python pass ``Trainer(plugins=[AtomicCheckpointIO()])``.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "last.ckpt"
        >>> AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
        >>> torch.load(path, weights_only=True), [p.name for p in path.parent.iterdir()]
        ({'step': 3}, ['last.ckpt'])
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (see the class docstring).

        Raises:
            TypeError: ``storage_options`` were given (as ``TorchCheckpointIO``).
        """
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_atomically(path, lambda file: torch.save(checkpoint, file), sync=True)
