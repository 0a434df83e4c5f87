"""The operators' views through the real bot and a real SQLite file: /ab, /why and /stats.

The A/B draws use a seeded random generator handed to the app, so the split of a fixed
number of requests is exact for that seed; the tolerances below are four standard
deviations of a fair draw, so a correct split passes for any seed and a wrong one (every
request in the A/B, or all of them to one version) fails.
"""
from __future__ import annotations

import datetime as dt
import io
import math
import random

import pytest

from tests.conftest import ADMIN_ID
from tests.e2e.test_budgets_e2e import Clock
from tests.fakes.engine import FAKE_FINGERPRINT, FakeEngine
from tests.fakes.telegram import FakeTelegram

pytestmark = pytest.mark.timeout(240)

USERS = tuple(range(101, 111))


async def start_ab(tg: FakeTelegram, command: str = "/ab legal 40") -> str:
    tg.send_text(ADMIN_ID, command)
    reply = await tg.wait_for(lambda: next((m for m in tg.bot_messages(ADMIN_ID)[::-1] if "A/B" in m.text), None))
    return reply.text


async def ask_all(tg: FakeTelegram, users: tuple[int, ...], rounds: int, tag: str = "q") -> None:
    """Every user asks `rounds` questions, one at a time each, all users at once."""
    for r in range(rounds):
        for u in users:
            tg.send_text(u, f"{tag}{r}-{u}")
        for u in users:
            await tg.wait_for_buttons(u, f"answer to: {tag}{r}-{u}")


async def shown(tg: FakeTelegram, bot, chat_id: int, contains: str):
    """A finished answer, once the bot has recorded which message shows it (what /why looks up)."""
    answer = await tg.wait_for_buttons(chat_id, contains)
    await tg.wait_for(lambda: bot.store.answer_shown_in(chat_id, answer.message_id))
    return answer


async def command(tg: FakeTelegram, chat_id: int, text: str, contains: str):
    """Send `text` and return the first bot message after it that holds `contains`."""
    seen = len(tg.bot_messages(chat_id))
    tg.send_text(chat_id, text)
    return await tg.wait_for(lambda: next((m for m in tg.bot_messages(chat_id)[seen:] if contains in m.text), None))


def legal_users(bot, users: tuple[int, ...] = USERS) -> None:
    for u in users:
        bot.store.touch_user(u)
        bot.store.set_mode(u, "legal", "lawyer")


async def test_an_ab_splits_its_share_of_the_domains_requests_between_the_two_versions(tg, engine, start_bot):
    engine.add_version("legal", "v2")
    bot = await start_bot(engine, rng=random.Random(27))
    legal_users(bot)
    text = await start_ab(tg)
    assert "A/B of legal is running: 40% of its requests take part" in text
    assert engine.held == {"legal": ("v2",)}  # the engine keeps the candidate resident
    rounds = 20
    await ask_all(tg, USERS, rounds)
    n = rounds * len(USERS)
    pinned = [c.params.adapter_version if c.params else None for c in engine.calls]
    got = [c.stream.result.adapter_version for c in engine.calls]
    taking_part = sum(v is not None for v in pinned)
    candidate = pinned.count("v2")
    assert abs(taking_part / n - 0.4) <= 4 * math.sqrt(0.4 * 0.6 / n)
    assert abs(candidate / taking_part - 0.5) <= 4 * math.sqrt(0.25 / taking_part)
    assert got == [v or "v1" for v in pinned]  # the engine answered with the version asked for
    rows = bot.store.db.execute(
        "select ab_test, ab_arm, adapter_version, count(*) from messages where role = 'assistant' "
        "group by 1, 2, 3 order by 1, 2").fetchall()
    assert rows == [(None, None, "v1", n - taking_part), (1, "candidate", "v2", candidate),
                    (1, "serving", "v1", taking_part - candidate)]

    other = 120  # other domains and the base model never take part
    bot.store.touch_user(other)
    bot.store.set_mode(other, "medical", "doctor")
    tg.send_text(other, "not legal")
    await tg.wait_for_buttons(other, "answer to: not legal")
    assert engine.calls[-1].params is None


async def test_feedback_counts_for_the_version_that_answered(tg, engine, start_bot):
    engine.add_version("legal", "v2")
    bot = await start_bot(engine, rng=random.Random(5))
    legal_users(bot, (7,))
    await start_ab(tg, "/ab legal 100")
    seen: dict[str, list[str]] = {"v1": [], "v2": []}
    for i in range(12):
        tg.send_text(7, f"question {i}")
        await tg.wait_for_buttons(7, f"answer to: question {i}")
        seen[engine.calls[-1].stream.result.adapter_version].append(f"question {i}")
        if len(seen["v1"]) >= 2 and len(seen["v2"]) >= 3:
            break
    assert len(seen["v1"]) >= 2 and len(seen["v2"]) >= 3, seen

    def press(question: str, button: str) -> None:
        answer = next(m for m in tg.bot_messages(7) if f"answer to: {question}" in m.text)
        tg.press_button(7, answer, button)

    for q in seen["v2"][:3]:
        press(q, "👍")
    press(seen["v1"][0], "👍")
    press(seen["v1"][1], "👎")
    await tg.wait_for(lambda: len(bot.store.db.execute("select * from feedback").fetchall()) == 5)
    report = await command(tg, ADMIN_ID, "/ab legal", "A/B #1 legal: v1 vs v2")
    served_v1 = len(seen["v1"])
    served_v2 = len(seen["v2"])
    assert f"• v1 (serving): {served_v1} answers · 👍 1 · 👎 1 · 👍 rate 50% (95%: 9–91%)" in report.text
    assert f"• v2 (candidate): {served_v2} answers · 👍 3 · 👎 0 · 👍 rate 100% (95%: 44–100%)" in report.text
    assert "No significant difference yet (Fisher's exact test, p = 0.4)" in report.text


async def test_promoting_the_candidate_ends_the_ab_and_lets_the_engine_free_it(tg, engine, start_bot):
    engine.add_version("legal", "v2")
    bot = await start_bot(engine, rng=random.Random(1))
    legal_users(bot, (7,))
    await start_ab(tg, "/ab legal 100")
    tg.send_text(ADMIN_ID, "/promote legal v2")
    ended = await tg.wait_for_text(ADMIN_ID, "The A/B test of legal ended with this change")
    assert "ended" in ended.text and "the candidate was promoted" in ended.text
    assert engine.held["legal"] == ()
    tg.send_text(7, "after the promotion")
    await tg.wait_for_buttons(7, "answer to: after the promotion")
    assert engine.calls[-1].params is None and engine.calls[-1].stream.result.adapter_version == "v2"
    assert bot.store.latest_ab_test("legal").end_reason == "promoted"


async def test_an_ab_ends_by_itself_when_the_serving_version_changes_elsewhere(tg, engine, start_bot):
    engine.add_version("legal", "v2")
    engine.add_version("legal", "v3")
    bot = await start_bot(engine, rng=random.Random(1))
    legal_users(bot, (7,))
    text = await start_ab(tg, "/ab legal 50")
    assert "v1 vs v3" in text  # the newest candidate by default
    engine.versions["legal"] = "v2"  # a training job promoted another version
    tg.send_text(7, "after the change")
    await tg.wait_for_buttons(7, "answer to: after the change")
    assert engine.calls[-1].params is None
    assert bot.store.latest_ab_test("legal").end_reason == "serving_changed"
    assert engine.held["legal"] == ()


async def test_an_admin_stops_an_ab_and_refusals_say_why(tg, engine, start_bot):
    bot = await start_bot(engine)
    tg.send_text(ADMIN_ID, "/ab legal 20")
    await tg.wait_for_text(ADMIN_ID, "legal has no candidate version. Train one with /train legal")
    tg.send_text(ADMIN_ID, "/ab legal 120")
    await tg.wait_for_text(ADMIN_ID, "Usage: /ab")
    tg.send_text(ADMIN_ID, "/ab nosuch 20")
    await tg.wait_for_text(ADMIN_ID, "There is no adapter domain “nosuch”")
    engine.add_version("legal", "v2")
    engine.refused_versions[("legal", "v2")] = "adapter legal/v2 was trained for another base model"
    tg.send_text(ADMIN_ID, "/ab legal 20")
    await tg.wait_for_text(ADMIN_ID, "Cannot load legal v2 for the A/B: adapter legal/v2 was trained for another")
    assert bot.store.running_ab_tests() == []
    del engine.refused_versions[("legal", "v2")]
    tg.send_text(ADMIN_ID, "/ab legal 20%", language_code="ru")
    await tg.wait_for_text(ADMIN_ID, "A/B of legal is running: 20%")
    tg.send_text(7, "/ab legal stop")
    await tg.wait_for_text(7, "for admins only")
    tg.send_text(ADMIN_ID, "/ab legal stop")
    stopped = await tg.wait_for_text(ADMIN_ID, "Stopped the A/B test of legal")
    assert "stopped by an admin" in stopped.text
    assert engine.held["legal"] == ()
    tg.send_text(ADMIN_ID, "/ab")
    await tg.wait_for_text(ADMIN_ID, "No A/B test is running")


async def test_a_running_ab_survives_a_restart(tg, engine, start_bot):
    engine.add_version("legal", "v2")
    bot = await start_bot(engine, rng=random.Random(3))
    await start_ab(tg, "/ab legal 30")
    await bot.stop()
    fresh = FakeEngine()
    fresh.add_version("legal", "v2")
    await start_bot(fresh)
    await tg.wait_for(lambda: fresh.held.get("legal") == ("v2",))  # held again by the new process
    tg.send_text(ADMIN_ID, "/ab")
    shown = await tg.wait_for_text(ADMIN_ID, "A/B #1 legal: v1 vs v2 · 30% of requests")
    assert "ended" not in shown.text


async def test_why_shows_an_admin_what_produced_an_answer(tg, engine, start_bot):
    engine.add_version("legal", "v2")
    bot = await start_bot(engine, rng=random.Random(0))
    legal_users(bot, (7,))
    await start_ab(tg, "/ab legal 100")
    tg.send_text(7, "what is a tort?")
    answer = await shown(tg, bot, 7, "answer to: what is a tort?")
    stamp = engine.calls[-1].stream.result.stamp
    arm = "candidate" if stamp.adapter_version == "v2" else "serving"

    tg.send_text(7, "/why", reply_to=answer.message_id)  # not an admin
    await tg.wait_for_text(7, "for admins only")
    tg.send_text(ADMIN_ID, "/why")
    await tg.wait_for_text(ADMIN_ID, "Reply /why to one of my answers")

    bot.store.set_mode(ADMIN_ID, "legal", "lawyer")
    tg.send_text(ADMIN_ID, "a question of my own")
    own = await shown(tg, bot, ADMIN_ID, "answer to: a question of my own")
    own_stamp = engine.calls[-1].stream.result.stamp
    tg.send_text(ADMIN_ID, "/why", reply_to=own.message_id)
    why = await tg.wait_for_text(ADMIN_ID, "🔎 Answer #")
    assert f"Base model: fake/SmolLM2 · nf4 · fingerprint {FAKE_FINGERPRINT[:19]}…" in why.text
    assert f"Adapter: legal {own_stamp.adapter_version} · A/B #1" in why.text
    assert f"Template: lawyer (en) · sha256 {own_stamp.template_hash[:12]}" in why.text
    assert ("Sampling: temperature 0.7 · top-p 0.9 · top-k 50 · repetition 1.1 · at most 384 tokens · seed —"
            in why.text)
    assert "Backend: local" in why.text
    tg.send_text(ADMIN_ID, "/status")
    status = await tg.wait_for_text(ADMIN_ID, "Model:")
    tg.send_text(ADMIN_ID, "/why", reply_to=status.message_id)
    await tg.wait_for_text(ADMIN_ID, "That message is not an answer I stored")
    stored = bot.store.answer(bot.store.last_answer(7, 7)[0])
    assert stored.stamp == stamp and stored.ab_arm == arm  # stored with the answer, read back whole


async def test_why_speaks_the_admins_language(tg, engine, start_bot):
    bot = await start_bot(engine)
    tg.send_text(ADMIN_ID, "/start", language_code="ru")
    await tg.wait_for_text(ADMIN_ID, "Здравствуйте")
    tg.send_text(ADMIN_ID, "вопрос")
    answer = await shown(tg, bot, ADMIN_ID, "answer to: вопрос")
    tg.send_text(ADMIN_ID, "/why", reply_to=answer.message_id)
    why = await tg.wait_for_text(ADMIN_ID, "🔎 Ответ #")
    assert "Базовая модель: fake/SmolLM2" in why.text and "Адаптер: без адаптера" in why.text
    assert "Шаблон: assistant (ru)" in why.text and "Бэкенд: локальный" in why.text
    assert bot.store.answer(bot.store.last_answer(ADMIN_ID, ADMIN_ID)[0]).stamp is not None


async def test_stats_reports_both_windows_and_sends_a_chart_of_30_days(tg, engine, start_bot):
    from PIL import Image

    clock = Clock(dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.timezone.utc))
    bot = await start_bot(engine, clock=clock, budget_timezone="Europe/Moscow")
    legal_users(bot, (7,))
    bot.store.touch_user(8)
    for day in range(5):  # an answer a day for 5 days, legal for 7 and medical for 8
        bot.store.set_mode(8, "medical", "doctor")
        for user in (7, 8):
            engine.script(pieces=[f"d{day}u{user}w{i} " for i in range(3 + user)])
            tg.send_text(user, f"day {day}")
            await tg.wait_for_buttons(user, f"d{day}u{user}w{2 + user}")
        clock.advance(days=1)
    clock.advance(hours=-12)
    answer = tg.bot_messages(7)[-1]
    tg.press_button(7, answer, "👍")
    await tg.wait_for(lambda: bot.store.feedback(bot.store.last_answer(7, 7)[0]))

    tg.send_text(ADMIN_ID, "/stats")
    photo = await tg.wait_for(lambda: next(iter(tg.photos(ADMIN_ID)), None), timeout=60)
    text = next(m.text for m in tg.bot_messages(ADMIN_ID) if m.text.startswith("📊"))
    assert "Answers: 2 | 10" in text  # one day of both users | five days
    assert "Tokens generated: 21 | 105" in text  # (10 + 11) a day
    assert "Active users: " in text and "Answer time p50/p95: " in text and "First token p50/p95: " in text
    assert "• ⚖️ Law · Lawyer: 5 answers, 50 tokens" in text
    assert "• 🩺 Medicine · Doctor: 5 answers, 55 tokens" in text
    assert "• legal v1: 👍 1 · 👎 0 (100% 👍)" in text
    assert "Days and periods in Europe/Moscow." in text
    assert "Answers and tokens per day of the last 30 days" in photo.text

    image = Image.open(io.BytesIO(photo.photo))
    assert image.format == "PNG" and image.size == (1000, 600)
    rgb = image.convert("RGB")
    colours = rgb.getcolors(maxcolors=1_000_000)
    assert len(colours) > 20  # axes, text, bars: not a blank picture
    legal_blue = sum(n for n, c in colours if c == (0, 114, 178))
    medical_green = sum(n for n, c in colours if c == (0, 158, 115))
    assert legal_blue > 500 and medical_green > 500  # both domains' bars are drawn

    tg.send_text(7, "/stats")
    await tg.wait_for_text(7, "for admins only")


async def test_stats_on_an_empty_database_still_draws(tg, engine, start_bot):
    from PIL import Image

    await start_bot(engine)
    tg.send_text(ADMIN_ID, "/stats", language_code="ru")
    photo = await tg.wait_for(lambda: next(iter(tg.photos(ADMIN_ID)), None), timeout=60)
    text = next(m.text for m in tg.bot_messages(ADMIN_ID) if m.text.startswith("📊"))
    assert "Ответов: 0 | 0" in text and "Время ответа p50/p95: — / — s" in text
    assert Image.open(io.BytesIO(photo.photo)).size == (1000, 600)
