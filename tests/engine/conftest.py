"""Fixtures shared by the engine's unit tests."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    """The real default model's tokenizer (fast to load; `make setup` converts the model)."""
    from engine.config import load_settings
    from engine.model import load_tokenizer, resolve_source

    source = resolve_source(load_settings(model="smollm2", model_cache_dir=REPO / "models"))
    if not (Path(source.load_path) / "tokenizer.json").is_file():
        pytest.fail(f"{source.load_path} has no tokenizer; run `make setup` first")
    return load_tokenizer(source)
