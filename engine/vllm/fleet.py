"""The replicas: their states, which adapters each holds, routing, and keeping them in line.

A replica is `starting` until first checked, `registering` while the adapters it must hold are
put on it, `ready` when it takes requests, `down` after a failure (left out for VLLM_RETRY_AFTER_S,
then checked again) and `incompatible` when it cannot serve this bot (another base model, a
context shorter than CONTEXT_TOKENS, runtime LoRA loading off, a bad API key).

Adapters: a switch (start, /reload, promotion, rollback), a hold or a pin registers the version
on every ready replica before anything routes to it; a replica that comes back, or restarted
and lost its adapters, gets the wanted set (`LoraBook.wanted`) before it takes requests again.
Switches, registrations and unloads are serialised by one lock, so a replica never misses a
version switched in while it was coming back.

Routing: the ready replica holding the request's adapter with the fewest requests in flight
(ties: the one that has had fewest requests).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from engine.errors import AdapterInvalid, EngineError
from engine.types import ReplicaState, ReplicaStatus
from engine.vllm.client import AdapterLoadFailed, LoraDisabled, ReplicaClient, ReplicaRejected, ReplicaUnavailable
from engine.vllm.lora import LORA_NAME_RE, LoraBook, LoraVersion
from engine.vllm.metrics import ReplicaMetrics

log = logging.getLogger(__name__)


class Incompatible(EngineError):
    """The replica runs, but cannot serve this bot (the message says what to change)."""


@dataclass
class Replica:
    client: ReplicaClient
    state: ReplicaState = "starting"
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    error: str | None = None
    out_until: float = 0.0
    registered: set[str] = field(default_factory=set)  # our adapter names it holds

    @property
    def url(self) -> str:
        return self.client.url

    def status(self) -> ReplicaStatus:
        retry = None
        if self.state in ("down", "incompatible"):
            retry = max(0.0, self.out_until - time.monotonic())
        return ReplicaStatus(self.url, self.state, self.in_flight, len(self.registered), self.requests,
                             self.failures, self.error, retry)


def _lora_disabled(r: "Replica", exc: LoraDisabled) -> str:
    return (f"{r.url} cannot load adapters: {exc.detail} (start vLLM with --enable-lora and --max-lora-rank at "
            "least the adapters' rank)")


def _ours(cards: list[dict]) -> set[str]:
    """Our adapters' names among a replica's /v1/models cards."""
    return {str(c["id"]) for c in cards if c.get("parent") and LORA_NAME_RE.match(str(c["id"]))}


def _hint(message: str, v: LoraVersion) -> str:
    """What to change, for the refusals an operator can fix on the replicas."""
    if "max_lora_rank" in message:
        return f" (start the replicas with --max-lora-rank {v.rank} or more)"
    if "No adapter found" in message:  # vLLM hides the path in its answer: say which one it was asked for
        return f" (it was asked for {v.path}: do the replicas see the adapters folder at VLLM_ADAPTERS_DIR?)"
    return ""


class Fleet:
    def __init__(self, replicas: list[Replica], book: LoraBook, *, model: str, context_tokens: int,
                 retry_after_s: float, max_in_flight: int, metrics: ReplicaMetrics) -> None:
        self.replicas = replicas
        self.book = book
        self.model = model  # the served model name every replica must list
        self.context_tokens = context_tokens
        self.retry_after_s = retry_after_s
        self.max_in_flight = max_in_flight
        self.metrics = metrics
        self.lock = asyncio.Lock()
        for r in replicas:
            metrics.set_state(r.url, r.state)

    # ---- states -------------------------------------------------------------------------------
    def _set(self, r: Replica, state: ReplicaState, error: str | None = None) -> None:
        if state in ("down", "incompatible"):
            r.out_until = time.monotonic() + self.retry_after_s
            if r.state != state or r.error != error:
                log.warning("replica %s is %s: %s", r.url, state, error)
            if r.state != state:  # taken out (again): not every failed re-check of one outage
                r.failures += 1
                self.metrics.failures.labels(r.url).inc()
        elif state == "ready" and r.state != "ready":
            log.info("replica %s is ready (%d adapters registered)", r.url, len(r.registered))
        r.state, r.error = state, error
        self.metrics.set_state(r.url, state)

    def take_out(self, r: Replica, reason: str) -> None:
        """A request or a check failed on `r`: no requests go there for a while."""
        self._set(r, "down", reason)

    def ready(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == "ready"]

    # ---- routing ------------------------------------------------------------------------------
    def pick(self, key: str | None, exclude: set[str]) -> Replica | None:
        """The replica for a request on adapter `key` (None: the base model), or None."""
        candidates = [r for r in self.ready() if r.url not in exclude and r.in_flight < self.max_in_flight
                      and (key is None or key in r.registered)]
        if not candidates:
            return None
        return min(candidates, key=lambda r: (r.in_flight, r.requests))

    def acquire(self, r: Replica) -> None:
        r.in_flight += 1
        r.requests += 1
        self.metrics.in_flight.labels(r.url).set(r.in_flight)

    def release(self, r: Replica, outcome: str) -> None:
        r.in_flight -= 1
        self.metrics.in_flight.labels(r.url).set(r.in_flight)
        self.metrics.requests.labels(r.url, outcome).inc()

    def why_none(self, key: str | None) -> str:
        """Why `pick` found nothing, for the log and the EngineBusy message."""
        parts = []
        for r in self.replicas:
            if r.state != "ready":
                parts.append(f"{r.url} {r.state}" + (f" ({r.error})" if r.error else ""))
            elif r.in_flight >= self.max_in_flight:
                parts.append(f"{r.url} full ({r.in_flight} in flight, VLLM_MAX_IN_FLIGHT={self.max_in_flight})")
            elif key is not None and key not in r.registered:
                parts.append(f"{r.url} lacks {key}")
            else:
                parts.append(f"{r.url} failed this request")
        return "; ".join(parts)

    # ---- checking and bringing in -------------------------------------------------------------
    async def probe(self, r: Replica) -> set[str]:
        """Check `r` can serve this bot; returns the names of our adapters it holds."""
        try:
            cards = await r.client.models()
        except ReplicaRejected as exc:
            if exc.status in (401, 403):
                raise Incompatible(f"{r.url} refused the API key (VLLM_API_KEY): {exc.detail}") from exc
            raise ReplicaUnavailable(str(exc)) from exc
        base = next((c for c in cards if c.get("id") == self.model), None)
        if base is None:
            served = ", ".join(str(c["id"]) for c in cards if not c.get("parent")) or "nothing"
            raise Incompatible(f"{r.url} serves {served}, not {self.model!r}: start vLLM with "
                               f"--served-model-name {self.model} (or set VLLM_MODEL / MODEL to match)")
        max_len = base.get("max_model_len")
        if isinstance(max_len, int) and max_len < self.context_tokens:
            raise Incompatible(f"{r.url} has max_model_len {max_len}, below CONTEXT_TOKENS={self.context_tokens}: "
                               f"start vLLM with --max-model-len {self.context_tokens} or lower CONTEXT_TOKENS")
        if not await r.client.runtime_lora_updating():
            raise Incompatible(f"{r.url} cannot load adapters at run time: start vLLM with --enable-lora and the "
                               "environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
        return _ours(cards)

    async def bring_in(self, r: Replica) -> None:
        """Probe `r`, give it the wanted adapters, drop ours it should not hold; then ready.

        A version it could not load for an engine error of no known cause is left off it (its
        requests go to replicas that have it) and tried again at the next health check.
        Hold `self.lock`."""
        try:
            held = await self.probe(r)
            if r.state == "ready" and r.registered - held:
                self._set(r, "registering", None)  # it restarted: no requests while its adapters are put back
            r.registered = set(held)
            for v in self.book.wanted():
                if v.key not in r.registered:
                    await self._register_one(r, v)
            keep = self.book.keep()
            for name in sorted(r.registered - keep):
                await r.client.unload_adapter(name)
                r.registered.discard(name)
                log.info("replica %s: unloaded %s (not serving)", r.url, name)
        except Incompatible as exc:
            self._set(r, "incompatible", str(exc))
            return
        except (ReplicaUnavailable, ReplicaRejected) as exc:
            self._set(r, "down", str(exc))
            return
        self._set(r, "ready", None)

    async def _register_one(self, r: Replica, v: LoraVersion) -> None:
        """Put `v` on `r`. A refusal is the replica's fault when another replica holds `v`
        (or the message says so); otherwise `v` is refused everywhere."""
        try:
            await self._load(r, v)
        except AdapterLoadFailed as exc:  # not the adapter's fault as far as anyone can tell: try again later
            log.error("replica %s: adapter %s not registered for now, tried again at the next check: %s",
                      r.url, v.key, exc)
            return
        except LoraDisabled as exc:
            raise Incompatible(_lora_disabled(r, exc)) from exc
        except ReplicaRejected as exc:
            if any(o is not r and o.state == "ready" and v.key in o.registered for o in self.replicas):
                raise Incompatible(f"{r.url} refused adapter {v.key}, which other replicas serve: {exc.detail}") \
                    from exc
            reason = f"adapter {v.domain}/{v.version} was refused by {r.url}: {exc.detail}{_hint(exc.detail, v)}"
            log.error("%s", reason)
            self.book.refuse(v, reason)

    async def check(self, r: Replica) -> None:
        """One health round for `r` (the health loop runs it for every replica)."""
        if r.state in ("down", "incompatible", "starting"):
            if r.state != "starting" and time.monotonic() < r.out_until:
                return
            async with self.lock:
                await self.bring_in(r)
            return
        if r.state != "ready":
            return
        try:
            cards = await r.client.models()
        except (ReplicaUnavailable, ReplicaRejected) as exc:
            self.take_out(r, str(exc))
            return
        held = _ours(cards)
        missing = {v.key for v in self.book.wanted() if v.state == "ready"} - held
        stale = held - self.book.keep()
        if missing:
            log.warning("replica %s lacks %s (restarted, or a load failed): registering its adapters again",
                        r.url, ", ".join(sorted(missing)))
        if missing or stale:
            async with self.lock:
                await self.bring_in(r)

    async def watch(self, interval_s: float) -> None:
        """The health loop: check every replica, every `interval_s` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            results = await asyncio.gather(*(self.check(r) for r in self.replicas), return_exceptions=True)
            for r, res in zip(self.replicas, results):
                if isinstance(res, Exception):
                    log.error("checking replica %s failed", r.url, exc_info=res)

    async def recover(self, r: Replica) -> None:
        """A request found `r` without its adapter: it restarted. Register again, now."""
        async with self.lock:
            if r.state == "ready":
                await self.bring_in(r)

    # ---- switching versions -------------------------------------------------------------------
    async def switch(self, v: LoraVersion) -> None:
        """Register `v` on every ready replica, then make it serve; else raise and change nothing.

        The version it replaces is retired and unloaded once its last request ends (unless held).
        """
        async with self.lock:
            known = self.book.versions.get(v.key)
            was = known.state if known is not None else None  # "retired": a rollback to one still in use
            v = self.book.track(v)
            refusals = await self._load_everywhere(v)
            if refusals:
                if was == "retired":
                    v.state = "retired"
                elif self.book.serving_entry(v.domain) is not v:
                    self.book.forget(v)
                raise AdapterInvalid(f"adapter {v.domain}/{v.version} was refused by the replicas: "
                                     + "; ".join(refusals))
            if not self.ready():
                log.warning("no replica is ready: %s serves from now on, registered when replicas come back", v.key)
            old = self.book.serve(v)
        if old is not None and old.in_flight <= 0:
            await self.unload_everywhere(old)

    async def register(self, v: LoraVersion) -> None:
        """Put `v` (tracked by the book: held, or pinned by a request) on every ready replica that
        lacks it; on a refusal take back what this call put on, mark `v` failed, raise
        AdapterInvalid. Serving pointers are left alone: a candidate cannot break its domain."""
        async with self.lock:
            refusals = await self._load_everywhere(v)
            if refusals:
                if not self.book.needed(v):
                    v.state = "failed"
                    self.book.forget(v)
                raise AdapterInvalid(f"adapter {v.domain}/{v.version} was refused by the replicas: "
                                     + "; ".join(refusals))
            if v.state in ("loading", "failed"):
                v.state = "ready"

    async def _load_everywhere(self, v: LoraVersion) -> list[str]:
        """Load `v` on every ready replica lacking it; the refusals (what this call put on is
        then taken back). A replica that fails or cannot load adapters at all is taken out.
        Hold `self.lock`."""
        targets = [r for r in self.ready() if v.key not in r.registered]
        results = await asyncio.gather(*(self._load(r, v) for r in targets), return_exceptions=True)
        refusals, loaded = [], []
        for r, res in zip(targets, results):
            if isinstance(res, LoraDisabled):  # the replica's set-up, not the version: leave it out
                self._set(r, "incompatible", _lora_disabled(r, res))
            elif isinstance(res, AdapterLoadFailed):  # an engine error, retried: nothing switches, nothing is out
                refusals.append(f"{r.url}: {res.args[0]} (vLLM failed, not the adapter as far as it says; "
                                f"/reload {v.domain} tries again)")
            elif isinstance(res, ReplicaUnavailable):
                self.take_out(r, str(res))  # it gets the wanted set when it comes back
            elif isinstance(res, ReplicaRejected):
                refusals.append(f"{r.url}: {res.detail}{_hint(res.detail, v)}")
            elif isinstance(res, BaseException):
                raise res
            else:
                loaded.append(r)
        if refusals:
            for r in loaded:  # take back what this call put on; nothing else changes
                await self._unload(r, v.key)
        return refusals

    async def _load(self, r: Replica, v: LoraVersion) -> None:
        try:
            await r.client.load_adapter(v.key, v.path)
        except ReplicaRejected:
            self.metrics.adapter_loads.labels(r.url, "refused").inc()
            raise
        except ReplicaUnavailable:  # AdapterLoadFailed included
            self.metrics.adapter_loads.labels(r.url, "failed").inc()
            raise
        self.metrics.adapter_loads.labels(r.url, "ok").inc()
        r.registered.add(v.key)
        log.info("replica %s: registered %s from %s", r.url, v.key, v.path)

    async def _unload(self, r: Replica, key: str) -> None:
        try:
            await r.client.unload_adapter(key)
        except (ReplicaUnavailable, ReplicaRejected) as exc:
            log.warning("replica %s: could not unload %s (%s); it is dropped when the replica is checked", r.url,
                        key, exc)
            return
        r.registered.discard(key)
        log.info("replica %s: unloaded %s", r.url, key)

    async def unload_everywhere(self, v: LoraVersion) -> None:
        """`v` is retired and no request uses it: take it off every replica."""
        async with self.lock:
            if v.key in self.book.keep():
                return  # it came back (a rollback) or a request took it meanwhile
            for r in self.replicas:
                if v.key in r.registered:
                    await self._unload(r, v.key)
            self.book.forget(v)
