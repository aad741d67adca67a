"""Where a run writes: its name, its directory, and what happens when that directory already holds a run.

A run of ``lightning-efficient fit -c base.yaml -c fragment.yaml ...`` has a **name**, and everything
it writes goes under ``runs/<name>`` (the parent folder of the base config's
``trainer.default_root_dir``): TensorBoard logs (the logger's version is the run name), checkpoints,
``config.yaml``, ``efficiency.json``, predictions.

- The name is ``--run_name`` (or ``run_name:`` in a YAML file) when given. Otherwise it is built
  from the base config's run (the last folder of its ``trainer.default_root_dir``, such as
  ``bert_small_mlm``) and the file names of the further ``-c`` files:
  ``bert_small_mlm+layer_drop+qat_int8`` (:func:`default_run_name`). So two different combinations
  never share a directory, and a path printed in the README or a config header means one run.
- The base config spells its output paths under its own directory (``runs/bert_small_mlm/checkpoints``);
  :func:`move_outputs` moves the output locations (the root directory, the loggers' ``save_dir``,
  the callbacks' ``dirpath``) to the run's directory. Inputs (a teacher, pretrained weights) are never moved.
- ``fit`` into a directory that already holds a checkpoint stops before anything is built, with one
  line offering the three ways on (:func:`check_run_directory`): ``--resume`` continues from its
  ``last.ckpt``, ``--overwrite`` deletes it and starts over, ``--run_name`` names a new run.

Examples:
    >>> default_run_name("runs/bert_small_mlm", ["configs/techniques/layer_drop.yaml", "qat_int8.yaml"])
    'bert_small_mlm+layer_drop+qat_int8'
    >>> check_run_name("lamb/8x")
    Traceback (most recent call last):
    ...
    lightning_efficient.errors.ConfigurationError: run_name='lamb/8x' must not contain a path separator ('/' or '\\\\'): it names one directory under runs/
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from lightning_efficient.errors import ConfigurationError

__all__ = [
    "RUNS_DIR",
    "check_run_directory",
    "check_run_name",
    "check_way_on",
    "default_run_name",
    "existing_checkpoints",
    "move_outputs",
    "output_paths",
    "resume_checkpoint",
]

#: The folder runs go under when the config names no ``trainer.default_root_dir``.
RUNS_DIR = "runs"

#: The file ``--resume`` continues from (written by :class:`~lightning_efficient.LastCheckpoint`).
LAST_CHECKPOINT = "last.ckpt"


def check_run_name(name: Any) -> str:
    """``name`` if it can name one run directory, else a :class:`ConfigurationError` saying why.

    Examples:
        >>> check_run_name("bert_small_mlm+layer_drop")
        'bert_small_mlm+layer_drop'
        >>> check_run_name("  ")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: run_name='  ' must be a non-empty directory name, e.g. bert_small_mlm+layer_drop
    """
    if not isinstance(name, str) or not name.strip() or name in (".", ".."):
        raise ConfigurationError(
            f"run_name={name!r} must be a non-empty directory name, e.g. bert_small_mlm+layer_drop"
        )
    if "/" in name or "\\" in name:
        raise ConfigurationError(
            f"run_name={name!r} must not contain a path separator ('/' or '\\\\'): it names one directory under {RUNS_DIR}/"
        )
    return name


def default_run_name(base_root: str | None, fragments: Sequence[str]) -> str | None:
    """The run name of a base config (its ``trainer.default_root_dir``) with the ``-c`` files after it.

    Args:
        base_root: The base config's ``trainer.default_root_dir`` (None: the base names no run).
        fragments: The further ``-c`` files, in order; each adds ``+<file name without .yaml>``.

    Returns:
        ``<last folder of base_root>+<fragment>+...``, or None when ``base_root`` is None.

    Examples:
        >>> default_run_name("runs/vit_tiny_fashion", [])
        'vit_tiny_fashion'
        >>> default_run_name(None, ["layer_drop.yaml"]) is None
        True
    """
    if not base_root:
        return None
    return "+".join([Path(base_root).name, *(Path(fragment).stem for fragment in fragments)])


def _items(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _init_args(item: Any) -> Any:
    """The ``init_args`` mapping of a ``class_path`` entry (a dict or a Namespace), or None."""
    return item.get("init_args") if isinstance(item, (dict, Namespace)) else None


def output_paths(trainer: Any) -> list[tuple[Any, str]]:
    """Where a parsed ``trainer`` config writes: ``(mapping, key)`` of each output location set in it.

    The locations are ``default_root_dir``, each logger's ``save_dir`` and each callback's
    ``dirpath`` (checkpoint folders); values left unset are not returned.
    """
    places: list[tuple[Any, str]] = []
    if trainer.get("default_root_dir"):
        places.append((trainer, "default_root_dir"))
    for key, argument in (("logger", "save_dir"), ("callbacks", "dirpath")):
        for item in _items(trainer.get(key)):
            init_args = _init_args(item)
            if init_args is not None and isinstance(init_args.get(argument), str):
                places.append((init_args, argument))
    return places


def move_outputs(trainer: Any, roots: Iterable[str], directory: str, version: str | None = None) -> None:
    """Move, in place, every output location of ``trainer`` (:func:`output_paths`) under one of ``roots`` to ``directory``.

    Also sets ``directory`` as ``default_root_dir``, and ``version`` as the version of each logger
    that takes one and has none (TensorBoard's and CSV's: ``<save_dir>/<name>/<version>``).

    Examples:
        >>> trainer = {"default_root_dir": "runs/a", "callbacks": [{"init_args": {"dirpath": "runs/a/checkpoints"}}],
        ...            "logger": {"init_args": {"save_dir": "runs/a", "version": None}}}
        >>> move_outputs(trainer, ["runs/a"], "runs/a+x", version="a+x")
        >>> trainer["callbacks"][0]["init_args"]["dirpath"], trainer["logger"]["init_args"]
        ('runs/a+x/checkpoints', {'save_dir': 'runs/a+x', 'version': 'a+x'})
    """
    roots = [str(root).rstrip("/") for root in roots if root]
    for mapping, key in output_paths(trainer):
        value = mapping[key]
        root = next((root for root in roots if value == root or value.startswith(root + "/")), None)
        if root is not None:
            mapping[key] = directory + value[len(root) :]
    trainer["default_root_dir"] = directory
    if version is None:
        return
    for logger in _items(trainer.get("logger")):
        init_args = _init_args(logger)
        if init_args is not None and "version" in init_args and init_args.get("version") is None:
            init_args["version"] = version


def existing_checkpoints(directories: Iterable[str | Path]) -> list[Path]:
    """The checkpoints (``*.ckpt`` files, or distributed checkpoints' folders) in or below ``directories``.

    Examples:
        >>> existing_checkpoints(["runs/nowhere"])
        []
    """
    found: set[Path] = set()
    for directory in directories:
        path = Path(directory)
        if path.is_dir():
            found.update(path.rglob("*.ckpt"))
    return sorted(found)


def resume_checkpoint(checkpoint_dirs: Sequence[str | Path], directory: str | Path) -> Path | None:
    """The ``last.ckpt`` that ``--resume`` continues from: in a checkpoint folder first, else anywhere in ``directory``."""
    for folder in checkpoint_dirs:
        if (Path(folder) / LAST_CHECKPOINT).exists():
            return Path(folder) / LAST_CHECKPOINT
    found = [path for path in existing_checkpoints([directory]) if path.name == LAST_CHECKPOINT]
    return found[0] if found else None


def check_way_on(resume: bool, overwrite: bool) -> None:
    """Refuse ``--resume`` together with ``--overwrite``.

    Examples:
        >>> check_way_on(resume=True, overwrite=True)
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: --resume and --overwrite contradict each other; give one
    """
    if resume and overwrite:
        raise ConfigurationError("--resume and --overwrite contradict each other; give one")


def check_run_directory(
    directory: str | Path, checkpoint_dirs: Sequence[str | Path] = (), resume: bool = False, overwrite: bool = False
) -> Path | None:
    """Decide what ``fit`` does with a run directory that may already hold a run.

    Args:
        directory: The run's directory.
        checkpoint_dirs: The run's checkpoint folders (they may lie outside ``directory``).
        resume: ``--resume``: continue from the run's ``last.ckpt``.
        overwrite: ``--overwrite``: delete the directory (and the run's checkpoints outside it) first.

    Returns:
        The checkpoint to resume from (``resume`` and one exists), else None (start a new run).

    Raises:
        ConfigurationError: Both ``resume`` and ``overwrite``; or neither, and the directory (or a
            checkpoint folder) already holds a checkpoint: one line naming it and the three ways on.
    """
    check_way_on(resume, overwrite)
    directory = Path(directory)
    if resume:
        return resume_checkpoint(checkpoint_dirs, directory)
    found = existing_checkpoints([directory, *checkpoint_dirs])
    if overwrite:
        if directory.is_dir():
            shutil.rmtree(directory)
        for checkpoint in existing_checkpoints(checkpoint_dirs):
            shutil.rmtree(checkpoint) if checkpoint.is_dir() else checkpoint.unlink()
        return None
    if found:
        raise ConfigurationError(
            f"{directory} already holds a run ({found[0]}): add --resume to continue from its last.ckpt, "
            "--overwrite to delete it and start over, or --run_name NAME to start a new run beside it"
        )
    return None
