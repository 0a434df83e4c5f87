"""SQLite storage of users, modes, history, feedback and admin actions (sqlite-utils).

SQLite is the truth about users. The schema evolves through numbered migrations recorded in
the database (sqlite-utils `Migrations`); the constructor applies pending ones, so a new and
an old database file are handled the same way. Migrations are never edited, only appended.

Calls are synchronous and made from the event loop thread: each is a sub-millisecond local
query in WAL mode (readers never wait for the writer), cheaper than a thread hop, and the
sqlite3 connection stays on the thread that created it.

Every string is passed through `bot.text.clean` on the way in: whatever a front end hands
over (a lone surrogate from a terminal, NUL from a forged update) is stored, never raised on.
"""
from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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


class Store:
    """One SQLite file; the constructor opens it in WAL mode and migrates it."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), timeout=10)
            self.db = Database(conn)
            if str(path) != ":memory:":
                self.db.enable_wal()
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            migrations.apply(self.db)
        except (sqlite3.Error, OSError) as exc:
            raise RuntimeError(f"DATABASE_PATH={path}: cannot open or migrate the database: {exc}") from exc
        self._closed = False

    # ---- users --------------------------------------------------------------------

    def get_user(self, user_id: int) -> UserRecord | None:
        row = next(self.db["users"].rows_where("id = ?", [user_id]), None)
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
        return self.db["users"].count_where("last_seen_at >= ?", [since])

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

    def get_message(self, message_id: int) -> StoredMessage | None:
        row = next(self.db["messages"].rows_where("id = ?", [message_id]), None)
        if row is None:
            return None
        return StoredMessage(
            row["id"], row["user_id"], row["conversation"], row["role"], row["text"],
            row["adapter"], row["adapter_version"],
        )

    def history(self, user_id: int, limit: int, chat_id: int | None = None) -> list[Message]:
        """The newest `limit` turns of the user's current conversation in that chat, oldest first.

        Per chat, so what a user asks in a group does not leak into their private chat.
        """
        user = self.get_user(user_id)
        if user is None:
            return []
        rows = list(
            self.db["messages"].rows_where(
                "user_id = ? and conversation = ? and chat_id is ? and superseded = 0 and text != ''",
                [user_id, user.conversation, chat_id], order_by="id desc", limit=limit,
            )
        )
        return [Message(r["role"], r["text"]) for r in reversed(rows)]

    def last_answer(self, user_id: int, chat_id: int | None = None) -> tuple[int, str | None] | None:
        """(id, finish_reason) of the newest answer of the user's current conversation in that chat."""
        user = self.get_user(user_id)
        if user is None:
            return None
        row = next(
            self.db["messages"].rows_where(
                "user_id = ? and conversation = ? and chat_id is ? and role = 'assistant' and superseded = 0",
                [user_id, user.conversation, chat_id], order_by="id desc", limit=1,
            ),
            None,
        )
        return (row["id"], row["finish_reason"]) if row else None

    def retry_point(self, user_id: int, chat_id: int | None = None) -> tuple[int, str] | None:
        """Supersede the answers after the last question; return (question id, text) to answer again."""
        user = self.get_user(user_id)
        if user is None:
            return None
        last_q = next(
            self.db["messages"].rows_where(
                "user_id = ? and conversation = ? and chat_id is ? and role = 'user' and superseded = 0",
                [user_id, user.conversation, chat_id], order_by="id desc", limit=1,
            ),
            None,
        )
        if last_q is None:
            return None
        with self.db.conn:
            self.db.execute(
                "update messages set superseded = 1 "
                "where user_id = ? and conversation = ? and chat_id is ? and id > ?",
                [user_id, user.conversation, chat_id, last_q["id"]],
            )
        return last_q["id"], last_q["text"]

    # ---- feedback -----------------------------------------------------------------

    def add_feedback(self, message_id: int, user_id: int, rating: int) -> bool:
        """Record (or change) a user's 👍/👎 on one of their answers; False if it is not theirs."""
        row = next(self.db["messages"].rows_where("id = ? and user_id = ? and role = 'assistant'",
                                                  [message_id, user_id]), None)
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
        return list(self.db["feedback"].rows_where("message_id = ?", [message_id]))

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
        return [(r[0], r[1]) for r in self.db.execute(sql, [adapter, limit]).fetchall()]

    # ---- admin and health -----------------------------------------------------------

    def log_admin(self, user_id: int, action: str, args: str = "", result: str = "") -> None:
        self.db["admin_actions"].insert(_clean_row(
            {"user_id": user_id, "action": action, "args": args, "result": result[:2000], "created_at": _now()}
        ))

    def admin_actions(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(self.db["admin_actions"].rows_where(order_by="id desc", limit=limit))

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
