"""Plain text -> a streamed answer; /new, /retry, /stop."""
from __future__ import annotations

from aiogram import Bot, F, Router
from aiogram.filters import Command
from aiogram.types import Message

from engine.face import EngineFace

from bot.chat import ChatService, mode_of
from bot.config import BotSettings
from bot.filters import Addressed
from bot.i18n import t
from bot.keyboards import describe_mode
from bot.metrics import BotMetrics
from bot.replies import answer_question
from bot.storage import Store, UserRecord
from bot.streaming import ChatPacer


async def on_text(
    message: Message, question: str, bot: Bot, chat: ChatService, store: Store, pacer: ChatPacer,
    settings: BotSettings, metrics: BotMetrics, lang: str,
) -> None:
    if question.strip():
        await answer_question(message, question, bot=bot, chat=chat, store=store, pacer=pacer,
                              settings=settings, metrics=metrics, lang=lang)


async def on_retry(
    message: Message, bot: Bot, chat: ChatService, store: Store, pacer: ChatPacer, settings: BotSettings,
    metrics: BotMetrics, lang: str,
) -> None:
    await answer_question(message, None, bot=bot, chat=chat, store=store, pacer=pacer,
                          settings=settings, metrics=metrics, lang=lang)


async def on_new(message: Message, store: Store, user_record: UserRecord, lang: str, engine: EngineFace) -> None:
    store.new_conversation(user_record.id)
    await message.answer(t(lang, "new_conversation", mode=describe_mode(mode_of(user_record), lang, engine.modes())))


async def on_stop(message: Message, chat: ChatService, lang: str) -> None:
    assert message.from_user is not None
    if not chat.stop(message.from_user.id):
        await message.answer(t(lang, "nothing_to_stop"))


def router() -> Router:
    r = Router(name="chat")
    r.message.register(on_new, Command("new"))
    r.message.register(on_stop, Command("stop"))
    r.message.register(on_retry, Command("retry"))
    r.message.register(on_text, F.text, ~F.text.startswith("/"), Addressed())
    return r
