"""Streaming an answer into Telegram: one message edited as text arrives, within Telegram's limits.

- "typing" is shown (aiogram's ChatActionSender) until the first text is visible;
- text is appended without waiting on Telegram; a flusher task shows the newest text, at
  most one edit per STREAM_EDIT_INTERVAL_S per chat (shared by every stream in that chat),
  and never an edit that changes nothing;
- a 429 pauses the whole chat for its `retry_after` and the text that arrived meanwhile is
  shown in one edit afterwards (coalesced, never dropped); 5xx and network errors back off
  (bot.pacing.Retry): an edit in the middle gives up at once (newer text follows), the final
  one keeps trying through an outage of minutes and lands within seconds of Telegram's return;
- over 4096 characters the answer continues in new messages (bot.render.split_markdown);
- Markdown is rendered to entities; if Telegram still rejects them, the stream switches
  to plain text, so an answer is never lost to formatting;
- the final edit always carries the full text and, for answers, the feedback buttons.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from aiogram import Bot
from aiogram.exceptions import (
    TelegramBadRequest, TelegramForbiddenError, TelegramNetworkError, TelegramRetryAfter, TelegramServerError,
)
from aiogram.types import InlineKeyboardMarkup, ReplyParameters
from aiogram.utils.chat_action import ChatActionSender

from bot.metrics import BotMetrics
from bot.pacing import ChatPacer, Retry
from bot.render import Rendered, plain, render, split_markdown

log = logging.getLogger(__name__)

T = TypeVar("T")


class EntitiesRejected(Exception):
    """Telegram refused the formatting entities; the caller resends as plain text."""


class Gone(Exception):
    """The message to edit no longer exists (the user deleted it)."""


_SAME = object()  # "message is not modified": the chat already shows this


class TelegramWriter:
    """One chat's Telegram writes with pacing and retries; `final=False` calls give up fast.

    The backoff grows with the failures in a row, whichever call met them, so a stream does
    not hammer a Telegram that is down; the time a final call may keep trying is its own.
    """

    def __init__(self, bot: Bot, chat_id: int, pacer: ChatPacer, *, retry: Retry = Retry()) -> None:
        self.bot = bot
        self.chat_id = chat_id
        self.pacer = pacer
        self.retry = retry
        self._failures = 0  # 5xx / network errors in a row, for the backoff
        self._failing_since: float | None = None

    async def call(self, op: Callable[[], Awaitable[T]], *, final: bool) -> T | object | None:
        """Run `op` paced; None = skipped (not final) or gave up; _SAME = nothing to change."""
        deadline: float | None = None
        while True:
            await self.pacer.wait(self.chat_id)
            try:
                result = await op()
            except TelegramRetryAfter as exc:
                log.info("telegram flood control in chat %s: retry after %s s", self.chat_id, exc.retry_after)
                self.pacer.pause(self.chat_id, float(exc.retry_after))
            except (TelegramServerError, TelegramNetworkError) as exc:
                self._failed(exc)
            except TelegramBadRequest as exc:
                text = str(exc).lower()
                if "not modified" in text:
                    return _SAME
                if "parse entities" in text or "entity" in text:
                    raise EntitiesRejected(str(exc)) from exc
                if "message to edit not found" in text or "message_id_invalid" in text:
                    raise Gone(str(exc)) from exc
                raise
            else:
                self._recovered()
                return result
            if not final:
                return None
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.retry.for_s
            elif now >= deadline:
                log.error("telegram unavailable for chat %s for %.0f s (%d failed attempts): gave up on the final "
                          "text; the answer is saved", self.chat_id, self.retry.for_s, self._failures)
                return None

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        wait = self.retry.backoff(self._failures)
        self.pacer.pause(self.chat_id, wait)
        if self._failures == 1 or self._failures % 10 == 0:  # an outage of minutes: a line now and then
            log.warning("telegram error in chat %s (attempt %d, next in %.1f s): %s",
                        self.chat_id, self._failures, wait, exc)

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.info("telegram answers chat %s again after %.1f s and %d failed attempts",
                     self.chat_id, time.monotonic() - self._failing_since, self._failures)
        self._failures, self._failing_since = 0, None


@dataclass
class _Shown:
    message_id: int
    payload: Rendered
    markup: InlineKeyboardMarkup | None


class ReplyStream:
    """The Telegram side of one answer; see the module docstring.

    `feed()` never blocks; `finish()` waits until the final text is shown (or given up on).
    `markdown=False` shows text as is (used for admin progress messages).
    """

    def __init__(
        self, bot: Bot, chat_id: int, pacer: ChatPacer, *, metrics: BotMetrics | None = None,
        reply_to: int | None = None, thread_id: int | None = None, typing: bool = True,
        markdown: bool = True, retry: Retry = Retry(), empty_text: str = "…", started_at: float | None = None,
        on_first_message: Callable[[int], None] | None = None,
    ) -> None:
        """`on_first_message(message_id)` is called once the first message is in the chat."""
        self.bot = bot
        self.chat_id = chat_id
        self.writer = TelegramWriter(bot, chat_id, pacer, retry=retry)
        self.on_first_message = on_first_message
        self.metrics = metrics
        self.reply_to = reply_to
        self.thread_id = thread_id
        self.markdown = markdown
        self.empty_text = empty_text
        self.started_at = started_at if started_at is not None else time.monotonic()
        self._typing_enabled = typing
        self._typing: ChatActionSender | None = None
        self._raw = ""
        self._shown: list[_Shown] = []
        self._dirty = asyncio.Event()
        self._final: tuple[str, InlineKeyboardMarkup | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._plain_only = not markdown
        self._dead = False  # the user blocked the bot: stop writing, keep generating/saving
        self.first_text_at: float | None = None

    # ---- producer side --------------------------------------------------------------

    async def start(self) -> None:
        if self._typing_enabled:
            self._typing = ChatActionSender(bot=self.bot, chat_id=self.chat_id,
                                            message_thread_id=self.thread_id, action="typing")
            await self._typing.__aenter__()
        self._task = asyncio.create_task(self._flusher(), name=f"reply-stream-{self.chat_id}")

    def feed(self, piece: str) -> None:
        self._raw += piece
        self._dirty.set()

    def set_text(self, text: str) -> None:
        """Replace the whole text (progress messages)."""
        self._raw = text
        self._dirty.set()

    @property
    def text(self) -> str:
        return self._raw

    @property
    def message_ids(self) -> list[int]:
        return [s.message_id for s in self._shown]

    async def finish(self, suffix: str | None = None, markup: InlineKeyboardMarkup | None = None) -> list[int]:
        """Show the full text (+ suffix) and `markup` under the last message; returns the message ids."""
        if self._task is None:
            await self.start()
        self._final = (suffix or "", markup)
        self._dirty.set()
        assert self._task is not None
        try:
            await asyncio.shield(self._task)
        finally:
            await self._stop_typing()
        return self.message_ids

    async def abort(self) -> None:
        """Stop typing and the flusher without a final text (nothing was generated)."""
        await self._stop_typing()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    # ---- the flusher ----------------------------------------------------------------

    async def _flusher(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            final = self._final is not None
            try:
                await self._sync(final)
            except Exception:
                # an unexpected refusal must not stop the stream: the final edit still comes
                log.exception("updating the answer in chat %s failed", self.chat_id)
            if final:
                return

    async def _stop_typing(self) -> None:
        if self._typing is not None:
            typing, self._typing = self._typing, None
            try:
                await typing.__aexit__(None, None, None)
            except Exception:  # the typing indicator is cosmetic
                log.debug("stopping chat action failed", exc_info=True)

    def _payload(self, chunk: str) -> Rendered:
        return plain(chunk) if self._plain_only else render(chunk)

    async def _sync(self, final: bool) -> None:
        if self._dead:
            return
        raw = self._raw
        markup = None
        if final and self._final is not None:
            suffix, markup = self._final
            raw = f"{raw.rstrip()}\n\n{suffix}" if suffix and raw.strip() else (raw or suffix)
        chunks = split_markdown(raw)
        if not chunks:
            if not final:
                return
            chunks = [self.empty_text]
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            # a chunk followed by another is complete: showing it must not be skipped
            must = final or not last
            want_markup = markup if (final and last) else None
            try:
                ok = await self._show(i, chunk, want_markup, must)
            except EntitiesRejected as exc:
                log.warning("telegram rejected entities in chat %s (%s); switching to plain text", self.chat_id, exc)
                self._plain_only = True
                ok = await self._show(i, chunk, want_markup, must)
            except TelegramForbiddenError:
                log.info("chat %s blocked the bot; not writing there any more", self.chat_id)
                self._dead = True
                return
            if not ok:
                if not final:
                    self._dirty.set()  # try again with the newest text after the pause
                return

    async def _show(self, index: int, chunk: str, markup: InlineKeyboardMarkup | None, must: bool) -> bool:
        payload = self._payload(chunk)
        if not payload.text:
            return True
        if index < len(self._shown):
            shown = self._shown[index]
            if shown.payload == payload and shown.markup == markup:
                return True
            try:
                result = await self.writer.call(
                    lambda: self.bot.edit_message_text(
                        text=payload.text, chat_id=self.chat_id, message_id=shown.message_id,
                        entities=payload.entity_list, reply_markup=markup, parse_mode=None,
                    ),
                    final=must,
                )
            except Gone:
                self._shown = self._shown[:index]
                return await self._show(index, chunk, markup, must)
            if result is None:
                return False
            shown.payload, shown.markup = payload, markup
            return True
        reply = ReplyParameters(message_id=self.reply_to, allow_sending_without_reply=True) \
            if self.reply_to and index == 0 else None
        result = await self.writer.call(
            lambda: self.bot.send_message(
                chat_id=self.chat_id, text=payload.text, entities=payload.entity_list, reply_markup=markup,
                message_thread_id=self.thread_id, reply_parameters=reply, parse_mode=None,
            ),
            final=must,
        )
        if result is None or result is _SAME:
            return False
        self._shown.append(_Shown(result.message_id, payload, markup))  # type: ignore[union-attr]
        if self.first_text_at is None:
            self.first_text_at = time.monotonic()
            if self.metrics is not None:
                self.metrics.first_text.observe(self.first_text_at - self.started_at)
            await self._stop_typing()
            if self.on_first_message is not None:
                try:
                    self.on_first_message(self._shown[0].message_id)
                except Exception:  # bookkeeping must not cost the user the answer
                    log.exception("recording the first message of chat %s failed", self.chat_id)
        return True


async def edit_progress(stream: ReplyStream, events: Any, format_event: Callable[[Any], str]) -> Any:
    """Show each item of the async iterator `events` as the new text of one message; returns the last."""
    last = None
    await stream.start()
    try:
        async for ev in events:
            last = ev
            stream.set_text(format_event(ev))
    finally:
        await stream.finish()
    return last
