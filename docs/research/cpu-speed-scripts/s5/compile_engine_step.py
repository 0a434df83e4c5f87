"""torch.compile of the engine's own decode step (`FastRuntime._decode_logits`, QUANTIZATION=int4+bf16)
against the eager step, interleaved: by default 1 row on the base model, keys 256, 1 thread (§5);
ROWS=16 or 64: that many rows over every LoRA slot, keys 128 (§6; the runtime's own thread count,
2 here, whatever THREADS says: loading the model sets it).

    [FIX=1] [ROWS=N] [THREADS=T] python compile_engine_step.py default|cpp

`cpp`: inductor's C++ wrapper; FIX=1 writes the KV cache with one `index_put_` on the whole
cache tensor. torch.inference_mode is replaced by no_grad (under inference mode AOT autograd
fails: "Cannot set version_counter for inference tensor"). docs/research/cpu-speed.md §5.
"""
import pathlib
import os, sys, time, statistics, inspect, textwrap, torch
torch.inference_mode = lambda *a, **k: torch.no_grad()
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[4]))
from bench.step import runtime
from engine.serving import threads as cpu_threads, llama
cpu_threads.claim(int(os.environ.get("THREADS", "1")))
src = textwrap.dedent(inspect.getsource(llama.LlamaRunner._forward))
old = """            kc, vc = self.cache.k[li], self.cache.v[li]
            kc[write_rows, :, write_pos] = k
            vc[write_rows, :, write_pos] = v
"""
assert old.replace("            ", "    ") in src or True
src = src.replace("""    kc, vc = self.cache.k[li], self.cache.v[li]
        kc[write_rows, :, write_pos] = k
        vc[write_rows, :, write_pos] = v
""", """    kc, vc = self.cache.k[li], self.cache.v[li]
        torch.ops.aten.index_put_(self.cache.kv, [self._lt[li], self._z, write_rows, None, write_pos], k)
        torch.ops.aten.index_put_(self.cache.kv, [self._lt[li], self._o, write_rows, None, write_pos], v)
""")
assert "index_put_" in src
ns = dict(llama.__dict__)
exec(src, ns)
if os.environ.get("FIX"):
    llama.LlamaRunner._forward = ns["_forward"]
mode = sys.argv[1]
llama.LlamaRunner._lt = [torch.tensor(i) for i in range(64)]; llama.LlamaRunner._z = torch.tensor(0); llama.LlamaRunner._o = torch.tensor(1)
N = int(os.environ.get("ROWS", "1"))
rt, slot_of, nbytes = runtime("int4+bf16", N, 128)
USED, KEYS = ({0}, 256) if N == 1 else (set(slot_of.values()), 128)
r = rt.runner
import torch._inductor.config as ic
if mode == "cpp": ic.cpp_wrapper = True
def eager(): return rt._decode_logits(N, KEYS, USED)
comp = torch.compile(eager, dynamic=False)
with torch.no_grad():
    ref = eager(); t0 = time.perf_counter(); out = comp()
    print(f"compile {time.perf_counter()-t0:.1f}s maxdiff {(out-ref).abs().max().item():.3g}", flush=True)
    def t(f, n=30):
        for _ in range(3): f()
        ts = []
        for _ in range(n):
            a = time.perf_counter(); f(); ts.append(time.perf_counter() - a)
        return statistics.median(ts) * 1e3
    for rep in range(4):
        e = t(eager); c = t(comp)
        print(f"eager {e:.2f} ms compiled {c:.2f} ms ratio {c/e:.2f}", flush=True)
