"""Streaming text (engine.stream.IncrementalDecoder) on the real tokenizer."""
from __future__ import annotations

import pytest

from engine.stream import IncrementalDecoder

TEXTS = [
    "Привет, мир! 👋🙂 Это тест — ёлка 🎄.",
    "Здравствуйте! Подскажите, пожалуйста, как оформить договор аренды?",
    "日本語のテキストと中文字符",
    "  leading spaces\nand 🇷🇺 flags 👨‍👩‍👧 and tabs\t€100",
    "Plain ASCII text, nothing special.",
]


def feed(tokenizer, ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(tokenizer)
    return [decoder.push(i) for i in ids]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decode_matches_full_decode(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = feed(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)


def test_multibyte_characters_are_held_back_until_complete(tokenizer) -> None:
    text = "Привет 🎄👋 мир"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = feed(tokenizer, ids)
    assert "" in pieces  # some tokens carried only part of a character
    emitted = ""
    for p in pieces:
        emitted += p
        assert text.startswith(emitted)  # every prefix shown so far is real text


def test_special_tokens_are_not_emitted(tokenizer) -> None:
    ids = tokenizer("Ответ готов.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert "".join(feed(tokenizer, ids)) == "Ответ готов."


def test_decoder_over_generated_like_stream(tokenizer) -> None:
    """A long mixed stream (as a model would produce it), split into many tokens."""
    text = " ".join(TEXTS) * 3
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = feed(tokenizer, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
