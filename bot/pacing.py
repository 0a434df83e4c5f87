"""How fast and how persistently the bot writes to Telegram: per chat, per bot, through outages.

Telegram's flood control counts per chat (about one message a second) and per bot (about
30 messages a second over all chats); past either it answers 429 for seconds at a time.
`ChatPacer` spaces a chat's writes; `SendRate`, a middleware on the bot's HTTP session, spaces
every message the bot sends or edits, whatever sends it (answers, command replies, notices),
so 200 users writing at once meet a queue of a few seconds, not a wall of 429s.

`Retry` is how long a write that must arrive (an answer's final text and buttons) keeps
trying through 5xx answers and a network that is gone: with a backoff that never waits longer
than `max_s`, so the text arrives within seconds of Telegram's return, and for at most `for_s`,
so nothing retries for ever.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiogram.client.session.middlewares.base import BaseRequestMiddleware

if TYPE_CHECKING:
    from aiogram import Bot
    from aiogram.methods import TelegramMethod

#: Bot API methods that put something into a chat: what Telegram's per-bot limit counts.
PACED_PREFIXES = ("Send", "Edit", "Delete", "Copy", "Forward")


class ChatPacer:
    """Reserves time slots per chat: at most one Telegram write per `interval`, pauses on 429.

    Shared by every stream of the bot, because Telegram's flood control counts per chat,
    not per message.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next: dict[int, float] = {}

    async def wait(self, chat_id: int) -> None:
        now = time.monotonic()
        slot = max(now, self._next.get(chat_id, 0.0))
        self._next[chat_id] = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)

    def pause(self, chat_id: int, seconds: float) -> None:
        """Nothing more is written to this chat for `seconds` (Telegram's retry_after, or a backoff)."""
        self._next[chat_id] = max(self._next.get(chat_id, 0.0), time.monotonic() + seconds)


class SendRate(BaseRequestMiddleware):
    """At most `per_second` sends and edits per second over the whole bot; 0 = no limit.

    Slots are handed out in the order calls arrive, spaced evenly: a burst waits its turn
    instead of being refused by Telegram.
    """

    def __init__(self, per_second: float) -> None:
        self.gap = 1.0 / per_second if per_second > 0 else 0.0
        self._next = 0.0
        self.waited_s = 0.0  # total time calls were held back (for the log and tests)

    async def __call__(self, make_request: Any, bot: "Bot", method: "TelegramMethod[Any]") -> Any:
        if self.gap and type(method).__name__.startswith(PACED_PREFIXES):
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.gap
            if slot > now:
                self.waited_s += slot - now
                await asyncio.sleep(slot - now)
        return await make_request(bot, method)


@dataclass(frozen=True)
class Retry:
    """Retrying a write that must arrive: backoff from `first_s` doubling up to `max_s`, for `for_s` in all."""

    for_s: float = 600.0
    max_s: float = 5.0
    first_s: float = 0.25

    @classmethod
    def from_settings(cls, settings: Any) -> "Retry":
        """TELEGRAM_RETRY_FOR_S and TELEGRAM_BACKOFF_MAX_S of BotSettings."""
        return cls(for_s=settings.telegram_retry_for_s, max_s=settings.telegram_backoff_max_s)

    def backoff(self, failures: int) -> float:
        """The wait after the `failures`-th failure in a row."""
        return min(self.first_s * 2 ** max(failures - 1, 0), self.max_s)
