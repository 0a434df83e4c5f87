"""One training job at a time per adapters folder, across processes.

The trainer holds an exclusive `flock` on `adapters/.runs/training.lock` for its whole
life; the kernel releases it when the process dies, however it dies, so a killed trainer
never leaves a stale lock. The lock file holds who runs (domain, job id, pid) so a second
request — from the bot or from `python -m engine.train` — can be told what is running.
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from engine.errors import TrainingBusy

RUNS_DIR = ".runs"
LOCK_FILE = "training.lock"


def runs_dir(adapters_dir: Path | str) -> Path:
    """Where job logs and the lock live: beside the adapters they write."""
    return Path(adapters_dir) / RUNS_DIR


def _lock_path(adapters_dir: Path | str) -> Path:
    d = runs_dir(adapters_dir)
    d.mkdir(parents=True, exist_ok=True)
    return d / LOCK_FILE


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another training job"
    return f"training job {holder.get('job_id', '?')} for {holder.get('domain', '?')} (pid {holder.get('pid', '?')})"


def holder(adapters_dir: Path | str) -> dict[str, Any] | None:
    """Who holds the lock, or None when no trainer is running (creates nothing)."""
    path = runs_dir(adapters_dir) / LOCK_FILE
    if not path.is_file():
        return None
    with path.open("a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            try:
                return json.loads(fh.read() or "{}")
            except ValueError:
                return {}
        fcntl.flock(fh, fcntl.LOCK_UN)
        return None


@contextmanager
def hold(adapters_dir: Path | str, **info: Any) -> Iterator[None]:
    """Hold the training lock; TrainingBusy naming the running job if it is taken."""
    path = _lock_path(adapters_dir)
    fh = path.open("a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            try:
                running = json.loads(fh.read() or "{}")
            except ValueError:
                running = {}
            raise TrainingBusy(f"{describe(running)} is running; wait for it or cancel it") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({**info, "pid": os.getpid()}))
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()
