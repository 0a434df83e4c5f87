"""SDPA over 30 layers' caches (cold, as in a step) by KV dtype, and attention by hand, at N rows x
128 keys. docs/research/cpu-speed.md §6.

    python attn_cold.py 16|64
"""
import pathlib
import sys, time, torch, torch.nn.functional as F
torch.set_num_threads(2)
n, T, CAP, L = int(sys.argv[1]), 128, 513, 30
def caches(dt):
    return [(torch.randn(n, 3, CAP, 64).to(dt), torch.randn(n, 3, CAP, 64).to(dt)) for _ in range(L)]
q32 = torch.randn(n, 3, 3, 64)
bias = torch.zeros(n, 1, 1, T); bias[::2, ..., T - 5:] = float("-inf")
g32 = bias.expand(n, 1, 3, T).reshape(n, 1, 3, T)
def sdpa(C, dt):
    q, g = q32.to(dt), g32.to(dt)
    def f():
        for k, v in C:
            F.scaled_dot_product_attention(q, k[:, :, :T], v[:, :, :T], attn_mask=g, scale=0.125)
    return f
def manual(C, dt):
    q = q32.to(dt)
    def f():
        for k, v in C:
            s = torch.matmul(q, k[:, :, :T].transpose(-1, -2)).float().mul_(0.125).add_(g32)
            torch.matmul(s.softmax(-1).to(dt), v[:, :, :T])
    return f
res = {}
C32, C16, Cb = caches(torch.float32), caches(torch.float16), caches(torch.bfloat16)
variants = {"sdpa fp32": sdpa(C32, torch.float32), "sdpa bf16": sdpa(Cb, torch.bfloat16), "sdpa fp16": sdpa(C16, torch.float16),
            "manual fp32": manual(C32, torch.float32), "manual bf16": manual(Cb, torch.bfloat16), "manual fp16": manual(C16, torch.float16)}
ts = {k: [] for k in variants}
with torch.inference_mode():
    for rep in range(7):
        for k, f in variants.items():
            t = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t)
for k, v in ts.items():
    v = sorted(v[1:]); print(f"n={n} {k:12s} 30 layers: median {v[len(v)//2]*1e3:6.2f} ms  min {v[0]*1e3:6.2f}")
