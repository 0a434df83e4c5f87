"""Cross-cutting steps every update goes through, attached once in `bot.handlers.setup`.

- `UserContext`: counts the update, refuses users outside ALLOWED_USER_IDS, creates or
  refreshes the user's row and hands handlers `user_record` and `lang`. One log line per
  update; message text is logged only with LOG_CONTENT=true.
- `RateLimit`: a per-user sliding window on messages, with one friendly notice per window.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Awaitable, Callable

from aiogram import BaseMiddleware
from aiogram.types import CallbackQuery, Message, TelegramObject, Update, User

from engine.logs import content

from bot.config import BotSettings
from bot.i18n import normalize_language, t
from bot.metrics import BotMetrics
from bot.storage import Store

log = logging.getLogger(__name__)

Handler = Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]]


class UserContext(BaseMiddleware):
    def __init__(self, store: Store, settings: BotSettings, metrics: BotMetrics) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        assert isinstance(event, Update)
        kind = event.event_type
        self.metrics.updates.labels(kind).inc()
        user: User | None = data.get("event_from_user")
        if user is None or user.is_bot:
            return await handler(event, data)
        inner = event.event
        text = inner.text if isinstance(inner, Message) else None
        # the text travels as the `content` extra: the log filter drops it unless LOG_CONTENT=true
        log.info("update %s %s from user=%s", event.update_id, kind, user.id,
                 extra=content(text, user_id=user.id, update_type=kind))
        if not self.settings.may_chat(user.id):
            lang = normalize_language(user.language_code)
            if isinstance(inner, Message) and inner.chat.type == "private":
                await inner.answer(t(lang, "not_allowed"))
            elif isinstance(inner, CallbackQuery):
                await inner.answer(t(lang, "not_allowed"), show_alert=True)
            log.info("refused user %s (not in ALLOWED_USER_IDS)", user.id)
            return None
        record = self.store.touch_user(
            user.id, name=user.full_name, username=user.username, language=normalize_language(user.language_code)
        )
        # in place: the dispatcher's error handler sees the same dict
        data["user_record"] = record
        data["lang"] = record.language
        return await handler(event, data)


class RateLimit(BaseMiddleware):
    """At most RATE_LIMIT_MESSAGES messages per RATE_LIMIT_WINDOW_S per user (admins exempt)."""

    def __init__(self, settings: BotSettings, metrics: BotMetrics) -> None:
        self.limit = settings.rate_limit_messages
        self.window = settings.rate_limit_window_s
        self.settings = settings
        self.metrics = metrics
        self._seen: dict[int, deque[float]] = {}
        self._notified: dict[int, float] = {}

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        user: User | None = data.get("event_from_user")
        if self.limit <= 0 or user is None or self.settings.is_admin(user.id):
            return await handler(event, data)
        now = time.monotonic()
        seen = self._seen.setdefault(user.id, deque())
        while seen and now - seen[0] >= self.window:
            seen.popleft()
        if len(seen) < self.limit:
            seen.append(now)
            return await handler(event, data)
        self.metrics.rate_limited.inc()
        if now - self._notified.get(user.id, -1e9) >= self.window and isinstance(event, Message):
            self._notified[user.id] = now
            wait = max(1, int(self.window - (now - seen[0])) + 1)
            await event.answer(t(data.get("lang"), "rate_limited", seconds=wait))
        return None
