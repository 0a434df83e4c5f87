"""`VllmEngine`: the engine face over vLLM replicas (ENGINE_BACKEND=vllm).

Inference runs on one or more vLLM OpenAI-compatible servers (multi-LoRA continuous
batching, quantization, tensor parallelism are theirs). This process keeps what makes the
bot the same bot: the role templates and the prompt code, built exactly as the local engine
builds them (engine.prompts: the same limits, HISTORY_TOKENS and CONTEXT_TOKENS; only the
tokenizer loaded, no weights), the adapters folder with its versions, validation and `current` pointers,
training, and the metrics. See docs/deployment.md for when to use it.

At start every replica is checked and each domain's serving version validated as the local
engine does and registered on every replica; a health loop then watches them (fleet.py).

Each answer's audit stamp names the base weights' fingerprint of the model files this process
reads its tokenizer from (which the replicas must serve) and no quantization: a replica does
not tell what it runs, its flags are the operator's.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Sequence

import aiohttp

from engine.adapters.book import reload_report
from engine.adapters.store import AdapterStore, VersionDir, version_name
from engine.config import EngineSettings, load_settings
from engine.errors import AdapterInvalid, AdapterNotFound, ConfigError, EngineError
from engine.metrics import EngineMetrics, process_rss_bytes
from engine.types import (
    EngineStatus, GenerationParams, Message, Mode, ModeCatalog, ReloadReport, ResidentAdapter, UserContext,
)
from engine.vllm.client import ReplicaClient, Timeouts, open_session
from engine.vllm.config import VllmSettings, load_vllm_settings
from engine.vllm.fleet import Fleet, Replica
from engine.adapters.validate import validate
from engine.vllm.lora import LoraBook, LoraVersion, replica_path
from engine.vllm.metrics import ReplicaMetrics
from engine.vllm.stream import VllmStream

if TYPE_CHECKING:
    from engine.prompts import BuiltPrompt

log = logging.getLogger(__name__)


def stop_token_ids(tokenizer: Any, load_path: str) -> list[int]:
    """The ids that end an answer, as the local engine stops on them (engine.prompts.end_token_ids)."""
    from engine.prompts import end_token_ids

    eos = None
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(load_path).eos_token_id
    except (OSError, ValueError):
        pass  # no generation_config.json: the tokenizer's EOS and the markers
    return end_token_ids(tokenizer, eos)


class VllmEngine:
    """The engine face (engine/face.py) over vLLM replicas; see the module docstring."""

    def __init__(self, settings: EngineSettings | None = None, vllm: VllmSettings | None = None) -> None:
        self.settings = settings or load_settings()
        self.vllm = vllm or load_vllm_settings()
        if not self.vllm.vllm_urls:
            raise ConfigError("ENGINE_BACKEND=vllm needs VLLM_URLS: the base URLs of the vLLM servers, "
                              "comma-separated, e.g. VLLM_URLS=http://vllm:8000")
        self.metrics = EngineMetrics()
        self.replica_metrics = ReplicaMetrics(self.metrics.registry)
        self.store = AdapterStore(self.settings.adapters_dir)
        self.book = LoraBook(self.store)
        self.training: Any = None
        self.templates: Any = None  # engine.prompts.TemplateLibrary once started
        self.tokens_generated = 0
        self.started = False
        self.closed = False
        self.model_id = ""
        self.base_fingerprint: str | None = None  # of the model files here (engine/fingerprint.py)
        self.served_model = ""
        self.stop_token_ids: list[int] = []
        self.fleet: Fleet | None = None  # set by start()
        self._shapes: dict[str, tuple[int, int]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._watch: asyncio.Task[None] | None = None
        self._streams: set[VllmStream] = set()
        self._unloads: set[asyncio.Task[None]] = set()
        self._hold_lock = asyncio.Lock()  # one hold() at a time: each replaces a domain's held set
        self._started_at = time.monotonic()
        # one thread tokenizes: off the event loop, and never two calls into the tokenizer at once
        self._prompt_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-prompts")

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the tokenizer and templates, validate adapters, check and fill the replicas."""
        await asyncio.to_thread(self._load_sync)
        v = self.vllm
        self._session = open_session()
        timeouts = Timeouts(v.vllm_connect_timeout_s, v.vllm_admin_timeout_s)
        replicas = [Replica(ReplicaClient(url, self._session, v.api_key, timeouts)) for url in v.vllm_urls]
        self.fleet = Fleet(replicas, self.book, model=self.served_model, context_tokens=self.settings.context_tokens,
                           retry_after_s=v.vllm_retry_after_s, max_in_flight=v.vllm_max_in_flight,
                           metrics=self.replica_metrics)
        versions = await asyncio.to_thread(self._validate_serving)
        for lv in versions:
            self.book.track(lv)
        await asyncio.gather(*(self.fleet.check(r) for r in replicas))
        for lv in versions:
            if self.book.versions.get(lv.key) is lv and lv.state == "loading":
                self.book.serve(lv)
        for domain, reason in self.book.errors.items():
            log.error("adapter %s is not serving: %s", domain, reason)
        if all(r.state == "incompatible" for r in replicas):
            reasons = "; ".join(r.error or r.url for r in replicas)
            await self._close_http()
            raise EngineError(f"no vLLM replica can serve this bot: {reasons}")
        ready = len(self.fleet.ready())
        if not ready:
            log.warning("no vLLM replica is ready yet (%s); answering starts when one is",
                        self.fleet.why_none(None))
        self._start_training()
        self.templates.start_polling()
        self._watch = asyncio.create_task(self.fleet.watch(v.vllm_health_interval_s), name="vllm-health")
        self.started = True
        log.info("vLLM engine ready: %d of %d replicas, %d adapters serving, model %s", ready, len(replicas),
                 len(self.book.serving), self.served_model)

    def _load_sync(self) -> None:
        from engine import model as model_loader
        from engine.model.fingerprint import ModelIdentity, fingerprint_model
        from engine.model.shapes import config_linear_shapes
        from engine.prompts import PromptMaker, load_templates

        self.templates = load_templates(self.settings)  # first: a wrong TEMPLATES_DIR fails in a second
        source = model_loader.prepare(self.settings)
        self.base_fingerprint = fingerprint_model(source.load_path)  # headers and a few values: milliseconds
        # adapters are matched on the fingerprint where both sides have one, as the local engine does
        self.model_id = ModelIdentity(source.model_id, self.base_fingerprint)
        self.served_model = self.vllm.vllm_model or source.model_id
        tokenizer = model_loader.load_tokenizer(source)
        self.stop_token_ids = stop_token_ids(tokenizer, source.load_path)
        self.prompts = PromptMaker(self.templates, tokenizer, self.settings)
        self._shapes = config_linear_shapes(source.load_path)

    def _validate_serving(self) -> list[LoraVersion]:
        """Each domain's current version, validated; failures go to the book's errors."""
        out = []
        for domain in self.store.domains():
            current = self.store.current(domain)
            if current is None:
                continue
            try:
                out.append(self._validated(self.store.version(domain, current)))
            except (AdapterNotFound, AdapterInvalid) as exc:
                self.book.errors[domain] = str(exc)
        return out

    def _validated(self, vd: VersionDir) -> LoraVersion:
        rank = validate(vd, self.model_id, self._shapes).rank  # in a worker thread: it reads the weights
        return LoraVersion(vd.domain, vd.version, file_bytes=vd.weights.stat().st_size,
                           path=replica_path(vd, self.store.root, self.vllm.vllm_adapters_dir), rank=rank)

    def _start_training(self) -> None:
        from engine.training.lifecycle import open_training

        self.training = open_training(self.settings, model_id=self.model_id, reload=self.reload,
                                      metrics=self.metrics)

    async def close(self) -> None:
        """Stop taking requests, cancel running streams (closing their responses), stop checking."""
        if self.closed:
            return
        self.closed = True
        from engine.training.lifecycle import close_training

        await close_training(self.training)
        for stream in list(self._streams):
            stream.cancel()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self._unloads:
            await asyncio.gather(*self._unloads, return_exceptions=True)
        if self.templates is not None:
            await asyncio.to_thread(self.templates.stop_polling)
        await self._close_http()
        self._prompt_pool.shutdown(wait=False, cancel_futures=True)

    async def _close_http(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "VllmEngine":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- serving ------------------------------------------------------------------------------
    def generate(self, messages: Sequence[Message], mode: Mode, params: GenerationParams | None = None,
                 *, user: UserContext | None = None) -> VllmStream:
        return VllmStream(self, list(messages), mode, params or GenerationParams(), user)

    async def build_prompt(self, role: str, user: UserContext | None, messages: Sequence[Message],
                           max_new: int) -> "BuiltPrompt":
        """The prompt's token ids, the turns trimmed and the system prompt's template, exactly as
        the local engine builds them (template render and tokenizing in the prompt thread, never
        on the event loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prompt_pool, self.prompts.build_prompt, role, user, messages,
                                          max_new)

    def register_stream(self, stream: VllmStream) -> None:
        self._streams.add(stream)

    def first_token(self, seconds: float) -> None:
        self.metrics.ttft.observe(seconds)

    def stream_ended(self, stream: VllmStream, answered: bool) -> None:
        res = stream.result
        if answered:
            label = res.adapter or "base"
            self.metrics.requests.labels(label, res.finish_reason).inc()
            self.metrics.tokens.labels(label).inc(res.completion_tokens)
            self.metrics.prompt_tokens.inc(res.prompt_tokens)
            self.tokens_generated += res.completion_tokens
            decode_s = res.duration_s - (res.time_to_first_token_s or 0.0)
            if res.completion_tokens > 1 and decode_s > 0:
                self.metrics.tokens_per_second.observe(res.completion_tokens / decode_s)
        if stream.lease is not None:
            lease, stream.lease = stream.lease, None
            self.release_lease(lease)
        self._streams.discard(stream)

    async def lease(self, domain: str, version: str | None) -> LoraVersion:
        """The version a new request on `domain` uses, counted in flight until `release_lease`:
        the serving one, or `version` (pinned), registered on the replicas first if it is not
        (AdapterNotFound: not on disk; AdapterInvalid: it fails validation or a replica refuses it)."""
        if version is None or self.book.serving.get(domain) == version:
            return self.book.lease(domain)
        vd = self.store.version(domain, version)  # AdapterNotFound when it is not on disk
        lv = self.book.versions.get(version_name(domain, version))
        if lv is None or lv.state == "failed":
            fresh = await asyncio.to_thread(self._validated, vd)
            lv = self.book.versions.get(fresh.key)  # another request may have tracked it meanwhile
            if lv is None or lv.state == "failed":
                lv = self.book.versions[fresh.key] = fresh
        self.book.use(lv)
        assert self.fleet is not None, "start() first"
        if lv.state == "ready" and all(lv.key in r.registered for r in self.fleet.ready()):
            return lv  # held (the A/B's requests): no wait behind a switch for the fleet's lock
        try:
            await self.fleet.register(lv)
        except BaseException:
            self.release_lease(lv)
            raise
        return lv

    async def hold(self, name: str, versions: Sequence[str] = ()) -> tuple[ResidentAdapter, ...]:
        """`EngineFace.hold`: these versions of `name` registered on every replica (and on one
        that comes back) beside its serving one."""
        assert self.fleet is not None, "start() first"
        wanted = tuple(dict.fromkeys(versions))
        async with self._hold_lock:
            if not self.store.versions(name) and name not in self.book.serving:  # AdapterNotFound: a bad name
                raise AdapterNotFound(self.book.not_found(name))
            dirs = [self.store.version(name, v) for v in wanted]  # AdapterNotFound before anything changes
            fresh = {}
            for vd in dirs:
                known = self.book.versions.get(version_name(name, vd.version))
                if known is None or known.state == "failed":
                    fresh[vd.version] = await asyncio.to_thread(self._validated, vd)  # AdapterInvalid
            serving = self.book.serving_entry(name)
            keep = tuple(v for v in wanted if serving is None or serving.version != v)
            before = self.book.hold(name, self.book.held.get(name, frozenset()) | set(keep))
            added: list[LoraVersion] = []  # held during the registration, so no health check drops them
            try:
                for vd in dirs:
                    key = version_name(name, vd.version)
                    lv = self.book.versions.get(key)
                    if lv is None or lv.state == "failed":
                        lv = fresh.get(vd.version) or await asyncio.to_thread(self._validated, vd)
                        self.book.versions[key] = lv
                        added.append(lv)
                    elif lv.state == "retired":
                        lv.state = "loading"  # back while requests still use it
                        added.append(lv)
                    await self.fleet.register(lv)
            except (AdapterInvalid, AdapterNotFound) as exc:
                log.error("holding %s %s refused: %s", name, ", ".join(wanted), exc)
                self.book.hold(name, before)  # the previous set stays; take back what this call put on
                for lv in added:
                    if not self.book.needed(lv):
                        lv.state = "failed" if lv.state == "loading" else "retired"
                        if lv.in_flight <= 0:
                            await self.fleet.unload_everywhere(lv)
                raise
            self.book.hold(name, keep)
            for version in before:
                lv = self.book.versions.get(version_name(name, version))
                if lv is not None and not self.book.needed(lv) and lv.in_flight <= 0:
                    await self.fleet.unload_everywhere(lv)
            if wanted or before:
                log.info("adapter %s: holding %s beside the serving version (was %s)", name,
                         ", ".join(wanted) or "nothing", ", ".join(sorted(before)) or "nothing")
            resident = {(a.name, a.version): a for a in self.book.resident()}
            return tuple(resident[(name, v)] for v in wanted if (name, v) in resident)

    def release_lease(self, lease: LoraVersion) -> None:
        """A request on `lease` ended; unload a version nothing keeps once nothing uses it."""
        if self.book.release(lease) and self.fleet is not None and not self.closed:
            task = asyncio.get_running_loop().create_task(self.fleet.unload_everywhere(lease),
                                                          name=f"unload-{lease.key}")
            self._unloads.add(task)
            task.add_done_callback(self._unloads.discard)

    def modes(self) -> ModeCatalog:
        return ModeCatalog(tuple(self.book.catalog()), tuple(self.templates.roles(refresh=False)))

    async def reload(self, name: str | None = None) -> ReloadReport:
        """Register the disk's current version of one domain (or all, plus templates) on every
        replica, then switch new requests to it; on failure the previous version keeps serving."""
        return await reload_report(name, self.store, self.templates, self._reload_domain,
                                   lambda domain: getattr(self.book.serving_entry(domain), "version", None))

    async def _reload_domain(self, domain: str) -> str:
        current = self.store.current(domain)  # AdapterNotFound: a bad name
        if current is None:
            raise AdapterNotFound(self.book.not_found(domain))
        serving = self.book.serving_entry(domain)
        if serving is not None and serving.version == current:
            return current
        assert self.fleet is not None, "start() first"
        try:
            lv = await asyncio.to_thread(self._validated, self.store.version(domain, current))
            await self.fleet.switch(lv)
        except (AdapterNotFound, AdapterInvalid) as exc:
            self.book.errors[domain] = str(exc)
            log.error("adapter %s/%s refused: %s", domain, current, exc)
            raise
        return current

    def status(self) -> EngineStatus:
        replicas = tuple(r.status() for r in self.fleet.replicas) if self.fleet else ()
        ready = sum(r.state == "ready" for r in replicas)
        return EngineStatus(
            model=self.served_model or self.settings.model,
            quantization="set on the replicas",
            device=f"vLLM, {ready} of {len(self.vllm.vllm_urls)} replicas ready",
            dtype="set on the replicas",
            model_bytes=0,
            process_rss_bytes=process_rss_bytes(),
            gpu_allocated_bytes=None,
            adapters=tuple(self.book.resident()),
            queue_depth=0,
            active_requests=sum(r.in_flight for r in replicas),
            tokens_generated=self.tokens_generated,
            uptime_s=time.monotonic() - self._started_at,
            ready=self.started and not self.closed and ready > 0,
            backend="vllm",
            replicas=replicas,
        )
