"""Routers, one per feature, and the one place filters and middlewares are attached."""
from __future__ import annotations

from aiogram import Dispatcher

from bot.config import BotSettings
from bot.handlers import admin, budgets, chat, errors, fallback, feedback, insight, media, modes, start, training
from bot.metrics import BotMetrics
from bot.middlewares import RateLimit, UserContext
from bot.storage import Store


def setup(dp: Dispatcher, settings: BotSettings, store: Store, metrics: BotMetrics) -> None:
    dp.update.outer_middleware(UserContext(store, settings, metrics))
    dp.message.middleware(RateLimit(settings, metrics))
    # order matters: admin refusals before the admin-only training commands, chat text, then
    # whatever no one took (unknown commands and buttons)
    dp.include_routers(
        errors.router(), start.router(), modes.router(), admin.router(), training.router(), insight.router(),
        budgets.router(), feedback.router(), media.router(), chat.router(), fallback.router(),
    )


COMMANDS_EN = {
    "start": "Start and current mode", "mode": "Choose adapter and role", "domain": "Choose the domain adapter",
    "role": "Choose the role", "new": "Start a fresh conversation", "retry": "Answer the last question again",
    "stop": "Stop the answer being written", "usage": "Tokens used and left", "language": "Interface language",
    "help": "All commands",
}
COMMANDS_RU = {
    "start": "Начало и текущий режим", "mode": "Выбрать адаптер и роль", "domain": "Выбрать доменный адаптер",
    "role": "Выбрать роль", "new": "Новый разговор", "retry": "Ответить заново", "stop": "Остановить ответ",
    "usage": "Расход и остаток токенов", "language": "Язык интерфейса", "help": "Все команды",
}
