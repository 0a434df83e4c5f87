"""How much the Telegram front end can carry, against the fake Bot API server.

    python -m bench.bot_frontend [--users 100] [--messages 2] [--pieces 60] [--real-model]

Table 1 — the whole front end (long polling, middlewares, handlers, SQLite, streaming,
HTTP to the fake server) answering with a stub engine that streams `--pieces` pieces
instantly: updates handled per second, concurrently vs. the naive one-update-at-a-time
dispatcher, with the production edit pace (1 edit/s per chat) and with no pace at all.
Table 2 — the streaming layer alone: many answers streamed at once by ReplyStream
(coalesced, paced) vs. the naive "edit the message on every token".
Table 3 (with --real-model, when engine/engine.py exists) — time from a user's message to
the first visible text with the real default model, end to end through the bot.

The fake server runs in the same process and event loop, so its work is counted against
the bot: the numbers are a lower bound. Prints tables; asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer

from bot.app import BotApp
from bot.config import BotSettings
from bot.storage import Store
from bot.streaming import ChatPacer, ReplyStream
from tests.fakes.engine import FakeEngine
from tests.fakes.telegram import FakeTelegram

TOKEN = "123456:BENCH"


def _table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for n, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _api_calls(tg: FakeTelegram) -> int:
    return sum(1 for c in tg.calls if c.method in ("sendMessage", "editMessageText"))


async def _front_end(users: int, messages: int, pieces: int, delay: float, interval: float, concurrent: bool,
                     tmp: Path) -> list[Any]:
    async with FakeTelegram() as tg:
        engine = FakeEngine(default_pieces=[f" w{i}" for i in range(pieces)], default_delay=delay)
        settings = BotSettings(_env_file=None, bot_token=TOKEN, bot_api_url=tg.url,  # type: ignore[call-arg]
                               database_path=tmp / f"bench-{time.monotonic_ns()}.sqlite3",
                               stream_edit_interval_s=interval, rate_limit_messages=0,
                               max_pending_per_user=messages + 1, log_level="WARNING")
        store = Store(settings.database_path)
        app = BotApp(settings, engine, store, concurrent_updates=concurrent)
        task = asyncio.create_task(app.run(handle_signals=False))
        await tg.wait_for(lambda: tg.calls_of("getMe"), timeout=60)
        total = users * messages
        t0 = time.perf_counter()
        for m in range(messages):
            for u in range(users):
                tg.send_text(1000 + u, f"question {m}")
        await tg.wait_for(lambda: sum(1 for msg in tg.messages.values() if msg.from_bot and msg.buttons) >= total,
                          timeout=3600)
        elapsed = time.perf_counter() - t0
        app.request_stop()
        await task
        store.close()
        mode = "concurrent" if concurrent else "one at a time (naive)"
        pace = f"{interval:g} s" if interval else "none"
        stub = f"{pieces} x {delay * 1000:g} ms" if delay else f"{pieces}, instant"
        return [stub, mode, pace, total, f"{elapsed:.2f}", f"{total / elapsed:.1f}",
                f"{_api_calls(tg) / total:.1f}"]


async def _naive_stream(bot: Bot, chat_id: int, pieces: list[str]) -> None:
    text = pieces[0]
    msg = await bot.send_message(chat_id, text)
    for p in pieces[1:]:
        text += p
        await bot.edit_message_text(text=text, chat_id=chat_id, message_id=msg.message_id)


async def _paced_stream(bot: Bot, chat_id: int, pieces: list[str], pacer: ChatPacer) -> None:
    stream = ReplyStream(bot, chat_id, pacer, typing=False)
    await stream.start()
    for p in pieces:
        stream.feed(p)
        await asyncio.sleep(0)  # a model hands over one piece per decode step
    await stream.finish()


async def _streaming(answers: int, pieces: int) -> list[list[Any]]:
    rows = []
    words = [f" w{i}" for i in range(pieces)]
    for name in ("ReplyStream (1 edit/s per chat)", "naive: edit on every piece"):
        async with FakeTelegram() as tg:
            bot = Bot(TOKEN, session=AiohttpSession(api=TelegramAPIServer.from_base(tg.url)))
            pacer = ChatPacer(1.0)
            t0 = time.perf_counter()
            if name.startswith("naive"):
                await asyncio.gather(*(_naive_stream(bot, 2000 + i, words) for i in range(answers)))
            else:
                await asyncio.gather(*(_paced_stream(bot, 2000 + i, words, pacer) for i in range(answers)))
            elapsed = time.perf_counter() - t0
            want = "".join(words).strip()
            complete = sum(1 for i in range(answers) if [t.strip() for t in tg.texts(2000 + i)] == [want])
            await bot.session.close()
            rows.append([name, answers, pieces, f"{elapsed:.2f}", _api_calls(tg), f"{_api_calls(tg) / answers:.1f}",
                         f"{complete}/{answers}"])
    return rows


async def _real_model(tmp: Path, repeats: int) -> list[list[Any]] | str:
    try:
        from engine import Engine
        from engine.config import load_settings

        Engine  # noqa: B018  (resolves the lazy import: fails when engine/engine.py is missing)
    except (ImportError, AttributeError) as exc:
        return f"skipped: the real engine is not available ({exc})"
    repo = Path(__file__).resolve().parents[1]
    engine = Engine(load_settings(model_cache_dir=repo / "models", adapters_dir=repo / "adapters",
                                  templates_dir=repo / "templates", max_new_tokens=48, temperature=0.0))
    t_load = time.perf_counter()
    await engine.start()
    load_s = time.perf_counter() - t_load
    rows: list[list[Any]] = []
    async with FakeTelegram() as tg:
        settings = BotSettings(_env_file=None, bot_token=TOKEN, bot_api_url=tg.url,  # type: ignore[call-arg]
                               database_path=tmp / "real.sqlite3", log_level="WARNING")
        store = Store(settings.database_path)
        app = BotApp(settings, engine, store)
        task = asyncio.create_task(app.run(handle_signals=False))
        await tg.wait_for(lambda: tg.calls_of("getMe"), timeout=60)
        for label, users in (("1 user", 1), ("4 users at once", 4)):
            firsts: list[float] = []
            finals: list[float] = []
            for r in range(repeats):
                chats = [3000 + 10 * r + u + (100 if users > 1 else 0) for u in range(users)]
                t0 = time.perf_counter()
                for c in chats:
                    tg.send_text(c, "What is a contract? Answer briefly.")
                for c in chats:
                    await tg.wait_for(lambda c=c: tg.bot_messages(c), timeout=600)
                    firsts.append(time.perf_counter() - t0)
                for c in chats:
                    await tg.wait_for(lambda c=c: any(m.buttons for m in tg.bot_messages(c)), timeout=600)
                    finals.append(time.perf_counter() - t0)
            rows.append([label, len(firsts), f"{statistics.median(firsts):.2f}", f"{max(firsts):.2f}",
                         f"{statistics.median(finals):.2f}"])
        app.request_stop()
        await task
        store.close()
    await engine.close()
    rows.append(["(model load + adapters)", 1, f"{load_s:.2f}", "", ""])
    return rows


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print("Bot front end vs. the fake Bot API server (same process: its work counts against the bot).")
        d = args.piece_delay_ms / 1000
        rows = [
            await _front_end(args.users, args.messages, args.pieces, d, 1.0, True, tmp),
            await _front_end(args.naive_users, 1, args.pieces, d, 1.0, False, tmp),
            await _front_end(args.users, args.messages, args.pieces, 0.0, 1.0, True, tmp),
            await _front_end(args.users, args.messages, args.pieces, 0.0, 0.0, True, tmp),
            await _front_end(args.naive_users * 10, 1, args.pieces, 0.0, 1.0, False, tmp),
        ]
        _table("Table 1. Updates handled per second (an update = one question answered in full, streamed)",
               ["stub engine pieces", "dispatch", "edit pace", "updates", "seconds", "updates/s", "writes/answer"],
               rows)
        _table(f"Table 2. Streaming {args.answers} answers of {args.stream_pieces} pieces at once",
               ["strategy", "answers", "pieces", "seconds", "API writes", "writes/answer", "complete"],
               await _streaming(args.answers, args.stream_pieces))
        print("  (Telegram allows about one edit per second per chat: the naive way would be throttled by\n"
              "   429s to roughly one piece per second, the fake server does not enforce that.)")
        if args.real_model:
            real = await _real_model(tmp, args.repeats)
            if isinstance(real, str):
                print(f"\nTable 3. Time to first visible text with the real model: {real}")
            else:
                _table("Table 3. Real default model through the bot: seconds from the user's message",
                       ["load", "answers", "first text (median)", "first text (max)", "complete (median)"], real)


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--messages", type=int, default=2, help="questions per user (queued behind each other)")
    p.add_argument("--naive-users", type=int, default=5, help="load for the one-at-a-time baseline")
    p.add_argument("--pieces", type=int, default=60)
    p.add_argument("--piece-delay-ms", type=float, default=20.0, help="stub decode time per piece")
    p.add_argument("--answers", type=int, default=50)
    p.add_argument("--stream-pieces", type=int, default=200)
    p.add_argument("--real-model", action="store_true", help="also measure the real default model (slow)")
    p.add_argument("--repeats", type=int, default=3)
    asyncio.run(main(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cli())
