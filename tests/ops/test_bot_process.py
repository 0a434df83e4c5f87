"""The running bot as operators see it: `python -m bot` in a subprocess against the fake Bot API.

The engine is the scripted fake (ENGINE_FACTORY=tests.fakes.engine:factory), so these run in
seconds and need no model. What is checked is what a container orchestrator relies on: the
ops port answers /healthz and /metrics truthfully, the log is one JSON object per line without
user text, and SIGTERM in the middle of a streamed answer ends the process within 10 s with
the conversation saved.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.telegram import FakeTelegram

REPO = Path(__file__).resolve().parents[2]
USER = 501
QUESTION = "please tell me a long story about my private matters"
STOP_DEADLINE_S = 10.0  # the "stops within 10 s"

pytestmark = pytest.mark.timeout(180)


@dataclass
class BotProcess:
    proc: asyncio.subprocess.Process
    log_path: Path
    db_path: Path
    ops_url: str = ""

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def log_events(self) -> list[dict]:
        return [json.loads(line) for line in self.log_lines() if line.strip()]

    async def wait_log(self, predicate, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_lines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if predicate(event):
                    return event
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        raise AssertionError("log event not seen; log:\n" + "\n".join(self.log_lines()[-30:]))


async def start_bot(tg: FakeTelegram, tmp_path: Path, **env: str) -> BotProcess:
    log_path, db_path = tmp_path / "bot.log", tmp_path / "bot.sqlite3"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OPS_", "LOG_", "WEBHOOK_", "ENGINE_"))}
    full_env.update({
        "PYTHONPATH": str(REPO),
        "BOT_TOKEN": "42:fake-token",
        "BOT_API_URL": tg.url,
        "ENGINE_FACTORY": "tests.fakes.engine:factory",
        "DATABASE_PATH": str(db_path),
        "OPS_HOST": "127.0.0.1",
        "OPS_PORT": "0",  # a free port; read back from the log
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "STREAM_EDIT_INTERVAL_S": "0.1",
        **env,
    })
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", cwd=tmp_path, env=full_env,
            stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
        )
    bot = BotProcess(proc, log_path, db_path)
    event = await bot.wait_log(lambda e: e.get("logger") == "bot.ops" and "listening on" in e.get("msg", ""))
    bot.ops_url = event["msg"].split("listening on ")[1].split()[0]
    return bot


async def stop_bot(bot: BotProcess) -> float:
    """SIGTERM; seconds until exit. Kills and fails when it does not exit in time."""
    bot.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        await asyncio.wait_for(bot.proc.wait(), STOP_DEADLINE_S)
    except asyncio.TimeoutError:
        bot.proc.kill()
        await bot.proc.wait()
        pytest.fail(f"the bot did not stop within {STOP_DEADLINE_S} s of SIGTERM; log tail:\n"
                    + "\n".join(bot.log_lines()[-20:]))
    return time.monotonic() - started


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


async def get_health(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/healthz") as r:
            return r.status, await r.json()


async def wait_health(url: str, status: int, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    last: tuple[int, dict] | None = None
    while time.monotonic() < deadline:
        last = await get_health(url)
        if last[0] == status:
            return last[1]
        await asyncio.sleep(0.2)
    raise AssertionError(f"/healthz never answered {status}; last answer: {last}")


async def scrape(url: str) -> tuple[dict[tuple[str, tuple], float], set[str]]:
    """(sample (name, labels) -> value, names of the exported families) from /metrics."""
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    families = list(text_string_to_metric_families(text))
    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value for f in families for x in f.samples}
    return samples, {f.name for f in families}


async def test_healthz_and_metrics_from_a_running_bot(tg: FakeTelegram, tmp_path: Path) -> None:
    bot = await start_bot(tg, tmp_path)
    try:
        body = await wait_health(bot.ops_url, 200)
        assert {name: r["ok"] for name, r in body["checks"].items()} == {"model": True, "bot": True, "database": True}

        tg.send_text(USER, QUESTION)
        await tg.wait_for_buttons(USER, "answer to:")  # a finished answer carries feedback buttons
        samples, families = await scrape(bot.ops_url)
        assert samples[("bot_updates_total", (("type", "message"),))] >= 1
        assert samples[("bot_telegram_calls_total", (("method", "SendMessage"), ("outcome", "ok")))] >= 1
        engine_families = {"llm_queue_depth", "llm_time_to_first_token_seconds", "llm_resident_adapters"}
        assert engine_families <= families, "the engine's registry is not exported"

        # Telegram goes away: the "bot" check fails and names itself; it recovers when Telegram does.
        tg.fail("getUpdates", 502, times=10_000)
        body = await wait_health(bot.ops_url, 503)
        assert body["failed"] == ["bot"]
        tg.failures.clear()
        await wait_health(bot.ops_url, 200)
    finally:
        if bot.proc.returncode is None:
            await stop_bot(bot)
    assert bot.proc.returncode == 0

    events = bot.log_events()  # every line is one JSON object (json.loads would raise otherwise)
    assert events and all({"ts", "level", "logger", "msg"} <= set(e) for e in events)
    assert QUESTION not in bot.log_path.read_text(), "user text reached the log without LOG_CONTENT=true"


async def test_healthz_is_not_green_while_no_role_can_be_rendered(tg: FakeTelegram, tmp_path: Path) -> None:
    bot = await start_bot(tg, tmp_path, FAKE_ENGINE_NO_ROLES="1")
    try:
        body = await wait_health(bot.ops_url, 503)
        assert body["failed"] == ["model"]
        assert "no role template" in body["checks"]["model"]["error"]  # the reason, not just "false"
    finally:
        if bot.proc.returncode is None:
            await stop_bot(bot)


async def test_sigterm_during_a_stream_stops_in_time_and_saves_the_conversation(
    tg: FakeTelegram, tmp_path: Path
) -> None:
    # A slow answer: 400 pieces, 0.1 s apart (40 s) - SIGTERM lands in the middle of it.
    bot = await start_bot(tg, tmp_path, FAKE_ENGINE_DELAY_S="0.1", FAKE_ENGINE_PIECES="400",
                          SHUTDOWN_GRACE_S="1")
    try:
        await wait_health(bot.ops_url, 200)
        tg.send_text(USER, QUESTION)
        await tg.wait_for_text(USER, " word5")  # streaming is visibly under way
    except BaseException:
        bot.proc.kill()
        raise
    seconds = await stop_bot(bot)
    assert bot.proc.returncode == 0, "\n".join(bot.log_lines()[-20:])

    with sqlite3.connect(bot.db_path) as db:
        rows = db.execute(
            "select role, text, finish_reason from messages where user_id = ? order by id", [USER]
        ).fetchall()
    assert [r[0] for r in rows] == ["user", "assistant"], rows
    assert rows[0][1] == QUESTION
    saved, reason = rows[1][1], rows[1][2]
    full = "".join(f" word{i}" for i in range(400))
    assert reason == "cancelled"
    assert full.startswith(saved) and " word5" in saved and len(saved) < len(full)
    # what the user sees in Telegram is what was saved
    shown = tg.bot_messages(USER)[-1].text
    assert saved.strip().split()[-1] in shown
    print(f"stopped {seconds:.2f} s after SIGTERM with {len(saved.split())} of 400 pieces saved")


async def test_no_network_at_start_is_retried_with_one_line_per_attempt(
    tg: FakeTelegram, tmp_path: Path, unused_tcp_port: int,
) -> None:
    # nothing listens on that port: every call fails the way a missing network does
    bot = await start_bot(tg, tmp_path, BOT_API_URL=f"http://127.0.0.1:{unused_tcp_port}")
    try:
        await bot.wait_log(lambda e: "attempt 2" in e.get("msg", ""))
        status, health = await get_health(bot.ops_url)
        assert status == 503 and "bot" in health["failed"]  # not reachable: not healthy
        assert bot.proc.returncode is None  # still up, still trying; the model stays loaded
    finally:
        await stop_bot(bot)
    assert bot.proc.returncode == 0
    retries = [e for e in bot.log_events() if "not reachable" in e.get("msg", "")]
    assert len(retries) >= 2 and all(e["level"] == "WARNING" and "exc" not in e for e in retries)
    assert not any("Traceback" in line for line in bot.log_lines())


async def test_a_malformed_token_stops_the_start_before_anything_loads(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPS_", "LOG_", "WEBHOOK_"))}
    env.update(PYTHONPATH=str(REPO), BOT_TOKEN="my-bot-token with blanks", DATABASE_PATH=str(tmp_path / "b.sqlite3"),
               ENGINE_FACTORY="tests.fakes.nosuch:factory")  # would fail if the engine were built
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", cwd=tmp_path, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    text = err.decode()
    assert proc.returncode == 2, text
    assert "BOT_TOKEN" in text and "@BotFather" in text
    assert "my-bot-token" not in text  # a secret is never echoed
    assert "ENGINE_FACTORY" not in text and "Traceback" not in text
