"""Shared fixtures: every adapters folder lives under tmp_path; the model is the repo's."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine.config import load_settings

REPO = Path(__file__).resolve().parents[3]
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def chat(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows may be dicts (written as JSON) or raw strings (written as they are: bad rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def adapters(tmp_path: Path) -> Path:
    d = tmp_path / "adapters"
    d.mkdir()
    return d


@pytest.fixture
def settings(adapters: Path):
    return load_settings(adapters_dir=adapters, model_cache_dir=REPO / "models")
