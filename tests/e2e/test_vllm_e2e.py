"""The real bot with ENGINE_BACKEND=vllm: fake Bot API server + fake vLLM replicas, over HTTP.

The engine is built the way `python -m bot` builds it (bot.app.build_engine with the backend
named by the settings), so everything from the Telegram update to the vLLM stream and back to
the edited message is the production path. Users see the same bot: streamed answers in their
mode, /status with the replicas, "busy" when no replica is left, /reload going live, /stop.
"""
from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from bot.app import build_engine
from bot.config import load_bot_settings
from engine.config import load_settings
from tests.conftest import ADMIN_ID
from tests.engine.vllm_support import REPO, _no_vllm_env, adapters_dir, fakes  # noqa: F401
from tests.fakes.adapters import write_adapter
from tests.fakes.telegram import FakeTelegram

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def vllm_engine(adapters_dir, monkeypatch):
    """build(*fakes) -> the engine ENGINE_BACKEND=vllm gives, started; closed at the end."""
    engines = []

    async def build(*replicas, **env: str):
        monkeypatch.setenv("ENGINE_BACKEND", "vllm")
        monkeypatch.setenv("VLLM_URLS", ",".join(r.url for r in replicas))
        monkeypatch.setenv("VLLM_HEALTH_INTERVAL_S", "3600")
        monkeypatch.setenv("VLLM_RETRY_AFTER_S", "0")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        bot_settings = load_bot_settings(_env_file=None)
        engine = build_engine(bot_settings.engine_factory, load_settings(
            _env_file=None, model_cache_dir=REPO / "models", adapters_dir=adapters_dir,
            templates_dir=REPO / "templates", max_new_tokens=64,
        ), bot_settings.engine_backend)
        engines.append(engine)
        await engine.start()
        return engine

    yield build
    for engine in engines:
        await engine.close()


def _answers(tg: FakeTelegram, chat_id: int = 7) -> list:
    return [m for m in tg.bot_messages(chat_id) if any("👍" in b["text"] for b in m.buttons)]


def _rows(store, role: str = "assistant") -> list[dict]:
    return list(store.db["messages"].rows_where("role = ?", [role], order_by="id"))


async def test_a_user_gets_a_streamed_answer_in_their_mode_from_a_replica(tg, start_bot, fakes, vllm_engine):
    a, b = await fakes(2)
    engine = await vllm_engine(a, b)
    bot = await start_bot(engine)
    bot.store.touch_user(7)
    bot.store.set_mode(7, "legal", "lawyer")
    reply = a.script("A deposit must be returned within thirty days.", stepped=True)
    b.replies.append(reply)  # whichever replica takes it
    tg.send_text(7, "Can my landlord keep the deposit?")
    first = await tg.wait_for_text(7, "A")
    reply.allow(3)
    await tg.wait_for(lambda: "A deposit must be" in first.text)
    reply.allow(10)
    final = await tg.wait_for_buttons(7, "thirty days.")
    assert final.message_id == first.message_id and len(final.edits) >= 2  # streamed into one message
    (request,) = a.completions + b.completions
    assert request.model == "legal__v1" and request.finished
    await tg.wait_for(lambda: len(_rows(bot.store)) == 1)
    row = _rows(bot.store)[0]
    assert (row["adapter"], row["adapter_version"], row["template"]) == ("legal", "v1", "lawyer")
    assert row["completion_tokens"] == 8 and row["prompt_tokens"] == len(request.prompt)
    assert row["finish_reason"] == "stop"


async def test_status_shows_each_replica_and_the_answers_move_off_a_failed_one(tg, start_bot, fakes, vllm_engine):
    a, b = await fakes(2)
    engine = await vllm_engine(a, b)
    await start_bot(engine)
    await a.stop()
    tg.send_text(7, "hello")
    answer = await tg.wait_for(lambda: next(iter(_answers(tg)), None))
    assert answer.text.startswith("vllm-2:")  # vllm-1 was tried first and failed before any token
    tg.send_text(ADMIN_ID, "/status")
    status = await tg.wait_for_text(ADMIN_ID, "Replicas: 1 of 2 ready")
    assert f"{b.url} — ready" in status.text and f"{a.url} — down" in status.text
    assert "1 failures" in status.text


@pytest.mark.parametrize(("language", "busy"), [("en", "overloaded"), ("ru", "перегружен")])
async def test_the_user_is_told_busy_when_no_replica_is_left(tg, start_bot, fakes, vllm_engine, language, busy):
    a, b = await fakes(2)
    engine = await vllm_engine(a, b)
    bot = await start_bot(engine)
    await a.stop()
    await b.stop()
    tg.send_text(7, "hello", language_code=language)
    await tg.wait_for_text(7, busy)
    assert _rows(bot.store) == []  # no half answer stored


async def test_reload_puts_a_new_version_on_every_replica_and_answers_use_it(tg, start_bot, fakes, vllm_engine,
                                                                              adapters_dir: Path):
    a, b = await fakes(2)
    engine = await vllm_engine(a, b)
    bot = await start_bot(engine)
    bot.store.touch_user(7)
    bot.store.set_mode(7, "legal", "lawyer")
    write_adapter(adapters_dir, "legal", "v2", seed=9)
    tg.send_text(ADMIN_ID, "/reload legal")
    await tg.wait_for_text(ADMIN_ID, "legal: v2 loaded")
    assert "legal__v2" in a.adapters and "legal__v2" in b.adapters
    assert "legal__v1" not in a.adapters and "legal__v1" not in b.adapters
    tg.send_text(7, "and now?")
    answer = await tg.wait_for(lambda: next(iter(_answers(tg)), None))
    assert "legal__v2" in answer.text
    await tg.wait_for(lambda: len(_rows(bot.store)) == 1)
    assert _rows(bot.store)[0]["adapter_version"] == "v2"
    tg.send_text(ADMIN_ID, "/adapters")
    await tg.wait_for_text(ADMIN_ID, "legal · serving v2")


async def test_stop_closes_the_replicas_stream_and_keeps_the_partial_answer(tg, start_bot, fakes, vllm_engine):
    (a,) = await fakes(1)
    engine = await vllm_engine(a)
    bot = await start_bot(engine)
    reply = a.script("one two three four five six", stepped=True)
    tg.send_text(7, "tell me a story")
    await tg.wait_for_text(7, "one")
    tg.send_text(7, "/stop")
    await a.wait_for(lambda: a.completions and a.completions[0].aborted)
    await tg.wait_for(lambda: len(_rows(bot.store)) == 1)
    row = _rows(bot.store)[0]
    assert row["finish_reason"] == "cancelled" and row["text"].startswith("one")
    reply.allow(10)


async def test_healthz_shows_each_replica(tg, start_bot, fakes, vllm_engine):
    a, b = await fakes(2)
    engine = await vllm_engine(a, b)
    bot = await start_bot(engine, ops_host="127.0.0.1", ops_port=0)
    await tg.wait_for(lambda: bot.app.ops is not None and bot.app.ops.port)
    await b.stop()
    tg.send_text(7, "hello")  # the first request tries vllm-1; a second finds vllm-2 down
    tg.send_text(8, "hello")
    await tg.wait_for(lambda: _answers(tg, 7) and _answers(tg, 8))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{bot.app.ops.url}/healthz") as r:
            assert r.status == 200  # one ready replica can answer
            body = await r.json()
    states = {r["name"]: r["state"] for r in body["replicas"]}
    assert states == {a.url: "ready", b.url: "down"}
    assert body["checks"]["model"]["ok"] is True
    await a.stop()
    tg.send_text(9, "hello")
    await tg.wait_for_text(9, "overloaded")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{bot.app.ops.url}/healthz") as r:
            assert r.status == 503  # nothing can answer: not ready
            assert (await r.json())["failed"] == ["model"]
