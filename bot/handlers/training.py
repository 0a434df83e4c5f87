"""/train, /cancel, /rollback, /promote, /export: wired to `engine.training`.

/promote and /rollback change the serving version, so they end the domain's A/B (bot.ab).

Training is optional: when the engine has no training service the admin is told "training
is not available" — not an error. A volume that takes no writes is named as such (read-only,
full), and any other failure says that it failed, never that training does not exist.
/train answers at once and follows the job in a background task, editing one progress
message at the same safe rate as answers; the message is remembered in the store, so if the
bot stops before the job's end, the next start finishes it (bot.recovery).
"""
from __future__ import annotations

import logging
from typing import Any

from aiogram import Bot, Router
from aiogram.filters import Command, CommandObject
from aiogram.types import Message

from engine.errors import AdapterNotFound, EngineError, TrainingStorageError
from engine.face import EngineFace

from bot.ab import ABService, EndReason
from bot.admin_format import format_event, short
from bot.background import Background
from bot.config import BotSettings
from bot.filters import IsAdmin
from bot.handlers.admin import domain_names, unknown_domain
from bot.i18n import t
from bot.metrics import BotMetrics
from bot.stats_format import format_ab
from bot.storage import Store
from bot.pacing import ChatPacer, Retry
from bot.streaming import ReplyStream, edit_progress

log = logging.getLogger(__name__)



#: engine.training method -> the admin command that calls it (for error replies).
COMMAND_OF = {"start": "train", "rollback": "rollback", "promote": "promote", "export_examples": "export"}


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


async def call_training(
    message: Message, lang: str, fn_name: str, *args: Any, engine: Any, refused: str,
    words: dict[str, Any], **kw: Any,
) -> tuple[Any, str]:
    """Call engine.training.<fn_name>; returns (result, "") or (None, what happened for the admin log).

    A refusal is answered with the command's own words (`refused`, formatted with `words` and
    the reason); a missing or broken service with "training is not available".
    """
    try:
        return await getattr(service(engine), fn_name)(*args, **kw), ""
    except TrainingStorageError as exc:
        log.warning("training %s refused: %s", fn_name, exc)
        problem = {"read-only": "volume_readonly", "full": "volume_full", "denied": "volume_denied"}.get(exc.problem)
        await message.answer(t(lang, "train_storage", domain=words.get("domain", ""), path=exc.path,
                               problem=t(lang, problem) if problem else short(str(exc))))
        return None, f"refused: {exc}"
    except EngineError as exc:
        reason = str(exc)
        if isinstance(exc, AdapterNotFound) and "known:" not in reason:
            reason += "; " + t(lang, "unknown_domain", domain=words.get("domain", ""),
                               domains=", ".join(domain_names(engine)) or t(lang, "none"))
        log.info("training %s refused: %s", fn_name, exc)
        await message.answer(t(lang, refused, reason=short(reason), **words))
        return None, f"refused: {exc}"
    except (Unavailable, NotImplementedError, AttributeError) as exc:  # no service, or one half-wired
        log.warning("training %s unavailable: %s", fn_name, exc, exc_info=not isinstance(exc, Unavailable))
        await message.answer(t(lang, "training_unavailable"))
        return None, "unavailable"
    except Exception as exc:  # it exists and broke: say so, not that training does not exist
        log.error("training %s failed", fn_name, exc_info=exc)
        await message.answer(t(lang, "training_error", command=f"/{COMMAND_OF.get(fn_name, fn_name)}",
                               reason=short(f"{type(exc).__name__}: {exc}", 200)))
        return None, f"failed: {exc}"


def _args(command: CommandObject) -> list[str]:
    """Command arguments; domain names are lowercase on disk, so "/train Legal" means legal."""
    return (command.args or "").split()


def _serving(engine: Any, domain: str) -> str | None:
    info = engine.modes().adapter(domain)
    return info.current if info else None


async def on_train(
    message: Message, command: CommandObject, bot: Bot, engine: EngineFace, store: Store, lang: str, pacer: ChatPacer,
    metrics: BotMetrics, settings: BotSettings, background: Background,
) -> None:
    args = _args(command)
    if not args:
        await message.answer(t(lang, "usage_train"))
        return
    domain = args[0].lower()
    assert message.from_user is not None
    admin = message.from_user.id
    job, failure = await call_training(message, lang, "start", domain, requested_by=f"admin:{admin}",
                                       engine=engine, refused="train_refused", words={"domain": domain})
    if job is None:
        store.log_admin(admin, "train", domain, failure)
        return
    job_id = str(getattr(job, "id", ""))
    store.log_admin(admin, "train", domain, f"started {job_id}")
    chat_id = message.chat.id

    def remember(message_id: int) -> None:
        store.follow_training(job_id, domain, admin, chat_id, message_id, lang)

    stream = ReplyStream(bot, chat_id, pacer, metrics=metrics, typing=False, markdown=False,
                         retry=Retry.from_settings(settings), on_first_message=remember)
    stream.set_text(t(lang, "tr_starting", domain=domain))

    async def follow() -> None:
        last = await edit_progress(stream, job.events(), lambda ev: format_event(ev, lang))
        if last is not None:
            store.log_admin(admin, "train_result", domain, f"{last.kind} {last.version or ''} {last.message}")
            if last.final and stream.message_ids:
                store.training_reported(job_id, last.kind)

    background.spawn(follow(), name=f"train-progress-{domain}")


async def on_cancel(message: Message, engine: EngineFace, store: Store, lang: str) -> None:
    assert message.from_user is not None
    try:
        svc = service(engine)
        job = await svc.cancel()
    except EngineError as exc:
        log.info("training cancel refused: %s", exc)
        store.log_admin(message.from_user.id, "cancel", "", f"refused: {exc}")
        await message.answer(t(lang, "cancel_refused", reason=short(str(exc))))
        return
    except Exception as exc:
        log.warning("training cancel unavailable: %s", exc)
        await message.answer(t(lang, "training_unavailable"))
        return
    store.log_admin(message.from_user.id, "cancel", "", getattr(job, "id", "") if job else "none")
    if job is None:
        await message.answer(t(lang, "training_none"))
    else:
        await message.answer(t(lang, "training_cancelled", job=getattr(job, "id", "?"), domain=getattr(job, "domain", "?")))


async def on_rollback(message: Message, command: CommandObject, engine: Any, store: Store, ab: ABService,
                      lang: str) -> None:
    args = _args(command)
    if len(args) != 1:
        await message.answer(t(lang, "usage_rollback"))
        return
    domain = args[0].lower()
    assert message.from_user is not None
    if domain not in domain_names(engine):
        store.log_admin(message.from_user.id, "rollback", domain, "refused: unknown domain")
        await message.answer(unknown_domain(lang, domain, engine))
        return
    previous = _serving(engine, domain)
    version, failure = await call_training(message, lang, "rollback", domain, engine=engine,
                                           refused="rollback_refused", words={"domain": domain})
    store.log_admin(message.from_user.id, "rollback", domain, version or failure)
    if version is not None:
        await message.answer(t(lang, "rollback_done", domain=domain, version=version,
                               previous=previous or t(lang, "none")))
        await end_ab(message, ab, store, domain, "serving_changed", lang)


async def on_promote(message: Message, command: CommandObject, engine: Any, store: Store, ab: ABService,
                     lang: str) -> None:
    args = _args(command)
    if len(args) != 2:
        await message.answer(t(lang, "usage_promote"))
        return
    domain, version = args[0].lower(), args[1].lower()
    assert message.from_user is not None
    info = engine.modes().adapter(domain)
    if info is None:
        store.log_admin(message.from_user.id, "promote", f"{domain} {version}", "refused: unknown domain")
        await message.answer(unknown_domain(lang, domain, engine))
        return
    known = [v.version for v in info.versions]
    if version not in known:
        store.log_admin(message.from_user.id, "promote", f"{domain} {version}", "refused: unknown version")
        listed = ", ".join(f"{v}{' ▶' if v == info.current else ''}" for v in known) or t(lang, "none")
        await message.answer(t(lang, "unknown_version", domain=domain, version=version, versions=listed))
        return
    promoted, failure = await call_training(message, lang, "promote", domain, version, engine=engine,
                                            refused="promote_refused", words={"domain": domain, "version": version})
    store.log_admin(message.from_user.id, "promote", f"{domain} {version}", promoted or failure)
    if promoted is not None:
        await message.answer(t(lang, "promote_done", domain=domain, version=promoted))
        running = ab.running(domain)
        reason = "promoted" if running and running[0].candidate_version == promoted else "serving_changed"
        await end_ab(message, ab, store, domain, reason, lang)


async def end_ab(message: Message, ab: ABService, store: Store, domain: str, reason: EndReason, lang: str) -> None:
    """The serving version changed: the domain's A/B, if one ran, ends with its final counts."""
    ended = await ab.stop(domain, reason)
    if ended is not None:
        counts = store.ab_counts(ended.id)
        await message.answer(t(lang, "ab_ended_by", domain=domain) + "\n" + format_ab(ended, counts, lang))


async def on_export(message: Message, command: CommandObject, engine: Any, store: Store, lang: str) -> None:
    args = _args(command)
    if len(args) != 1:
        await message.answer(t(lang, "usage_export"))
        return
    domain = args[0].lower()
    assert message.from_user is not None
    admin = message.from_user.id
    if domain not in domain_names(engine):
        store.log_admin(admin, "export", domain, "refused: unknown domain")
        await message.answer(unknown_domain(lang, domain, engine))
        return
    pairs = store.liked_pairs(domain)
    if not pairs:
        store.log_admin(admin, "export", domain, "no liked answers")
        await message.answer(t(lang, "export_none", domain=domain))
        return
    rows, failure = await call_training(message, lang, "export_examples", domain, pairs, engine=engine,
                                        refused="export_refused", words={"domain": domain})
    store.log_admin(admin, "export", domain, f"{rows} rows from {len(pairs)} pairs" if rows is not None else failure)
    if rows is None:
        return
    key = "export_done" if rows else "export_nothing_new"
    await message.answer(t(lang, key, domain=domain, rows=rows, pairs=len(pairs)))


def router() -> Router:
    """Attach after the admin router: its refusal handler keeps non-admins out of these."""
    r = Router(name="training")
    r.message.filter(IsAdmin())
    r.message.register(on_train, Command("train", ignore_case=True))
    r.message.register(on_cancel, Command("cancel", ignore_case=True))
    r.message.register(on_rollback, Command("rollback", ignore_case=True))
    r.message.register(on_promote, Command("promote", ignore_case=True))
    r.message.register(on_export, Command("export", ignore_case=True))
    return r
