"""Which adapter version serves each domain on the replicas, and which requests still use which.

Bookkeeping only (no HTTP): the fleet registers and unregisters, the engine leases a version
per request. A version's life: `loading` (validated here, being registered on the replicas)
-> `ready` (on every replica that is up; new requests use it) -> `retired` (a newer version
took over; requests that started on it finish on it) -> gone once its last request ended and
the fleet unloaded it. `failed` keeps the reason a version was refused.

Besides its serving version a domain may have versions *held* (`VllmEngine.hold`: an A/B's
candidate): they are on every replica like the serving one (and put back on a replica that
restarted), stay when the serving version changes, and go once no longer held and unused. A
request may pin any version on disk (`GenerationParams.adapter_version`); one neither serving
nor held is registered for it and unloaded after its last request.

The name a version has on a replica is `<domain>__<version>` (e.g. `legal__v3`): one per
version, so the old and the new one, or the serving one and a candidate, coexist.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from engine.adapters.store import CONFIG_FILE, AdapterStore, VersionDir, catalog, version_name
from engine.errors import AdapterInvalid, AdapterNotFound
from engine.types import AdapterInfo, AdapterState, ResidentAdapter

log = logging.getLogger(__name__)

#: What our names look like on a replica; anything else there is not ours to touch.
LORA_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}__v\d+\Z")


@dataclass
class LoraVersion:
    domain: str
    version: str
    path: str  # the version folder as the replicas see it (VLLM_ADAPTERS_DIR)
    rank: int
    file_bytes: int
    state: AdapterState = "loading"
    in_flight: int = 0

    @property
    def key(self) -> str:
        return version_name(self.domain, self.version)


def replica_path(version: VersionDir, store_root: Path, replicas_root: str | None) -> str:
    """Where the replicas find a version folder: the same relative path under their root."""
    if replicas_root is None:
        return str(version.path.resolve())
    relative = version.path.relative_to(store_root)  # the store builds it as <root>/<domain>/<version>
    return str(PurePosixPath(replicas_root) / PurePosixPath(*relative.parts))


def validate_version(version: VersionDir, model_id: str, linear_shapes: dict[str, tuple[int, int]]) -> int:
    """The checks the local engine makes (files, base model, shapes, finite weights); the rank.

    Runs in a worker thread: it reads the weights.
    """
    from engine.adapters.registry import validate

    validate(version, model_id, linear_shapes)
    config: dict[str, Any] = json.loads((version.path / CONFIG_FILE).read_text(encoding="utf-8"))
    return int(config["r"])


class LoraBook:
    """Serving pointers per domain and every version a replica may hold."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        self.serving: dict[str, LoraVersion] = {}  # domain -> the version new requests use
        self.versions: dict[str, LoraVersion] = {}  # lora name -> version (serving, switching, retired)
        self.errors: dict[str, str] = {}  # domain -> why its current version is not serving
        self.held: dict[str, tuple[str, ...]] = {}  # domain -> versions kept beside the serving one

    # ---- requests ---------------------------------------------------------------------------
    def lease(self, domain: str) -> LoraVersion:
        """The serving version for a new request, counted in flight until `release`."""
        v = self.serving.get(domain)
        if v is None:
            if domain in self.errors:
                raise AdapterInvalid(self.errors[domain])
            raise AdapterNotFound(self.not_found(domain))
        v.in_flight += 1
        return v

    def release(self, v: LoraVersion) -> bool:
        """One request on `v` ended; True when nothing keeps `v` any more (unload it): it is
        retired, or was registered for pinned requests only, and this was its last request."""
        v.in_flight -= 1
        return v.in_flight <= 0 and v.state in ("ready", "retired", "failed") and not self.needed(v)

    # ---- what the replicas should hold --------------------------------------------------------
    def needed(self, v: LoraVersion) -> bool:
        """`v` serves its domain or is held: it stays on the replicas whatever requests do."""
        return self.serving.get(v.domain) is v or v.version in self.held.get(v.domain, ())

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

    def make_serving(self, v: LoraVersion) -> LoraVersion | None:
        """`v` now serves its domain (and is no longer held: it is kept as the serving one);
        returns the version it replaced (now retired unless held), if any."""
        old = self.serving.get(v.domain)
        v.state = "ready"
        self.serving[v.domain] = v
        self.errors.pop(v.domain, None)
        self.hold(v.domain, tuple(h for h in self.held.get(v.domain, ()) if h != v.version))
        if old is not None and old is not v:
            if not self.needed(old):
                old.state = "retired"
            log.info("adapter %s now serves %s (was %s)", v.domain, v.version, old.version)
            return old
        return None

    def refuse(self, v: LoraVersion, reason: str) -> None:
        """`v` cannot serve; if it was serving (or about to), its domain has none now. A refused
        held version is let go, and the domain's serving version and error are left alone."""
        serving, held = self.serving.get(v.domain), self.held.get(v.domain, ())
        if serving is v:
            del self.serving[v.domain]
        if v.version in held:
            log.error("held version %s let go: %s", v.key, reason)
            self.hold(v.domain, tuple(h for h in held if h != v.version))
        elif serving is None or serving is v:
            self.errors[v.domain] = reason
        if v.in_flight <= 0:
            self.versions.pop(v.key, None)
        else:
            v.state = "retired"

    def hold(self, domain: str, versions: tuple[str, ...]) -> tuple[str, ...]:
        """Set the versions held for `domain`; returns the ones held before."""
        before = self.held.pop(domain, ())
        if versions:
            self.held[domain] = versions
        return before

    def forget(self, v: LoraVersion) -> None:
        """Stop tracking `v` once nothing keeps it (neither serving, held, nor in use)."""
        if self.versions.get(v.key) is v and v.in_flight <= 0 and not self.needed(v):
            del self.versions[v.key]

    # ---- reporting ----------------------------------------------------------------------------
    def not_found(self, domain: str) -> str:
        known = ", ".join(sorted(self.serving)) or "none"
        return f"no adapter {domain!r} is serving (available: {known}; folder {self.store.root})"

    def resident(self) -> list[ResidentAdapter]:
        return [ResidentAdapter(v.domain, v.version, v.state, 0, v.file_bytes, v.in_flight)
                for v in sorted(self.versions.values(), key=lambda v: v.key)]

    def catalog(self) -> list[AdapterInfo]:
        serving = {d: v.version for d, v in self.serving.items()}
        return catalog(self.store, serving, {k: v.state for k, v in self.versions.items()}, self.errors)
