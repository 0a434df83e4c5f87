"""ReplyStream against the fake Bot API server: coalescing, refusals, deleted messages."""
from __future__ import annotations

import asyncio

import pytest
from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer

from bot.pacing import ChatPacer
from bot.streaming import ReplyStream
from tests.conftest import TEST_TOKEN

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def bot(tg):
    b = Bot(TEST_TOKEN, session=AiohttpSession(api=TelegramAPIServer.from_base(tg.url)))
    yield b
    await b.session.close()


async def test_text_arriving_faster_than_the_pace_is_coalesced_into_few_edits(tg, bot):
    stream = ReplyStream(bot, 7, ChatPacer(0.2), typing=False)
    await stream.start()
    for i in range(100):
        stream.feed(f"t{i} ")
        await asyncio.sleep(0)
    await stream.finish()
    assert tg.texts(7) == [" ".join(f"t{i}" for i in range(100))]
    writes = tg.calls_of("sendMessage", 7) + tg.calls_of("editMessageText", 7)
    assert len(writes) <= 4  # not one per piece
    assert tg.not_modified == 0


async def test_two_answers_in_one_chat_are_both_complete(tg, bot):
    pacer = ChatPacer(0.01)
    streams = [ReplyStream(bot, -100, pacer, typing=False) for _ in range(2)]
    for s in streams:
        await s.start()
    for i in range(30):
        for n, s in enumerate(streams):
            s.feed(f"s{n}w{i} ")
        await asyncio.sleep(0)
    await asyncio.gather(*(s.finish() for s in streams))
    assert sorted(tg.texts(-100)) == [" ".join(f"s{n}w{i}" for i in range(30)) for n in range(2)]


async def test_a_user_who_blocked_the_bot_ends_the_stream_quietly(tg, bot):
    tg.fail("sendMessage", 403, times=10, description="Forbidden: bot was blocked by the user")
    stream = ReplyStream(bot, 7, ChatPacer(0.0), typing=False)
    await stream.start()
    stream.feed("hello")
    assert await stream.finish() == []
    assert len(tg.calls_of("sendMessage", 7)) == 1  # gave up after the refusal, no retry storm


async def test_a_deleted_message_is_replaced_by_a_new_one(tg, bot):
    stream = ReplyStream(bot, 7, ChatPacer(0.0), typing=False)
    await stream.start()
    stream.feed("first part")
    await tg.wait_for(lambda: tg.texts(7))
    del tg.messages[(7, tg.bot_messages(7)[0].message_id)]  # the user deleted it
    stream.feed(" and the rest")
    ids = await stream.finish()
    assert tg.texts(7) == ["first part and the rest"]
    assert ids == [tg.bot_messages(7)[0].message_id]


async def test_an_empty_answer_still_shows_a_message(tg, bot):
    stream = ReplyStream(bot, 7, ChatPacer(0.0), typing=False, empty_text="(empty)")
    await stream.start()
    await stream.finish()
    assert tg.texts(7) == ["(empty)"]


async def test_typing_is_shown_until_the_first_text(tg, bot):
    stream = ReplyStream(bot, 7, ChatPacer(0.0), typing=True)
    await stream.start()
    await tg.wait_for(lambda: tg.calls_of("sendChatAction", 7))
    stream.feed("hi")
    await stream.finish()
    assert tg.calls_of("sendChatAction", 7)[0].params["action"] == "typing"
    first_send = tg.calls_of("sendMessage", 7)[0]
    assert all(c.at <= first_send.at for c in tg.calls_of("sendChatAction", 7))
