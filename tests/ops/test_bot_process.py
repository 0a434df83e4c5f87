"""The running bot as operators see it: `python -m bot` in a subprocess against the fake Bot API.

The engine is the scripted fake (ENGINE_FACTORY=tests.fakes.engine:factory), so these run in
seconds and need no model. What is checked is what a container orchestrator relies on: the
ops port answers /healthz and /metrics truthfully, the log is one JSON object per line without
user text, and SIGTERM (or SIGHUP) in the middle of a streamed answer ends the process within
10 s with the conversation saved.

And what an operator meets when things break (docs/operations.md): kill -9 mid-answer and a
restart, Telegram gone for a while mid-answer, a damaged database file or an unwritable
database folder at start, a second instance on the same database, a training job that died
with the bot.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
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


async def start_bot(tg: FakeTelegram, tmp_path: Path, *, log_name: str = "bot.log", ready: bool = True,
                    **env: str) -> BotProcess:
    """`python -m bot` against `tg`; waits for its ops port unless `ready=False` (a start meant to fail)."""
    log_path, db_path = tmp_path / log_name, Path(env.get("DATABASE_PATH", tmp_path / "bot.sqlite3"))
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
    if not ready:
        return bot
    event = await bot.wait_log(lambda e: e.get("logger") == "bot.ops" and "listening on" in e.get("msg", ""))
    bot.ops_url = event["msg"].split("listening on ")[1].split()[0]
    return bot


async def stop_bot(bot: BotProcess, sig: signal.Signals = signal.SIGTERM) -> float:
    """SIGTERM (or `sig`); seconds until exit. Kills and fails when it does not exit in time."""
    bot.proc.send_signal(sig)
    started = time.monotonic()
    try:
        await asyncio.wait_for(bot.proc.wait(), STOP_DEADLINE_S)
    except asyncio.TimeoutError:
        bot.proc.kill()
        await bot.proc.wait()
        pytest.fail(f"the bot did not stop within {STOP_DEADLINE_S} s of {sig.name}; log tail:\n"
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


async def wait_health(url: str, status: int, timeout: float = 30.0,
                      until: Callable[[dict], bool] = lambda body: True) -> dict:
    """The first /healthz body with `status` for which `until` holds (checks settle one by one:
    a loaded machine may answer 503 for the bot's own check before its first poll)."""
    deadline = time.monotonic() + timeout
    last: tuple[int, dict] | None = None
    while time.monotonic() < deadline:
        last = await get_health(url)
        if last[0] == status and until(last[1]):
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
        # once the bot's own check is green (it polls Telegram), the model alone stays red
        body = await wait_health(bot.ops_url, 503, until=lambda b: "bot" not in b["failed"])
        assert body["failed"] == ["model"]
        assert "no role template" in body["checks"]["model"]["error"]  # the reason, not just "false"
    finally:
        if bot.proc.returncode is None:
            await stop_bot(bot)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_a_stop_signal_during_a_stream_stops_in_time_and_saves_the_conversation(
    tg: FakeTelegram, tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGHUP too: a closed terminal under `make run`, or `docker kill -s HUP`."""
    # A slow answer: 400 pieces, 0.1 s apart (40 s) - the signal lands in the middle of it.
    bot = await start_bot(tg, tmp_path, FAKE_ENGINE_DELAY_S="0.1", FAKE_ENGINE_PIECES="400",
                          SHUTDOWN_GRACE_S="1")
    try:
        await wait_health(bot.ops_url, 200)
        tg.send_text(USER, QUESTION)
        await tg.wait_for_text(USER, " word5")  # streaming is visibly under way
    except BaseException:
        bot.proc.kill()
        raise
    seconds = await stop_bot(bot, sig)
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
    print(f"stopped {seconds:.2f} s after {sig.name} with {len(saved.split())} of 400 pieces saved")


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


# ---- faults an operator meets (docs/operations.md) ----------------------------------------------


def db_rows(db_path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    with sqlite3.connect(db_path, timeout=10) as db:
        return db.execute(sql, params).fetchall()


async def wait_rows(db_path: Path, sql: str, params: tuple = (), timeout: float = 30.0) -> list[tuple]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = db_rows(db_path, sql, params)
        if rows:
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"no rows for {sql!r} within {timeout} s")


async def finished(bot: BotProcess, timeout: float = 60.0) -> str:
    """Wait for a bot process that is meant to end by itself; its log."""
    try:
        await asyncio.wait_for(bot.proc.wait(), timeout)
    except asyncio.TimeoutError:
        bot.proc.kill()
        await bot.proc.wait()
        pytest.fail("the bot did not end; log tail:\n" + "\n".join(bot.log_lines()[-20:]))
    return bot.log_path.read_text(errors="replace")


async def test_kill_9_mid_answer_keeps_the_partial_answer_and_the_restart_tells_the_user(
    tg: FakeTelegram, tmp_path: Path
) -> None:
    """The OOM killer, `docker kill`, a power cut: no shutdown code runs at all."""
    engine = {"ENGINE_FACTORY": "tests.e2e.engines:recording_factory"}
    bot = await start_bot(tg, tmp_path, FAKE_ENGINE_DELAY_S="0.05", FAKE_ENGINE_PIECES="600", **engine)
    try:
        tg.send_text(USER, QUESTION)
        await tg.wait_for_text(USER, " word5")
        partial = await wait_rows(bot.db_path, "select text from messages where role = 'assistant' and text != ''")
    finally:
        bot.proc.kill()
        await bot.proc.wait()
    assert bot.proc.returncode == -signal.SIGKILL

    again = await start_bot(tg, tmp_path, log_name="restart.log", **engine)
    try:
        told = await tg.wait_for_text(USER, "was cut off")
        assert [b["text"] for b in told.buttons] == ["🔁 Retry"]
        [(text, reason)] = db_rows(again.db_path, "select text, finish_reason from messages where role = 'assistant'")
        full = "".join(f" word{i}" for i in range(600))
        assert reason == "interrupted" and full.startswith(text) and text.startswith(partial[0][0])

        tg.send_text(USER, "a new question")
        await tg.wait_for_buttons(USER, "answer to: a new question")
        asked = await again.wait_log(lambda e: "fake engine asked" in e.get("msg", ""))
        assert asked["msg"].endswith("user/assistant/user"), asked  # the new question, answered as itself
    finally:
        await stop_bot(again)
    print(f"partial answer kept: {len(text)} of {len(full)} characters; the user was told after the restart")


async def test_a_telegram_outage_mid_answer_ends_with_the_full_answer_soon_after_it_returns(
    tg: FakeTelegram, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Telegram's API refuses connections for OUTAGE_S seconds (30 by default; OUTAGE_S=120 for the
    two-minute run) while an answer streams; the defaults of every retry setting are in force."""
    outage_s = float(os.environ.get("OUTAGE_S", "30"))
    request.node.add_marker(pytest.mark.timeout(outage_s + 120))
    bot = await start_bot(tg, tmp_path, FAKE_ENGINE_DELAY_S="0.05", FAKE_ENGINE_PIECES="300")
    try:
        tg.send_text(USER, QUESTION)
        first = await tg.wait_for_text(USER, " word5")
        await tg.go_down()
        down_at = time.monotonic()
        status, _ = await get_health(bot.ops_url)
        await asyncio.sleep(outage_s)
        shown_during = first.text
        await tg.come_back()
        back_at = time.monotonic()
        final = await tg.wait_for_buttons(USER, " word299", timeout=60)
        done_at = next(c.at for c in tg.calls if c.params.get("reply_markup") and c.status == 200)
    finally:
        await stop_bot(bot)
    assert final.message_id == first.message_id
    assert final.text == "".join(f" word{i}" for i in range(300)).strip()
    assert [b["text"] for b in final.buttons] == ["👍", "👎"]
    assert "word299" not in shown_during
    print(f"outage {back_at - down_at:.1f} s (health during it: {status}); the full answer with its buttons "
          f"{done_at - back_at:.2f} s after the API returned")


@pytest.mark.parametrize("fault", ["damaged file", "read-only folder"])
async def test_a_database_that_cannot_be_used_stops_the_start_with_one_clear_line(
    tg: FakeTelegram, tmp_path: Path, fault: str
) -> None:
    from tests.e2e.volumes import read_only

    folder = tmp_path / "state"
    folder.mkdir()
    db_path = folder / "bot.sqlite3"
    if fault == "damaged file":
        db_path.write_bytes(b"this was a database until a disk went bad\n" * 200)
        bot = await start_bot(tg, tmp_path, ready=False, DATABASE_PATH=str(db_path))
        text = await finished(bot)
    else:
        with read_only(folder):
            bot = await start_bot(tg, tmp_path, ready=False, DATABASE_PATH=str(db_path))
            text = await finished(bot)
    assert bot.proc.returncode == 3, text
    assert "Traceback" not in text
    errors = [e for e in bot.log_events() if e["level"] in ("ERROR", "CRITICAL")]
    assert len(errors) == 1 and f"DATABASE_PATH={db_path}" in errors[0]["msg"], errors
    assert ("damaged" if fault == "damaged file" else "writable") in errors[0]["msg"]
    assert "exc" not in errors[0]


async def test_a_second_instance_on_the_same_database_is_refused_and_the_first_goes_on(
    tg: FakeTelegram, tmp_path: Path
) -> None:
    first = await start_bot(tg, tmp_path)
    try:
        second = await start_bot(tg, tmp_path, log_name="second.log", ready=False)
        text = await finished(second)
        assert second.proc.returncode == 3, text
        [line] = [e for e in second.log_events() if e["level"] == "ERROR"]
        assert f"pid {first.proc.pid}" in line["msg"] and "another bot instance" in line["msg"]
        assert "Traceback" not in text
        tg.send_text(USER, "still there?")
        await tg.wait_for_buttons(USER, "answer to: still there?")
    finally:
        await stop_bot(first)


async def test_a_training_job_that_died_with_the_bot_is_reported_to_the_admin_after_the_restart(
    tg: FakeTelegram, tmp_path: Path
) -> None:
    """/train, then kill -9: the trainer child ends with its parent. The restarted bot edits the
    admin's frozen progress message with how the job ended; /status and /jobs show it."""
    from tests.e2e.engines import adapters_with_data

    adapters = adapters_with_data(tmp_path / "adapters")
    env = {"ENGINE_FACTORY": "tests.e2e.engines:factory", "ADAPTERS_DIR": str(adapters),
           "MODEL_CACHE_DIR": str(REPO / "models"), "ADMIN_IDS": str(USER)}
    bot = await start_bot(tg, tmp_path, **env)
    try:
        tg.send_text(USER, "/train legal")
        progress = await tg.wait_for_text(USER, "Training legal")
        await asyncio.sleep(1.0)  # the bot notes the message's id the moment Telegram answers; let it
        child = json.loads((adapters / ".runs" / "jobs.jsonl").read_text().splitlines()[-1])["pid"]
    finally:
        bot.proc.kill()
        await bot.proc.wait()
    frozen = progress.text

    again = await start_bot(tg, tmp_path, log_name="restart.log", **env)
    try:
        await tg.wait_for(lambda: "failed" in progress.text, timeout=60)
        assert progress.text != frozen and "interrupted" in progress.text and "Training legal" in progress.text
        tg.send_text(USER, "/status")
        status = await tg.wait_for_text(USER, "last job: legal failed")
        assert "Training: idle" in status.text
        tg.send_text(USER, "/jobs")
        jobs = await tg.wait_for_text(USER, "Last training jobs")
        assert "❌ legal · failed" in jobs.text and f"pid {child}" in jobs.text
    finally:
        await stop_bot(again)
    assert db_rows(again.db_path, "select outcome from training_reports") == [("failed",)]
