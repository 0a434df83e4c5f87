"""The console chat: `python -m bot` without BOT_TOKEN talks to the same engine in a terminal.

It goes through the same ChatService as Telegram (modes, history and storage in the same
database, as user 0), so what works here works in the bot. Input is read line by line
from stdin by a daemon thread, so a pipe or tmux can drive it and Ctrl-C never waits on a
blocked read. Lines are read as bytes and decoded with replacement, then cleaned
(`bot.text.clean`), so any bytes at all are a question, never a crash. EOF or /quit ends
it; Ctrl-C stops the answer being written, or ends the chat when nothing is being written;
SIGTERM ends it.

The language (answers' role template and these replies) is the one stored for user 0: on
the first start it comes from LC_ALL / LC_MESSAGES / LANG, later `/language en|ru` sets it.

Without a terminal and without input (stdin is /dev/null, or a pipe that ends before any
question) the chat ends with exit status 2 and a message naming BOT_TOKEN: that is a
container started without a token, not a chat.
"""
from __future__ import annotations

import asyncio
import difflib
import logging
import os
import signal
import stat
import sys
import threading
import time
from typing import Any, Iterator, TextIO

from engine.errors import EngineError
from engine.face import EngineFace
from engine.types import ModeCatalog, UserContext

from bot.admin_format import format_status, training_summary
from bot.budget import Budgets, refusal_text, usage_text
from bot.chat import DEFAULT_MAX_NEW_TOKENS, Answer, ChatService, Outcome, mode_of
from bot.config import BotSettings
from bot.i18n import LANGUAGES, t
from bot.keyboards import describe_mode, domain_title, role_title
from bot.storage import Store
from bot.text import clean, parse_command

log = logging.getLogger(__name__)

CONSOLE_USER_ID = 0  # Telegram ids are positive; the terminal user never collides with one
EXIT_NO_INPUT = 2

COMMANDS = ("mode", "adapter", "role", "reset", "new", "retry", "continue", "language", "usage", "status", "help",
            "quit", "exit")
NO_INPUT = (
    "BOT_TOKEN is not set, so `python -m bot` started the console chat, but {why}. "
    "Set BOT_TOKEN (for example in .env) to run the Telegram bot, or run the console chat "
    "in a terminal or with questions piped into it."
)


def input_problem(stream: TextIO | None) -> str | None:
    """Why the console chat could never get a question from `stream` (known before loading anything), or None.

    /dev/null or a closed stdin (what a container gets without `-i`) can be recognised at
    once; a pipe cannot be told from a slow writer, so that case is decided at EOF.
    """
    if stream is None:
        return NO_INPUT.format(why="there is no stdin")
    try:
        fd = stream.fileno()
        st = os.fstat(fd)
    except (AttributeError, ValueError, OSError):
        return None if not getattr(stream, "closed", False) else NO_INPUT.format(why="stdin is closed")
    if os.isatty(fd):
        return None
    try:
        null = os.stat(os.devnull)
    except OSError:
        return None
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev:
        return NO_INPUT.format(why="stdin is /dev/null")
    return None


def _language_from_env() -> str:
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(name)
        if value:
            return "ru" if value.lower().startswith("ru") else "en"
    return "en"


class ConsoleSink:
    def __init__(self, out: TextIO, lang: str) -> None:
        self.out = out
        self.lang = lang

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
            self.out.write(" " + t(self.lang, "con_stopped"))
        elif answer.cut:
            self.out.write(" " + t(self.lang, "con_cut"))
        self.out.write("\n")
        self.out.flush()


def _lines(stream: TextIO) -> Iterator[str]:
    """Lines of `stream`, never a decoding error: bytes that do not decode become U+FFFD."""
    raw = getattr(stream, "buffer", None)
    if raw is None:
        yield from iter(stream.readline, "")
        return
    encoding = getattr(stream, "encoding", None) or "utf-8"
    for line in iter(raw.readline, b""):
        yield line.decode(encoding, "replace")


def _start_reader(stream: TextIO, loop: asyncio.AbstractEventLoop, queue: "asyncio.Queue[str | None]") -> None:
    def read() -> None:
        try:
            for line in _lines(stream):
                loop.call_soon_threadsafe(queue.put_nowait, clean(line))
        except (ValueError, OSError):  # stdin closed under us
            pass
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, name="console-stdin", daemon=True).start()


def _match(arg: str, names: dict[str, str]) -> str | None:
    """The id in `names` (id -> title) that `arg` names: the id or the title, in any case."""
    wanted = arg.strip().lower()
    for ident, title in names.items():
        bare = "".join(ch for ch in title if ch.isalnum() or ch in " _-").strip().lower()
        if wanted in (ident.lower(), title.lower(), bare):
            return ident
    return None


class Console:
    def __init__(self, settings: BotSettings, engine: EngineFace, store: Store, out: TextIO, *,
                 max_new_tokens: int | None = None) -> None:
        self.engine = engine
        self.store = store
        self.out = out
        # the person at the terminal runs the bot: like an admin, never limited (/usage still counts)
        self.budgets = Budgets(settings, store, max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                               clock=store.clock, exempt_ids=(CONSOLE_USER_ID,))
        self.chat = ChatService(engine, store, settings, budgets=self.budgets)
        self.started_at = time.monotonic()
        # no name: the terminal's login ("root" in a container) is not the person's name;
        # the language from the environment counts only for a new user, later /language wins
        record = store.touch_user(CONSOLE_USER_ID, language=_language_from_env())
        self.lang = record.language

    @property
    def user_ctx(self) -> UserContext:
        return UserContext(first_name=None, language=self.lang)

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def mode_line(self) -> str:
        user = self.store.get_user(CONSOLE_USER_ID)
        assert user is not None
        mode = mode_of(user)
        return t(self.lang, "con_mode_line", mode=describe_mode(mode, self.lang, self.engine.modes()),
                 adapter=mode.adapter or "none", role=mode.role)

    # ---- what can be chosen -------------------------------------------------------------

    def _serving(self, catalog: ModeCatalog) -> dict[str, str]:
        return {a.name: domain_title(a.name, self.lang) for a in catalog.adapters if a.current}

    def _adapters_list(self, catalog: ModeCatalog) -> str:
        names = list(self._serving(catalog))
        return ", ".join(names + ["none"]) if names else t(self.lang, "con_no_adapters")

    def _roles(self, catalog: ModeCatalog) -> dict[str, str]:
        return {r.id: role_title(r.id, catalog, self.lang) for r in catalog.roles}

    # ---- commands ---------------------------------------------------------------------

    async def handle(self, line: str) -> bool:
        """One input line; False = leave."""
        text = line.strip()
        if not text:
            return True
        command = parse_command(text)
        if command is None:  # "/etc/hosts, what is it?" is a question too
            await self.ask(text)
            return True
        cmd, arg = command.name, command.args
        if cmd in ("quit", "exit"):
            return False
        handler = getattr(self, f"cmd_{cmd}", None)
        if handler is None or cmd not in COMMANDS:
            self.unknown(cmd)
        else:
            await handler(arg)
        return True

    def unknown(self, cmd: str) -> None:
        close = difflib.get_close_matches(cmd, COMMANDS, n=1, cutoff=0.7)
        if close:
            self.say(t(self.lang, "unknown_command_hint", command=f"/{cmd}", suggestion=f"/{close[0]}"))
        else:
            self.say(t(self.lang, "unknown_command", command=f"/{cmd}"))

    async def cmd_help(self, arg: str) -> None:
        self.say(t(self.lang, "con_help"))

    async def cmd_mode(self, arg: str) -> None:
        catalog = self.engine.modes()
        self.say(t(self.lang, "con_mode", line=self.mode_line(), adapters=self._adapters_list(catalog),
                   roles=", ".join(self._roles(catalog))))

    async def cmd_adapter(self, arg: str) -> None:
        catalog = self.engine.modes()
        user = self.store.get_user(CONSOLE_USER_ID)
        assert user is not None
        available = self._adapters_list(catalog)
        if not arg:
            self.say(t(self.lang, "con_adapter_now", adapter=user.adapter or "none", available=available))
            return
        if arg.lower() in ("none", "base", "-"):
            name = None
        else:
            name = _match(arg, self._serving(catalog))
            if name is None:
                info = next((a for a in catalog.adapters if a.name.lower() == arg.lower()), None)
                if info is not None:  # on disk, but no version serves: every question would fail
                    reason = info.error or t(self.lang, "con_not_serving_reason")
                    self.say(t(self.lang, "con_adapter_not_serving", name=info.name, reason=reason,
                               available=available))
                else:
                    self.say(t(self.lang, "con_adapter_unknown", name=arg, available=available))
                return
        self.store.set_mode(CONSOLE_USER_ID, name, user.role)
        self.say(self.mode_line())

    async def cmd_role(self, arg: str) -> None:
        catalog = self.engine.modes()
        user = self.store.get_user(CONSOLE_USER_ID)
        assert user is not None
        roles = self._roles(catalog)
        if not arg:
            self.say(t(self.lang, "con_role_now", role=user.role, available=", ".join(roles)))
            return
        role = _match(arg, roles)
        if role is None:
            self.say(t(self.lang, "con_role_unknown", name=arg, available=", ".join(roles)))
            return
        self.store.set_mode(CONSOLE_USER_ID, user.adapter, role)
        self.say(self.mode_line())

    async def cmd_reset(self, arg: str) -> None:
        self.store.new_conversation(CONSOLE_USER_ID)
        self.say(t(self.lang, "con_fresh", line=self.mode_line()))

    cmd_new = cmd_reset

    async def cmd_retry(self, arg: str) -> None:
        await self.ask(None)

    async def cmd_continue(self, arg: str) -> None:
        if self.store.last_answer(CONSOLE_USER_ID) is None:
            self.say(t(self.lang, "con_nothing_to_continue"))
            return
        await self.ask(t(self.lang, "continue_prompt"))

    async def cmd_language(self, arg: str) -> None:
        if not arg:
            self.say(t(self.lang, "con_language_now", language=LANGUAGES[self.lang]))
            return
        code = _match(arg, dict(LANGUAGES))
        if code is None:
            self.say(t(self.lang, "con_language_unknown", name=arg))
            return
        self.lang = code
        self.store.set_language(CONSOLE_USER_ID, code)
        self.say(t(code, "con_language_set"))

    async def cmd_usage(self, arg: str) -> None:
        self.say(usage_text(self.budgets.status(CONSOLE_USER_ID), self.budgets.zone, self.lang))

    async def cmd_status(self, arg: str) -> None:
        self.say(format_status(
            self.engine.status(), generating=self.chat.generating(), waiting=self.chat.waiting(),
            active_24h=self.store.active_users(), bot_uptime_s=time.monotonic() - self.started_at,
            training=training_summary(self.engine, self.lang), lang=self.lang,
        ))

    # ---- questions --------------------------------------------------------------------

    async def ask(self, text: str | None) -> None:
        try:
            answer = await self.chat.ask(CONSOLE_USER_ID, text, ConsoleSink(self.out, self.lang), user=self.user_ctx)
        except EngineError as exc:
            self.say(t(self.lang, "con_error", error=f"{type(exc).__name__}: {exc}"))
            return
        if answer.outcome is Outcome.NOTHING:
            self.say(t(self.lang, "nothing_to_retry"))
        elif answer.outcome is Outcome.UNREADABLE:
            self.say(t(self.lang, "unreadable"))
        elif answer.outcome is Outcome.OVER_BUDGET and answer.budget is not None:
            self.say(refusal_text(answer.budget, self.budgets.zone, self.lang))

    def interrupt(self) -> bool:
        """Ctrl-C: stop the running answer; False when there was none (then the chat ends)."""
        return self.chat.stop(CONSOLE_USER_ID)


def _forgiving(stream: TextIO) -> TextIO:
    """A terminal whose encoding cannot show a character gets '?' instead of an exception."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="replace")
        except (ValueError, OSError):
            pass
    return stream


async def run_console(settings: BotSettings, engine: EngineFace, store: Store, *, stdin: TextIO | None = None,
                      stdout: TextIO | None = None, max_new_tokens: int | None = None) -> int:
    """Chat until EOF, /quit, a second Ctrl-C or SIGTERM; the exit status (2: no input ever came)."""
    stdin = stdin or sys.stdin
    out = stdout or _forgiving(sys.stdout)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    console = Console(settings, engine, store, out, max_new_tokens=max_new_tokens)
    interactive = stdin.isatty()

    leaving = False
    had_input = False

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
    loop.add_signal_handler(signal.SIGHUP, leave)  # the terminal closed
    _start_reader(stdin, loop, queue)
    bot_log = logging.getLogger("bot")
    bot_level = bot_log.level
    bot_log.setLevel(max(logging.WARNING, bot_log.getEffectiveLevel()))  # INFO lines would break the chat
    console.say(t(console.lang, "con_welcome", mode=console.mode_line()))
    if any(a.user_id == CONSOLE_USER_ID for a in store.mark_interrupted()):
        console.say(t(console.lang, "con_interrupted"))
    try:
        while True:
            if interactive:
                out.write("you> ")
                out.flush()
            line = await queue.get()
            if leaving or line is None:
                break
            had_input = had_input or bool(line.strip())
            if not await console.handle(line):
                break
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGHUP)
        await console.chat.shutdown(0.0)
        console.say(t(console.lang, "con_bye"))
        bot_log.setLevel(bot_level)
    if not had_input and not interactive and not leaving:
        print(f"error: {NO_INPUT.format(why='stdin is not a terminal and ended before any input')}",
              file=sys.stderr)
        return EXIT_NO_INPUT
    return 0
