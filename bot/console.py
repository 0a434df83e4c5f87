"""The console chat: `python -m bot` without BOT_TOKEN talks to the same engine in a terminal.

It goes through the same ChatService as Telegram (modes, history and storage in the same
database, as user 0), so what works here works in the bot. Input is read line by line
from stdin by a daemon thread, so a pipe or tmux can drive it and Ctrl-C never waits on a
blocked read. EOF or /quit ends it; Ctrl-C stops the answer being written, or ends the
chat when nothing is being written; SIGTERM ends it.
"""
from __future__ import annotations

import asyncio
import getpass
import logging
import os
import signal
import sys
import threading
from typing import TextIO

from engine.errors import EngineError
from engine.face import EngineFace
from engine.types import UserContext

from bot.chat import Answer, ChatService, Outcome, mode_of
from bot.config import BotSettings
from bot.keyboards import describe_mode
from bot.storage import Store

log = logging.getLogger(__name__)

CONSOLE_USER_ID = 0  # Telegram ids are positive; the terminal user never collides with one

HELP = """Commands:
  /mode               show the current mode and what is available
  /adapter <name>     switch the domain adapter (/adapter none = the base model)
  /role <id>          switch the role template
  /reset              start a fresh conversation (also /new)
  /retry              answer the last question again
  /status             engine status
  /help               this help
  /quit               leave (also Ctrl-D; Ctrl-C stops an answer being written)"""


class ConsoleSink:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    async def start(self) -> None:
        self.out.write("bot> ")
        self.out.flush()

    def feed(self, piece: str) -> None:
        self.out.write(piece)
        self.out.flush()

    async def abort(self) -> None:
        self.out.write("\n")
        self.out.flush()

    async def complete(self, answer: Answer) -> None:
        if answer.outcome in (Outcome.STOPPED, Outcome.CANCELLED):
            self.out.write(" [stopped]")
        self.out.write("\n")
        self.out.flush()


def _start_reader(stream: TextIO, loop: asyncio.AbstractEventLoop, queue: "asyncio.Queue[str | None]") -> None:
    def read() -> None:
        try:
            for line in iter(stream.readline, ""):
                loop.call_soon_threadsafe(queue.put_nowait, line)
        except (ValueError, OSError):  # stdin closed under us
            pass
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, name="console-stdin", daemon=True).start()


def _language() -> str:
    lang = os.environ.get("LC_ALL") or os.environ.get("LANG") or ""
    return "ru" if lang.lower().startswith("ru") else "en"


class Console:
    def __init__(self, settings: BotSettings, engine: EngineFace, store: Store, out: TextIO) -> None:
        self.engine = engine
        self.store = store
        self.out = out
        self.chat = ChatService(engine, store, settings)
        self.lang = _language()
        try:
            name = getpass.getuser()
        except Exception:
            name = None
        self.user_ctx = UserContext(first_name=name, language=self.lang)
        self.store.touch_user(CONSOLE_USER_ID, name=name, language=self.lang)

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def mode_line(self) -> str:
        user = self.store.get_user(CONSOLE_USER_ID)
        assert user is not None
        mode = mode_of(user)
        return f"mode: {describe_mode(mode, 'en', self.engine.modes())} (adapter={mode.adapter or 'none'}, " \
               f"role={mode.role})"

    async def handle(self, line: str) -> bool:
        """One input line; False = leave."""
        text = line.strip()
        if not text:
            return True
        if not text.startswith("/"):
            await self.ask(text)
            return True
        cmd, _, arg = text.partition(" ")
        cmd, arg = cmd.lower(), arg.strip()
        user = self.store.get_user(CONSOLE_USER_ID)
        assert user is not None
        catalog = self.engine.modes()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            self.say(HELP)
        elif cmd == "/mode":
            adapters = ", ".join(a.name for a in catalog.adapters if a.current) or "none"
            roles = ", ".join(r.id for r in catalog.roles)
            self.say(f"{self.mode_line()}\nadapters: {adapters} (or none)\nroles: {roles}")
        elif cmd == "/adapter":
            name = None if arg.lower() in ("", "none", "base", "-") else arg
            if name is not None and catalog.adapter(name) is None:
                self.say(f"no adapter {name!r}; available: {', '.join(a.name for a in catalog.adapters) or 'none'}")
            else:
                self.store.set_mode(CONSOLE_USER_ID, name, user.role)
                self.say(self.mode_line())
        elif cmd == "/role":
            if catalog.role(arg) is None:
                self.say(f"no role {arg!r}; available: {', '.join(r.id for r in catalog.roles)}")
            else:
                self.store.set_mode(CONSOLE_USER_ID, user.adapter, arg)
                self.say(self.mode_line())
        elif cmd in ("/reset", "/new"):
            self.store.new_conversation(CONSOLE_USER_ID)
            self.say("fresh conversation; " + self.mode_line())
        elif cmd == "/retry":
            await self.ask(None)
        elif cmd == "/status":
            from bot.handlers.admin import format_status

            self.say(format_status(self.engine.status(), generating=self.chat.generating(), waiting=0,
                                   active_24h=self.store.active_users(), bot_uptime_s=0.0, training=None))
        else:
            self.say(f"unknown command {cmd}; /help lists them")
        return True

    async def ask(self, text: str | None) -> None:
        try:
            answer = await self.chat.ask(CONSOLE_USER_ID, text, ConsoleSink(self.out), user=self.user_ctx)
        except EngineError as exc:
            self.say(f"error: {type(exc).__name__}: {exc}")
            return
        if answer.outcome is Outcome.NOTHING:
            self.say("nothing to answer again")

    def interrupt(self) -> bool:
        """Ctrl-C: stop the running answer; False when there was none (then the chat ends)."""
        return self.chat.stop(CONSOLE_USER_ID)


async def run_console(settings: BotSettings, engine: EngineFace, store: Store, *, stdin: TextIO | None = None,
                      stdout: TextIO | None = None) -> None:
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    console = Console(settings, engine, store, out)
    interactive = stdin.isatty()

    leaving = False

    def leave() -> None:
        nonlocal leaving
        leaving = True
        console.interrupt()
        queue.put_nowait(None)

    def on_sigint() -> None:
        if not console.interrupt():
            leave()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGTERM, leave)
    _start_reader(stdin, loop, queue)
    logging.getLogger("bot").setLevel(max(logging.WARNING, logging.getLogger("bot").getEffectiveLevel()))
    console.say(f"Console chat ({console.mode_line()}). /help for commands, Ctrl-D to leave.")
    try:
        while True:
            if interactive:
                out.write("you> ")
                out.flush()
            line = await queue.get()
            if leaving or line is None or not await console.handle(line):
                break
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        await console.chat.shutdown(0.0)
        console.say("bye")
