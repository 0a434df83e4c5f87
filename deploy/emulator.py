"""The Telegram emulator of the tests (tests/fakes/telegram.py), run on its own for deploy/smoke.sh.

    python deploy/emulator.py ADDRESS_FILE

Serves the Bot API on 127.0.0.1 (a free port) for a bot started with BOT_API_URL pointed at
it, and a small control API beside it (another free port) through which the smoke script
plays the user with curl:

    POST /say   {"user": 7, "text": "Hello", "timeout": 300}
                -> {"reply": "...", "seconds": 4.2, "edits": 12}
                   the bot's next finished answer (a new message of the bot that carries the
                   feedback buttons), or 504 with the last Bot API calls when none comes
    GET  /calls -> {"getUpdates": 31, "sendMessage": 1, ...}: what the bot has called so far

Writes {"api": URL, "control": URL} to ADDRESS_FILE once both listen; runs until SIGTERM.
"""
from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fakes.telegram import FakeTelegram  # noqa: E402  (the repository's root on the path first)


def control_app(tg: FakeTelegram) -> web.Application:
    async def say(request: web.Request) -> web.Response:
        body = await request.json()
        user, text, timeout = int(body.get("user", 7)), str(body["text"]), float(body.get("timeout", 300))
        seen = {m.message_id for m in tg.bot_messages(user)}
        started = time.monotonic()
        tg.send_text(user, text)
        try:
            reply = await tg.wait_for(
                lambda: next((m for m in tg.bot_messages(user) if m.message_id not in seen and m.buttons), None),
                timeout)
        except AssertionError as exc:
            return web.json_response({"error": str(exc), "texts": tg.texts(user)[-3:]}, status=504)
        return web.json_response({"reply": reply.text, "seconds": round(time.monotonic() - started, 2),
                                  "edits": len(reply.edits)})

    async def calls(request: web.Request) -> web.Response:
        return web.json_response(dict(Counter(c.method for c in tg.calls)))

    app = web.Application()
    app.router.add_post("/say", say)
    app.router.add_get("/calls", calls)
    return app


async def main(address_file: Path) -> None:
    tg = FakeTelegram()
    await tg.start()
    runner = web.AppRunner(control_app(tg), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    control = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    tmp = address_file.with_name(address_file.name + ".tmp")
    tmp.write_text(json.dumps({"api": tg.url, "control": control}))
    tmp.replace(address_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await tg.stop()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    asyncio.run(main(Path(sys.argv[1])))
