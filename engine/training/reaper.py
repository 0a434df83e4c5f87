"""Training jobs that died without recording their end: found by their process, reported, cleaned.

A trainer holds the training lock (`engine.training.lock`) for its whole life and the kernel
drops the lock when the process dies, however it dies; a job log entry still "running" whose
job no longer holds the lock is therefore a dead job. It is recorded as failed with what is
known (its pid, where it was started from) and its half-written `.staging-*` folders are
removed at once, if no other trainer is writing.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterable

from engine.adapters.store import AdapterStore, utc_now
from engine.training import lock
from engine.training.jobs import JobLog, JobRecord

log = logging.getLogger(__name__)

#: JobRecord.origin of a job started by `python -m engine.train` in a shell.
CLI = "cli"
#: JobRecord.origin of a job the bot's training service started (as its child process).
SERVICE = "service"


def origin_of(record: JobRecord) -> str:
    """Where a job was started; records from before `origin` existed are told by requested_by."""
    return record.origin or (CLI if record.requested_by == CLI else SERVICE)


def _process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        return b"engine.train" in cmdline.read_bytes()
    except OSError:
        return False


def death_note(record: JobRecord) -> str:
    """What is known about a job that ended without recording how."""
    pid = f"pid {record.pid}" if record.pid else "pid unknown"
    if origin_of(record) == CLI:
        return (f"the training process ({pid}, started from the shell) ended without recording a result: "
                "it was killed or crashed; no version was written")
    return (f"interrupted: the bot that ran it stopped while it trained ({pid}, which ended with it); "
            "no version was written")


def reap_dead_jobs(adapters_dir: Path | str, job_log: JobLog | None = None, *,
                   keep: Iterable[str] = (), holding: str | None = None) -> list[JobRecord]:
    """Record every dead "running" job as failed and remove its staging; returns the new records.

    `keep`: job ids the caller is still supervising (a just-spawned child may not hold the
    lock yet). `holding`: the caller's own job id when it holds the training lock itself (then
    nobody else is writing, and staging folders may go).
    """
    job_log = job_log or JobLog(lock.runs_dir(adapters_dir) / "jobs.jsonl")
    running = [r for r in job_log.records() if r.status == "running" and r.job_id not in set(keep)]
    if not running:
        return []
    holder = None if holding else lock.holder(adapters_dir)
    alive = holding or (holder or {}).get("job_id")
    store = AdapterStore(adapters_dir)
    reaped = []
    for rec in running:
        if rec.job_id == alive:
            continue
        if holder is None and _process_alive(rec.pid):
            continue  # alive but not (yet) holding the lock: a trainer that is just starting
        message = death_note(rec)
        if holder is None:  # nobody is writing: its half-written versions can go now
            removed = store.clean_staging(rec.domain)
            if removed:
                message += f"; removed {removed} half-written folder(s)"
        done = dataclasses.replace(rec, status="failed", at=utc_now(), message=message)
        job_log.append(done)
        log.warning("training job %s for %s: %s", rec.job_id, rec.domain, message)
        reaped.append(done)
    return reaped
