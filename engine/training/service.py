"""The training service the bot talks to (`engine.training`): start, watch, cancel, promote.

A job runs `python -m engine.train <domain> --events-json` as a child process, so the
engine keeps serving while it trains (the child also runs at a lower CPU priority). Events
arrive as JSON lines on the child's stdout and are read by an asyncio task, never blocking
the event loop. The child never moves `current`: when it reports a version that passed the
gate, this service promotes it and calls `reload(domain)` so the live engine hot-loads it.

However the child ends — success, crash, cancel, SIGKILL — the service reports exactly one
final event, counts it in `metrics.training_jobs`, writes it to the job log, and removes
any staging folder the child left, so no half-written version survives.

A start either happens completely or leaves nothing behind: the adapters volume is checked
for writing first (a read-only or full volume is refused as TrainingStorageError, saying
which), and if anything after the spawn fails, the child is stopped and the job forgotten,
so fixing the volume is enough for the next start.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Awaitable, Callable, Iterable

import engine
from engine.adapters.store import AdapterStore, utc_now
from engine.config import EngineSettings
from engine.errors import AdapterInvalid, AdapterNotFound, TrainingBusy, TrainingStorageError
from engine.metrics import EngineMetrics
from engine.training import lock
from engine.training.data import FEEDBACK_FILE, data_files, feedback_rows, is_eval_file, load_domain_data, read_file
from engine.training.jobs import JobLog, JobRecord, TrainingJob, new_job_id
from engine.training.options import TrainOptions
from engine.training.promotion import mark_promoted, undo_promotion
from engine.training.reaper import SERVICE, reap_dead_jobs
from engine.types import TrainingEvent

log = logging.getLogger(__name__)

Reload = Callable[[str], Awaitable[object]]

#: How long a cancelled trainer gets to unwind (remove its staging folder) before SIGKILL.
CANCEL_GRACE_S = 15.0
#: The trainer's CPU niceness: chat replies come first on a shared CPU.
TRAINER_NICE = 10
#: How often the service looks whether the job log or the training lock changed.
WATCH_INTERVAL_S = 1.0
#: What the start's write check writes (and removes) on the adapters volume.
WRITE_CHECK_BYTES = 65536
_PROJECT_ROOT = Path(engine.__file__).resolve().parent.parent

#: How an OSError of the adapters volume is told: errno -> TrainingStorageError.problem.
_VOLUME_PROBLEMS = {errno.EROFS: "read-only", errno.ENOSPC: "full", errno.EDQUOT: "full",
                    errno.EACCES: "denied", errno.EPERM: "denied"}
_PROBLEM_WORDS = {"read-only": "is read-only", "full": "is full", "denied": "is not writable (permissions)",
                  "unwritable": "cannot be written"}


def storage_error(adapters_dir: Path | str, exc: OSError) -> TrainingStorageError:
    """The adapters volume refused a write: which folder, what is wrong, in words an admin can act on."""
    problem = _VOLUME_PROBLEMS.get(exc.errno or 0, "unwritable")
    return TrainingStorageError(
        f"the adapters folder {adapters_dir} {_PROBLEM_WORDS[problem]} ({exc.strerror or exc}); training writes "
        "its job log, lock and new version there", path=str(adapters_dir), problem=problem)


class TrainingService:
    """One training job at a time per adapters folder; see docs/engine-api.md."""

    def __init__(self, settings: EngineSettings, *, model_id: str, reload: Reload | None = None,
                 metrics: EngineMetrics | None = None) -> None:
        self.settings = settings
        self.model_id = model_id
        self.store = AdapterStore(settings.adapters_dir)
        self.log = JobLog(lock.runs_dir(settings.adapters_dir) / "jobs.jsonl")
        self._reload = reload
        self._metrics = metrics
        self._job: TrainingJob | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._cancelled_by: str | None = None
        self._pointer_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._reap()
        self._watcher: asyncio.Task[None] | None = None
        try:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="training-watch")
        except RuntimeError:  # built outside an event loop (a script): start() and history() still reap
            pass

    # ---- the interface ---------------------------------------------------------------------
    async def start(self, domain: str, *, requested_by: str | None = None,
                    options: TrainOptions | None = None) -> TrainingJob:
        """Start training `domain`; TrainingBusy / NoTrainingData / AdapterNotFound up front."""
        async with self._start_lock:  # two /train at once: the second sees the first as running
            try:
                return await self._start(domain, requested_by, options)
            except OSError as exc:  # the lock or the job log on a volume that takes no writes
                if exc.errno not in _VOLUME_PROBLEMS:
                    raise
                raise storage_error(self.settings.adapters_dir, exc) from exc

    async def _start(self, domain: str, requested_by: str | None, options: TrainOptions | None) -> TrainingJob:
        running = self.current()
        if running is not None:
            raise TrainingBusy(f"a training job for {running.describe()} is running; /cancel stops it")
        holder = lock.holder(self.settings.adapters_dir)
        if holder is not None:
            raise TrainingBusy(f"{lock.describe(holder)} is running (started outside this bot)")
        await asyncio.to_thread(self._reap)
        self._require_domain(domain)
        options = options or TrainOptions()
        if not options.dataset:  # fail fast, with the file-and-line report, before spawning
            await asyncio.to_thread(load_domain_data, self.store.domain_dir(domain) / "data")
        await asyncio.to_thread(self._check_writable)

        job = TrainingJob(new_job_id(), domain, options, requested_by)
        self._job, self._cancelled_by = job, None
        job.publish(TrainingEvent(job.id, domain, "queued", message="starting the training process"))
        try:
            self._proc = await self._spawn(job)
            job.pid = self._proc.pid
            self.log.append(JobRecord(job.id, domain, "running", utc_now(), requested_by,
                                      options=options.to_dict(), pid=job.pid, origin=SERVICE))
        except BaseException as exc:
            await self._abandon(job, exc)
            if isinstance(exc, OSError):
                raise storage_error(self.settings.adapters_dir, exc) from exc
            raise
        self._task = asyncio.create_task(self._supervise(job, self._proc), name=f"training-{job.id}")
        log.info("training job %s for %s started (pid %s) by %s", job.id, domain, job.pid, requested_by)
        return job

    def current(self) -> TrainingJob | None:
        """The running job, if any."""
        return self._job if self._job is not None and not self._job.done else None

    async def cancel(self, *, requested_by: str | None = None) -> TrainingJob | None:
        """Stop the running job (SIGTERM, then SIGKILL); returns it once it has ended."""
        job, proc, task = self.current(), self._proc, self._task
        if job is None or proc is None or task is None:
            return None
        self._cancelled_by = requested_by or "cancel"
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), CANCEL_GRACE_S)
            except asyncio.TimeoutError:
                log.warning("training process %s ignored SIGTERM; killing it", proc.pid)
                proc.kill()
        await asyncio.shield(task)
        return job

    async def promote(self, domain: str, version: str) -> str:
        """Make `version` current and hot-load it; returns the version now current."""
        async with self._pointer_lock:
            await asyncio.to_thread(mark_promoted, self.store, domain, version, self.model_id)
            error = await self._hot_load(domain)
            if error:
                back = await asyncio.to_thread(undo_promotion, self.store, domain, version, error)
                if back:
                    await self._hot_load(domain)
                raise AdapterInvalid(f"the engine refused {domain}/{version}: {error}; "
                                     f"{domain} stays on {back or 'the base model'}")
            log.info("%s/%s promoted", domain, version)
            return version

    async def rollback(self, domain: str) -> str:
        """Return `domain` to the version that served before the current one; hot-load it."""
        async with self._pointer_lock:
            self._require_domain(domain)
            before = self.store.current(domain)
            target = await asyncio.to_thread(self.store.rollback, domain)
            error = await self._hot_load(domain)
            if error:
                if before:
                    await asyncio.to_thread(self.store.set_current, domain, before)
                    await self._hot_load(domain)
                raise AdapterInvalid(f"the engine refused {domain}/{target}: {error}; {domain} stays on {before}")
            log.info("%s rolled back from %s to %s", domain, before, target)
            return target

    async def export_examples(self, domain: str, pairs: Iterable[tuple[str, str]]) -> int:
        """Append (question, answer) pairs to data/feedback.jsonl; returns rows added.

        Pairs already present in the training data (any file, any accepted shape) or asking
        an eval question are left out, so exporting twice adds nothing.
        """
        self._require_domain(domain)
        return await asyncio.to_thread(self._export, domain, list(pairs))

    def history(self, limit: int = 20) -> list[JobRecord]:
        """The newest jobs from the job log, newest first (survives restarts; dead jobs reported)."""
        self._reap()
        return list(reversed(self.log.records()))[:limit]

    async def close(self) -> None:
        """Cancel a running job (the engine is shutting down)."""
        if self._watcher is not None:
            self._watcher.cancel()
        if self.current() is not None:
            await self.cancel(requested_by="engine shutdown")

    # ---- internals -------------------------------------------------------------------------
    def _require_domain(self, domain: str) -> None:
        d = self.store.domain_dir(domain)  # AdapterNotFound for a bad name
        if domain not in self.store.domains():
            known = ", ".join(self.store.domains()) or "none"
            raise AdapterNotFound(f"no adapter domain {domain!r} in {self.store.root} "
                                  f"(expected {d}/data/ or {d}/vN/; known: {known})")

    def _check_writable(self) -> None:
        """Training writes its job log, lock, run log and new version on the adapters volume:
        a volume that takes no writes is refused here, before a process is spawned."""
        runs = lock.runs_dir(self.settings.adapters_dir)
        probe = runs / f".write-check-{os.getpid()}"
        try:
            runs.mkdir(parents=True, exist_ok=True)
            with probe.open("wb") as fh:
                fh.write(b"\0" * WRITE_CHECK_BYTES)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise storage_error(self.settings.adapters_dir, exc) from exc
        finally:
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass

    async def _abandon(self, job: TrainingJob, exc: BaseException) -> None:
        """A start that failed half-way: stop the child, forget the job, end its events."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        self._job = None
        job.publish(TrainingEvent(job.id, job.domain, "failed", message=f"could not start: {exc}"))
        log.error("training job %s for %s could not start: %s", job.id, job.domain, exc)

    async def _spawn(self, job: TrainingJob) -> asyncio.subprocess.Process:
        argv = [
            sys.executable, "-m", "engine.train", job.domain, "--events-json",
            "--job-id", job.id, "--requested-by", job.requested_by or "",
            "--options-json", json.dumps(job.options.to_dict()),
            "--settings-json", self.settings.model_dump_json(),
            "--parent-pid", str(os.getpid()), "--nice", str(TRAINER_NICE),
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
            start_new_session=True,  # a Ctrl+C meant for the bot goes through cancel(), not straight to the child
        )

    async def _supervise(self, job: TrainingJob, proc: asyncio.subprocess.Process) -> None:
        tail: collections.deque[str] = collections.deque(maxlen=20)
        child_final: dict[str, TrainingEvent] = {}
        run_log = lock.runs_dir(self.settings.adapters_dir) / f"{job.id}.log"

        async def read_events() -> None:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                try:
                    event = TrainingEvent(**json.loads(line))
                except (ValueError, TypeError):
                    tail.append(line)
                    continue
                if event.final:
                    child_final[event.kind] = event  # the service sends the real final event
                else:
                    job.publish(event)

        async def read_log() -> None:
            # in chunks, not lines: progress bars write long lines of \r-separated updates
            assert proc.stderr is not None
            pending = ""
            with run_log.open("ab") as fh:
                while chunk := await proc.stderr.read(65536):
                    fh.write(chunk)
                    *lines, pending = (pending + chunk.decode("utf-8", "replace")).replace("\r", "\n").split("\n")
                    tail.extend(line.strip() for line in lines if line.strip())
                    pending = pending[-4096:]
            if pending.strip():
                tail.append(pending.strip())

        try:
            await asyncio.gather(read_events(), read_log())
            code = await proc.wait()
            final = await self._finish(job, code, child_final, list(tail))
        except BaseException as exc:  # never leave a job without its final event
            log.exception("supervising training job %s failed", job.id)
            if proc.returncode is None:
                proc.kill()
            final = TrainingEvent(job.id, job.domain, "failed", message=f"supervisor error: {exc}")
            await asyncio.to_thread(self._clean_staging, job.domain)
            if not isinstance(exc, Exception):
                self._close_job(job, final)
                raise
        self._close_job(job, final)

    async def _finish(self, job: TrainingJob, code: int, child: dict[str, TrainingEvent],
                      tail: list[str]) -> TrainingEvent:
        last = job.last_event
        step = {"step": last.step, "total_steps": last.total_steps, "loss": last.loss} if last else {}
        finished = child.get("finished")
        if self._cancelled_by is not None and finished is None:
            await asyncio.to_thread(self._clean_staging, job.domain)
            return TrainingEvent(job.id, job.domain, "cancelled", message=f"cancelled by {self._cancelled_by}", **step)
        if code != 0 or finished is None or not finished.version:
            await asyncio.to_thread(self._clean_staging, job.domain)
            return TrainingEvent(job.id, job.domain, "failed", message=_failure_reason(code, child, tail), **step)
        meta = self.store.version(job.domain, finished.version).meta
        gate = meta.get("gate", {})
        message, promoted = finished.message or gate.get("reason", ""), False
        if gate.get("passed"):
            try:
                await self.promote(job.domain, finished.version)
                promoted = True
                message = f"{message}; promoted {finished.version}"
            except Exception as exc:
                log.warning("could not promote %s/%s: %s", job.domain, finished.version, exc)
                message = f"{message}; kept as a candidate: {exc}"
        else:
            message = f"{message}; kept {finished.version} as a candidate (/promote to use it anyway)"
        return TrainingEvent(job.id, job.domain, "finished", step=finished.step, total_steps=finished.total_steps,
                             loss=finished.loss, message=message, metrics=dict(finished.metrics),
                             version=finished.version, promoted=promoted)

    def _close_job(self, job: TrainingJob, final: TrainingEvent) -> None:
        outcome = final.kind if final.kind != "finished" else ("promoted" if final.promoted else "candidate")
        if self._metrics is not None:
            self._metrics.training_jobs.labels(domain=job.domain, outcome=outcome).inc()
        try:
            self.log.append(JobRecord(job.id, job.domain, outcome, utc_now(), job.requested_by, final.version,
                                      final.message, dict(final.metrics), job.options.to_dict(), job.pid,
                                      origin=SERVICE))
        except OSError:
            log.exception("could not write the job log")
        log.info("training job %s for %s ended: %s (%s)", job.id, job.domain, outcome, final.message)
        self._proc = None
        job.publish(final)

    async def _hot_load(self, domain: str) -> str | None:
        """Ask the live engine to load `current`; the reason it refused, or None."""
        if self._reload is None:
            return None
        try:
            report = await self._reload(domain)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        failed = getattr(report, "failed", None) or {}
        return failed.get(domain)

    def _clean_staging(self, domain: str) -> None:
        if lock.holder(self.settings.adapters_dir) is None:  # nobody else is writing there
            n = self.store.clean_staging(domain)
            if n:
                log.info("removed %d half-written version folder(s) of %s", n, domain)

    def _reap(self) -> None:
        """Jobs the log shows running whose process is gone (a killed shell job, or one that died
        with a previous bot): recorded failed, with what is known, and their staging removed.
        A volume that takes no writes leaves them for later, with a warning."""
        own = self.current()
        try:
            reap_dead_jobs(self.settings.adapters_dir, self.log, keep=[own.id] if own else [])
        except OSError as exc:
            log.warning("cannot record dead training jobs in %s: %s", self.log.path, exc)

    async def _watch(self) -> None:
        """Notice a job that dies while the bot runs (a shell job killed with SIGKILL), at once:
        whenever the job log or the training lock changes, look for dead jobs."""
        last: tuple[object, ...] | None = None
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                state = await asyncio.to_thread(self._watch_state)
                if state != last:
                    last = state
                    await asyncio.to_thread(self._reap)
            except Exception:  # the watcher must outlive a bad moment on disk
                log.exception("checking for dead training jobs failed")

    def _watch_state(self) -> tuple[object, ...]:
        """The job log's (mtime, size) and who holds the training lock: what a death changes."""
        try:
            st = self.log.path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        return stamp, json.dumps(lock.holder(self.settings.adapters_dir), sort_keys=True)

    def _export(self, domain: str, pairs: list[tuple[str, str]]) -> int:
        folder = self.store.domain_dir(domain) / "data"
        train, evals = [], []
        for path in data_files(folder):
            rows, _bad = read_file(path)
            (evals if is_eval_file(path) else train).extend(rows)
        new = feedback_rows(pairs, train, evals)
        if new:
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / FEEDBACK_FILE).open("a", encoding="utf-8") as fh:
                for row in new:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        log.info("exported %d of %d feedback pairs to %s", len(new), len(pairs), folder / FEEDBACK_FILE)
        return len(new)


def _failure_reason(code: int, child: dict[str, TrainingEvent], tail: list[str]) -> str:
    """What the admin reads: the trainer's own last error, else its last log line, plus how it ended."""
    how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    said = child.get("failed") or child.get("cancelled")
    detail = said.message if said and said.message else next(
        (line for line in reversed(tail) if "Error" in line or "error" in line), tail[-1] if tail else "")
    if code == 0:
        how = "the training process ended without writing a version"
    return f"{detail} ({how})" if detail else how
