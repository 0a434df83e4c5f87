"""Serving benchmark: the new decode path, the previous one and a naive baseline, one workload.

    python -m bench.serving [--device cpu|cuda] [--quick] [--tokens N] [--users 1,4,16,64]
                            [--paths new,previous,naive] [--json FILE]
    python -m bench serving -- --quick          (the same, through the bench runner)

Paths, all in the same run and process, one after the other:
  new       Engine(serving_runtime="fast"): the batched multi-LoRA decode path (issue 8)
  previous  Engine(serving_runtime="reference"): transformers + peft mixed-batch decoding
  naive     plain transformers `generate`, one request at a time, peft `set_adapter` per request

The workload is fixed: eight fixed questions, greedy, a fixed number of new tokens with EOS
ignored, the `assistant` role. Rows: one user on the base model and on an adapter; N users
spread over four modes (base + legal, medical, finance) and N users on one adapter. Every
number is measured on the consumer side, from the arrival times of each stream's pieces.
A hot-load row then switches `legal` to a new version while 16 streams decode, and the
issue's targets are printed as "target | measured | met?". Adapters are copied into a
temporary folder; the repository's adapters/ is never written.

Prints tables; asserts nothing (these machines are shared and noisy).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import gc
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from bench._serving_report import (
    COLUMNS, HOTLOAD_COLUMNS, TARGET_COLUMNS, HotLoad, Row, Trace, count_syncs, hotload_summary, render_table,
    summarize, targets,
)

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("legal", "medical", "finance")
#: Four modes for the mixed rows: user i gets MODES[i % 4].
MODES: tuple[str | None, ...] = (None, *DOMAINS)
#: The adapter of the single-adapter and the uniform rows, and the one the hot-load switches.
ONE_ADAPTER = "legal"
PATHS = {"new": "fast", "previous": "reference", "naive": None}
#: How --budget is shared out: the previous path is the slow one at large N.
BUDGET_WEIGHT = {"new": 1.0, "previous": 2.0, "naive": 1.0}
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


class BenchError(Exception):
    """A path could not be measured; the message says why (shown, then the next path runs)."""


@dataclasses.dataclass(frozen=True)
class Workload:
    key: str  # stable id in the JSON and the targets: single-base, single-adapter, mixed-N, uniform-N
    label: str
    adapters: tuple[str | None, ...]  # one per user

    @property
    def users(self) -> int:
        return len(self.adapters)


def workloads(users: Sequence[int]) -> list[Workload]:
    """The rows, in table order: single streams first, then each N > 1 mixed and uniform."""
    out = [Workload("single-base", "1 user, base", (None,)),
           Workload("single-adapter", f"1 user, adapter ({ONE_ADAPTER})", (ONE_ADAPTER,))]
    for n in sorted(set(users)):
        if n > 1:
            out.append(Workload(f"mixed-{n}", f"{n} users, 4 modes", tuple(MODES[i % 4] for i in range(n))))
            out.append(Workload(f"uniform-{n}", f"{n} users, 1 adapter ({ONE_ADAPTER})", (ONE_ADAPTER,) * n))
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
    from engine.adapter_store import AdapterStore

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
                f"{st.dtype}, {st.device}, model {st.model_bytes / 2**20:.0f} MiB")

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

        params = GenerationParams(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
        user = UserContext(language="en", today=TODAY)
        started = time.perf_counter()
        traces = [Trace(started) for _ in wl.adapters]
        streams = [self.engine.generate([Message("user", PROMPTS[i % len(PROMPTS)])], Mode(a, ROLE), params,
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

    async def warm_up(self, sizes: Sequence[int], deadline: float) -> None:
        """Compile, capture, touch every adapter once: none of that belongs in the timed rows."""
        warm, tokens = workloads([]), 2
        if self.device.startswith("cuda"):  # every batch size the rows use (graph capture, kernel choice)
            warm += [Workload("warm", "warm", tuple(MODES[i % 4] for i in range(n))) for n in sorted(set(sizes)) if n > 1]
            tokens = 4
        for wl in warm:
            await self.drive(wl, tokens, deadline)

    async def measure(self, wl: Workload, tokens: int, deadline: float) -> Row:
        with PeakMemory(self.device) as mem:
            traces, started, ended, cut, _ = await self.drive(wl, tokens, deadline)
        row = summarize(traces, workload=wl.key, label=wl.label, path=self.name, tokens_each=tokens,
                        started=started, ended=ended, cut=cut, deadline_s=deadline)
        row.peak_mib = mem.mib
        return row

    async def syncs(self, wl: Workload, deadline: float) -> tuple[float, float, int] | str:
        """(host syncs per decode step, DtoH copies per step, steps) over a window of a running batch."""
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
                return prof.syncs, prof.dtoh, n
            finally:
                stop()

        *_, got = await self.drive(wl, _long(self.device), deadline * 2, hook=window)
        if not isinstance(got, tuple):
            return got or "no profile"
        syncs, dtoh, steps = got
        return (syncs / steps, dtoh / steps, steps) if steps else "no decode step in the window"

    async def hot_load(self, streams: int, deadline: float) -> HotLoad:
        """`reload('legal')` to v2 while `streams` users decode (v1 was serving at start)."""
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


class NaivePath:
    """Plain transformers `generate`, one request after another, peft `set_adapter` per request."""

    name = "naive"

    def __init__(self, settings: Any, root: Path, device: str) -> None:
        self.settings, self.root, self.device = settings, root, device
        self.model: Any = None

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

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
        lm = self.loaded
        return (f"{self.name:<8} transformers generate + peft set_adapter, one request at a time: "
                f"{lm.source.model_id}, {lm.quantization}, {lm.dtype}, {lm.device}, "
                f"model {lm.model.get_memory_footprint() / 2**20:.0f} MiB")

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

    async def warm_up(self, sizes: Sequence[int], deadline: float) -> None:
        for a in (None, ONE_ADAPTER):
            await asyncio.to_thread(self._generate, 0, a, 2, None)

    async def measure(self, wl: Workload, tokens: int, deadline: float) -> Row:
        with PeakMemory(self.device) as mem:
            traces, started, ended, cut = await asyncio.to_thread(self._run, wl, tokens, deadline)
        row = summarize(traces, workload=wl.key, label=wl.label, path=self.name, tokens_each=tokens,
                        started=started, ended=ended, cut=cut, deadline_s=deadline)
        row.peak_mib = mem.mib
        return row

    async def syncs(self, wl: Workload, deadline: float) -> tuple[float, float, int] | str:
        """Per generated token (= one decode step each) over the workload's first four requests."""
        tokens = 8
        firsts = wl.adapters[:4]

        def run() -> tuple[int, int]:
            with Profile() as prof:
                for i, a in enumerate(firsts):
                    self._generate(i, a, tokens, None)
            prof.check(self.device)
            return prof.syncs, prof.dtoh

        syncs, dtoh = await asyncio.to_thread(run)
        steps = tokens * len(firsts)
        return syncs / steps, dtoh / steps, steps


# ---- the run -------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    device: str
    tokens: int
    users: list[int]
    paths: list[str]
    naive_max_users: int
    deadline_s: float
    hotload_users: int
    quantization: str
    dtype: str
    syncs: bool
    json_path: Path | None
    budget_s: float | None = None

    def profiles(self, path: str, wl: Workload) -> bool:
        """Which rows get a sync profile (a separate short run): every row of the new path; on the
        slower paths only the single stream with an adapter and the largest mixed row, which is
        what the issue's numbers compare (a profile of the previous path at 64 rows costs minutes)."""
        if not self.syncs:
            return False
        largest = max((n for n in self.users if n > 1), default=None)
        return path == "new" or wl.key in ("single-adapter", f"mixed-{largest}")


def plan_from_args(args: argparse.Namespace) -> Plan:
    cuda = args.device.startswith("cuda")
    budget = None
    if args.quick:
        tokens, users, naive_max, deadline = 16, [1, 4, 16], 4, 120.0
    elif cuda:  # the naive baseline is sequential: its single streams say all there is to say
        tokens, users, naive_max, deadline = 64, [1, 4, 16, 64], 1, 15.0
    else:  # bounded: 64 users of the previous path alone can take many minutes on 2 cores
        tokens, users, naive_max, deadline, budget = 48, [1, 4, 16, 64], 16, 180.0, 840.0
    return Plan(
        device=args.device, tokens=args.tokens or tokens, users=args.users or users, paths=args.paths,
        naive_max_users=naive_max if args.naive_max_users is None else args.naive_max_users,
        deadline_s=args.deadline or deadline, hotload_users=args.hotload_users, quantization=args.quantization,
        dtype=args.dtype, syncs=(cuda or args.syncs) and not args.no_syncs, json_path=args.json,
        budget_s=args.budget or budget,
    )


def settings_for(plan: Plan, root: Path, runtime: str | None) -> Any:
    from engine.config import load_settings

    largest = max([*plan.users, plan.hotload_users, 1])
    extra = {} if runtime is None else {"serving_runtime": runtime}
    return load_settings(
        adapters_dir=root / "adapters", templates_dir=root / "templates", model_cache_dir=ROOT / "models",
        quantization=plan.quantization, compute_dtype=plan.dtype, device=plan.device,
        max_batch_size=largest, max_queue=max(64, 2 * largest), temperature=0.0, repetition_penalty=1.0,
        template_poll_s=0.0, **extra,
    )


def header(plan: Plan, argv: Sequence[str]) -> dict[str, Any]:
    import torch

    from engine.config import load_settings
    from engine.model import torch_dtype

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    s = load_settings(quantization=plan.quantization, compute_dtype=plan.dtype, device=plan.device)
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    machine = (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, torch threads "
               f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at start")
    if plan.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(plan.device))
        machine += f"; GPU {p.name}, {p.total_memory / 2**30:.0f} GiB"
    return {
        "command": "python -m bench.serving " + " ".join(argv),
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "machine": machine,
        "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": version("transformers"),
        "peft": version("peft"), "bitsandbytes": version("bitsandbytes"),
        "device": plan.device,
        "dtype": f"{str(torch_dtype(s, plan.device)).removeprefix('torch.')} ({plan.dtype})",
        "quantization": f"{s.resolved_quantization(plan.device)} ({plan.quantization})",
        "model": s.model,
        "workload": (f"greedy, EOS ignored, {plan.tokens} new tokens per request, {len(PROMPTS)} fixed questions, "
                     f"role {ROLE}, modes base + {', '.join(DOMAINS)}; users {','.join(map(str, plan.users))}; "
                     f"naive up to {plan.naive_max_users} users; each run cut at {plan.deadline_s:.0f} s"),
    }


def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.readlines()
    except OSError:
        return []


class Report:
    """Everything measured so far; printed at the end and written to --json after every path."""

    def __init__(self, meta: dict[str, Any], json_path: Path | None) -> None:
        self.meta, self.json_path = meta, json_path
        self.paths: dict[str, str] = {}
        self.rows: list[Row] = []
        self.hotloads: list[HotLoad] = []
        self.failures: dict[str, str] = {}
        self.skipped: list[str] = []  # rows left out because --budget was spent

    def save(self, complete: bool = False) -> None:
        if self.json_path is None:
            return
        data = {"meta": self.meta, "paths": self.paths, "rows": [dataclasses.asdict(r) for r in self.rows],
                "hotload": [dataclasses.asdict(h) | {"ratio": h.ratio} for h in self.hotloads],
                "targets": [dataclasses.asdict(t) for t in targets(self.rows, self.hotloads, self.meta["device"])],
                "failures": self.failures, "skipped": self.skipped, "complete": complete}
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.json_path)

    def render(self, plan: Plan) -> str:
        m = self.meta
        out = ["# Serving benchmark: new vs previous decode path vs naive generate",
               f"command:      {m['command']}",
               f"machine:      {m['machine']}",
               f"software:     python {m['python']}, torch {m['torch']} (CUDA {m['cuda']}), transformers "
               f"{m['transformers']}, peft {m['peft']}, bitsandbytes {m['bitsandbytes']}",
               f"device:       {m['device']}, dtype {m['dtype']}, quantization {m['quantization']}, model {m['model']}",
               f"workload:     {m['workload']}"]
        out += [f"path          {d}" for d in self.paths.values()]
        order = {w.key: i for i, w in enumerate(workloads(plan.users))}
        rows = sorted(self.rows, key=lambda r: (order.get(r.workload, 99), plan.paths.index(r.path)))
        out.append(render_table(
            "Throughput and latency (aggregate tok/s; TTFT from submission; gaps between a stream's pieces)",
            COLUMNS, [r.cells() for r in rows]))
        if not plan.device.startswith("cuda"):
            out.append("peak MiB: peak RSS above the start of the row (CPU); syncs/step: CUDA only")
        else:
            out.append("peak MiB: torch.cuda.max_memory_allocated during the row (weights included); syncs/step: "
                       "cudaStreamSynchronize/DeviceSynchronize/EventSynchronize/cudaMemcpy per decode step "
                       "(torch.profiler over a separate short run; on the previous and naive paths only for "
                       "the single stream with an adapter and the largest mixed row)")
        skipped = [n for n in plan.users if n > plan.naive_max_users]
        if "naive" in plan.paths and skipped:
            out.append(f"naive: not run for {', '.join(map(str, skipped))} users (--naive-max-users "
                       f"{plan.naive_max_users}); one request at a time, its tok/s does not grow with N")
        if self.hotloads:
            out.append(render_table(
                f"Hot-load: reload('{ONE_ADAPTER}') v1 -> v2 while {plan.hotload_users} streams decode (4 modes)",
                HOTLOAD_COLUMNS, [h.cells() for h in self.hotloads]))
        kind = "CUDA" if plan.device.startswith("cuda") else "CPU"
        out.append(render_table(f"Issue 8 targets ({kind}), measured in this run", TARGET_COLUMNS,
                                [[t.target, t.new, t.previous, t.met] for t in
                                 targets(self.rows, self.hotloads, plan.device)]))
        if self.skipped:
            out.append(f"not run (the path's share of --budget {plan.budget_s:.0f} s was spent): "
                       f"{'; '.join(self.skipped)}")
        for path, why in self.failures.items():
            out.append(f"!! {path}: {why}")
        return "\n".join(out)


def _say(text: str) -> None:
    """Progress on stderr, so stdout holds only the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


#: A row is not started with less than this left of its path's share of --budget.
MIN_ROW_S = 10.0


async def run_path(name: str, plan: Plan, root: Path, report: Report, budget_end: float | None) -> None:
    """Load one path, warm it up, measure its rows and its hot-load, unload it.

    With a budget, every run inside is cut at the budget's end too, and a row that would
    start with less than MIN_ROW_S left is skipped and listed instead.
    """
    def over_budget() -> bool:
        return budget_end is not None and budget_end - time.monotonic() < MIN_ROW_S

    def deadline() -> float:
        left = float("inf") if budget_end is None else budget_end - time.monotonic()
        return max(1.0, min(plan.deadline_s, left))

    runtime = PATHS[name]
    settings = settings_for(plan, root, runtime)
    runner: Any = NaivePath(settings, root, plan.device) if runtime is None else \
        EnginePath(name, runtime, settings, root, plan.device)
    _say(f"{name}: loading")
    try:
        await runner.start()
        report.paths[name] = runner.describe()
        _say(report.paths[name])
        chosen = [w for w in workloads(plan.users) if name != "naive" or w.users <= plan.naive_max_users]
        await runner.warm_up([w.users for w in chosen], deadline())
        for wl in chosen:
            if over_budget():
                report.skipped.append(f"{name}: {wl.label}")
                continue
            row = await runner.measure(wl, plan.tokens, deadline())
            if plan.profiles(name, wl) and not over_budget():
                try:
                    got = await runner.syncs(wl, deadline() / 2)
                except Exception as exc:  # the profiler is a guest here: its failure is a note, not a crash
                    got = f"profile failed: {type(exc).__name__}: {exc}"
                if isinstance(got, tuple):
                    row.syncs_per_step, row.dtoh_per_step, row.sync_steps = got
                else:
                    row.note = "; ".join(filter(None, [row.note, f"syncs: {got}"]))
            report.rows.append(row)
            _say(f"{name:<8} {wl.label:<28} {row.tokens_per_s:9.1f} tok/s  TTFT p50 {row.ttft_p50_ms or 0:8.1f} ms  "
                 f"gap p50 {row.gap_p50_ms or 0:7.1f} ms  syncs/step {row.syncs_per_step}  {row.note}")
        if isinstance(runner, EnginePath) and plan.hotload_users > 0:
            if over_budget():
                report.skipped.append(f"{name}: hot-load")
            else:
                hot = await runner.hot_load(plan.hotload_users, deadline() / 2)
                report.hotloads.append(hot)
                _say(f"{name:<8} hot-load: reload {hot.reload_ms or 0:.0f} ms, median step "
                     f"{hot.median_step_ms or 0:.1f} ms, longest gap {hot.longest_reload_ms or 0:.1f} ms {hot.note}")
    finally:
        await runner.close()
        del runner
        gc.collect()
        if plan.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        report.save()


async def run(plan: Plan, argv: Sequence[str]) -> int:
    """Every path in turn; on SIGTERM (a `timeout` around the run) the tables so far still print."""
    report = Report(header(plan, argv), plan.json_path)
    root = make_workdir()
    budget_end = None if plan.budget_s is None else time.monotonic() + plan.budget_s
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)  # type: ignore[union-attr]
    except (NotImplementedError, RuntimeError):
        pass
    code = 0
    try:
        for i, name in enumerate(plan.paths):
            share = None  # each path gets its weight's part of what is left; one that ends early leaves more
            if budget_end is not None:
                left = budget_end - time.monotonic()
                if left < MIN_ROW_S:
                    report.skipped.append(f"{name}: the whole path")
                    continue
                weights = [BUDGET_WEIGHT[p] for p in plan.paths[i:]]
                share = time.monotonic() + left * weights[0] / sum(weights)
            try:
                await run_path(name, plan, root, report, share)
            except Exception as exc:  # one broken path must not hide the others' numbers
                traceback.print_exc()
                report.failures[name] = f"{type(exc).__name__}: {exc}"
    except asyncio.CancelledError:
        report.failures["run"] = "stopped by SIGTERM (time limit): the tables hold what was measured until then"
        code = 124
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)
    report.save(complete=not report.failures and not report.skipped)
    print(report.render(plan), flush=True)
    return code or (1 if report.failures else 0)


# ---- command line --------------------------------------------------------------------------

def _users(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--users {text!r}: expected numbers separated by commas, like 1,4,16,64")
    if not values or any(not 1 <= v <= 512 for v in values):
        raise argparse.ArgumentTypeError(f"--users {text!r}: each count must be between 1 and 512")
    return sorted(set(values))


def _paths(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in PATHS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"--paths {text!r}: expected some of {', '.join(PATHS)}, comma-separated")
    return list(dict.fromkeys(values))


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
        return v
    return parse


def _at_least_zero(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when torch sees one, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes on a 2-core CPU: 16 tokens, users 1,4,16, naive up to 4 users")
    p.add_argument("--tokens", type=_positive(int), help="new tokens per request (default 48 on CPU, 64 on CUDA)")
    p.add_argument("--users", type=_users, help="concurrent users per row, e.g. 1,4,16,64 (the default)")
    p.add_argument("--paths", type=_paths, default=list(PATHS), help="which of new,previous,naive to run, in order")
    p.add_argument("--json", type=Path, help="also write every number to this file (rewritten after each path)")
    p.add_argument("--quantization", choices=("auto", "nf4", "int8", "none"), default="auto",
                   help="QUANTIZATION for all three paths (default auto: the engine's choice for the device)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="COMPUTE_DTYPE for all three paths")
    p.add_argument("--naive-max-users", type=_at_least_zero, help="largest N the naive baseline runs (it is sequential)")
    p.add_argument("--deadline", type=_positive(float), help="seconds after which a row's streams are cut")
    p.add_argument("--hotload-users", type=_at_least_zero, default=16, help="streams decoding during the hot-load (0: skip)")
    syncs = p.add_mutually_exclusive_group()
    syncs.add_argument("--no-syncs", action="store_true", help="on CUDA, skip the torch.profiler sync count")
    syncs.add_argument("--syncs", action="store_true",
                       help="run the sync profile on CPU too (it counts 0 there; checks the profiling itself)")
    p.add_argument("--threads", type=_positive(int),
                   help="torch CPU threads (default: torch's own choice, the cores of the machine)")
    p.add_argument("--budget", type=_positive(float),
                   help="seconds for the whole run, shared out between the paths; runs are cut at the end of "
                   "their path's share and rows that would start later are skipped and listed (default: "
                   "840 for the full CPU run, none otherwise)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecations would bury the tables
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: torch {torch.__version__} sees no CUDA device here; use --device cpu",
              file=sys.stderr)
        return 2
    if args.device != "cpu" and not args.device.startswith("cuda"):
        print(f"--device {args.device!r}: expected cpu, cuda or cuda:N", file=sys.stderr)
        return 2
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    plan = plan_from_args(args)
    try:
        return asyncio.run(run(plan, argv))
    except BenchError as exc:
        print(f"bench.serving: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
