"""Token budgets on a real SQLite file: periods in the operator's zone, holds, kills, old databases."""
from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from sqlite_utils import Database

from bot.budget import Budgets, period_bounds, refusal_text, usage_text, wait_words
from bot.config import BotSettings
from bot.storage import Store, migrations

UTC = dt.timezone.utc


class Clock:
    def __init__(self, at: dt.datetime) -> None:
        self.at = at

    def __call__(self) -> dt.datetime:
        return self.at


def settings(**values: object) -> BotSettings:
    return BotSettings(_env_file=None, admin_ids="1", **values)  # type: ignore[call-arg]


@pytest.fixture
def clock() -> Clock:
    return Clock(dt.datetime(2026, 3, 10, 12, 0, tzinfo=UTC))


@pytest.fixture
def store(tmp_path, clock):
    s = Store(tmp_path / "bot.sqlite3", clock=clock)
    s.touch_user(7)
    yield s
    s.close()


def answer(store: Store, user: int, tokens: int, **meta: object) -> int:
    """A finished answer of `tokens` generated tokens, as ChatService stores one."""
    mid = store.begin_answer(user, conversation=1, chat_id=user, reserved_tokens=meta.pop("reserved", 0))
    store.update_message(mid, text="x", completion_tokens=tokens, finish_reason="stop", **meta)
    return mid


@pytest.mark.parametrize(("now", "zone", "day", "month"), [
    # 23:30 UTC is already the next day in Moscow (UTC+3)
    ("2026-03-10T23:30:00+00:00", "Europe/Moscow", ("2026-03-11T00:00:00+03:00", "2026-03-12T00:00:00+03:00"),
     ("2026-03-01T00:00:00+03:00", "2026-04-01T00:00:00+03:00")),
    # the night New York moves its clocks forward is 23 hours long
    ("2026-03-08T12:00:00+00:00", "America/New_York", ("2026-03-08T00:00:00-05:00", "2026-03-09T00:00:00-04:00"),
     ("2026-03-01T00:00:00-05:00", "2026-04-01T00:00:00-04:00")),
    # December's month ends in the next year
    ("2026-12-31T22:00:00+00:00", "UTC", ("2026-12-31T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
     ("2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00")),
])
def test_periods_start_at_midnight_and_on_the_first_in_the_operators_zone(now, zone, day, month):
    bounds = period_bounds(dt.datetime.fromisoformat(now), ZoneInfo(zone))
    assert tuple(b.isoformat() for b in bounds["day"]) == day
    assert tuple(b.isoformat() for b in bounds["month"]) == month


def test_an_answer_being_written_holds_a_whole_answer_until_it_settles(store, clock):
    budgets = Budgets(settings(tokens_per_day=20), store, max_new_tokens=8, clock=clock)
    answer(store, 7, 10)
    status = budgets.status(7)
    assert status.allowed and status.periods[0].remaining == 10
    # admitted at 10 of 20: it holds 8, so a second request now would see 18 and be admitted too,
    # a third one not: concurrent requests can never all start on the same remaining tokens
    first = store.begin_answer(7, conversation=1, chat_id=7, reserved_tokens=budgets.hold_for(status))
    assert budgets.status(7).periods[0].remaining == 2 and budgets.status(7).allowed
    second = store.begin_answer(7, conversation=1, chat_id=7, reserved_tokens=8)
    assert not budgets.status(7).allowed  # 10 + 8 + 8 >= 20
    store.update_message(first, text="x", completion_tokens=3, finish_reason="stop")
    store.update_message(second, text="x", completion_tokens=8, finish_reason="length")
    status = budgets.status(7)
    assert (status.periods[0].used, status.periods[0].held) == (21, 0)
    assert status.periods[0].used - 20 < budgets.max_new_tokens


def test_an_answer_a_kill_cut_off_counts_what_it_had_generated(tmp_path, clock):
    path = tmp_path / "bot.sqlite3"
    s = Store(path, clock=clock)
    s.touch_user(7)
    mid = s.begin_answer(7, conversation=1, chat_id=7, reserved_tokens=384)
    s.save_partial(mid, "half an answer", completion_tokens=5)
    s.db.conn.close()  # killed: no settlement
    s = Store(path, clock=clock)
    # still "being written": it holds its reservation (more than the 5 it had generated)
    assert s.tokens_used(7, clock.at - dt.timedelta(hours=1), clock.at + dt.timedelta(hours=1)) == (0, 384)
    s.mark_interrupted()  # what the next start does
    assert s.tokens_used(7, clock.at - dt.timedelta(hours=1), clock.at + dt.timedelta(hours=1)) == (5, 0)
    s.close()


def test_limits_come_from_the_user_then_guests_then_the_default(store, clock):
    s = settings(tokens_per_day=100, tokens_per_month=1000, allowed_user_ids="7", allow_guests=True,
                 guest_tokens_per_day=10)
    budgets = Budgets(s, store, max_new_tokens=8, clock=clock)
    assert budgets.limits(7) == (100, 1000, "default")
    assert budgets.limits(9) == (10, 1000, "guest")  # a guest month limit falls back to everyone's
    assert budgets.limits(1) == (0, 0, "admin")
    store.set_budget(9, set_by=1, tokens_per_month=0)  # unlimited month for this guest
    assert budgets.limits(9) == (10, 0, "own")
    store.set_budget(9, set_by=1, tokens_per_month=None)
    assert budgets.limits(9) == (10, 1000, "guest")  # nothing of their own left
    assert store.clear_budget(9) and not store.clear_budget(9)


def test_the_words_of_a_refusal_and_of_usage(store, clock):
    budgets = Budgets(settings(tokens_per_day=5, budget_timezone="Europe/Moscow"), store, max_new_tokens=8,
                      clock=clock)
    answer(store, 7, 12_345)
    status = budgets.status(7)
    assert not status.allowed
    en = refusal_text(status, budgets.zone, "en")
    assert "after 2026-03-11 00:00 Europe/Moscow, in 9 h" in en and "Today: 12,345 of 5 tokens, 0 left" in en
    ru = usage_text(status, budgets.zone, "ru")
    assert "Сегодня: 12\u00a0345 из 5 токенов, осталось 0" in ru and "В этом месяце: 12\u00a0345 токенов" in ru
    assert wait_words(59, "en") == "1 min" and wait_words(3 * 86400 + 3600 + 5, "ru") == "3 дн 1 ч"


def test_a_database_from_before_budgets_is_migrated_and_its_answers_count(tmp_path, clock):
    path = tmp_path / "old.sqlite3"
    db = Database(path)
    migrations.apply(db, stop_before="m003_budgets_ab_tests_and_stamps")  # what the last release wrote
    db["users"].insert({"id": 7, "language": "en", "role": "assistant", "conversation": 1})
    db["messages"].insert({"user_id": 7, "conversation": 1, "role": "assistant", "text": "old",
                           "completion_tokens": 42, "finish_reason": "stop",
                           "created_at": "2026-03-10T08:00:00+00:00"})
    db.conn.close()
    s = Store(path, clock=clock)
    budgets = Budgets(settings(tokens_per_day=50), s, max_new_tokens=8, clock=clock)
    assert budgets.status(7).periods[0].used == 42
    assert {"budgets", "ab_tests", "answer_messages"} <= set(s.db.table_names())
    s.close()


def test_a_bad_time_zone_stops_the_start_naming_the_setting(monkeypatch):
    from bot.config import load_bot_settings
    from engine.errors import ConfigError

    monkeypatch.setenv("BUDGET_TIMEZONE", "Mars/Olympus")
    with pytest.raises(ConfigError, match="BUDGET_TIMEZONE.*IANA time zone"):
        load_bot_settings(_env_file=None)
