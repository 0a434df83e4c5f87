"""Engine and storage errors -> one short reply, in one place. The log keeps the detail."""
from __future__ import annotations

import logging
import sqlite3
from typing import Any

from aiogram import Router
from aiogram.filters import ExceptionTypeFilter
from aiogram.types import ErrorEvent

from engine.errors import (
    AdapterInvalid, AdapterNotFound, EngineBusy, EngineClosed, EngineError, InputTooLong, TemplateError,
    TemplateNotFound,
)

from bot.i18n import normalize_language, t
from bot.storage import DatabaseError

log = logging.getLogger(__name__)

REPLIES: tuple[tuple[tuple[type[Exception], ...], str], ...] = (
    ((EngineBusy,), "err_busy"),
    ((EngineClosed,), "err_closed"),
    ((AdapterNotFound, AdapterInvalid), "err_adapter"),
    ((TemplateNotFound, TemplateError), "err_template"),
    ((InputTooLong,), "err_too_long"),
    ((EngineError,), "err_generic"),
    ((sqlite3.Error, DatabaseError), "err_storage"),  # a full disk, a read-only volume, a damaged file
)


async def _reply(event: ErrorEvent, key: str, lang: str | None) -> None:
    update = event.update
    msg = update.message
    query = update.callback_query
    user = (msg.from_user if msg else None) or (query.from_user if query else None)
    lang = lang or normalize_language(user.language_code if user else None)
    try:
        if msg is not None:
            await msg.answer(t(lang, key))
        elif query is not None:
            await query.answer(t(lang, key), show_alert=True)
    except Exception:
        log.warning("could not tell the user about an error", exc_info=True)


#: Replies whose cause the log shows with its traceback (the others are one line).
UNEXPECTED = ("err_generic", "err_storage")


def _handler(key: str, expected: bool) -> Any:
    async def handle(event: ErrorEvent, lang: str | None = None) -> None:
        if expected:
            log.warning("update %s: %s: %s", event.update.update_id, type(event.exception).__name__, event.exception)
        else:
            log.error("update %s failed", event.update.update_id, exc_info=event.exception)
        await _reply(event, key, lang)
    handle.__name__ = f"on_{key}"
    return handle


def router() -> Router:
    r = Router(name="errors")
    for types, key in REPLIES:
        r.errors.register(_handler(key, expected=key not in UNEXPECTED), ExceptionTypeFilter(*types))
    r.errors.register(_handler("err_generic", expected=False), ExceptionTypeFilter(Exception))
    return r
