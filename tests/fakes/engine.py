"""A scripted engine with exactly the public face of `engine.Engine` (docs/engine-api.md).

The fake sits at the process boundary of the front ends: bot tests script what "the model"
says (text, pieces, a pause, an error) and read back what it was asked (messages, mode,
user). Unscripted requests get a deterministic echo naming the mode and the question, so a
test can tell which answer belongs to which user and mode.

`factory()` builds one from environment variables, for `ENGINE_FACTORY=tests.fakes.engine:factory`
in subprocess tests of `python -m bot`.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from engine.errors import (
    AdapterInvalid, AdapterNotFound, EngineClosed, EngineError, NoTrainingData, TemplateNotFound, TrainingBusy,
)
from engine.metrics import EngineMetrics
from engine.types import (
    AdapterInfo, AdapterVersionInfo, AuditStamp, EffectiveSampling, EngineStatus, GenerationParams,
    GenerationResult, Message, Mode, ModeCatalog, ReloadReport, ResidentAdapter, RoleInfo, TrainingEvent,
    UserContext,
)

log = logging.getLogger(__name__)

#: What the fake says produced its answers (the audit stamp's fixed parts).
FAKE_MODEL = "fake/SmolLM2"
FAKE_FINGERPRINT = "w1:" + "0f" * 16
#: The fake's sampling defaults, as EngineSettings' are for the real engines.
FAKE_SAMPLING = EffectiveSampling(max_new_tokens=384, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.1)

DEFAULT_ROLES = (
    RoleInfo("assistant", "Assistant", "A helpful assistant", ("en", "ru")),
    RoleInfo("lawyer", "Lawyer", "Explains legal questions", ("en", "ru"), "legal"),
    RoleInfo("doctor", "Doctor", "Explains medical questions", ("en", "ru"), "medical"),
    RoleInfo("financial_analyst", "Financial analyst", "Explains money matters", ("en", "ru"), "finance"),
)


@dataclass
class Script:
    """One scripted reply. `gate`: the first piece waits for it (tests control timing without clocks)."""

    text: str | None = None
    pieces: list[str] | None = None
    delay: float = 0.0
    error: BaseException | None = None  # raised from the first __anext__
    fail_after: int | None = None  # raise EngineError after this many pieces
    gate: asyncio.Event | None = None
    stepped: bool = False  # every piece after the first waits for allow(): a test paces the model
    finish_reason: str = "stop"
    _steps: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))

    def allow(self, n: int = 1) -> None:
        """Let `n` more pieces through (stepped scripts)."""
        for _ in range(n):
            self._steps.release()


@dataclass
class Call:
    messages: list[Message]
    mode: Mode
    params: GenerationParams | None
    user: UserContext | None
    stream: "FakeStream"


def echo_reply(messages: list[Message], mode: Mode) -> str:
    question = messages[-1].content if messages else ""
    return f"[{mode.key}] answer to: {question}"


def word_pieces(text: str) -> list[str]:
    """Split like a tokenizer would stream: words with their leading whitespace."""
    return re.findall(r"\s*\S+|\s+$", text) or [text]


class FakeStream:
    def __init__(self, engine: "FakeEngine", script: Script, text: str, mode: Mode, version: str | None,
                 stamp: AuditStamp | None = None, limit: int | None = None) -> None:
        self._engine = engine
        self._script = script
        self._pieces = deque(script.pieces if script.pieces is not None else word_pieces(text))
        self._limit = limit  # like a real engine's max_new_tokens: never more pieces (tokens) than this
        self._sent = 0
        self._started = False
        self._done = False
        self._t0 = time.monotonic()
        self.closed = False
        self.result = GenerationResult(adapter=mode.adapter, adapter_version=version, role=mode.role, stamp=stamp)

    def __aiter__(self) -> "FakeStream":
        return self

    async def __anext__(self) -> str:
        if self._done or self.closed:
            raise StopAsyncIteration
        if not self._started:
            self._started = True
            self._engine.active += 1
            if self._script.error is not None:
                self._finish("error")
                raise self._script.error
            if self._script.gate is not None:
                await self._script.gate.wait()
        if self._script.fail_after is not None and self._sent >= self._script.fail_after:
            self._finish("error")
            raise EngineError("scripted failure in the middle of a stream")
        if not self._pieces:
            self._finish(self._script.finish_reason)
            raise StopAsyncIteration
        if self._limit is not None and self._sent >= self._limit:
            self._finish("length")
            raise StopAsyncIteration
        if self._script.stepped and self._sent > 0:
            await self._script._steps.acquire()
        if self._script.delay:
            await asyncio.sleep(self._script.delay)
        piece = self._pieces.popleft()
        if self._sent == 0:
            self.result.time_to_first_token_s = time.monotonic() - self._t0
        self._sent += 1
        self.result.text += piece
        self.result.completion_tokens += 1
        self._engine.tokens_generated += 1
        return piece

    def _finish(self, reason: str) -> None:
        if not self._done:
            self._done = True
            self.result.finish_reason = reason  # type: ignore[assignment]
            self.result.duration_s = time.monotonic() - self._t0
            if self._started:
                self._engine.active -= 1

    async def aclose(self) -> None:
        self.closed = True
        self._finish("cancelled")

    def cancel(self) -> None:
        self.closed = True
        self._finish("cancelled")


class FakeJob:
    def __init__(self, job_id: str, domain: str, events: list[TrainingEvent], gate: asyncio.Event | None,
                 pause_before: int = 1) -> None:
        self.id = job_id
        self.domain = domain
        self._events = events
        self._gate = gate
        self._pause_before = pause_before
        self.last_event: TrainingEvent | None = events[0] if events else None
        self.cancelled = asyncio.Event()

    async def events(self) -> AsyncIterator[TrainingEvent]:
        for i, ev in enumerate(self._events):
            if i == self._pause_before and self._gate is not None:
                await self._gate.wait()
            if self.cancelled.is_set():
                ev = TrainingEvent(self.id, self.domain, "cancelled", message="cancelled by admin")
                self.last_event = ev
                yield ev
                return
            self.last_event = ev
            yield ev
            await asyncio.sleep(0)


class FakeTraining:
    """The TrainingService face; events are scripted per test."""

    def __init__(self, engine: "FakeEngine") -> None:
        self._engine = engine
        self.job: FakeJob | None = None
        self.gate: asyncio.Event | None = None  # the job's events stop before event `pause_before` until set
        self.pause_before = 1
        self.exported: list[tuple[str, list[tuple[str, str]]]] = []
        self.rollbacks: list[str] = []
        self.events: list[TrainingEvent] | None = None
        self.errors: dict[str, BaseException] = {}  # method name -> what it raises (a refusal)

    def _refuse(self, method: str) -> None:
        if method in self.errors:
            raise self.errors[method]

    def default_events(self, job_id: str, domain: str, steps: int = 4) -> list[TrainingEvent]:
        evs = [TrainingEvent(job_id, domain, "queued"), TrainingEvent(job_id, domain, "started", total_steps=steps)]
        for s in range(1, steps + 1):
            evs.append(TrainingEvent(job_id, domain, "progress", step=s, total_steps=steps, loss=2.0 / s,
                                     eta_s=float(steps - s)))
        evs.append(TrainingEvent(job_id, domain, "evaluating", step=steps, total_steps=steps))
        evs.append(TrainingEvent(job_id, domain, "finished", step=steps, total_steps=steps, version="v2",
                                 promoted=True, metrics={"eval_loss": 1.5, "eval_loss_base": 2.5,
                                                         "eval_perplexity": 4.48}))
        return evs

    async def start(self, domain: str, requested_by: str | None = None) -> FakeJob:
        if domain not in self._engine.versions:
            raise AdapterNotFound(f"no adapter {domain!r}")
        if domain == "empty":
            raise NoTrainingData(f"adapters/{domain}/data has no usable rows")
        if self.job is not None and (self.job.last_event is None or not self.job.last_event.final):
            raise TrainingBusy(f"training {self.job.domain} is running")
        job_id = f"job{len(self.exported) + 1}-{domain}"
        events = self.events if self.events is not None else self.default_events(job_id, domain)
        self.job = FakeJob(job_id, domain, events, self.gate, self.pause_before)
        return self.job

    def current(self) -> FakeJob | None:
        return self.job if self.job and self.job.last_event and not self.job.last_event.final else None

    async def cancel(self) -> FakeJob | None:
        job = self.current()
        if job is not None:
            job.cancelled.set()
            if self.gate is not None:
                self.gate.set()
        return job

    async def rollback(self, domain: str) -> str:
        self._refuse("rollback")
        if domain not in self._engine.versions:
            raise AdapterNotFound(f"no adapter {domain!r}")
        self.rollbacks.append(domain)
        return "v1"

    async def promote(self, domain: str, version: str) -> str:
        self._refuse("promote")
        if domain not in self._engine.versions:
            raise AdapterNotFound(f"no adapter {domain!r}")
        self._engine.on_disk.setdefault(domain, {})[version] = "promoted"
        self._engine.versions[domain] = version
        return version

    async def export_examples(self, domain: str, pairs: list[tuple[str, str]]) -> int:
        self._refuse("export_examples")
        self.exported.append((domain, list(pairs)))
        return len(pairs)


class _Unavailable:
    def __getattr__(self, name: str) -> Any:
        raise NotImplementedError("training is not wired in this engine")


class FakeEngine:
    """Scripted stand-in for `engine.Engine`; see the module docstring."""

    def __init__(
        self, adapters: tuple[str, ...] = ("legal", "medical", "finance"),
        roles: tuple[RoleInfo, ...] = DEFAULT_ROLES, *, training: str = "fake",
        default_delay: float = 0.0, default_pieces: list[str] | None = None, start_s: float = 0.0,
    ) -> None:
        self.versions: dict[str, str] = {a: "v1" for a in adapters}  # domain -> serving version
        #: domain -> version -> meta.json status ("promoted" | "candidate"): the versions "on disk"
        self.on_disk: dict[str, dict[str, str]] = {a: {"v1": "promoted"} for a in adapters}
        self.held: dict[str, tuple[str, ...]] = {}  # what hold() keeps resident, per domain
        #: (domain, version) -> the reason hold() and generate() refuse it (a version that fails to load)
        self.refused_versions: dict[tuple[str, str], str] = {}
        #: like MAX_NEW_TOKENS: a stream ends with "length" after this many pieces; None = scripts are never cut
        self.max_new_tokens: int | None = None
        #: domains on disk whose current version does not serve: name -> the engine's reason
        self.broken: dict[str, str] = {}
        self.start_s = start_s  # start() blocks a worker thread this long, like loading a model
        self.roles = roles
        self.calls: list[Call] = []
        self.scripts: deque[Script] = deque()
        self.default_delay = default_delay
        self.default_pieces = default_pieces
        self.metrics = EngineMetrics()
        self.started = False
        self.closed = False
        self.active = 0
        self.tokens_generated = 0
        self._t0 = time.monotonic()
        self._training_kind = training
        self._training = FakeTraining(self)

    @property
    def training(self) -> Any:
        if self._training_kind == "none":
            return None
        if self._training_kind == "raises":
            return _Unavailable()
        return self._training

    def add_version(self, domain: str, version: str, status: str = "candidate") -> None:
        """A version appears on disk (what training writes); a candidate unless `status` says otherwise."""
        self.on_disk.setdefault(domain, {})[version] = status

    def drop_version(self, domain: str, version: str) -> None:
        """A version disappears from disk (an operator deleted a candidate)."""
        self.on_disk.get(domain, {}).pop(version, None)
        self.held[domain] = tuple(v for v in self.held.get(domain, ()) if v != version)

    def script(self, text: str | None = None, **kw: Any) -> Script:
        s = Script(text=text, **kw)
        self.scripts.append(s)
        return s

    async def start(self) -> None:
        if self.start_s:
            log.info("fake engine: loading for %.1f s", self.start_s)
            await asyncio.to_thread(time.sleep, self.start_s)
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def _state(self, name: str, version: str) -> str | None:
        if (name, version) in self.refused_versions:
            return "failed"
        return "ready" if version == self.versions.get(name) or version in self.held.get(name, ()) else None

    def modes(self) -> ModeCatalog:
        adapters = tuple(
            AdapterInfo(name, current, tuple(
                AdapterVersionInfo(name, v, metrics={"eval_loss": 1.25}, is_current=v == current,
                                   state=self._state(name, v), candidate=status == "candidate" and v != current)
                for v, status in sorted(self.on_disk.get(name, {current: "promoted"}).items(),
                                        key=lambda kv: int(kv[0][1:]) if kv[0][1:].isdigit() else 0)
            ))
            for name, current in sorted(self.versions.items())
        ) + tuple(
            AdapterInfo(name, None, (AdapterVersionInfo(name, "v1", state="failed"),), error)
            for name, error in sorted(self.broken.items())
        )
        return ModeCatalog(adapters=adapters, roles=self.roles)

    def generate(
        self, messages: list[Message], mode: Mode, params: GenerationParams | None = None, *,
        user: UserContext | None = None,
    ) -> FakeStream:
        if self.closed:
            raise EngineClosed("engine is closed")
        if mode.adapter is not None and mode.adapter not in self.versions:
            raise AdapterNotFound(f"no adapter {mode.adapter!r}")
        if not any(r.id == mode.role for r in self.roles):
            raise TemplateNotFound(f"no role template {mode.role!r}")
        version = self._version(mode, params)
        script = self.scripts.popleft() if self.scripts else Script(delay=self.default_delay,
                                                                     pieces=self.default_pieces)
        text = script.text if script.text is not None else echo_reply(messages, mode)
        limit = (params.max_new_tokens if params is not None else None) or self.max_new_tokens
        stream = FakeStream(self, script, text, mode, version, self._stamp(mode, version, params, user), limit)
        self.calls.append(Call(list(messages), mode, params, user, stream))
        return stream

    def _version(self, mode: Mode, params: GenerationParams | None) -> str | None:
        """The version a request is answered with: the serving one, or the one it pins (an A/B)."""
        pinned = params.adapter_version if params is not None else None
        if pinned is None:
            return self.versions.get(mode.adapter or "")
        if mode.adapter is None:
            raise EngineError(f"adapter_version={pinned!r} needs an adapter in the mode")
        if pinned not in self.on_disk.get(mode.adapter, {}):
            raise AdapterNotFound(f"adapter {mode.adapter} has no version {pinned!r}")
        if (mode.adapter, pinned) in self.refused_versions:
            raise AdapterInvalid(self.refused_versions[(mode.adapter, pinned)])
        return pinned

    def _stamp(self, mode: Mode, version: str | None, params: GenerationParams | None,
               user: UserContext | None) -> AuditStamp:
        p = params or GenerationParams()
        d = FAKE_SAMPLING
        language = user.language if user is not None else "en"
        return AuditStamp(
            base_model=FAKE_MODEL, base_fingerprint=FAKE_FINGERPRINT, adapter=mode.adapter, adapter_version=version,
            template=mode.role, template_hash=hashlib.sha256(f"{mode.role}.{language}.j2".encode()).hexdigest(),
            sampling=EffectiveSampling(
                max_new_tokens=p.max_new_tokens or self.max_new_tokens or d.max_new_tokens,
                temperature=d.temperature if p.temperature is None else p.temperature,
                top_p=p.top_p or d.top_p, top_k=d.top_k if p.top_k is None else p.top_k,
                repetition_penalty=p.repetition_penalty or d.repetition_penalty, seed=p.seed,
            ),
            backend="local", quantization="nf4", template_language=language,
        )

    async def hold(self, name: str, versions: Sequence[str] = ()) -> tuple[ResidentAdapter, ...]:
        if name not in self.versions:
            raise AdapterNotFound(f"no adapter {name!r}")
        for v in versions:
            if v not in self.on_disk.get(name, {}):
                raise AdapterNotFound(f"adapter {name} has no version {v!r}")
            if (name, v) in self.refused_versions:
                raise AdapterInvalid(self.refused_versions[(name, v)])
        self.held[name] = tuple(versions)
        return tuple(ResidentAdapter(name, v, "ready", 1_000_000, 1_000_000, 0) for v in versions)

    async def reload(self, name: str | None = None) -> ReloadReport:
        names = [name] if name else list(self.versions) + list(self.broken)
        report = ReloadReport()
        for n in names:
            if n not in self.versions:
                report.failed[n] = self.broken.get(n, "not found")
                continue
            report.unchanged[n] = self.versions[n]
        return report

    def status(self) -> EngineStatus:
        problems = () if self.roles else ("no role template can be rendered (TEMPLATES_DIR='fake')",)
        return EngineStatus(
            model="fake/SmolLM2", quantization="nf4", device="cpu", dtype="float32", model_bytes=100_000_000,
            process_rss_bytes=300_000_000, gpu_allocated_bytes=None,
            adapters=tuple(ResidentAdapter(n, v, "ready", 1_000_000, 1_000_000, 0) for n, v in self.versions.items())
            + tuple(ResidentAdapter(n, v, "ready", 1_000_000, 1_000_000, 0)
                    for n, held in self.held.items() for v in held if v != self.versions.get(n)),
            queue_depth=0, active_requests=self.active, tokens_generated=self.tokens_generated,
            uptime_s=time.monotonic() - self._t0, ready=self.started and not self.closed and not problems,
            problems=problems,
        )


def factory(settings: object = None) -> FakeEngine:
    """ENGINE_FACTORY target: FAKE_ENGINE_DELAY_S per piece, FAKE_ENGINE_PIECES pieces per answer,
    FAKE_ENGINE_NO_ROLES=1 for an engine whose templates all failed, FAKE_ENGINE_START_S of loading in
    start()."""
    delay = float(os.environ.get("FAKE_ENGINE_DELAY_S", "0"))
    n = os.environ.get("FAKE_ENGINE_PIECES")
    pieces = [f" word{i}" for i in range(int(n))] if n else None
    roles = () if os.environ.get("FAKE_ENGINE_NO_ROLES") else DEFAULT_ROLES
    return FakeEngine(roles=roles, default_delay=delay, default_pieces=pieces,
                      start_s=float(os.environ.get("FAKE_ENGINE_START_S", "0")))
