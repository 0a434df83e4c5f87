"""Faults from outside, met by the real bot in-process: Telegram going away and coming back, rows
another process wrote badly, a volume that takes no writes, bursts of users, a second poller,
the state a killed process leaves behind.

Each fault comes through the boundary it comes through in production: the fake Bot API server
leaves the network (connections refused) and returns with its state, a second process writes
the SQLite file, the adapters folder is a read-only bind mount or a full tmpfs. The engine is
the scripted fake, or the fake with the real training service (tests/e2e/engines.py).
"""
from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import pytest

from bot.storage import Store
from tests.conftest import ADMIN_ID
from tests.e2e.engines import WithTraining, adapters_with_data, training_settings
from tests.e2e.volumes import full, read_only
from tests.fakes.engine import FakeEngine

pytestmark = pytest.mark.timeout(120)


async def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what} not met within {timeout} s")


def answers(store: Store, user_id: int) -> list[tuple[str, str]]:
    rows = store.db.execute("select text, finish_reason from messages where user_id = ? and role = 'assistant' "
                            "order by id", [user_id]).fetchall()
    return [(r[0], r[1]) for r in rows]


# ---- a Telegram outage while an answer streams ------------------------------------------------


async def test_an_outage_mid_answer_ends_with_the_full_answer_and_its_buttons(tg, engine, start_bot):
    bot = await start_bot(engine, telegram_backoff_max_s=0.2, telegram_retry_for_s=60)
    pieces = [f"piece{i} " for i in range(12)]
    script = engine.script(pieces=pieces, stepped=True)
    tg.send_text(7, "tell me everything")
    first = await tg.wait_for_text(7, "piece0")

    await tg.go_down()
    script.allow(4)  # text keeps coming while Telegram is away: every edit fails
    await asyncio.sleep(1.0)
    script.allow(len(pieces))  # the answer ends during the outage: the final edit fails too
    await wait_until(lambda: answers(bot.store, 7) == [("".join(pieces), "stop")], what="answer saved")
    await asyncio.sleep(1.0)
    shown_before = first.text
    await tg.come_back()

    final = await tg.wait_for_buttons(7, "piece11")
    assert shown_before.startswith("piece0") and "piece11" not in shown_before  # it was an outage
    assert final.message_id == first.message_id
    assert final.text == "".join(pieces).strip()
    assert [b["text"] for b in final.buttons] == ["👍", "👎"]


async def test_an_outage_longer_than_the_retry_bound_is_given_up_with_the_answer_saved(
    tg, engine, start_bot, caplog
):
    bot = await start_bot(engine, telegram_backoff_max_s=0.1, telegram_retry_for_s=0.5)
    script = engine.script(pieces=["kept ", "in ", "the ", "database"], stepped=True)
    tg.send_text(7, "q")
    await tg.wait_for_text(7, "kept")
    await tg.go_down()
    script.allow(3)
    await wait_until(lambda: answers(bot.store, 7) == [("kept in the database", "stop")], what="answer saved")
    await wait_until(lambda: any("gave up on the final text" in r.getMessage() for r in caplog.records),
                     what="the bounded retry ends")
    await tg.come_back()
    tg.send_text(7, "and now?")  # the bot is not stuck on the old answer
    await tg.wait_for_buttons(7, "answer to: and now?")


# ---- rows someone else wrote ------------------------------------------------------------------


def write_from_another_process(db_path, sql: str) -> None:
    script = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=10); c.execute(sys.argv[2]); c.commit()"
    subprocess.run([sys.executable, "-c", script, str(db_path), sql], check=True, timeout=60)


@pytest.mark.parametrize("literal", ["cast(x'ff61fe' as text)", "x'68656c6c6f'"], ids=["invalid UTF-8", "BLOB"])
async def test_an_undecodable_history_row_does_not_lock_its_user_out(tg, engine, start_bot, literal):
    bot = await start_bot(engine)
    tg.send_text(7, "first question")
    await tg.wait_for_buttons(7, "answer to: first question")
    write_from_another_process(bot.store.path, f"update messages set text = {literal} where role = 'assistant'")

    for question in ("second question", "third question"):
        tg.send_text(7, question)
        await tg.wait_for_buttons(7, f"answer to: {question}")
    assert not any("Something went wrong" in text for text in tg.texts(7))
    assert [m.role for m in engine.calls[-1].messages] == ["user", "assistant", "user", "assistant", "user"]
    tg.send_text(8, "another user")  # and nobody else meets "database is locked"
    await tg.wait_for_buttons(8, "answer to: another user")


# ---- an error that is not the engine's ------------------------------------------------------------


async def test_a_non_engine_error_after_the_answer_started_stops_typing_and_the_flusher(tg, engine, start_bot):
    await start_bot(engine)
    engine.script(error=RuntimeError("a bug, not an EngineError"))
    tg.send_text(7, "question")
    await tg.wait_for_text(7, "Something went wrong")

    def left_running() -> list[str]:
        return [t.get_name() for t in asyncio.all_tasks() if not t.done() and (
            t.get_name().startswith("reply-stream-")
            or getattr(t.get_coro(), "__qualname__", "").startswith("ChatActionSender"))]

    await wait_until(lambda: not left_running(), timeout=5, what=f"typing and flusher stopped ({left_running()})")
    tg.send_text(7, "again")  # the user's next question is answered
    await tg.wait_for_buttons(7, "answer to: again")


# ---- a training start on a volume that takes no writes -------------------------------------------


@pytest.mark.parametrize("fault", ["read-only", "full"])
async def test_a_failed_train_start_says_what_failed_and_fixing_the_volume_is_enough(
    tg, start_bot, tmp_path, fault
):
    adapters = tmp_path / "adapters"
    volume = read_only if fault == "read-only" else full
    if fault == "read-only":
        adapters_with_data(adapters)
    with volume(adapters) as broken:
        if fault == "full":
            adapters_with_data(adapters)
            broken.fill()
        engine = WithTraining(training_settings(adapters))
        try:
            await start_bot(engine)
            tg.send_text(ADMIN_ID, "/train legal")
            refusal = await tg.wait_for_text(ADMIN_ID, "Cannot start training legal")
            assert f"is {fault}" in refusal.text and str(adapters) in refusal.text
            assert "not available" not in refusal.text

            broken.fix()
            tg.send_text(ADMIN_ID, "/train legal")
            progress = await tg.wait_for_text(ADMIN_ID, "Training legal")
            assert "is running" not in progress.text and engine.service.current() is not None
            tg.send_text(ADMIN_ID, "/cancel")
            await tg.wait_for_text(ADMIN_ID, "Cancelled the training job", timeout=40)
        finally:
            await engine.close()


# ---- many users at once ------------------------------------------------------------------------


async def test_sends_are_paced_over_the_whole_bot(tg, engine, start_bot):
    rate = 20.0
    await start_bot(engine, telegram_sends_per_s=rate)
    users = range(100, 125)
    for u in users:
        tg.send_text(u, f"question of {u}")
    for u in users:
        await tg.wait_for_buttons(u, f"answer to: question of {u}", timeout=60)
    paced = sorted(c.at for c in tg.calls if c.method.startswith(("send", "edit", "delete")))
    busiest = max(sum(1 for t in paced[i:] if t - start < 1.0) for i, start in enumerate(paced))
    assert busiest <= rate + 1, f"{busiest} sends and edits within one second"


# ---- two bots on one token ---------------------------------------------------------------------------


async def test_a_second_bot_polling_the_token_is_logged_as_another_instance(tg, start_bot, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    first = await start_bot(FakeEngine())
    second = await start_bot(FakeEngine(), database_path=tmp_path / "other.sqlite3")
    await wait_until(lambda: any("another instance is polling" in r.getMessage() for r in caplog.records),
                     timeout=30, what="the conflict logged")
    assert any(c.status == 409 for c in tg.calls_of("getUpdates"))
    line = next(r for r in caplog.records if "another instance is polling" in r.getMessage())
    assert line.levelno == logging.ERROR and "Traceback" not in line.getMessage()
    assert not (first.app.api_counter.connected() and second.app.api_counter.connected())  # /healthz says so


# ---- what a killed process leaves -----------------------------------------------------------------------


def killed_mid_answer(db_path, user_id: int = 7, *, language: str = "en") -> int:
    """The database as a bot killed mid-answer leaves it: the question, a partial answer 'streaming'."""
    store = Store(db_path)
    store.touch_user(user_id, language=language)
    store.add_message(user_id, "user", "the cut question", conversation=1, chat_id=user_id)
    answer = store.begin_answer(user_id, conversation=1, chat_id=user_id)
    store.save_partial(answer, "The first half of an answer")
    store.close()
    return answer


@pytest.mark.parametrize(("language", "notice", "button"), [
    ("en", "was cut off", "Retry"), ("ru", "оборвался", "Повторить")])
async def test_after_a_kill_the_user_is_told_and_retry_answers_the_cut_question(
    tg, engine, start_bot, tmp_path, language, notice, button
):
    answer = killed_mid_answer(tmp_path / "bot.sqlite3", language=language)
    bot = await start_bot(engine)
    told = await tg.wait_for_text(7, notice)
    assert bot.store.get_message(answer).text == "The first half of an answer"
    assert answers(bot.store, 7) == [("The first half of an answer", "interrupted")]

    tg.press_button(7, told, button)
    await tg.wait_for_buttons(7, "answer to: the cut question")
    assert [(m.role, m.content) for m in engine.calls[-1].messages] == [("user", "the cut question")]
    assert not told.buttons  # pressed once is enough


async def test_after_a_kill_the_next_question_is_answered_as_itself(tg, engine, start_bot, tmp_path):
    killed_mid_answer(tmp_path / "bot.sqlite3")
    await start_bot(engine)
    told = await tg.wait_for_text(7, "was cut off")
    tg.send_text(7, "a new question")
    await tg.wait_for_buttons(7, "answer to: a new question")
    assert [(m.role, m.content) for m in engine.calls[-1].messages] == [
        ("user", "the cut question"), ("assistant", "The first half of an answer"), ("user", "a new question")]
    tg.press_button(7, told, "Retry")  # too late: another answer came since
    await tg.wait_for(lambda: any("no longer the latest" in a.get("text", "") for a in tg.callback_answers.values()))
    assert len(engine.calls) == 1


async def test_a_restart_after_a_clean_stop_tells_nobody(tg, engine, start_bot):
    bot = await start_bot(engine)
    tg.send_text(7, "q")
    await tg.wait_for_buttons(7, "answer to: q")
    await bot.stop()
    await start_bot(engine)
    tg.send_text(7, "after the restart")
    await tg.wait_for_buttons(7, "answer to: after the restart")
    assert not any("cut off" in text for text in tg.texts(7))


async def test_a_full_database_disk_gets_a_clear_reply_and_the_bot_recovers_when_space_returns(
    tg, engine, start_bot, tmp_path
):
    with full(tmp_path / "state", size_kib=1024) as disk:
        bot = await start_bot(engine, database_path=tmp_path / "state" / "bot.sqlite3")
        tg.send_text(7, "before")
        await tg.wait_for_buttons(7, "answer to: before")
        disk.fill()
        tg.send_text(7, "while the disk is full")
        await tg.wait_for_text(7, "can't save our conversation")
        assert not any("Something went wrong" in text for text in tg.texts(7))
        disk.fix()
        tg.send_text(7, "after")
        await tg.wait_for_buttons(7, "answer to: after")
        await bot.stop()
