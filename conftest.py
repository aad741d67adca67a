"""Root fixtures for the tests and the docstring examples (``pytest --doctest-modules``)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _tokenizer_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep trained tokenizers in a per-session cache, never in the user's home directory."""
    patch = pytest.MonkeyPatch()
    patch.setenv("LIGHTNING_EFFICIENT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()
