"""SDPA over an fp32 and a bf16 KV cache at the engine's decode shapes (3 KV heads, 3 query heads
each, head dim 64), 1 thread. docs/research/cpu-speed.md §5.
"""
import time, torch, torch.nn.functional as F
torch.set_num_threads(1)
def bench(f, n=30):
    for _ in range(5): f()
    ts = []
    for _ in range(5):
        a = time.perf_counter()
        for _ in range(n): f()
        ts.append((time.perf_counter() - a) / n)
    return min(ts) * 1e6
for n in (1, 16, 64):
    for T in (128, 512):
        res = []
        for dt in (torch.float32, torch.bfloat16):
            q = torch.randn(n, 3, 3, 64, dtype=dt); k = torch.randn(n, 3, T, 64, dtype=dt); v = torch.randn(n, 3, T, 64, dtype=dt)
            m = torch.zeros(n, 1, 3, T, dtype=dt); m[..., T // 2:] = float("-inf")
            res.append(bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.125)))
        print(f"n {n:3d} keys {T}: fp32 {res[0]:7.1f} us  bf16 {res[1]:7.1f} us  ({res[1]/res[0]:.2f}x)")
