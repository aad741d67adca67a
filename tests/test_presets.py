import pytest

from lightning_efficient import ConfigurationError
from lightning_efficient.models.presets import PRESETS, ModelSize, resolve_size


def test_preset_fields_and_overrides():
    assert resolve_size("base") == ModelSize(hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072)
    assert resolve_size("small", num_layers=2, ffn_size=99) == ModelSize(256, 2, 4, 99)


def test_unknown_preset_names_value_and_choices():
    with pytest.raises(ConfigurationError, match=r"preset='huge' is unknown; choose one of: tiny, small, base"):
        resolve_size("huge")


def test_hidden_size_not_divisible_by_heads():
    with pytest.raises(ConfigurationError, match=r"hidden_size=30 is not divisible by num_heads=4.*\[1, 2, 3, 5, 6, 10, 15, 30\]"):
        resolve_size("tiny", hidden_size=30)


@pytest.mark.parametrize("field", ["hidden_size", "num_layers", "num_heads", "ffn_size"])
def test_non_positive_field(field):
    with pytest.raises(ConfigurationError, match=rf"{field}=0 must be a positive integer"):
        resolve_size("tiny", **{field: 0})


def test_every_preset_is_valid():
    for name in PRESETS:
        size = resolve_size(name)
        assert size.hidden_size % size.num_heads == 0
