"""Choosing the next token (engine.sampling.next_token) and streaming text (IncrementalDecoder)."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from engine.sampling import IncrementalDecoder, next_token

REPO = Path(__file__).resolve().parents[2]


def pick(logits: list[float] | torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
         repetition_penalty: float = 1.0, seen: list[int] | None = None, seed: int | None = None,
         generator: torch.Generator | None = None) -> int:
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    return next_token(
        torch.as_tensor(logits, dtype=torch.float32) if isinstance(logits, list) else logits,
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        seen=torch.tensor(seen, dtype=torch.long) if seen is not None else None, generator=generator,
    )


def draws(logits: list[float] | torch.Tensor, n: int, seed: int = 0, **kw: object) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [pick(logits, generator=g, **kw) for _ in range(n)]  # type: ignore[arg-type]


def random_rows(n: int, vocab: int = 200, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(vocab, generator=g) * 3 for _ in range(n)]


# ---- greedy --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "logits, expected",
    [
        ([0.1, 0.2, 3.0, -1.0], 2),
        ([5.0, 1.0, 1.0], 0),
        ([-3.0, -2.0, -7.0], 1),
        ([0.0, float("-inf"), 1e-3], 2),
        ([1.0], 0),
    ],
)
@pytest.mark.parametrize("settings", [{}, {"top_k": 1}, {"top_p": 0.1}, {"top_k": 50, "top_p": 0.9}])
def test_greedy_picks_argmax(logits: list[float], expected: int, settings: dict[str, float]) -> None:
    assert pick(logits, temperature=0.0, **settings) == expected  # top_k/top_p do not matter when greedy


def test_greedy_needs_no_generator_and_accepts_half_precision() -> None:
    row = random_rows(1)[0]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert pick(row.to(dtype)) == int(torch.argmax(row.to(dtype).float()))


# ---- sampling ------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible() -> None:
    row = random_rows(1)[0] / 3  # a flat-ish distribution, so many tokens are possible
    a = draws(row, 40, seed=1234, temperature=1.0)
    b = draws(row, 40, seed=1234, temperature=1.0)
    c = draws(row, 40, seed=4321, temperature=1.0)
    assert a == b
    assert a != c
    assert len(set(a)) > 5  # really sampling, not collapsing to one token


def test_sampling_follows_the_distribution() -> None:
    logits = [math.log(0.7), math.log(0.2), math.log(0.1)]
    counts = Counter(draws(logits, 3000, temperature=1.0))
    assert abs(counts[0] / 3000 - 0.7) < 0.04
    assert abs(counts[1] / 3000 - 0.2) < 0.04
    assert abs(counts[2] / 3000 - 0.1) < 0.04


def test_low_temperature_sharpens_high_flattens() -> None:
    logits = [1.0, 0.0]
    cold = Counter(draws(logits, 1000, temperature=0.2))[0]
    warm = Counter(draws(logits, 1000, temperature=1.0))[0]
    hot = Counter(draws(logits, 1000, temperature=5.0))[0]
    assert cold > warm > hot > 400


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_one_equals_greedy(temperature: float) -> None:
    g = torch.Generator().manual_seed(7)
    for row in random_rows(30, seed=1):
        assert pick(row, temperature=temperature, top_k=1, generator=g) == pick(row)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_tiny_top_p_equals_greedy(temperature: float) -> None:
    g = torch.Generator().manual_seed(7)
    for row in random_rows(30, seed=2):
        assert pick(row, temperature=temperature, top_p=1e-6, generator=g) == pick(row)


def test_top_k_limits_candidates() -> None:
    logits = [3.0, 2.9, 2.8, 0.0, -1.0, 2.85]
    seen = set(draws(logits, 600, temperature=5.0, top_k=3))
    assert seen == {0, 1, 5}


@pytest.mark.parametrize(
    "top_p, allowed",
    [(0.3, {0}), (0.5, {0, 1}), (0.75, {0, 1, 2}), (0.95, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_nucleus(top_p: float, allowed: set[int]) -> None:
    probs = [0.4, 0.3, 0.2, 0.1]
    logits = [math.log(p) for p in probs]
    assert set(draws(logits, 800, temperature=1.0, top_p=top_p)) == allowed


# ---- repetition penalty ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "logits, seen, penalty, expected",
    [
        ([2.0, 1.9, -1.0], None, 1.5, 0),  # nothing seen: no change
        ([2.0, 1.9, -1.0], [0], 1.0, 0),  # penalty 1: no change
        ([2.0, 1.9, -1.0], [0], 1.5, 1),  # positive logit divided: 2.0 -> 1.33 < 1.9
        ([2.0, 1.9, -1.0], [0, 1], 1.5, 0),  # both penalised: order kept
        ([-1.0, -1.2, -5.0], [0], 1.5, 1),  # negative logit multiplied: -1.0 -> -1.5 < -1.2
        ([2.0, 1.5, 0.0], [0, 0, 0], 1.2, 0),  # duplicates penalise once: 2.0 -> 1.67 > 1.5
        ([2.0, 1.9, -1.0], [], 1.5, 0),  # empty seen
    ],
)
def test_repetition_penalty(logits: list[float], seen: list[int] | None, penalty: float, expected: int) -> None:
    assert pick(logits, repetition_penalty=penalty, seen=seen) == expected


def test_repetition_penalty_does_not_modify_the_callers_logits() -> None:
    logits = torch.tensor([2.0, 1.9, -1.0])
    before = logits.clone()
    pick(logits, repetition_penalty=2.0, seen=[0, 2])
    assert torch.equal(logits, before)


def test_repetition_penalty_applies_before_sampling() -> None:
    logits = [math.log(0.5), math.log(0.5)]
    counts = Counter(draws(logits, 1000, temperature=1.0, repetition_penalty=2.0, seen=[0]))
    assert counts[1] > counts[0] * 1.5  # log(0.5) * 2 makes token 0 much less likely


# ---- IncrementalDecoder on the real tokenizer --------------------------------------------------



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
