"""The SQLite store: migrations, users and modes, history, retry, feedback, health."""
from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from bot.storage import Store, migrations
from engine.types import Message


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "db" / "bot.sqlite3")
    yield s
    s.close()


def test_a_new_database_is_migrated_and_recorded_in_wal_mode(store):
    applied = [m.name for m in migrations.applied(store.db)]
    assert applied == [m.name for m in migrations._migrations]
    assert {"users", "messages", "feedback", "admin_actions"} <= set(store.db.table_names())
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopening_keeps_users_modes_and_applies_nothing_twice(tmp_path):
    path = tmp_path / "bot.sqlite3"
    s = Store(path)
    s.touch_user(5, name="Ann", language="ru")
    s.set_mode(5, "legal", "lawyer")
    s.close()
    s = Store(path)
    user = s.get_user(5)
    assert (user.name, user.language, user.adapter, user.role) == ("Ann", "ru", "legal", "lawyer")
    assert len(migrations.applied(s.db)) == len(migrations._migrations)
    s.close()


def test_history_is_the_recent_turns_of_the_current_conversation(store):
    store.touch_user(5)
    for i in range(6):
        store.add_message(5, "user", f"q{i}", conversation=1)
        store.add_message(5, "assistant", f"a{i}", conversation=1)
    store.touch_user(6)
    store.add_message(6, "user", "someone else", conversation=1)
    assert store.history(5, 4) == [Message("user", "q4"), Message("assistant", "a4"),
                                   Message("user", "q5"), Message("assistant", "a5")]
    assert store.new_conversation(5) == 2
    assert store.history(5, 10) == []
    assert store.history(6, 10) == [Message("user", "someone else")]
    assert store.db["messages"].count == 13  # old conversations are kept


def test_retry_point_supersedes_the_answers_after_the_last_question(store):
    store.touch_user(5)
    store.add_message(5, "user", "q1", conversation=1)
    store.add_message(5, "assistant", "a1", conversation=1)
    store.add_message(5, "user", "q2", conversation=1)
    store.add_message(5, "assistant", "a2", conversation=1)
    _, text = store.retry_point(5)
    assert text == "q2"
    assert store.history(5, 10)[-1] == Message("user", "q2")
    assert store.retry_point(5)[1] == "q2"  # again: still the same question


def test_feedback_is_per_user_and_answer_and_can_change(store):
    store.touch_user(5)
    store.add_message(5, "user", "q", conversation=1)
    a = store.add_message(5, "assistant", "a", conversation=1, adapter="legal", adapter_version="v3",
                          template="lawyer", finish_reason="stop")
    assert store.add_feedback(a, 5, 1)
    assert store.add_feedback(a, 5, -1)
    assert not store.add_feedback(a, 6, 1)  # not their answer
    assert not store.add_feedback(9999, 5, 1)
    rows = store.feedback(a)
    assert [(r["rating"], r["adapter"], r["adapter_version"], r["template"]) for r in rows] == [
        (-1, "legal", "v3", "lawyer")
    ]


def test_liked_pairs_are_question_and_answer_of_the_domain(store):
    store.touch_user(5)
    for domain, rating in (("legal", 1), ("legal", -1), ("medical", 1)):
        store.add_message(5, "user", f"q-{domain}-{rating}", conversation=1)
        a = store.add_message(5, "assistant", f"a-{domain}-{rating}", conversation=1, adapter=domain,
                              finish_reason="stop")
        store.add_feedback(a, 5, rating)
    assert store.liked_pairs("legal") == [("q-legal-1", "a-legal-1")]


def test_ping_writes_and_reports_a_broken_database(store):
    assert store.ping()
    store.db.conn.close()
    with pytest.raises(sqlite3.ProgrammingError):
        store.db.execute("select 1")
    assert store.ping() is False
    store._closed = True  # already closed above


def test_an_unopenable_path_names_the_setting(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RuntimeError, match="DATABASE_PATH"):
        Store(tmp_path / "file" / "bot.sqlite3")


def test_history_is_per_chat(store):
    store.touch_user(5)
    store.add_message(5, "user", "private question", conversation=1, chat_id=5)
    store.add_message(5, "user", "group question", conversation=1, chat_id=-100)
    assert store.history(5, 10, chat_id=5) == [Message("user", "private question")]
    assert store.history(5, 10, chat_id=-100) == [Message("user", "group question")]


def test_cut_and_cancelled_answers_are_not_exported(store):
    store.touch_user(5)
    for reason in ("stop", "length", "cancelled", "error"):
        store.add_message(5, "user", f"q-{reason}", conversation=1)
        a = store.add_message(5, "assistant", f"a-{reason}", conversation=1, adapter="legal", finish_reason=reason)
        store.add_feedback(a, 5, 1)
    assert store.liked_pairs("legal") == [("q-stop", "a-stop")]


@pytest.mark.parametrize("raw", [
    "\x00\udcff\udcfe",  # what `printf '\x00\xff\xfe'` reaches Python as through a UTF-8 terminal
    "half an emoji \ud83d",  # a lone surrogate from a JSON escape
    "tab\tnew\nline\x07bell\x1b[31m",
])
def test_any_text_is_stored_and_read_back_without_a_crash(store, raw):
    store.touch_user(5, name=raw, username=raw)
    q = store.add_message(5, "user", raw, conversation=1)
    a = store.add_message(5, "assistant", raw, conversation=1, template=raw)
    store.update_message(a, text=raw + "!")
    store.log_admin(5, "reload", raw, raw)
    texts = [m.content for m in store.history(5, 10)]
    assert len(texts) == 2 and all(t.encode("utf-8") for t in texts)  # encodable: no surrogate left
    assert "\x00" not in texts[0] and "\x07" not in texts[0]
    assert store.get_message(q).text == texts[0]
    assert store.get_user(5).name == texts[0]


# ---- rows someone else wrote badly; reads that never hold a snapshot -------------------------

#: Rows as a hand edit, an old tool or a buggy migration leaves them: text that is not UTF-8, BLOBs.
BAD_ROWS = {
    "invalid UTF-8": "cast(x'48692c20fffe2021' as text)",  # "Hi, \xff\xfe !"
    "a BLOB": "x'c3a974c3a9'",  # "été" as bytes
    "a binary BLOB": "x'00ff10'",
}


def another_process(db_path, sql: str) -> None:
    """Run `sql` on the database from a separate Python process (its own connection and locks)."""
    script = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=10); "
              "c.execute(sys.argv[2]); c.commit(); c.close()")
    subprocess.run([sys.executable, "-c", script, str(db_path), sql], check=True, timeout=60)


def add_bad_answer(store: Store, user_id: int, literal: str) -> None:
    another_process(store.path, "insert into messages (user_id, chat_id, conversation, role, text, superseded, "
                    f"finish_reason, created_at) values ({user_id}, {user_id}, 1, 'assistant', {literal}, 0, 'stop', "
                    "'2026-01-01T00:00:00+00:00')")


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_an_undecodable_history_row_is_read_repaired_and_logged_once(store, kind, caplog):
    store.touch_user(5)
    store.add_message(5, "user", "first question", conversation=1, chat_id=5)
    add_bad_answer(store, 5, BAD_ROWS[kind])
    store.add_message(5, "user", "second question", conversation=1, chat_id=5)

    for _ in range(3):
        history = store.history(5, 10, chat_id=5)
        assert [m.role for m in history] == ["user", "assistant", "user"]
        assert [m.content for m in history][::2] == ["first question", "second question"]
        assert all(isinstance(m.content, str) and m.content.encode("utf-8") for m in history)
    if kind == "a BLOB":
        assert history[1].content == "été"
    reports = [r for r in caplog.records if r.name == "bot.storage" and "holds" in r.getMessage()]
    assert len(reports) == 1, "a bad row is logged once, not on every question"
    raw = sqlite3.connect(store.path).execute("select typeof(text), hex(text) from messages where role = "
                                              "'assistant'").fetchone()
    assert raw[0] in ("text", "blob") and raw[1]  # the stored row is left as it was


#: Every read of the store, each meeting the bad rows.
READS = {
    "history": lambda s: s.history(5, 10, chat_id=5),
    "get_message": lambda s: [s.get_message(i) for i in range(1, 6)],
    "retry_point": lambda s: s.retry_point(5, chat_id=5),
    "last_answer": lambda s: s.last_answer(5, chat_id=5),
    "liked_pairs": lambda s: s.liked_pairs("legal"),
    "feedback": lambda s: s.feedback(2),
    "admin_actions": lambda s: s.admin_actions(),
    "active_users": lambda s: s.active_users(),
}


@pytest.mark.parametrize("read", list(READS))
def test_a_read_of_bad_rows_leaves_no_snapshot_that_locks_later_writes(store, read):
    """A failed read must not keep its cursor's snapshot: after another process writes, every write of
    ours would fail with "database is locked" until the garbage collector frees the traceback."""
    store.touch_user(5)
    store.touch_user(6)
    store.add_message(5, "user", "q", conversation=1, chat_id=5)
    for literal in BAD_ROWS.values():
        add_bad_answer(store, 5, literal)
    another_process(store.path, "update messages set adapter = 'legal', finish_reason = 'stop'")
    another_process(store.path, "insert into feedback (message_id, user_id, rating) select id, 5, 1 "
                    "from messages where role = 'assistant'")
    kept: list[BaseException] = []
    try:
        READS[read](store)
    except Exception as exc:  # kept alive, as an error handler's event or a log record keeps it
        kept.append(exc)

    another_process(store.path, "insert into admin_actions (user_id, action) values (9, 'another process')")

    store.add_message(6, "user", "another user writes", conversation=1, chat_id=6)
    store.log_admin(6, "status")
    assert store.ping()
    assert not kept, f"{read} raised on a bad row: {kept[0]!r}"
