"""How ``-c`` files stack: which file gave each technique, two of one technique merged, settings that disagree.

``lightning-efficient fit -c base.yaml -c a.yaml -c b.yaml`` reads the files in order (LightningCLI:
mappings merge, ``callbacks+:`` appends, a later value replaces an earlier one). On top of that:

- **A technique given twice is merged into one** (:func:`merge_techniques`): the arguments a later
  file sets win over an earlier file's, the arguments only the earlier file sets are kept, and each
  argument that two files set to different values is reported (``plan`` prints it, ``fit`` shows it
  in its first screen). Two *different* classes that claim one technique name cannot be merged:
  that is an error naming both files. The rule is for techniques only: a config may hold several
  ``ModelCheckpoint`` s with different roles.
- **Techniques run in their declared order** (:func:`~lightning_efficient.technique.technique_order`),
  whatever order the files list them in; a conflict or a cycle is an error naming both files.
- **Two fragments setting one key to different values** (:func:`disagreements`): the later file
  wins, as in LightningCLI, and the disagreement is reported with both values. The base config is
  not a fragment: overriding it is what fragments are for.

Examples:
    >>> lamb = {"optimizer": {"class_path": "lightning_efficient.optim.LAMB", "init_args": {"lr": 0.035}}}
    >>> lion = {"optimizer": {"class_path": "lightning_efficient.optim.Lion", "init_args": {"lr": 2e-4}}}
    >>> disagreements([("lamb.yaml", lamb), ("lion.yaml", lion)])
    ["optimizer: lamb.yaml sets lightning_efficient.optim.LAMB, lion.yaml sets lightning_efficient.optim.Lion; lion.yaml's wins (the later -c)"]
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonargparse import Namespace

from lightning_efficient.errors import ConfigurationError
from lightning_efficient.technique import Technique, technique_order

__all__ = [
    "ConfiguredCallback",
    "callback_sources",
    "check_strategy",
    "compose_techniques",
    "disagreements",
    "merge_techniques",
    "setting_source",
]

#: The source of entries that no ``-c`` file gave (``--trainer.callbacks+=...``).
COMMAND_LINE = "the command line"

_LIST_KEYS = ("callbacks", "callbacks+")


@dataclass
class ConfiguredCallback:
    """One entry of a config's ``trainer.callbacks``, with where it came from.

    Attributes:
        entry: The parsed entry (a ``Namespace`` or dict with ``class_path`` and ``init_args``).
        source: The ``-c`` file that gave it (or :data:`COMMAND_LINE`).
        explicit: The ``init_args`` the source sets itself (None: unknown, taken as all of them).
        merged_from: The further sources merged into this entry.
    """

    entry: Any
    source: str
    explicit: set[str] | None = None
    merged_from: list[str] = field(default_factory=list)

    @property
    def class_path(self) -> str:
        return str(self.entry.get("class_path"))

    @property
    def init_args(self) -> Any:
        init_args = self.entry.get("init_args")
        if init_args is None:
            init_args = Namespace() if isinstance(self.entry, Namespace) else {}
            self.entry["init_args"] = init_args
        return init_args

    def technique_class(self) -> type[Technique] | None:
        """The class, when it is a technique (None: another callback, or a class path that does not import)."""
        cls = _imported(self.class_path)
        return cls if isinstance(cls, type) and issubclass(cls, Technique) else None

    def arguments(self) -> dict[str, Any]:
        """The arguments the sources set (all of them when unknown), as plain values."""
        init_args = dict(vars(self.init_args) if isinstance(self.init_args, Namespace) else self.init_args)
        keys = init_args if self.explicit is None else [key for key in init_args if key in self.explicit]
        return {key: init_args[key] for key in keys}


def _imported(class_path: str) -> Any:
    """The object ``class_path`` names, or None when it does not import (LightningCLI reports that)."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _items(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def callback_sources(configs: Sequence[tuple[str, Mapping[str, Any]]]) -> list[tuple[str, Mapping[str, Any]]]:
    """The ``trainer.callbacks`` entries that the files compose, in order, each with the file that gave it.

    ``callbacks:`` replaces the list so far and ``callbacks+:`` appends to it, as in LightningCLI.

    Args:
        configs: ``(file name, its YAML as read)`` for each ``-c`` file, in order.

    Examples:
        >>> base = {"trainer": {"callbacks": [{"class_path": "a.Monitor"}]}}
        >>> fragment = {"trainer": {"callbacks+": [{"class_path": "b.LayerDrop"}]}}
        >>> [(name, entry["class_path"]) for name, entry in callback_sources([("base.yaml", base), ("f.yaml", fragment)])]
        [('base.yaml', 'a.Monitor'), ('f.yaml', 'b.LayerDrop')]
    """
    entries: list[tuple[str, Mapping[str, Any]]] = []
    for name, config in configs:
        trainer = config.get("trainer") if isinstance(config, Mapping) else None
        if not isinstance(trainer, Mapping):
            continue
        if "callbacks" in trainer:
            entries = [(name, entry) for entry in _items(trainer["callbacks"])]
        entries += [(name, entry) for entry in _items(trainer.get("callbacks+"))]
    return entries


def _attributed(parsed: list[Any], sources: Sequence[tuple[str, Mapping[str, Any]]] | None) -> list[ConfiguredCallback]:
    """``parsed`` entries with their sources, where the files' entries line up with them (else the sources are unknown)."""
    named = list(sources or [])

    def short(class_path: Any) -> str:
        return str(class_path).rpartition(".")[2]

    lined_up = len(named) <= len(parsed) and all(
        isinstance(entry, Mapping) and short(entry.get("class_path")) == short(item.get("class_path"))
        for (_, entry), item in zip(named, parsed)
    )
    result = []
    for index, item in enumerate(parsed):
        if lined_up and index < len(named):
            name, entry = named[index]
            result.append(ConfiguredCallback(item, name, set((entry.get("init_args") or {}).keys())))
        else:
            result.append(ConfiguredCallback(item, COMMAND_LINE if lined_up else "the config"))
    return result


def merge_techniques(callbacks: list[ConfiguredCallback]) -> tuple[list[ConfiguredCallback], list[str]]:
    """Merge each technique given more than once into its first place (see the module doc).

    Returns:
        The callbacks, each technique once, and a line for each argument two sources set differently.

    Raises:
        ConfigurationError: Two different classes give one technique name; the message names both
            classes and both sources.
    """
    kept: list[ConfiguredCallback] = []
    first: dict[str, ConfiguredCallback] = {}
    notes: list[str] = []
    for callback in callbacks:
        cls = callback.technique_class()
        if cls is None:
            kept.append(callback)
            continue
        earlier = first.get(cls.name)
        if earlier is None:
            first[cls.name] = callback
            kept.append(callback)
            continue
        if earlier.technique_class() is not cls:
            raise ConfigurationError(
                f"{earlier.source} gives {earlier.class_path} and {callback.source} gives {callback.class_path}, "
                f"two techniques named {cls.name!r}; remove one of the two"
            )
        later_args = callback.init_args
        keys = list(later_args.keys()) if callback.explicit is None else sorted(callback.explicit)
        for key in keys:
            before, after = earlier.init_args.get(key), later_args.get(key)
            if (earlier.explicit is None or key in earlier.explicit) and before != after:
                notes.append(
                    f"{cls.__name__}.{key}: {earlier.source} sets {before!r}, {callback.source} sets {after!r}; "
                    f"{callback.source}'s wins (the later -c)"
                )
            earlier.init_args[key] = after
        if earlier.explicit is not None:
            earlier.explicit = None if callback.explicit is None else earlier.explicit | callback.explicit
        earlier.merged_from.append(callback.source)
    return kept, notes


def compose_techniques(
    parsed: Any, sources: Sequence[tuple[str, Mapping[str, Any]]] | None = None
) -> tuple[list[ConfiguredCallback], list[str]]:
    """A config's parsed ``trainer.callbacks``: techniques merged (:func:`merge_techniques`) and sorted.

    Only the techniques move, among the places they hold; every other callback keeps its place.

    Args:
        parsed: The parsed ``trainer.callbacks`` (a list, one entry, or None).
        sources: :func:`callback_sources` of the ``-c`` files (None: unknown).

    Returns:
        The callbacks in the order they will run, and the merge notes.

    Raises:
        ConfigurationError: See :func:`merge_techniques` and :func:`~lightning_efficient.technique.technique_order`.
    """
    callbacks, notes = merge_techniques(_attributed(_items(parsed), sources))
    places = [i for i, callback in enumerate(callbacks) if callback.technique_class() is not None]
    techniques = [callbacks[i] for i in places]
    order = technique_order(
        [callback.technique_class() for callback in techniques],
        [" + ".join([callback.source, *callback.merged_from]) for callback in techniques],
    )
    for place, index in zip(places, order):
        callbacks[place] = techniques[index]
    return callbacks, notes


def setting_source(configs: Sequence[tuple[str, Mapping[str, Any]]], key: str) -> str | None:
    """The last of ``configs`` that sets the dotted ``key`` (``"trainer.strategy"``): the one whose value wins.

    Examples:
        >>> setting_source([("a.yaml", {"trainer": {"strategy": "ddp"}}), ("b.yaml", {"trainer": {}})], "trainer.strategy")
        'a.yaml'
    """
    found = None
    for name, config in configs:
        value: Any = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is not None:
            found = name
    return found


def check_strategy(strategy: Any, techniques: Sequence[ConfiguredCallback], source: str | None = None) -> None:
    """Refuse, before anything is built, a technique that the config's strategy of ours does not compose with.

    Args:
        strategy: The parsed ``trainer.strategy`` (a name or a ``class_path`` entry); strategies
            without a ``composes_with`` declaration (Lightning's) are not checked here.
        techniques: The config's techniques.
        source: The ``-c`` file that set the strategy, for the message.

    Raises:
        ConfigurationError: A technique is not in the strategy's ``composes_with``; the message names
            both, with their files.
    """
    class_path = strategy.get("class_path") if isinstance(strategy, (Mapping, Namespace)) else None
    if not class_path:
        return
    name = str(class_path).rpartition(".")[2]
    allowed = getattr(_imported(str(class_path)), "composes_with", None)  # None also when it does not import
    if allowed is None:
        return
    for technique in techniques:
        cls = technique.technique_class()
        if cls is not None and cls.name not in allowed:
            where = f" from {source}" if source else ""
            raise ConfigurationError(
                f"{cls.name} ({cls.__name__} from {technique.source}) does not compose with {name}{where}; "
                f"techniques that do: {', '.join(sorted(allowed))}. Remove one of the two"
            )


def _flatten(config: Any, prefix: str = "", scope: str = "") -> dict[str, tuple[str, Any]]:
    """``{compare key: (dotted key, value)}`` of a YAML mapping.

    A mapping with a ``class_path`` gives its class as one value, and its ``init_args`` are compared
    only with those of the same class (the class is part of their compare key).
    """
    flat: dict[str, tuple[str, Any]] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if name in ("trainer.callbacks", "trainer.callbacks+"):
            continue  # technique by technique: merge_techniques
        if isinstance(value, Mapping) and "class_path" in value:
            flat[scope + name] = (name, value["class_path"])
            init_args = value.get("init_args") or {}
            flat.update(_flatten(init_args, f"{name}.init_args.", f"{scope}{value['class_path']}:"))
        elif isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}.", scope))
        else:
            flat[scope + name] = (name, value)
    return flat


def disagreements(fragments: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """A line for each key that two of ``fragments`` set to different values: both values, and which wins.

    An argument of a class is compared only between files that choose the same class (when they
    choose different classes, that is the one line). Technique callbacks are compared by
    :func:`merge_techniques` instead.

    Args:
        fragments: ``(file name, its YAML as read)`` of the ``-c`` files after the base config, in order.

    Examples:
        >>> disagreements([("a.yaml", {"trainer": {"max_steps": 50}}), ("b.yaml", {"trainer": {"max_steps": 80}})])
        ["trainer.max_steps: a.yaml sets 50, b.yaml sets 80; b.yaml's wins (the later -c)"]
    """
    seen: dict[str, tuple[str, Any]] = {}
    notes = []
    for name, config in fragments:
        if not isinstance(config, Mapping):
            continue
        for compare, (key, value) in _flatten(config).items():
            if compare in seen and seen[compare][1] != value:
                earlier, before = seen[compare]
                notes.append(
                    f"{key}: {earlier} sets {_shown(before)}, {name} sets {_shown(value)}; {name}'s wins (the later -c)"
                )
            seen[compare] = (name, value)
    return notes


def _shown(value: Any) -> str:
    """A value as a note shows it: a class path bare, anything else as Python writes it."""
    return value if isinstance(value, str) and "." in value and " " not in value else repr(value)
