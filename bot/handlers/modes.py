"""/mode, /domain, /role: the engine's modes as inline keyboards; the choice is stored."""
from __future__ import annotations

from aiogram import Router
from aiogram.filters import Command, CommandObject
from aiogram.types import CallbackQuery, Message

from engine.face import EngineFace
from engine.types import Mode

from bot.chat import mode_of
from bot.i18n import t
from bot.keyboards import BASE, SECTION, ModeCB, describe_mode, mode_keyboard
from bot.storage import Store, UserRecord

_VIEWS = {"mode": ("all", "mode_choose"), "domain": ("domain", "domain_choose"), "role": ("role", "role_choose")}


async def on_mode(message: Message, command: CommandObject, user_record: UserRecord, lang: str, engine: EngineFace) -> None:
    view, key = _VIEWS[command.command.lower()]
    catalog = engine.modes()
    current = mode_of(user_record)
    await message.answer(
        t(lang, key, mode=describe_mode(current, lang, catalog)),
        reply_markup=mode_keyboard(catalog, current, lang, view),  # type: ignore[arg-type]
    )


async def on_mode_chosen(
    query: CallbackQuery, callback_data: ModeCB, user_record: UserRecord, lang: str, engine: EngineFace, store: Store
) -> None:
    catalog = engine.modes()
    current = mode_of(user_record)
    value = callback_data.value
    if value == SECTION:  # a section title: say what the rows below it choose
        await query.answer(t(lang, "section_domain_help" if callback_data.kind == "a" else "section_role_help"),
                           show_alert=True)
        return
    if callback_data.kind == "p":
        new = Mode(adapter=None, role="assistant")
    elif callback_data.kind == "a":
        adapter = None if value == BASE else value
        if adapter is not None and catalog.adapter(adapter) is None:
            await query.answer(t(lang, "mode_unknown"), show_alert=True)
            return
        new = Mode(adapter=adapter, role=current.role)
    else:
        if catalog.role(value) is None:
            await query.answer(t(lang, "mode_unknown"), show_alert=True)
            return
        new = Mode(adapter=current.adapter, role=value)
    store.set_mode(query.from_user.id, new.adapter, new.role)
    described = describe_mode(new, lang, catalog)
    view = callback_data.view
    key = {"all": "mode_choose", "domain": "domain_choose", "role": "role_choose"}[view]
    if query.message is not None and new != current:
        await query.message.edit_text(  # type: ignore[union-attr]
            t(lang, key, mode=described), reply_markup=mode_keyboard(catalog, new, lang, view)
        )
    await query.answer(t(lang, "mode_set", mode=described))


def router() -> Router:
    r = Router(name="modes")
    r.message.register(on_mode, Command("mode", "domain", "role", ignore_case=True))
    r.callback_query.register(on_mode_chosen, ModeCB.filter())
    return r
