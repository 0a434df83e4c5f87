"""/train, /cancel, /rollback, /promote, /export: wired to `engine.training`.

Training is optional: when the engine has no training service, or it fails for a reason
that is not a domain error, the admin is told "training is not available" — not an error.
/train answers at once and follows the job in a background task, editing one progress
message at the same safe rate as answers.
"""
from __future__ import annotations

import logging
from typing import Any

from aiogram import Bot, Router
from aiogram.filters import Command, CommandObject
from aiogram.types import Message

from engine.errors import EngineError
from engine.face import EngineFace

from bot.background import Background
from bot.config import BotSettings
from bot.filters import IsAdmin
from bot.i18n import t
from bot.metrics import BotMetrics
from bot.storage import Store
from bot.streaming import ChatPacer, ReplyStream, edit_progress

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """The engine has no working training service."""


def service(engine: EngineFace) -> Any:
    try:
        svc = engine.training
    except Exception as exc:
        raise Unavailable(str(exc)) from exc
    if svc is None:
        raise Unavailable("engine.training is None")
    return svc


async def call_training(message: Message, lang: str, fn_name: str, *args: Any, engine: EngineFace, **kw: Any) -> Any:
    """Call engine.training.<fn_name>; reply and return None when unavailable or refused."""
    try:
        return await getattr(service(engine), fn_name)(*args, **kw)
    except EngineError as exc:
        await message.answer(t(lang, "training_refused", reason=str(exc)))
    except Exception as exc:  # missing, half-wired or broken service: not the admin's problem
        log.warning("training %s unavailable: %s", fn_name, exc, exc_info=not isinstance(exc, Unavailable))
        await message.answer(t(lang, "training_unavailable"))
    return None


def progress_bar(done: int, total: int, width: int = 12) -> str:
    frac = 0.0 if total <= 0 else max(0.0, min(1.0, done / total))
    full = round(frac * width)
    return f"[{'█' * full}{'░' * (width - full)}] {frac * 100:3.0f}%"


def format_event(ev: Any) -> str:
    domain = ev.domain
    if ev.kind == "queued":
        return f"🕒 Training {domain}: queued (job {ev.job_id})"
    if ev.kind in ("started", "progress"):
        lines = [f"🏋️ Training {domain} (job {ev.job_id})", f"{progress_bar(ev.step, ev.total_steps)}  "
                 f"step {ev.step}/{ev.total_steps}"]
        extra = []
        if ev.loss is not None:
            extra.append(f"loss {ev.loss:.4f}")
        if ev.eta_s is not None:
            extra.append(f"eta {int(ev.eta_s)} s")
        if extra:
            lines.append(" · ".join(extra))
        return "\n".join(lines)
    if ev.kind == "evaluating":
        return f"🧪 Training {domain}: evaluating on the held-out split…\n{progress_bar(1, 1)}"
    if ev.kind == "finished":
        m = ev.metrics
        parts = [f"eval loss {m['eval_loss']:.4f}" if "eval_loss" in m else ""]
        if "eval_loss_base" in m:
            parts.append(f"base {m['eval_loss_base']:.4f}")
        if m.get("eval_loss_previous") is not None:
            parts.append(f"previous {m['eval_loss_previous']:.4f}")
        if "eval_perplexity" in m:
            parts.append(f"perplexity {m['eval_perplexity']:.3g}")
        verdict = "promoted, now serving" if ev.promoted else \
            f"kept as a candidate (/promote {domain} {ev.version})"
        return f"✅ {domain} {ev.version or ''}: {', '.join(p for p in parts if p)}\n{verdict}"
    if ev.kind == "failed":
        return f"❌ Training {domain} failed: {ev.message or 'unknown reason'}"
    if ev.kind == "cancelled":
        return f"⏹ Training {domain} cancelled"
    return f"Training {domain}: {ev.kind}"


async def on_train(
    message: Message, command: CommandObject, bot: Bot, engine: EngineFace, store: Store, lang: str, pacer: ChatPacer,
    metrics: BotMetrics, settings: BotSettings, background: Background,
) -> None:
    domain = (command.args or "").strip().split(" ")[0]
    if not domain:
        await message.answer(t(lang, "usage_train"))
        return
    assert message.from_user is not None
    admin = message.from_user.id
    job = await call_training(message, lang, "start", domain, requested_by=f"admin:{admin}", engine=engine)
    if job is None:
        store.log_admin(admin, "train", domain, "refused")
        return
    store.log_admin(admin, "train", domain, f"started {getattr(job, 'id', '')}")
    stream = ReplyStream(bot, message.chat.id, pacer, metrics=metrics, typing=False, markdown=False,
                         attempts=settings.telegram_retry_attempts)
    stream.set_text(f"🕒 Training {domain}: starting…")

    async def follow() -> None:
        last = await edit_progress(stream, job.events(), format_event)
        if last is not None:
            store.log_admin(admin, "train_result", domain, f"{last.kind} {last.version or ''} {last.message}")

    background.spawn(follow(), name=f"train-progress-{domain}")


async def on_cancel(message: Message, engine: EngineFace, store: Store, lang: str) -> None:
    assert message.from_user is not None
    try:
        svc = service(engine)
        job = await svc.cancel()
    except Exception as exc:
        log.warning("training cancel unavailable: %s", exc)
        await message.answer(t(lang, "training_unavailable"))
        return
    store.log_admin(message.from_user.id, "cancel", "", getattr(job, "id", "") if job else "none")
    if job is None:
        await message.answer(t(lang, "training_none"))
    else:
        await message.answer(t(lang, "training_cancelled", job=getattr(job, "id", "?"), domain=getattr(job, "domain", "?")))


async def on_rollback(message: Message, command: CommandObject, engine: EngineFace, store: Store, lang: str) -> None:
    domain = (command.args or "").strip()
    if not domain:
        await message.answer(t(lang, "usage_rollback"))
        return
    version = await call_training(message, lang, "rollback", domain, engine=engine)
    assert message.from_user is not None
    store.log_admin(message.from_user.id, "rollback", domain, str(version))
    if version is not None:
        await message.answer(t(lang, "rollback_done", domain=domain, version=version))


async def on_promote(message: Message, command: CommandObject, engine: EngineFace, store: Store, lang: str) -> None:
    args = (command.args or "").split()
    if len(args) != 2:
        await message.answer(t(lang, "usage_promote"))
        return
    version = await call_training(message, lang, "promote", args[0], args[1], engine=engine)
    assert message.from_user is not None
    store.log_admin(message.from_user.id, "promote", " ".join(args), str(version))
    if version is not None:
        await message.answer(t(lang, "promote_done", domain=args[0], version=version))


async def on_export(message: Message, command: CommandObject, engine: EngineFace, store: Store, lang: str) -> None:
    domain = (command.args or "").strip()
    if not domain:
        await message.answer(t(lang, "usage_export"))
        return
    pairs = store.liked_pairs(domain)
    assert message.from_user is not None
    if not pairs:
        await message.answer(t(lang, "export_none", domain=domain))
        return
    rows = await call_training(message, lang, "export_examples", domain, pairs, engine=engine)
    store.log_admin(message.from_user.id, "export", domain, f"{rows} rows from {len(pairs)} pairs")
    if rows is not None:
        await message.answer(t(lang, "export_done", domain=domain, rows=rows, pairs=len(pairs)))


def router() -> Router:
    """Attach after the admin router: its refusal handler keeps non-admins out of these."""
    r = Router(name="training")
    r.message.filter(IsAdmin())
    r.message.register(on_train, Command("train"))
    r.message.register(on_cancel, Command("cancel"))
    r.message.register(on_rollback, Command("rollback"))
    r.message.register(on_promote, Command("promote"))
    r.message.register(on_export, Command("export"))
    return r
