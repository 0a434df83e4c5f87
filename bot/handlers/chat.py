"""Plain text -> a streamed answer; /new, /retry, /stop; "Continue" under a cut answer; "Retry"
under the notice that a restart cut an answer off."""
from __future__ import annotations

from aiogram import Bot, F, Router
from aiogram.exceptions import TelegramBadRequest
from aiogram.filters import Command
from aiogram.types import CallbackQuery, Message

from engine.face import EngineFace

from bot.chat import ChatService, mode_of
from bot.config import BotSettings
from bot.filters import Addressed, NotCommand
from bot.i18n import t
from bot.keyboards import ContinueCB, RetryCB, describe_mode, feedback_keyboard
from bot.metrics import BotMetrics
from bot.replies import answer_question
from bot.storage import Store, UserRecord
from bot.pacing import ChatPacer


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


async def on_continue(
    query: CallbackQuery, callback_data: ContinueCB, bot: Bot, chat: ChatService, store: Store, pacer: ChatPacer,
    settings: BotSettings, metrics: BotMetrics, lang: str,
) -> None:
    """Go on with an answer cut at the length limit: ask "Continue." as the next turn."""
    message = query.message
    if not isinstance(message, Message):  # too old for Telegram to show it to the bot
        await query.answer(t(lang, "continue_stale"))
        return
    latest = store.last_answer(query.from_user.id, message.chat.id)
    if latest is None or latest[0] != callback_data.message_id:
        await query.answer(t(lang, "continue_stale"))
        return
    await query.answer()
    try:  # the button did its job; 👍/👎 stay
        await message.edit_reply_markup(reply_markup=feedback_keyboard(callback_data.message_id))
    except TelegramBadRequest:
        pass
    await answer_question(message, t(lang, "continue_prompt"), bot=bot, chat=chat, store=store, pacer=pacer,
                          settings=settings, metrics=metrics, lang=lang, user=query.from_user)


async def on_retry_button(
    query: CallbackQuery, callback_data: RetryCB, bot: Bot, chat: ChatService, store: Store, pacer: ChatPacer,
    settings: BotSettings, metrics: BotMetrics, lang: str,
) -> None:
    """Answer again the question whose answer a restart cut off, while it is still the latest."""
    message = query.message
    if not isinstance(message, Message):
        await query.answer(t(lang, "retry_stale"))
        return
    latest = store.last_answer(query.from_user.id, message.chat.id)
    if latest is None or latest[0] != callback_data.message_id:
        await query.answer(t(lang, "retry_stale"), show_alert=True)
        return
    await query.answer()
    try:  # pressed once is enough
        await message.edit_reply_markup(reply_markup=None)
    except TelegramBadRequest:
        pass
    await answer_question(message, None, bot=bot, chat=chat, store=store, pacer=pacer, settings=settings,
                          metrics=metrics, lang=lang, user=query.from_user)


async def on_new(message: Message, store: Store, user_record: UserRecord, lang: str, engine: EngineFace) -> None:
    store.new_conversation(user_record.id)
    await message.answer(t(lang, "new_conversation", mode=describe_mode(mode_of(user_record), lang, engine.modes())))


async def on_stop(message: Message, chat: ChatService, lang: str) -> None:
    assert message.from_user is not None
    if not chat.stop(message.from_user.id):
        await message.answer(t(lang, "nothing_to_stop"))


def router() -> Router:
    r = Router(name="chat")
    r.message.register(on_new, Command("new", ignore_case=True))
    r.message.register(on_stop, Command("stop", ignore_case=True))
    r.message.register(on_retry, Command("retry", ignore_case=True))
    r.message.register(on_text, F.text, NotCommand(), Addressed())
    r.callback_query.register(on_continue, ContinueCB.filter())
    r.callback_query.register(on_retry_button, RetryCB.filter())
    return r
