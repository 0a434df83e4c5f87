"""oneDNN int8 products on AMX (`onednn.qlinear_pointwise`) against bf16 for all 120 decoder products
of one step (30 layers, distinct random weights), with the activations quantized per tensor or per
row in the call. docs/research/cpu-speed.md §6.

    python int8amx.py [threads]
"""
import pathlib
import time, torch, sys
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
torch.manual_seed(0)
shapes = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
L = 30
layers = []
for _ in range(L):
    d = {}
    for k, (o, i) in shapes.items():
        w = torch.randn(o, i) * 0.05
        s = w.abs().amax(1) / 127
        q = torch.clamp(torch.round(w / s[:, None]), -127, 127).to(torch.int8)
        pk = torch.ops.onednn.qlinear_prepack(q, None)
        d[k] = (w.to(torch.bfloat16), pk, s.float(), torch.zeros(o, dtype=torch.int64), w)
    layers.append(d)
def q8(x):
    # per-tensor asymmetric uint8
    lo, hi = x.aminmax()
    scale = float((hi - lo).clamp(min=1e-8)) / 255.0
    zp = int(round(-float(lo) / scale))
    qx = torch.clamp(torch.round(x / scale) + zp, 0, 255).to(torch.uint8)
    return qx, scale, zp
def run_bf16(M, X):
    for d in layers:
        for k in shapes:
            torch.mm(X[k].to(torch.bfloat16), d[k][0].t()).float()
def run_int8(M, X):
    for d in layers:
        for k in shapes:
            qx, s, zp = q8(X[k])
            torch.ops.onednn.qlinear_pointwise(qx, s, zp, d[k][1], d[k][2], d[k][3], None, 1.0, 0, torch.float32, "none", [], "")
def run_int8_noq(M, X, QX):
    for d in layers:
        for k in shapes:
            qx, s, zp = QX[k]
            torch.ops.onednn.qlinear_pointwise(qx, s, zp, d[k][1], d[k][2], d[k][3], None, 1.0, 0, torch.float32, "none", [], "")
for M in (1, 16, 64):
    X = {k: torch.randn(M, i) for k, (o, i) in shapes.items()}
    QX = {k: q8(v) for k, v in X.items()}
    # accuracy on layer 0
    d = layers[0]
    qx, s, zp = q8(X["gate_up"])
    y8 = torch.ops.onednn.qlinear_pointwise(qx, s, zp, d["gate_up"][1], d["gate_up"][2], d["gate_up"][3], None, 1.0, 0, torch.float32, "none", [], "")
    yf = X["gate_up"] @ d["gate_up"][4].t()
    yb = torch.mm(X["gate_up"].to(torch.bfloat16), d["gate_up"][0].t()).float()
    res = {}
    for name, f in (("bf16", lambda: run_bf16(M, X)), ("int8+quant", lambda: run_int8(M, X)), ("int8 kernel only", lambda: run_int8_noq(M, X, QX))):
        f()
        ts = []
        for _ in range(5):
            t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
        res[name] = min(ts) * 1e3
    print(f"M={M:3d} " + "  ".join(f"{k} {v:6.2f} ms" for k, v in res.items()),
          f" rel err int8 {((y8-yf).norm()/yf.norm()):.4f} bf16 {((yb-yf).norm()/yf.norm()):.4f}")
print("--- engine bf16_weights.matmul vs int8 with per-row quant (1 op norm)")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[4]))
from engine.weights import bf16_weights
def run_eng(X):
    for d in layers:
        for k in shapes:
            bf16_weights.matmul(X[k], d[k][0])
def q8row(x):
    a = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_(min=1e-8)
    qx = torch.round(x * (127.0 / a)).to(torch.uint8) if False else (x * (127.0 / a)).round_().add_(128).to(torch.uint8)
    return qx, a
def run_int8row(X):
    for d in layers:
        for k in shapes:
            qx, a = q8row(X[k])
            y = torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, d[k][1], d[k][2], d[k][3], None, 1.0, 0, torch.float32, "none", [], "")
            y.mul_(a * (1 / 127.0))
for M in (16, 64):
    X = {k: torch.randn(M, i) for k, (o, i) in shapes.items()}
    res = {}
    for name, f in (("engine bf16", lambda: run_eng(X)), ("int8 per-row", lambda: run_int8row(X))):
        f(); ts = []
        for _ in range(7):
            t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
        res[name] = sorted(ts)[3] * 1e3
    d = layers[0]; qx, a = q8row(X["gate_up"])
    y8 = torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, d["gate_up"][1], d["gate_up"][2], d["gate_up"][3], None, 1.0, 0, torch.float32, "none", [], "") * (a / 127)
    yf = X["gate_up"] @ d["gate_up"][4].t()
    print(f"M={M}", res, f"err {((y8-yf).norm()/yf.norm()):.4f}")
