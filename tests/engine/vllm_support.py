"""Fixtures for the vLLM backend's tests: fake replicas, adapters on disk, engines on them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from engine.config import load_settings
from engine.vllm.config import load_vllm_settings
from tests.fakes.adapters import write_adapter
from tests.fakes.vllm import FakeVllm

REPO = Path(__file__).resolve().parents[2]

MakeEngine = Callable[..., Awaitable[Any]]
StartFakes = Callable[..., Awaitable[list[FakeVllm]]]


@pytest.fixture(autouse=True)
def _no_vllm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No VLLM_* or ENGINE_BACKEND from the developer's shell."""
    for name in list(os.environ):
        if name.startswith("VLLM_") or name == "ENGINE_BACKEND":
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def adapters_dir(tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    write_adapter(root, "legal")
    write_adapter(root, "medical", seed=1)
    return root


@pytest.fixture
async def fakes() -> AsyncIterator[StartFakes]:
    """start(n, **kw) -> n fake vLLM servers named vllm-1..n; all stopped at the end."""
    started: list[FakeVllm] = []

    async def start(n: int = 1, **kw: Any) -> list[FakeVllm]:
        out = []
        for _ in range(n):
            fake = FakeVllm(name=f"vllm-{len(started) + 1}", **kw)
            await fake.start()
            started.append(fake)
            out.append(fake)
        return out

    yield start
    for fake in started:
        if fake.stall is not None:
            fake.stall.set()
        await fake.stop()


@pytest.fixture
async def make_engine(adapters_dir: Path) -> AsyncIterator[MakeEngine]:
    """make(*fakes, start=True, engine={...}, **vllm_settings) -> a VllmEngine on those replicas.

    The health loop is off (an hour) unless a test sets VLLM_HEALTH_INTERVAL_S; a replica
    taken out stays out until a health round brings it back.
    """
    from engine.vllm.engine import VllmEngine

    engines: list[VllmEngine] = []

    async def make(*replicas: FakeVllm | str, start: bool = True, engine: dict[str, Any] | None = None,
                   **vllm: Any) -> VllmEngine:
        settings = load_settings(**{
            "_env_file": None, "model_cache_dir": REPO / "models", "adapters_dir": adapters_dir,
            "templates_dir": REPO / "templates", "max_new_tokens": 32, **(engine or {}),
        })
        urls = ",".join(r if isinstance(r, str) else r.url for r in replicas)
        v = load_vllm_settings(**{"_env_file": None, "vllm_urls": urls, "vllm_health_interval_s": 3600,
                                  "vllm_retry_after_s": 0, **vllm})
        e = VllmEngine(settings, v)
        engines.append(e)
        if start:
            await e.start()
        return e

    yield make
    for e in engines:
        await e.close()
