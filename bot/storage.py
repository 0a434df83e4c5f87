"""SQLite storage of users, modes, history, feedback and admin actions (sqlite-utils).

SQLite is the truth about users. The schema evolves through numbered migrations recorded in
the database (sqlite-utils `Migrations`); the constructor applies pending ones, so a new and
an old database file are handled the same way. Migrations are never edited, only appended.

Calls are synchronous and made from the event loop thread: each is a sub-millisecond local
query in WAL mode (readers never wait for the writer), cheaper than a thread hop, and the
sqlite3 connection stays on the thread that created it.

Every string is passed through `bot.text.clean` on the way in: whatever a front end hands
over (a lone surrogate from a terminal, NUL from a forged update) is stored, never raised on.
On the way out, a row someone else wrote badly (invalid UTF-8, a BLOB) is read with
replacement characters and logged once, never raised on: one bad row must not lock its user
out. Every read fetches its rows completely and closes its cursor on every path, so a read
that fails never keeps a snapshot open (which would make every later write of this
connection fail with "database is locked" once another process writes).

An answer is a row from its first moment (`begin_answer`, finish_reason 'streaming') and its
text is saved as it grows; after a kill, the next start marks such rows 'interrupted'
(`mark_interrupted`) and the front end tells their users.
"""
from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from engine.types import Message

from bot.text import clean

log = logging.getLogger(__name__)

migrations = Migrations("loratg.bot")


@migrations()
def m001_initial(db: Database) -> None:
    db["users"].create(
        {
            "id": int,
            "name": str,
            "username": str,
            "language": str,
            "adapter": str,  # NULL = the base model
            "role": str,
            "conversation": int,
            "created_at": str,
            "updated_at": str,
            "last_seen_at": str,
        },
        pk="id",
        not_null={"language", "role", "conversation"},
        defaults={"language": "en", "role": "assistant", "conversation": 1},
    )
    db["messages"].create(
        {
            "id": int,
            "user_id": int,
            "chat_id": int,
            "conversation": int,
            "role": str,  # user | assistant
            "text": str,
            "adapter": str,
            "adapter_version": str,
            "template": str,  # the role template id the answer was generated with
            "prompt_tokens": int,
            "completion_tokens": int,
            "latency_s": float,
            "ttft_s": float,
            "finish_reason": str,
            "telegram_message_id": int,
            "superseded": int,  # 1 once /retry replaced the answer; kept, not deleted
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("user_id", "users", "id")],
        not_null={"user_id", "conversation", "role", "text"},
        defaults={"superseded": 0},
    )
    db["messages"].create_index(["user_id", "conversation", "id"])
    db["feedback"].create(
        {
            "id": int,
            "message_id": int,
            "user_id": int,
            "rating": int,  # +1 / -1
            "adapter": str,
            "adapter_version": str,
            "template": str,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("message_id", "messages", "id")],
        not_null={"message_id", "user_id", "rating"},
    )
    db["feedback"].create_index(["message_id", "user_id"], unique=True)
    db["admin_actions"].create(
        {"id": int, "user_id": int, "action": str, "args": str, "result": str, "created_at": str},
        pk="id",
    )
    db["health"].create({"id": int, "checked_at": str}, pk="id")


@migrations()
def m002_answers_and_training_reports(db: Database) -> None:
    # answers still being written have finish_reason 'streaming': few rows, found at every start
    db.execute("create index if not exists messages_streaming on messages(id) where finish_reason = 'streaming'")
    db["training_reports"].create(
        {
            "job_id": str,
            "domain": str,
            "admin_id": int,
            "chat_id": int,
            "message_id": int,  # the admin's progress message
            "language": str,
            "outcome": str,  # NULL while the job is followed; its end once reported
            "created_at": str,
            "reported_at": str,
        },
        pk="job_id",
    )


#: finish_reason of an answer being written now, and of one a killed process left behind.
STREAMING = "streaming"
INTERRUPTED = "interrupted"
ROLES = ("user", "assistant")


class DatabaseError(RuntimeError):
    """The database file cannot be opened or used (the message names DATABASE_PATH and what to do)."""


def explain(path: Path | str, exc: BaseException) -> str:
    """One line for an operator: which file, what is wrong with it, what to do."""
    text = str(exc).lower()
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        what = ("the file is not a SQLite database or is damaged; restore it from a backup, or move it aside "
                "to start with an empty one (docs/operations.md)")
    elif "readonly" in text or "read-only" in text or "permission" in text or "access" in text:
        what = "the file or its folder is not writable (a read-only volume, or the wrong owner)"
    elif "full" in text or "no space" in text:
        what = "the disk is full"
    elif "unable to open" in text:
        what = "the file cannot be opened (a missing or unwritable folder)"
    else:
        what = "cannot open or migrate the database"
    return f"DATABASE_PATH={path}: {what} ({exc})"


def _decode(raw: bytes) -> str:
    """sqlite3's text_factory: a stored text that is not UTF-8 is read with replacement characters."""
    return raw.decode("utf-8", "replace")


def _clean(value: Any) -> Any:
    return clean(value) if isinstance(value, str) else value


def _clean_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _clean(v) for k, v in row.items()}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class UserRecord:
    id: int
    name: str | None
    language: str
    adapter: str | None
    role: str
    conversation: int


@dataclass(frozen=True)
class StoredMessage:
    id: int
    user_id: int
    conversation: int
    role: str
    text: str
    adapter: str | None
    adapter_version: str | None


@dataclass(frozen=True)
class InterruptedAnswer:
    """An answer that was being written when the process died."""

    id: int
    user_id: int
    chat_id: int | None
    language: str
    chars: int


@dataclass(frozen=True)
class TrainingReport:
    """An admin's progress message for a training job, to finish after a restart."""

    job_id: str
    domain: str
    admin_id: int
    chat_id: int
    message_id: int
    language: str


class Store:
    """One SQLite file; the constructor opens it in WAL mode and migrates it."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._reported: set[int] = set()  # ids of bad rows already logged
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), timeout=10)
            conn.text_factory = _decode
            self.db = Database(conn)
            if str(path) != ":memory:":
                self.db.enable_wal()
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            migrations.apply(self.db)
        except (sqlite3.Error, OSError) as exc:
            raise DatabaseError(explain(path, exc)) from exc
        self._closed = False

    # ---- reading: every row fetched, the cursor closed, whatever happens ----------------

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        cursor = self.db.conn.execute(sql, list(params))
        try:
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]
        finally:
            cursor.close()

    def _one(self, sql: str, params: Iterable[Any] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    # ---- users --------------------------------------------------------------------

    def get_user(self, user_id: int) -> UserRecord | None:
        row = self._one("select * from users where id = ?", [user_id])
        return _user(row) if row else None

    def touch_user(
        self, user_id: int, *, name: str | None = None, username: str | None = None, language: str = "en"
    ) -> UserRecord:
        """Create the user on first sight (language from Telegram) or refresh name and last seen."""
        now = _now()
        name, username = _clean(name), _clean(username)
        users = self.db["users"]
        if self.get_user(user_id) is None:
            users.insert(
                {
                    "id": user_id, "name": name, "username": username, "language": language,
                    "adapter": None, "role": "assistant", "conversation": 1,
                    "created_at": now, "updated_at": now, "last_seen_at": now,
                }
            )
        else:
            users.update(user_id, {"name": name, "username": username, "last_seen_at": now})
        user = self.get_user(user_id)
        assert user is not None
        return user

    def set_language(self, user_id: int, language: str) -> None:
        self.db["users"].update(user_id, {"language": language, "updated_at": _now()})

    def set_mode(self, user_id: int, adapter: str | None, role: str) -> None:
        self.db["users"].update(user_id, {"adapter": adapter, "role": role, "updated_at": _now()})

    def new_conversation(self, user_id: int) -> int:
        user = self.get_user(user_id)
        if user is None:
            raise KeyError(f"user {user_id} is unknown")
        self.db["users"].update(user_id, {"conversation": user.conversation + 1, "updated_at": _now()})
        return user.conversation + 1

    def active_users(self, within_s: float = 86400) -> int:
        since = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=within_s)).isoformat(timespec="seconds")
        row = self._one("select count(*) as n from users where last_seen_at >= ?", [since])
        return int(row["n"]) if row else 0

    # ---- messages -----------------------------------------------------------------

    def add_message(
        self, user_id: int, role: Literal["user", "assistant"], text: str, *, conversation: int,
        chat_id: int | None = None, **meta: Any,
    ) -> int:
        row = {
            "user_id": user_id, "chat_id": chat_id, "conversation": conversation, "role": role,
            "text": text, "created_at": _now(), **meta,
        }
        return int(self.db["messages"].insert(_clean_row(row)).last_pk)

    def update_message(self, message_id: int, **fields: Any) -> None:
        self.db["messages"].update(message_id, _clean_row(fields))

    def delete_message(self, message_id: int) -> None:
        with self.db.conn:
            self.db.execute("delete from messages where id = ?", [message_id])

    def begin_answer(self, user_id: int, *, conversation: int, chat_id: int | None = None, **meta: Any) -> int:
        """The row of an answer about to be written (no text yet, finish_reason 'streaming')."""
        return self.add_message(user_id, "assistant", "", conversation=conversation, chat_id=chat_id,
                                finish_reason=STREAMING, **meta)

    def save_partial(self, message_id: int, text: str) -> None:
        """The text so far of an answer being written: what survives a kill."""
        with self.db.conn:
            self.db.execute("update messages set text = ? where id = ? and finish_reason = ?",
                            [clean(text), message_id, STREAMING])

    def mark_interrupted(self) -> list[InterruptedAnswer]:
        """Answers a killed process was writing: marked 'interrupted' and returned, once.

        Called at start, when this process holds the instance lock: nobody else is writing them.
        """
        try:
            with self.db.conn:
                rows = self._rows(
                    "update messages set finish_reason = ? where finish_reason = ? "
                    "returning id, user_id, chat_id, length(text) as chars", [INTERRUPTED, STREAMING])
        except sqlite3.Error as exc:  # housekeeping: a database that takes no writes is reported elsewhere
            log.warning("%s: cannot mark answers cut off by a restart: %s", self.path, exc)
            return []
        out = []
        for r in sorted(rows, key=lambda r: r["id"]):
            user = self.get_user(r["user_id"])
            out.append(InterruptedAnswer(r["id"], r["user_id"], r["chat_id"], user.language if user else "en",
                                         int(r["chars"] or 0)))
            log.warning("answer %s of user %s was cut off by a restart (%s characters saved)",
                        r["id"], r["user_id"], r["chars"])
        return out

    def get_message(self, message_id: int) -> StoredMessage | None:
        row = self._one("select * from messages where id = ?", [message_id])
        if row is None:
            return None
        return StoredMessage(
            row["id"], row["user_id"], row["conversation"], row["role"], self._text(row, "text"),
            row["adapter"], row["adapter_version"],
        )

    def history(self, user_id: int, limit: int, chat_id: int | None = None) -> list[Message]:
        """The newest `limit` turns of the user's current conversation in that chat, oldest first.

        Per chat, so what a user asks in a group does not leak into their private chat. Turns
        alternate: a question that was never answered (the process died, or the engine
        failed before any text) is left out when a newer one follows, so the model answers
        the newest question, not the old one.
        """
        user = self.get_user(user_id)
        if user is None:
            return []
        rows = self._rows(
            "select id, role, text, typeof(text) as kind from messages "
            "where user_id = ? and conversation = ? and chat_id is ? and superseded = 0 and text != '' "
            "order by id desc limit ?",
            [user_id, user.conversation, chat_id, limit],
        )
        turns: list[Message] = []
        for r in reversed(rows):
            text = self._text(r, "text")
            if r["role"] not in ROLES:
                self._report(r["id"], f"an unknown role {r['role']!r}; left out of the history")
                continue
            if not text.strip():
                continue
            if turns and r["role"] == "user" and turns[-1].role == "user":
                turns[-1] = Message("user", text)  # the earlier question was never answered
            else:
                turns.append(Message(r["role"], text))
        return turns

    def _text(self, row: dict[str, Any], column: str) -> str:
        """A stored text as str: a BLOB (or a number) someone wrote is decoded; logged once per row."""
        value = row[column]
        if isinstance(value, str):
            if "\ufffd" in value and row.get("kind", "text") == "text" and self._invalid_utf8(row["id"], column):
                self._report(row["id"], "text that is not valid UTF-8; read with replacement characters")
            return clean(value)
        if isinstance(value, bytes):
            self._report(row["id"], f"a BLOB of {len(value)} bytes as its text; read as UTF-8")
            return clean(value.decode("utf-8", "replace"))
        if value is None:
            return ""
        self._report(row["id"], f"a {type(value).__name__} as its text")
        return str(value)

    def _invalid_utf8(self, message_id: int, column: str) -> bool:
        row = self._one(f"select cast({column} as blob) as raw from messages where id = ?", [message_id])
        try:
            (row or {}).get("raw", b"").decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False

    def _report(self, message_id: int, what: str) -> None:
        if message_id not in self._reported:
            self._reported.add(message_id)
            log.warning("%s: message %s holds %s", self.path, message_id, what)

    def last_answer(self, user_id: int, chat_id: int | None = None) -> tuple[int, str | None] | None:
        """(id, finish_reason) of the newest answer of the user's current conversation in that chat."""
        user = self.get_user(user_id)
        if user is None:
            return None
        row = self._one(
            "select id, finish_reason from messages where user_id = ? and conversation = ? and chat_id is ? "
            "and role = 'assistant' and superseded = 0 order by id desc limit 1",
            [user_id, user.conversation, chat_id],
        )
        return (row["id"], row["finish_reason"]) if row else None

    def retry_point(self, user_id: int, chat_id: int | None = None) -> tuple[int, str] | None:
        """Supersede the answers after the last question; return (question id, text) to answer again."""
        user = self.get_user(user_id)
        if user is None:
            return None
        last_q = self._one(
            "select id, text, typeof(text) as kind from messages where user_id = ? and conversation = ? "
            "and chat_id is ? and role = 'user' and superseded = 0 order by id desc limit 1",
            [user_id, user.conversation, chat_id],
        )
        if last_q is None:
            return None
        with self.db.conn:
            self.db.execute(
                "update messages set superseded = 1 "
                "where user_id = ? and conversation = ? and chat_id is ? and id > ?",
                [user_id, user.conversation, chat_id, last_q["id"]],
            )
        return last_q["id"], self._text(last_q, "text")

    # ---- feedback -----------------------------------------------------------------

    def add_feedback(self, message_id: int, user_id: int, rating: int) -> bool:
        """Record (or change) a user's 👍/👎 on one of their answers; False if it is not theirs."""
        row = self._one("select * from messages where id = ? and user_id = ? and role = 'assistant'",
                        [message_id, user_id])
        if row is None:
            return False
        self.db["feedback"].upsert(
            {
                "message_id": message_id, "user_id": user_id, "rating": 1 if rating > 0 else -1,
                "adapter": row["adapter"], "adapter_version": row["adapter_version"],
                "template": row["template"], "created_at": _now(),
            },
            pk=("message_id", "user_id"),  # the unique index; the id stays the row's
        )
        return True

    def feedback(self, message_id: int) -> list[dict[str, Any]]:
        return self._rows("select * from feedback where message_id = ?", [message_id])

    def liked_pairs(self, adapter: str, limit: int = 1000) -> list[tuple[str, str]]:
        """(question, answer) of 👍 answers generated with `adapter`, for training data export.

        Only answers the model ended itself (finish_reason 'stop'): one cut by MAX_NEW_TOKENS
        ('length') stops mid-sentence and would teach the adapter to do the same.
        """
        sql = """
            select q.text as question, a.text as answer
            from feedback f
            join messages a on a.id = f.message_id
            join messages q on q.id = (
                select max(id) from messages
                where user_id = a.user_id and conversation = a.conversation and role = 'user' and id < a.id
            )
            where f.rating > 0 and a.adapter = ? and a.finish_reason = 'stop'
            order by a.id limit ?
        """
        rows = self._rows(sql, [adapter, limit])
        return [(clean(r["question"]), clean(r["answer"])) for r in rows
                if isinstance(r["question"], str) and isinstance(r["answer"], str)]

    # ---- admin and health -----------------------------------------------------------

    def log_admin(self, user_id: int, action: str, args: str = "", result: str = "") -> None:
        self.db["admin_actions"].insert(_clean_row(
            {"user_id": user_id, "action": action, "args": args, "result": result[:2000], "created_at": _now()}
        ))

    def admin_actions(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._rows("select * from admin_actions order by id desc limit ?", [limit])

    # ---- training progress messages --------------------------------------------------

    def follow_training(self, job_id: str, domain: str, admin_id: int, chat_id: int, message_id: int,
                        language: str) -> None:
        """Remember the admin's progress message of a job, so a restart can finish it."""
        self.db["training_reports"].upsert(
            {"job_id": job_id, "domain": domain, "admin_id": admin_id, "chat_id": chat_id,
             "message_id": message_id, "language": language, "created_at": _now()},
            pk="job_id",
        )

    def training_reported(self, job_id: str, outcome: str) -> None:
        with self.db.conn:
            self.db.execute("update training_reports set outcome = ?, reported_at = ? where job_id = ?",
                            [outcome, _now(), job_id])

    def unreported_training(self) -> list[TrainingReport]:
        """Progress messages whose job's end was never shown (the bot stopped while it ran)."""
        rows = self._rows("select * from training_reports where outcome is null order by created_at")
        return [TrainingReport(r["job_id"], r["domain"], r["admin_id"], r["chat_id"], r["message_id"],
                               r["language"] or "en") for r in rows]

    def ping(self) -> bool:
        """A real write, for the health check: True when the database accepts it."""
        try:
            with self.db.conn:
                self.db.execute(
                    "insert into health (id, checked_at) values (1, ?) "
                    "on conflict(id) do update set checked_at = excluded.checked_at",
                    [_now()],
                )
            return True
        except sqlite3.Error:
            log.exception("database health write failed")
            return False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                log.warning("WAL checkpoint at close failed", exc_info=True)
            self.db.close()


def _user(row: dict[str, Any]) -> UserRecord:
    return UserRecord(
        id=row["id"], name=row["name"], language=row["language"] or "en", adapter=row["adapter"],
        role=row["role"] or "assistant", conversation=row["conversation"] or 1,
    )
