"""What no other router took: unknown commands and buttons the bot no longer knows.

Attached last. Every command gets an answer in the user's language (the console does the
same), and every button press gets `answerCallbackQuery`, so the client's spinner stops.
In groups, only commands addressed to this bot (`/cmd@thisbot`, or a reply to it) are
answered: a bare `/cmd` there may be meant for another bot.
"""
from __future__ import annotations

import difflib
import logging

from aiogram import Bot, Router
from aiogram.types import CallbackQuery, Message

from bot.config import BotSettings
from bot.filters import IsCommand
from bot.handlers.admin import ADMIN_COMMANDS
from bot.i18n import t
from bot.text import Command

log = logging.getLogger(__name__)

USER_COMMANDS = ("start", "help", "mode", "domain", "role", "new", "retry", "stop", "usage", "language")


async def _addressed(message: Message, command: Command, bot: Bot) -> bool:
    if message.chat.type == "private":
        return True
    me = await bot.me()
    if command.mention is not None:
        return bool(me.username) and command.mention.lower() == me.username.lower()
    replied = message.reply_to_message
    return replied is not None and replied.from_user is not None and replied.from_user.id == me.id


async def on_unknown_command(message: Message, command: Command, bot: Bot, settings: BotSettings, lang: str) -> None:
    if not await _addressed(message, command, bot):
        return
    known = USER_COMMANDS + (ADMIN_COMMANDS if message.from_user and settings.is_admin(message.from_user.id) else ())
    written = (message.text or "").split()[0].split("@")[0]
    close = difflib.get_close_matches(command.name, known, n=2, cutoff=0.7)  # /stauts: /stats or /status
    log.info("unknown command /%s", command.name)
    if close:
        suggestion = t(lang, "or").join(f"/{c}" for c in close)
        await message.answer(t(lang, "unknown_command_hint", command=written, suggestion=suggestion))
    else:
        await message.answer(t(lang, "unknown_command", command=written))


async def on_unknown_button(query: CallbackQuery, lang: str | None = None) -> None:
    log.info("unknown button data %r", (query.data or "")[:64])
    await query.answer(t(lang, "button_unknown"))


def router() -> Router:
    r = Router(name="fallback")
    r.message.register(on_unknown_command, IsCommand())
    r.callback_query.register(on_unknown_button)
    return r
