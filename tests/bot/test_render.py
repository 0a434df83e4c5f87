"""Markdown rendering and message splitting."""
from __future__ import annotations

import random

import pytest

from bot.render import TELEGRAM_LIMIT, fits, render, split_markdown
from telegramify_markdown.entity import utf16_len


def _text(seed: int, n: int = 3000) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "**bold**", "`code`", "🙂emoji", "Привет", "delta\n", "\n\n", "- item\n"]
    return " ".join(rng.choice(words) for _ in range(n))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_piece_fits_and_no_word_is_lost(seed):
    text = _text(seed)
    pieces = split_markdown(text)
    assert len(pieces) > 1
    assert all(fits(render(p)) for p in pieces)
    assert " ".join(pieces).split() == text.split()


@pytest.mark.parametrize("seed", [1, 2])
def test_a_full_piece_never_changes_as_the_text_grows(seed):
    text = _text(seed)
    final = split_markdown(text)
    for n in range(TELEGRAM_LIMIT, len(text), 1500):
        partial = split_markdown(text[:n])
        assert partial[:-1] == final[: len(partial) - 1]


@pytest.mark.parametrize(("text", "cut_after"), [
    ("a" * 3000 + "\n\n" + "b" * 3000, "a" * 3000),  # paragraph break
    ("a " * 1500 + "\n" + "b " * 1500, ("a " * 1500).rstrip(" ")),  # line break beats spaces
    ("x" * 9000, "x" * (TELEGRAM_LIMIT - 64)),  # no break at all: a hard cut
])
def test_cuts_prefer_paragraphs_then_lines_then_spaces(text, cut_after):
    assert split_markdown(text)[0].rstrip(" ") == cut_after


def test_characters_outside_the_bmp_count_twice():
    text = "🙂" * 3000  # 6000 UTF-16 units
    pieces = split_markdown(text)
    assert all(utf16_len(render(p).text) <= TELEGRAM_LIMIT for p in pieces)
    assert "".join(pieces) == text


def test_markdown_becomes_entities_and_broken_markdown_stays_text():
    r = render("Use **bold** and `code`")
    assert r.text == "Use bold and code"
    assert [(e.type, e.offset, e.length) for e in r.entities] == [("bold", 4, 4), ("code", 13, 4)]
    assert render("unclosed **bold").text == "unclosed **bold"
    assert render("```").text == "```"  # renders to nothing: shown raw rather than lost


@pytest.mark.parametrize(("markdown", "shown"), [
    ("<<The Birth of Rome…>>", "<<The Birth of Rome…>>"),
    ("<<The Birth of Rome>>", "<<The Birth of Rome>>"),
    ('a "<T> generic" type', 'a "<T> generic" type'),
    ("<T> generic", "<T> generic"),
    ("write to <john@example.com> today", "write to <john@example.com> today"),
    ("<div>hi</div> and a <br> tag", "<div>hi</div> and a <br> tag"),  # what a model writes is shown
    ("x < y and y > z", "x < y and y > z"),
    ("use `<T>` here", "use <T> here"),
    ("```\nvector<int> v;\n```", "vector<int> v;"),
])
def test_text_in_angle_brackets_is_kept(markdown, shown):
    assert render(markdown).text == shown


def test_formatting_around_angle_brackets_keeps_its_offsets():
    r = render("**<<Title>>** then `List<T>`")
    assert r.text == "<<Title>> then List<T>"
    assert [(e.type, r.text[e.offset:e.offset + e.length]) for e in r.entities] == [
        ("bold", "<<Title>>"), ("code", "List<T>")]


def test_an_autolink_to_a_web_address_stays_a_link():
    r = render("see <https://example.com/a?b=1> now")
    assert r.text == "see https://example.com/a?b=1 now"
    assert [(e.type, e.url) for e in r.entities] == [("text_link", "https://example.com/a?b=1")]
