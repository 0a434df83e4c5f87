"""Model Markdown -> Telegram text + entities, and splitting long answers into messages.

telegramify-markdown turns Markdown into plain text plus MessageEntity offsets, so nothing
is sent with a parse mode and a model's unbalanced `*` or `_` can never make Telegram
reject the message. If rendering itself fails, the raw text is sent as plain text.

Angle brackets are text, not HTML: a model writes `<<The Birth of Rome>>`, `<T>` or
`<john@example.com>` and means those characters, but the renderer would take them for tags
and drop them. So every `<` is hidden from it (a private-use character of the same UTF-16
length, restored afterwards, so entity offsets stay right); only an autolink to a web
address, `<https://...>`, stays a link.

Splitting works on the raw Markdown: the answer is cut into pieces that each render to at
most 4096 UTF-16 code units, preferring a paragraph break, then a line break, then a space.
A cut depends only on the text before it, so while an answer streams, a message that is
full never changes again and the rest continues in the next one.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from aiogram.types import MessageEntity
from telegramify_markdown import convert
from telegramify_markdown.entity import utf16_len

log = logging.getLogger(__name__)

TELEGRAM_LIMIT = 4096
_MARGIN = 64  # room for markup that renders longer than it is written (headings get an emoji)
_LT = "\ue000"  # stands for "<" while the renderer runs: one UTF-16 unit, like "<"
_AUTOLINK = re.compile(_LT + r"(?=(?:https?|ftp)://[^\s<>" + _LT + r"]+>)")


@dataclass(frozen=True)
class Rendered:
    """What one Telegram message shows. `entities is None` means plain text (no formatting)."""

    text: str
    entities: tuple[MessageEntity, ...] | None = None

    @property
    def entity_list(self) -> list[MessageEntity] | None:
        return list(self.entities) if self.entities is not None else None


def plain(text: str) -> Rendered:
    return Rendered(text.strip(), None)


def render(markdown: str) -> Rendered:
    """Render Markdown for Telegram; trailing whitespace trimmed (Telegram trims it too)."""
    try:
        text, entities = convert(_hide_angles(markdown))
        text = text.replace(_LT, "<")
    except Exception:  # a renderer bug must not cost the user their answer
        log.warning("markdown rendering failed; sending plain text", exc_info=True)
        return plain(markdown)
    stripped = text.rstrip()
    end = utf16_len(stripped)
    clipped = []
    for e in entities:
        length = min(e.offset + e.length, end) - e.offset
        if length <= 0:
            continue
        try:
            clipped.append(MessageEntity.model_validate({**e.to_dict(), "length": length}))
        except Exception:  # an entity type this aiogram does not know: drop the formatting
            log.debug("dropping entity %r", e)
    if not stripped.strip() and markdown.strip():
        return plain(markdown)  # markup that renders to nothing (e.g. a lone fence): show it raw
    return Rendered(stripped, tuple(clipped))


def _hide_angles(markdown: str) -> str:
    """Every "<" becomes _LT, except the one that opens an autolink to a web address."""
    if "<" not in markdown:
        return markdown
    return _AUTOLINK.sub("<", markdown.replace("<", _LT))


def fits(rendered: Rendered, limit: int = TELEGRAM_LIMIT) -> bool:
    return utf16_len(rendered.text) <= limit


def split_markdown(markdown: str, limit: int = TELEGRAM_LIMIT) -> list[str]:
    """Cut raw Markdown into pieces that each render to at most `limit` UTF-16 code units."""
    chunks: list[str] = []
    rest = markdown
    window = max(limit - _MARGIN, limit // 2)
    while rest:
        if utf16_len(rest) <= window and fits(render(rest), limit):
            chunks.append(rest)
            break
        size = window
        while True:
            end = _prefix_within(rest, size)
            cut, next_start = _boundary(rest, end)
            if fits(render(rest[:cut]), limit) or size <= 16:
                break
            size = int(size * 0.9)
        chunks.append(rest[:cut])
        rest = rest[next_start:]
    return [c for c in chunks if c.strip()] or ([markdown] if markdown else [])


def _prefix_within(s: str, limit: int) -> int:
    """Largest index i with utf16_len(s[:i]) <= limit."""
    if s.isascii():
        return min(len(s), limit)
    units = 0
    for i, ch in enumerate(s):
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > limit:
            return i
    return len(s)


def _boundary(s: str, end: int) -> tuple[int, int]:
    """(end of this piece, start of the next) at the best break in s[:end]."""
    if end >= len(s):
        return len(s), len(s)
    floor = end // 2  # a break in the first half would waste too much of the message
    for sep in ("\n\n", "\n", ". ", " "):
        p = s.rfind(sep, floor, end)
        if p > 0:
            cut = p + 1 if sep == ". " else p
            return cut, p + len(sep)
    return end, end
