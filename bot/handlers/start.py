"""/start, /help and /language."""
from __future__ import annotations

from aiogram import F, Router
from aiogram.filters import Command, CommandStart
from aiogram.types import CallbackQuery, Message

from engine.face import EngineFace

from bot.chat import mode_of
from bot.config import BotSettings
from bot.i18n import LANGUAGES, t
from bot.keyboards import LangCB, describe_mode, language_keyboard
from bot.storage import Store, UserRecord


async def on_start(message: Message, user_record: UserRecord, lang: str, engine: EngineFace) -> None:
    name = f", {message.from_user.first_name}" if message.from_user and message.from_user.first_name else ""
    mode = describe_mode(mode_of(user_record), lang, engine.modes())
    await message.answer(t(lang, "start", name=name, mode=mode))


async def on_help(message: Message, lang: str, settings: BotSettings) -> None:
    text = t(lang, "help")
    if message.from_user and settings.is_admin(message.from_user.id):
        text += t(lang, "help_admin")
    await message.answer(text)


async def on_language(message: Message, lang: str) -> None:
    await message.answer(t(lang, "language_choose"), reply_markup=language_keyboard(lang))


async def on_language_chosen(query: CallbackQuery, callback_data: LangCB, store: Store) -> None:
    code = callback_data.code if callback_data.code in LANGUAGES else "en"
    store.set_language(query.from_user.id, code)
    if query.message is not None:
        await query.message.edit_text(t(code, "language_set"), reply_markup=language_keyboard(code))  # type: ignore[union-attr]
    await query.answer()


def router() -> Router:
    r = Router(name="start")
    r.message.register(on_start, CommandStart(ignore_case=True))
    r.message.register(on_help, Command("help", ignore_case=True))
    r.message.register(on_language, Command("language", ignore_case=True))
    r.callback_query.register(on_language_chosen, LangCB.filter())
    return r
