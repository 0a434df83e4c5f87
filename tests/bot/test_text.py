"""bot.text: cleaning text that comes from outside, and what counts as a command."""
from __future__ import annotations

import json

import pytest

from bot.text import Command, clean, json_loads, parse_command, unreadable


@pytest.mark.parametrize(("raw", "expected"), [
    ("plain text, ünïcode, 日本, 😀", "plain text, ünïcode, 日本, 😀"),
    ("\x00\udcff\udcfe\n", "\ufffd\ufffd\n"),  # `printf '\x00\xff\xfe\n'` through a UTF-8 terminal
    ("a\ud83d\ude00b", "a😀b"),  # a surrogate pair (JSON escapes) is the character it encodes
    ("lone \ud83d half", "lone \ufffd half"),
    ("keeps\ttabs\nand lines\r\nand CR\rend", "keeps\ttabs\nand lines\nand CR\nend"),
    ("no \x1b[31mescapes\x07 or \x7fDEL \x85C1", "no [31mescapes or DEL C1"),
])
def test_clean_leaves_encodable_text(raw, expected):
    out = clean(raw)
    assert out == expected
    out.encode("utf-8")  # never raises


def test_unreadable_is_text_of_nothing_but_replacement_characters():
    assert unreadable("\ufffd \ufffd\n")
    assert not unreadable("\ufffd but words")
    assert not unreadable("")
    assert not unreadable("👍")


def test_telegram_json_arrives_cleaned():
    raw = json.dumps({"text": "hi \ud83d", "from": {"first_name": "\u0000Eve"}, "n": [1, "\ud83d\ude00"]})
    assert json_loads(raw) == {"text": "hi \ufffd", "from": {"first_name": "Eve"}, "n": [1, "😀"]}
    assert json_loads(raw.encode()) == json_loads(raw)


@pytest.mark.parametrize(("text", "command"), [
    ("/start", Command("start", "")),
    ("/Status now", Command("status", "now")),
    ("/train@my_bot legal", Command("train", "legal", "my_bot")),
    ("  /help\nmore", Command("help", "more")),
    ("/etc/hosts, what is it?", None),
    ("/usr/bin is where?", None),
    ("/", None),
    ("/ hello", None),
    ("what is /etc?", None),
])
def test_parse_command_follows_telegrams_idea_of_a_command(text, command):
    assert parse_command(text) == command
