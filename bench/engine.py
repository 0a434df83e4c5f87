"""Engine benchmark: switching modes, a hot-load beside a decoding stream, and the memory of
adapter versions (an A/B's candidate included), against the naive way.

    python -m bench.engine [--tokens 48]

Throughput, and hot-loads under many streams, are `bench.serving`'s (beside the reference path,
a naive baseline and llama.cpp). This one drives the engine through its public face only and
prints tables; it asserts nothing (these machines are shared and noisy).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("legal", "medical", "finance")
QUESTION = "What should I know before signing a contract?"


def table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}")
    for i, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def workdir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    for d in DOMAINS:
        (root / "adapters" / d).mkdir(parents=True)
        shutil.copytree(ROOT / "adapters" / d / "v1", root / "adapters" / d / "v1")
        (root / "adapters" / d / "current").write_text("v1\n")
    shutil.copytree(ROOT / "templates", root / "templates")
    return root


def new_version(root: Path, domain: str, make_current: bool = True) -> str:
    """A new version with v1's shapes (scaled lora_B), committed and (by default) made current."""
    from safetensors.torch import load_file, save_file

    from engine.adapters.store import AdapterStore

    store = AdapterStore(root / "adapters")
    src = root / "adapters" / domain / "v1"
    with store.staging(domain) as staged:
        shutil.copy(src / "adapter_config.json", staged)
        t = load_file(str(src / "adapter_model.safetensors"))
        save_file({k: v * 1.5 if ".lora_B." in k else v for k, v in t.items()}, str(staged / "adapter_model.safetensors"))
        v = store.commit(domain, staged, json.loads((src / "meta.json").read_text())).version
    if make_current:
        store.set_current(domain, v)
    return v


async def timed_stream(engine, mode, tokens: int) -> tuple[list[float], float]:
    """Gaps between consecutive pieces (s) and the decode rate of one greedy stream."""
    from engine import GenerationParams, Message

    stream = engine.generate([Message("user", QUESTION)], mode, GenerationParams(max_new_tokens=tokens, temperature=0))
    stamps = []
    async for _ in stream:
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    dur = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
    return gaps, stream.result.completion_tokens / max(dur, 1e-9)


async def switching(engine: Any, root: Path) -> None:
    """A mode switch: ours is a row's adapter slot chosen at admission; the naive way is peft's
    global `set_adapter` (which races across users) or a load from disk per request."""
    from peft import PeftModel

    from engine import GenerationParams, Message, Mode
    from engine.model import load

    same, alternating = [], []
    for i in range(6):
        for bucket, mode in ((same, Mode("legal")), (alternating, Mode(DOMAINS[i % 3]))):
            t0 = time.perf_counter()
            async for _ in engine.generate([Message("user", QUESTION)], mode,
                                           GenerationParams(max_new_tokens=1, temperature=0)):
                pass
            bucket.append(time.perf_counter() - t0)
    naive = load(engine.settings)  # a model of its own: peft's adapters are global state
    adapters = [root / "adapters" / d / "v1" for d in DOMAINS]
    peft = PeftModel.from_pretrained(naive.model, str(adapters[0]), adapter_name="naive0")
    t0 = time.perf_counter()
    for i in (1, 2):
        peft.load_adapter(str(adapters[i]), adapter_name=f"naive{i}")
    naive_reload = (time.perf_counter() - t0) / 2
    t0 = time.perf_counter()
    for i in range(30):
        peft.set_adapter(f"naive{i % 3}")
    naive_set = (time.perf_counter() - t0) / 30
    table("Switching mode between requests", ["method", "per request (ms)", "reloads weights"], [
        ["ours, end to end: 1-token request, same mode (median)", statistics.median(same) * 1e3, "no"],
        ["ours, end to end: 1-token request, mode alternating (median)", statistics.median(alternating) * 1e3, "no"],
        ["naive: peft set_adapter (global) per request, the switch alone", naive_set * 1e3,
         "no (but races across users)"],
        ["naive: load the adapter from disk per request, the load alone", naive_reload * 1e3, "yes"],
    ])


async def hot_load(engine: Any, root: Path, tokens: int) -> None:
    """reload() of a new version while another user's stream decodes: its gaps before and during."""
    from engine import Mode

    base_gaps, _ = await timed_stream(engine, Mode("medical"), tokens)
    task = asyncio.create_task(timed_stream(engine, Mode("medical"), tokens))
    await asyncio.sleep(1.0)
    version = new_version(root, "legal")
    t0 = time.perf_counter()
    await engine.reload("legal")
    load_s = time.perf_counter() - t0
    gaps, _ = await task
    table(f"Hot-loading a new adapter version while another stream decodes ({tokens} tokens)", [
        "what", "load time (ms)", "other stream: median gap (ms)", "longest gap (ms)"], [
        ["no load", "-", statistics.median(base_gaps) * 1e3, max(base_gaps) * 1e3],
        [f"reload('legal') -> {version} (loader thread)", load_s * 1e3, statistics.median(gaps) * 1e3,
         max(gaps) * 1e3],
    ])


async def memory(engine: Any, root: Path) -> None:
    """The base model and each resident adapter version, and what holding an A/B's candidate adds."""
    st = engine.status()
    rows = [[f"base model, {st.quantization}", st.model_bytes / 2**20, "", ""]]
    for a in st.adapters:
        rows.append([f"adapter {a.name}/{a.version} resident", a.bytes / 2**20, a.file_bytes / 2**20,
                     f"{a.bytes / a.file_bytes:.3f}x"])
    candidate = new_version(root, "finance", make_current=False)
    held = await engine.hold("finance", (candidate,))
    for a in held:
        rows.append([f"A/B candidate {a.name}/{a.version} held (engine.hold)", a.bytes / 2**20,
                     a.file_bytes / 2**20, f"{a.bytes / a.file_bytes:.3f}x"])
    await engine.hold("finance", ())
    table("Memory", ["what", "MiB in memory", "file MiB", "memory / file"], rows)


async def run(args: argparse.Namespace) -> None:
    from engine import Engine
    from engine.config import load_settings

    root = workdir()
    settings = load_settings(adapters_dir=root / "adapters", templates_dir=root / "templates",
                             model_cache_dir=ROOT / "models")
    try:
        async with Engine(settings) as engine:
            await switching(engine, root)
            await hot_load(engine, root, args.tokens)
            await memory(engine, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__)
    p.add_argument("--tokens", type=int, default=48, help="new tokens per streamed request")
    asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
