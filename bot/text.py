"""Text from outside made safe to store, show and send, and the one rule for what a command is.

Text enters the bot from three places: the terminal (any bytes, decoded however the locale
says: `printf '\\xff'` arrives as the lone surrogate U+DCFF), Telegram (JSON may carry
`\\ud83d` without its pair, or `\\u0000`) and the model. A lone surrogate cannot be encoded
as UTF-8, so SQLite, aiohttp and a UTF-8 terminal all raise on it; NUL and other control
characters confuse terminals and tokenizers. `clean()` is applied where text comes in (the
console's reader, the Telegram session's JSON decoder, each generated piece) and again by
the store, so no front end can hand it something that crashes: a valid surrogate pair
becomes its character, anything undecodable becomes U+FFFD, control characters other than
tab and newline are dropped.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

REPLACEMENT = "\ufffd"
_SUSPECT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_COMMAND = re.compile(r"/([A-Za-z0-9_]{1,32})(?:@([A-Za-z0-9_]{1,64}))?(?=\s|$)")


def clean(text: str) -> str:
    """`text` without lone surrogates (-> U+FFFD) and control characters (dropped; CR -> LF)."""
    if not _SUSPECT.search(text):
        return text
    if _SURROGATE.search(text):
        # UTF-16 round trip: a high+low pair becomes the character it encodes, a lone half U+FFFD
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


def unreadable(text: str) -> bool:
    """True when `text` held something but nothing of it could be decoded (only U+FFFD and blanks)."""
    return REPLACEMENT in text and not text.replace(REPLACEMENT, "").strip()


def clean_tree(value: Any) -> Any:
    """`clean()` every string (keys too) of a decoded JSON value."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean_tree(k): clean_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_tree(v) for v in value]
    return value


def json_loads(raw: str | bytes) -> Any:
    """json.loads for everything Telegram sends; strings arrive cleaned.

    Only `\\u` escapes can put a surrogate or a control character into a JSON string (raw
    control characters are invalid JSON), so text without one skips the walk.
    """
    value = json.loads(raw)
    marker = b"\\u" if isinstance(raw, (bytes, bytearray)) else "\\u"
    return clean_tree(value) if marker in raw else value  # type: ignore[operator]


@dataclass(frozen=True)
class Command:
    """`/name@bot args`: `name` lowercased, `mention` the @bot part (None without one)."""

    name: str
    args: str
    mention: str | None = None


def parse_command(text: str) -> Command | None:
    """The command at the start of `text`, or None when `text` is not one.

    A command is what Telegram marks as one: `/` and 1-32 letters, digits or `_`, an optional
    `@botname`, then a blank or the end. So "/etc/hosts, what is it?" is a question, not a
    command, in Telegram and in the console alike.
    """
    stripped = text.strip()
    m = _COMMAND.match(stripped)
    if m is None:
        return None
    return Command(m.group(1).lower(), stripped[m.end():].strip(), m.group(2))
