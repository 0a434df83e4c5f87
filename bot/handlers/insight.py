"""Admin views of what the bot does: /stats (text and a chart), /ab (A/B of a candidate), /why."""
from __future__ import annotations

import asyncio
import logging

from aiogram import Bot, Router
from aiogram.filters import Command, CommandObject
from aiogram.types import BufferedInputFile, Message

from engine.face import EngineFace

from bot import chart, stats
from bot.ab import ABRefused, ABService
from bot.budget import Budgets
from bot.filters import IsAdmin
from bot.handlers.admin import domain_names, unknown_domain
from bot.i18n import t
from bot.stats_format import format_ab, format_report, format_why
from bot.storage import Store

log = logging.getLogger(__name__)

TELEGRAM_TEXT_LIMIT = 4096


async def answer_long(message: Message, text: str) -> None:
    """Send `text` in as few messages as Telegram's limit allows, cut between lines."""
    chunk = ""
    for line in text.split("\n"):
        if chunk and len(chunk) + 1 + len(line) > TELEGRAM_TEXT_LIMIT:
            await message.answer(chunk)
            chunk = ""
        chunk = f"{chunk}\n{line}" if chunk else line[:TELEGRAM_TEXT_LIMIT]
    if chunk.strip():
        await message.answer(chunk)


def ab_lines(ab: ABService, store: Store, lang: str) -> list[str]:
    return [format_ab(test, store.ab_counts(test.id), lang) for test in ab.running()]


async def on_stats(message: Message, bot: Bot, engine: EngineFace, store: Store, budgets: Budgets, ab: ABService,
                   lang: str) -> None:
    await ab.check()
    report = await asyncio.to_thread(stats.collect, store, store.clock(), budgets.zone)
    await answer_long(message, format_report(report, lang, ab_lines(ab, store, lang), engine.modes()))
    try:
        png = await asyncio.to_thread(chart.render, report.daily, lang)
    except Exception:  # the numbers were sent; the picture is a nicety
        log.exception("drawing the /stats chart failed")
        await message.answer(t(lang, "sx_chart_failed"))
        return
    await bot.send_photo(message.chat.id, BufferedInputFile(png, "usage-30-days.png"),
                         caption=t(lang, "sx_chart_caption", zone=report.zone),
                         message_thread_id=message.message_thread_id if message.is_topic_message else None)


def parse_share(word: str) -> float | None:
    """'20', '20%' or '12.5' -> 0.2 / 0.125; None unless 0 < share <= 100."""
    try:
        value = float(word.rstrip("%").replace(",", "."))
    except ValueError:
        return None
    return value / 100 if 0 < value <= 100 else None


async def on_ab(message: Message, command: CommandObject, engine: EngineFace, ab: ABService, store: Store,
                lang: str) -> None:
    args = (command.args or "").split()
    assert message.from_user is not None
    admin = message.from_user.id
    await ab.check()
    if not args:
        lines = ab_lines(ab, store, lang)
        await answer_long(message, "\n\n".join(lines) if lines else t(lang, "ab_none"))
        return
    domain = args[0].lower()
    if domain not in domain_names(engine):
        await message.answer(unknown_domain(lang, domain, engine))
        return
    if len(args) == 1:
        test = store.latest_ab_test(domain)
        await message.answer(format_ab(test, store.ab_counts(test.id), lang) if test
                             else t(lang, "ab_never", domain=domain))
        return
    if args[1].lower() in ("stop", "off", "end"):
        ended = await ab.stop(domain, "stopped")
        store.log_admin(admin, "ab", f"{domain} stop", f"ended {ended.id}" if ended else "none running")
        if ended is None:
            await message.answer(t(lang, "ab_not_running", domain=domain))
        else:
            await message.answer(t(lang, "ab_stopped", domain=domain) + "\n"
                                 + format_ab(ended, store.ab_counts(ended.id), lang))
        return
    share = parse_share(args[1])
    if share is None or len(args) > 3:
        await message.answer(t(lang, "usage_ab"))
        return
    version = args[2].lower() if len(args) == 3 else None
    try:
        test = await ab.start(domain, share, admin, version)
    except ABRefused as refusal:
        store.log_admin(admin, "ab", " ".join(args), f"refused: {refusal.key}")
        await message.answer(t(lang, refusal.key, **refusal.words))
        return
    store.log_admin(admin, "ab", " ".join(args), f"running {test.id}: {test.serving_version} vs "
                    f"{test.candidate_version} at {test.share:.0%}")
    await message.answer(t(lang, "ab_started", domain=domain, share=f"{test.share * 100:g}",
                           serving=test.serving_version, candidate=test.candidate_version) + "\n"
                         + format_ab(test, store.ab_counts(test.id), lang))


async def on_why(message: Message, store: Store, lang: str) -> None:
    replied = message.reply_to_message
    if replied is None:
        await message.answer(t(lang, "why_usage"))
        return
    answer = store.answer_shown_in(message.chat.id, replied.message_id)
    if answer is None:
        await message.answer(t(lang, "why_not_answer"))
        return
    await message.answer(format_why(answer, store.get_user(answer.user_id), lang))


def router() -> Router:
    """Attach after the admin router: its refusal handler keeps non-admins out."""
    r = Router(name="insight")
    r.message.filter(IsAdmin())
    r.message.register(on_stats, Command("stats", ignore_case=True))
    r.message.register(on_ab, Command("ab", ignore_case=True))
    r.message.register(on_why, Command("why", ignore_case=True))
    return r
