"""Which adapter versions the replicas hold: the adapter book (engine.adapters.book) as vLLM uses it.

Bookkeeping only (no HTTP): the fleet registers and unregisters, the engine leases a version
per request. A version is `ready` once every replica that is up has it, and unloaded from them
once it is retired and its last request ended. Held versions (an A/B's candidate) are on every
replica like the serving one; a version pinned by a request and neither serving nor held is
registered for it and unloaded after its last request.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from engine.adapters.book import AdapterBook, BookVersion
from engine.adapters.store import VersionDir
from engine.errors import AdapterInvalid, AdapterNotFound

log = logging.getLogger(__name__)

#: What our names look like on a replica; anything else there is not ours to touch.
LORA_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}__v\d+\Z")


@dataclass(eq=False)
class LoraVersion(BookVersion):
    """A version as the replicas load it."""

    path: str = ""  # the version folder as the replicas see it (VLLM_ADAPTERS_DIR)
    rank: int = 0


def replica_path(version: VersionDir, store_root: Path, replicas_root: str | None) -> str:
    """Where the replicas find a version folder: the same relative path under their root."""
    if replicas_root is None:
        return str(version.path.resolve())
    relative = version.path.relative_to(store_root)  # the store builds it as <root>/<domain>/<version>
    return str(PurePosixPath(replicas_root) / PurePosixPath(*relative.parts))


class LoraBook(AdapterBook):
    """The adapter book (engine.adapters.book) with what the replicas should hold.

    Unlike memory, which the local engine keeps as a cache, a replica holds only versions that
    serve, are held, are being registered, or answer a request right now."""

    versions: dict[str, LoraVersion]  # type: ignore[assignment]

    # ---- requests ---------------------------------------------------------------------------
    def lease(self, domain: str) -> LoraVersion:
        """The serving version for a new request, counted in flight until `release`."""
        v = self.serving_entry(domain)
        if v is None:
            if domain in self.errors:
                raise AdapterInvalid(self.errors[domain])
            raise AdapterNotFound(self.not_found(domain))
        self.use(v)
        return v  # type: ignore[return-value]

    def release(self, v: BookVersion) -> bool:
        """One request on `v` ended; True when nothing keeps `v` any more (unload it): it is
        retired, or was registered for pinned requests only, and this was its last request."""
        return super().release(v) and v.state in ("ready", "retired", "failed")

    # ---- what the replicas should hold --------------------------------------------------------
    def _live(self, v: LoraVersion) -> bool:
        return v.state == "loading" or (v.state == "ready" and (self.needed(v) or v.in_flight > 0))

    def wanted(self) -> list[LoraVersion]:
        """Versions every replica that takes requests must have: the serving and held ones, one
        being registered, and one registered for pinned requests while they run. A replica
        coming back gets exactly these."""
        return [v for v in self.versions.values() if self._live(v)]

    def keep(self) -> set[str]:
        """Names no replica may drop yet: the wanted ones, and retired ones still in use (a
        request that fails over before its first token moves to a replica that has them)."""
        return {v.key for v in self.versions.values() if self._live(v) or v.in_flight > 0}

    def track(self, v: LoraVersion) -> LoraVersion:
        """Start tracking a version about to be registered (or the one already tracked)."""
        known = self.versions.get(v.key)
        if known is not None and known.state != "failed":
            if known.state == "retired":
                known.state = "loading"  # coming back (a rollback) while requests still use it
            return known
        self.versions[v.key] = v
        return v

    def serve(self, v: LoraVersion) -> BookVersion | None:
        """`v`, registered everywhere, now serves its domain (and is no longer held: it is kept
        as the serving one); returns the version it replaced if that one is now retired."""
        v.state = "ready"
        old = self.make_serving(v.domain, v.version)
        self.hold(v.domain, self.held.get(v.domain, frozenset()) - {v.version})
        return old

    def refuse(self, v: LoraVersion, reason: str) -> None:
        """`v` cannot serve; if it was serving (or about to), its domain has none now. A refused
        held version is let go, and the domain's serving version and error are left alone."""
        serving, held = self.serving.get(v.domain), self.held.get(v.domain, frozenset())
        if serving == v.version:
            del self.serving[v.domain]
        if v.version in held:
            log.error("held version %s let go: %s", v.key, reason)
            self.hold(v.domain, held - {v.version})
        elif serving is None or serving == v.version:
            self.errors[v.domain] = reason
        if v.in_flight <= 0:
            self.versions.pop(v.key, None)
        else:
            v.state = "retired"

    def forget(self, v: LoraVersion) -> None:
        """Stop tracking `v` once nothing keeps it (neither serving, held, nor in use)."""
        if self.versions.get(v.key) is v and v.in_flight <= 0 and not self.needed(v):
            del self.versions[v.key]
