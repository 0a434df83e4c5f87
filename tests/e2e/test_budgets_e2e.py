"""Token budgets through the real bot (aiogram against the fake Bot API) and a real SQLite file.

Time is an injected clock shared by the store and the budgets, so a period's end is crossed
by moving it, never by waiting. Each scripted answer is a number of one-token pieces, so the
tokens a test spends are exact.
"""
from __future__ import annotations

import datetime as dt

import pytest

from tests.conftest import ADMIN_ID
from tests.fakes.engine import FakeEngine
from tests.fakes.telegram import FakeTelegram

pytestmark = pytest.mark.timeout(120)

MOSCOW_2350 = dt.datetime(2026, 3, 10, 20, 50, tzinfo=dt.timezone.utc)  # 23:50 in Europe/Moscow (UTC+3)


class Clock:
    """What "now" is for the bot; a test moves it."""

    def __init__(self, at: dt.datetime) -> None:
        self.at = at

    def __call__(self) -> dt.datetime:
        return self.at

    def advance(self, **delta: float) -> None:
        self.at += dt.timedelta(**delta)


def tokens(n: int, tag: str = "t") -> list[str]:
    return [f"{tag}{i} " for i in range(n)]


async def ask(tg: FakeTelegram, engine: FakeEngine, user: int, question: str, n: int, **kw: object) -> None:
    """`user` asks; the model answers with `n` tokens; returns once the answer is shown."""
    tag = f"<{question}>"
    engine.script(pieces=tokens(n, tag))
    tg.send_text(user, question, **kw)  # type: ignore[arg-type]
    await tg.wait_for_buttons(user, f"{tag}{n - 1}")


async def test_a_request_over_the_budget_is_refused_until_midnight_in_the_operators_zone(tg, engine, start_bot):
    clock = Clock(MOSCOW_2350)
    bot = await start_bot(engine, clock=clock, tokens_per_day=10, budget_timezone="Europe/Moscow")
    await ask(tg, engine, 7, "first", 6)
    await ask(tg, engine, 7, "second", 6)  # 6 < 10 when it starts: answered whole, 12 used
    calls = len(engine.calls)
    tg.send_text(7, "third")
    refusal = await tg.wait_for_text(7, "used up your token budget")
    assert len(engine.calls) == calls  # the engine was never asked
    assert "2026-03-11 00:00 Europe/Moscow, in 10 min" in refusal.text
    assert "12 of 10 tokens, 0 left" in refusal.text
    assert bot.store.last_answer(7, 7)[0] < refusal.message_id  # nothing stored for the refused question

    tg.send_text(7, "/usage")
    await tg.wait_for_text(7, "Today: 12 of 10 tokens, 0 left · resets 2026-03-11 00:00 Europe/Moscow, in 10 min")

    clock.advance(minutes=10)  # 00:00 in Moscow: a new day
    await ask(tg, engine, 7, "fourth", 3)
    tg.send_text(7, "/usage")
    usage = await tg.wait_for_text(7, "Today: 3 of 10 tokens, 7 left")
    assert "This month: 15 tokens · no limit" in usage.text


async def test_the_refusal_says_which_periods_and_the_later_reset(tg, engine, start_bot):
    clock = Clock(dt.datetime(2026, 3, 31, 12, 0, tzinfo=dt.timezone.utc))
    await start_bot(engine, clock=clock, tokens_per_day=100, tokens_per_month=5)
    await ask(tg, engine, 7, "q", 5, language_code="ru")
    tg.send_text(7, "again", language_code="ru")
    refusal = await tg.wait_for_text(7, "Ваш лимит токенов исчерпан")
    assert "2026-04-01 00:00 UTC, через 12 ч" in refusal.text  # the month's end, not the day's
    assert "В этом месяце: 5 из 5 токенов, осталось 0" in refusal.text
    assert "Сегодня: 5 из 100 токенов, осталось 95" in refusal.text


async def test_two_requests_in_flight_near_the_limit_overspend_by_less_than_one_answer(tg, engine, start_bot):
    m = 8  # MAX_NEW_TOKENS: what an answer can generate, and what it holds while it is written
    engine.max_new_tokens = m
    bot = await start_bot(engine, clock=Clock(MOSCOW_2350), max_new_tokens=m, tokens_per_day=20)
    await ask(tg, engine, 7, "one", 8)
    await ask(tg, engine, 7, "two", 8)  # 16 used, 4 left
    script = engine.script(pieces=tokens(50, "x"), stepped=True)  # would go on; the engine cuts it at m
    tg.send_text(7, "three")
    await tg.wait_for_text(7, "x0")
    held = bot.store.tokens_used(7, MOSCOW_2350 - dt.timedelta(days=1), MOSCOW_2350 + dt.timedelta(days=1))
    assert held == (16, m)  # the answer being written holds a whole answer
    tg.send_text(7, "four")  # arrives while "three" is being written
    await tg.wait_for_text(7, "right after the current reply")
    script.allow(50)
    await tg.wait_for_buttons(7, f"x{m - 1}")
    await tg.wait_for_text(7, "used up your token budget")
    assert [c.messages[-1].content for c in engine.calls] == ["one", "two", "three"]
    used, held = bot.store.tokens_used(7, MOSCOW_2350 - dt.timedelta(days=1), MOSCOW_2350 + dt.timedelta(days=1))
    assert (used, held) == (24, 0)
    assert used - 20 < m  # overspent by less than one answer


async def test_a_restart_keeps_the_counts(tg, engine, start_bot):
    clock = Clock(MOSCOW_2350)
    bot = await start_bot(engine, clock=clock, tokens_per_day=10)
    await ask(tg, engine, 7, "first", 10)
    await bot.stop()
    await start_bot(FakeEngine(), clock=clock, tokens_per_day=10)
    tg.send_text(7, "after the restart")
    refusal = await tg.wait_for_text(7, "used up your token budget")
    assert "10 of 10 tokens, 0 left" in refusal.text


async def test_admins_are_never_limited(tg, engine, start_bot):
    await start_bot(engine, clock=Clock(MOSCOW_2350), tokens_per_day=1, tokens_per_month=1)
    for i in range(3):
        await ask(tg, engine, ADMIN_ID, f"admin question {i}", 4)
    tg.send_text(ADMIN_ID, "/usage")
    usage = await tg.wait_for_text(ADMIN_ID, "Admins have no limit")
    assert "Today: 12 tokens · no limit" in usage.text


async def test_guests_get_the_guest_budget_and_listed_users_the_default(tg, engine, start_bot):
    await start_bot(engine, clock=Clock(MOSCOW_2350), allowed_user_ids="7", allow_guests=True,
                    tokens_per_day=1000, guest_tokens_per_day=3)
    await ask(tg, engine, 9, "guest question", 3)
    tg.send_text(9, "more")
    await tg.wait_for_text(9, "used up your token budget")
    await ask(tg, engine, 7, "member question", 3)
    await ask(tg, engine, 7, "member again", 3)
    tg.send_text(ADMIN_ID, "/budget 9")
    await tg.wait_for_text(ADMIN_ID, "Budget of user 9 (User9) (guest defaults)")


async def test_an_admin_sets_sees_and_clears_one_users_budget(tg, engine, start_bot):
    bot = await start_bot(engine, clock=Clock(MOSCOW_2350))
    await ask(tg, engine, 7, "hello", 4)  # user 7 is known from here on
    tg.send_text(ADMIN_ID, "/budget 7 day 5 month 1,000")
    shown = await tg.wait_for_text(ADMIN_ID, "Budget of user 7")
    assert "(their own)" in shown.text and "Today: 4 of 5 tokens, 1 left" in shown.text
    assert "This month: 4 of 1,000 tokens, 996 left" in shown.text
    await ask(tg, engine, 7, "one more", 2)
    tg.send_text(7, "and another")
    await tg.wait_for_text(7, "used up your token budget")

    tg.send_text(7, "/budget 7 clear")  # not an admin
    await tg.wait_for_text(7, "for admins only")
    tg.send_text(ADMIN_ID, "/budget 7 clear")
    cleared = await tg.wait_for_text(ADMIN_ID, "no budget of their own any more")
    assert "Today: 6 tokens · no limit" in cleared.text
    await ask(tg, engine, 7, "unlimited again", 2)

    tg.send_text(ADMIN_ID, "/budget @nobody")
    await tg.wait_for_text(ADMIN_ID, "I don't know a user @nobody")
    tg.send_text(ADMIN_ID, "/budget 7 week 5")
    await tg.wait_for_text(ADMIN_ID, "Usage: /budget")
    actions = [(a["action"], a["args"]) for a in bot.store.admin_actions()]
    assert ("budget", "7 day 5 month 1,000") in actions and ("budget", "7 clear") in actions


async def test_budget_counts_are_prometheus_metrics(tg, engine, start_bot):
    from prometheus_client import generate_latest

    bot = await start_bot(engine, clock=Clock(MOSCOW_2350), tokens_per_day=2)
    await ask(tg, engine, 7, "q", 3)
    tg.send_text(7, "again")
    await tg.wait_for_text(7, "used up your token budget")
    text = generate_latest(bot.app.metrics.registry).decode()
    assert 'bot_budget_refusals_total{period="day"} 1.0' in text
    assert 'bot_answer_tokens_total{adapter="base",role="assistant"} 3.0' in text
    assert 'bot_answers_total{adapter="base",role="assistant"} 1.0' in text
    assert 'bot_active_users{window="24h"}' in text
