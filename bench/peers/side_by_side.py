"""The engine beside llama.cpp: alternating processes, the median ratio and its range.

    python -m bench.serving --peer llamacpp [--quick] [--tokens N] [--users 1,16,64] [--peer-runs 3]
                                            [--peer-threads 1,2] [--quantization Q] [--versus bf16]

Runs peer, engine, peer, engine, ... (`--peer-runs` times each, every run a fresh process of its
own), the same prompt token ids on both sides, greedy, EOS ignored, the same new-token count and
thread count. Rows: one user on the base model and on an adapter (beside llama.cpp's single
stream on the base model: it serves no adapter here), N users over 4 modes (beside llama.cpp
serving N at once from one context with N sequences), TTFT p50 at 16 users. Each alternation's
quotient engine/llama.cpp counts: the table shows their median and range, the issue's target,
and each side's spread over its processes. Where Node or the npm package is missing, one line
says so and how to install it, and the engine's runs still give its figures and its spread.
`--peer-threads` runs llama.cpp at each of these thread counts in every alternation (default:
1 and the engine's count), and each workload's llama.cpp figure is its best of them in that
alternation: on a small shared machine its threads can stall each other (two threads ran at half
the speed of one in some runs here), and the engine is measured against the peer's best setting,
not its worst; a table shows each thread count's own figures.
`--versus Q` adds a third process to each alternation, the engine with QUANTIZATION=Q, and a
table of the engine over itself in Q (a weight format against another, minute by minute).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Any, Sequence

from bench._serving_paths import PROMPTS, ROLE, ROOT, TODAY, workloads
from bench._serving_report import fmt, render_table
from bench.peers import llamacpp
from bench.peers._arith import Measured, Spread, paired_ratios, spread

DEFAULT_USERS = (1, 16, 64)
#: The issue's targets: engine / llama.cpp at least this (tok/s rows) or at most this (TTFT).
TARGETS = {"single-base": 0.6, "single-adapter": 0.5, "mixed-16": 2.5, "mixed-64": 4.0}
TTFT_TARGET = 1.0
SPREAD_TARGET = 0.15
#: One process of either side is stopped after this long (a hung run must not hang the bench).
RUN_TIMEOUT_S = 900.0
COLUMNS = ("comparison", "engine: median (min-max)", "llama.cpp: median (min-max)", "ratio: median",
           "ratio: range", "engine spread", "llama.cpp spread", "target", "met?")


class Stopped(Exception):
    """SIGTERM (a `timeout` round the bench): the running child is ended, the tables so far print."""


def _stop(signum: int, frame: Any) -> None:
    raise Stopped()


def complete(m: Measured) -> bool:
    """Whether a row ran to its end: every stream got all its tokens before the deadline."""
    return not m.row.cut and m.row.tokens == m.row.expected_tokens


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One line of the table: an engine row's figure over a llama.cpp row's figure."""

    label: str
    engine_key: str
    peer_key: str
    figure: str  # "tok/s", "per-user tok/s" or "TTFT p50 ms"
    target: float | None = None
    lower_is_better: bool = False

    def value(self, m: Measured | None) -> float | None:
        if m is None or not complete(m):
            return None  # an incomplete run is shown nowhere as a figure
        return {"tok/s": m.row.tokens_per_s, "per-user tok/s": m.per_user_tok_s,
                "TTFT p50 ms": m.row.ttft_p50_ms}[self.figure]


def comparisons(users: Sequence[int]) -> list[Comparison]:
    out = [Comparison("1 user, base: tok/s", "single-base", "single-base", "tok/s", TARGETS["single-base"]),
           Comparison("1 user, adapter (legal) vs llama.cpp base: tok/s", "single-adapter", "single-base", "tok/s",
                      TARGETS["single-adapter"])]
    for n in sorted(u for u in users if u > 1):
        key = f"mixed-{n}"
        out.append(Comparison(f"{n} users over 4 modes vs {n} concurrent: aggregate tok/s", key, key, "tok/s",
                              TARGETS.get(key)))
        out.append(Comparison(f"{n} users: per-user tok/s", key, key, "per-user tok/s"))
        out.append(Comparison(f"{n} users: TTFT p50 ms", key, key, "TTFT p50 ms",
                              TTFT_TARGET if n == 16 else None, lower_is_better=True))
    return out


def peer_rows(users: Sequence[int], repeat_single: int) -> list[llamacpp.PeerRow]:
    return [llamacpp.PeerRow("single-base", 1, repeat_single),
            *(llamacpp.PeerRow(f"mixed-{n}", n) for n in sorted(users) if n > 1)]


def prompt_ids(tokens: int) -> list[list[int]]:
    """The engine's prompt token ids for the bench's questions (role template + chat template)."""
    from engine import Message
    from engine.config import load_settings
    from engine.model import load_tokenizer, resolve_source
    from engine.prompts import PromptBuilder, TemplateLibrary
    from engine.types import UserContext

    s = load_settings(model_cache_dir=ROOT / "models", template_poll_s=0.0)
    system = TemplateLibrary(ROOT / "templates", 0).render_system(ROLE, UserContext(language="en", today=TODAY))
    builder = PromptBuilder(load_tokenizer(resolve_source(s)), s.context_tokens, s.history_tokens)
    return [builder.build(system, [Message("user", p)], tokens)[0] for p in PROMPTS]


def cpu_model() -> str:
    """The CPU as the kernel names it, its cores and the matrix extensions that shape the kernels."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == (platform.processor() or "unknown CPU"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ext = [label for flag, label in (("amx_tile", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"))
           if flag in flags]
    return f"{name}, {os.cpu_count()} cores" + (f" ({', '.join(ext)})" if ext else "")


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def engine_run(job: dict[str, Any], timeout_s: float) -> tuple[dict[str, Measured], dict[str, Any]]:
    """One engine process (bench.peers.engine_side) over `job`."""
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.peers.engine_side"], input=json.dumps(job),
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"engine run did not finish within {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"engine run exited {proc.returncode} (its error is above on stderr)")
    data = json.loads(proc.stdout)
    return {k: Measured.from_json(v) for k, v in data["rows"].items()}, data["info"]


@dataclasses.dataclass
class Match:
    """Every alternation's figures, and what was not measured and why."""

    engine: list[dict[str, Measured] | None] = dataclasses.field(default_factory=list)
    peer: list[dict[str, Measured] | None] = dataclasses.field(default_factory=list)
    engine_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    peer_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)
    skipped: str | None = None  # why the peer was not run
    versus: list[dict[str, Measured] | None] = dataclasses.field(default_factory=list)  # --versus runs
    versus_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: llama.cpp's runs at each thread count (`peer` holds each alternation's best of them)
    peer_by_threads: dict[int, list[dict[str, Measured] | None]] = dataclasses.field(default_factory=dict)
    prompt_tokens: tuple[int, int] = (0, 0)  # shortest and longest prompt, both sides

    def figures(self, side: str, c: Comparison) -> list[float | None]:
        runs = {"engine": self.engine, "peer": self.peer, "versus": self.versus}[side]
        key = c.peer_key if side == "peer" else c.engine_key
        return [c.value(r.get(key)) if r else None for r in runs]

    def of_versus(self) -> "Match":
        """The same match with the --versus engine in the engine's place."""
        return dataclasses.replace(self, engine=self.versus, engine_info=self.versus_info)


def best_of(runs: Sequence[dict[str, Measured] | None]) -> dict[str, Measured] | None:
    """Per workload, the run with the most tokens a second among complete ones (one alternation's
    llama.cpp processes at several thread counts); None when none was measured."""
    measured = [r for r in runs if r is not None]
    if not measured:
        return None
    out: dict[str, Measured] = {}
    for key in dict.fromkeys(k for r in measured for k in r):
        rows = [r[key] for r in measured if key in r]
        done = [m for m in rows if complete(m)]
        out[key] = max(done, key=lambda m: m.row.tokens_per_s) if done else rows[0]
    return out


def play(users: Sequence[int], tokens: int, runs: int, threads: int, settings: dict[str, str],
         repeat_single: int = 3, versus: str | None = None, peer_threads: Sequence[int] = ()) -> Match:
    """peer, engine, peer, engine, ...: `runs` processes of each, in turn (peer, engine, engine
    in QUANTIZATION=`versus`, ... with `versus`). The peer runs once per count in `peer_threads`
    (default: `threads`) each time, and its figure is the best of those."""
    match = Match(skipped=llamacpp.unavailable())
    if match.skipped:
        _say(match.skipped)
    prompts = prompt_ids(tokens)
    match.prompt_tokens = (min(map(len, prompts)), max(map(len, prompts)))
    labels = {w.key: w.label for w in workloads(users)}
    counts = list(dict.fromkeys(peer_threads or (threads,)))
    match.peer_by_threads = {t: [] for t in counts}
    engine_job = {"tokens": tokens, "users": list(users), "repeat_single": repeat_single, "deadline_s": 180.0,
                  **settings}

    def alternate() -> None:
        for i in range(runs):
            if match.skipped is None:
                for t in counts:
                    _say(f"llama.cpp run {i + 1}/{runs}, {t} thread{'s' if t > 1 else ''}")
                    try:
                        got = llamacpp.measure(prompts, peer_rows(users, repeat_single), labels, tokens, t,
                                               RUN_TIMEOUT_S)
                        match.peer_by_threads[t].append(got.rows)
                        match.peer_info = {**got.info, "threads": ",".join(map(str, counts))}
                    except llamacpp.PeerError as exc:
                        match.peer_by_threads[t].append(None)
                        match.failures.append(f"llama.cpp run {i + 1} ({t} threads): {exc}")
                match.peer.append(best_of([match.peer_by_threads[t][-1] for t in counts]))
            _say(f"engine run {i + 1}/{runs}")
            try:
                rows, match.engine_info = engine_run(engine_job, RUN_TIMEOUT_S)
                match.engine.append(rows)
            except (RuntimeError, json.JSONDecodeError, KeyError) as exc:
                match.engine.append(None)
                match.failures.append(f"engine run {i + 1}: {exc}")
            if versus is not None:
                _say(f"engine run {i + 1}/{runs}, QUANTIZATION={versus}")
                try:
                    rows, match.versus_info = engine_run({**engine_job, "quantization": versus}, RUN_TIMEOUT_S)
                    match.versus.append(rows)
                except (RuntimeError, json.JSONDecodeError, KeyError) as exc:
                    match.versus.append(None)
                    match.failures.append(f"engine run {i + 1} (QUANTIZATION={versus}): {exc}")

    previous = signal.signal(signal.SIGTERM, _stop)  # subprocess.run kills its child on the way out
    try:
        alternate()
    except (Stopped, KeyboardInterrupt):
        match.failures.append("stopped before the last run (SIGTERM or Ctrl-C): the tables hold what was measured")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return match


def _range(s: Spread | None) -> str:
    return "-" if s is None else f"{fmt(s.median)} ({fmt(s.low)}-{fmt(s.high)})"


def _pct(s: Spread | None) -> str:
    return "-" if s is None else f"{100 * s.relative:.0f}%"


def table_rows(match: Match, users: Sequence[int]) -> list[list[str]]:
    out = []
    for c in comparisons(users):
        e, p = spread(match.figures("engine", c)), spread(match.figures("peer", c))
        ratio = paired_ratios(match.figures("engine", c), match.figures("peer", c))
        target, met = "-", "-"
        if c.target is not None:
            target = f"{'<=' if c.lower_is_better else '>='} {c.target:.2f}x"
            if ratio is None:
                met = "no peer" if match.skipped else "not measured"
            else:
                met = "yes" if (ratio.median <= c.target if c.lower_is_better else ratio.median >= c.target) else "no"
        out.append([c.label, _range(e), _range(p), "-" if ratio is None else f"{ratio.median:.2f}x",
                    "-" if ratio is None else f"{ratio.low:.2f}-{ratio.high:.2f}x", _pct(e), _pct(p), target, met])
    return out


def versus_rows(match: Match, users: Sequence[int]) -> list[list[str]]:
    """The engine in its quantization over itself in --versus's, one quotient per alternation."""
    out = []
    for c in comparisons(users):
        a, b = match.figures("engine", c), match.figures("versus", c)
        ratio = paired_ratios(a, b)
        out.append([c.label, _range(spread(a)), _range(spread(b)), "-" if ratio is None else f"{ratio.median:.2f}x",
                    "-" if ratio is None else f"{ratio.low:.2f}-{ratio.high:.2f}x", _pct(spread(a)), _pct(spread(b))])
    return out


def per_run_rows(match: Match, users: Sequence[int]) -> list[list[str]]:
    """Each alternation's tok/s, llama.cpp's then the engine's, and their quotient."""
    out = []
    for c in (c for c in comparisons(users) if c.figure == "tok/s"):
        engine = match.figures("engine", c)
        peer = match.figures("peer", c) + [None] * (len(engine) - len(match.peer))
        for i, (e, p) in enumerate(zip(engine, peer), 1):
            out.append([c.label, str(i), fmt(p), fmt(e), "-" if e is None or not p else f"{e / p:.2f}x"])
    return out


def peer_thread_rows(match: Match, users: Sequence[int]) -> list[list[str]]:
    """llama.cpp's tok/s rows at each thread count: median (min-max) over the alternations, and
    in how many of them that count was the best."""
    out = []
    counts = sorted(match.peer_by_threads)
    for c in (c for c in comparisons(users) if c.figure == "tok/s" and c.engine_key == c.peer_key):
        cells = [c.label]
        for t in counts:
            own = [c.value(r.get(c.peer_key)) if r else None for r in match.peer_by_threads[t]]
            wins = sum(1 for r, b in zip(match.peer_by_threads[t], match.peer) if r and b and
                       r.get(c.peer_key) is not None and r.get(c.peer_key) is b.get(c.peer_key))
            cells.append(f"{_range(spread(own))}; best in {wins}")
        out.append(cells)
    return out


def runs_of(match: Match) -> int:
    return len(match.engine)


def spread_verdict(match: Match, users: Sequence[int]) -> str:
    worst = None
    for c in (c for c in comparisons(users) if c.figure == "tok/s"):
        s = spread(match.figures("engine", c))
        if s is not None and (worst is None or s.relative > worst[1].relative):
            worst = (c.label, s)
    if worst is None:
        return "engine spread over its processes: not measured"
    label, s = worst
    n = runs_of(match)
    ok = ("yes" if s.relative <= SPREAD_TARGET else "no") if n >= 3 else "not judged (fewer than 3 processes)"
    return (f"engine spread over {n} processes (target <= {100 * SPREAD_TARGET:.0f}% of its median on every tok/s "
            f"row): widest {100 * s.relative:.0f}% ({label}; {fmt(s.low)}-{fmt(s.high)} tok/s) -> met? {ok}")


def render(match: Match, meta: dict[str, Any], users: Sequence[int]) -> str:
    cpu = meta["cpu"]
    pi, ei = match.peer_info, match.engine_info
    out = ["# Serving benchmark: the engine beside llama.cpp (alternating processes)",
           f"command:      {meta['command']}",
           f"date:         {meta['date']}",
           f"machine:      {cpu}; load average {meta['load']:.1f} at start; the engine on {meta['threads']} threads",
           f"engine:       {ei.get('describe', 'not measured').strip()}",
           ("llama.cpp:    " + (match.skipped or f"node-llama-cpp {pi.get('node_llama_cpp')} (binaries "
                                 f"{pi.get('llama_cpp')}, {pi.get('build')}, gpu {pi.get('gpu')}), node {pi.get('node')}, "
                                 f"threads {pi.get('threads')} (each workload's best), {llamacpp.GGUF_NAME} "
                                 f"{(pi.get('model_bytes') or 0) / 2**20:.0f} MiB; {pi.get('system_info', '').strip()}")),
           f"workload:     {meta['workload']}; prompts {match.prompt_tokens[0]}-{match.prompt_tokens[1]} tokens"]
    out.append(render_table(f"Engine / llama.cpp on {cpu}: median of {runs_of(match)} alternating runs each",
                            COLUMNS, table_rows(match, users)))
    out.append("ratio = engine / llama.cpp, one quotient per alternation (the machine's state of that minute is "
               "shared); spread = (max - min) / median over that side's processes; TTFT: lower is better")
    out.append(spread_verdict(match, users))
    out.append(render_table(f"Each run, tok/s (llama.cpp, then the engine) on {cpu}",
                            ("comparison", "run", "llama.cpp", "engine", "ratio"), per_run_rows(match, users)))
    if len(match.peer_by_threads) > 1:
        out.append(render_table(f"llama.cpp by thread count on {cpu}: tok/s median (min-max), and in how many "
                                "alternations it was the best (the figure above)",
                                ("workload", *(f"{t} thread{'s' if t > 1 else ''}" for t in sorted(match.peer_by_threads))),
                                peer_thread_rows(match, users)))
    if match.versus:
        vi, theirs = match.versus_info, match.of_versus()
        q, qv = ei.get("quantization", "?"), vi.get("quantization", "?")
        out.append(f"versus:       {vi.get('describe', 'not measured').strip()}")
        out.append(render_table(f"Engine QUANTIZATION={qv} / llama.cpp on {cpu}: median of {runs_of(theirs)} "
                                "alternating runs each", COLUMNS, table_rows(theirs, users)))
        out.append(spread_verdict(theirs, users))
        out.append(render_table(
            f"Engine QUANTIZATION={q} / QUANTIZATION={qv} on {cpu} (model {(ei.get('model_bytes') or 0) / 2**20:.0f} / "
            f"{(vi.get('model_bytes') or 0) / 2**20:.0f} MiB)",
            ("comparison", f"{q}: median (min-max)", f"{qv}: median (min-max)", "ratio: median", "ratio: range",
             f"{q} spread", f"{qv} spread"), versus_rows(match, users)))
    for f in match.failures:
        out.append(f"!! {f}")
    return "\n".join(out)


def to_json(match: Match, meta: dict[str, Any], users: Sequence[int]) -> dict[str, Any]:
    def side(runs: list[dict[str, Measured] | None]) -> list[dict[str, Any] | None]:
        return [None if r is None else {k: m.to_json() for k, m in r.items()} for r in runs]

    comps = []
    for c in comparisons(users):
        ratio = paired_ratios(match.figures("engine", c), match.figures("peer", c))
        comps.append({"label": c.label, "engine_key": c.engine_key, "peer_key": c.peer_key, "figure": c.figure,
                      "engine": match.figures("engine", c), "peer": match.figures("peer", c),
                      "ratio": None if ratio is None else dataclasses.asdict(ratio), "target": c.target})
    return {"meta": meta, "engine_info": match.engine_info, "peer_info": match.peer_info, "skipped": match.skipped,
            "failures": match.failures, "engine": side(match.engine), "peer": side(match.peer), "comparisons": comps,
            "peer_by_threads": {str(t): side(r) for t, r in match.peer_by_threads.items()},
            "versus_info": match.versus_info, "versus": side(match.versus)}


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`python -m bench.serving --peer llamacpp ...`: play the match, print the tables."""
    from engine.config import load_settings

    users = sorted(set(args.users or DEFAULT_USERS) | {1})
    tokens = args.tokens or (16 if args.quick else 48)
    threads = load_settings().resolved_cpu_threads()
    settings = {"quantization": args.quantization, "dtype": args.dtype, "kv_dtype": args.kv_cache_dtype}
    meta = {"command": "python -m bench.serving " + " ".join(argv),
            "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
            "cpu": cpu_model(), "load": os.getloadavg()[0], "threads": threads,
            "workload": (f"greedy, EOS ignored, {tokens} new tokens per stream, {len(PROMPTS)} fixed questions "
                         f"(user i asks question i mod {len(PROMPTS)}), role {ROLE}, the same prompt token ids on "
                         f"both sides; engine: modes base + legal, medical, finance, QUANTIZATION={args.quantization}, "
                         f"COMPUTE_DTYPE={args.dtype}, each row from an empty prefix cache; llama.cpp: base model, "
                         f"one context per row with one sequence per user; single streams the median of 3 within "
                         f"each process; users {','.join(map(str, users))}")}
    peer_threads = args.peer_threads or sorted({1, threads})
    meta["peer_threads"] = peer_threads
    match = play(users, tokens, args.peer_runs, threads, settings, versus=args.versus, peer_threads=peer_threads)
    text = render(match, meta, users)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(match, meta, users), indent=2) + "\n", encoding="utf-8")
    print(text, flush=True)
    return 1 if match.failures else 0
