"""Moving a domain's `current` pointer: promote a version, roll back to the one before.

Only the pointer and meta.json change; the caller that can reach the live engine then
calls `engine.reload(domain)` so the change goes live without a restart.
"""
from __future__ import annotations

import logging

from engine.adapters.store import AdapterStore, VersionDir, utc_now
from engine.errors import AdapterIncompatible, AdapterNotFound
from engine.adapters.validate import base_mismatch

log = logging.getLogger(__name__)


def check_compatible(store: AdapterStore, domain: str, version: str, model_id: str) -> VersionDir:
    """The version's folder; AdapterNotFound if it is missing, AdapterIncompatible if made for
    another model or without weights."""
    v = store.version(domain, version)
    mismatch = base_mismatch(v.meta, model_id, f"{domain}/{version}")
    if mismatch:
        raise AdapterIncompatible(f"{domain}/{version} {mismatch}")
    if not v.weights.is_file():
        raise AdapterIncompatible(f"{v.path} has no adapter weights")
    return v


def mark_promoted(store: AdapterStore, domain: str, version: str, model_id: str) -> str | None:
    """Make `version` current and record it in its meta.json; returns the previous current."""
    check_compatible(store, domain, version, model_id)
    previous = store.current(domain)
    store.update_meta(domain, version, status="promoted", promoted_at=utc_now())
    store.set_current(domain, version)
    return previous


def undo_promotion(store: AdapterStore, domain: str, version: str, reason: str) -> str | None:
    """The engine refused a promoted version: back to what served before, version -> candidate."""
    store.update_meta(domain, version, status="candidate", refused=reason)
    try:
        return store.rollback(domain)
    except AdapterNotFound:  # nothing served before it; the engine serves the base model
        log.warning("%s/%s was refused (%s) and there is no earlier version", domain, version, reason)
        return None
