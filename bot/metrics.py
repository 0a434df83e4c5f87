"""Prometheus counters of the front end, on their own registry (exported by the ops port).

Telegram API traffic is counted in one place, a request middleware on the bot's session,
so every call (handlers, streaming, polling) is seen and the "bot connected" health check
knows when the last call to Telegram succeeded.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiogram.client.session.middlewares.base import BaseRequestMiddleware
from aiogram.exceptions import TelegramNetworkError, TelegramRetryAfter, TelegramServerError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from aiogram import Bot
    from aiogram.methods import TelegramMethod


class BotMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.updates = Counter("bot_updates", "Updates handled, by type", ["type"], registry=r)
        self.api_calls = Counter(
            "bot_telegram_calls", "Bot API calls by method and outcome", ["method", "outcome"], registry=r
        )
        self.messages_sent = Counter("bot_messages_sent", "Messages the bot sent", registry=r)
        self.edits = Counter("bot_message_edits", "Message edits the bot made", registry=r)
        self.retry_after = Counter("bot_telegram_retry_after", "429 answers (flood control) from Telegram", registry=r)
        self.generations = Counter("bot_generations", "Answers by outcome", ["outcome"], registry=r)
        self.active_generations = Gauge("bot_active_generations", "Answers being generated now", registry=r)
        self.rate_limited = Counter("bot_rate_limited", "Messages refused by the per-user rate limit", registry=r)
        self.first_text = Histogram(
            "bot_time_to_first_text_seconds", "From the user's message to the first visible text",
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=r,
        )
        self.last_api_ok: float | None = None  # monotonic time of the last successful Bot API call
        self.last_api_error: float | None = None


class ApiCallCounter(BaseRequestMiddleware):
    """Counts every Bot API call by method and outcome; remembers when Telegram last answered."""

    def __init__(self, metrics: BotMetrics) -> None:
        self.metrics = metrics

    async def __call__(self, make_request: Any, bot: "Bot", method: "TelegramMethod[Any]") -> Any:
        name = type(method).__name__
        m = self.metrics
        try:
            response = await make_request(bot, method)
        except TelegramRetryAfter:
            m.retry_after.inc()
            m.api_calls.labels(name, "retry_after").inc()
            m.last_api_ok = time.monotonic()  # Telegram answered; it is reachable
            raise
        except (TelegramServerError, TelegramNetworkError):
            m.api_calls.labels(name, "unavailable").inc()
            m.last_api_error = time.monotonic()
            raise
        except Exception:
            m.api_calls.labels(name, "error").inc()
            m.last_api_ok = time.monotonic()
            raise
        m.api_calls.labels(name, "ok").inc()
        m.last_api_ok = time.monotonic()
        if name == "SendMessage":
            m.messages_sent.inc()
        elif name == "EditMessageText":
            m.edits.inc()
        return response

    def connected(self) -> bool:
        """The last Bot API call answered (errors in requests still prove a connection)."""
        ok, err = self.metrics.last_api_ok, self.metrics.last_api_error
        return ok is not None and (err is None or ok >= err)
