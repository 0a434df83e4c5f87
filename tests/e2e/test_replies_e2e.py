"""What the bot says where it used to say nothing, crash, or mislead (issue 9), through the fake Bot API.

Unknown commands and buttons, text Telegram should never send but a forged update can,
answers cut by MAX_NEW_TOKENS, section titles of the mode keyboard, and the admin replies.
"""
from __future__ import annotations

import pytest

from engine.errors import AdapterInvalid
from tests.conftest import ADMIN_ID
from tests.fakes.telegram import BOT_USERNAME

pytestmark = pytest.mark.timeout(120)


# ---- text that cannot be encoded ----------------------------------------------------------------


async def test_text_with_lone_surrogates_and_nul_is_answered_and_stored(tg, engine, start_bot):
    bot = await start_bot(engine)
    tg.send_text(7, "half an emoji \ud83d and a NUL\x00 here", first_name="Eve\udcff")
    answer = await tg.wait_for_buttons(7, "answer to: half an emoji \ufffd and a NUL here")
    assert answer.text == "[base:assistant] answer to: half an emoji \ufffd and a NUL here"
    assert engine.calls[0].user.first_name == "Eve\ufffd"
    rows = [r["text"] for r in bot.store.db["messages"].rows_where("role = 'user'")]
    assert rows == ["half an emoji \ufffd and a NUL here"]


async def test_a_message_of_only_undecodable_text_is_refused_in_words(tg, engine, start_bot):
    await start_bot(engine)
    tg.send_text(7, "\ud83d\ude00\udc00", language_code="ru")  # a pair (one character) is fine; a lone half not
    tg.send_text(7, "\udc00 \ud800", language_code="ru")
    await tg.wait_for_text(7, "Не удалось прочитать сообщение")
    assert [c.messages[-1].content for c in engine.calls] == ["😀\ufffd"]


# ---- commands the bot does not have ------------------------------------------------------------


@pytest.mark.parametrize(("language_code", "reply"), [
    ("en", "Unknown command /frobnicate. /help lists the commands."),
    ("ru", "Неизвестная команда /frobnicate. Список команд: /help."),
])
async def test_an_unknown_command_gets_a_reply_in_the_users_language(tg, engine, start_bot, language_code, reply):
    await start_bot(engine)
    tg.send_text(7, "/frobnicate now", language_code=language_code)
    await tg.wait_for_text(7, reply)
    assert engine.calls == []


async def test_a_mistyped_command_gets_a_suggestion_and_commands_ignore_case(tg, engine, start_bot):
    await start_bot(engine)
    tg.send_text(ADMIN_ID, "/stauts")
    hint = await tg.wait_for_text(ADMIN_ID, "Unknown command /stauts. Did you mean")
    assert "/status" in hint.text  # beside /stats, as close a typo
    tg.send_text(7, "/stauts")  # not an admin: no admin command is suggested
    reply = await tg.wait_for_text(7, "Unknown command /stauts.")
    assert "/status" not in reply.text
    tg.send_text(7, "/HELP")
    await tg.wait_for_text(7, "Write a question")


async def test_text_that_starts_with_a_slash_but_is_no_command_is_a_question(tg, engine, start_bot):
    await start_bot(engine)
    tg.send_text(7, "/etc/hosts, what is it?")
    await tg.wait_for_buttons(7, "answer to: /etc/hosts, what is it?")


async def test_in_groups_only_unknown_commands_addressed_to_the_bot_are_answered(tg, engine, start_bot):
    await start_bot(engine)
    group = -600
    tg.send_text(7, "/frobnicate", chat_id=group, chat_type="supergroup")  # maybe for another bot
    tg.send_text(7, "/frobnicate@other_bot", chat_id=group, chat_type="supergroup")
    tg.send_text(7, f"/frobnicate@{BOT_USERNAME}", chat_id=group, chat_type="supergroup")
    await tg.wait_for_text(group, "Unknown command /frobnicate")
    tg.send_text(7, f"@{BOT_USERNAME} hello", chat_id=group, chat_type="supergroup")
    await tg.wait_for_buttons(group, "answer to: hello")
    assert len([t for t in tg.texts(group) if "Unknown command" in t]) == 1


# ---- buttons ------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", ["nonsense", "mode:z:x:all", "fb:notanumber:1", ""])
async def test_a_button_the_bot_does_not_know_is_answered(tg, engine, start_bot, data):
    await start_bot(engine)
    tg.send_text(7, "/mode")
    menu = await tg.wait_for_text(7, "Choose a domain adapter and a role")
    query = tg.press(7, menu, data)
    await tg.wait_for(lambda: query in tg.callback_answers)
    assert "no longer active" in tg.callback_answers[query]["text"]


async def test_section_titles_explain_their_rows(tg, engine, start_bot):
    await start_bot(engine)
    tg.send_text(7, "/mode", language_code="ru")
    menu = await tg.wait_for_text(7, "Выберите доменный адаптер и роль")
    query = tg.press_button(7, menu, "ℹ️ роль", language_code="ru")
    await tg.wait_for(lambda: query in tg.callback_answers)
    assert tg.callback_answers[query]["text"].startswith("Роль:")
    query = tg.press_button(7, menu, "ℹ️ доменный адаптер", language_code="ru")
    await tg.wait_for(lambda: query in tg.callback_answers)
    assert tg.callback_answers[query]["text"].startswith("Доменный адаптер:")
    assert "✅ обычный ассистент" in [b["text"] for b in menu.buttons]  # nothing changed


# ---- answers cut at MAX_NEW_TOKENS -----------------------------------------------------------------


async def test_a_cut_answer_is_marked_can_be_continued_and_is_not_exported(tg, engine, start_bot):
    bot = await start_bot(engine)
    bot.store.touch_user(7)
    bot.store.set_mode(7, "legal", "lawyer")
    engine.script("A contract needs an off", finish_reason="length")
    tg.send_text(7, "what makes a contract?")
    cut = await tg.wait_for_buttons(7, "A contract needs an off")
    assert cut.text == "A contract needs an off\n\n✂️ Cut off at the length limit."
    assert [b["text"] for b in cut.buttons] == ["👍", "👎", "▶ Continue"]
    query = tg.press_button(7, cut, "👍")  # a like keeps the Continue button
    await tg.wait_for(lambda: query in tg.callback_answers and "👍 ✓" in [b["text"] for b in cut.buttons])
    assert "▶ Continue" in [b["text"] for b in cut.buttons]

    engine.script("er and an acceptance.")
    tg.press_button(7, cut, "Continue")
    rest = await tg.wait_for_buttons(7, "er and an acceptance.")
    assert [b["text"] for b in rest.buttons] == ["👍", "👎"] and "✂️" not in rest.text
    assert [m.content for m in engine.calls[1].messages] == [
        "what makes a contract?", "A contract needs an off", "Continue.",
    ]
    assert "▶ Continue" not in [b["text"] for b in cut.buttons]  # pressed once, gone
    cut_id = next(bot.store.db["messages"].rows_where("finish_reason = 'length'"))["id"]
    stale = tg.press(7, cut, f"cont:{cut_id}")  # an old keyboard: Continue on the answer that was continued
    await tg.wait_for(lambda: stale in tg.callback_answers)
    assert "Only the latest answer" in tg.callback_answers[stale]["text"]

    tg.send_text(ADMIN_ID, "/export legal")  # the only liked answer was cut: nothing to export
    await tg.wait_for_text(ADMIN_ID, "No liked answers in the legal domain yet.")
    assert engine.training.exported == []


# ---- admin replies -----------------------------------------------------------------------------


async def test_unknown_names_list_the_valid_ones_and_refusals_are_logged_truthfully(tg, engine, start_bot):
    bot = await start_bot(engine)
    valid = "Domains: finance, legal, medical."
    for command in ("/rollback nosuch", "/export nosuch", "/reload nosuch", "/promote nosuch v1"):
        tg.send_text(ADMIN_ID, command)
    await tg.wait_for(lambda: sum(valid in t for t in tg.texts(ADMIN_ID)) == 4)
    assert all("no liked answers" not in t.lower() for t in tg.texts(ADMIN_ID))
    tg.send_text(ADMIN_ID, "/promote legal v9")
    await tg.wait_for_text(ADMIN_ID, "legal has no version “v9”. Versions: v1 ▶.")

    engine.training.errors["rollback"] = AdapterInvalid("the engine refused legal/v0: bad weights; legal stays on v1")
    tg.send_text(ADMIN_ID, "/rollback legal")
    await tg.wait_for_text(ADMIN_ID, "Cannot roll back legal: the engine refused legal/v0")
    engine.training.errors["promote"] = AdapterInvalid("refused")
    tg.send_text(ADMIN_ID, "/promote legal v1")
    await tg.wait_for_text(ADMIN_ID, "Cannot promote legal v1: refused")
    assert not any("Cannot start training" in t for t in tg.texts(ADMIN_ID))
    actions = {(r["action"], r["args"]): r["result"] for r in bot.store.admin_actions()}
    assert actions[("rollback", "legal")].startswith("refused: the engine refused legal/v0")
    assert actions[("rollback", "nosuch")] == "refused: unknown domain"
    assert "None" not in actions.values()


async def test_reload_says_truthfully_what_it_did_without_raw_data(tg, engine, start_bot):
    await start_bot(engine)
    tg.send_text(ADMIN_ID, "/reload")
    ok = await tg.wait_for_text(ADMIN_ID, "Reload done")
    assert "unchanged: finance v1, legal v1, medical v1" in ok.text
    engine.broken["tax"] = "tax/v1 was trained for another base model"
    tg.send_text(ADMIN_ID, "/reload", language_code="ru")
    partial = await tg.wait_for_text(ADMIN_ID, "Reload finished with errors")
    assert "❌ tax: tax/v1 was trained for another base model" in partial.text
    tg.send_text(ADMIN_ID, "/reload tax")
    failed = await tg.wait_for_text(ADMIN_ID, "Reload failed")
    assert "Reload done" not in failed.text
    assert not any("{" in t or "}" in t for t in tg.texts(ADMIN_ID))  # no Python dicts


async def test_admin_replies_speak_russian_and_adapters_fit_a_phone(tg, engine, start_bot):
    await start_bot(engine)
    for command in ("/status", "/rollback", "/promote legal", "/export", "/train", "/adapters"):
        tg.send_text(ADMIN_ID, command, language_code="ru")
    await tg.wait_for(lambda: len(tg.texts(ADMIN_ID)) == 6)
    status, rollback, promote, export, train, adapters = tg.texts(ADMIN_ID)
    assert status.startswith("Модель: fake/SmolLM2") and "\nГотов: нет\n" in status  # engine.start() not called
    assert rollback == "Использование: /rollback <домен>"
    assert promote == "Использование: /promote <домен> <версия>"
    assert export == "Использование: /export <домен>"
    assert train.startswith("Использование: /train <домен>")
    assert adapters.splitlines()[:2] == ["finance · работает v1", "  ▶ v1 · loss 1.250"]
    assert max(len(line) for line in adapters.splitlines()) <= 32
