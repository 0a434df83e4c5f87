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
import json
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from engine.types import AuditStamp, Message

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


@migrations()
def m003_budgets_ab_tests_and_stamps(db: Database) -> None:
    messages = db["messages"]
    # an answer being written holds this many tokens of its user's budget until it is settled
    messages.add_column("reserved_tokens", int)
    messages.add_column("stamp", str)  # JSON of engine.types.AuditStamp: what produced the answer
    messages.add_column("ab_test", int)  # the A/B this answer took part in (ab_tests.id), if any
    messages.add_column("ab_arm", str)  # "serving" | "candidate"
    db.execute("create index if not exists messages_user_time on messages(user_id, created_at)")
    db.execute("create index if not exists messages_answer_time on messages(created_at) where role = 'assistant'")
    db.execute("create index if not exists messages_ab on messages(ab_test) where ab_test is not null")
    db["budgets"].create(
        {"user_id": int, "tokens_per_day": int, "tokens_per_month": int, "set_by": int, "updated_at": str},
        pk="user_id",  # NULL = the default from the settings; 0 = unlimited
    )
    db["ab_tests"].create(
        {
            "id": int, "domain": str, "serving_version": str, "candidate_version": str,
            "share": float,  # of the domain's requests that take part, 0 < share <= 1
            "started_by": int, "started_at": str, "ended_at": str, "end_reason": str,
        },
        pk="id",
        not_null={"domain", "serving_version", "candidate_version", "share", "started_at"},
    )
    db.execute("create unique index ab_tests_running on ab_tests(domain) where ended_at is null")
    # every Telegram message an answer was shown in (a long one takes several), for /why
    db["answer_messages"].create(
        {"chat_id": int, "telegram_message_id": int, "message_id": int}, pk=("chat_id", "telegram_message_id"),
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


Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(at: dt.datetime) -> str:
    """How times are stored: UTC, to the second, so stored times compare as strings."""
    return at.astimezone(dt.timezone.utc).isoformat(timespec="seconds")


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
class AnswerRecord:
    """A stored answer with what produced it (/why)."""

    id: int
    user_id: int
    created_at: str
    adapter: str | None
    adapter_version: str | None
    template: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float | None
    ttft_s: float | None
    finish_reason: str | None
    ab_test: int | None
    ab_arm: str | None
    stamp: AuditStamp | None


@dataclass(frozen=True)
class BudgetOverride:
    """One user's own budget: None = the default of the settings, 0 = unlimited."""

    user_id: int
    tokens_per_day: int | None
    tokens_per_month: int | None
    set_by: int | None
    updated_at: str


@dataclass(frozen=True)
class ABTest:
    id: int
    domain: str
    serving_version: str
    candidate_version: str
    share: float
    started_by: int | None
    started_at: str
    ended_at: str | None
    end_reason: str | None

    @property
    def running(self) -> bool:
        return self.ended_at is None


@dataclass(frozen=True)
class ABCounts:
    arm: str  # "serving" | "candidate"
    version: str
    answers: int
    up: int
    down: int


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

    def __init__(self, path: Path | str, *, clock: Clock = utc_now) -> None:
        """`clock`: what "now" is for every stored time (tests move it across a budget period's end)."""
        self.path = Path(path)
        self.clock = clock
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

    def _now(self) -> str:
        return iso(self.clock())

    def read_only(self) -> sqlite3.Connection:
        """A connection of its own that only reads, for reports built in a worker thread (/stats):
        WAL lets it read while the event loop's connection writes. The caller closes it."""
        conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=10,
                               check_same_thread=False)
        conn.text_factory = _decode
        conn.row_factory = sqlite3.Row
        return conn

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
        now = self._now()
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
        self.db["users"].update(user_id, {"language": language, "updated_at": self._now()})

    def set_mode(self, user_id: int, adapter: str | None, role: str) -> None:
        self.db["users"].update(user_id, {"adapter": adapter, "role": role, "updated_at": self._now()})

    def new_conversation(self, user_id: int) -> int:
        user = self.get_user(user_id)
        if user is None:
            raise KeyError(f"user {user_id} is unknown")
        self.db["users"].update(user_id, {"conversation": user.conversation + 1, "updated_at": self._now()})
        return user.conversation + 1

    def active_users(self, within_s: float = 86400) -> int:
        since = iso(self.clock() - dt.timedelta(seconds=within_s))
        row = self._one("select count(*) as n from users where last_seen_at >= ?", [since])
        return int(row["n"]) if row else 0

    # ---- messages -----------------------------------------------------------------

    def add_message(
        self, user_id: int, role: Literal["user", "assistant"], text: str, *, conversation: int,
        chat_id: int | None = None, **meta: Any,
    ) -> int:
        row = {
            "user_id": user_id, "chat_id": chat_id, "conversation": conversation, "role": role,
            "text": text, "created_at": self._now(), **meta,
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

    def save_partial(self, message_id: int, text: str, completion_tokens: int | None = None) -> None:
        """The text (and tokens) so far of an answer being written: what survives a kill, and what
        the budget counts of it after one."""
        with self.db.conn:
            self.db.execute("update messages set text = ?, completion_tokens = coalesce(?, completion_tokens) "
                            "where id = ? and finish_reason = ?",
                            [clean(text), completion_tokens, message_id, STREAMING])

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

    # ---- answers shown in Telegram, and what produced them (/why) ------------------------

    def link_answer_messages(self, message_id: int, chat_id: int, telegram_ids: Iterable[int]) -> None:
        """Remember the Telegram messages an answer was shown in (several for a long one)."""
        with self.db.conn:
            self.db.conn.executemany(
                "insert or replace into answer_messages (chat_id, telegram_message_id, message_id) values (?, ?, ?)",
                [(chat_id, tid, message_id) for tid in telegram_ids],
            )

    def answer_shown_in(self, chat_id: int, telegram_message_id: int) -> AnswerRecord | None:
        """The stored answer a Telegram message of this chat shows, with its stamp."""
        row = self._one(
            "select m.* from answer_messages a join messages m on m.id = a.message_id "
            "where a.chat_id = ? and a.telegram_message_id = ?", [chat_id, telegram_message_id])
        if row is None:  # shown before the answer_messages table: its last message only
            row = self._one("select * from messages where chat_id = ? and telegram_message_id = ? "
                            "and role = 'assistant'", [chat_id, telegram_message_id])
        return self._answer(row) if row else None

    def answer(self, message_id: int) -> AnswerRecord | None:
        row = self._one("select * from messages where id = ? and role = 'assistant'", [message_id])
        return self._answer(row) if row else None

    def _answer(self, row: dict[str, Any]) -> AnswerRecord:
        stamp = None
        if row.get("stamp"):
            try:
                stamp = AuditStamp.from_dict(json.loads(row["stamp"]))
            except (ValueError, TypeError) as exc:
                self._report(row["id"], f"a stamp that cannot be read ({exc})")
        return AnswerRecord(
            id=row["id"], user_id=row["user_id"], created_at=row["created_at"], adapter=row["adapter"],
            adapter_version=row["adapter_version"], template=row["template"], prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"], latency_s=row["latency_s"], ttft_s=row["ttft_s"],
            finish_reason=row["finish_reason"], ab_test=row["ab_test"], ab_arm=row["ab_arm"], stamp=stamp,
        )

    # ---- token budgets ------------------------------------------------------------------

    def tokens_used(self, user_id: int, since: dt.datetime, until: dt.datetime) -> tuple[int, int]:
        """(settled, held) generated tokens of the user's answers started in [since, until).

        Settled: answers that ended (and those a kill cut off: what their partial saves counted).
        Held: answers being written, each counting what it reserved or, if more, what it has
        generated so far.
        """
        row = self._one(
            "select coalesce(sum(case when finish_reason is not ? then coalesce(completion_tokens, 0) end), 0) "
            "as settled, coalesce(sum(case when finish_reason is ? then max(coalesce(reserved_tokens, 0), "
            "coalesce(completion_tokens, 0)) end), 0) as held "
            "from messages where user_id = ? and role = 'assistant' and created_at >= ? and created_at < ?",
            [STREAMING, STREAMING, user_id, iso(since), iso(until)],
        )
        return (int(row["settled"]), int(row["held"])) if row else (0, 0)

    def budget_override(self, user_id: int) -> BudgetOverride | None:
        row = self._one("select * from budgets where user_id = ?", [user_id])
        if row is None:
            return None
        return BudgetOverride(row["user_id"], row["tokens_per_day"], row["tokens_per_month"], row["set_by"],
                              row["updated_at"])

    def set_budget(self, user_id: int, *, set_by: int, **limits: int | None) -> BudgetOverride:
        """Set `tokens_per_day` and/or `tokens_per_month` of one user (None: back to the default)."""
        unknown = set(limits) - {"tokens_per_day", "tokens_per_month"}
        if unknown:
            raise ValueError(f"unknown budget fields {sorted(unknown)}")
        current = self.budget_override(user_id)
        row = {"user_id": user_id, "tokens_per_day": current.tokens_per_day if current else None,
               "tokens_per_month": current.tokens_per_month if current else None,
               "set_by": set_by, "updated_at": self._now(), **limits}
        self.db["budgets"].upsert(row, pk="user_id")
        result = self.budget_override(user_id)
        assert result is not None
        return result

    def clear_budget(self, user_id: int) -> bool:
        """Back to the defaults; False when the user had no budget of their own."""
        with self.db.conn:
            return self.db.execute("delete from budgets where user_id = ?", [user_id]).rowcount > 0

    def find_user(self, ref: str) -> UserRecord | None:
        """A user by numeric id or @username (case-insensitive), as an admin writes it."""
        ref = ref.strip()
        if ref.lstrip("-").isdigit():
            return self.get_user(int(ref))
        row = self._one("select * from users where lower(username) = lower(?) order by last_seen_at desc limit 1",
                        [ref.lstrip("@")])
        return _user(row) if row else None

    # ---- A/B tests ----------------------------------------------------------------------

    def start_ab(self, domain: str, serving: str, candidate: str, share: float, started_by: int) -> ABTest:
        """A new running A/B of `domain` (sqlite3.IntegrityError while another one runs for it)."""
        with self.db.conn:
            cursor = self.db.execute(
                "insert into ab_tests (domain, serving_version, candidate_version, share, started_by, started_at) "
                "values (?, ?, ?, ?, ?, ?)", [domain, serving, candidate, share, started_by, self._now()])
        test = self.ab_test(int(cursor.lastrowid or 0))
        assert test is not None
        return test

    def set_ab_share(self, test_id: int, share: float) -> None:
        with self.db.conn:
            self.db.execute("update ab_tests set share = ? where id = ? and ended_at is null", [share, test_id])

    def end_ab(self, test_id: int, reason: str) -> bool:
        """End a running A/B; False when it had already ended."""
        with self.db.conn:
            return self.db.execute("update ab_tests set ended_at = ?, end_reason = ? where id = ? and ended_at is null",
                                   [self._now(), reason, test_id]).rowcount > 0

    def ab_test(self, test_id: int) -> ABTest | None:
        row = self._one("select * from ab_tests where id = ?", [test_id])
        return _ab(row) if row else None

    def running_ab_tests(self) -> list[ABTest]:
        return [_ab(r) for r in self._rows("select * from ab_tests where ended_at is null order by domain")]

    def latest_ab_test(self, domain: str) -> ABTest | None:
        row = self._one("select * from ab_tests where domain = ? order by id desc limit 1", [domain])
        return _ab(row) if row else None

    def ab_counts(self, test_id: int) -> list[ABCounts]:
        """Per version of an A/B: its answers and their 👍/👎 (each user's latest rating of each answer)."""
        rows = self._rows(
            "select m.ab_arm as arm, m.adapter_version as version, count(distinct m.id) as answers, "
            "coalesce(sum(f.rating > 0), 0) as up, coalesce(sum(f.rating < 0), 0) as down "
            "from messages m left join feedback f on f.message_id = m.id "
            "where m.ab_test = ? and m.role = 'assistant' group by m.ab_arm, m.adapter_version",
            [test_id],
        )
        return [ABCounts(r["arm"], r["version"], int(r["answers"]), int(r["up"]), int(r["down"])) for r in rows]

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
                "template": row["template"], "created_at": self._now(),
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
            {"user_id": user_id, "action": action, "args": args, "result": result[:2000], "created_at": self._now()}
        ))

    def admin_actions(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._rows("select * from admin_actions order by id desc limit ?", [limit])

    # ---- training progress messages --------------------------------------------------

    def follow_training(self, job_id: str, domain: str, admin_id: int, chat_id: int, message_id: int,
                        language: str) -> None:
        """Remember the admin's progress message of a job, so a restart can finish it."""
        self.db["training_reports"].upsert(
            {"job_id": job_id, "domain": domain, "admin_id": admin_id, "chat_id": chat_id,
             "message_id": message_id, "language": language, "created_at": self._now()},
            pk="job_id",
        )

    def training_reported(self, job_id: str, outcome: str) -> None:
        with self.db.conn:
            self.db.execute("update training_reports set outcome = ?, reported_at = ? where job_id = ?",
                            [outcome, self._now(), job_id])

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
                    [self._now()],
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


def _ab(row: dict[str, Any]) -> ABTest:
    return ABTest(row["id"], row["domain"], row["serving_version"], row["candidate_version"], float(row["share"]),
                  row["started_by"], row["started_at"], row["ended_at"], row["end_reason"])


def _user(row: dict[str, Any]) -> UserRecord:
    return UserRecord(
        id=row["id"], name=row["name"], language=row["language"] or "en", adapter=row["adapter"],
        role=row["role"] or "assistant", conversation=row["conversation"] or 1,
    )
