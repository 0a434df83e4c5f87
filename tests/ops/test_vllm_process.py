"""`python -m bot` with ENGINE_BACKEND=vllm, as an operator runs it: a subprocess against the fake
Bot API server and a fake vLLM replica, configured only through the environment.

Checked: it answers through the replica, /healthz and /metrics show the replica, a replica
that restarts gets its adapters back from the running bot, and a setup that cannot work
stops the start with the variable to change (replicas that cannot serve: tests/engine).
"""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.fakes.adapters import write_adapter
from tests.fakes.telegram import FakeTelegram
from tests.fakes.vllm import FakeVllm
from tests.ops.test_bot_process import BotProcess, scrape, stop_bot, wait_health

REPO = Path(__file__).resolve().parents[2]
USER = 777

pytestmark = pytest.mark.timeout(300)


def bot_env(tg: FakeTelegram, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPS_", "LOG_", "WEBHOOK_", "VLLM_", "ENGINE_", "FAKE_ENGINE"))}
    env.update({
        "PYTHONPATH": str(REPO), "BOT_TOKEN": "42:fake-token", "BOT_API_URL": tg.url,
        "ENGINE_BACKEND": "vllm", "MODEL_CACHE_DIR": str(REPO / "models"), "ADAPTERS_DIR": str(tmp_path / "adapters"),
        "TEMPLATES_DIR": str(REPO / "templates"), "DATABASE_PATH": str(tmp_path / "bot.sqlite3"),
        "OPS_HOST": "127.0.0.1", "OPS_PORT": "0", "LOG_FORMAT": "json", "STREAM_EDIT_INTERVAL_S": "0.1",
        "VLLM_HEALTH_INTERVAL_S": "0.2", "VLLM_RETRY_AFTER_S": "0.2",
        **extra,
    })
    return env


async def spawn(tmp_path: Path, env: dict[str, str]) -> BotProcess:
    log_path = tmp_path / "bot.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", cwd=tmp_path, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
        )
    return BotProcess(proc, log_path, tmp_path / "bot.sqlite3")


@pytest.fixture
async def tg():
    async with FakeTelegram() as server:
        yield server


async def test_the_bot_process_answers_through_vllm_and_re_registers_a_restarted_replica(tg, tmp_path):
    write_adapter(tmp_path / "adapters", "legal")
    async with FakeVllm(name="vllm-1") as replica:
        bot = await spawn(tmp_path, bot_env(tg, tmp_path, VLLM_URLS=replica.url))
        try:
            event = await bot.wait_log(lambda e: e.get("logger") == "bot.ops" and "listening on" in e.get("msg", ""),
                                       timeout=240)
            bot.ops_url = event["msg"].split("listening on ")[1].split()[0]
            body = await wait_health(bot.ops_url, 200)
            assert [(r["name"], r["state"], r["adapters"]) for r in body["replicas"]] == [(replica.url, "ready", 1)]
            assert replica.adapters == {"legal__v1": str((tmp_path / "adapters" / "legal" / "v1").resolve())}

            tg.send_text(USER, "hello there")
            answer = await tg.wait_for_buttons(USER, "says hello", timeout=60)
            assert answer.text.startswith(f"vllm-1:{replica.model}")

            await replica.restart()  # forgets legal__v1; the bot's health loop puts it back
            await replica.wait_for(lambda: "legal__v1" in replica.adapters, timeout=60)
            samples, _ = await scrape(bot.ops_url)
            assert samples[("llm_replica_up", (("replica", replica.url),))] == 1.0
            assert samples[("llm_replica_requests_total", (("outcome", "ok"), ("replica", replica.url)))] == 1.0
        finally:
            if bot.proc.returncode is None:
                await stop_bot(bot)
    assert bot.proc.returncode == 0, "\n".join(bot.log_lines()[-20:])


@pytest.mark.parametrize(("extra", "code", "expected"), [
    ({}, 2, "VLLM_URLS"),
    ({"ENGINE_FACTORY": "tests.fakes.engine:factory"}, 2, "ENGINE_FACTORY"),
])
async def test_a_vllm_setup_that_cannot_work_stops_the_start_naming_the_setting(tg, tmp_path, extra, code, expected):
    (tmp_path / "adapters").mkdir()  # an empty adapters folder is legitimate; only the vLLM setting is wrong
    bot = await spawn(tmp_path, bot_env(tg, tmp_path, **extra))
    await asyncio.wait_for(bot.proc.wait(), 120)
    assert bot.proc.returncode == code
    assert expected in bot.log_path.read_text()

