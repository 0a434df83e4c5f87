"""The words of admin replies: /status, /adapters, /reload and training progress, in en and ru.

Pure functions of the engine's plain data types, so the Telegram handlers and the console
show the same thing. Laid out for a phone: short lines, one fact each, the main metric only.
"""
from __future__ import annotations

import re
from typing import Any

from bot.i18n import t

MAX_VERSIONS_SHOWN = 5  # per domain in /adapters; older ones are counted
MAX_REASON_CHARS = 300  # an engine error can hold paths and a traceback's last line


def _mb(n: int | None, lang: str) -> str:
    return t(lang, "n_a") if n is None else f"{n / 2**20:.1f} MB"


def duration(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + (f"{h}h " if d or h else "") + f"{m}m {s}s"


def short(reason: str, limit: int = MAX_REASON_CHARS) -> str:
    reason = " ".join(str(reason).split())
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def format_status(status: Any, *, generating: int, waiting: int, active_24h: int, bot_uptime_s: float,
                  training: str | None, lang: str = "en") -> str:
    adapters = [
        t(lang, "st_adapter", name=a.name, version=a.version, state=a.state, size=_mb(a.bytes, lang),
          in_flight=a.in_flight)
        for a in status.adapters
    ] or [f"  ({t(lang, 'none')})"]
    lines = [
        t(lang, "st_model", model=status.model),
        t(lang, "st_quant", quantization=status.quantization, dtype=status.dtype, device=status.device),
        t(lang, "st_memory", model=_mb(status.model_bytes, lang), process=_mb(status.process_rss_bytes, lang),
          gpu=_mb(status.gpu_allocated_bytes, lang)),
        t(lang, "st_adapters"), *adapters,
        t(lang, "st_queue", waiting=status.queue_depth, generating=status.active_requests,
          tokens=status.tokens_generated),
        t(lang, "st_users", generating=generating, waiting=waiting, active=active_24h),
        t(lang, "st_uptime", bot=duration(bot_uptime_s), engine=duration(status.uptime_s)),
        t(lang, "st_ready", ready=t(lang, "yes" if status.ready else "no")),
    ]
    replicas = getattr(status, "replicas", ())
    if replicas:
        lines[-1:-1] = format_replicas(replicas, lang)
    if training:
        lines.append(t(lang, "st_training", training=training))
    return "\n".join(lines)


def format_replicas(replicas: Any, lang: str = "en") -> list[str]:
    """One line per inference server (the vLLM backend): state, load, adapters, last error."""
    lines = [t(lang, "st_replicas", ready=sum(r.state == "ready" for r in replicas), total=len(replicas))]
    for r in replicas:
        line = t(lang, "st_replica", name=r.name, state=r.state, in_flight=r.in_flight, adapters=r.adapters,
                 requests=r.requests)
        if r.failures:
            line += t(lang, "st_replica_failures", failures=r.failures)
        if r.error:
            line += f"; {r.error}"
        if r.retry_in_s is not None and r.state in ("down", "incompatible"):
            line += f" (↻ {r.retry_in_s:.0f} s)"
        lines.append(line)
    return lines


#: A job log status -> (icon, i18n key of its word).
JOB_STATUS = {
    "promoted": ("✅", "job_promoted"), "candidate": ("🟡", "job_candidate"), "failed": ("❌", "job_failed"),
    "cancelled": ("⏹", "job_cancelled"), "running": ("🏋️", "job_running"),
}


def _job_status(status: str, lang: str) -> tuple[str, str]:
    icon, key = JOB_STATUS.get(status, ("•", ""))
    return icon, t(lang, key) if key else status


def _when(at: str) -> str:
    return (at or "")[:16].replace("T", " ")


def job_history(engine: Any, limit: int) -> list[Any] | None:
    """The newest jobs of the training service's log (engine.training.jobs.JobRecord); None without one."""
    try:
        return list(engine.training.history(limit))
    except Exception:
        return None


def format_jobs(records: list[Any], lang: str = "en") -> str:
    """/jobs: one line per job, newest first, with how it ended and why."""
    if not records:
        return t(lang, "jobs_none")
    lines = [t(lang, "jobs_title")]
    for r in records:
        icon, status = _job_status(r.status, lang)
        version = f" · {r.version}" if r.version else ""
        lines.append(t(lang, "job_line", icon=icon, domain=r.domain, status=status, at=_when(r.at), version=version))
        if r.message and r.status in ("failed", "cancelled"):
            lines.append(f"   {short(r.message, 160)}")
    return "\n".join(lines)


def training_summary(engine: Any, lang: str = "en") -> str | None:
    """The training job in a few words for /status (or the last one); None without a training service."""
    try:
        job = engine.training.current()
    except Exception:
        return None
    if job is None:
        last = job_history(engine, 1)
        if last:
            _icon, status = _job_status(last[0].status, lang)
            return t(lang, "st_last_job", training=t(lang, "st_idle"), domain=last[0].domain, status=status,
                     at=_when(last[0].at))
        return t(lang, "st_idle")
    ev = getattr(job, "last_event", None)
    if ev is None:
        return f"{getattr(job, 'domain', '?')} running"
    return f"{ev.domain} {ev.kind} {ev.step}/{ev.total_steps}"


def _version_number(version: str) -> int:
    m = re.fullmatch(r"v(\d+)", version)
    return int(m.group(1)) if m else -1


def _main_metric(metrics: dict[str, float], lang: str) -> str:
    if "eval_loss" in metrics:
        return f"{t(lang, 'ad_loss')} {metrics['eval_loss']:.3f}"
    return ""


def format_adapters(catalog: Any, lang: str = "en") -> str:
    """One head line per domain, then its newest versions: ▶ serving, · others; short enough for a phone."""
    if not catalog.adapters:
        return t(lang, "ad_none")
    out: list[str] = []
    for a in catalog.adapters:
        state = t(lang, "ad_serving", version=a.current) if a.current else t(lang, "ad_not_serving")
        out.append(f"{a.name} · {state}")
        if a.error:
            out.append(f"  ⚠️ {short(a.error, 160)}")
        versions = sorted(a.versions, key=lambda v: _version_number(v.version), reverse=True)
        for v in versions[:MAX_VERSIONS_SHOWN]:
            parts = [v.version]
            if v.state and v.state != "ready":
                parts.append(str(v.state))
            metric = _main_metric(v.metrics, lang)
            if metric:
                parts.append(metric)
            if v.created:
                parts.append(str(v.created)[:10])
            out.append(f"  {'▶' if v.is_current else '·'} " + " · ".join(parts))
        if len(versions) > MAX_VERSIONS_SHOWN:
            out.append(t(lang, "ad_older", n=len(versions) - MAX_VERSIONS_SHOWN))
    return "\n".join(out)


def format_reload(report: Any, lang: str = "en") -> str:
    """What /reload did, truthfully: the title says whether everything worked."""
    lines = [t(lang, "reload_loaded", name=n, version=v) for n, v in sorted(report.loaded.items())]
    if report.unchanged:
        items = ", ".join(f"{n} {v}" for n, v in sorted(report.unchanged.items()))
        lines.append(t(lang, "reload_unchanged", items=items))
    lines += [t(lang, "reload_error", name=n, reason=short(r)) for n, r in sorted(report.failed.items())]
    lines += [t(lang, "reload_template", name=n, reason=short(r)) for n, r in sorted(report.templates.items())]
    worked = bool(report.loaded or report.unchanged)
    if not lines:
        title = t(lang, "reload_nothing")
    elif report.failed and not worked:
        title = t(lang, "reload_failed")
    elif report.failed or report.templates:
        title = t(lang, "reload_partial")
    else:
        title = t(lang, "reload_ok")
    return "\n".join([title, *lines])


def progress_bar(done: int, total: int, width: int = 12) -> str:
    frac = 0.0 if total <= 0 else max(0.0, min(1.0, done / total))
    full = round(frac * width)
    return f"[{'█' * full}{'░' * (width - full)}] {frac * 100:3.0f}%"


def format_event(ev: Any, lang: str = "en") -> str:
    """One training event as the text of the admin's progress message."""
    domain = ev.domain
    if ev.kind == "queued":
        return t(lang, "tr_queued", domain=domain, job=ev.job_id)
    if ev.kind in ("started", "progress"):
        lines = [t(lang, "tr_running", domain=domain, job=ev.job_id),
                 f"{progress_bar(ev.step, ev.total_steps)}  " + t(lang, "tr_step", step=ev.step, total=ev.total_steps)]
        extra = []
        if ev.loss is not None:
            extra.append(t(lang, "tr_loss", loss=f"{ev.loss:.4f}"))
        if ev.eta_s is not None:
            extra.append(t(lang, "tr_eta", eta=int(ev.eta_s)))
        if extra:
            lines.append(" · ".join(extra))
        return "\n".join(lines)
    if ev.kind == "evaluating":
        return t(lang, "tr_evaluating", domain=domain) + f"\n{progress_bar(1, 1)}"
    if ev.kind == "finished":
        m = ev.metrics
        parts = []
        if "eval_loss" in m:
            parts.append(t(lang, "tr_eval_loss", value=f"{m['eval_loss']:.4f}"))
        if "eval_loss_base" in m:
            parts.append(t(lang, "tr_base", value=f"{m['eval_loss_base']:.4f}"))
        if m.get("eval_loss_previous") is not None:
            parts.append(t(lang, "tr_previous", value=f"{m['eval_loss_previous']:.4f}"))
        if "eval_perplexity" in m:
            parts.append(t(lang, "tr_perplexity", value=f"{m['eval_perplexity']:.3g}"))
        verdict = t(lang, "tr_promoted") if ev.promoted else t(lang, "tr_candidate", domain=domain, version=ev.version)
        head = t(lang, "tr_finished", domain=domain, version=ev.version or "", metrics=", ".join(parts))
        return f"{head}\n{verdict}"
    if ev.kind == "failed":
        return t(lang, "tr_failed", domain=domain, reason=short(ev.message or t(lang, "tr_unknown_reason")))
    if ev.kind == "cancelled":
        return t(lang, "tr_cancelled", domain=domain)
    return t(lang, "tr_other", domain=domain, kind=ev.kind)
