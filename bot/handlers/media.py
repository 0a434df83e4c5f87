"""Photos, voice, stickers, files: a polite "text only for now"."""
from __future__ import annotations

from aiogram import F, Router
from aiogram.types import Message

from bot.filters import Addressed
from bot.i18n import t

MEDIA = F.photo | F.voice | F.sticker | F.document | F.video | F.audio | F.video_note | F.animation | F.location \
    | F.contact | F.dice | F.poll | F.venue | F.story


async def on_media(message: Message, lang: str) -> None:
    await message.answer(t(lang, "text_only"))


def router() -> Router:
    r = Router(name="media")
    r.message.register(on_media, MEDIA, Addressed())
    return r
