"""👍/👎 under an answer: stored with the message, its mode and adapter version (and so its A/B arm)."""
from __future__ import annotations

from aiogram import Router
from aiogram.exceptions import TelegramBadRequest
from aiogram.types import CallbackQuery

from bot.i18n import t
from bot.keyboards import FeedbackCB, feedback_keyboard
from bot.metrics import BotMetrics
from bot.storage import Store


async def on_feedback(query: CallbackQuery, callback_data: FeedbackCB, store: Store, metrics: BotMetrics,
                      lang: str) -> None:
    ok = store.add_feedback(callback_data.message_id, query.from_user.id, callback_data.rating)
    if not ok:
        await query.answer()
        return
    answer = store.answer(callback_data.message_id)
    if answer is not None:
        metrics.feedback.labels(answer.adapter or "base", answer.adapter_version or "",
                                "up" if callback_data.rating > 0 else "down").inc()
    await query.answer(t(lang, "thanks_feedback"))
    if query.message is not None:
        # a cut answer keeps its "Continue" button while it is the newest answer
        latest = store.last_answer(query.from_user.id, query.message.chat.id)
        cut = latest is not None and latest == (callback_data.message_id, "length")
        try:
            await query.message.edit_reply_markup(  # type: ignore[union-attr]
                reply_markup=feedback_keyboard(callback_data.message_id, callback_data.rating,
                                               cut_lang=lang if cut else None)
            )
        except TelegramBadRequest:  # same rating pressed twice: nothing to change
            pass


def router() -> Router:
    r = Router(name="feedback")
    r.callback_query.register(on_feedback, FeedbackCB.filter())
    return r
