"""Admin commands: /status, /adapters, /reload; refusal for everyone else."""
from __future__ import annotations

import logging
import time
from typing import Any

from aiogram import Router
from aiogram.filters import Command, CommandObject
from aiogram.types import Message

from engine.face import EngineFace

from bot.chat import ChatService
from bot.filters import IsAdmin
from bot.i18n import t
from bot.storage import Store

log = logging.getLogger(__name__)

ADMIN_COMMANDS = ("status", "adapters", "reload", "train", "cancel", "rollback", "promote", "export")


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MB"


def _duration(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + (f"{h}h " if d or h else "") + f"{m}m {s}s"


def format_status(status: Any, *, generating: int, waiting: int, active_24h: int, bot_uptime_s: float,
                  training: str | None) -> str:
    adapters = "\n".join(
        f"  • {a.name} {a.version} — {a.state}, {_mb(a.bytes)}, {a.in_flight} in flight" for a in status.adapters
    ) or "  (none)"
    lines = [
        f"Model: {status.model}",
        f"Quantization: {status.quantization} · {status.dtype} · device {status.device}",
        f"Memory: model {_mb(status.model_bytes)}, process {_mb(status.process_rss_bytes)}, "
        f"GPU {_mb(status.gpu_allocated_bytes)}",
        f"Resident adapters:\n{adapters}",
        f"Queue: {status.queue_depth} waiting, {status.active_requests} generating, "
        f"{status.tokens_generated} tokens so far",
        f"Users: {generating} being answered, {waiting} queued, {active_24h} active in 24 h",
        f"Uptime: bot {_duration(bot_uptime_s)}, engine {_duration(status.uptime_s)}",
        f"Ready: {'yes' if status.ready else 'no'}",
    ]
    replicas = getattr(status, "replicas", ())
    if replicas:
        lines.insert(-1, format_replicas(replicas))
    if training:
        lines.append(f"Training: {training}")
    return "\n".join(lines)


def format_replicas(replicas: Any) -> str:
    """One line per inference server (the vLLM backend): state, load, adapters, last error."""
    ready = sum(r.state == "ready" for r in replicas)
    lines = [f"Replicas: {ready} of {len(replicas)} ready"]
    for r in replicas:
        line = f"  • {r.name} — {r.state}, {r.in_flight} in flight, {r.adapters} adapters, {r.requests} requests"
        if r.failures:
            line += f", {r.failures} failures"
        if r.error:
            line += f"; {r.error}"
        if r.retry_in_s is not None and r.state in ("down", "incompatible"):
            line += f" (next check in {r.retry_in_s:.0f} s)"
        lines.append(line)
    return "\n".join(lines)


def format_adapters(catalog: Any) -> str:
    if not catalog.adapters:
        return "No adapters on disk."
    out = []
    for a in catalog.adapters:
        head = f"{a.name}: serving {a.current or '—'}" + (f" ⚠️ {a.error}" if a.error else "")
        out.append(head)
        for v in a.versions:
            metrics = ", ".join(f"{k} {val:.4g}" for k, val in sorted(v.metrics.items())
                                if isinstance(val, (int, float)))
            mark = "▶" if v.is_current else "·"
            state = f" [{v.state}]" if v.state else ""
            out.append(f"  {mark} {v.version}{state} {v.created or ''} {metrics}".rstrip())
    return "\n".join(out)


def training_summary(engine: EngineFace) -> str | None:
    try:
        job = engine.training.current()
    except Exception:
        return None
    if job is None:
        return "idle"
    ev = getattr(job, "last_event", None)
    if ev is None:
        return f"{getattr(job, 'domain', '?')} running"
    return f"{ev.domain} {ev.kind} {ev.step}/{ev.total_steps}"


async def refuse(message: Message, lang: str) -> None:
    await message.answer(t(lang, "admin_only"))


async def on_status(message: Message, engine: EngineFace, chat: ChatService, store: Store, started_at: float) -> None:
    text = format_status(
        engine.status(), generating=chat.generating(), waiting=chat.waiting(), active_24h=store.active_users(),
        bot_uptime_s=time.monotonic() - started_at, training=training_summary(engine),
    )
    await message.answer(text)


async def on_adapters(message: Message, engine: EngineFace) -> None:
    await message.answer(format_adapters(engine.modes()))


async def on_reload(message: Message, command: CommandObject, engine: EngineFace, store: Store, lang: str) -> None:
    name = (command.args or "").strip() or None
    report = await engine.reload(name)
    parts = [f"loaded {report.loaded}" if report.loaded else "", f"unchanged {report.unchanged}" if report.unchanged else "",
             f"failed {report.failed}" if report.failed else "", f"templates {report.templates}" if report.templates else ""]
    summary = "; ".join(p for p in parts if p) or "nothing to do"
    assert message.from_user is not None
    store.log_admin(message.from_user.id, "reload", name or "", summary)
    await message.answer(t(lang, "reload_done", report=summary))


def router() -> Router:
    r = Router(name="admin")
    r.message.register(refuse, Command(*ADMIN_COMMANDS), ~IsAdmin())
    r.message.register(on_status, Command("status"), IsAdmin())
    r.message.register(on_adapters, Command("adapters"), IsAdmin())
    r.message.register(on_reload, Command("reload"), IsAdmin())
    return r
