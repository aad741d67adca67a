"""Named model sizes shared by every LightningModule of the package.

A preset fixes the Transformer shape (hidden size, layers, heads, FFN width); any field can be
overridden by an explicit argument. ``tiny`` is for tests (odd FFN width on purpose, to catch
shape assumptions), ``small`` for the main job on a laptop CPU, ``base`` is the BERT-base shape.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lightning_efficient.errors import ConfigurationError

__all__ = ["PRESETS", "ModelSize", "resolve_size"]


@dataclass(frozen=True)
class ModelSize:
    """The shape of a Transformer stack.

    Attributes:
        hidden_size: Width of the residual stream.
        num_layers: Number of Transformer blocks (per stack for encoder-decoder models).
        num_heads: Attention heads per block; must divide ``hidden_size``.
        ffn_size: Inner width of the feed-forward network.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_size: int


PRESETS: dict[str, ModelSize] = {
    "tiny": ModelSize(hidden_size=32, num_layers=3, num_heads=4, ffn_size=37),
    "small": ModelSize(hidden_size=256, num_layers=4, num_heads=4, ffn_size=1024),
    "base": ModelSize(hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072),
}


def resolve_size(
    preset: str,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    ffn_size: int | None = None,
) -> ModelSize:
    """Return the preset's shape with any explicit field overriding it, validated.

    Args:
        preset: One of ``PRESETS`` (``tiny``, ``small``, ``base``).
        hidden_size: Overrides the preset's hidden size when given.
        num_layers: Overrides the preset's depth when given.
        num_heads: Overrides the preset's head count when given.
        ffn_size: Overrides the preset's FFN width when given.

    Returns:
        The resolved, validated :class:`ModelSize`.

    Raises:
        ConfigurationError: Unknown preset, a non-positive field, or a hidden size that the
            head count does not divide.

    Examples:
        >>> resolve_size("tiny", num_layers=2)
        ModelSize(hidden_size=32, num_layers=2, num_heads=4, ffn_size=37)
    """
    if preset not in PRESETS:
        raise ConfigurationError(f"preset={preset!r} is unknown; choose one of: {', '.join(PRESETS)}")
    overrides = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "ffn_size": ffn_size,
    }
    size = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    for name, value in vars(size).items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigurationError(f"{name}={value!r} must be a positive integer")
    if size.hidden_size % size.num_heads:
        raise ConfigurationError(
            f"hidden_size={size.hidden_size} is not divisible by num_heads={size.num_heads}; "
            f"allowed head counts for this width: {_divisors(size.hidden_size)}"
        )
    return size


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
