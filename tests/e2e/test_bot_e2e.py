"""The real bot (aiogram, long polling) against the fake Bot API server, driven as users would.

The engine is the scripted fake (tests/fakes/engine.py); everything from the HTTP update to
the HTTP edit is the production code path. Timing is controlled by gates and stepped
scripts, never by sleeping, and no assertion is about how long something took.
"""
from __future__ import annotations

import asyncio
import re

import pytest

from engine.errors import AdapterNotFound, EngineBusy
from engine.types import TrainingEvent
from tests.conftest import ADMIN_ID
from tests.fakes.engine import FakeEngine
from tests.fakes.telegram import BOT_ID, BOT_USERNAME, FakeTelegram

pytestmark = pytest.mark.timeout(120)


def joined(tg: FakeTelegram, chat_id: int, start: int = 0) -> str:
    """The text of the bot's messages from index `start`, as one string (whitespace-normalised)."""
    return " ".join(" ".join(tg.texts(chat_id)[start:]).split())


# ---- commands and modes ------------------------------------------------------------------


@pytest.mark.parametrize(("language_code", "greeting", "mode_word"), [
    ("en", "Hello, User7!", "plain assistant"),
    ("ru", "Здравствуйте, User7!", "обычный ассистент"),
    ("de", "Hello, User7!", "plain assistant"),  # unknown UI language: English
])
async def test_start_greets_in_the_users_language_with_the_current_mode(
    tg, engine, start_bot, language_code, greeting, mode_word
):
    await start_bot(engine)
    tg.send_text(7, "/start", language_code=language_code)
    msg = await tg.wait_for_text(7, greeting)
    assert mode_word in msg.text


async def test_language_command_switches_the_interface(tg, engine, start_bot):
    await start_bot(engine)
    tg.send_text(7, "/language")
    menu = await tg.wait_for_text(7, "Choose the interface language")
    tg.press_button(7, menu, "Русский")
    await tg.wait_for_text(7, "Язык интерфейса: русский")
    tg.send_text(7, "/help")  # Telegram still says "en"; the stored choice wins
    await tg.wait_for_text(7, "Напишите вопрос")


async def test_the_mode_keyboard_speaks_russian_to_russian_users(tg, engine, start_bot):
    await start_bot(engine)
    tg.send_text(7, "/mode", language_code="ru")
    menu = await tg.wait_for_text(7, "Выберите доменный адаптер и роль")
    labels = [b["text"] for b in menu.buttons]
    assert "⚖️ Право" in labels and "Юрист" in labels and "✅ обычный ассистент" in labels


async def test_mode_switching_via_buttons_changes_what_the_engine_is_asked(tg, engine, start_bot):
    await start_bot(engine)
    tg.send_text(7, "/mode")
    menu = await tg.wait_for_text(7, "Choose a domain adapter and a role")
    labels = [b["text"] for b in menu.buttons]
    assert any("Law" in x for x in labels) and any("Medicine" in x for x in labels)
    assert any("Lawyer" in x for x in labels) and any("plain assistant" in x for x in labels)

    tg.press_button(7, menu, "Law")
    await tg.wait_for(lambda: any(b["text"].startswith("✅") and "Law" in b["text"] for b in menu.buttons))
    tg.press_button(7, menu, "Lawyer")
    await tg.wait_for(lambda: any(b["text"] == "✅ Lawyer" for b in menu.buttons))
    assert "Law · Lawyer" in menu.text

    tg.send_text(7, "is this contract valid?")
    answer = await tg.wait_for_buttons(7, "answer to: is this contract valid?")
    assert answer.text.startswith("[legal:lawyer]")
    assert engine.calls[-1].mode.adapter == "legal" and engine.calls[-1].mode.role == "lawyer"

    tg.send_text(7, "/role")  # the role half only
    roles = await tg.wait_for_text(7, "Choose a role")
    assert not any("Law" == b["text"].strip("✅ ") for b in roles.buttons)
    tg.press_button(7, roles, "Doctor")
    await tg.wait_for(lambda: any(b["text"] == "✅ Doctor" for b in roles.buttons))
    tg.send_text(7, "/mode")
    menus = await tg.wait_for(lambda: [m for m in tg.bot_messages(7) if "Choose" in m.text][2:])
    tg.press_button(7, menus[0], "plain assistant")
    await tg.wait_for(lambda: any(b["text"] == "✅ plain assistant" for b in menus[0].buttons))
    tg.send_text(7, "hi")
    answer = await tg.wait_for_buttons(7, "answer to: hi")
    assert answer.text.startswith("[base:assistant]")


# ---- streaming ---------------------------------------------------------------------------


async def test_streamed_answer_is_edited_in_place_and_ends_with_the_full_text(tg, engine, start_bot):
    await start_bot(engine)
    pieces = ["Contracts ", "need ", "an ", "offer, ", "acceptance ", "and ", "consideration."]
    script = engine.script(pieces=pieces, stepped=True)
    tg.send_text(7, "what makes a contract?")
    await tg.wait_for(lambda: tg.calls_of("sendChatAction", 7))  # "typing" before any text
    first = await tg.wait_for_text(7, "Contracts")
    for i in range(1, len(pieces)):
        script.allow()
        await tg.wait_for(lambda i=i: "".join(pieces[: i + 1]).strip() in first.text)
    final = await tg.wait_for_buttons(7, "consideration.")
    assert final.message_id == first.message_id  # one message, edited
    assert final.text == "".join(pieces).strip()
    assert len(final.edits) >= len(pieces) - 1  # each stepped piece became visible by an edit
    assert tg.not_modified == 0  # never an edit that changes nothing
    assert [b["text"] for b in final.buttons] == ["👍", "👎"]


async def test_a_long_answer_continues_in_new_messages_and_nothing_is_lost(tg, engine, start_bot):
    await start_bot(engine)
    words = [f"w{i}" for i in range(2600)]  # ~ 13,000 characters
    text = " ".join(words[:700]) + "\n\n" + " ".join(words[700:1500]) + "\n" + " ".join(words[1500:])
    engine.script(pieces=[w + " " for w in text.split(" ")])
    tg.send_text(7, "tell me everything")
    await tg.wait_for(lambda: any(m.buttons for m in tg.bot_messages(7)))
    msgs = tg.bot_messages(7)
    assert len(msgs) >= 4
    assert all(len(m.text) <= 4096 for m in msgs)
    assert joined(tg, 7).split() == words  # every word, in order, exactly once
    assert msgs[-1].buttons and not any(m.buttons for m in msgs[:-1])
    assert msgs[0].text.endswith("w699")  # the first cut falls on the paragraph break


async def test_flood_control_429_is_waited_out_without_losing_text(tg, engine, start_bot):
    await start_bot(engine)
    pieces = [f"part{i} " for i in range(8)]
    script = engine.script(pieces=pieces, stepped=True)
    tg.fail("editMessageText", 429, retry_after=1, times=1)
    tg.send_text(7, "go")
    msg = await tg.wait_for_text(7, "part0")
    script.allow(len(pieces))
    final = await tg.wait_for_buttons(7, "part7")
    assert final.text.split() == [p.strip() for p in pieces]
    refused = [c for c in tg.calls_of("editMessageText", 7) if c.status == 429]
    assert len(refused) == 1
    after = [c for c in tg.calls_of("editMessageText", 7) if c.at > refused[0].at]
    assert after and after[0].at - refused[0].at >= 0.9  # waited retry_after before touching the chat again
    assert msg.message_id == final.message_id


async def test_server_errors_are_retried_and_the_answer_arrives(tg, engine, start_bot):
    await start_bot(engine)
    tg.fail("sendMessage", 500, times=2)
    tg.send_text(7, "hello")
    final = await tg.wait_for_buttons(7, "answer to: hello")
    assert [c.status for c in tg.calls_of("sendMessage", 7)] == [500, 500, 200]
    assert final.text == "[base:assistant] answer to: hello"


async def test_rejected_formatting_falls_back_to_plain_text(tg, engine, start_bot):
    await start_bot(engine)
    engine.script("Use **bold** and `code` here")
    tg.fail("sendMessage", 400, times=5, when=lambda p: bool(p.get("entities")))
    tg.fail("editMessageText", 400, times=5, when=lambda p: bool(p.get("entities")))
    tg.send_text(7, "format please")
    final = await tg.wait_for_buttons(7, "here")
    assert final.text == "Use **bold** and `code` here"  # the raw text, nothing lost
    assert final.entities is None


async def test_markdown_is_rendered_as_entities(tg, engine, start_bot):
    await start_bot(engine)
    engine.script("Use **bold** here")
    tg.send_text(7, "format please")
    final = await tg.wait_for_buttons(7, "here")
    assert final.text == "Use bold here"
    assert final.entities == [{"type": "bold", "offset": 4, "length": 4}]


# ---- one answer at a time, stop, retry, new -------------------------------------------


async def test_a_message_during_an_answer_is_queued_and_answered_after_it(tg, engine, start_bot):
    await start_bot(engine)
    gate = asyncio.Event()
    engine.script("first answer", gate=gate)
    tg.send_text(7, "first question")
    await tg.wait_for(lambda: len(engine.calls) == 1)
    tg.send_text(7, "second question")
    await tg.wait_for_text(7, "after the current reply")
    assert len(engine.calls) == 1  # not started while the first is running
    gate.set()
    second = await tg.wait_for_buttons(7, "answer to: second question")
    first = next(m for m in tg.bot_messages(7) if m.text == "first answer")
    assert first.message_id < second.message_id
    assert [m.content for m in engine.calls[1].messages] == ["first question", "first answer", "second question"]


async def test_stop_cancels_the_running_answer_and_keeps_what_was_written(tg, engine, start_bot):
    bot = await start_bot(engine)
    script = engine.script(pieces=["Partial ", "answer ", "never ", "finished"], stepped=True)
    tg.send_text(7, "long question")
    await tg.wait_for_text(7, "Partial")
    script.allow()
    await tg.wait_for_text(7, "Partial answer")
    tg.send_text(7, "/stop")
    final = await tg.wait_for_text(7, "⏹ stopped")
    assert final.text.startswith("Partial answer")
    assert "finished" not in final.text
    assert engine.calls[0].stream.closed  # the engine stream was closed: generation stops
    rows = list(bot.store.db["messages"].rows_where("role = 'assistant'"))
    assert [(r["text"], r["finish_reason"]) for r in rows] == [("Partial answer ", "cancelled")]
    tg.send_text(7, "/stop")
    await tg.wait_for_text(7, "Nothing is being written")


async def test_retry_answers_the_last_question_again_without_the_old_answer(tg, engine, start_bot):
    await start_bot(engine)
    engine.script("answer one")
    engine.script("answer two")
    tg.send_text(7, "the question")
    await tg.wait_for_buttons(7, "answer one")
    tg.send_text(7, "/retry")
    await tg.wait_for_buttons(7, "answer two")
    assert [m.content for m in engine.calls[1].messages] == ["the question"]
    tg.send_text(7, "next")
    await tg.wait_for_buttons(7, "answer to: next")
    assert [m.content for m in engine.calls[2].messages] == ["the question", "answer two", "next"]


async def test_new_starts_a_fresh_conversation(tg, engine, start_bot):
    await start_bot(engine)
    tg.send_text(7, "old topic")
    await tg.wait_for_buttons(7, "answer to: old topic")
    tg.send_text(7, "/new")
    await tg.wait_for_text(7, "fresh conversation")
    tg.send_text(7, "new topic")
    await tg.wait_for_buttons(7, "answer to: new topic")
    assert [m.content for m in engine.calls[-1].messages] == ["new topic"]


async def test_retry_without_a_question_says_so(tg, engine, start_bot):
    await start_bot(engine)
    tg.send_text(7, "/retry")
    await tg.wait_for_text(7, "no earlier question")


# ---- many users, restart ----------------------------------------------------------------


async def test_twenty_users_at_once_each_get_their_own_complete_answer(tg, start_bot):
    engine = FakeEngine(default_delay=0.001)
    await start_bot(engine)
    users = range(100, 120)
    for u in users:
        tg.send_text(u, f"question from {u} " + "with some words " * 5)
    for u in users:
        msg = await tg.wait_for_buttons(u, f"answer to: question from {u} ")
        assert msg.text == f"[base:assistant] answer to: question from {u} " + " ".join(["with some words"] * 5)
        assert len(tg.bot_messages(u)) == 1
    assert len(engine.calls) == 20
    assert sorted(c.messages[-1].content.split()[2] for c in engine.calls) == sorted(str(u) for u in users)
    assert tg.not_modified == 0


async def test_restart_keeps_mode_and_history(tg, engine, start_bot):
    first = await start_bot(engine)
    tg.send_text(7, "/domain")
    menu = await tg.wait_for_text(7, "Choose a domain adapter")
    tg.press_button(7, menu, "Medicine")
    await tg.wait_for(lambda: any(b["text"] == "✅ 🩺 Medicine" for b in menu.buttons))
    tg.send_text(7, "I have a headache")
    await tg.wait_for_buttons(7, "answer to: I have a headache")
    await first.stop()

    second_engine = FakeEngine()
    await start_bot(second_engine)
    tg.send_text(7, "and a fever")
    answer = await tg.wait_for_buttons(7, "answer to: and a fever")
    assert answer.text.startswith("[medical:assistant]")
    assert [m.content for m in second_engine.calls[0].messages] == [
        "I have a headache", "[medical:assistant] answer to: I have a headache", "and a fever",
    ]


# ---- feedback, media, groups, access --------------------------------------------------------


async def test_feedback_is_stored_with_mode_and_adapter_version(tg, engine, start_bot):
    bot = await start_bot(engine)
    bot.store.touch_user(7)
    bot.store.set_mode(7, "finance", "financial_analyst")
    tg.send_text(7, "should I buy bonds?")
    answer = await tg.wait_for_buttons(7, "answer to: should I buy bonds?")
    query = tg.press_button(7, answer, "👍")
    await tg.wait_for(lambda: query in tg.callback_answers)
    await tg.wait_for(lambda: any("✓" in b["text"] for b in answer.buttons))
    rows = list(bot.store.db["feedback"].rows)
    assert [(r["rating"], r["adapter"], r["adapter_version"], r["template"]) for r in rows] == [
        (1, "finance", "v1", "financial_analyst")
    ]
    tg.press_button(7, answer, "👎")  # a change of mind replaces the rating
    await tg.wait_for(lambda: [r["rating"] for r in bot.store.db["feedback"].rows] == [-1])


@pytest.mark.parametrize("kind", ["photo", "voice", "sticker", "document", "dice"])
async def test_media_gets_a_polite_text_only_reply(tg, engine, start_bot, kind):
    await start_bot(engine)
    tg.send_media(7, kind)
    await tg.wait_for_text(7, "text only for now")
    assert engine.calls == []


async def test_group_chat_answers_only_mentions_and_replies(tg, engine, start_bot):
    await start_bot(engine)
    group = -500
    tg.send_text(7, "just chatting with friends", chat_id=group, chat_type="supergroup")
    tg.send_text(7, f"@{BOT_USERNAME} what is a tort?", chat_id=group, chat_type="supergroup")
    answer = await tg.wait_for_buttons(group, "answer to: what is a tort?")
    assert answer.reply_to is not None  # in a group, the answer replies to the question
    tg.send_text(8, "and negligence?", chat_id=group, chat_type="supergroup", reply_to=answer.message_id)
    await tg.wait_for_buttons(group, "answer to: and negligence?")
    tg.send_media(7, "photo", chat_type="supergroup", chat_id=group)  # not addressed: ignored
    tg.send_text(7, f"@{BOT_USERNAME} thanks", chat_id=group, chat_type="supergroup")
    await tg.wait_for_buttons(group, "answer to: thanks")
    assert [c.messages[-1].content for c in engine.calls] == ["what is a tort?", "and negligence?", "thanks"]
    assert not any("text only" in t for t in tg.texts(group))


async def test_allowed_user_ids_restricts_who_may_chat(tg, engine, start_bot):
    await start_bot(engine, allowed_user_ids="7")
    tg.send_text(8, "let me in")
    await tg.wait_for_text(8, "this bot is private")
    tg.send_text(7, "hello")
    await tg.wait_for_buttons(7, "answer to: hello")
    assert [c.messages[-1].content for c in engine.calls] == ["hello"]


async def test_rate_limit_answers_with_a_friendly_message(tg, engine, start_bot):
    await start_bot(engine, rate_limit_messages=2, rate_limit_window_s=3600)
    for i in range(4):
        tg.send_text(7, f"q{i}")
    await tg.wait_for_text(7, "faster than I can keep up")
    await tg.wait_for(lambda: len([m for m in tg.bot_messages(7) if m.buttons]) == 2)
    assert len(engine.calls) == 2
    assert sum("faster than" in t for t in tg.texts(7)) == 1  # told once per window, not per message


@pytest.mark.parametrize(("error", "reply"), [
    (EngineBusy("queue full (64)"), "overloaded"),
    (AdapterNotFound("no adapter 'legal'"), "adapter of your mode is not available"),
])
async def test_engine_errors_become_short_replies(tg, engine, start_bot, error, reply):
    await start_bot(engine)
    engine.script(error=error)
    tg.send_text(7, "hello")
    await tg.wait_for_text(7, reply)
    tg.send_text(7, "again")  # the bot keeps working
    await tg.wait_for_buttons(7, "answer to: again")


# ---- admin ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["/train legal", "/status", "/adapters", "/rollback legal", "/cancel"])
async def test_non_admins_are_refused_admin_commands(tg, engine, start_bot, command):
    await start_bot(engine)
    tg.send_text(7, command)
    await tg.wait_for_text(7, "for admins only")
    assert engine.training.job is None


async def test_status_and_adapters_for_admins(tg, engine, start_bot):
    await start_bot(engine)
    tg.send_text(ADMIN_ID, "/status")
    status = await tg.wait_for_text(ADMIN_ID, "Quantization: nf4")
    for part in ("Model: fake/SmolLM2", "legal v1", "Queue:", "active in 24 h", "Uptime:"):
        assert part in status.text
    tg.send_text(ADMIN_ID, "/adapters")
    adapters = await tg.wait_for_text(ADMIN_ID, "legal · serving v1")
    assert "▶ v1 · loss 1.250" in adapters.text


async def test_train_streams_progress_into_one_message(tg, engine, start_bot):
    bot = await start_bot(engine)
    engine.training.gate = asyncio.Event()
    engine.training.pause_before = 4  # queued, started, step 1, step 2 | step 3, ...
    tg.send_text(ADMIN_ID, "/train legal")
    progress = await tg.wait_for_text(ADMIN_ID, "step 2/4")
    assert re.search(r"\[██████░░░░░░\]  50%", progress.text)
    assert "loss 1.0000" in progress.text and "eta 2 s" in progress.text
    engine.training.gate.set()
    await tg.wait_for(lambda: progress.text.startswith("✅ legal v2"))
    assert "eval loss 1.5000" in progress.text and "base 2.5000" in progress.text and "promoted" in progress.text
    assert len([m for m in tg.bot_messages(ADMIN_ID) if "legal" in m.text]) == 1
    actions = [r["action"] for r in bot.store.admin_actions()]
    assert "train" in actions


async def test_train_while_training_is_refused_with_what_is_running(tg, engine, start_bot):
    await start_bot(engine)
    engine.training.gate = asyncio.Event()
    tg.send_text(ADMIN_ID, "/train legal")
    await tg.wait_for_text(ADMIN_ID, "Training legal")
    tg.send_text(ADMIN_ID, "/train medical")
    await tg.wait_for_text(ADMIN_ID, "Cannot start training medical: training legal is running")
    tg.send_text(ADMIN_ID, "/cancel")
    await tg.wait_for_text(ADMIN_ID, "Cancelled the training job")
    await tg.wait_for_text(ADMIN_ID, "⏹ Training legal cancelled")


@pytest.mark.parametrize("kind", ["none", "raises"])
async def test_training_commands_without_a_training_service_say_not_available(tg, start_bot, kind):
    await start_bot(FakeEngine(training=kind))
    for command in ("/train legal", "/cancel", "/rollback legal"):
        tg.send_text(ADMIN_ID, command)
    await tg.wait_for(lambda: sum("Training is not available" in t for t in tg.texts(ADMIN_ID)) == 3)
    assert not any("went wrong" in t for t in tg.texts(ADMIN_ID))


async def test_export_sends_liked_answers_of_the_domain_to_training(tg, engine, start_bot):
    bot = await start_bot(engine)
    bot.store.touch_user(7)
    bot.store.set_mode(7, "legal", "lawyer")
    tg.send_text(7, "what is bail?")
    answer = await tg.wait_for_buttons(7, "answer to: what is bail?")
    tg.press_button(7, answer, "👍")
    await tg.wait_for(lambda: list(bot.store.db["feedback"].rows))
    tg.send_text(ADMIN_ID, "/export legal")
    await tg.wait_for_text(ADMIN_ID, "Added 1 liked answers to the legal training data")
    assert engine.training.exported == [("legal", [("what is bail?", "[legal:lawyer] answer to: what is bail?")])]


# ---- shutdown, webhook --------------------------------------------------------------------


async def test_shutdown_during_an_answer_saves_and_shows_what_was_written(tg, engine, start_bot):
    bot = await start_bot(engine)
    script = engine.script(pieces=["Half ", "an ", "answer ", "and ", "more"], stepped=True)
    tg.send_text(7, "question")
    await tg.wait_for_text(7, "Half")
    script.allow()
    await tg.wait_for_text(7, "Half an")
    await bot.stop()
    final = tg.bot_messages(7)[-1]
    assert final.text.startswith("Half an") and "⏹" in final.text
    from bot.storage import Store

    store = Store(bot.app.settings.database_path)  # closed by stop(); reopen to read what was saved
    rows = [(r["role"], r["text"], r["finish_reason"]) for r in store.db["messages"].rows]
    store.close()
    assert rows == [("user", "question", None), ("assistant", "Half an ", "cancelled")]


async def test_webhook_mode_checks_the_secret_token(tg, engine, start_bot, unused_tcp_port):
    await start_bot(engine, webhook_url=f"http://127.0.0.1:{unused_tcp_port}/hook", webhook_secret="s3cret",
                    webhook_host="127.0.0.1", webhook_port=unused_tcp_port)
    await tg.wait_for(lambda: tg.webhook is not None)
    assert tg.webhook["secret_token"] == "s3cret"
    update = {"update_id": 1, "message": {"message_id": 1, "date": 0, "chat": {"id": 7, "type": "private"},
                                          "from": {"id": 7, "is_bot": False, "first_name": "A"}, "text": "via hook"}}
    assert await tg.post_to_webhook(update, "wrong") == 401
    assert await tg.post_to_webhook(update, "s3cret") == 200
    await tg.wait_for_buttons(7, "answer to: via hook")
    assert [c.messages[-1].content for c in engine.calls] == ["via hook"]


async def test_ops_port_reports_health_and_metrics_of_the_running_bot(tg, engine, start_bot):
    import aiohttp

    await engine.start()
    bot = await start_bot(engine, ops_host="127.0.0.1", ops_port=0)
    tg.send_text(7, "hello")
    await tg.wait_for_buttons(7, "answer to: hello")
    await tg.wait_for(lambda: bot.app.ops is not None and bot.app.ops.port)
    base = f"http://127.0.0.1:{bot.app.ops.port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/healthz") as r:
            health = await r.json()
            assert r.status == 200, health
        assert {name: c["ok"] for name, c in health["checks"].items()} == {"model": True, "bot": True,
                                                                            "database": True}
        async with s.get(f"{base}/metrics") as r:
            text = await r.text()
    assert 'bot_updates_total{type="message"} 1.0' in text
    assert "bot_messages_sent_total" in text and "llm_generated_tokens_total" in text  # bot's and engine's
    assert 'bot_generations_total{outcome="done"} 1.0' in text
    engine.closed = True  # the model is gone: health says so
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/healthz") as r:
            assert r.status == 503
            assert (await r.json())["failed"] == ["model"]
