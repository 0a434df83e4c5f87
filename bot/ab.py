"""In-chat A/B of an adapter's candidate version against the serving one (/ab).

An admin starts it for a domain with a share: that share of the domain's requests takes
part, and each of those is answered by the serving or the candidate version, half and half,
chosen by a seeded random generator (injectable, so tests are exact). The version an answer
came from is the engine's word (`GenerationResult.adapter_version`), recorded with the
answer; the user's 👍/👎 on it then counts for that version (bot.storage.ab_counts).

The engine keeps the candidate resident while the A/B runs (`EngineFace.hold`), also after a
restart (`restore`). The A/B ends when an admin stops it, and by itself when the domain's
serving version changes (the candidate was promoted, or another version took over) or the
candidate is gone or failed: checked before every draw, so no answer is ever counted for an
A/B whose premise no longer holds. A/B state lives in SQLite; this object caches the
running tests of each domain.
"""
from __future__ import annotations

import logging
import random
import sqlite3
from dataclasses import dataclass
from typing import Any, Literal

from engine.errors import EngineError
from engine.face import EngineFace
from engine.types import AdapterInfo, AdapterVersionInfo, GenerationParams, Mode

from bot.storage import ABTest, Store

log = logging.getLogger(__name__)

Arm = Literal["serving", "candidate"]
#: Why an A/B ended (stored; each has words in bot.i18n as "ab_end_<reason>").
EndReason = Literal["stopped", "promoted", "serving_changed", "candidate_gone", "candidate_failed"]


class ABRefused(Exception):
    """An A/B cannot start: `key` is the i18n key of the reason, `words` its values."""

    def __init__(self, key: str, **words: Any) -> None:
        super().__init__(key)
        self.key = key
        self.words = words


@dataclass(frozen=True)
class Draw:
    """One request's part in an A/B: which version it asks for."""

    test: ABTest
    arm: Arm
    version: str

    def params(self) -> GenerationParams:
        return GenerationParams(adapter_version=self.version)


def newest_candidate(info: AdapterInfo) -> AdapterVersionInfo | None:
    """The version an A/B tests by default: the newest candidate (one that fails to load says so)."""
    found = [v for v in info.versions if v.candidate and not v.is_current]
    return max(found, key=lambda v: _number(v.version)) if found else None


def _number(version: str) -> int:
    return int(version[1:]) if version[1:].isdigit() else -1


class ABService:
    def __init__(self, engine: EngineFace, store: Store, *, rng: random.Random | None = None) -> None:
        self.engine = engine
        self.store = store
        self.rng = rng or random.Random()
        self._running: dict[str, ABTest] = {t.domain: t for t in store.running_ab_tests()}

    def running(self, domain: str | None = None) -> list[ABTest]:
        return [t for d, t in sorted(self._running.items()) if domain is None or d == domain]

    # ---- admin -------------------------------------------------------------------------

    async def start(self, domain: str, share: float, started_by: int, version: str | None = None) -> ABTest:
        """Start (or re-share) the A/B of `domain`; ABRefused says why it cannot."""
        if not 0 < share <= 1:
            raise ABRefused("ab_bad_share")
        info = self.engine.modes().adapter(domain)
        if info is None:
            raise ABRefused("unknown_domain", domain=domain,
                            domains=", ".join(a.name for a in self.engine.modes().adapters))
        if info.current is None:
            raise ABRefused("ab_not_serving", domain=domain)
        candidate = self._candidate(info, version)
        running = self._running.get(domain)
        if running is not None and running.candidate_version == candidate.version:
            self.store.set_ab_share(running.id, share)
            self._running[domain] = self.store.ab_test(running.id) or running
            return self._running[domain]
        try:
            await self.engine.hold(domain, (candidate.version,))
        except (AttributeError, NotImplementedError) as exc:  # an engine without the face's hold
            log.warning("the engine cannot hold a second version of %s: %s", domain, exc)
            raise ABRefused("ab_unsupported") from exc
        except EngineError as exc:
            raise ABRefused("ab_hold_failed", domain=domain, version=candidate.version, reason=str(exc)) from exc
        if running is not None:
            self.store.end_ab(running.id, "stopped")
        try:
            test = self.store.start_ab(domain, info.current, candidate.version, share, started_by)
        except sqlite3.Error:
            await self._release(domain)
            raise
        self._running[domain] = test
        log.info("A/B %s started: %s %s vs %s, %.0f%% of requests", test.id, domain, test.serving_version,
                 test.candidate_version, share * 100)
        return test

    def _candidate(self, info: AdapterInfo, version: str | None) -> AdapterVersionInfo:
        if version is None:
            found = newest_candidate(info)
            if found is None:
                raise ABRefused("ab_no_candidate", domain=info.name)
            return found
        found_v = next((v for v in info.versions if v.version == version), None)
        if found_v is None:
            raise ABRefused("unknown_version", domain=info.name, version=version,
                            versions=", ".join(v.version for v in info.versions))
        if found_v.is_current:
            raise ABRefused("ab_is_serving", domain=info.name, version=version)
        return found_v

    async def stop(self, domain: str, reason: EndReason = "stopped") -> ABTest | None:
        """End the running A/B of `domain` (None when there was none) and let the candidate go."""
        test = self._running.pop(domain, None)
        if test is None:
            return None
        self.store.end_ab(test.id, reason)
        log.info("A/B %s of %s ended: %s", test.id, domain, reason)
        await self._release(domain)
        return self.store.ab_test(test.id)

    async def _release(self, domain: str) -> None:
        try:
            await self.engine.hold(domain, ())
        except Exception as exc:  # the A/B has ended either way; the engine frees it on its next reload
            log.warning("releasing the held versions of %s failed: %s", domain, exc)

    async def restore(self) -> None:
        """After a start: ask the engine to hold every running A/B's candidate again."""
        for test in list(self._running.values()):
            try:
                await self.engine.hold(test.domain, (test.candidate_version,))
            except Exception as exc:  # draws wait until the candidate is ready; check() ends it if it is gone
                log.warning("A/B %s: the engine could not hold %s %s again: %s", test.id, test.domain,
                            test.candidate_version, exc)
        await self.check()

    async def check(self) -> list[tuple[ABTest, EndReason]]:
        """End every running A/B whose premise no longer holds; returns what ended and why."""
        ended = []
        catalog = self.engine.modes()
        for domain, test in list(self._running.items()):
            reason = _broken(test, catalog.adapter(domain))
            if reason is not None:
                await self.stop(domain, reason)
                ended.append((test, reason))
        return ended

    # ---- requests ----------------------------------------------------------------------

    async def draw(self, mode: Mode) -> Draw | None:
        """Whether this request takes part in its domain's A/B, and with which version."""
        test = self._running.get(mode.adapter or "")
        if test is None:
            return None
        info = self.engine.modes().adapter(test.domain)
        reason = _broken(test, info)
        if reason is not None:
            await self.stop(test.domain, reason)
            return None
        assert info is not None
        candidate = next(v for v in info.versions if v.version == test.candidate_version)
        if candidate.state != "ready":  # still loading: nobody takes part until both can answer
            return None
        if self.rng.random() >= test.share:
            return None
        if self.rng.random() < 0.5:
            return Draw(test, "candidate", test.candidate_version)
        return Draw(test, "serving", test.serving_version)


def _broken(test: ABTest, info: AdapterInfo | None) -> EndReason | None:
    if info is None or info.current is None:
        return "serving_changed"
    if info.current != test.serving_version:
        return "promoted" if info.current == test.candidate_version else "serving_changed"
    candidate = next((v for v in info.versions if v.version == test.candidate_version), None)
    if candidate is None:
        return "candidate_gone"
    if candidate.state == "failed":
        return "candidate_failed"
    return None
