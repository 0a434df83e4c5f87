"""The adapter book: which version serves each domain, which versions are kept beside it, and
how many requests use each — the same book for the local engine and for vLLM replicas.

The two backends differ only in what *loading* a version means (a LoRA slot in memory:
`engine.adapters.registry`; a registration on every replica: `engine.vllm.fleet`), so the
lifecycle and the reports live here once:

- a version's life: `loading` -> `ready` (new requests may use it) -> `retired` (a newer one
  took over, it was let go or evicted; requests that started on it finish on it) -> freed by
  its owner once its last request ended;
- a domain's *serving* version is what a request without a pin gets; versions *held* beside it
  (an A/B's candidate) are never let go while held; `errors` keeps why a domain's version is
  not serving, `failed` why a version did not load (the catalog shows both);
- a request holds its version from admission to its end (`use` / `release`), so a switch
  never changes the adapter under a running answer.

Plain data: the owner serialises access (the registry's lock, the vLLM engine's event loop).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

from engine.adapters.store import AdapterStore, catalog, version_name
from engine.errors import AdapterInvalid, AdapterNotFound
from engine.types import AdapterInfo, AdapterState, ReloadReport, ResidentAdapter

log = logging.getLogger(__name__)


@dataclass(eq=False)
class BookVersion:
    """One version of a domain's adapter where it is loaded (in memory, or on the replicas)."""

    domain: str
    version: str
    state: AdapterState = "loading"
    in_flight: int = 0  # requests answering with it now
    file_bytes: int = 0
    bytes: int = 0  # memory it takes where it is loaded (0 where the backend cannot say)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> str:
        return version_name(self.domain, self.version)


class AdapterBook:
    """Serving pointers, held sets, errors, and every version tracked, by `version_name`."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        self.serving: dict[str, str] = {}  # domain -> the version new requests use
        self.versions: dict[str, BookVersion] = {}  # version_name -> version (loading, ready, retired)
        self.errors: dict[str, str] = {}  # domain -> why its current version is not serving
        self.failed: dict[str, str] = {}  # version_name -> why it did not load, the last time it was tried
        self.held: dict[str, frozenset[str]] = {}  # domain -> versions kept beside the serving one

    # ---- lookups --------------------------------------------------------------------------------
    def get(self, domain: str, version: str) -> BookVersion | None:
        return self.versions.get(version_name(domain, version))

    def serving_entry(self, domain: str) -> BookVersion | None:
        """The tracked serving version of `domain` (None: none serves, or it is not loaded now)."""
        version = self.serving.get(domain)
        return None if version is None else self.get(domain, version)

    def needed(self, v: BookVersion) -> bool:
        """`v` serves its domain or is held: it stays loaded whatever requests do."""
        return self.serving.get(v.domain) == v.version or v.version in self.held.get(v.domain, ())

    # ---- requests -------------------------------------------------------------------------------
    def use(self, v: BookVersion) -> BookVersion:
        """A new request answers with `v` until `release`."""
        v.in_flight += 1
        v.last_used = time.monotonic()
        return v

    def release(self, v: BookVersion) -> bool:
        """One request on `v` ended; True when no request uses it and it is neither serving nor held."""
        v.in_flight -= 1
        return v.in_flight <= 0 and not self.needed(v)

    # ---- changes --------------------------------------------------------------------------------
    def make_serving(self, domain: str, version: str) -> BookVersion | None:
        """`version` now serves `domain`; returns the version it replaced if that one is now
        retired (its owner frees it once no request uses it), else None."""
        old = self.serving.get(domain)
        self.serving[domain] = version
        self.errors.pop(domain, None)
        if old is None or old == version:
            return None
        log.info("adapter %s now serves %s (was %s)", domain, version, old)
        prev = self.get(domain, old)
        if prev is None or prev.state != "ready" or self.needed(prev):
            return None
        prev.state = "retired"
        return prev

    def hold(self, domain: str, versions: Iterable[str]) -> frozenset[str]:
        """Hold exactly `versions` of `domain`; returns the versions held before."""
        before = self.held.pop(domain, frozenset())
        wanted = frozenset(versions)
        if wanted:
            self.held[domain] = wanted
        return before

    def let_go(self, domain: str, before: Iterable[str]) -> list[BookVersion]:
        """Of the versions held `before`, those now neither held nor serving: retired, for their
        owner to free once no request uses them."""
        out = []
        for version in before:
            v = self.get(domain, version)
            if v is not None and v.state == "ready" and not self.needed(v):
                v.state = "retired"
                out.append(v)
        return out

    # ---- reports --------------------------------------------------------------------------------
    def not_found(self, domain: str) -> str:
        known = ", ".join(sorted(self.serving)) or "none"
        return f"no adapter {domain!r} is serving (available: {known}; folder {self.store.root})"

    def resident(self) -> list[ResidentAdapter]:
        return [ResidentAdapter(v.domain, v.version, v.state, v.bytes, v.file_bytes, v.in_flight)
                for v in sorted(self.versions.values(), key=lambda v: v.key)]

    def catalog(self) -> list[AdapterInfo]:
        states: dict[str, AdapterState] = {k: "failed" for k in self.failed}
        states.update((k, v.state) for k, v in self.versions.items())
        return catalog(self.store, dict(self.serving), states, dict(self.errors))


async def reload_report(name: str | None, store: AdapterStore, templates: Any,
                        reload_one: Callable[[str], Awaitable[str]],
                        serving: Callable[[str], str | None]) -> ReloadReport:
    """Either engine's `reload`: `reload_one` each domain (`name`, or every one plus the
    templates); a refusal goes into the report and the domain keeps serving what it served."""
    report = ReloadReport()
    if name is None:
        report.templates.update(await asyncio.to_thread(templates.refresh, True))
    for domain in [name] if name else store.domains():
        before = serving(domain)
        try:
            version = await reload_one(domain)
        except (AdapterNotFound, AdapterInvalid) as exc:
            report.failed[domain] = str(exc)
            continue
        (report.unchanged if before == version else report.loaded)[domain] = version
    return report
