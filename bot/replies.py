"""Answering a question in Telegram: a ChatService turn shown through a ReplyStream.

Shared by the text handler and /retry so both stream, queue and store the same way.
"""
from __future__ import annotations

import time

from aiogram import Bot
from aiogram.types import Message, User

from engine.types import UserContext

from bot.budget import refusal_text
from bot.chat import Answer, ChatService, Outcome
from bot.config import BotSettings
from bot.i18n import t
from bot.keyboards import feedback_keyboard
from bot.metrics import BotMetrics
from bot.storage import Store
from bot.pacing import ChatPacer, Retry
from bot.streaming import ReplyStream


class TelegramSink:
    """The Sink of bot.chat for one Telegram answer."""

    def __init__(self, stream: ReplyStream, store: Store, lang: str) -> None:
        self.stream = stream
        self.store = store
        self.lang = lang

    async def start(self) -> None:
        await self.stream.start()

    def feed(self, piece: str) -> None:
        self.stream.feed(piece)

    async def abort(self) -> None:
        await self.stream.abort()

    async def complete(self, answer: Answer) -> None:
        suffix = None
        if answer.outcome in (Outcome.STOPPED, Outcome.CANCELLED):
            suffix = t(self.lang, "stopped")
        elif answer.cut:
            suffix = t(self.lang, "cut")
        markup = feedback_keyboard(answer.message_id, cut_lang=self.lang if answer.cut else None) \
            if answer.outcome is Outcome.DONE and answer.message_id is not None else None
        ids = await self.stream.finish(suffix, markup)
        if answer.message_id is not None and ids:
            self.store.update_message(answer.message_id, telegram_message_id=ids[-1])
            self.store.link_answer_messages(answer.message_id, self.stream.chat_id, ids)


async def answer_question(
    message: Message, question: str | None, *, bot: Bot, chat: ChatService, store: Store, pacer: ChatPacer,
    settings: BotSettings, metrics: BotMetrics, lang: str, user: User | None = None,
) -> Answer:
    """Answer `question` (None: the last one again) in the message's chat, streamed.

    `user` is who asks when it is not the message's sender (a button under the bot's message).
    """
    started = time.monotonic()
    user = user or message.from_user
    assert user is not None
    in_group = message.chat.type != "private"
    stream = ReplyStream(
        bot, message.chat.id, pacer, metrics=metrics, reply_to=message.message_id if in_group else None,
        thread_id=message.message_thread_id if message.is_topic_message else None,
        retry=Retry.from_settings(settings), empty_text=t(lang, "empty_answer"), started_at=started,
    )

    async def on_queued() -> None:
        await message.answer(t(lang, "queued"))

    answer = await chat.ask(
        user.id, question, TelegramSink(stream, store, lang), chat_id=message.chat.id,
        user=UserContext(first_name=user.first_name, language=lang), on_queued=on_queued, started_at=started,
    )
    notes = {Outcome.TOO_MANY: "too_many_pending", Outcome.CLOSED: "shutting_down",
             Outcome.NOTHING: "nothing_to_retry", Outcome.UNREADABLE: "unreadable"}
    if answer.outcome in notes:
        await message.answer(t(lang, notes[answer.outcome]))
    elif answer.outcome is Outcome.OVER_BUDGET and answer.budget is not None:
        await message.answer(refusal_text(answer.budget, chat.budgets.zone, lang))
    return answer
