"""One bot per database: an exclusive lock beside DATABASE_PATH, held for the life of the process.

Two bots on one database would both stream into one history and, on one token, take turns
receiving updates (Telegram answers the loser's polls with 409 Conflict). The second start
is refused with a message naming the holder. The kernel drops an `flock` when its process
dies, however it dies, so a kill -9 never leaves a stale lock behind.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO, Any


class AlreadyRunning(RuntimeError):
    """Another bot process holds the database (the message says which and what to do)."""


class InstanceLockError(RuntimeError):
    """The lock file cannot be made (the database's folder takes no writes)."""


def lock_path(database_path: Path | str) -> Path:
    path = Path(database_path)
    return path.with_name(path.name + ".lock")


class InstanceLock:
    """`acquire()` at start, `release()` at exit (or use as a context manager)."""

    def __init__(self, database_path: Path | str) -> None:
        self.database_path = Path(database_path)
        self.path = lock_path(database_path)
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        if str(self.database_path) == ":memory:":
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = self.path.open("a+", encoding="utf-8")
        except OSError as exc:
            raise InstanceLockError(
                f"DATABASE_PATH={self.database_path}: cannot create the instance lock {self.path} ({exc.strerror or exc}); "
                "the database's folder must be writable") from exc
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = _read(fh)
            fh.close()
            raise AlreadyRunning(
                f"another bot instance ({describe(holder)}) is using DATABASE_PATH={self.database_path}: stop it "
                "first, or give this one its own DATABASE_PATH (and its own BOT_TOKEN)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.seek(0)
                fh.truncate()
            except OSError:
                pass
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def __enter__(self) -> "InstanceLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fh: IO[str]) -> dict[str, Any]:
    try:
        value = json.loads(fh.read() or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def describe(holder: dict[str, Any]) -> str:
    parts = [f"pid {holder.get('pid', '?')}"]
    if holder.get("host"):
        parts.append(f"on {holder['host']}")
    if holder.get("started"):
        parts.append(f"started {holder['started']}")
    return ", ".join(parts)
