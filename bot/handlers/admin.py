"""Admin commands: /status, /jobs, /adapters, /reload; refusal for everyone else."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiogram import Router
from aiogram.filters import Command, CommandObject
from aiogram.types import Message

from engine.errors import EngineError

from bot.admin_format import (
    format_adapters, format_jobs, format_reload, format_status, job_history, short, training_summary,
)
from bot.chat import ChatService
from bot.filters import IsAdmin
from bot.i18n import t
from bot.storage import Store

log = logging.getLogger(__name__)

#: How many jobs /jobs lists.
JOBS_SHOWN = 10
ADMIN_COMMANDS = ("status", "jobs", "adapters", "reload", "train", "cancel", "rollback", "promote", "export", "stats",
                  "ab", "why", "budget")



def domain_names(engine: Any) -> list[str]:
    """The adapter domains the engine knows (with at least one version), for "valid ones are" replies."""
    return [a.name for a in engine.modes().adapters]


def unknown_domain(lang: str, domain: str, engine: Any) -> str:
    return t(lang, "unknown_domain", domain=domain, domains=", ".join(domain_names(engine)) or t(lang, "none"))


async def refuse(message: Message, lang: str) -> None:
    await message.answer(t(lang, "admin_only"))


async def on_status(message: Message, engine: Any, chat: ChatService, store: Store, started_at: float,
                    lang: str) -> None:
    text = format_status(
        engine.status(), generating=chat.generating(), waiting=chat.waiting(), active_24h=store.active_users(),
        bot_uptime_s=time.monotonic() - started_at, training=training_summary(engine, lang), lang=lang,
    )
    await message.answer(text)


async def on_jobs(message: Message, engine: Any, lang: str) -> None:
    records = await asyncio.to_thread(job_history, engine, JOBS_SHOWN)
    await message.answer(format_jobs(records, lang) if records is not None else t(lang, "training_unavailable"))


async def on_adapters(message: Message, engine: Any, lang: str) -> None:
    await message.answer(format_adapters(engine.modes(), lang))


async def on_reload(message: Message, command: CommandObject, engine: EngineFace, store: Store, lang: str) -> None:
    name = (command.args or "").strip() or None
    assert message.from_user is not None
    if name is not None and name not in domain_names(engine):
        store.log_admin(message.from_user.id, "reload", name, "refused: unknown domain")
        await message.answer(unknown_domain(lang, name, engine))
        return
    try:
        report = await engine.reload(name)
    except EngineError as exc:
        log.warning("reload %s refused: %s", name or "all", exc)
        store.log_admin(message.from_user.id, "reload", name or "", f"refused: {exc}")
        await message.answer(t(lang, "reload_refused", reason=short(str(exc))))
        return
    store.log_admin(message.from_user.id, "reload", name or "", format_reload(report, "en").replace("\n", "; "))
    await message.answer(format_reload(report, lang))


def router() -> Router:
    r = Router(name="admin")
    r.message.register(refuse, Command(*ADMIN_COMMANDS, ignore_case=True), ~IsAdmin())
    r.message.register(on_status, Command("status", ignore_case=True), IsAdmin())
    r.message.register(on_jobs, Command("jobs", ignore_case=True), IsAdmin())
    r.message.register(on_adapters, Command("adapters", ignore_case=True), IsAdmin())
    r.message.register(on_reload, Command("reload", ignore_case=True), IsAdmin())
    return r
