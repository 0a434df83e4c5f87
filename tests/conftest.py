"""Shared fixtures: the fake Telegram Bot API server, the scripted engine, a running bot.

Nothing here is autouse, so other parts of the suite are unaffected; tests/bot and
tests/e2e add an autouse fixture that keeps every path they write under tmp_path.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from tests.fakes.engine import FakeEngine
from tests.fakes.telegram import FakeTelegram

ADMIN_ID = 1
TEST_TOKEN = "123456:TEST-token"

#: Environment variables BotSettings reads; cleared so the developer's shell cannot leak in.
BOT_ENV = (
    "BOT_TOKEN", "ADMIN_IDS", "ALLOWED_USER_IDS", "DATABASE_PATH", "BOT_API_URL", "WEBHOOK_URL", "WEBHOOK_SECRET",
    "WEBHOOK_HOST", "WEBHOOK_PORT", "WEBHOOK_PATH", "RATE_LIMIT_MESSAGES", "RATE_LIMIT_WINDOW_S",
    "MAX_PENDING_PER_USER", "HISTORY_TURNS", "STREAM_EDIT_INTERVAL_S", "TELEGRAM_RETRY_FOR_S",
    "TELEGRAM_BACKOFF_MAX_S", "TELEGRAM_SENDS_PER_S",
    "SHUTDOWN_GRACE_S", "ENGINE_FACTORY", "ENGINE_BACKEND", "OPS_HOST", "OPS_PORT", "LOG_FORMAT", "LOG_CONTENT", "LOG_LEVEL",
    "ALLOW_GUESTS", "TOKENS_PER_DAY", "TOKENS_PER_MONTH", "GUEST_TOKENS_PER_DAY", "GUEST_TOKENS_PER_MONTH",
    "BUDGET_TIMEZONE",
)


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = tmp_path (so `.env` and relative paths land there) and no bot settings from the shell."""
    monkeypatch.chdir(tmp_path)
    for name in BOT_ENV:
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@dataclass
class RunningBot:
    app: Any  # bot.app.BotApp
    task: asyncio.Task[None]
    store: Any  # bot.storage.Store

    async def stop(self, timeout: float = 30.0) -> None:
        self.app.request_stop()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        finally:
            self.store.close()


StartBot = Callable[..., Awaitable[RunningBot]]


@pytest.fixture
async def start_bot(tg: FakeTelegram, tmp_path: Path) -> AsyncIterator[StartBot]:
    """start_bot(engine, **settings) runs the real bot (polling) against the fake server in-process."""
    from bot.app import BotApp
    from bot.config import BotSettings
    from bot.storage import Store

    running: list[RunningBot] = []

    async def start(engine: Any, *, connect_backoff_s: tuple[float, float] = (0.05, 0.2), clock: Any = None,
                    rng: Any = None, max_new_tokens: int | None = None, **overrides: Any) -> RunningBot:
        """`clock` (what "now" is for the store and the budgets), `rng` (the A/B draws) and
        `max_new_tokens` (what an answer holds of a budget) go to the app; the rest are settings."""
        values: dict[str, Any] = dict(
            bot_token=TEST_TOKEN, bot_api_url=tg.url, database_path=tmp_path / "bot.sqlite3",
            stream_edit_interval_s=0.02, admin_ids=str(ADMIN_ID), rate_limit_messages=0, shutdown_grace_s=0.0,
        )
        values.update(overrides)
        settings = BotSettings(_env_file=None, **values)  # type: ignore[call-arg]
        store = Store(settings.database_path, **({"clock": clock} if clock is not None else {}))
        app = BotApp(settings, engine, store, connect_backoff_s=connect_backoff_s, rng=rng,
                     max_new_tokens=max_new_tokens)
        bot = RunningBot(app, asyncio.create_task(app.run(handle_signals=False)), store)
        running.append(bot)
        return bot

    yield start
    for bot in running:
        if not bot.task.done():
            await bot.stop()
        elif not bot.task.cancelled() and bot.task.exception() is not None:
            raise bot.task.exception()  # type: ignore[misc]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests need CUDA; on a CPU machine they skip (each has a CPU twin)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; the CPU twin runs instead")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
