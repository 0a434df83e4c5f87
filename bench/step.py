"""One decode step's time by weight format, at 1, 16 and 64 rows (CPU).

    python -m bench.step [--quantizations bf16,int4,int4+bf16] [--rows 1,16,64] [--reps 9] [--keys 128]

The fast path's forward for one decode step (the sampler left out), every format loaded in
this one process and measured in turn within each repetition (the machine's drift hits each
alike); the table shows each format's median step and its median ratio to the first format's
step in the same repetition, with the range. Rows past the first spread over four modes (base,
legal, medical, finance); the 1-row step is shown on the base model and on an adapter. Every row
holds `--keys` keys. Prints tables; asserts nothing (these machines are shared and noisy).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from bench.engine import ROOT, table

DOMAINS = (None, "legal", "medical", "finance")


def runtime(quantization: str, rows: int, keys: int) -> tuple[Any, dict[str | None, int], int]:
    """A FastRuntime over the default model in `quantization` with `rows` rows holding `keys`
    keys each (row i on mode i mod 4); returns it, the LoRA slot of each mode and the model's bytes."""
    import torch

    from engine import model as engine_model
    from engine.adapters.store import AdapterStore
    from engine.config import load_settings
    from engine.serving.runner import FastRuntime

    s = load_settings(quantization=quantization, model_cache_dir=ROOT / "models", adapters_dir=ROOT / "adapters",
                      max_batch_size=rows, context_tokens=max(512, keys + 16), max_resident_adapters=4,
                      prefix_cache_tokens=0)
    loaded = engine_model.load(s)
    rt = FastRuntime(loaded.model, s)
    store = AdapterStore(ROOT / "adapters")
    slot_of: dict[str | None, int] = {None: 0}
    for d in DOMAINS[1:]:
        folder = store.domain_dir(d) / store.current(d)
        slot_of[d] = rt.lora.load(d, folder, folder / "adapter_model.safetensors", _modules(folder), d)
    ids = loaded.tokenizer("Tell me about contracts, fevers and savings. " * (keys // 8))["input_ids"][:keys - 1]
    with torch.inference_mode():
        kv = [rt.cache.allocate() for _ in range(rows)]
        for lo in range(0, rows, 16):  # prefill in groups, so a prefill chunk stays small
            rt.prefill([(k, slot_of[DOMAINS[k % 4]], ids, 0) for k in kv[lo:lo + 16]])
        for k in kv:
            rt.lora_idx[k], rt.pos[k], rt.active[k] = slot_of[DOMAINS[k % 4]], len(ids), True
    return rt, slot_of, engine_model.memory_footprint(loaded.model)


def _modules(folder: Any) -> frozenset[str]:
    from safetensors import safe_open

    from engine.adapters.store import PEFT_KEY_PREFIX

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return frozenset(k[len(PEFT_KEY_PREFIX):].rsplit(".lora_", 1)[0] for k in f.keys() if ".lora_A." in k)


def step_s(rt: Any, rows: int, keys: int, used: set[int], adapter_row: bool) -> float:
    import torch

    with torch.inference_mode():
        if adapter_row:  # row 0 on an adapter for this step only
            rt.lora_idx[0] = max(used)
        started = time.perf_counter()
        rt.decode(rows, keys, used)
        took = time.perf_counter() - started
        rt.lora_idx[0] = 0
    return took


def main(argv: list[str] | None = None) -> int:
    import logging

    p = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n\n")[0])
    p.add_argument("--quantizations", default="bf16,int4,int4+bf16")
    p.add_argument("--rows", default="1,16,64")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--keys", type=int, default=128)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from bench import use_cpu_threads
    from bench.peers.side_by_side import cpu_model
    from engine.serving import threads as cpu_threads

    threads = use_cpu_threads(None)
    cpu_threads.claim(threads)
    kinds = args.quantizations.split(",")
    counts = [int(r) for r in args.rows.split(",")]
    rts = {q: runtime(q, max(counts), args.keys) for q in kinds}
    cases = [(1, False), (1, True)] + [(n, True) for n in counts if n > 1]
    times: dict[tuple[str, int, bool], list[float]] = {}
    for rep in range(args.reps + 1):  # the first round warms up and is not counted
        for n, mixed in cases:
            for q in kinds:
                rt, slot_of, _ = rts[q]
                # one row on an adapter is routed as serving routes it: that slot alone, no mask
                used = set(slot_of.values()) if mixed and n > 1 else ({slot_of["legal"]} if mixed else {0})
                took = step_s(rt, n, args.keys, used, adapter_row=mixed and n == 1)
                if rep:
                    times.setdefault((q, n, mixed), []).append(took)
    print(f"# bench.step: {cpu_model()}, {threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}, "
          f"load average {os.getloadavg()[0]:.1f}, {args.keys} keys per row, {args.reps} repetitions")
    rows = []
    for n, mixed in cases:
        base = times[(kinds[0], n, mixed)]
        for q in kinds:
            t = times[(q, n, mixed)]
            ratios = [a / b for a, b in zip(t, base)]
            label = f"{n} row{'s' if n > 1 else ''}" + (", 4 modes" if n > 1 else ", adapter" if mixed else ", base")
            rows.append([label, q, f"{statistics.median(t) * 1e3:.1f}",
                         f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"])
    table(f"decode step (forward, no sampler) by QUANTIZATION; ratio to {kinds[0]} in the same repetition",
          ["rows", "QUANTIZATION", "median ms", f"vs {kinds[0]}: median (range)"], rows)
    table("resident model bytes", ["QUANTIZATION", "MiB", f"vs {kinds[0]}"],
          [[q, f"{rts[q][2] / 2**20:.0f}", f"{rts[q][2] / rts[kinds[0]][2]:.2f}x"] for q in kinds])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
