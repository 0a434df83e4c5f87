"""A 1-row decode step with no write inside the compiled graph: attention over the cache's old keys
plus the new key (softmax over both), the new K/V returned and written after the graph in one
indexed copy per cache half. Inductor, `CPP=1` (default) its C++ wrapper, 1 thread, against the
engine's eager step. docs/research/cpu-speed.md §5.
"""
import pathlib
import os, sys, time, statistics, torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[4]))
from bench.step import runtime
from engine.serving import threads as cpu_threads
cpu_threads.claim(int(os.environ.get("T", "1")))
import torch._inductor.config as ic
ic.cpp_wrapper = os.environ.get("CPP", "1") == "1"
rt, slot_of, _ = runtime("int4+bf16", 1, 128)
r = rt.runner
H, KV, HD, G = r.heads, r.kv_heads, r.head_dim, r.groups
half = HD // 2
def pure_step(tok, pos, key_len: int):
    h = r.embed(tok)
    cos, sin = r.rotary(h, pos.view(1, 1))
    cos, sin = cos.view(1, 1, -1), sin.view(1, 1, -1)
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    keys = torch.arange(key_len)
    old = (keys < pos).view(1, 1, 1, key_len)
    ks, vs = [], []
    for li, L in enumerate(r.layers):
        x = L.attn_norm(h)
        qkv = L.qkv(x).view(1, H + 2 * KV, HD)
        qk = qkv[:, :H + KV]
        qk = qk * cos + torch.cat((qk[..., half:], qk[..., :half]), dim=-1) * sin
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV:]
        K, V = r.cache.k[li][0:1, :, :key_len], r.cache.v[li][0:1, :, :key_len]
        qg = q.reshape(1, KV, G, HD)
        s = torch.matmul(qg, K.transpose(-1, -2)).mul(r.scale).masked_fill(~old, float("-inf"))
        s_new = (qg * k.view(1, KV, 1, HD)).sum(-1, keepdim=True).mul(r.scale)
        p = torch.cat([s, s_new], -1).softmax(-1)
        att = torch.matmul(p[..., :key_len], V) + p[..., key_len:] * v.view(1, KV, 1, HD)
        h = h + L.o(att.reshape(1, -1))
        x = L.mlp_norm(h)
        gu = L.gate_up(x)
        n = L.gate_up.sizes[0]
        h = h + L.down(L.act(gu[:, :n]) * gu[:, n:])
        ks.append(k); vs.append(v)
    return r._logits(r.norm(h)), torch.stack(ks), torch.stack(vs)
KL = 256
def write(ks, vs, p):
    rt.cache.kv[:, 0, 0, :, p] = ks.view(len(r.layers), KV, HD)
    rt.cache.kv[:, 1, 0, :, p] = vs.view(len(r.layers), KV, HD)
comp = torch.compile(pure_step, dynamic=False)
ctx = torch.no_grad() if os.environ.get("NOGRAD") else torch.inference_mode()
with ctx:
    p = int(rt.pos[0])
    ref = rt._decode_logits(1, KL, {0})  # writes k/v at p
    ref_k = rt.cache.kv[:, 0, 0, :, p].clone()
    t0 = time.perf_counter()
    out, ks, vs = comp(rt.tok[:1], rt.pos[:1], KL)
    print(f"compile {time.perf_counter()-t0:.1f}s maxdiff logits {(out-ref).abs().max().item():.3g} k {(ks.view(30,KV,HD)-ref_k).abs().max().item():.3g} argmax eq {bool(out.argmax()==ref.argmax())}", flush=True)
    e_out, eks, evs = pure_step(rt.tok[:1], rt.pos[:1], KL)
    print(f"eager pure vs ref maxdiff {(e_out-ref).abs().max().item():.3g}")
    def t(f, n=40):
        for _ in range(3): f()
        ts = []
        for _ in range(n):
            a = time.perf_counter(); f(); ts.append(time.perf_counter() - a)
        return statistics.median(ts) * 1e3
    def run_comp():
        o, ks, vs = comp(rt.tok[:1], rt.pos[:1], KL); write(ks, vs, p); return o
    for rep in range(5):
        e = t(lambda: rt._decode_logits(1, KL, {0})); c = t(run_comp)
        print(f"eager {e:.2f} ms compiled+write {c:.2f} ms ratio {c/e:.2f}", flush=True)
