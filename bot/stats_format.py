"""The words of the operators' views: /stats, /ab, /why and /budget, in en and ru.

Pure functions of plain data (bot.stats, bot.storage records, engine.types.AuditStamp), so
the Telegram handlers and the console show the same thing. Laid out for a phone.
"""
from __future__ import annotations

from typing import Sequence
from zoneinfo import ZoneInfo

from engine.types import Mode, ModeCatalog

from bot.budget import BudgetStatus, number, period_line
from bot.i18n import t
from bot.keyboards import describe_mode
from bot.proportions import Rate, compare
from bot.stats import Report, Window
from bot.storage import ABCounts, ABTest, AnswerRecord, UserRecord

MAX_LINES = 12  # modes and versions listed in /stats; the rest are counted


def _s(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.0f}%"


def _when(at: str | None) -> str:
    return (at or "")[:16].replace("T", " ")


def _pair(lang: str, key: str, day: Window, month: Window) -> str:
    def one(w: Window) -> str:
        if key == "latency":
            return f"{_s(w.latency_p50)} / {_s(w.latency_p95)} s"
        if key == "ttft":
            return f"{_s(w.ttft_p50)} / {_s(w.ttft_p95)} s"
        return number(getattr(w, key), lang)
    return t(lang, f"sx_{key}", day=one(day), month=one(month))


def format_report(report: Report, lang: str, ab_lines: Sequence[str] = (), catalog: ModeCatalog | None = None) -> str:
    """/stats: the two windows side by side, then per mode, per version and the running A/Bs."""
    lines = [t(lang, "sx_title")]
    lines += [_pair(lang, k, report.day, report.month)
              for k in ("answers", "tokens", "active_users", "latency", "ttft")]
    if report.modes:
        lines.append(t(lang, "sx_modes"))
        for m in report.modes[:MAX_LINES]:
            lines.append(t(lang, "sx_mode", mode=describe_mode(Mode(m.adapter, m.role), lang, catalog),
                           answers=number(m.answers, lang), tokens=number(m.tokens, lang),
                           p50=_s(m.latency_p50), p95=_s(m.latency_p95), ttft=_s(m.ttft_p50)))
        if len(report.modes) > MAX_LINES:
            lines.append(t(lang, "sx_more", n=len(report.modes) - MAX_LINES))
    if report.feedback:
        lines.append(t(lang, "sx_feedback"))
        for f in report.feedback[:MAX_LINES]:
            rate = Rate(f.up, f.down)
            lines.append(t(lang, "sx_version", adapter=f.adapter or t(lang, "base_model"),
                           version=f.version or "", up=f.up, down=f.down, rate=_pct(rate.value)))
        if len(report.feedback) > MAX_LINES:
            lines.append(t(lang, "sx_more", n=len(report.feedback) - MAX_LINES))
    if ab_lines:
        lines.append("")
        lines += ab_lines
    lines.append(t(lang, "sx_zone", zone=report.zone))
    return "\n".join(lines)


def format_ab(test: ABTest, counts: Sequence[ABCounts], lang: str) -> str:
    """One A/B: per version its answers, 👍, 👎 and 👍 rate with the 95 % interval, then the verdict."""
    head = t(lang, "ab_head", id=test.id, domain=test.domain, serving=test.serving_version,
             candidate=test.candidate_version, share=f"{test.share * 100:g}", since=_when(test.started_at))
    if not test.running:
        head += "\n" + t(lang, "ab_ended", at=_when(test.ended_at), reason=t(lang, f"ab_end_{test.end_reason}"))
    by_arm = {c.arm: c for c in counts}
    rates = {}
    lines = [head]
    for arm, version in (("serving", test.serving_version), ("candidate", test.candidate_version)):
        c = by_arm.get(arm, ABCounts(arm, version, 0, 0, 0))
        rate = rates[arm] = Rate(c.up, c.down)
        low, high = rate.interval
        lines.append(t(lang, "ab_arm", version=version, arm=t(lang, f"ab_arm_{arm}"), answers=c.answers,
                       up=c.up, down=c.down, rate=_pct(rate.value),
                       interval=f"{low * 100:.0f}–{high * 100:.0f}%" if rate.rated else "—"))
    if rates["serving"].rated and rates["candidate"].rated:
        result = compare(rates["serving"], rates["candidate"])
        key = "ab_significant" if result.significant else "ab_not_significant"
        lines.append(t(lang, key, p=f"{result.p_value:.3g}"))
    else:
        lines.append(t(lang, "ab_no_ratings"))
    return "\n".join(lines)


def format_why(answer: AnswerRecord, user: UserRecord | None, lang: str) -> str:
    """/why: what produced one stored answer."""
    who = f"{answer.user_id}" + (f" ({user.name})" if user and user.name else "")
    lines = [t(lang, "why_head", id=answer.id, at=_when(answer.created_at), user=who)]
    s = answer.stamp
    adapter = answer.adapter or t(lang, "base_model")
    version = answer.adapter_version or ""
    ab = t(lang, "why_ab", test=answer.ab_test, arm=t(lang, f"ab_arm_{answer.ab_arm}")) if answer.ab_test else ""
    if s is None:
        lines.append(t(lang, "why_adapter", adapter=adapter, version=version, ab=ab))
        lines.append(t(lang, "why_template_only", template=answer.template or "?"))
        lines.append(t(lang, "why_no_stamp"))
    else:
        fingerprint = (s.base_fingerprint[:19] + "…") if s.base_fingerprint and len(s.base_fingerprint) > 20 \
            else (s.base_fingerprint or t(lang, "n_a"))
        lines.append(t(lang, "why_model", model=s.base_model, quantization=s.quantization or t(lang, "n_a"),
                       fingerprint=fingerprint))
        lines.append(t(lang, "why_adapter", adapter=s.adapter or t(lang, "base_model"),
                       version=s.adapter_version or "", ab=ab))
        lines.append(t(lang, "why_template", template=s.template,
                       language=f" ({s.template_language})" if s.template_language else "",
                       hash=s.template_hash[:12]))
        p = s.sampling
        lines.append(t(lang, "why_sampling", temperature=f"{p.temperature:g}", top_p=f"{p.top_p:g}", top_k=p.top_k,
                       repetition=f"{p.repetition_penalty:g}", max_new=p.max_new_tokens,
                       seed="—" if p.seed is None else p.seed))
        backend = t(lang, "why_vllm", replica=s.replica or "?") if s.backend == "vllm" else t(lang, "why_local")
        lines.append(t(lang, "why_backend", backend=backend))
    lines.append(t(lang, "why_tokens", prompt=answer.prompt_tokens if answer.prompt_tokens is not None else "—",
                   generated=answer.completion_tokens if answer.completion_tokens is not None else "—",
                   finish=answer.finish_reason or "—", latency=_s(answer.latency_s), ttft=_s(answer.ttft_s)))
    return "\n".join(lines)


def format_budget(user: UserRecord | None, user_id: int, status: BudgetStatus, zone: ZoneInfo, lang: str) -> str:
    """/budget <user>: where the user's limits come from and their use of each period."""
    who = f"{user_id}" + (f" ({user.name})" if user and user.name else "")
    lines = [t(lang, "bg_head", user=who, source=t(lang, f"bg_source_{status.source}"))]
    lines += [period_line(p, status.now, zone, lang) for p in status.periods]
    return "\n".join(lines)
