"""`Engine`: the one face the front ends see.

It owns the loaded model, the template library, the adapter registry and the model thread,
and turns a (history, mode) pair into a stream of text. Everything slow (loading, decoding,
adapter loads) happens off the caller's event loop.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable, Sequence

from engine.adapters.book import reload_report
from engine.adapters.store import AdapterStore
from engine.config import EngineSettings, load_settings
from engine.errors import AdapterNotFound, ConfigError, EngineClosed, EngineError
from engine.metrics import EngineMetrics, process_rss_bytes
from engine.model import memory_footprint
from engine.serving import threads as cpu_threads
from engine.stream import GenerationStream
from engine.types import (
    EngineStatus, GenerationParams, GenerationResult, Message, Mode, ModeCatalog, ReloadReport, ResidentAdapter,
    UserContext,
)

if TYPE_CHECKING:
    from engine.prompts import BuiltPrompt

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, settings: EngineSettings | None = None) -> None:
        self.settings = settings or load_settings()
        self.metrics = EngineMetrics()
        self.store = AdapterStore(self.settings.adapters_dir)
        self.training: Any = None  # engine.training.TrainingService once started, where it imports
        self.templates: Any = None  # engine.prompts.TemplateLibrary once started
        self._started_at = time.monotonic()
        self._ready = False
        self._closed = False
        self.loaded: Any = None

    # ---- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Load model, templates and adapters, and start the model thread.

        The folders and templates are checked first, so a wrong TEMPLATES_DIR or ADAPTERS_DIR
        (or a start from another working directory) fails in a second, naming the setting,
        instead of loading the model and then failing every question.
        """
        notes = await asyncio.to_thread(self.settings.check_folders)
        self.templates = await asyncio.to_thread(self._load_templates)
        # in a thread that then exits, taking its OpenMP team along (see engine.serving.threads)
        await asyncio.to_thread(cpu_threads.run_in_passing_thread, self._start_sync, "engine-start")
        failures = await asyncio.to_thread(self.registry.load_all)
        for domain, reason in failures.items():
            log.error("adapter %s is not serving: %s", domain, reason)
        for note in notes:
            log.warning("%s", note)
        self._start_training()
        self.templates.start_polling()
        self._ready = True
        log.info("engine ready: %d adapters serving, %d roles", len(self.registry.serving()),
                 len(self.templates.roles(refresh=False)))

    def _load_templates(self) -> Any:
        from engine.prompts import load_templates

        return load_templates(self.settings)

    def _start_sync(self) -> None:
        from engine import model as model_loader
        from engine.adapters.registry import AdapterRegistry
        from engine.prompts import PromptMaker, end_token_ids
        from engine.serving.scheduler import SlotScheduler

        self.loaded = model_loader.load(self.settings)
        if self.loaded.device == "cpu":
            log.info("%s", cpu_threads.describe(self.settings.resolved_cpu_threads()))
        tok = self.loaded.tokenizer
        self.prompts = PromptMaker(self.templates, tok, self.settings)
        self.runtime_kind = self._choose_runtime()
        if self.runtime_kind == "fast":
            from engine.serving.runner import FastRuntime

            self.runtime = FastRuntime(self.loaded.model, self.settings)
            self.runtime.warm_up()
        else:
            from engine.reference import ReferenceRuntime

            if self.settings.kv_cache_dtype != "auto":
                log.warning("KV_CACHE_DTYPE=%s is ignored: the reference path keeps transformers' cache in the "
                            "compute dtype", self.settings.kv_cache_dtype)
            self.runtime = ReferenceRuntime(self.loaded.model)
            log.info("reference path: transformers + peft, one request at a time (batch size 1; MAX_BATCH_SIZE=%d "
                     "and PREFIX_CACHE_TOKENS do not apply)", self.settings.max_batch_size)
        self.registry = AdapterRegistry(
            self.store, self.runtime, self.loaded.identity, self.settings.max_resident_adapters,
            self._on_model_thread, cpu_threads.BackgroundWorker("adapter-loader"), self.metrics,
        )
        eos = end_token_ids(tok, getattr(self.loaded.model.generation_config, "eos_token_id", None))
        self.scheduler = SlotScheduler(self.runtime, tok, self.settings, self.metrics, set(eos), self.registry)
        self.scheduler.start()

    def _choose_runtime(self) -> str:
        """`fast` (engine.serving) where it serves the model, else the transformers + peft path."""
        from engine.serving.llama import unsupported_reason

        wanted = self.settings.serving_runtime
        if wanted == "reference":
            return "reference"
        reason = unsupported_reason(self.loaded.model, self.settings.context_tokens)
        if reason is None and not self.loaded.device.startswith(("cpu", "cuda")):
            reason = f"device {self.loaded.device!r} is neither cpu nor cuda"
        if reason is None:
            return "fast"
        if wanted == "fast":
            raise ConfigError(f"SERVING_RUNTIME=fast cannot serve this model: {reason}; use auto or reference")
        log.info("serving with the reference path: %s", reason)
        return "reference"

    def _on_model_thread(self, fn: Callable[[], Any]) -> Future:
        """The registry's loads that touch the runtime run between two steps of the model thread."""
        return self.scheduler.run_exclusive(fn)

    def _start_training(self) -> None:
        from engine.training.lifecycle import open_training

        self.training = open_training(self.settings, model_id=self.loaded.identity, reload=self.reload,
                                      metrics=self.metrics)

    async def close(self) -> None:
        """Stop taking requests, end running streams as cancelled, stop the threads."""
        if self._closed:
            return
        self._closed = True
        self._ready = False
        from engine.training.lifecycle import close_training

        await close_training(self.training)
        if self.templates is not None:
            await asyncio.to_thread(self.templates.stop_polling)
        if self.loaded is not None:
            await asyncio.to_thread(self.scheduler.stop)
            await asyncio.to_thread(self.registry.close)

    async def __aenter__(self) -> "Engine":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- serving -------------------------------------------------------------------
    def generate(self, messages: Sequence[Message], mode: Mode, params: GenerationParams | None = None,
                 *, user: UserContext | None = None) -> GenerationStream:
        return GenerationStream(self.submit, list(messages), mode, params or GenerationParams(), user)

    async def submit(self, messages: Sequence[Message], mode: Mode, p: GenerationParams, user: UserContext | None,
                     result: GenerationResult, queue: asyncio.Queue) -> Any:
        """Build the prompt and queue the request (a GenerationStream's first read); its pieces and
        its end go to `queue`, its figures into `result`. EngineError and its kinds before queueing."""
        from engine.audit import audit_stamp, effective_sampling
        from engine.requests import Request, SamplingSettings

        if self._closed or not self._ready:
            raise EngineClosed("the engine is not running" if not self._closed else "the engine is shutting down")
        s = self.settings
        pinned = p.adapter_version
        if pinned is not None and mode.adapter is None:
            raise EngineError(f"adapter_version={pinned!r} needs an adapter in the mode (it names a version of one)")
        if pinned is None and mode.adapter is not None and mode.adapter not in self.registry.serving():
            raise AdapterNotFound(self.registry.not_found(mode.adapter))
        effective = effective_sampling(s, p)
        # Template refresh, render and tokenizing read disk and run user-written code: off the loop.
        built = await asyncio.to_thread(self._prompt, mode, pinned, user, messages,
                                        effective.max_new_tokens)
        if self._closed:
            raise EngineClosed("the engine is shutting down")
        result.prompt_tokens, result.trimmed_turns = len(built.ids), built.trimmed_turns
        loaded = self.loaded
        stamp = audit_stamp(  # its adapter version is the one admission takes
            base_model=loaded.source.model_id, base_fingerprint=loaded.fingerprint,
            quantization=loaded.quantization, adapter=mode.adapter, adapter_version=None, system=built.system,
            sampling=effective, backend="local",
        )
        sampling = SamplingSettings(**asdict(effective), ignore_eos=p.ignore_eos)
        loop = asyncio.get_running_loop()
        req = Request(built.ids, mode.adapter, sampling, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item),
                      result, version=pinned, stamp=stamp)
        self.scheduler.submit(req)
        return req

    def _prompt(self, mode: Mode, pinned: str | None, user: UserContext | None, messages: Sequence[Message],
                max_new: int) -> BuiltPrompt:
        """System prompt + history -> token ids, with the template that served (worker thread).

        A pinned version must be on disk (AdapterNotFound before it waits in the queue).
        """
        if pinned is not None and mode.adapter is not None:
            self.store.version(mode.adapter, pinned)
        return self.prompts.build_prompt(mode.role, user, messages, max_new)

    def modes(self) -> ModeCatalog:
        # no disk access here (the poller thread refreshes the templates): modes() runs on the loop
        return ModeCatalog(tuple(self.registry.catalog()), tuple(self.templates.roles(refresh=False)))

    async def reload(self, name: str | None = None) -> ReloadReport:
        """Hot-load the disk's current version of one adapter (or all, plus templates)."""
        return await reload_report(name, self.store, self.templates,
                                   lambda domain: asyncio.wrap_future(self.registry.reload(domain)),
                                   lambda domain: self.registry.serving().get(domain))

    async def hold(self, name: str, versions: Sequence[str] = ()) -> tuple[ResidentAdapter, ...]:
        """Keep these versions of `name` resident beside its serving one (see engine/face.py).

        Loads run on the registry's loader (and, where the runtime needs it, on the model
        thread between steps); this waits for them off the event loop.
        """
        if self._closed or not self._ready:
            raise EngineClosed("the engine is not running" if not self._closed else "the engine is shutting down")
        return tuple(await asyncio.to_thread(self.registry.hold, name, tuple(versions)))

    def status(self) -> EngineStatus:
        gpu = None
        problems = self._problems()
        loaded = self.loaded
        if loaded is not None and loaded.device.startswith("cuda"):
            import torch

            gpu = int(torch.cuda.memory_allocated())
        return EngineStatus(
            model=loaded.source.model_id if loaded else self.settings.model,
            quantization=loaded.quantization if loaded else self.settings.quantization,
            device=loaded.device if loaded else self.settings.device,
            dtype=loaded.dtype if loaded else self.settings.compute_dtype,
            model_bytes=memory_footprint(loaded.model) if loaded else 0,
            process_rss_bytes=process_rss_bytes(),
            gpu_allocated_bytes=gpu,
            adapters=tuple(self.registry.resident()) if loaded else (),
            queue_depth=self.scheduler.queue_depth() if loaded else 0,
            active_requests=len(self.scheduler.rows) if loaded else 0,
            tokens_generated=self.scheduler.tokens_generated if loaded else 0,
            uptime_s=time.monotonic() - self._started_at,
            ready=self._ready and not problems,
            problems=tuple(problems),
        )

    def _problems(self) -> list[str]:
        """Why a started engine cannot answer right now (empty when it can)."""
        templates = self.templates
        if self._ready and templates is not None and not templates.roles(refresh=False):
            errors = "; ".join(templates.errors().values())
            return [f"no role template can be rendered (TEMPLATES_DIR={str(self.settings.templates_dir)!r}"
                    f"{': ' + errors if errors else ''})"]
        return []
