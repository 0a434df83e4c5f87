"""Prometheus counters of the front end, on their own registry (exported by the ops port).

Telegram API traffic is counted in one place, a request middleware on the bot's session,
so every call (handlers, streaming, polling) is seen and the "bot connected" health check
knows when the last call to Telegram succeeded. A 409 Conflict on getUpdates means another
process polls with this token and receives the updates: it is logged as such (once when it
begins, once when no conflict came for CONFLICT_QUIET_S) and the health check fails while
it lasts. (Two pollers take turns: each sees successes between the conflicts, so a single
success does not end it.)
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from aiogram.client.session.middlewares.base import BaseRequestMiddleware
from aiogram.exceptions import TelegramConflictError, TelegramNetworkError, TelegramRetryAfter, TelegramServerError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from aiogram import Bot
    from aiogram.methods import TelegramMethod

log = logging.getLogger(__name__)

#: A conflict is over once getUpdates has answered without one for this long.
CONFLICT_QUIET_S = 60.0


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
        self.answers = Counter("bot_answers", "Answers stored, by mode (adapter and role)", ["adapter", "role"],
                               registry=r)
        self.answer_tokens = Counter(
            "bot_answer_tokens", "Generated tokens of stored answers, by mode (adapter and role)", ["adapter", "role"],
            registry=r,
        )
        self.answer_seconds = Histogram(
            "bot_answer_seconds", "From the user's message to the stored answer",
            buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128), registry=r,
        )
        self.feedback = Counter("bot_feedback", "Ratings of answers, by adapter version and rating",
                                ["adapter", "version", "rating"], registry=r)
        self.budget_refusals = Counter(
            "bot_budget_refusals", "Requests refused because a token budget was used up, by period", ["period"],
            registry=r,
        )
        self.ab_answers = Counter("bot_ab_answers", "Answers that took part in an A/B, by domain, arm and version",
                                  ["domain", "arm", "version"], registry=r)
        self.active_users = Gauge("bot_active_users", "Users seen within the window", ["window"], registry=r)
        self.last_api_ok: float | None = None  # monotonic time of the last successful Bot API call
        self.last_api_error: float | None = None


    def watch_users(self, count: Callable[[float], int]) -> None:
        """Export `count(within_s)` (the store's active users) as bot_active_users for 24 h and 30 days."""
        for window, seconds in (("24h", 86400.0), ("30d", 30 * 86400.0)):
            self.active_users.labels(window).set_function(lambda s=seconds: _or_nan(count, s))


def _or_nan(count: Callable[[float], int], seconds: float) -> float:
    """A scrape while the database is closed or failing shows no number instead of failing the scrape."""
    try:
        return float(count(seconds))
    except Exception:
        log.debug("counting active users failed", exc_info=True)
        return float("nan")


class ApiCallCounter(BaseRequestMiddleware):
    """Counts every Bot API call by method and outcome; remembers when Telegram last answered."""

    def __init__(self, metrics: BotMetrics) -> None:
        self.metrics = metrics
        self.conflict_since: float | None = None  # another instance is polling with this token
        self.last_conflict = 0.0

    async def __call__(self, make_request: Any, bot: "Bot", method: "TelegramMethod[Any]") -> Any:
        name = type(method).__name__
        m = self.metrics
        try:
            response = await make_request(bot, method)
        except TelegramConflictError as exc:
            m.api_calls.labels(name, "conflict").inc()
            m.last_api_ok = self.last_conflict = time.monotonic()
            if self.conflict_since is None:
                self.conflict_since = time.monotonic()
                log.error("another instance is polling with this bot token: Telegram answers 409 Conflict (%s) and "
                          "gives the updates to one of us at a time; stop the other instance (docs/operations.md)",
                          exc.message)
            raise
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
        if (name == "GetUpdates" and self.conflict_since is not None
                and time.monotonic() - self.last_conflict >= CONFLICT_QUIET_S):
            log.warning("no other instance is polling any more (the conflict lasted %.0f s); receiving updates",
                        time.monotonic() - self.conflict_since)
            self.conflict_since = None
        if name == "SendMessage":
            m.messages_sent.inc()
        elif name == "EditMessageText":
            m.edits.inc()
        return response

    def connected(self) -> bool:
        """The last Bot API call answered (errors in requests still prove a connection), and no other
        instance takes our updates."""
        ok, err = self.metrics.last_api_ok, self.metrics.last_api_error
        return ok is not None and (err is None or ok >= err) and self.conflict_since is None
