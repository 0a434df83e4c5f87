"""The arithmetic and the printing of `bench.serving`: no torch, no model, no engine.

Kept apart from the runners so the numbers a benchmark reports (percentiles, tokens/s, the
issue's target ratios) come from small functions that read plain timestamps, and so the
tables look the same whichever path produced the row.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Iterable, Sequence

#: Column headers of the main table, in order; `Row.cells()` fills them.
COLUMNS = (
    "workload", "path", "tokens", "tok/s", "TTFT p50 ms", "TTFT p95 ms", "gap p50 ms", "gap p99 ms",
    "peak MiB", "syncs/step", "note",
)
HOTLOAD_COLUMNS = (
    "path", "streams", "reload ms", "median step ms", "longest gap, reload ms", "longest gap, steady ms",
    "longest / median", "note",
)
TARGET_COLUMNS = ("target", "new", "previous", "met? (new)")


@dataclass
class Trace:
    """One stream as its consumer saw it: when it was submitted and when each piece arrived."""

    submitted: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0  # completion tokens (the engine's count; pieces when the stream was cut)
    finish: str | None = None  # the engine's finish_reason; None when cut by the deadline
    version: str | None = None  # adapter version the stream was served with
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, taken from the engine's prefix cache

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


@dataclass
class Row:
    """One line of the main table: one workload on one path."""

    workload: str  # stable key: single-base, single-adapter, mixed-N, uniform-N
    label: str
    path: str
    users: int
    tokens: int
    expected_tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    gap_p50_ms: float | None
    gap_p99_ms: float | None
    peak_mib: float | None = None
    syncs_per_step: float | None = None
    dtoh_per_step: float | None = None
    sync_steps: int | None = None  # decode steps the sync count was divided by
    attention: str | None = None  # the SDPA kernels the sync profile saw ("efficient", ...), if it ran
    cut: bool = False
    note: str = ""
    runs: list[float] = field(default_factory=list)  # tok/s of every repetition (the row is their median)

    def cells(self) -> list[str]:
        syncs = "n/a" if self.syncs_per_step is None else f"{self.syncs_per_step:.2f}"
        note = "; ".join(filter(None, [self.note, f"attention: {self.attention}" if self.attention else ""]))
        return [
            self.label, self.path, f"{self.tokens}", fmt(self.tokens_per_s), fmt(self.ttft_p50_ms),
            fmt(self.ttft_p95_ms), fmt(self.gap_p50_ms), fmt(self.gap_p99_ms), fmt(self.peak_mib), syncs, note,
        ]


@dataclass
class HotLoad:
    """Inter-token gaps of N decoding streams while `engine.reload` switches an adapter version."""

    path: str
    streams: int
    reload_ms: float | None
    median_step_ms: float | None
    longest_reload_ms: float | None  # longest gap that overlaps the reload (and the step after it)
    longest_steady_ms: float | None  # longest gap once every stream was decoding
    loaded: str = ""  # "legal v1 -> v2"
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.longest_reload_ms is None or not self.median_step_ms:
            return None
        return self.longest_reload_ms / self.median_step_ms

    def cells(self) -> list[str]:
        ratio = "-" if self.ratio is None else f"{self.ratio:.2f}x"
        return [self.path, str(self.streams), fmt(self.reload_ms), fmt(self.median_step_ms),
                fmt(self.longest_reload_ms), fmt(self.longest_steady_ms), ratio, self.note]


@dataclass
class Target:
    target: str
    new: str
    previous: str
    met: str


def fmt(value: float | None) -> str:
    """Numbers for humans: no scientific notation, about three significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    a = abs(value)
    if a >= 100:
        return f"{value:,.0f}"
    if a >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between the closest ranks; None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def summarize(
    traces: Sequence[Trace], *, workload: str, label: str, path: str, tokens_each: int, started: float,
    ended: float, cut: bool, deadline_s: float | None = None,
) -> Row:
    """A table row from the consumer-side timestamps of one workload's streams.

    tokens/s is aggregate: every stream's tokens over the wall time from the moment all were
    submitted to the last piece (or the deadline). TTFT counts from submission, so queueing
    and sequential serving (the naive baseline) show up in it; gaps are pooled over streams.
    """
    total = sum(t.tokens for t in traces)
    last = max((t.arrivals[-1] for t in traces if t.arrivals), default=ended)
    seconds = max((ended if cut else last) - started, 1e-9)
    ttfts = [t.arrivals[0] - t.submitted for t in traces if t.arrivals]
    gaps = [g for t in traces for g in t.gaps()]
    notes = []
    if cut:
        notes.append(f"cut at {deadline_s:.0f} s" if deadline_s else "cut")
    expected = tokens_each * len(traces)
    if total != expected:
        notes.append(f"{total}/{expected} tokens")
    silent = sum(1 for t in traces if not t.arrivals)
    if silent:
        notes.append(f"{silent} streams got no token")
    eos = sum(1 for t in traces if t.finish == "stop")
    if eos:
        notes.append(f"{eos} stopped at EOS (ignore_eos not honoured)")
    errors = [t.error for t in traces if t.error]
    if errors:
        notes.append(f"{len(errors)} failed: {errors[0]}")
    cached, prompt = sum(t.cached_tokens for t in traces), sum(t.prompt_tokens for t in traces)
    if cached:
        notes.append(f"prefix cache: {cached}/{prompt} prompt tokens")
    return Row(
        workload=workload, label=label, path=path, users=len(traces), tokens=total, expected_tokens=expected,
        seconds=seconds, tokens_per_s=total / seconds,
        ttft_p50_ms=_ms(percentile(ttfts, 50)), ttft_p95_ms=_ms(percentile(ttfts, 95)),
        gap_p50_ms=_ms(percentile(gaps, 50)), gap_p99_ms=_ms(percentile(gaps, 99)),
        cut=cut, note="; ".join(notes),
    )


def hotload_summary(
    traces: Sequence[Trace], *, path: str, steady_from: float, steady_to: float, reload_from: float,
    reload_to: float, loaded: str, note: str = "",
) -> HotLoad:
    """Gaps inside the steady window (every stream decoding) and those that touch the reload.

    A gap "touches" the reload when it ends after the reload began and starts before one
    median step after it returned: the new version is published between two steps, so the
    step right after the reload is part of what the reload costs.
    """
    steady = [(a, b) for t in traces for a, b in zip(t.arrivals, t.arrivals[1:])
              if a >= steady_from and b <= steady_to]
    median = statistics.median(b - a for a, b in steady) if steady else None
    slack = median or 0.0
    around = [b - a for a, b in steady if b > reload_from and a < reload_to + slack]
    return HotLoad(
        path=path, streams=len(traces), reload_ms=(reload_to - reload_from) * 1e3, median_step_ms=_ms(median),
        longest_reload_ms=_ms(max(around)) if around else None,
        longest_steady_ms=_ms(max(b - a for a, b in steady)) if steady else None,
        loaded=loaded, note=note,
    )


# ---- the targets -------------------------------------------------------------------

def _find(rows: Iterable[Row], path: str, workload: str) -> Row | None:
    return next((r for r in rows if r.path == path and r.workload == workload), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def median_run(runs: Sequence[Row]) -> Row:
    """The repetition with the median tok/s (the lower middle one for an even count), with every
    run's tok/s kept: on a shared machine a row's speed drifts by 10-20% from minute to minute."""
    ordered = sorted(runs, key=lambda r: r.tokens_per_s)
    row = dataclasses.replace(ordered[(len(ordered) - 1) // 2])
    row.runs = [r.tokens_per_s for r in runs]
    if len(runs) > 1:
        spread = f"median of {len(runs)} runs ({fmt(ordered[0].tokens_per_s)}-{fmt(ordered[-1].tokens_per_s)} tok/s)"
        row.note = "; ".join(filter(None, [spread, row.note]))
    return row


def targets(rows: Sequence[Row], hotloads: Sequence[HotLoad], device: str) -> list[Target]:
    """The issue's targets for this device, measured on the new path (the previous path beside it).

    A ratio from a row that was cut or that lacks tokens is shown but never counts as met.
    """
    out: list[Target] = []

    def add(name: str, fn, goal: float, *, unit: str = "x", upper: bool = False, need: Sequence[str] = ()) -> None:
        vals = {}
        for p in ("new", "previous"):
            used = [_find(rows, p, w) for w in need]
            value = fn(p) if all(used) else None
            suspect = any(r is not None and (r.cut or r.tokens != r.expected_tokens) for r in used)
            vals[p] = (value, suspect)
        missing = [w for w in need if not any(r.workload == w for r in rows)]

        def show(value: float | None, suspect: bool) -> str:
            if value is None:
                return "not measured"
            text = f"{value:,.0f} {unit}" if unit != "x" else f"{value:.2f}x"
            return text + (" (incomplete run)" if suspect else "")

        value, suspect = vals["new"]
        if value is None:
            met = f"not measured ({', '.join(missing)} not run)" if missing else "not measured"
        else:
            ok = value <= goal if upper else value >= goal
            met = "yes" if ok and not suspect else "no"
        out.append(Target(name, show(*vals["new"]), show(*vals["previous"]), met))

    def tps(p: str, w: str) -> float | None:
        r = _find(rows, p, w)
        return r.tokens_per_s if r else None

    if device.startswith("cuda"):
        add("1 user with an adapter >= 400 tok/s", lambda p: tps(p, "single-adapter"), 400, unit="tok/s",
            need=["single-adapter"])
        add("64 users over 4 modes >= 10,000 tok/s aggregate", lambda p: tps(p, "mixed-64"), 10_000,
            unit="tok/s", need=["mixed-64"])
        add("mixed >= 0.9x uniform (64 users)", lambda p: _ratio(tps(p, "mixed-64"), tps(p, "uniform-64")), 0.9,
            need=["mixed-64", "uniform-64"])

        def ttft(p: str) -> float | None:
            a, b = _find(rows, p, "mixed-64"), _find(rows, p, "single-base")
            return _ratio(a.ttft_p50_ms if a else None, b.ttft_p50_ms if b else None)

        add("TTFT p50 at 64 users <= 3x a single user's", ttft, 3.0, upper=True, need=["mixed-64", "single-base"])

        def syncs(p: str) -> float | None:
            r = _find(rows, p, "mixed-64")
            return r.syncs_per_step if r else None

        add("one host sync per decode step (64 users, 4 modes)", syncs, 1.05, unit="syncs/step", upper=True,
            need=["mixed-64"])
        for t in out[-1:]:  # syncs are not a ratio: show them with two decimals
            t.new, t.previous = (_syncs_text(rows, p) for p in ("new", "previous"))
        return out

    add("1 user: adapter >= 0.9x base", lambda p: _ratio(tps(p, "single-adapter"), tps(p, "single-base")), 0.9,
        need=["single-adapter", "single-base"])
    naive = _naive_reference(rows)
    naive_label = f"naive baseline ({naive.label})" if naive else "naive baseline"
    add(f"16 users over 4 modes >= 8x {naive_label}",
        lambda p: _ratio(tps(p, "mixed-16"), naive.tokens_per_s if naive else None), 8.0, need=["mixed-16"])
    add("16 users over 4 modes >= 5x its own single stream (base)",
        lambda p: _ratio(tps(p, "mixed-16"), tps(p, "single-base")), 5.0, need=["mixed-16", "single-base"])
    add("mixed >= 0.9x uniform (16 users)", lambda p: _ratio(tps(p, "mixed-16"), tps(p, "uniform-16")), 0.9,
        need=["mixed-16", "uniform-16"])
    hot = {h.path: h for h in hotloads}
    streams = next(iter(hot.values())).streams if hot else 16
    t = Target(f"hot-load while {streams} streams decode: longest gap <= 2x median step",
               "not measured", "not measured", "not measured")
    for p in ("new", "previous"):
        h = hot.get(p)
        if h is not None and h.ratio is not None:
            setattr(t, p, f"{h.ratio:.2f}x ({fmt(h.longest_reload_ms)} / {fmt(h.median_step_ms)} ms)"
                    + (" (see note)" if h.note else ""))
    h = hot.get("new")
    if h is not None and h.ratio is not None:
        t.met = "yes" if h.ratio <= 2.0 and not h.note else "no"
    out.append(t)
    return out


def _naive_reference(rows: Sequence[Row]) -> Row | None:
    """The naive row to compare 16 users against: its 16-user mixed row, else its largest mixed one.

    The naive baseline serves one request after another, so its aggregate rate does not grow
    with N; a smaller N measures the same thing in less time.
    """
    mixed = [r for r in rows if r.path == "naive" and r.workload.startswith("mixed-") and not r.cut]
    exact = [r for r in mixed if r.users == 16]
    if exact:
        return exact[0]
    return max(mixed, key=lambda r: r.users, default=None)


def _syncs_text(rows: Sequence[Row], path: str) -> str:
    r = _find(rows, path, "mixed-64")
    if r is None or r.syncs_per_step is None:
        return "not measured"
    return f"{r.syncs_per_step:.2f} syncs/step ({r.dtoh_per_step or 0:.2f} DtoH, {r.sync_steps} steps)"


# ---- printing ------------------------------------------------------------------------------

def render_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (pastes into an issue as is), numeric columns right-aligned."""
    cells = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_numeric(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(header))]
    lines = [f"\n## {title}"]
    for n, r in enumerate(cells):
        lines.append("| " + " | ".join(
            c.rjust(w) if numeric[i] and n else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 1) + (":" if numeric[i] else "-")
                                        for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def _numeric(cell: str) -> bool:
    return cell in ("-", "n/a") or cell.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()


#: Where a sync is counted: the CUDA runtime calls that block the host until the device is done.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
#: cudaMemcpy (not ...Async) is synchronous too.
SYNC_EXACT = ("cudaMemcpy",)


def count_syncs(event_names: Iterable[str]) -> tuple[int, int]:
    """(host syncs, device-to-host copies) among the event names of a torch.profiler trace.

    A `.item()` or `.tolist()` on a CUDA tensor is one cudaMemcpyAsync (DtoH) plus one
    cudaStreamSynchronize: counted as one sync and one DtoH copy.
    """
    syncs = dtoh = 0
    for name in event_names:
        if name.startswith(SYNC_CALLS) or name in SYNC_EXACT:
            syncs += 1
        elif name.startswith("Memcpy DtoH") or "Device -> Pageable" in name or "Device -> Pinned" in name:
            dtoh += 1
    return syncs, dtoh


#: Which attention kernel ran, by the name of a profiler event. The profiler is started on the
#: benchmark's thread and records CPU ops of that thread only, but the CUDA kernels of every
#: thread: on a GPU the kernel names say it (a replayed CUDA graph shows kernels, no aten op);
#: aten's SDPA ops count where the profiled code runs on the profiler's own thread (naive path).
ATTENTION_EVENTS = (
    ("_scaled_dot_product_efficient_attention", "efficient"), ("_efficient_attention_forward", "efficient"),
    ("_scaled_dot_product_flash_attention_for_cpu", "flash (CPU)"), ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_cudnn_attention", "cuDNN"), ("_scaled_dot_product_attention_math", "math"),
    ("fmha_cutlass", "efficient"), ("flash_fwd", "flash"), ("cudnn_generated_fort_native_sdpa", "cuDNN"),
)


def attention_kinds(event_names: Iterable[str]) -> str | None:
    """The attention backends a profile saw, e.g. "efficient" or "cuDNN + math"; None for none."""
    seen: list[str] = []
    for name in event_names:
        for needle, kind in ATTENTION_EVENTS:
            if needle in name:
                if kind not in seen:
                    seen.append(kind)
                break
    return " + ".join(sorted(seen)) or None
