"""Process entry: settings, logging, the engine, then the Telegram bot or the console chat.

`python -m bot` with BOT_TOKEN runs the Telegram bot (long polling, or a webhook server
when WEBHOOK_URL is set); without it, a terminal chat on the same engine and storage.

Start-up never ends in a traceback: the token's form is checked with the other settings,
before anything loads; the database is locked for this instance and opened before the model
loads (a second instance, a damaged file or a read-only volume ends the start with one line
naming DATABASE_PATH, status 3); an unreachable Telegram is retried with backoff (one log
line per attempt) until it answers or the process is told to stop; a token Telegram refuses
ends the process with exit status 2 naming BOT_TOKEN. Ctrl-C while the model loads ends it
at once with one line (status 130).

Once Telegram answers, the start tells users whose answers a killed process cut off, and
finishes admins' training progress messages a stopped bot left behind (bot.recovery).

Shutdown (SIGTERM, SIGINT, or SIGHUP: a closed terminal, `docker kill -s HUP`) is ordered so
nothing is half-written: stop taking updates, let running answers finish for
SHUTDOWN_GRACE_S then cancel them (each saves what it has and shows it), stop background
tasks and the ops port, close the Telegram session; the caller then closes the engine and
the database.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import os
import random
import signal
import sys
import time
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import urlparse

from aiogram import Bot, Dispatcher
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import (
    TelegramNetworkError, TelegramNotFound, TelegramRetryAfter, TelegramServerError, TelegramUnauthorizedError,
)
from aiogram.types import BotCommand
from aiohttp import web

from engine.config import EngineSettings, load_settings
from engine.errors import ConfigError, EngineError
from engine.face import BACKENDS, EngineFace

from bot import handlers
from bot.ab import ABService
from bot.background import Background
from bot.budget import Budgets
from bot.chat import DEFAULT_MAX_NEW_TOKENS, ChatService
from bot.config import BotSettings, load_bot_settings
from bot.instance import AlreadyRunning, InstanceLock, InstanceLockError
from bot.metrics import ApiCallCounter, BotMetrics
from bot.pacing import ChatPacer, Retry, SendRate
from bot.recovery import finish_training_reports, tell_interrupted
from bot.storage import DatabaseError, Store
from bot.text import json_loads

log = logging.getLogger(__name__)

T = TypeVar("T")

EXIT_CONFIG = 2  # a setting is wrong (also what `main` returns for a bad value)
EXIT_STATE = 3  # the database cannot be used: another instance holds it, or the file or volume is bad
EXIT_INTERRUPTED = 130  # Ctrl-C before the front end was up, as a shell reports it
#: Signals that begin the orderly shutdown.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _StopRequested(Exception):
    """A stop signal arrived while start-up was still waiting for Telegram."""


class BotApp:
    """The Telegram front end: one Bot, one Dispatcher, its dependencies, its lifecycle."""

    def __init__(self, settings: BotSettings, engine: EngineFace, store: Store, *, concurrent_updates: bool = True,
                 connect_backoff_s: tuple[float, float] = (1.0, 60.0), max_new_tokens: int | None = None,
                 rng: random.Random | None = None) -> None:
        """`concurrent_updates=False` handles one update at a time (only the benchmark's baseline wants it).

        `connect_backoff_s`: (first, longest) wait between attempts to reach Telegram at start.
        `max_new_tokens`: the engine's MAX_NEW_TOKENS (what an answer holds of a token budget);
        `rng`: the A/B draws' random generator (tests seed it). Times come from `store.clock`.
        """
        if not settings.token:
            raise ConfigError("BOT_TOKEN is not set: the Telegram bot needs it (without it, run the console chat)")
        self.settings = settings
        self.engine = engine
        self.store = store
        self.metrics = BotMetrics()
        self.api_counter = ApiCallCounter(self.metrics)
        # every string Telegram sends is cleaned as it is decoded (bot.text): polling and webhook
        session = (
            AiohttpSession(api=TelegramAPIServer.from_base(settings.bot_api_url), json_loads=json_loads)
            if settings.bot_api_url else AiohttpSession(json_loads=json_loads)
        )
        session.middleware(self.api_counter)
        self.send_rate = SendRate(settings.telegram_sends_per_s)
        session.middleware(self.send_rate)
        self.bot = Bot(settings.token, session=session)
        self.pacer = ChatPacer(settings.stream_edit_interval_s)
        self.budgets = Budgets(settings, store, max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                               clock=store.clock)
        self.ab = ABService(engine, store, rng=rng)
        self.chat = ChatService(engine, store, settings, self.metrics, budgets=self.budgets, ab=self.ab)
        self.metrics.watch_users(store.active_users)
        self.background = Background()
        self.started_at = time.monotonic()
        self.dp = Dispatcher(
            engine=engine, store=store, settings=settings, chat=self.chat, pacer=self.pacer, metrics=self.metrics,
            background=self.background, started_at=self.started_at, budgets=self.budgets, ab=self.ab,
        )
        handlers.setup(self.dp, settings, store, self.metrics)
        self.ops: Any = None
        self.concurrent_updates = concurrent_updates
        self.connect_backoff_s = connect_backoff_s
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        """What a stop signal does: begin the orderly shutdown."""
        self._stop.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, self.request_stop)
        try:
            interrupted = self.store.mark_interrupted()  # this process holds the instance lock
            await self.ab.restore()
            await self._start_ops()
            await self._until_reachable("getMe", self.bot.me)
            self._recover(interrupted)
            await self._set_commands()
            if self.settings.webhook_url:
                await self._serve_webhook()
            else:
                await self._poll()
        except _StopRequested:
            log.info("stopped before Telegram could be reached")
        finally:
            log.info("shutting down: finishing running answers")
            await self.chat.shutdown(self.settings.shutdown_grace_s)
            await self.background.cancel_all()
            if self.ops is not None:
                await self.ops.stop()
            await self.bot.session.close()
            if handle_signals:
                for sig in STOP_SIGNALS:
                    loop.remove_signal_handler(sig)
            log.info("bot stopped")

    def _recover(self, interrupted: list[Any]) -> None:
        """What the previous run left: users whose answers it cut off, admins' frozen progress messages."""
        retry = Retry.from_settings(self.settings)
        if interrupted:
            self.background.spawn(tell_interrupted(self.bot, self.pacer, retry, interrupted), name="tell-interrupted")
        self.background.spawn(finish_training_reports(self.bot, self.store, self.engine, self.pacer, retry),
                              name="training-reports")

    async def _until_reachable(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """`op()` until Telegram answers: network errors, 5xx and 429 are waited out with backoff.

        One warning per failed attempt; a stop request ends the wait. A token the server
        refuses (401, or 404 for a token that names no bot) is a configuration error.
        """
        first, longest = self.connect_backoff_s
        delay, attempt = first, 0
        where = f" at {self.settings.bot_api_url}" if self.settings.bot_api_url else ""
        while True:
            attempt += 1
            try:
                return await op()
            except (TelegramUnauthorizedError, TelegramNotFound) as exc:
                raise ConfigError(
                    f"BOT_TOKEN was refused by the Telegram Bot API{where} ({exc}): check the token "
                    "@BotFather gave you" + (" and BOT_API_URL" if where else "")
                ) from exc
            except (TelegramNetworkError, TelegramServerError, TelegramRetryAfter) as exc:
                wait = float(exc.retry_after) if isinstance(exc, TelegramRetryAfter) else delay
                log.warning("Telegram%s is not reachable (%s, attempt %d): %s; retrying in %.1f s",
                            where, what, attempt, exc, wait)
                try:
                    await asyncio.wait_for(self._stop.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                else:
                    raise _StopRequested()
                delay = min(delay * 2, longest)

    async def _poll(self) -> None:
        await self._until_reachable("deleteWebhook", lambda: self.bot.delete_webhook(drop_pending_updates=False))
        polling = asyncio.create_task(self.dp.start_polling(
            self.bot, handle_signals=False, close_bot_session=False, handle_as_tasks=self.concurrent_updates,
            allowed_updates=self.dp.resolve_used_update_types(),
        ))
        stopper = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({polling, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not polling.done():
                try:
                    await self.dp.stop_polling()
                except RuntimeError:  # polling had not started yet
                    polling.cancel()
            try:
                await polling
            except asyncio.CancelledError:
                pass
        log.info("polling stopped")

    async def _serve_webhook(self) -> None:
        from aiogram.webhook.aiohttp_server import SimpleRequestHandler

        s = self.settings
        secret = s.webhook_secret.get_secret_value() if s.webhook_secret else None
        path = s.webhook_path or urlparse(s.webhook_url).path or "/telegram/webhook"
        app = web.Application()
        handler = SimpleRequestHandler(dispatcher=self.dp, bot=self.bot, secret_token=secret)
        # added by hand, not handler.register(): that would close the bot session before answers finish
        app.router.add_route("POST", path, handler.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, s.webhook_host, s.webhook_port)
        await site.start()
        try:
            await self._until_reachable("setWebhook", lambda: self.bot.set_webhook(
                url=s.webhook_url, secret_token=secret, allowed_updates=self.dp.resolve_used_update_types()
            ))
            log.info("webhook server on %s:%s%s for %s", s.webhook_host, s.webhook_port, path, s.webhook_url)
            self.metrics.last_api_ok = time.monotonic()
            await self._stop.wait()
        finally:
            await runner.cleanup()  # stop taking updates; answers already running go on
            log.info("webhook server stopped")

    async def _set_commands(self) -> None:
        try:
            await self.bot.set_my_commands([BotCommand(command=c, description=d)
                                            for c, d in handlers.COMMANDS_EN.items()])
            await self.bot.set_my_commands([BotCommand(command=c, description=d)
                                            for c, d in handlers.COMMANDS_RU.items()], language_code="ru")
        except Exception as exc:  # a menu is a nicety; polling will report a real outage
            log.warning("setMyCommands failed: %s", exc)

    async def _start_ops(self) -> None:
        if self.settings.ops_port is None:
            return
        try:
            from bot.ops import OpsServer
        except ImportError:
            log.warning("OPS_PORT is set but bot.ops is not available; no ops server")
            return
        registries = [self.metrics.registry]
        engine_registry = getattr(getattr(self.engine, "metrics", None), "registry", None)
        if engine_registry is not None:
            registries.insert(0, engine_registry)
        self.ops = OpsServer(self.settings.ops_host, self.settings.ops_port, checks={
            "model": self._check_model, "bot": self._check_bot, "database": self._check_database,
        }, registries=registries, details=self._engine_details)
        await self.ops.start()
        log.info("ops server on %s:%s", self.settings.ops_host, getattr(self.ops, "port", self.settings.ops_port))

    async def _check_model(self) -> bool:
        status = self.engine.status()
        problems = getattr(status, "problems", ())
        if not status.ready and problems:  # the reason goes into /healthz's body and the log
            raise RuntimeError("; ".join(problems))
        return bool(status.ready)

    def _engine_details(self) -> dict[str, Any]:
        """Each replica's state for /healthz (the vLLM backend); nothing for the local engine."""
        replicas = getattr(self.engine.status(), "replicas", ())
        return {"replicas": [dataclasses.asdict(r) for r in replicas]} if replicas else {}

    async def _check_bot(self) -> bool:
        return self.api_counter.connected()

    async def _check_database(self) -> bool:
        return self.store.ping()


def build_engine(factory: str | None, engine_settings: EngineSettings | None, backend: str = "local") -> EngineFace:
    """ENGINE_FACTORY 'module:callable' -> an engine; unset: ENGINE_BACKEND's (engine.face.BACKENDS)."""
    factory = factory or BACKENDS[backend]
    module_name, _, attr = factory.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"ENGINE_FACTORY={factory!r}: cannot import it ({exc})") from exc
    return target(engine_settings)


def setup_logging(settings: BotSettings) -> None:
    """One line per event (text or JSON); user text only with LOG_CONTENT=true (engine.logs)."""
    from engine.logs import setup_logging_from

    setup_logging_from(settings)
    logging.getLogger("aiogram.event").setLevel(max(logging.WARNING, logging.getLogger().level))


async def _start_engine(engine: Any) -> bool:
    """`engine.start()`; False when SIGINT/SIGTERM arrived while it was loading."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(engine.start())
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    installed = []
    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, interrupt)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
            pass
    try:
        await task
        return True
    except asyncio.CancelledError:
        if interrupted:
            return False
        raise
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _exit_now(code: int) -> None:
    """Leave without waiting for the model-loading thread, which cannot be interrupted."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def open_state(settings: BotSettings) -> tuple[InstanceLock, Store]:
    """This instance's lock on the database, then the database: DatabaseError/AlreadyRunning in one line."""
    lock = InstanceLock(settings.database_path)
    lock.acquire()
    try:
        return lock, Store(settings.database_path)
    except BaseException:
        lock.release()
        raise


async def amain(settings: BotSettings, engine_settings: EngineSettings | None) -> int:
    try:  # before the model loads: a refused start should take a second, not a minute
        lock, store = open_state(settings)
    except (AlreadyRunning, InstanceLockError, DatabaseError) as exc:
        log.error("%s", exc)
        return EXIT_STATE
    try:
        engine = build_engine(settings.engine_factory, engine_settings, settings.engine_backend)
    except ConfigError as exc:
        log.error("%s", exc)
        store.close()
        lock.release()
        return 2
    interrupted = False
    max_new_tokens = engine_settings.max_new_tokens if engine_settings is not None else None
    try:
        try:
            interrupted = not await _start_engine(engine)
        except EngineError as exc:
            log.error("the engine could not start: %s", exc)
            return 1
        if interrupted:
            log.warning("interrupted while the engine was loading; exiting")
            return EXIT_INTERRUPTED
        if settings.token:
            try:
                await BotApp(settings, engine, store, max_new_tokens=max_new_tokens).run()
            except ConfigError as exc:
                log.error("%s", exc)
                return EXIT_CONFIG
            return 0
        from bot.console import run_console

        return await run_console(settings, engine, store, max_new_tokens=max_new_tokens)
    finally:
        try:
            if not interrupted:
                await engine.close()
        finally:
            store.close()
            lock.release()
            if interrupted:
                _exit_now(EXIT_INTERRUPTED)


def main() -> int:
    try:
        settings = load_bot_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(settings)
    try:
        engine_settings = load_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not settings.token:  # a container without a token gets /dev/null: say so before loading a model
        from bot.console import input_problem

        problem = input_problem(sys.stdin)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_CONFIG
    return asyncio.run(amain(settings, engine_settings))
