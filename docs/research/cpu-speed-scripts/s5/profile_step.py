"""torch.profiler over the engine's 1-row decode step (base and adapter) in a QUANTIZATION.

    python profile_step.py [int4+bf16] [threads]

docs/research/cpu-speed.md §5.
"""
import pathlib
import sys, time, statistics, torch
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[4]))
from bench.step import runtime
from engine.serving import threads as cpu_threads
cpu_threads.claim(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
q = sys.argv[1] if len(sys.argv) > 1 else "int4+bf16"
rt, slot_of, nbytes = runtime(q, 1, 128)
print("bytes", nbytes/2**20)
def step(adapter):
    rt.lora_idx[0] = slot_of["legal"] if adapter else 0
    used = {0, slot_of["legal"]} if adapter else {0}
    rt.decode(1, 128, used)
with torch.inference_mode():
    for a in (False, True):
        for _ in range(5): step(a)
        ts=[]
        for _ in range(30):
            t=time.perf_counter(); step(a); ts.append(time.perf_counter()-t)
        print("adapter" if a else "base", "median ms %.2f min %.2f" % (statistics.median(ts)*1e3, min(ts)*1e3))
    from torch.profiler import profile, ProfilerActivity
    for a in (False, True):
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(10): step(a)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
