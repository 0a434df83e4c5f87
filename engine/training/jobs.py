"""A training job as the front ends see it, and the job log that outlives restarts.

`TrainingJob` fans the training process's events out to any number of subscribers (the
admin's progress message, a console, a test): each subscriber gets the latest event at once
and everything after it, and its iterator ends after the final event. No torch here.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from engine.training.options import TrainOptions
from engine.types import TrainingEvent

log = logging.getLogger(__name__)

def new_job_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


class TrainingJob:
    """One run of the trainer for one domain; `events()` streams its life."""

    def __init__(self, job_id: str, domain: str, options: TrainOptions, requested_by: str | None = None) -> None:
        self.id = job_id
        self.domain = domain
        self.options = options
        self.requested_by = requested_by
        self.pid: int | None = None
        self.last_event: TrainingEvent | None = None
        self._subscribers: list[asyncio.Queue[TrainingEvent]] = []
        self._done = asyncio.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def describe(self) -> str:
        """'legal (step 12/40, loss 1.23, ~1 min left)' — for "what is running" answers."""
        ev = self.last_event
        if ev is None or ev.kind in ("queued", "started"):
            return f"{self.domain} (starting)"
        if ev.kind == "progress" and ev.total_steps:
            eta = f", ~{max(1, round((ev.eta_s or 0) / 60))} min left" if ev.eta_s is not None else ""
            loss = f", loss {ev.loss:.3f}" if ev.loss is not None else ""
            return f"{self.domain} (step {ev.step}/{ev.total_steps}{loss}{eta})"
        return f"{self.domain} ({ev.kind})"

    def publish(self, event: TrainingEvent) -> None:
        if self.done:
            return
        self.last_event = event
        for q in self._subscribers:
            q.put_nowait(event)
        if event.final:
            self._done.set()

    async def events(self) -> AsyncIterator[TrainingEvent]:
        """The latest event, then every later one; ends after the final event."""
        queue: asyncio.Queue[TrainingEvent] = asyncio.Queue()
        if self.last_event is not None:
            queue.put_nowait(self.last_event)
        if not self.done:
            self._subscribers.append(queue)
        try:
            while True:
                if self.done and queue.empty():
                    return
                event = await queue.get()
                yield event
                if event.final:
                    return
        finally:
            if queue in self._subscribers:
                self._subscribers.remove(queue)

    async def wait(self) -> TrainingEvent:
        """The final event, once the job has ended."""
        await self._done.wait()
        assert self.last_event is not None
        return self.last_event


@dataclass(frozen=True)
class JobRecord:
    """One job in the log: its latest known state."""

    job_id: str
    domain: str
    status: str  # "running", or how it ended: "promoted" | "candidate" | "failed" | "cancelled"
    at: str
    requested_by: str | None = None
    version: str | None = None
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    pid: int | None = None
    origin: str = ""  # "cli" (python -m engine.train) or "service" (the bot); "" in old records


class JobLog:
    """Append-only JSONL of job starts and ends (`adapters/.runs/jobs.jsonl`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: JobRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")

    def records(self) -> list[JobRecord]:
        """Latest record per job, oldest job first. Unreadable lines are skipped."""
        if not self.path.is_file():
            return []
        latest: dict[str, JobRecord] = {}
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = JobRecord(**json.loads(line))
            except (ValueError, TypeError) as exc:
                log.warning("%s:%d: unreadable job record (%s)", self.path, n, exc)
                continue
            latest[rec.job_id] = rec
        return list(latest.values())
