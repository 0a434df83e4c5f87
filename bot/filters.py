"""Filters: who is an admin, whether a group message is addressed to the bot, what is a command."""
from __future__ import annotations

from typing import Any

from aiogram import Bot
from aiogram.filters import Filter
from aiogram.types import Message, TelegramObject, User

from bot.config import BotSettings
from bot.text import parse_command


class IsAdmin(Filter):
    async def __call__(self, event: TelegramObject, settings: BotSettings,
                       event_from_user: User | None = None) -> bool:
        return settings.is_admin(event_from_user.id if event_from_user else None)


class Addressed(Filter):
    """Private chats: always. Groups: only a reply to the bot or a message mentioning it.

    On a match it hands the handler `question`: the text without the @mention.
    """

    async def __call__(self, message: Message, bot: Bot) -> bool | dict[str, Any]:
        text = message.text or message.caption or ""
        if message.chat.type == "private":
            return {"question": text}
        me = await bot.me()
        replied = message.reply_to_message
        if replied is not None and replied.from_user is not None and replied.from_user.id == me.id:
            return {"question": text}
        mention = f"@{me.username}" if me.username else None
        for e in message.entities or message.caption_entities or []:
            if e.type == "mention" and mention and e.extract_from(text).lower() == mention.lower():
                return {"question": (text[: _py(text, e.offset)] + text[_py(text, e.offset + e.length):]).strip()}
            if e.type == "text_mention" and e.user is not None and e.user.id == me.id:
                return {"question": text}
        return False


def _py(text: str, utf16_offset: int) -> int:
    """A UTF-16 offset (Telegram's) -> a Python string index."""
    units = 0
    for i, ch in enumerate(text):
        if units >= utf16_offset:
            return i
        units += 2 if ord(ch) > 0xFFFF else 1
    return len(text)


class IsCommand(Filter):
    """Text that is a command by `bot.text.parse_command` (so "/etc/hosts, what is it?" is not).

    On a match it hands the handler `command` (a `bot.text.Command`).
    """

    async def __call__(self, message: Message) -> bool | dict[str, Any]:
        command = parse_command(message.text or "")
        return {"command": command} if command is not None else False


class NotCommand(Filter):
    async def __call__(self, message: Message) -> bool:
        return parse_command(message.text or "") is None
