"""What the admin view (/stats) reports, read from the answers in SQLite.

The last 24 hours and the last 30 days: answers, generated tokens, active users, latency
(from the user's message to the stored answer) and time to first token at p50/p95; per mode
(adapter × role); 👍/👎 per adapter version; and per day of the operator's time zone and per
domain, the answers and tokens of the last 30 days for the chart (bot.chart).

`collect` runs in a worker thread on a read-only connection of its own (`Store.read_only`),
so a big history never stalls the event loop. Percentiles are nearest-rank, computed in
Python from one pass over the window's answers; the per-day series is grouped in SQL by
quarter hour (every time zone's midnight falls on one), then folded into local days.
"""
from __future__ import annotations

import datetime as dt
import math
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from bot.storage import STREAMING, Store, iso

#: Days the chart and the long window cover.
DAYS = 30


@dataclass(frozen=True)
class Window:
    """Totals of one time window."""

    answers: int = 0
    tokens: int = 0
    active_users: int = 0
    latency_p50: float | None = None
    latency_p95: float | None = None
    ttft_p50: float | None = None
    ttft_p95: float | None = None


@dataclass(frozen=True)
class ModeStats:
    adapter: str | None  # None: the base model
    role: str
    answers: int
    tokens: int
    latency_p50: float | None
    latency_p95: float | None
    ttft_p50: float | None


@dataclass(frozen=True)
class VersionFeedback:
    adapter: str | None
    version: str | None
    up: int
    down: int


@dataclass(frozen=True)
class Daily:
    """Per local day (oldest first) and per domain ('base' for no adapter): answers and tokens."""

    days: tuple[dt.date, ...]
    answers: dict[str, list[int]] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    now: dt.datetime
    zone: str
    day: Window
    month: Window
    modes: tuple[ModeStats, ...]
    feedback: tuple[VersionFeedback, ...]
    daily: Daily


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted `values` (q in 0..1); None for no values."""
    if not values:
        return None
    return values[max(0, math.ceil(q * len(values)) - 1)]


def _window(conn: sqlite3.Connection, since: dt.datetime, until: dt.datetime) -> Window:
    rows = conn.execute(
        "select latency_s, ttft_s, completion_tokens from messages where role = 'assistant' "
        "and created_at >= ? and created_at < ? and finish_reason is not ?", [iso(since), iso(until), STREAMING],
    ).fetchall()
    latency = sorted(r["latency_s"] for r in rows if isinstance(r["latency_s"], (int, float)))
    ttft = sorted(r["ttft_s"] for r in rows if isinstance(r["ttft_s"], (int, float)))
    users = conn.execute("select count(*) from users where last_seen_at >= ? and last_seen_at < ?",
                         [iso(since), iso(until)]).fetchone()[0]
    return Window(
        answers=len(rows), tokens=sum(int(r["completion_tokens"] or 0) for r in rows), active_users=int(users),
        latency_p50=percentile(latency, 0.5), latency_p95=percentile(latency, 0.95),
        ttft_p50=percentile(ttft, 0.5), ttft_p95=percentile(ttft, 0.95),
    )


def _modes(conn: sqlite3.Connection, since: dt.datetime, until: dt.datetime) -> tuple[ModeStats, ...]:
    groups: dict[tuple[str | None, str], list[sqlite3.Row]] = defaultdict(list)
    for r in conn.execute(
        "select adapter, template, latency_s, ttft_s, completion_tokens from messages where role = 'assistant' "
        "and created_at >= ? and created_at < ? and finish_reason is not ?", [iso(since), iso(until), STREAMING],
    ):
        groups[(r["adapter"], r["template"] or "assistant")].append(r)
    out = []
    for (adapter, role), rows in groups.items():
        latency = sorted(r["latency_s"] for r in rows if isinstance(r["latency_s"], (int, float)))
        ttft = sorted(r["ttft_s"] for r in rows if isinstance(r["ttft_s"], (int, float)))
        out.append(ModeStats(adapter, role, len(rows), sum(int(r["completion_tokens"] or 0) for r in rows),
                             percentile(latency, 0.5), percentile(latency, 0.95), percentile(ttft, 0.5)))
    return tuple(sorted(out, key=lambda m: (-m.answers, m.adapter or "", m.role)))


def _feedback(conn: sqlite3.Connection, since: dt.datetime, until: dt.datetime) -> tuple[VersionFeedback, ...]:
    rows = conn.execute(
        "select m.adapter as adapter, m.adapter_version as version, sum(f.rating > 0) as up, sum(f.rating < 0) as down "
        "from feedback f join messages m on m.id = f.message_id "
        "where m.created_at >= ? and m.created_at < ? group by m.adapter, m.adapter_version "
        "order by m.adapter, m.adapter_version", [iso(since), iso(until)],
    ).fetchall()
    return tuple(VersionFeedback(r["adapter"], r["version"], int(r["up"] or 0), int(r["down"] or 0)) for r in rows)


def _daily(conn: sqlite3.Connection, now: dt.datetime, zone: ZoneInfo) -> Daily:
    today = now.astimezone(zone).date()
    days = tuple(today - dt.timedelta(days=DAYS - 1 - i) for i in range(DAYS))
    since = dt.datetime.combine(days[0], dt.time(0), tzinfo=zone)
    index = {d: i for i, d in enumerate(days)}
    answers: dict[str, list[int]] = {}
    tokens: dict[str, list[int]] = {}
    # created_at is "YYYY-MM-DDTHH:MM:SS+00:00": group by quarter hour, fold into local days here
    for r in conn.execute(
        "select substr(created_at, 1, 14) || printf('%02d', (cast(substr(created_at, 15, 2) as integer) / 15) * 15) "
        "as quarter, coalesce(adapter, 'base') as domain, count(*) as n, sum(coalesce(completion_tokens, 0)) as t "
        "from messages where role = 'assistant' and created_at >= ? and created_at < ? and finish_reason is not ? "
        "group by quarter, domain", [iso(since), iso(now + dt.timedelta(seconds=1)), STREAMING],
    ):
        try:
            at = dt.datetime.strptime(r["quarter"], "%Y-%m-%dT%H:%M").replace(tzinfo=dt.timezone.utc)
        except (TypeError, ValueError):  # a row someone wrote by hand with another time format
            continue
        i = index.get(at.astimezone(zone).date())
        if i is None:
            continue
        answers.setdefault(r["domain"], [0] * DAYS)[i] += int(r["n"])
        tokens.setdefault(r["domain"], [0] * DAYS)[i] += int(r["t"] or 0)
    return Daily(days, answers, tokens)


def collect(store: Store, now: dt.datetime, zone: ZoneInfo) -> Report:
    """The whole report (blocking: call it in a worker thread)."""
    until = now + dt.timedelta(seconds=1)  # stored times are whole seconds: "now" itself is inside
    month_since = now - dt.timedelta(days=DAYS)
    conn = store.read_only()
    try:
        return Report(now, zone.key, _window(conn, now - dt.timedelta(days=1), until),
                      _window(conn, month_since, until), _modes(conn, month_since, until),
                      _feedback(conn, month_since, until), _daily(conn, now, zone))
    finally:
        conn.close()
