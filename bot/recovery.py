"""What a start owes the people a killed or stopped bot left waiting.

- Answers cut off by a kill (OOM killer, `docker kill`, power loss): the store marks them
  interrupted at start; each user is told, in their language, with a button that answers
  the question again.
- Admins' training progress messages: a job the bot ran died with it (or ended while the
  bot was down), so its message froze at "step 1/6". Once the job log knows how the job
  ended, the message is edited to say so (or, if Telegram no longer lets it be edited, a
  reply says it).

Both run as background tasks after Telegram is reachable; sends go through the same
pacing and retries as answers.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiogram import Bot
from aiogram.exceptions import TelegramBadRequest, TelegramForbiddenError
from aiogram.types import ReplyParameters

from engine.types import TrainingEvent

from bot.admin_format import format_event
from bot.i18n import t
from bot.keyboards import retry_keyboard
from bot.pacing import ChatPacer, Retry
from bot.storage import InterruptedAnswer, Store, TrainingReport
from bot.streaming import Gone, ReplyStream, TelegramWriter

log = logging.getLogger(__name__)

#: How often the job log is read while a reported job still shows "running" (its process
#: has not died yet, or is still being reaped).
TRAINING_POLL_S = 2.0


async def tell_interrupted(bot: Bot, pacer: ChatPacer, retry: Retry, answers: list[InterruptedAnswer]) -> None:
    """One notice per chat whose last answer a restart cut off, with a Retry button."""
    for a in answers:
        if a.chat_id is None:  # the console's; it says so itself
            continue
        stream = ReplyStream(bot, a.chat_id, pacer, typing=False, markdown=False, retry=retry)
        stream.set_text(t(a.language, "interrupted_notice"))
        try:
            await stream.finish(markup=retry_keyboard(a.id, a.language))
        except Exception:
            log.exception("telling chat %s about its interrupted answer failed", a.chat_id)


def final_event(record: Any) -> TrainingEvent:
    """A job log record (engine.training.jobs.JobRecord) as the final event the progress message shows."""
    kind = {"promoted": "finished", "candidate": "finished"}.get(record.status, record.status)
    if kind not in ("finished", "failed", "cancelled"):
        kind = "failed"
    return TrainingEvent(record.job_id, record.domain, kind, message=record.message, version=record.version,
                         metrics=dict(record.metrics or {}), promoted=record.status == "promoted")


async def finish_training_reports(bot: Bot, store: Store, engine: Any, pacer: ChatPacer, retry: Retry,
                                  poll_s: float = TRAINING_POLL_S) -> None:
    """Edit every progress message a stopped bot left behind once its job's end is known."""
    reports = store.unreported_training()
    if not reports:
        return
    try:
        service = engine.training
        history = service.history
    except Exception as exc:
        log.info("%d training progress messages left behind, but the engine has no job log (%s)", len(reports), exc)
        return
    log.info("finishing %d training progress messages left by the previous run", len(reports))
    while reports:
        records = {r.job_id: r for r in await asyncio.to_thread(history, 1000)}
        current = service.current()
        for report in list(reports):
            record = records.get(report.job_id)
            if record is None or record.status == "running" or (current and current.id == report.job_id):
                if record is None:
                    log.warning("training job %s is not in the job log; its progress message stays", report.job_id)
                    store.training_reported(report.job_id, "unknown")
                    reports.remove(report)
                continue
            await _show_outcome(bot, pacer, retry, report, final_event(record))
            store.training_reported(report.job_id, record.status)
            reports.remove(report)
        if reports:
            await asyncio.sleep(poll_s)


async def _show_outcome(bot: Bot, pacer: ChatPacer, retry: Retry, report: TrainingReport, ev: TrainingEvent) -> None:
    text = format_event(ev, report.language)
    writer = TelegramWriter(bot, report.chat_id, pacer, retry=retry)
    try:
        await writer.call(lambda: bot.edit_message_text(text=text, chat_id=report.chat_id,
                                                        message_id=report.message_id), final=True)
        log.info("training job %s: progress message %s now says how it ended (%s)",
                 report.job_id, report.message_id, ev.kind)
        return
    except (Gone, TelegramBadRequest) as exc:  # deleted, or too old to edit: say it in a reply
        log.info("training job %s: cannot edit progress message %s (%s); replying", report.job_id,
                 report.message_id, exc)
    except TelegramForbiddenError:
        log.info("training job %s: the admin blocked the bot", report.job_id)
        return
    reply = ReplyParameters(message_id=report.message_id, allow_sending_without_reply=True)
    try:
        await writer.call(lambda: bot.send_message(chat_id=report.chat_id, text=text, reply_parameters=reply),
                          final=True)
    except Exception:
        log.exception("telling admin %s how training job %s ended failed", report.admin_id, report.job_id)
