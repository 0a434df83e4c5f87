"""One row on an adapter: routed with a mask beside slot 0 ({0, L}) or alone ({L}, as serving
routes it), against the base row. docs/research/cpu-speed.md §6.

    python adapter_paths.py [threads]
"""
import pathlib
import sys, time, statistics, torch
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[4]))
from bench.step import runtime
from engine.serving import threads as cpu_threads
cpu_threads.claim(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
rt, slot_of, nbytes = runtime("int4+bf16", 1, 128)
L = slot_of["legal"]
cases = {"base": (0, {0}), "adapter masked {0,L}": (L, {0, L}), "adapter alone {L}": (L, {L})}
ts = {k: [] for k in cases}
with torch.inference_mode():
    for rep in range(40):
        for k, (idx, used) in cases.items():
            rt.lora_idx[0] = idx
            t = time.perf_counter(); rt.decode(1, 128, used); ts[k].append(time.perf_counter() - t)
b = statistics.median(ts["base"][5:])
for k, v in ts.items():
    m = statistics.median(v[5:]); print(f"{k:24s} {m*1e3:6.2f} ms  {b/m:.2f}x of base speed")
