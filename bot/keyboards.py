"""Inline keyboards and their callback data (aiogram CallbackData factories).

Modes come from the engine's catalog at the time the keyboard is drawn, so a new adapter
or role template shows up without a bot change.
"""
from __future__ import annotations

from typing import Literal

from aiogram.filters.callback_data import CallbackData
from aiogram.types import InlineKeyboardMarkup
from aiogram.utils.keyboard import InlineKeyboardBuilder

from engine.types import ModeCatalog, Mode

from bot.i18n import LANGUAGES, t

_DOMAIN_TITLES = {
    "en": {"legal": "⚖️ Law", "medical": "🩺 Medicine", "finance": "💰 Finance"},
    "ru": {"legal": "⚖️ Право", "medical": "🩺 Медицина", "finance": "💰 Финансы"},
}
#: Role titles for the UI language; the engine's RoleInfo carries the English title only.
_ROLE_TITLES = {
    "ru": {"assistant": "Ассистент", "lawyer": "Юрист", "doctor": "Врач", "financial_analyst": "Финансовый аналитик"},
}
BASE = "-"  # callback value meaning "no adapter"
SECTION = "?"  # callback value of a section title: pressing it explains the section


class ModeCB(CallbackData, prefix="mode"):
    kind: Literal["a", "r", "p"]  # adapter, role, plain assistant
    value: str = ""
    view: Literal["all", "domain", "role"] = "all"  # which keyboard to redraw


class LangCB(CallbackData, prefix="lang"):
    code: str


class FeedbackCB(CallbackData, prefix="fb"):
    message_id: int  # the stored assistant message
    rating: int  # 1 or -1


class ContinueCB(CallbackData, prefix="cont"):
    message_id: int  # the stored assistant message that was cut at the length limit


class RetryCB(CallbackData, prefix="again"):
    message_id: int  # the stored assistant message a restart cut off


def domain_title(name: str | None, lang: str) -> str:
    if name is None:
        return t(lang, "base_model")
    return _DOMAIN_TITLES.get(lang, _DOMAIN_TITLES["en"]).get(name) or _DOMAIN_TITLES["en"].get(name) or name


def role_title(role: str, catalog: ModeCatalog | None, lang: str = "en") -> str:
    local = _ROLE_TITLES.get(lang, {}).get(role)
    if local:
        return local
    info = catalog.role(role) if catalog else None
    return info.title if info and info.title else role


def describe_mode(mode: Mode, lang: str, catalog: ModeCatalog | None) -> str:
    if mode.adapter is None and mode.role == "assistant":
        return t(lang, "plain")
    return f"{domain_title(mode.adapter, lang)} · {role_title(mode.role, catalog, lang)}"


def mode_keyboard(
    catalog: ModeCatalog, current: Mode, lang: str, view: Literal["all", "domain", "role"] = "all"
) -> InlineKeyboardMarkup:
    kb = InlineKeyboardBuilder()
    sizes: list[int] = []

    def mark(selected: bool, title: str) -> str:
        return f"✅ {title}" if selected else title

    if view == "all":
        plain = current.adapter is None and current.role == "assistant"
        kb.button(text=mark(plain, t(lang, "plain")), callback_data=ModeCB(kind="p", view=view))
        sizes.append(1)
    if view in ("all", "domain"):
        if view == "all":
            kb.button(text=t(lang, "section_domain"), callback_data=ModeCB(kind="a", value=SECTION, view=view))
            sizes.append(1)
        names: list[str | None] = [a.name for a in catalog.adapters if a.current] + [None]
        for name in names:
            kb.button(
                text=mark(current.adapter == name, domain_title(name, lang)),
                callback_data=ModeCB(kind="a", value=name or BASE, view=view),
            )
        sizes.extend(_rows(len(names), 2))
    if view in ("all", "role"):
        if view == "all":
            kb.button(text=t(lang, "section_role"), callback_data=ModeCB(kind="r", value=SECTION, view=view))
            sizes.append(1)
        for role in catalog.roles:
            kb.button(
                text=mark(current.role == role.id, role_title(role.id, catalog, lang)),
                callback_data=ModeCB(kind="r", value=role.id, view=view),
            )
        sizes.extend(_rows(len(catalog.roles), 2))
    kb.adjust(*sizes)
    return kb.as_markup()


def language_keyboard(current: str) -> InlineKeyboardMarkup:
    kb = InlineKeyboardBuilder()
    for code, title in LANGUAGES.items():
        kb.button(text=f"✅ {title}" if code == current else title, callback_data=LangCB(code=code))
    kb.adjust(len(LANGUAGES))
    return kb.as_markup()


def feedback_keyboard(message_id: int, rated: int | None = None, *, cut_lang: str | None = None) -> InlineKeyboardMarkup:
    """👍/👎 under an answer; `cut_lang` adds a "Continue" button (the answer was cut at the length limit)."""
    kb = InlineKeyboardBuilder()
    kb.button(text="👍" + (" ✓" if rated == 1 else ""), callback_data=FeedbackCB(message_id=message_id, rating=1))
    kb.button(text="👎" + (" ✓" if rated == -1 else ""), callback_data=FeedbackCB(message_id=message_id, rating=-1))
    if cut_lang is not None:
        kb.button(text=t(cut_lang, "continue_button"), callback_data=ContinueCB(message_id=message_id))
        kb.adjust(2, 1)
    return kb.as_markup()


def retry_keyboard(message_id: int, lang: str) -> InlineKeyboardMarkup:
    """One "Retry" button under the notice that an answer was cut off by a restart."""
    kb = InlineKeyboardBuilder()
    kb.button(text=t(lang, "retry_button"), callback_data=RetryCB(message_id=message_id))
    return kb.as_markup()


def _rows(n: int, width: int) -> list[int]:
    return [width] * (n // width) + ([n % width] if n % width else [])
