"""Real vLLM replicas for the tests, started once per session and always stopped.

`real_replicas` starts two servers (tests/vllm_real/servers.py) on free loopback ports the
first time a test asks for them, and stops them when the session ends, failed or not. Without
the vLLM venv the tests that need them are skipped with the reason, unless VLLM_PYTHON names
an interpreter (as `make test-vllm` does): then a missing vLLM is a failure, not a skip.

`vllm_server` runs a test against the fake (tests/fakes/vllm.py) and, marked `vllm_real`,
against a real replica: the fake's contract, checked on both.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest

from tests.engine.vllm_support import adapters_dir, make_engine  # noqa: F401  (fixtures)
from tests.fakes.vllm import FakeVllm
from tests.vllm_real import servers
from tests.vllm_real.servers import API_KEY, MAX_LORA_RANK, MAX_LORAS, MAX_MODEL_LEN, SERVED_NAME, VllmServer

REPO = Path(__file__).resolve().parents[2]


class RealReplicas:
    """Two vLLM replicas, each on its own core; tests may kill, restart or reconfigure one,
    and `standard()` puts both back as they started."""

    def __init__(self, log_dir: Path) -> None:
        cores = sorted(os.sched_getaffinity(0))
        self.servers = [VllmServer(f"vllm-{name}", log_dir, core=cores[i % len(cores)])
                        for i, name in enumerate("ab")]

    def standard(self) -> list[VllmServer]:
        """Both running with LoRA (restarting whichever a test left otherwise)."""
        changed = [s for s in self.servers if not (s.running and s.lora)]
        for s in changed:
            s.stop()
            s.lora = True
        servers.start_all(changed)
        return self.servers

    def ensure(self, server: VllmServer, *, lora: bool = True) -> None:
        """`server` running with (or without) LoRA: (re)started only if it is not already so,
        since a start costs half a minute or more; tests that need the same odd set-up follow
        each other, so it is started once for them."""
        if server.running and server.lora == lora:
            return
        server.stop()
        server.lora = lora
        server.start()
        server.wait_ready()

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


@pytest.fixture(scope="session")
def real_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealReplicas]:
    reason = servers.unavailable()
    if reason:
        if os.environ.get("VLLM_PYTHON"):
            pytest.fail(f"VLLM_PYTHON is set but real vLLM cannot run: {reason}")
        pytest.skip(reason)
    replicas = RealReplicas(tmp_path_factory.mktemp("vllm-logs"))
    try:
        replicas.standard()
        yield replicas
    finally:
        replicas.stop()


@dataclass
class Server:
    """A vLLM API server as the contract tests see it: the fake or a real replica."""

    kind: str
    url: str
    fake: FakeVllm | None = None
    real: VllmServer | None = None
    api_key: str = API_KEY
    model: str = SERVED_NAME
    max_model_len: int = MAX_MODEL_LEN
    max_lora_rank: int = MAX_LORA_RANK
    max_loras: int = MAX_LORAS

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.vllm_real)])
async def vllm_server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    if request.param == "fake":
        async with FakeVllm(name="fake", model=SERVED_NAME, api_key=API_KEY, max_model_len=MAX_MODEL_LEN,
                            max_lora_rank=MAX_LORA_RANK, max_loras=MAX_LORAS) as fake:
            yield Server("fake", fake.url, fake=fake)
    else:
        replicas: RealReplicas = request.getfixturevalue("real_replicas")
        first = replicas.standard()[0]
        yield Server("real", first.url, real=first)


@pytest.fixture
def shipped_adapters(tmp_path: Path) -> Path:
    """A copy of the shipped adapters (legal, medical, finance; trained, rank 8)."""
    root = tmp_path / "shipped"
    for domain in ("legal", "medical", "finance"):
        shutil.copytree(REPO / "adapters" / domain, root / domain,
                        ignore=shutil.ignore_patterns("data", "candidates", ".staging-*"))
    return root


def engine_settings(adapters_dir: Path, **engine: Any) -> Any:
    from engine.config import load_settings

    return load_settings(**{"_env_file": None, "model_cache_dir": REPO / "models", "adapters_dir": adapters_dir,
                            "templates_dir": REPO / "templates", "max_new_tokens": 24, **engine})


@pytest.fixture
def vllm_engines(make_engine: Any) -> Any:
    """start(urls, adapters_dir, engine={...}, **vllm) -> a started VllmEngine on real (or fake)
    servers, as the replicas here are configured; all closed at the end (vllm_support's make_engine)."""

    async def start(urls: list[str], adapters_dir: Path, engine: dict[str, Any] | None = None, **vllm: Any) -> Any:
        return await make_engine(*urls, engine={"adapters_dir": adapters_dir, "max_new_tokens": 24, **(engine or {})},
                                 **{"vllm_model": SERVED_NAME, "vllm_api_key": API_KEY, **vllm})

    return start


@pytest.fixture(autouse=True)
def _no_settings_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if (name.startswith("VLLM_") and name != "VLLM_PYTHON") or name == "ENGINE_BACKEND":
            monkeypatch.delenv(name, raising=False)
