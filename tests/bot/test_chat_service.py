"""ChatService: one turn per user, queueing, stop, shutdown, engine errors; with the fake engine."""
from __future__ import annotations

import asyncio

import pytest

from bot.chat import Answer, ChatService, Outcome
from bot.config import BotSettings
from bot.storage import Store
from engine.errors import EngineError, InputTooLong
from tests.fakes.engine import FakeEngine

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A sink that keeps everything it is shown."""

    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name
        self.pieces: list[str] = []
        self.answer: Answer | None = None
        self.aborted = False

    async def start(self) -> None:
        self.log.append((self.name, "start"))

    def feed(self, piece: str) -> None:
        self.pieces.append(piece)
        self.log.append((self.name, "piece"))

    async def abort(self) -> None:
        self.aborted = True

    async def complete(self, answer: Answer) -> None:
        self.answer = answer
        self.log.append((self.name, "complete"))


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "bot.sqlite3")
    yield s
    s.close()


def service(engine, store, **kw) -> ChatService:
    return ChatService(engine, store, BotSettings(_env_file=None, **kw))


def assistant_rows(store):
    return [(r["text"], r["finish_reason"]) for r in store.db["messages"].rows_where("role = 'assistant'")]


async def test_a_second_question_waits_and_is_never_interleaved(store):
    engine = FakeEngine()
    gate = asyncio.Event()
    engine.script("one", gate=gate)
    chat, log = service(engine, store), []
    queued = asyncio.Event()

    async def on_queued():
        queued.set()

    first = asyncio.create_task(chat.ask(5, "q1", Recorder(log, "a")))
    await asyncio.sleep(0)
    second = asyncio.create_task(chat.ask(5, "q2", Recorder(log, "b"), on_queued=on_queued))
    await queued.wait()
    gate.set()
    a, b = await first, await second
    assert (a.outcome, b.outcome) == (Outcome.DONE, Outcome.DONE)
    names = [n for n, _ in log]
    assert names == sorted(names)  # every event of "a" before any of "b"
    assert [m.content for m in engine.calls[1].messages] == ["q1", "one", "q2"]


async def test_beyond_the_pending_limit_the_user_is_told_to_wait(store):
    engine = FakeEngine()
    gate = asyncio.Event()
    engine.script("one", gate=gate)
    chat, log = service(engine, store, max_pending_per_user=1), []
    first = asyncio.create_task(chat.ask(5, "q1", Recorder(log, "a")))
    await asyncio.sleep(0)
    second = asyncio.create_task(chat.ask(5, "q2", Recorder(log, "b")))
    await asyncio.sleep(0)
    third = await chat.ask(5, "q3", Recorder(log, "c"))
    assert third.outcome is Outcome.TOO_MANY
    other_user = await chat.ask(6, "hi", Recorder(log, "d"))  # others are not affected
    assert other_user.outcome is Outcome.DONE
    gate.set()
    assert (await first).outcome is Outcome.DONE and (await second).outcome is Outcome.DONE


async def test_an_error_before_any_text_is_raised_and_no_answer_is_stored(store):
    engine = FakeEngine()
    engine.script(error=InputTooLong("the message alone is 5000 tokens"))
    rec = Recorder([], "a")
    with pytest.raises(InputTooLong):
        await service(engine, store).ask(5, "q", rec)
    assert rec.aborted and rec.answer is None
    assert assistant_rows(store) == []


async def test_an_error_mid_stream_keeps_and_shows_the_partial_answer(store):
    engine = FakeEngine()
    engine.script(pieces=["so ", "far ", "so ", "good"], fail_after=2)
    rec = Recorder([], "a")
    with pytest.raises(EngineError):
        await service(engine, store).ask(5, "q", rec)
    assert rec.answer is not None and rec.answer.outcome is Outcome.FAILED
    assert assistant_rows(store) == [("so far ", "error")]


async def test_shutdown_lets_a_running_answer_finish_within_the_grace(store):
    engine = FakeEngine()
    gate = asyncio.Event()
    engine.script("complete answer", gate=gate)
    chat = service(engine, store)
    task = asyncio.create_task(chat.ask(5, "q", Recorder([], "a")))
    await asyncio.sleep(0)
    shutdown = asyncio.create_task(chat.shutdown(grace_s=60))
    await asyncio.sleep(0)
    assert (await chat.ask(6, "late", Recorder([], "b"))).outcome is Outcome.CLOSED
    gate.set()
    await shutdown
    assert (await task).outcome is Outcome.DONE
    assert assistant_rows(store) == [("complete answer", "stop")]


async def test_shutdown_after_the_grace_cancels_and_saves_the_partial_answer(store):
    engine = FakeEngine()
    script = engine.script(pieces=["partial ", "rest"], stepped=True)
    chat = service(engine, store)
    rec = Recorder([], "a")
    task = asyncio.create_task(chat.ask(5, "q", rec))
    while not rec.pieces:
        await asyncio.sleep(0)
    await chat.shutdown(grace_s=0)
    assert (await task).outcome is Outcome.CANCELLED
    assert assistant_rows(store) == [("partial ", "cancelled")]
    assert engine.calls[0].stream.closed
    script.allow()  # nothing is waiting any more


async def test_history_is_capped_to_the_configured_turns(store):
    engine = FakeEngine()
    chat = service(engine, store, history_turns=3)
    for i in range(4):
        await chat.ask(5, f"q{i}", Recorder([], str(i)))
    assert [m.content for m in engine.calls[-1].messages] == ["q2", "[base:assistant] answer to: q2", "q3"]


class BrokenSink(Recorder):
    """A front end that fails while showing the answer (a bug, a renderer crash): not the engine's error."""

    def feed(self, piece: str) -> None:
        super().feed(piece)
        if len(self.pieces) == 2:
            raise RuntimeError("the front end broke")


@pytest.mark.parametrize("where", ["engine", "front end"])
async def test_a_non_engine_error_after_the_answer_started_stops_the_sink(store, where):
    engine = FakeEngine()
    if where == "engine":
        engine.script(error=RuntimeError("not an EngineError"))
        rec = Recorder([], "a")
    else:
        engine.script(pieces=["so ", "far ", "and ", "beyond"])
        rec = BrokenSink([], "a")
    chat = service(engine, store)
    with pytest.raises(RuntimeError):
        await chat.ask(5, "q", rec)
    assert rec.aborted or rec.answer is not None, "the sink was left running (typing…, its flusher)"
    assert chat.generating() == 0
    if where == "front end":  # what was generated is kept
        assert assistant_rows(store) == [("so far ", "error")]
    else:
        assert assistant_rows(store) == []


async def test_the_answer_is_in_the_database_while_it_is_written(store, monkeypatch):
    import bot.chat

    monkeypatch.setattr(bot.chat, "PARTIAL_SAVE_S", 0.0)  # every piece, so the test needs no clock
    engine = FakeEngine()
    script = engine.script(pieces=["one ", "two ", "three"], stepped=True)
    rec = Recorder([], "a")
    task = asyncio.create_task(service(engine, store).ask(5, "q", rec))
    while len(rec.pieces) < 2:
        if len(rec.pieces) == 1:
            script.allow()
        await asyncio.sleep(0.01)
    assert assistant_rows(store) == [("one two ", "streaming")]  # what a kill -9 now would leave
    script.allow()
    assert (await task).outcome is Outcome.DONE
    assert assistant_rows(store) == [("one two three", "stop")]


async def test_a_question_left_unanswered_is_not_sent_with_the_next(store):
    """A kill before the first word (or an engine error) leaves a question without an answer: the next
    question goes to the model as itself, never as two user turns in a row."""
    store.touch_user(5)
    store.add_message(5, "user", "old question", conversation=1)
    store.add_message(5, "user", "another old one", conversation=1)
    engine = FakeEngine()
    await service(engine, store).ask(5, "new question", Recorder([], "a"))
    assert [(m.role, m.content) for m in engine.calls[0].messages] == [("user", "new question")]
