"""One conversation turn, front-end agnostic: history in, streamed answer out, both stored.

The Telegram handlers and the console chat both go through `ChatService`, so modes,
history, storage, queuing and cancelling behave the same in both. A front end passes a
*sink* (`ReplyStream` for Telegram, a terminal printer for the console) that shows pieces.

Per user, one generation is in flight: a message that arrives meanwhile waits its turn
(answered after, never interleaved), beyond `max_pending_per_user` the user is told to wait.
The answer is a stored row from its start and its text is saved as it grows (at most once
per PARTIAL_SAVE_S), so even a kill -9 leaves the partial answer behind, marked at the next
start; whatever was generated is saved again before the sink shows the final text, so a
stop, a crash of the Telegram side or a shutdown never loses the stored answer. Whatever
fails after the answer started (the engine or anything else) stops the sink: no "typing…"
is left running.

Before a turn starts, the user's token budget is checked (bot.budget: a user over it gets
`Outcome.OVER_BUDGET` and nothing is stored) and the request may be drawn into its domain's
A/B (bot.ab: the engine is asked for one of the two versions). The stored answer carries its
generated tokens (what the budget counts), the engine's audit stamp and its A/B arm.

Text is cleaned on the way in and out (`bot.text.clean`): a question of undecodable bytes
is refused (`Outcome.UNREADABLE`), one with some undecodable characters is answered.
"""
from __future__ import annotations

import asyncio
import enum
import inspect
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from engine.config import EngineSettings
from engine.face import EngineFace
from engine.types import GenerationResult, Mode, UserContext

from bot.ab import ABService, Draw
from bot.budget import Budgets, BudgetStatus
from bot.config import BotSettings
from bot.metrics import BotMetrics
from bot.storage import Store, UserRecord
from bot.text import clean, unreadable

log = logging.getLogger(__name__)

#: The longest a growing answer's text goes unsaved: what a kill -9 can cost at most.
PARTIAL_SAVE_S = 1.0


class Sink(Protocol):
    """Where a front end shows an answer: pieces as they come, then the stored result."""

    async def start(self) -> None: ...
    def feed(self, piece: str) -> None: ...
    async def abort(self) -> None: ...  # nothing was generated (an error before the first piece)
    async def complete(self, answer: "Answer") -> None: ...  # called after the answer is stored


class Outcome(enum.Enum):
    DONE = "done"
    STOPPED = "stopped"  # /stop
    CANCELLED = "cancelled"  # shutdown
    TOO_MANY = "too_many"  # the user's queue is full
    CLOSED = "closed"  # shutting down; nothing generated
    NOTHING = "nothing"  # /retry without an earlier question
    FAILED = "failed"  # the engine failed after some text; the error is raised after showing it
    UNREADABLE = "unreadable"  # the question held nothing but undecodable bytes; nothing stored
    OVER_BUDGET = "over_budget"  # the user's token budget is used up; nothing stored, `budget` says until when


@dataclass
class Answer:
    outcome: Outcome
    text: str = ""
    message_id: int | None = None  # the stored assistant message
    result: GenerationResult | None = None
    budget: BudgetStatus | None = None  # OVER_BUDGET: what is left and when it resets

    @property
    def cut(self) -> bool:
        """The model was stopped by MAX_NEW_TOKENS in mid-answer (front ends say so)."""
        return self.outcome is Outcome.DONE and self.result is not None and self.result.finish_reason == "length"


@dataclass
class _Session:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: int = 0
    task: asyncio.Task[Answer] | None = None
    stop_requested: bool = False


def mode_of(user: UserRecord) -> Mode:
    return Mode(adapter=user.adapter, role=user.role or "assistant")


#: MAX_NEW_TOKENS when the caller does not say (the engine's default setting).
DEFAULT_MAX_NEW_TOKENS: int = EngineSettings.model_fields["max_new_tokens"].default


class ChatService:
    def __init__(
        self, engine: EngineFace, store: Store, settings: BotSettings, metrics: BotMetrics | None = None, *,
        budgets: Budgets | None = None, ab: ABService | None = None,
    ) -> None:
        """`budgets`: token budgets (default: the settings', holding DEFAULT_MAX_NEW_TOKENS per answer);
        `ab`: the A/B tests (default: those stored, with an unseeded random generator)."""
        self.engine = engine
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.budgets = budgets or Budgets(settings, store, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, clock=store.clock)
        self.ab = ab or ABService(engine, store)
        self._sessions: dict[int, _Session] = {}
        self._tasks: set[asyncio.Task[Answer]] = set()
        self.closing = False

    # ---- asking -----------------------------------------------------------------------

    async def ask(
        self, user_id: int, text: str | None, sink: Sink, *, chat_id: int | None = None,
        user: UserContext | None = None, on_queued: Callable[[], Awaitable[None]] | None = None,
        started_at: float | None = None,
    ) -> Answer:
        """Answer `text` (None = answer the last question again, /retry) for `user_id`."""
        if text is not None:
            text = clean(text)
            if unreadable(text):
                return Answer(Outcome.UNREADABLE)
        s = self._sessions.setdefault(user_id, _Session())
        if self.closing:
            return Answer(Outcome.CLOSED)
        if s.lock.locked():
            if s.pending >= self.settings.max_pending_per_user:
                return Answer(Outcome.TOO_MANY)
            if on_queued is not None:
                await on_queued()
        s.pending += 1
        try:
            await s.lock.acquire()
        finally:
            s.pending -= 1
        try:
            if self.closing:
                return Answer(Outcome.CLOSED)
            s.stop_requested = False
            task = asyncio.create_task(
                self._turn(s, user_id, text, sink, chat_id, user, started_at or time.monotonic()),
                name=f"answer-{user_id}",
            )
            s.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return await task
        finally:
            s.task = None
            s.lock.release()

    def stop(self, user_id: int) -> bool:
        """Cancel the user's running answer (/stop); the partial answer is kept."""
        s = self._sessions.get(user_id)
        if s is None or s.task is None or s.task.done():
            return False
        s.stop_requested = True
        s.task.cancel()
        return True

    def generating(self) -> int:
        """Users with an answer being generated now."""
        return sum(1 for s in self._sessions.values() if s.task is not None and not s.task.done())

    def waiting(self) -> int:
        return sum(s.pending for s in self._sessions.values())

    async def shutdown(self, grace_s: float, cleanup_s: float = 3.0) -> None:
        """Take no new turns; let running answers finish for `grace_s`, then cancel and save them."""
        self.closing = True
        running = set(self._tasks)
        if running and grace_s > 0:
            log.info("waiting up to %.1f s for %d running answers", grace_s, len(running))
            _, running = await asyncio.wait(running, timeout=grace_s)
        for task in running:
            task.cancel()
        if running:
            log.info("cancelled %d running answers (partial answers saved)", len(running))
            await asyncio.wait(running, timeout=cleanup_s)

    # ---- one turn -----------------------------------------------------------------------

    async def _turn(
        self, s: _Session, user_id: int, text: str | None, sink: Sink, chat_id: int | None,
        user_ctx: UserContext | None, t0: float,
    ) -> Answer:
        record = self.store.get_user(user_id)
        if record is None:
            record = self.store.touch_user(user_id, language=(user_ctx.language if user_ctx else "en"))
        mode = mode_of(record)
        draw = await self.ab.draw(mode)
        # from the budget check to the answer's row (its hold) nothing awaits: no other turn can
        # be admitted in between (bot.budget)
        budget = self.budgets.status(user_id, unlimited_too=False)
        if not budget.allowed:
            self._count("over_budget")
            if self.metrics:
                for p in budget.periods:
                    if p.exhausted:
                        self.metrics.budget_refusals.labels(p.kind).inc()
            log.info("answer user=%s refused: token budget used up until %s", user_id, budget.resets_at)
            return Answer(Outcome.OVER_BUDGET, budget=budget)
        if text is None:
            if self.store.retry_point(user_id, chat_id) is None:
                return Answer(Outcome.NOTHING)
        else:
            self.store.add_message(user_id, "user", text, conversation=record.conversation, chat_id=chat_id)
        history = self.store.history(user_id, self.settings.history_turns, chat_id)
        answer_id = self.store.begin_answer(user_id, conversation=record.conversation, chat_id=chat_id,
                                            adapter=mode.adapter, template=mode.role,
                                            reserved_tokens=self.budgets.hold_for(budget))
        parts: list[str] = []
        stream: Any = None
        outcome = Outcome.DONE
        error: BaseException | None = None
        saved_at = time.monotonic()
        if self.metrics:
            self.metrics.active_generations.inc()
        try:
            await sink.start()
            stream = self.engine.generate(history, mode, draw.params() if draw else None, user=user_ctx)
            if inspect.isawaitable(stream):
                stream = await stream
            async for piece in stream:
                piece = clean(piece)
                parts.append(piece)
                sink.feed(piece)
                if time.monotonic() - saved_at >= PARTIAL_SAVE_S:
                    saved_at = time.monotonic()
                    self._save_partial(answer_id, parts, stream)
        except asyncio.CancelledError:
            outcome = Outcome.STOPPED if s.stop_requested else Outcome.CANCELLED
        except Exception as exc:  # the engine's refusal, or anything else: the turn ends the same way
            error = exc  # raised below, after the sink is stopped; the front end's error handler logs it
        finally:
            if self.metrics:
                self.metrics.active_generations.dec()
            if stream is not None and (outcome is not Outcome.DONE or error is not None):
                await _close_quietly(stream)

        result: GenerationResult | None = getattr(stream, "result", None)
        answer_text = "".join(parts)
        if error is not None and not answer_text:
            self._forget(answer_id)
            await sink.abort()
            self._count("error")
            raise error
        answer = Answer(Outcome.FAILED if error else outcome, answer_text, None, result)
        try:
            if answer_text:
                self._save(answer_id, mode, answer_text, result, t0,
                           "error" if error else _finish_reason(outcome, result), draw, len(parts))
                answer.message_id = answer_id
            else:
                self._forget(answer_id)
        except Exception as exc:  # the disk is full, the volume read-only: show the text, then say so
            log.error("saving the answer of user %s failed", user_id, exc_info=exc)
            error = error or exc
        self._count("error" if error else outcome.value)
        log.info(
            "answer user=%s mode=%s outcome=%s chars=%d tokens=%s", user_id, mode.key,
            "error" if error else outcome.value, len(answer_text), result.completion_tokens if result else None,
        )
        try:
            await sink.complete(answer)
        except BaseException:
            await sink.abort()
            raise
        if error is not None:
            raise error
        return answer

    def _save_partial(self, answer_id: int, parts: list[str], stream: Any) -> None:
        try:
            self.store.save_partial(answer_id, "".join(parts), _tokens(getattr(stream, "result", None), len(parts)))
        except Exception:  # the final save tries again; the answer goes on
            log.warning("saving the partial answer %s failed", answer_id, exc_info=True)

    def _forget(self, answer_id: int) -> None:
        """Nothing was generated: the answer's row goes (the question stays, as before)."""
        try:
            self.store.delete_message(answer_id)
        except Exception:  # left 'streaming', the next start reports it as cut off: harmless
            log.warning("removing the empty answer %s failed", answer_id, exc_info=True)

    def _save(
        self, answer_id: int, mode: Mode, text: str, result: GenerationResult | None, t0: float,
        finish_reason: str, draw: Draw | None, pieces: int,
    ) -> None:
        """The answer's final row: its tokens settle the budget, its stamp says what produced it.

        An A/B answer counts for the version the engine says it used; one that came from
        another version than drawn (the engine could not pin it) takes no part.
        """
        version = result.adapter_version if result else None
        in_ab = draw is not None and version == draw.version
        if draw is not None and not in_ab:
            log.warning("A/B %s: asked for %s %s, the engine answered with %s; not counted", draw.test.id,
                        mode.adapter, draw.version, version)
        tokens = _tokens(result, pieces)
        latency = round(time.monotonic() - t0, 4)
        stamp = result.stamp if result else None
        self.store.update_message(
            answer_id, text=text, adapter=mode.adapter, adapter_version=version,
            template=mode.role, prompt_tokens=result.prompt_tokens if result else None,
            completion_tokens=tokens, latency_s=latency,
            ttft_s=result.time_to_first_token_s if result else None, finish_reason=finish_reason,
            stamp=json.dumps(stamp.to_dict(), ensure_ascii=False) if stamp else None,
            ab_test=draw.test.id if in_ab and draw else None, ab_arm=draw.arm if in_ab and draw else None,
        )
        if self.metrics:
            labels = (mode.adapter or "base", mode.role)
            self.metrics.answers.labels(*labels).inc()
            self.metrics.answer_tokens.labels(*labels).inc(tokens)
            self.metrics.answer_seconds.observe(latency)
            if in_ab and draw:
                self.metrics.ab_answers.labels(draw.test.domain, draw.arm, draw.version).inc()

    def _count(self, outcome: str) -> None:
        if self.metrics:
            self.metrics.generations.labels(outcome).inc()


def _tokens(result: GenerationResult | None, pieces: int) -> int:
    """Generated tokens so far: the engine's count, or the pieces streamed where it has none yet."""
    return (result.completion_tokens if result is not None else 0) or pieces


def _finish_reason(outcome: Outcome, result: GenerationResult | None) -> str:
    if outcome is not Outcome.DONE:
        return "cancelled"
    return (result.finish_reason if result and result.finish_reason else "stop")


async def _close_quietly(stream: Any) -> None:
    close = getattr(stream, "aclose", None) or getattr(stream, "cancel", None)
    if close is None:
        return
    try:
        res = close()
        if inspect.isawaitable(res):
            await res
    except Exception:
        log.warning("closing the engine stream failed", exc_info=True)
