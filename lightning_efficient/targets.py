"""Choose the modules a technique acts on: one selector, one error text, for every technique.

Every technique that takes a ``targets``-like argument (``include``/``exclude`` name patterns, module
types, block paths, "every k-th block") selects through this module, so the same YAML words mean
the same thing everywhere and a pattern that matches nothing fails the same way::

    no Linear module matched include pattern '*.nothing' in BertMLM; candidates: model.bert.encoder.layer.0.attention.self.query, ...

Rules:

- Names are qualified names from the model root (``model.bert.encoder.layer.0.attention.self.query``);
  patterns are shell-style (``fnmatch``) and match the whole name; ``*`` also matches dots.
- Without ``include``, the candidates are the modules inside the Transformer blocks
  (:func:`~lightning_efficient.blocks.find_block_stacks`): not the embeddings, not the task heads.
  With ``include``, the whole model is searched.
- The layers a peft adapter adds (``lora_A``, ``lora_B``, ...) are never candidates; the layer it adapts
  is, as ``<name>.base_layer`` (so pruning or quantizing a model with adapters acts on the base).
- Every ``include`` pattern must match a candidate, and every ``exclude`` pattern one of the
  included names: a typo is an error, never a silent no-op. Selecting nothing is an error too.

Examples:
    >>> from lightning_efficient import BertMLM
    >>> model = BertMLM(vocab_size=50, preset="tiny")
    >>> names = list(select_modules(model, exclude=["*.attention.*"], every=2))
    >>> names
    ['model.bert.encoder.layer.0.intermediate.dense', 'model.bert.encoder.layer.0.output.dense', 'model.bert.encoder.layer.2.intermediate.dense', 'model.bert.encoder.layer.2.output.dense']
    >>> list(select_blocks(model, include=["*.layer.1"]))
    ['model.bert.encoder.layer.1']
    >>> select_modules(model, include=["*.querry"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lightning_efficient.errors.NoTargetModulesError: no Linear module matched include pattern '*.querry' in BertMLM; candidates: model.bert.encoder.layer.0.attention.self.query, ...
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

from lightning_efficient.blocks import find_block_stacks
from lightning_efficient.errors import ConfigurationError, NoTargetModulesError, check_int, check_patterns

__all__ = ["is_of_type", "match_names", "select_blocks", "select_modules"]

#: How many candidate names an error message shows.
SHOWN = 8


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "") if names else "none"


def match_names(
    names: Iterable[str],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    what: str = "module",
    owner: str = "the model",
    option: str = "include",
) -> list[str]:
    """Filter ``names`` by ``include`` patterns, then ``exclude`` patterns (order kept).

    Args:
        names: The candidate names.
        include: Keep the names matching any of these (None: keep all).
        exclude: Then drop the names matching any of these.
        what: What a name names, for the error (``"Linear module"``, ``"block"``, ``"parameter"``).
        owner: Whose names they are, for the error (the model class).
        option: The argument's name for ``include`` as the user wrote it (``"names"``, ``"params"``).

    Raises:
        NoTargetModulesError: A pattern matches nothing, or nothing is left.

    Examples:
        >>> match_names(["a.query", "a.key", "b.query"], include=["*.query"], exclude=["b.*"])
        ['a.query']
        >>> match_names(["a.query"], exclude=["*.key"], what="Linear module", owner="Toy")
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.NoTargetModulesError: no Linear module matched exclude pattern '*.key' among the included ones in Toy; candidates: a.query
    """
    chosen = list(names)
    include = check_patterns(option, include)
    exclude = check_patterns("exclude", exclude) or []
    if not chosen:
        raise NoTargetModulesError(f"found no {what} in {owner} to choose from")
    for pattern in include or []:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in chosen):
            raise NoTargetModulesError(
                f"no {what} matched {option} pattern {pattern!r} in {owner}; candidates: {_shown(chosen)}"
            )
    if include:
        chosen = [name for name in chosen if any(fnmatch.fnmatchcase(name, p) for p in include)]
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in chosen):
            raise NoTargetModulesError(
                f"no {what} matched exclude pattern {pattern!r} among the included ones in {owner}; "
                f"candidates: {_shown(chosen)}"
            )
    kept = [name for name in chosen if not any(fnmatch.fnmatchcase(name, p) for p in exclude)]
    if not kept:
        raise NoTargetModulesError(
            f"no {what} is left in {owner}: exclude={exclude!r} removes every one of {_shown(chosen)}"
        )
    return kept


def is_of_type(module: nn.Module, types: Sequence[str | type]) -> bool:
    """Whether ``module``'s class, or a base class of it, is one of ``types`` (classes or class names).

    Examples:
        >>> is_of_type(nn.Linear(2, 2), ["Linear"]), is_of_type(nn.ReLU(), [nn.Linear])
        (True, False)
    """
    return any(cls in types or cls.__name__ in types for cls in type(module).__mro__)


def _check_types(types: Sequence[str | type]) -> tuple[str | type, ...]:
    if isinstance(types, (str, type)) or not types:
        raise ConfigurationError(f"module_types={types!r} must be a non-empty list of module classes, e.g. ['Linear']")
    return tuple(types)


def _adapter_parts(model: nn.Module) -> list[str]:
    """Name prefixes of the modules a peft adapter added (every child of an adapter layer but ``base_layer``)."""
    return [
        f"{name}.{child}."
        for name, module in model.named_modules()
        if hasattr(module, "adapter_layer_names") and hasattr(module, "base_layer")
        for child in dict(module.named_children())
        if child != "base_layer"
    ]


def select_blocks(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    every: int = 1,
    block_paths: Sequence[str] | None = None,
    option: str = "include",
) -> dict[str, nn.Module]:
    """The Transformer blocks chosen, by qualified name (``"<stack path>.<index>"``), in model order.

    Args:
        model: The model (a LightningModule, an HF model, a user's own).
        include: Patterns of block names (default: every ``every``-th block of each stack).
        exclude: Patterns of block names to leave out.
        every: Take blocks ``0, every, 2 * every, ...`` of each stack (before the patterns).
        block_paths: Attribute paths of the block lists, for models the locator does not know.
        option: The name under which the technique takes ``include`` (for the error text).

    Raises:
        NoTargetModulesError: No block stack, or a pattern matches no block.
    """
    every = check_int("every", every, low=1)
    blocks = {
        f"{stack.path}.{index}": block
        for stack in find_block_stacks(model, block_paths)
        for index, block in enumerate(stack.blocks)
        if index % every == 0
    }
    names = match_names(blocks, include, exclude, "Transformer block", type(model).__name__, option)
    return {name: blocks[name] for name in names}


def select_modules(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    module_types: Sequence[str | type] = ("Linear",),
    every: int = 1,
    block_paths: Sequence[str] | None = None,
) -> dict[str, nn.Module]:
    """The modules of ``module_types`` chosen, by qualified name, in model order.

    Args:
        model: The model.
        include: Patterns of module names, searched in the whole model (default: every module of
            ``module_types`` inside the chosen blocks).
        exclude: Patterns of names to leave out.
        module_types: Classes or class names (a subclass counts).
        every: Without ``include``: only the modules of blocks ``0, every, ...`` of each stack.
        block_paths: Attribute paths of the block lists, for models the locator does not know.

    Raises:
        NoTargetModulesError: No block stack (without ``include``), a pattern matches nothing, or
            nothing is left.
    """
    types = _check_types(module_types)
    if include:
        candidates = {name: m for name, m in model.named_modules() if name and is_of_type(m, types)}
    else:
        candidates = {
            f"{block_name}.{name}" if name else block_name: m
            for block_name, block in select_blocks(model, every=every, block_paths=block_paths).items()
            for name, m in block.named_modules()
            if is_of_type(m, types)
        }
    inside = _adapter_parts(model)
    candidates = {name: m for name, m in candidates.items() if not any(name.startswith(p) for p in inside)}
    what = f"{'/'.join(t if isinstance(t, str) else t.__name__ for t in types)} module"
    names = match_names(candidates, include, exclude, what, type(model).__name__)
    return {name: candidates[name] for name in names}
