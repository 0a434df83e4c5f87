"""Token budgets: how many generated tokens a user may use per day and per month.

The limits come from the settings (TOKENS_PER_DAY / TOKENS_PER_MONTH, the GUEST_ ones for
users let in by ALLOW_GUESTS) unless an admin gave the user their own (/budget); 0 means
unlimited and admins are never limited. A period starts at midnight, or on the first of the
month, in BUDGET_TIMEZONE.

The counts are the answers themselves (bot.storage): an answer's generated tokens count in
the period it started in, and an answer being written holds what it may still generate
(MAX_NEW_TOKENS). A request is admitted only while used + held is below every limit, and
the check and the answer's row (its hold) are written in one synchronous step on the event
loop, so no second request can slip in between: two requests in flight overspend by less
than one answer's MAX_NEW_TOKENS. Nothing is kept in memory, so a restart changes nothing.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Iterable, Literal
from zoneinfo import ZoneInfo

from bot.config import BotSettings
from bot.i18n import t
from bot.storage import Clock, Store, utc_now

PeriodKind = Literal["day", "month"]
#: Where a user's limits come from.
Source = Literal["admin", "own", "guest", "default"]


@dataclass(frozen=True)
class Period:
    kind: PeriodKind
    start: dt.datetime  # aware, in BUDGET_TIMEZONE
    end: dt.datetime  # the next period's start: when this one resets
    limit: int  # 0 = unlimited
    used: int  # tokens of answers that ended
    held: int  # tokens held by answers being written

    @property
    def limited(self) -> bool:
        return self.limit > 0

    @property
    def remaining(self) -> int | None:
        return max(0, self.limit - self.used - self.held) if self.limited else None

    @property
    def exhausted(self) -> bool:
        return self.limited and self.used + self.held >= self.limit


@dataclass(frozen=True)
class BudgetStatus:
    user_id: int
    source: Source
    periods: tuple[Period, Period]  # day, month
    now: dt.datetime

    @property
    def exempt(self) -> bool:
        return self.source == "admin"

    @property
    def allowed(self) -> bool:
        return self.exempt or not any(p.exhausted for p in self.periods)

    @property
    def limited(self) -> bool:
        return not self.exempt and any(p.limited for p in self.periods)

    @property
    def resets_at(self) -> dt.datetime | None:
        """When every exhausted period has reset: the earliest a refused user may ask again."""
        ends = [p.end for p in self.periods if p.exhausted]
        return max(ends) if ends else None


def period_bounds(now: dt.datetime, zone: ZoneInfo) -> dict[PeriodKind, tuple[dt.datetime, dt.datetime]]:
    """The day and the month that contain `now`, as [start, end) in `zone` (DST-aware)."""
    local = now.astimezone(zone)
    day = dt.datetime.combine(local.date(), dt.time(0), tzinfo=zone)
    next_day = dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(0), tzinfo=zone)
    month = dt.datetime(local.year, local.month, 1, tzinfo=zone)
    next_month = dt.datetime(local.year + (local.month == 12), local.month % 12 + 1, 1, tzinfo=zone)
    return {"day": (day, next_day), "month": (month, next_month)}


class Budgets:
    """The budget policy over the answers stored in `store`; see the module docstring."""

    def __init__(self, settings: BotSettings, store: Store, *, max_new_tokens: int, clock: Clock = utc_now,
                 exempt_ids: Iterable[int] = ()) -> None:
        """`max_new_tokens`: what one answer may generate (the engine's MAX_NEW_TOKENS), held while it is written.

        `exempt_ids`: users never limited besides the admins (the console chat's operator).
        """
        self.settings = settings
        self.store = store
        self.max_new_tokens = max_new_tokens
        self.clock = clock
        self.zone = ZoneInfo(settings.budget_timezone)
        self.exempt_ids = frozenset(exempt_ids)

    def limits(self, user_id: int) -> tuple[int, int, Source]:
        """(per day, per month, where they come from) for one user; 0 = unlimited."""
        s = self.settings
        if s.is_admin(user_id) or user_id in self.exempt_ids:
            return 0, 0, "admin"
        if s.is_guest(user_id):
            day = s.tokens_per_day if s.guest_tokens_per_day is None else s.guest_tokens_per_day
            month = s.tokens_per_month if s.guest_tokens_per_month is None else s.guest_tokens_per_month
            source: Source = "guest"
        else:
            day, month, source = s.tokens_per_day, s.tokens_per_month, "default"
        own = self.store.budget_override(user_id)
        if own is not None and (own.tokens_per_day is not None or own.tokens_per_month is not None):
            day = own.tokens_per_day if own.tokens_per_day is not None else day
            month = own.tokens_per_month if own.tokens_per_month is not None else month
            source = "own"
        return day, month, source

    def status(self, user_id: int, *, unlimited_too: bool = True) -> BudgetStatus:
        """The user's limits and use now; `unlimited_too=False` counts only the periods with a limit
        (what admission needs: a user without limits costs no query over their answers)."""
        now = self.clock()
        day_limit, month_limit, source = self.limits(user_id)
        bounds = period_bounds(now, self.zone)
        periods = []
        for kind, limit in (("day", day_limit), ("month", month_limit)):
            start, end = bounds[kind]  # type: ignore[index]
            counted = unlimited_too or (limit > 0 and source != "admin")
            used, held = self.store.tokens_used(user_id, start, end) if counted else (0, 0)
            periods.append(Period(kind, start, end, limit, used, held))  # type: ignore[arg-type]
        return BudgetStatus(user_id, source, (periods[0], periods[1]), now)

    def hold_for(self, status: BudgetStatus) -> int:
        """What an admitted answer holds while it is written: nothing when no limit applies."""
        return self.max_new_tokens if status.limited else 0


# ---- words ---------------------------------------------------------------------------


def number(n: int, lang: str) -> str:
    """12 345 in Russian, 12,345 in English."""
    return f"{n:,}".replace(",", "\u00a0" if lang == "ru" else ",")


def wait_words(seconds: float, lang: str) -> str:
    minutes = max(1, int(seconds // 60) + (seconds % 60 > 0))
    days, rest = divmod(minutes, 1440)
    hours, mins = divmod(rest, 60)
    parts = []
    if days:
        parts.append(t(lang, "bd_days", n=days))
    if hours:
        parts.append(t(lang, "bd_hours", n=hours))
    if mins and not days:
        parts.append(t(lang, "bd_minutes", n=mins))
    return " ".join(parts)


def when_words(at: dt.datetime, now: dt.datetime, zone: ZoneInfo, lang: str) -> str:
    """'2027-01-01 00:00 Europe/Moscow, in 3 h 12 min': the operator's clock and the wait."""
    return t(lang, "bd_at", at=at.astimezone(zone).strftime("%Y-%m-%d %H:%M"), zone=zone.key,
             wait=wait_words((at - now).total_seconds(), lang))


def period_line(p: Period, now: dt.datetime, zone: ZoneInfo, lang: str) -> str:
    name = t(lang, f"bd_{p.kind}")
    if not p.limited:
        return t(lang, "bd_line_unlimited", period=name, used=number(p.used + p.held, lang))
    return t(lang, "bd_line", period=name, used=number(p.used + p.held, lang), limit=number(p.limit, lang),
             left=number(p.remaining or 0, lang), reset=when_words(p.end, now, zone, lang))


def refusal_text(status: BudgetStatus, zone: ZoneInfo, lang: str) -> str:
    """The reply to a request over budget: what is left in each period and when asking works again."""
    resets = status.resets_at
    assert resets is not None
    lines = [t(lang, "bd_refused", when=when_words(resets, status.now, zone, lang))]
    lines += [period_line(p, status.now, zone, lang) for p in status.periods if p.limited]
    return "\n".join(lines)


def usage_text(status: BudgetStatus, zone: ZoneInfo, lang: str) -> str:
    """/usage: tokens used this day and month, what is left and when each resets."""
    lines = [t(lang, "bd_usage_title")]
    lines += [period_line(p, status.now, zone, lang) for p in status.periods]
    if status.exempt:
        lines.append(t(lang, "bd_exempt"))
    elif not status.limited:
        lines.append(t(lang, "bd_no_limits"))
    return "\n".join(lines)
