"""/usage for everyone; /budget for admins: see, set or clear one user's token budget."""
from __future__ import annotations

from aiogram import Router
from aiogram.filters import Command, CommandObject
from aiogram.types import Message

from bot.budget import Budgets, usage_text
from bot.filters import IsAdmin
from bot.i18n import t
from bot.stats_format import format_budget
from bot.storage import Store

PERIODS = {"day": "tokens_per_day", "month": "tokens_per_month"}


async def on_usage(message: Message, budgets: Budgets, lang: str) -> None:
    assert message.from_user is not None
    await message.answer(usage_text(budgets.status(message.from_user.id), budgets.zone, lang))


def parse_limits(words: list[str]) -> dict[str, int | None] | None:
    """['day', '5000', 'month', 'default'] -> {'tokens_per_day': 5000, 'tokens_per_month': None}; None if malformed."""
    if not words or len(words) % 2:
        return None
    out: dict[str, int | None] = {}
    for period, value in zip(words[::2], words[1::2]):
        field = PERIODS.get(period.lower())
        if field is None:
            return None
        value = value.lower().replace(",", "").replace("_", "")
        if value == "default":
            out[field] = None
        elif value.isdigit():
            out[field] = int(value)
        else:
            return None
    return out


async def on_budget(message: Message, command: CommandObject, budgets: Budgets, store: Store, lang: str) -> None:
    args = (command.args or "").split()
    assert message.from_user is not None
    admin = message.from_user.id
    if not args:
        await message.answer(t(lang, "usage_budget"))
        return
    user = store.find_user(args[0])
    if user is None and not args[0].lstrip("-").isdigit():
        await message.answer(t(lang, "bg_unknown_user", user=args[0]))
        return
    user_id = user.id if user is not None else int(args[0])
    rest = args[1:]
    if rest == ["clear"]:
        cleared = store.clear_budget(user_id)
        store.log_admin(admin, "budget", f"{user_id} clear", "cleared" if cleared else "had none")
        await message.answer(t(lang, "bg_cleared" if cleared else "bg_had_none", user=user_id) + "\n"
                             + format_budget(user, user_id, budgets.status(user_id), budgets.zone, lang))
        return
    if rest:
        limits = parse_limits(rest)
        if limits is None:
            await message.answer(t(lang, "usage_budget"))
            return
        store.set_budget(user_id, set_by=admin, **limits)
        store.log_admin(admin, "budget", " ".join([str(user_id), *rest]), "set")
    await message.answer(format_budget(user, user_id, budgets.status(user_id), budgets.zone, lang))


def router() -> Router:
    """Attach after the admin router: its refusal handler keeps non-admins out of /budget."""
    r = Router(name="budgets")
    r.message.register(on_usage, Command("usage", ignore_case=True))
    r.message.register(on_budget, Command("budget", ignore_case=True), IsAdmin())
    return r
