"""The ops side port over real HTTP on 127.0.0.1: /healthz verdicts, /metrics exposition, probe."""
from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from bot.ops import OpsServer
from engine.metrics import EngineMetrics

# A check the server fails to time out would hang the probe; fail fast instead.
pytestmark = pytest.mark.timeout(60)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def _true() -> bool:
    return True


async def _false() -> bool:
    return False


async def _raises() -> bool:
    raise RuntimeError("database is locked")


async def _hangs() -> bool:
    await asyncio.Event().wait()  # never set: only the server's timeout ends it
    return True


async def get(url: str, **headers: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=headers) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def get_json(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            return resp.status, await resp.json()


HEALTH_CASES = [
    # (checks, expected status, expected failed names, error text expected per failed check)
    ({"model": _true, "bot": _true, "database": _true}, 200, [], {}),
    ({}, 200, [], {}),
    ({"model": _true, "bot": _false, "database": _true}, 503, ["bot"], {}),
    ({"model": _false, "bot": _false, "database": _true}, 503, ["bot", "model"], {}),
    ({"model": _true, "database": _raises}, 503, ["database"], {"database": "database is locked"}),
    ({"model": _hangs, "bot": _true}, 503, ["model"], {"model": "timed out"}),
]


@pytest.mark.parametrize("checks,status,failed,errors", HEALTH_CASES)
async def test_healthz_reports_each_check(
    checks: dict[str, Callable[[], Awaitable[bool]]], status: int, failed: list[str], errors: dict[str, str]
) -> None:
    async with OpsServer("127.0.0.1", 0, checks, [], check_timeout_s=0.3) as ops:
        code, body = await get_json(f"{ops.url}/healthz")
    assert code == status
    assert body["status"] == ("ok" if status == 200 else "fail")
    assert set(body["checks"]) == set(checks)
    for name, result in body["checks"].items():
        assert result["ok"] is (name not in failed)
    assert body.get("failed", []) == failed
    for name, text in errors.items():
        assert text in body["checks"][name]["error"]


async def test_healthz_follows_a_check_that_changes() -> None:
    state = {"db": True}

    async def database() -> bool:
        return state["db"]

    async with OpsServer("127.0.0.1", 0, {"database": database}, []) as ops:
        assert (await get_json(f"{ops.url}/healthz"))[0] == 200
        state["db"] = False
        code, body = await get_json(f"{ops.url}/healthz")
        assert (code, body["failed"]) == (503, ["database"])
        state["db"] = True
        assert (await get_json(f"{ops.url}/healthz"))[0] == 200


async def test_metrics_exports_every_registry_as_valid_prometheus_text() -> None:
    engine_reg, bot_reg = CollectorRegistry(), CollectorRegistry()
    tokens = Counter("llm_generated_tokens", "Tokens", ["adapter"], registry=engine_reg)
    depth = Gauge("llm_queue_depth", "Queue", registry=engine_reg)
    updates = Counter("bot_updates", "Updates", ["type"], registry=bot_reg)
    tokens.labels("legal").inc(5)
    updates.labels("message").inc()
    async with OpsServer("127.0.0.1", 0, {}, [engine_reg, bot_reg]) as ops:
        depth.set(3)  # a value set after start shows up: the scrape reads live registries
        code, ctype, text = await get(f"{ops.url}/metrics")
    assert code == 200
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }
    assert samples[("llm_generated_tokens_total", (("adapter", "legal"),))] == 5
    assert samples[("llm_queue_depth", ())] == 3
    assert samples[("bot_updates_total", (("type", "message"),))] == 1


async def test_metrics_speaks_openmetrics_when_asked() -> None:
    reg = CollectorRegistry()
    Counter("bot_updates", "Updates", registry=reg).inc()
    async with OpsServer("127.0.0.1", 0, {}, [reg]) as ops:
        code, ctype, text = await get(f"{ops.url}/metrics", Accept="application/openmetrics-text; version=1.0.0")
    assert code == 200
    assert ctype.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert "bot_updates_total 1.0" in text


# The issue's list of metrics, each mapped to the family the engine exports for it.
ISSUE_METRICS = [
    ("requests", "llm_requests", "counter"),
    ("tokens generated", "llm_generated_tokens", "counter"),
    ("tokens/s", "llm_request_tokens_per_second", "histogram"),
    ("time to first token", "llm_time_to_first_token_seconds", "histogram"),
    ("queue wait", "llm_queue_wait_seconds", "histogram"),
    ("queue depth", "llm_queue_depth", "gauge"),
    ("resident adapters", "llm_resident_adapters", "gauge"),
    ("adapter loads", "llm_adapter_loads", "counter"),
    ("training jobs by outcome", "llm_training_jobs", "counter"),
]


async def test_metrics_carries_the_engine_metrics_the_issue_names() -> None:
    metrics = EngineMetrics()
    metrics.training_jobs.labels("legal", "finished").inc()
    async with OpsServer("127.0.0.1", 0, {}, [metrics.registry]) as ops:
        _, _, text = await get(f"{ops.url}/metrics")
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    missing = [(what, name) for what, name, kind in ISSUE_METRICS if families.get(name) != kind]
    assert not missing, f"not exported with the expected type: {missing}"
    assert 'llm_training_jobs_total{domain="legal",outcome="finished"} 1.0' in text


async def test_port_zero_binds_a_free_port_and_stop_releases_it() -> None:
    ops = OpsServer("127.0.0.1", 0, {"model": _true}, [])
    await ops.start()
    port = ops.port
    assert port > 0
    assert (await get_json(f"http://127.0.0.1:{port}/healthz"))[0] == 200
    await ops.stop()
    await ops.stop()  # twice is harmless
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"http://127.0.0.1:{port}/healthz")


async def test_a_taken_port_is_an_error_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="OPS_PORT"):
            await OpsServer("127.0.0.1", port, {}, []).start()


async def _probe(env_port: str | None, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "OPS_PORT"}
    if env_port is not None:
        env["OPS_PORT"] = env_port
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.ops", "probe", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_the_healthcheck_command_exits_by_the_verdict() -> None:
    """`python -m bot.ops probe` is the Dockerfile's and compose's HEALTHCHECK."""
    state = {"ok": True}

    async def model() -> bool:
        return state["ok"]

    async with OpsServer("127.0.0.1", 0, {"model": model}, []) as ops:
        code, out = await _probe(str(ops.port))
        assert code == 0, out
        state["ok"] = False
        code, out = await _probe(str(ops.port))
        assert code == 1 and "503" in out and "model" in out
    code, out = await _probe(str(ops.port))  # nothing listens any more
    assert code == 1
    code, out = await _probe(None)
    assert code == 2 and "OPS_PORT" in out
