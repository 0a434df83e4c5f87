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
from typing import IO, Any, Iterator

from engine.errors import TrainingBusy

RUNS_DIR = ".runs"
LOCK_FILE = "training.lock"


def runs_dir(adapters_dir: Path | str) -> Path:
    """Where job logs and the lock live: beside the adapters they write."""
    return Path(adapters_dir) / RUNS_DIR


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another training job"
    return f"training job {holder.get('job_id', '?')} for {holder.get('domain', '?')} (pid {holder.get('pid', '?')})"


def _locked_by(fh: IO[str]) -> dict[str, Any] | None:
    """Who holds the lock on `fh`, or None after taking it ourselves (exclusive, not waiting)."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        try:
            return json.loads(fh.read() or "{}")
        except ValueError:
            return {}
    return None


def holder(adapters_dir: Path | str) -> dict[str, Any] | None:
    """Who holds the lock, or None when no trainer is running (creates nothing)."""
    path = runs_dir(adapters_dir) / LOCK_FILE
    if not path.is_file():
        return None
    with path.open("a+", encoding="utf-8") as fh:
        running = _locked_by(fh)
        if running is None:
            fcntl.flock(fh, fcntl.LOCK_UN)
        return running


@contextmanager
def hold(adapters_dir: Path | str, **info: Any) -> Iterator[None]:
    """Hold the training lock; TrainingBusy naming the running job if it is taken."""
    folder = runs_dir(adapters_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK_FILE).open("a+", encoding="utf-8") as fh:
        running = _locked_by(fh)
        if running is not None:
            raise TrainingBusy(f"{describe(running)} is running; wait for it or cancel it")
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
