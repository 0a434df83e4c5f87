"""torch.compile (dynamic shapes, C++ wrapper) of the engine's wide decode step with every LoRA slot,
against the same step eager, at several widths and key lengths. docs/research/cpu-speed.md §6.

    [CPP=1] python compdyn.py
"""
import pathlib
import os, sys, time, statistics, torch
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[4]))
from bench.step import runtime
from engine.serving import threads as cpu_threads
torch.inference_mode = lambda *a, **k: torch.no_grad()
import torch._inductor.config as ic
ic.cpp_wrapper = os.environ.get("CPP", "1") == "1"
N = 64
rt, slot_of, _ = runtime("int4+bf16", N, 128)
cpu_threads.claim(2)
print("threads", torch.get_num_threads(), flush=True)
def eager(rows, key_len): return rt._decode_logits(rows, key_len, None)
comp = torch.compile(eager, dynamic=True)
shapes = [(16, 128), (16, 129), (40, 129), (64, 129), (12, 129)]
with torch.no_grad():
    for r, k in shapes:
        ref = eager(r, k); t0 = time.perf_counter(); out = comp(r, k)
        print(f"rows {r} keys {k}: first call {time.perf_counter()-t0:.1f}s maxdiff {(out-ref).abs().max().item():.3g} argmax equal {(out.argmax(-1)==ref.argmax(-1)).float().mean().item():.2f}", flush=True)
    def t(f, *a, n=15):
        for _ in range(2): f(*a)
        ts = []
        for _ in range(n):
            s = time.perf_counter(); f(*a); ts.append(time.perf_counter() - s)
        return statistics.median(ts) * 1e3
    for rep in range(2):
        for r, k in shapes:
            e = t(eager, r, k); c = t(comp, r, k)
            print(f"rows {r} keys {k}: eager {e:.2f} ms compiled {c:.2f} ms ratio {c/e:.2f}", flush=True)
