"""The adapter registry: the adapter book (engine.adapters.book) of the versions in memory.

Requests pick their adapter per row at admission (`acquire`), so two users of different modes
never race over a global `set_adapter`. Least recently used versions are evicted past
MAX_RESIDENT_ADAPTERS, held ones never.

Threads: validation and loading run on one loader thread, concurrently with the model
thread's decode steps, so a hot-load does not pause anyone: the fast path copies a version
into a free LoRA slot, which no running row reads. A runtime whose loads change the model
itself (the reference path's peft) says so (`needs_exclusive`), and its loads run on the
model thread between two steps through `run_exclusive`.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Executor, Future
from typing import Any, Callable, Sequence

from engine.adapters.book import AdapterBook, BookVersion
from engine.adapters.store import AdapterStore, VersionDir, version_name
from engine.adapters.validate import validate
from engine.errors import AdapterInvalid, AdapterNotFound, ConfigError
from engine.metrics import EngineMetrics
from engine.types import BASE_ADAPTER, AdapterInfo, ResidentAdapter

log = logging.getLogger(__name__)


class AdapterRegistry:
    """Serving pointers per domain plus the versions resident in memory.

    `run_exclusive(fn)` must run `fn` on the model thread between steps and return a Future;
    `loader` runs validation, loads and frees, one at a time.
    """

    def __init__(
        self,
        store: AdapterStore,
        runtime: Any,  # engine.serving.runner.FastRuntime or engine.reference.ReferenceRuntime
        model_id: str,
        max_resident: int,
        run_exclusive: Callable[[Callable[[], Any]], Future],
        loader: Executor,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.model_id = model_id
        self.max_resident = max_resident
        self.run_exclusive = run_exclusive
        self.metrics = metrics
        self._lock = threading.RLock()  # guards the book: the model thread, the loader and callers share it
        self.book = AdapterBook(store)  # `versions` are the ones in memory
        self._hold_lock = threading.Lock()  # one `hold` at a time: each replaces a domain's set
        self._pending: dict[str, Future] = {}  # peft name -> load in progress
        # one thread, below the model thread's priority (engine.serving.threads.BackgroundWorker):
        # loads and frees run in order, concurrently with decode steps
        self.loader = loader

    # ---- model-thread API ------------------------------------------------------------
    def acquire(self, domain: str | None, version: str | None = None) -> tuple[str, str | None] | None:
        """The peft name + version for a new row, counting it in flight; None while loading.

        `version`: the one the request asked for (None: the domain's serving version). A
        version not resident (evicted, or never loaded) is loaded in the background on demand;
        one whose last load failed is refused with that reason.
        """
        if domain is None:
            return BASE_ADAPTER, None
        with self._lock:
            if version is None:
                version = self.book.serving.get(domain)
                if version is None:
                    raise AdapterNotFound(self.not_found(domain))
            key = version_name(domain, version)
            res = self.book.versions.get(key)
            if res is not None and res.state == "ready":
                return self.book.use(res).key, version
            if key in self.book.failed and res is None and key not in self._pending:
                raise AdapterInvalid(self.book.failed[key])
            self._load_async(self.store.version(domain, version), make_serving=False)
            return None

    def release(self, key: str) -> None:
        if key == BASE_ADAPTER:
            return
        with self._lock:
            res = self.book.versions.get(key)
            if res is None:
                return
            self.book.release(res)
            if res.state == "retired" and res.in_flight <= 0:
                self._free_async(res)

    # ---- loading -------------------------------------------------------------------
    def load_all(self) -> dict[str, str]:
        """At start: load every domain's current version (blocking). Returns failures."""
        futures = {}
        for domain in self.store.domains():
            current = self.store.current(domain)
            if current is not None:
                futures[domain] = self._load_async(self.store.version(domain, current), make_serving=True)
        failures = {}
        for domain, fut in futures.items():
            try:
                fut.result()
            except Exception as exc:
                failures[domain] = str(exc)
        return failures

    def reload(self, domain: str) -> Future:
        """Load the disk's `current` version of a domain and make it serve new requests; the
        Future resolves to the version now serving, or raises (the previous one keeps serving)."""
        current = self.store.current(domain)  # AdapterNotFound: a bad name
        if current is None:
            return _settled(error=AdapterNotFound(self.not_found(domain)))
        with self._lock:
            res = self.book.versions.get(version_name(domain, current))
            if self.book.serving.get(domain) == current and res is not None and res.state == "ready":
                return _settled(current)
        try:
            version = self.store.version(domain, current)
        except AdapterNotFound as exc:
            return _settled(error=exc)
        return self._load_async(version, make_serving=True)

    def hold(self, domain: str, versions: Sequence[str]) -> list[ResidentAdapter]:
        """`EngineFace.hold`, blocking. Held versions count toward MAX_RESIDENT_ADAPTERS and must
        leave room there for one more, or the serving versions would push each other out on
        every load."""
        with self._hold_lock:
            wanted = tuple(dict.fromkeys(versions))
            dirs = [self.store.version(domain, v) for v in wanted]  # AdapterNotFound, checked names
            with self._lock:
                previous = self.book.held.get(domain, frozenset())
                serving = self.book.serving.get(domain)
                extra = sum(len(vs - {self.book.serving.get(d)}) for d, vs in self.book.held.items() if d != domain)
                extra += sum(v != serving for v in wanted)
                if extra > self.max_resident - 1:
                    raise ConfigError(
                        f"holding {', '.join(f'{domain}/{v}' for v in wanted)} would keep {extra} versions resident "
                        f"beside the serving ones, and MAX_RESIDENT_ADAPTERS={self.max_resident} leaves room for "
                        f"{self.max_resident - 1}; raise MAX_RESIDENT_ADAPTERS")
                self.book.held[domain] = previous | set(wanted)  # while loading: neither old nor new is evicted
                for v in wanted:  # asked for again: try again
                    self.book.failed.pop(version_name(domain, v), None)
            failures = []
            for fut in [self._load_async(d, make_serving=False) for d in dirs]:
                try:
                    fut.result()
                except Exception as exc:  # the others still finish, so they are let go together
                    failures.append(exc)
            if failures:
                with self._lock:
                    self._set_held(domain, previous)
                raise failures[0]
            with self._lock:
                self._set_held(domain, frozenset(wanted))
                resident = {(a.name, a.version): a for a in self.book.resident()}
                return [resident[(domain, v)] for v in wanted]

    def _set_held(self, domain: str, versions: frozenset[str]) -> None:
        """Hold exactly `versions`; those let go that neither serve nor answer are freed."""
        for res in self.book.let_go(domain, self.book.hold(domain, versions) - versions):
            if res.in_flight <= 0:
                self._free_async(res)
            log.info("adapter %s let go", res.key)

    def _load_async(self, version: VersionDir, make_serving: bool) -> Future:
        key = version_name(version.domain, version.version)
        with self._lock:
            pending = self._pending.get(key)
            if pending is not None and not make_serving:
                return pending
            res = self.book.versions.get(key)
            if res is None or res.state in ("retired", "failed"):
                if res is not None and res.state == "retired" and res.in_flight > 0:
                    res.state = "ready"  # still in memory: revive instead of reloading
                    if make_serving:
                        self._set_serving(version.domain, version.version)
                    return _settled(version.version)
                self.book.versions[key] = BookVersion(version.domain, version.version)
            fut = self.loader.submit(self._load, version, make_serving)
            self._pending[key] = fut
            fut.add_done_callback(lambda _f, k=key: self._pending.pop(k, None))
            return fut

    def _load(self, version: VersionDir, make_serving: bool) -> str:
        key = version_name(version.domain, version.version)
        started = time.monotonic()
        with self._lock:
            res = self.book.versions.get(key)
            if res is None:  # an earlier load of it, queued first, failed
                raise AdapterInvalid(self.book.failed.get(key, f"adapter {version.domain}/{version.version} did not load"))
            already = res.state == "ready"
            serves = make_serving or self.book.serving.get(version.domain) == version.version
        if not already:
            try:
                adapter = validate(version, self.model_id, self.runtime.linear_shapes)
                if self.runtime.needs_exclusive(adapter):
                    log.info("loading %s on the model thread", key)
                    added = self.run_exclusive(lambda: self.runtime.load(adapter)).result()
                else:
                    added = self.runtime.load(adapter)
            except Exception as exc:
                with self._lock:
                    self.book.versions.pop(key, None)
                    self.book.failed[key] = str(exc)
                    if serves:  # a candidate that fails leaves the domain's serving version alone
                        self.book.errors[version.domain] = str(exc)
                if self.metrics:
                    self.metrics.adapter_loads.labels(version.domain, "failed").inc()
                log.error("adapter %s refused: %s", key, exc)
                if not isinstance(exc, (AdapterInvalid, AdapterNotFound)):
                    raise AdapterInvalid(f"adapter {version.domain}/{version.version} failed to load: {exc}") from exc
                raise
            with self._lock:
                res.state = "ready"
                res.file_bytes = adapter.file_bytes
                res.bytes = added
                res.last_used = time.monotonic()
            if self.metrics:
                self.metrics.adapter_loads.labels(version.domain, "ok").inc()
            log.info("adapter %s ready in %.0f ms (%.1f MB)", key, (time.monotonic() - started) * 1e3, added / 2**20)
        with self._lock:
            self.book.failed.pop(key, None)
            if serves:
                self.book.errors.pop(version.domain, None)
            if make_serving:
                self._set_serving(version.domain, version.version)
            self._evict_over_limit()
            self._count_resident()
        return version.version

    def _set_serving(self, domain: str, version: str) -> None:
        prev = self.book.make_serving(domain, version)
        if prev is not None and prev.in_flight <= 0:  # requests on it finish; freed when the last one does
            self._free_async(prev)

    def _evict_over_limit(self) -> None:
        ready = sorted((r for r in self.book.versions.values() if r.state == "ready"), key=lambda r: r.last_used)
        excess = len(ready) - self.max_resident
        for res in ready:
            if excess <= 0:
                break
            if res.in_flight == 0 and res.version not in self.book.held.get(res.domain, ()):
                res.state = "retired"
                self._free_async(res)
                excess -= 1
                log.info("adapter %s evicted (least recently used)", res.key)

    def _free_async(self, res: BookVersion) -> None:
        def free() -> None:
            with self._lock:
                if res.state != "retired" or res.in_flight > 0 or self.book.versions.get(res.key) is not res:
                    return
                del self.book.versions[res.key]
            self.runtime.delete(res.key)
            log.info("adapter %s freed", res.key)
            with self._lock:
                self._count_resident()

        self.loader.submit(free)

    def _count_resident(self) -> None:
        if self.metrics:
            self.metrics.resident_adapters.set(sum(r.state == "ready" for r in self.book.versions.values()))

    # ---- reporting -----------------------------------------------------------------
    def not_found(self, domain: str) -> str:
        return self.book.not_found(domain)

    def serving(self) -> dict[str, str]:
        with self._lock:
            return dict(self.book.serving)

    def resident(self) -> list[ResidentAdapter]:
        with self._lock:
            return self.book.resident()

    def catalog(self) -> list[AdapterInfo]:
        with self._lock:
            return self.book.catalog()

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Block until queued loads and frees have run (tests and shutdown)."""
        self.loader.submit(lambda: None).result(timeout=timeout)

    def close(self) -> None:
        self.loader.shutdown(wait=True, cancel_futures=True)


def _settled(result: Any = None, error: BaseException | None = None) -> Future:
    """A Future already done, for a request that has nothing to wait for."""
    fut: Future = Future()
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
    return fut
