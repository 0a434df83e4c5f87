"""`python -m bot` checks its settings before importing aiogram, torch or transformers.

Each case runs the real entry point in a subprocess (cwd = a temporary folder) and reports the
exit code and which heavy modules it had imported when it stopped. The hub is a fake HTTP
server (HF_ENDPOINT), so "no such model" and "hub unreachable" are both exercised offline.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import pytest
from aiohttp import web

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("aiogram", "torch", "transformers")
RUN = (
    "import json, runpy, sys\n"
    "code = 0\n"
    "try:\n"
    "    runpy.run_module('bot', run_name='__main__')\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    f"print(json.dumps({{'code': code, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
)

pytestmark = pytest.mark.timeout(120)


async def run_bot(tmp_path: Path, **env: str) -> tuple[dict, list[str]]:
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("HF_", "LOG_", "BOT_", "MODEL", "TEMPLATES_", "ADAPTERS_"))}
    full.update({
        "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "0", "DATABASE_PATH": str(tmp_path / "bot.sqlite3"),
        "TEMPLATES_DIR": str(REPO / "templates"), "ADAPTERS_DIR": str(REPO / "adapters"),
        "MODEL_CACHE_DIR": str(REPO / "models"), **env,
    })
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RUN, cwd=tmp_path, env=full, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 100)
    return json.loads(out.decode().strip().splitlines()[-1]), err.decode().strip().splitlines()


@pytest.fixture
async def fake_hub():
    """A hub that knows no model: 404 with the hub's RepoNotFound error code."""
    async def model_info(request: web.Request) -> web.Response:
        return web.json_response({"error": "Repository Not Found"}, status=404,
                                 headers={"X-Error-Code": "RepoNotFound"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", model_info)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_model_the_hub_does_not_have_is_reported_before_heavy_imports(tmp_path: Path, fake_hub: str) -> None:
    result, err = await run_bot(tmp_path, MODEL="nosuch", HF_ENDPOINT=fake_hub)
    assert result == {"code": 2, "heavy": []}, err
    text = "\n".join(err)
    assert "MODEL='nosuch'" in text and "not found locally" in text and "has no such model" in text
    assert "internet connection" not in text


@pytest.mark.parametrize("env, words", [
    ({"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}, "hub is not reachable"),
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
])
async def test_an_unreachable_hub_is_said_so(tmp_path: Path, env: dict, words: str) -> None:
    result, err = await run_bot(tmp_path, MODEL="someone/not-cached", **env)
    assert result == {"code": 2, "heavy": []}, err
    assert words in "\n".join(err)


async def test_missing_folders_and_typos_are_reported_before_heavy_imports(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MAX_NEW_TOKEN=60\nQUANTISATION=int8\n", encoding="utf-8")
    result, err = await run_bot(tmp_path, TEMPLATES_DIR="templates", LOG_FORMAT="json")
    assert result == {"code": 2, "heavy": []}, err
    events = [json.loads(line) for line in err]  # JSON logs: every line is one object
    messages = [e["msg"] for e in events]
    assert any("MAX_NEW_TOKEN " in m and "did you mean MAX_NEW_TOKENS?" in m for m in messages)
    assert any("QUANTISATION" in m and "did you mean QUANTIZATION?" in m for m in messages)
    (error,) = [e for e in events if e["level"] == "ERROR"]
    assert "TEMPLATES_DIR='templates'" in error["msg"] and str(tmp_path) in error["msg"]


async def test_the_vllm_settings_are_known_to_the_start_up_check(tmp_path: Path) -> None:
    """VLLM_ADAPTERS_DIR and friends are read by the vLLM backend: no "is not a setting" for them,
    and a typo of one is pointed at it."""
    (tmp_path / ".env").write_text("VLLM_ADAPTERS_DIR=/adapters\nVLLM_API_KEY=k\nVLLM_ADAPTER_DIR=/x\n",
                                   encoding="utf-8")
    _, err = await run_bot(tmp_path, LOG_FORMAT="json")  # no BOT_TOKEN, no terminal: it stops after the checks
    messages = [json.loads(line)["msg"] for line in err if line.startswith("{")]
    assert not any("VLLM_ADAPTERS_DIR" in m and "not a setting" in m and "did you mean" not in m for m in messages)
    assert not any("VLLM_API_KEY" in m for m in messages)
    assert any("VLLM_ADAPTER_DIR " in m and "did you mean VLLM_ADAPTERS_DIR?" in m for m in messages)
