"""Start-up against a Telegram that is not there yet, answers 5xx, or refuses the token."""
from __future__ import annotations

import asyncio
import logging

import pytest

from engine.errors import ConfigError
from tests.conftest import TEST_TOKEN
from tests.fakes.telegram import FakeTelegram

pytestmark = pytest.mark.timeout(120)


async def _retries(caplog: pytest.LogCaptureFixture, n: int) -> list[logging.LogRecord]:
    for _ in range(2000):
        records = [r for r in caplog.records if "is not reachable" in r.getMessage()]
        if len(records) >= n:
            return records
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {n} retries logged: {[r.getMessage() for r in caplog.records]}")


async def test_a_bot_api_that_is_not_there_yet_is_retried_until_it_answers(
    engine, start_bot, unused_tcp_port, caplog
):
    caplog.set_level(logging.WARNING, logger="bot.app")
    await start_bot(engine, bot_api_url=f"http://127.0.0.1:{unused_tcp_port}")
    retries = await _retries(caplog, 3)
    assert [f"attempt {i}" in r.getMessage() for i, r in enumerate(retries[:3], 1)] == [True] * 3
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in retries)  # one line each
    late = FakeTelegram()  # the network comes back: a Bot API where the bot has been knocking
    await late.start(unused_tcp_port)
    try:
        late.send_text(7, "are you there?")
        await late.wait_for_buttons(7, "answer to: are you there?")
    finally:
        await late.stop()


async def test_server_errors_at_start_are_waited_out(tg, engine, start_bot):
    tg.fail("getMe", 502, times=2)
    await start_bot(engine)
    tg.send_text(7, "hello")
    await tg.wait_for_buttons(7, "answer to: hello")
    assert [c.status for c in tg.calls_of("getMe")][:3] == [502, 502, 200]


async def test_a_token_telegram_refuses_ends_the_start_naming_bot_token(tg, engine, tmp_path):
    from bot.app import BotApp
    from bot.config import BotSettings
    from bot.storage import Store

    tg.fail("getMe", 401, description="Unauthorized", times=5)
    settings = BotSettings(_env_file=None, bot_token=TEST_TOKEN, bot_api_url=tg.url,
                           database_path=tmp_path / "bot.sqlite3")
    store = Store(settings.database_path)
    try:
        with pytest.raises(ConfigError, match="BOT_TOKEN was refused"):
            await asyncio.wait_for(BotApp(settings, engine, store).run(handle_signals=False), 30)
    finally:
        store.close()
    assert len(tg.calls_of("getMe")) == 1  # not retried: another try cannot fix a token
