"""The three things `bench.serving` measures, driven the same way: the engine on one of its
decode paths, and the naive baseline (plain `generate`, one request at a time).

Each runner measures one workload as a table row from the consumer's side (the arrival time
of every piece), and can count host syncs per decode step with torch.profiler; the engine
runners also time a hot-load. The arithmetic is in `bench._serving_report`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from bench._serving_report import HotLoad, Row, Trace, attention_kinds, count_syncs, hotload_summary, summarize
from engine.config import EngineSettings

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("legal", "medical", "finance")
#: Four modes for the mixed rows: user i gets MODES[i % 4].
MODES: tuple[str | None, ...] = (None, *DOMAINS)
#: The adapter of the single-adapter and the uniform rows, and the one the hot-load switches.
ONE_ADAPTER = "legal"
#: Fixed questions; they ask for long answers, so even a path that stops at EOS rarely does.
PROMPTS = (
    "Explain step by step, in detail, what I should check before signing a rental contract.",
    "Write a long and detailed guide on how to prepare for a first visit to a new doctor.",
    "Describe in detail how compound interest works, with several worked examples.",
    "List and explain twenty things a small business owner should know about taxes.",
    "Tell me a long story about a lawyer who takes on a very unusual case.",
    "Explain in detail the difference between a virus and a bacterium and how each is treated.",
    "Write a detailed comparison of index funds, bonds and savings accounts for a beginner.",
    "Give a thorough explanation of how a civil court case proceeds from filing to verdict.",
)
ROLE = "assistant"
TODAY = dt.date(2026, 1, 1)  # fixed, so the rendered system prompt (and its length) never changes
#: Streams of the hot-load row and of the sync profile run are capped here and ended as soon as
#: enough was seen; long enough to outlast an adapter load even at GPU step times.
LONG_STREAM_TOKENS = {"cpu": 400, "cuda": 1000}
#: Decode steps a sync profile window aims for (fewer when the steps are slow, at least 4).
PROFILE_STEPS = 24
PROFILE_MAX_S = 4.0


#: The sampled row's settings: the engine's defaults (TEMPERATURE, TOP_K, TOP_P, REPETITION_PENALTY).
SAMPLED = {name: EngineSettings.model_fields[name].default
           for name in ("temperature", "top_k", "top_p", "repetition_penalty")}


class BenchError(Exception):
    """A path could not be measured; the message says why (shown, then the next path runs)."""


@dataclasses.dataclass(frozen=True)
class Workload:
    key: str  # stable id in the JSON and the targets: single-base, single-adapter, mixed-N, uniform-N, sampled-N
    label: str
    adapters: tuple[str | None, ...]  # one per user
    sampled: bool = False  # the engine's default sampling (SAMPLED) instead of greedy; not on the naive path

    @property
    def users(self) -> int:
        return len(self.adapters)


def workloads(users: Sequence[int]) -> list[Workload]:
    """The rows, in table order: single streams first, then each N > 1 mixed and uniform, then
    the largest mixed N up to 16 once more with the engine's default sampling: what users get
    (the issue's workload is greedy; sampling adds the penalty, top-k and top-p to every step)."""
    out = [Workload("single-base", "1 user, base", (None,)),
           Workload("single-adapter", f"1 user, adapter ({ONE_ADAPTER})", (ONE_ADAPTER,))]
    for n in sorted(set(users)):
        if n > 1:
            out.append(Workload(f"mixed-{n}", f"{n} users, 4 modes", tuple(MODES[i % 4] for i in range(n))))
            out.append(Workload(f"uniform-{n}", f"{n} users, 1 adapter ({ONE_ADAPTER})", (ONE_ADAPTER,) * n))
    sampled = max((n for n in users if 1 < n <= 16), default=None)
    if sampled:
        out.append(Workload(f"sampled-{sampled}", f"{sampled} users, 4 modes, sampled",
                            tuple(MODES[i % 4] for i in range(sampled)), sampled=True))
    return out


# ---- the run's folder: a copy of the adapters (legal as v1 and v2) and the templates ----------

def make_workdir() -> Path:
    """Adapters and templates copied into a temporary folder; `legal` gets a v2 for the hot-load."""
    root = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    for d in DOMAINS:
        src = ROOT / "adapters" / d / "v1"
        if not (src / "adapter_model.safetensors").is_file():
            raise BenchError(f"{src} has no adapter_model.safetensors: the shipped adapters are missing")
        shutil.copytree(src, root / "adapters" / d / "v1")
        (root / "adapters" / d / "current").write_text("v1\n", encoding="utf-8")
    v2 = root / "adapters" / ONE_ADAPTER / "v2"
    shutil.copytree(root / "adapters" / ONE_ADAPTER / "v1", v2)
    meta = json.loads((v2 / "meta.json").read_text(encoding="utf-8"))
    meta["version"] = "v2"
    (v2 / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    shutil.copytree(ROOT / "templates", root / "templates")
    return root


def set_current(root: Path, domain: str, version: str) -> None:
    from engine.adapters.store import AdapterStore

    AdapterStore(root / "adapters").set_current(domain, version)


# ---- measuring -----------------------------------------------------------------------------

class PeakMemory:
    """Peak memory over a block: CUDA's max_memory_allocated, or on CPU the peak RSS above the start.

    On Linux the kernel's high-water mark is reset through /proc/self/clear_refs; where that
    is not allowed a thread samples the RSS every 10 ms instead.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self._base = 0
        self._sampled = 0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self._base = _proc_status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self._stop = threading.Event()
            self._sampled = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True, name="rss-sampler")
            self._thread.start()
        return self

    def _sample(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(0.01):
            self._sampled = max(self._sampled, _proc_status("VmRSS"))

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.mib = torch.cuda.max_memory_allocated() / 2**20
            return
        if self._thread is not None and self._stop is not None:
            self._stop.set()
            self._thread.join()
            peak = self._sampled
        else:
            peak = _proc_status("VmHWM")
        self.mib = max(0, peak - self._base) / 2**20


def _proc_status(field: str) -> int:
    """A memory line of /proc/self/status in bytes (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Progress:
    """Wakes waiters whenever a piece arrives on any stream (no polling beside the model thread)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def tick(self) -> None:
        self._event.set()

    async def until(self, cond: Callable[[], bool], timeout: float) -> bool:
        """Wait until cond() holds (True) or the timeout passes (False); re-checked on each piece."""
        end = time.perf_counter() + timeout
        while not cond():
            left = end - time.perf_counter()
            if left <= 0:
                return False
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass
        return True


class Profile:
    """torch.profiler over a window; counts the host syncs and device-to-host copies in it."""

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    def __enter__(self) -> "Profile":
        self._prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._prof.__exit__(None, None, None)
        names = [e.name for e in self._prof.events()]
        self.syncs, self.dtoh = count_syncs(names)
        self.attention = attention_kinds(names)
        #: CUDA runtime calls seen at all: 0 on a GPU means the profiler missed them (not "no syncs")
        self.runtime_calls = sum(1 for n in names if n.startswith("cuda"))

    def check(self, device: str) -> None:
        if device.startswith("cuda") and self.runtime_calls == 0:
            raise BenchError("torch.profiler recorded no CUDA runtime call in the window")


Hook = Callable[[list[Trace], Callable[[], None], Progress], Awaitable[Any]]


class EnginePath:
    """The engine with one `serving_runtime`, driven through its public face like the bot does."""

    def __init__(self, name: str, runtime: str, settings: Any, root: Path, device: str) -> None:
        self.name, self.runtime, self.settings, self.root, self.device = name, runtime, settings, root, device
        self.engine: Any = None

    async def start(self) -> None:
        from engine import Engine

        set_current(self.root, ONE_ADAPTER, "v1")
        self.engine = Engine(self.settings)
        await self.engine.start()
        catalog = self.engine.modes()
        broken = {d: (catalog.adapter(d).error if catalog.adapter(d) else "not found") for d in DOMAINS
                  if catalog.adapter(d) is None or catalog.adapter(d).error}
        if broken:
            raise BenchError(f"adapters not serving on path {self.name}: {broken}")

    def describe(self) -> str:
        st = self.engine.status()
        return (f"{self.name:<8} Engine(serving_runtime={self.runtime!r}): {st.model}, {st.quantization}, "
                f"{st.dtype}, {st.device}, model {st.model_bytes / 2**20:.0f} MiB; {self.graph_state()}; "
                f"attention {self.attention()}")

    def _graphs(self) -> Any:
        """The fast path's DecodeGraphs (None on a CPU, on the reference path, or with graphs off)."""
        return getattr(getattr(self.engine, "runtime", None), "graphs", None)

    def graph_state(self) -> str:
        """Whether decode steps replay CUDA graphs; a failed capture is said loudly, with its cause."""
        runtime = getattr(self.engine, "runtime", None)
        if not hasattr(runtime, "graphs"):
            return "no CUDA graphs (transformers + peft decoding)"
        graphs = runtime.graphs
        if graphs is None:
            return "CUDA graphs off" if self.device.startswith("cuda") else "no CUDA graphs (CPU)"
        if graphs.failed:
            return f"WITHOUT CUDA GRAPHS (capture failed, decoding eagerly: {graphs.failed})"
        return f"CUDA graphs ({graphs.captures} captured so far)"

    def attention(self) -> str:
        """Which SDPA backends the path may use: the fast path names its own, transformers its setting."""
        runtime = getattr(self.engine, "runtime", None)
        runner = getattr(runtime, "runner", None)
        if runner is not None and hasattr(runner, "sdpa_backends"):
            return "SDPA " + ", ".join(b.name.lower() for b in runner.sdpa_backends) + " (chosen by the fast path)"
        model = getattr(getattr(self.engine, "loaded", None), "model", None)
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        return f"transformers {impl or '?'} ({enabled_sdpa_backends(self.device)})"

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.close()
        self.engine = None

    def _steps(self) -> int:
        """Decode steps so far, from the engine's own step histogram (0 if it keeps none)."""
        for metric in self.engine.metrics.step_seconds.collect():
            for sample in metric.samples:
                if sample.name.endswith("_count"):
                    return int(sample.value)
        return 0

    async def drive(self, wl: Workload, tokens: int, deadline: float,
                    hook: Hook | None = None) -> tuple[list[Trace], float, float, bool, Any]:
        """Start every user's stream at once and read them all; (traces, start, end, cut, hook's result).

        `hook(traces, stop, progress)` runs beside the streams (a reload, a profile window);
        `stop()` ends every stream early. Streams still running at the deadline are cancelled: cut.
        """
        from engine import GenerationParams, Message, Mode, UserContext

        greedy = GenerationParams(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)

        def params(i: int) -> Any:
            return GenerationParams(max_new_tokens=tokens, ignore_eos=True, seed=i, **SAMPLED) if wl.sampled else greedy

        user = UserContext(language="en", today=TODAY)
        started = time.perf_counter()
        traces = [Trace(started) for _ in wl.adapters]
        streams = [self.engine.generate([Message("user", PROMPTS[i % len(PROMPTS)])], Mode(a, ROLE), params(i),
                                        user=user) for i, a in enumerate(wl.adapters)]
        progress = Progress()
        tasks = [asyncio.create_task(_consume(s, t, progress)) for s, t in zip(streams, traces)]

        def stop() -> None:
            for t in tasks:
                t.cancel()

        hooked = asyncio.create_task(hook(traces, stop, progress)) if hook else None
        _, pending = await asyncio.wait(tasks, timeout=deadline)
        ended = time.perf_counter()
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        result = None
        if hooked is not None:
            if not hooked.done():
                hooked.cancel()
            try:
                result = await hooked
            except asyncio.CancelledError:
                result = None
        return traces, started, ended, bool(pending), result

    async def warm_up(self, sizes: Sequence[int], tokens: int, deadline: float) -> None:
        """Compile, capture, touch every adapter once: none of that belongs in the timed rows.

        On CUDA every batch size the rows use runs too (kernel choice); with CUDA graphs as
        long as a timed row (`tokens`): a decode graph is captured per batch bucket and
        key-length bucket (128, 256, ...) on first use, and the timed rows' prompts plus their
        new tokens pass the first key bucket."""
        warm = workloads([])
        if self.device.startswith("cuda"):
            warm += [Workload("warm", "warm", tuple(MODES[i % 4] for i in range(n))) for n in sorted(set(sizes)) if n > 1]
        length = tokens if self._graphs() is not None else (4 if self.device.startswith("cuda") else 2)
        for wl in warm:
            await self.drive(wl, length, deadline)

    def cold_prefix_cache(self) -> None:
        """Empty the new path's prefix cache: a row reuses only what its own users share (their
        role's system prompt), never an earlier row's identical questions or answers."""
        prefix = getattr(self.engine.runtime, "prefix", None)
        if prefix is not None:
            prefix.clear()

    async def measure(self, wl: Workload, tokens: int, deadline: float) -> Row:
        self.cold_prefix_cache()
        graphs = self._graphs()
        captures = graphs.captures if graphs is not None else 0
        with PeakMemory(self.device) as mem:
            traces, started, ended, cut, _ = await self.drive(wl, tokens, deadline)
        row = summarize(traces, workload=wl.key, label=wl.label, path=self.name, tokens_each=tokens,
                        started=started, ended=ended, cut=cut, deadline_s=deadline)
        row.peak_mib = mem.mib
        notes = []
        if graphs is not None and graphs.failed:
            notes.append("eager: no CUDA graphs (capture failed)")
        elif graphs is not None and graphs.captures > captures:
            notes.append(f"{graphs.captures - captures} CUDA graph captures inside the timed row")
        row.note = "; ".join(filter(None, [row.note, *notes]))
        return row

    async def syncs(self, wl: Workload, deadline: float) -> tuple[float, float, int, str | None] | str:
        """(host syncs per decode step, DtoH copies per step, steps, attention kernels seen) over a
        window of a running batch."""
        async def window(traces: list[Trace], stop: Callable[[], None], progress: Progress) -> tuple[int, int, int] | str:
            try:
                if not await progress.until(lambda: all(len(t.arrivals) >= 3 for t in traces), deadline):
                    return f"not every stream decoding within {deadline:.0f} s"
                steps0, pieces0 = self._steps(), [len(t.arrivals) for t in traces]
                began = time.perf_counter()

                def steps() -> int:
                    by_metric = self._steps() - steps0
                    return by_metric or max(len(t.arrivals) - p for t, p in zip(traces, pieces0))

                with Profile() as prof:
                    await progress.until(lambda: steps() >= PROFILE_STEPS
                                or (steps() >= 4 and time.perf_counter() - began > PROFILE_MAX_S), deadline)
                    n = steps()
                prof.check(self.device)
                return prof.syncs, prof.dtoh, n, prof.attention
            finally:
                stop()

        *_, got = await self.drive(wl, _long(self.device), deadline * 2, hook=window)
        if not isinstance(got, tuple):
            return got or "no profile"
        syncs, dtoh, steps, attention = got
        return (syncs / steps, dtoh / steps, steps, attention) if steps else "no decode step in the window"

    async def hot_load(self, streams: int, deadline: float) -> HotLoad:
        """`reload('legal')` to v2 while `streams` users decode (v1 was serving at start)."""
        if self.runtime == "reference":
            return HotLoad(self.name, streams, None, None, None, None,
                           note="serves one request at a time: no streams decode together to reload beside")
        wl = Workload("hotload", "hot-load", tuple(MODES[i % 4] for i in range(streams)))

        async def reload(traces: list[Trace], stop: Callable[[], None], progress: Progress) -> dict[str, Any]:
            try:
                if not await progress.until(lambda: all(len(t.arrivals) >= 4 for t in traces), deadline):
                    return {"note": f"not every stream decoding within {deadline:.0f} s"}
                steady_from = max(t.arrivals[1] for t in traces)
                set_current(self.root, ONE_ADAPTER, "v2")
                r0 = time.perf_counter()
                report = await self.engine.reload(ONE_ADAPTER)
                r1 = time.perf_counter()
                counts = [len(t.arrivals) for t in traces]
                more = await progress.until(lambda: all(len(t.arrivals) >= c + 8 for t, c in zip(traces, counts)), deadline)
                return {"steady_from": steady_from, "steady_to": time.perf_counter(), "r0": r0, "r1": r1,
                        "report": report, "more": more}
            finally:
                stop()

        traces, started, ended, cut, got = await self.drive(wl, _long(self.device), deadline * 2, hook=reload)
        if not got or "r0" not in got:
            return HotLoad(self.name, streams, None, None, None, None, note=(got or {}).get("note", "no reload"))
        report = got["report"]
        notes = []
        if report.failed:
            notes.append(f"reload failed: {report.failed}")
        if report.loaded.get(ONE_ADAPTER) != "v2":
            notes.append(f"reload report: loaded={report.loaded} unchanged={report.unchanged}")
        old = {t.version for t, a in zip(traces, wl.adapters) if a == ONE_ADAPTER}
        if old - {"v1"}:
            notes.append(f"running {ONE_ADAPTER} streams switched version mid-stream: {sorted(old, key=str)}")
        if not got["more"]:
            notes.append("streams ended before 8 steps after the reload")
        errors = [t.error for t in traces if t.error]
        if errors:
            notes.append(f"{len(errors)} streams failed: {errors[0]}")
        return hotload_summary(traces, path=self.name, steady_from=got["steady_from"], steady_to=got["steady_to"],
                               reload_from=got["r0"], reload_to=got["r1"],
                               loaded=f"{ONE_ADAPTER} v1 -> {report.loaded.get(ONE_ADAPTER, '?')}",
                               note="; ".join(notes))


def use_the_fast_paths_attention(device: str) -> str:
    """Let every path's SDPA use only the backends the fast path chooses on this device, so the
    paths differ in how they decode, not in their attention kernel: on CUDA memory-efficient
    attention (math where it cannot run); transformers would otherwise take cuDNN or flash
    where they apply. The switches are process-wide; returns what was set, for the header."""
    import torch

    if not device.startswith("cuda"):
        return "each path's SDPA as torch picks it on a CPU (flash for CPUs, math where it cannot run)"
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(True)
    torch.backends.cuda.enable_math_sdp(True)
    return f"the same on every path: SDPA {enabled_sdpa_backends(device)} (the fast path's choice on CUDA)"


def enabled_sdpa_backends(device: str) -> str:
    """The SDPA backends this process allows on CUDA (torch's process-wide switches)."""
    import torch

    if not device.startswith("cuda"):
        return "SDPA as torch picks it on a CPU"
    b = torch.backends.cuda
    switches = (("flash", b.flash_sdp_enabled), ("efficient", b.mem_efficient_sdp_enabled),
                ("cuDNN", getattr(b, "cudnn_sdp_enabled", lambda: False)), ("math", b.math_sdp_enabled))
    return "allowed: " + ", ".join(name for name, on in switches if on())


def _long(device: str) -> int:
    return LONG_STREAM_TOKENS["cuda" if device.startswith("cuda") else "cpu"]


async def _consume(stream: Any, trace: Trace, progress: Progress) -> None:
    """Read one stream, stamping each piece as it arrives."""
    try:
        async for _ in stream:
            trace.arrivals.append(time.perf_counter())
            progress.tick()
    except asyncio.CancelledError:  # cut by the deadline or ended on purpose: count what came
        trace.tokens = len(trace.arrivals)
        trace.version = stream.result.adapter_version
        return
    except Exception as exc:  # a failed stream is a finding, reported in the row's note
        trace.error = f"{type(exc).__name__}: {exc}"
    res = stream.result
    trace.finish, trace.version = res.finish_reason, res.adapter_version
    trace.prompt_tokens, trace.cached_tokens = res.prompt_tokens, res.cached_prompt_tokens
    trace.tokens = res.completion_tokens if res.finish_reason in ("length", "stop") else len(trace.arrivals)


class _Stamps:
    """A `generate` streamer that stamps each new token (the first `put` is the prompt)."""

    def __init__(self, trace: Trace) -> None:
        self.trace, self._prompt = trace, True

    def put(self, value: Any) -> None:
        if self._prompt:
            self._prompt = False
            return
        self.trace.arrivals.append(time.perf_counter())

    def end(self) -> None:
        pass


async def _in_passing_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a thread that exits afterwards, so the OpenMP team of the naive path's
    torch work does not outlive it and slow the engines' model threads (engine.serving.threads)."""
    from engine.serving.threads import run_in_passing_thread

    return await asyncio.to_thread(run_in_passing_thread, functools.partial(fn, *args), "naive")


class NaivePath:
    """Plain transformers `generate`, one request after another, peft `set_adapter` per request."""

    name = "naive"

    def __init__(self, settings: Any, root: Path, device: str) -> None:
        self.settings, self.root, self.device = settings, root, device
        self.model: Any = None

    async def start(self) -> None:
        await _in_passing_thread(self._load)

    def _load(self) -> None:
        from peft import PeftModel

        from engine import Message
        from engine import model as loader
        from engine.prompts import PromptBuilder, TemplateLibrary
        from engine.types import UserContext

        self.loaded = lm = loader.load(self.settings)
        lm.model.generation_config.eos_token_id = None  # EOS ignored: exactly max_new_tokens each
        lm.model.generation_config.pad_token_id = lm.tokenizer.pad_token_id
        adapters = self.root / "adapters"
        model = PeftModel.from_pretrained(lm.model, str(adapters / DOMAINS[0] / "v1"), adapter_name=DOMAINS[0])
        for d in DOMAINS[1:]:
            model.load_adapter(str(adapters / d / "v1"), adapter_name=d)
        self.model = model.eval()
        system = TemplateLibrary(self.root / "templates", 0).render_system(ROLE, UserContext(language="en", today=TODAY))
        builder = PromptBuilder(lm.tokenizer, self.settings.context_tokens)
        self.prompts = [builder.build(system, [Message("user", p)], _long(self.device))[0] for p in PROMPTS]

    def describe(self) -> str:
        from engine import model as loader

        lm = self.loaded
        impl = getattr(lm.model.config, "_attn_implementation", None)
        return (f"{self.name:<8} transformers generate + peft set_adapter, one request at a time: "
                f"{lm.source.model_id}, {lm.quantization}, {lm.dtype}, {lm.device}, "
                f"model {loader.memory_footprint(lm.model) / 2**20:.0f} MiB; no CUDA graphs; "
                f"attention transformers {impl or '?'} ({enabled_sdpa_backends(self.device)})")

    async def close(self) -> None:
        self.model = None
        self.loaded = None

    def _generate(self, i: int, adapter: str | None, tokens: int, trace: Trace | None) -> None:
        import torch

        ids = torch.tensor([self.prompts[i % len(self.prompts)]], device=self.loaded.device)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                      streamer=_Stamps(trace) if trace is not None else None)
        with torch.inference_mode():
            if adapter is None:
                with self.model.disable_adapter():
                    self.model.generate(**kwargs)
            else:
                self.model.set_adapter(adapter)
                self.model.generate(**kwargs)

    def _run(self, wl: Workload, tokens: int, deadline: float) -> tuple[list[Trace], float, float, bool]:
        started = time.perf_counter()
        traces = [Trace(started) for _ in wl.adapters]
        cut = False
        for i, (adapter, trace) in enumerate(zip(wl.adapters, traces)):
            if time.perf_counter() - started > deadline:
                cut = True
                break
            self._generate(i, adapter, tokens, trace)
            trace.tokens, trace.finish = len(trace.arrivals), "length"
        return traces, started, time.perf_counter(), cut

    async def warm_up(self, sizes: Sequence[int], tokens: int, deadline: float) -> None:
        for a in (None, ONE_ADAPTER):
            await _in_passing_thread(self._generate, 0, a, 2, None)

    async def measure(self, wl: Workload, tokens: int, deadline: float) -> Row:
        with PeakMemory(self.device) as mem:
            traces, started, ended, cut = await _in_passing_thread(self._run, wl, tokens, deadline)
        row = summarize(traces, workload=wl.key, label=wl.label, path=self.name, tokens_each=tokens,
                        started=started, ended=ended, cut=cut, deadline_s=deadline)
        row.peak_mib = mem.mib
        return row

    async def syncs(self, wl: Workload, deadline: float) -> tuple[float, float, int, str | None] | str:
        """Per generated token (= one decode step each) over the workload's first four requests."""
        tokens = 8
        firsts = wl.adapters[:4]

        def run() -> tuple[int, int, str | None]:
            with Profile() as prof:
                for i, a in enumerate(firsts):
                    self._generate(i, a, tokens, None)
            prof.check(self.device)
            return prof.syncs, prof.dtoh, prof.attention

        syncs, dtoh, attention = await _in_passing_thread(run)
        steps = tokens * len(firsts)
        return syncs / steps, dtoh / steps, steps, attention
