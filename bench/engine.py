"""Engine benchmark: mode switching, hot-load pauses, memory, throughput — against the naive way.

    python -m bench.engine [--tokens 48]

Prints tables; asserts nothing (these machines are shared and noisy).
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


def new_version(root: Path, domain: str) -> str:
    """A v2 with the same shapes (scaled lora_B), committed and made current."""
    from safetensors.torch import load_file, save_file

    from engine.adapter_store import AdapterStore

    store = AdapterStore(root / "adapters")
    src = root / "adapters" / domain / "v1"
    with store.staging(domain) as staged:
        shutil.copy(src / "adapter_config.json", staged)
        t = load_file(str(src / "adapter_model.safetensors"))
        save_file({k: v * 1.5 if ".lora_B." in k else v for k, v in t.items()}, str(staged / "adapter_model.safetensors"))
        v = store.commit(domain, staged, json.loads((src / "meta.json").read_text())).version
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


async def run(args: argparse.Namespace) -> None:
    import torch

    from engine import Engine, GenerationParams, Message, Mode
    from engine.config import load_settings

    root = workdir()
    settings = load_settings(adapters_dir=root / "adapters", templates_dir=root / "templates",
                             model_cache_dir=ROOT / "models")
    engine = Engine(settings)
    await engine.start()
    rt = engine.runtime

    # ---- 1. switching mode between requests -------------------------------------------
    n = 2000
    t0 = time.perf_counter()
    for i in range(n):
        key, _ = engine.registry.acquire(DOMAINS[i % 3])
        rt.row_adapters = [key]
        engine.registry.release(key)
    ours = (time.perf_counter() - t0) / n
    peft = rt.peft_model
    t0 = time.perf_counter()
    for i in range(3):
        peft.load_adapter(str(root / "adapters" / DOMAINS[i] / "v1"), adapter_name=f"naive{i}")
    naive_reload = (time.perf_counter() - t0) / 3
    t0 = time.perf_counter()
    for i in range(30):
        peft.set_adapter(f"naive{i % 3}")
    naive_set = (time.perf_counter() - t0) / 30
    # the naive calls above touch peft's global state; restart to measure the rest cleanly
    await engine.close()
    engine = Engine(settings)
    await engine.start()
    rt = engine.runtime

    same, alternating = [], []
    for i in range(6):
        for bucket, mode in ((same, Mode("legal")), (alternating, Mode(DOMAINS[i % 3]))):
            t0 = time.perf_counter()
            s = engine.generate([Message("user", QUESTION)], mode, GenerationParams(max_new_tokens=1, temperature=0))
            async for _ in s:
                pass
            bucket.append(time.perf_counter() - t0)
    table("Switching mode between requests", ["method", "per switch (ms)", "reloads weights"], [
        ["ours: adapter chosen per row at admission", ours * 1e3, "no"],
        ["naive: peft set_adapter (global) per request", naive_set * 1e3, "no (but races across users)"],
        ["naive: load adapter from disk per request", naive_reload * 1e3, "yes"],
        ["ours, end to end: 1-token request, same mode (median)", statistics.median(same) * 1e3, "no"],
        ["ours, end to end: 1-token request, mode alternating (median)", statistics.median(alternating) * 1e3, "no"],
    ])

    # ---- 2. hot-load of a new version while another user streams --------------------
    base_gaps, _ = await timed_stream(engine, Mode("medical"), args.tokens)
    task = asyncio.create_task(timed_stream(engine, Mode("medical"), args.tokens))
    await asyncio.sleep(1.0)
    version = new_version(root, "legal")
    t0 = time.perf_counter()
    await engine.reload("legal")
    ours_load = time.perf_counter() - t0
    ours_gaps, _ = await task


    vdir = engine.store.version("finance", "v1")

    def naive_load():  # on the model thread: everyone waits while it loads
        t = time.perf_counter()
        rt.peft_model.load_adapter(str(vdir.path), adapter_name="naive_finance")
        return time.perf_counter() - t

    task = asyncio.create_task(timed_stream(engine, Mode("medical"), args.tokens))
    await asyncio.sleep(1.0)
    naive_load_s = await asyncio.wrap_future(engine.scheduler.run_exclusive(naive_load))
    naive_gaps, _ = await task
    table(f"Hot-loading a new adapter version while another stream decodes ({args.tokens} tokens)", [
        "method", "load time (ms)", "other stream: median gap (ms)", "longest gap (ms)"], [
        ["no load (reference)", "-", statistics.median(base_gaps) * 1e3, max(base_gaps) * 1e3],
        [f"ours: reload('legal') -> {version}, loader thread", ours_load * 1e3,
         statistics.median(ours_gaps) * 1e3, max(ours_gaps) * 1e3],
        ["naive: peft load_adapter on the model thread", naive_load_s * 1e3,
         statistics.median(naive_gaps) * 1e3, max(naive_gaps) * 1e3],
    ])
    await engine.close()

    # ---- 3. memory -----------------------------------------------------------------
    from engine import model as loader

    fp32 = loader.load(load_settings(model_cache_dir=ROOT / "models", quantization="none"))
    fp32_bytes = fp32.model.get_memory_footprint()
    del fp32
    engine = Engine(settings)
    await engine.start()
    st = engine.status()
    rows = [["base model, fp32 (quantization=none)", fp32_bytes / 2**20, "", ""],
            ["base model, nf4 (default)", st.model_bytes / 2**20, "", ""]]
    for a in st.adapters:
        rows.append([f"adapter {a.name}/{a.version} resident", a.bytes / 2**20, a.file_bytes / 2**20,
                     f"{a.bytes / a.file_bytes:.3f}x"])
    table("Memory", ["what", "MiB in memory", "file MiB", "memory / file"], rows)

    # ---- 4. throughput ---------------------------------------------------------------
    tok = args.tokens
    _, base_rate = await timed_stream(engine, Mode(None), tok)
    _, lora_rate = await timed_stream(engine, Mode("legal"), tok)
    modes = [Mode(DOMAINS[i % 3]) if i % 4 else Mode(None) for i in range(8)]
    t0 = time.perf_counter()
    for m in modes:
        await timed_stream(engine, m, tok)
    seq = 8 * tok / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    await asyncio.gather(*(timed_stream(engine, m, tok) for m in modes))
    batched = 8 * tok / (time.perf_counter() - t0)
    table(f"Throughput, nf4 on {torch.get_num_threads()} CPU threads, {tok} new tokens per request", [
        "workload", "tokens/s"], [
        ["1 request, base model", base_rate],
        ["1 request, LoRA adapter (legal)", lora_rate],
        ["8 requests, 3 adapters + base, one after another (naive)", seq],
        ["8 requests, 3 adapters + base, batched together (ours)", batched],
    ])
    await engine.close()
    shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__)
    p.add_argument("--tokens", type=int, default=48, help="new tokens per streamed request")
    asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
