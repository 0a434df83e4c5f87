"""B1: CPU linear kernels for SmolLM2-135M's decode-step products, interleaved, one process.

    PYTHONPATH=. .venv/bin/python b1_kernels.py --threads 2 --reps 9

Weights: the engine's converted model (fp32 = the GGUF's Q4_1 de-quantized; head = tied
embedding, Q8_0 in the GGUF). Per variant, every one of the 30 layers' 4 products (qkv, o,
gate_up, down) and the head are called once in order, with distinct weights (the real step's
cache behaviour), at 1/16/64 rows; per-product time is accumulated. Variants run in a shuffled
order each repetition; the table shows medians and the median of the per-repetition ratio to
the engine's bf16. Accuracy: vs fp32 F.linear on the fp32 weights, same inputs.
"""
from __future__ import annotations

import os as _os
REPO_ROOT = _os.environ.get("LORATG_ROOT", _os.path.abspath(_os.path.join(_os.path.dirname(__file__), "../../..")))

import argparse
import json
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, REPO_ROOT)
from engine.bf16_weights import matmul as bf16_matmul  # noqa: E402

MODEL = REPO_ROOT + "/models/SmolLM2-135M-Instruct/model.safetensors"
KINDS = ("qkv", "o", "gate_up", "down")


def load_products() -> dict[str, list[torch.Tensor]]:
    sd = load_file(MODEL)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in KINDS}
    for i in range(30):
        p = f"model.layers.{i}."
        out["qkv"].append(torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]).contiguous())
        out["o"].append(sd[p + "self_attn.o_proj.weight"].contiguous())
        out["gate_up"].append(torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]).contiguous())
        out["down"].append(sd[p + "mlp.down_proj.weight"].contiguous())
    out["head"] = [sd["model.embed_tokens.weight"].contiguous()]
    return out


# ---- formats ---------------------------------------------------------------------------------

def int8_pack(w: torch.Tensor):
    s = (w.abs().amax(1) / 127).clamp_min(1e-12)
    q = torch.round(w / s[:, None]).clamp(-128, 127).to(torch.int8).contiguous()
    return q, s


def int4_pack(w: torch.Tensor, group: int):
    n, k = w.shape
    wg = w.view(n, k // group, group)
    mn, mx = wg.amin(-1), wg.amax(-1)
    d = ((mx - mn) / 15).clamp_min(1e-12)
    q = torch.round((wg - mn[..., None]) / d[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.stack([d, mn + 8 * d], -1).transpose(0, 1).contiguous()  # [k/g, n, 2]: w = (q - 8) * d + (mn + 8d)
    return packed, sz


def make_variants(W: dict[str, list[torch.Tensor]], only: list[str] | None):
    V = {}

    def add(name, prep, call):
        if only and name not in only:
            return
        V[name] = (prep, call)

    add("fp32 F.linear", lambda w: w, lambda x, w: F.linear(x, w))
    add("bf16 engine", lambda w: w.bfloat16(), lambda x, w: bf16_matmul(x, w))
    add("bf16 oneDNN prepacked", lambda w: w.bfloat16(),  # packed per row count at call time, see below
        None)
    add("int8 _weight_int8pack_mm (x fp32)", int8_pack,
        lambda x, p: torch.ops.aten._weight_int8pack_mm(x, p[0], p[1]))
    add("int8 _weight_int8pack_mm (x bf16)", lambda w: (int8_pack(w)[0], int8_pack(w)[1].bfloat16()),
        lambda x, p: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), p[0], p[1]).float())
    for g in (32, 64):
        add(f"int4 g{g} _weight_int4pack_mm_for_cpu (x fp32)", lambda w, g=g: int4_pack(w, g),
            lambda x, p, g=g: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p[0], g, p[1]))
    add("int4 g32 _weight_int4pack_mm_for_cpu (x bf16)", lambda w: (lambda p: (p[0], p[1].bfloat16()))(int4_pack(w, 32)),
        lambda x, p: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), p[0], 32, p[1]).float())

    def fbgemm_prep(w):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w.clone()
        lin.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        m = torch.ao.nn.quantized.dynamic.Linear.from_float(lin)
        return m
    add("int8 dyn-act fbgemm (quantized.linear_dynamic)", fbgemm_prep, lambda x, m: m(x))
    return V


def prepare(V, W, rows_list):
    """Per variant: the weights per kind (oneDNN: one packing per row count)."""
    P = {}
    for name, (prep, call) in V.items():
        if name == "bf16 oneDNN prepacked":
            for rows in rows_list:
                P[(name, rows)] = {k: [torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), rows) for w in ws]
                                   for k, ws in W.items()}
        else:
            pw = {k: [prep(w) for w in ws] for k, ws in W.items()}
            for rows in rows_list:
                P[(name, rows)] = pw
    return P


def call_of(V, name):
    if name == "bf16 oneDNN prepacked":
        return lambda x, w: torch.ops.mkldnn._linear_pointwise(x.bfloat16(), w, None, "none", [], "").float()
    return V[name][1]


def one_step(call, pw, xs):
    """All 30 layers' 4 products and the head once; seconds per kind."""
    t = dict.fromkeys((*KINDS, "head"), 0.0)
    for i in range(30):
        for k in KINDS:
            x = xs[k]
            t0 = time.perf_counter()
            call(x, pw[k][i])
            t[k] += time.perf_counter() - t0
    t0 = time.perf_counter()
    call(xs["head"], pw["head"][0])
    t["head"] += time.perf_counter() - t0
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--only", default="")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows_list = [int(r) for r in a.rows.split(",")]
    W = load_products()
    V = make_variants(W, [s for s in a.only.split(";") if s] or None)
    P = prepare(V, W, rows_list)
    torch.manual_seed(0)
    ins = {"qkv": 576, "o": 576, "gate_up": 576, "down": 1536, "head": 576}
    result = {}
    with torch.inference_mode():
        # accuracy at 16 rows, layer 0 products + head, vs fp32
        acc = {}
        xs = {k: torch.randn(16, n) for k, n in ins.items()}
        for name in V:
            call, pw = call_of(V, name), P[(name, 16)]
            errs = {}
            for k in (*KINDS, "head"):
                ref = F.linear(xs[k], W[k][0])
                y = call(xs[k], pw[k][0]).float()
                errs[k] = {"max_abs": (y - ref).abs().max().item(),
                           "max_rel_to_max": ((y - ref).abs().max() / ref.abs().max()).item(),
                           "rel_l2": ((y - ref).norm() / ref.norm()).item()}
            acc[name] = errs
        result["accuracy"] = acc
        for rows in rows_list:
            xs = {k: torch.randn(rows, n) for k, n in ins.items()}
            times: dict[str, list[dict[str, float]]] = {n: [] for n in V}
            for name in V:  # warm-up
                one_step(call_of(V, name), P[(name, rows)], xs)
            for _ in range(a.reps):
                order = list(V)
                random.shuffle(order)
                for name in order:
                    times[name].append(one_step(call_of(V, name), P[(name, rows)], xs))
            base = "bf16 engine" if "bf16 engine" in V else next(iter(V))
            res = {}
            for name in V:
                tot = [sum(t.values()) for t in times[name]]
                ratio = [sum(t.values()) / sum(b.values()) for t, b in zip(times[name], times[base])]
                res[name] = {
                    "step_ms_median": statistics.median(tot) * 1e3,
                    "step_ms_min": min(tot) * 1e3,
                    "ratio_to_bf16_median": statistics.median(ratio),
                    "ratio_to_bf16_range": [min(ratio), max(ratio)],
                    "per_layer_us": {k: statistics.median(t[k] for t in times[name]) / 30 * 1e6 for k in KINDS},
                    "head_ms": statistics.median(t["head"] for t in times[name]) * 1e3,
                }
            result[f"rows={rows}"] = res
    result["threads"] = a.threads
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
