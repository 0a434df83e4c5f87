"""B2: the engine's decode step as one function, eager vs torch.compile (inductor, CPU).

    PYTHONPATH=. TORCHINDUCTOR_CACHE_DIR=/tmp/ind-cache \
        .venv/bin/python b2_step.py --threads 2 --fmt bf16 --rows 1,16,64 --engine

A scratch copy of the engine's decode step (engine/runtime/llama.py `_forward` with T == 1,
fused qkv / gate_up, RoPE on q and k at once, slot KV cache written in place, GQA as query
length, additive mask; stacked LoRA slots with a per-row scaled one-hot mask on every
product, as engine/runtime/lora.py's multi-slot path; greedy sampling as `max().indices`),
with fixed shapes per (rows, key bucket). Weight formats: bf16 (the engine's matmul), int4 g32
(`_weight_int4pack_mm_for_cpu`, activations bf16), int8 (`_weight_int8pack_mm`). Measures:
compile time per bucket, step time eager vs compiled (interleaved), tokens equal, and with
--engine the engine's own FastRuntime step (same rows) beside them.
"""
from __future__ import annotations

import os as _os
REPO_ROOT = _os.environ.get("LORATG_ROOT", _os.path.abspath(_os.path.join(_os.path.dirname(__file__), "../../..")))

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, REPO_ROOT)
from engine.bf16_weights import matmul as bf16_matmul  # noqa: E402

MODEL = REPO_ROOT + "/models/SmolLM2-135M-Instruct/model.safetensors"
L, HID, INTER, HEADS, KV, HD, VOCAB = 30, 576, 1536, 9, 3, 64, 49152
GROUPS = HEADS // KV
EPS = 1e-5
NL = L  # layers the prototype runs (--layers)
NO_MV = False
FLAT_KV = True
OPAQUE = True  # --inline-bf16: let dynamo trace the engine matmul instead
THETA = 100000.0


@torch.library.custom_op("proto::bf16_matmul", mutates_args=())
def bf16_matmul_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The engine's bf16 product as one opaque call: inductor keeps its kernel choice (mv for one
    row, W @ x^T below 128 rows) instead of lowering it to generated loops."""
    return bf16_matmul(x, w)


@bf16_matmul_op.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


def int4_pack(w: torch.Tensor, group: int = 32):
    n, k = w.shape
    wg = w.view(n, k // group, group)
    mn, mx = wg.amin(-1), wg.amax(-1)
    d = ((mx - mn) / 15).clamp_min(1e-12)
    q = torch.round((wg - mn[..., None]) / d[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2), \
        torch.stack([d, mn + 8 * d], -1).transpose(0, 1).contiguous().bfloat16()


def int8_pack(w: torch.Tensor):
    s = (w.abs().amax(1) / 127).clamp_min(1e-12)
    return torch.round(w / s[:, None]).clamp(-128, 127).to(torch.int8).contiguous(), s.bfloat16()


class Lin(nn.Module):
    def __init__(self, w: torch.Tensor, fmt: str) -> None:
        super().__init__()
        self.fmt, self.out = fmt, w.shape[0]
        if fmt == "bf16":
            self.register_buffer("w", w.bfloat16())
        elif fmt == "fp32":
            self.register_buffer("w", w.clone())
        elif fmt == "int4":
            p, sz = int4_pack(w)
            self.register_buffer("w", p)
            self.register_buffer("sz", sz)
        elif fmt == "int8":
            q, s = int8_pack(w)
            self.register_buffer("w", q)
            self.register_buffer("s", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "bf16":
            if NO_MV:
                return torch.mm(self.w, x.bfloat16().t()).t().float()
            if OPAQUE:
                return bf16_matmul_op(x, self.w)
            return bf16_matmul(x, self.w)
        if self.fmt == "fp32":
            return F.linear(x, self.w)
        if self.fmt == "int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), self.w, 32, self.sz).float()
        return torch.ops.aten._weight_int8pack_mm(x.bfloat16(), self.w, self.s).float()


class Lora(nn.Module):
    """Stacked slots of one product: A [S*r, in], B [S*r, out], table [S, S*r] (scaling on a slot's rows)."""

    def __init__(self, inf: int, outf: int, slots: int, r: int, gen: torch.Generator) -> None:
        super().__init__()
        self.register_buffer("a", torch.randn(slots * r, inf, generator=gen) * 0.02)
        self.register_buffer("b", torch.randn(slots * r, outf, generator=gen) * 0.02)
        self.a[:r] = 0  # slot 0 = no adapter
        self.b[:r] = 0


class Step(nn.Module):
    def __init__(self, sd: dict[str, torch.Tensor], fmt: str, head_fmt: str, slots: int, r: int, lora: bool) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.lora = lora
        self.register_buffer("embed", sd["model.embed_tokens.weight"].clone())
        self.head = Lin(sd["model.embed_tokens.weight"], head_fmt)
        self.register_buffer("norm", sd["model.norm.weight"].clone())
        self.ln1, self.ln2 = [], []
        self.qkv, self.o, self.gu, self.down = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.lq, self.lo, self.lgu, self.ld = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in range(NL):
            p = f"model.layers.{i}."
            self.register_buffer(f"ln1_{i}", sd[p + "input_layernorm.weight"].clone())
            self.register_buffer(f"ln2_{i}", sd[p + "post_attention_layernorm.weight"].clone())
            self.qkv.append(Lin(torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]), fmt))
            self.o.append(Lin(sd[p + "self_attn.o_proj.weight"], fmt))
            self.gu.append(Lin(torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]), fmt))
            self.down.append(Lin(sd[p + "mlp.down_proj.weight"], fmt))
            self.lq.append(Lora(HID, (HEADS + 2 * KV) * HD, slots, r * 3, gen))
            self.lo.append(Lora(HID, HID, slots, r, gen))
            self.lgu.append(Lora(HID, 2 * INTER, slots, r * 2, gen))
            self.ld.append(Lora(INTER, HID, slots, r, gen))
        self.slots, self.r = slots, r
        inv = 1.0 / (THETA ** (torch.arange(0, HD, 2).float() / HD))
        t = torch.arange(2048).float()
        f = torch.outer(t, inv)
        emb = torch.cat([f, f], -1)
        self.register_buffer("cos", emb.cos())
        sin = emb.sin()
        self.register_buffer("sin", torch.cat([-sin[:, :HD // 2], sin[:, HD // 2:]], -1))

    def delta(self, lo: Lora, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ((x @ lo.a.T) * mask) @ lo.b

    def lin(self, prod: Lin, lo: Lora, x: torch.Tensor, masks: dict[int, torch.Tensor]) -> torch.Tensor:
        y = prod(x)
        if self.lora:
            y = y.addmm_(x @ lo.a.T * masks[lo.a.shape[0]], lo.b)
        return y

    def forward(self, tok: torch.Tensor, pos: torch.Tensor, slot_scale: torch.Tensor, kc: torch.Tensor,
                vc: torch.Tensor, key_len: int) -> torch.Tensor:
        n = tok.shape[0]
        h = self.embed[tok]
        cos, sin = self.cos[pos].view(n, 1, HD), self.sin[pos].view(n, 1, HD)
        keys_i = torch.arange(key_len, device=tok.device)
        bias = torch.zeros(n, 1, 1, key_len).masked_fill_(~(keys_i.view(1, 1, 1, -1) <= pos.view(n, 1, 1, 1)),
                                                          float("-inf"))
        gmask = bias.expand(n, 1, GROUPS, key_len)
        rows = torch.arange(n, device=tok.device)
        # per row: the scaled one-hot over slots, widened to each stack's rank rows
        masks = {w: slot_scale.repeat_interleave(w // self.slots, dim=1) for w in
                 {self.lq[0].a.shape[0], self.lo[0].a.shape[0], self.lgu[0].a.shape[0]}}
        half = HD // 2
        for i in range(NL):
            x = F.rms_norm(h, (HID,), getattr(self, f"ln1_{i}"), EPS)
            qkv = self.lin(self.qkv[i], self.lq[i], x, masks).view(n, HEADS + 2 * KV, HD)
            qk = qkv[:, :HEADS + KV]
            qk = qk * cos + torch.cat((qk[..., half:], qk[..., :half]), -1) * sin
            q, k, v = qk[:, :HEADS], qk[:, HEADS:], qkv[:, HEADS + KV:]
            if FLAT_KV:  # one index_put_ on the whole cache: inductor keeps it in place (no copy of the cache)
                li = torch.full_like(rows, i)
                torch.ops.aten.index_put_(kc, [li, rows, None, pos], k)
                torch.ops.aten.index_put_(vc, [li, rows, None, pos], v)
            else:
                kc[i, rows, :, pos] = k
                vc[i, rows, :, pos] = v
            att = F.scaled_dot_product_attention(q.reshape(n, KV, GROUPS, HD), kc[i, :n, :, :key_len],
                                                 vc[i, :n, :, :key_len], attn_mask=gmask, scale=HD ** -0.5)
            h = h + self.lin(self.o[i], self.lo[i], att.reshape(n, HID), masks)
            x = F.rms_norm(h, (HID,), getattr(self, f"ln2_{i}"), EPS)
            gu = self.lin(self.gu[i], self.lgu[i], x, masks)
            h = h + self.lin(self.down[i], self.ld[i], F.silu(gu[:, :INTER]) * gu[:, INTER:], masks)
        logits = self.head(F.rms_norm(h, (HID,), self.norm, EPS)).float()
        return logits.max(-1).indices


def timeit(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fmt", default="bf16")
    ap.add_argument("--head", default="bf16")
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--key-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-lora", action="store_true")
    ap.add_argument("--freezing", action="store_true")
    ap.add_argument("--mode", default=None)
    ap.add_argument("--engine", action="store_true", help="also time the engine's FastRuntime step")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--layers", type=int, default=L)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-mv", action="store_true")
    ap.add_argument("--inline-bf16", action="store_true")
    ap.add_argument("--view-kv", action="store_true", help="write the cache through a view (copies it when compiled)")
    a = ap.parse_args()
    global NL, NO_MV, OPAQUE, FLAT_KV
    NL, NO_MV, OPAQUE, FLAT_KV = a.layers, a.no_mv, not a.inline_bf16, not a.view_kv
    torch.set_num_threads(a.threads)
    import torch._inductor.config as icfg
    icfg.freezing = a.freezing
    rows_list = [int(x) for x in a.rows.split(",")]
    slots, r = 5, 8
    sd = load_file(MODEL)
    res: dict = {"args": vars(a), "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
    with torch.inference_mode():
        fmts = a.fmt.split(",")
        steps = {f: Step(sd, f, a.head, slots, r, not a.no_lora).eval() for f in fmts}
        maxn = max(rows_list)
        kc = torch.zeros(L, maxn, KV, 2 * a.key_len + 1, HD)
        vc = torch.zeros(L, maxn, KV, 2 * a.key_len + 1, HD)
        kc.normal_(0, 1)
        vc.normal_(0, 1)
        compiled = {} if a.skip_compile else {f: torch.compile(st, dynamic=False, mode=a.mode) for f, st in steps.items()}
        engine_rt = None
        if a.engine:
            from engine import model as loader
            from engine.config import load_settings
            from engine.runtime import FastRuntime

            s = load_settings(model_cache_dir="$(git rev-parse --show-toplevel)/models", quantization="bf16", device="cpu",
                              max_batch_size=maxn, cpu_threads=a.threads, context_tokens=2 * a.key_len,
                              max_new_tokens=64, prefix_cache_tokens=0)
            lm = loader.load(s)
            engine_rt = FastRuntime(lm.model, s)
        for n in rows_list:
            tok = torch.randint(0, VOCAB, (n,))
            pos = torch.full((n,), a.key_len // 2 - 1, dtype=torch.long) - torch.arange(n) % 8
            slot_scale = torch.zeros(n, slots)
            mode = torch.arange(n) % 4  # 4 modes: slot 0 (base, scale 0) + 3 adapters
            slot_scale[torch.arange(n), mode] = torch.where(mode > 0, 2.0, 0.0)
            args = (tok, pos, slot_scale, kc, vc, a.key_len)
            out: dict = {"compile_s": {}, "tokens_equal_eager": {}}
            fns = {}
            ref = None
            for f, st in steps.items():
                got = st(*args)
                ref = got if ref is None else ref
                out["tokens_equal_eager"][f"{f} vs {fmts[0]}"] = bool(torch.equal(got, ref))
                fns[f"eager {f}"] = (lambda st=st: st(*args))
                if f in compiled:
                    t0 = time.perf_counter()
                    ctok = compiled[f](*args)
                    out["compile_s"][f] = time.perf_counter() - t0
                    out["tokens_equal_eager"][f"compiled {f} vs eager {f}"] = bool(torch.equal(ctok, got))
                    fns[f"compiled {f}"] = (lambda c=compiled[f]: c(*args))
            if a.profile:
                from torch.profiler import profile
                for name, fn in fns.items():
                    with profile() as prof:
                        fn()
                    print(f"--- profile {name}, rows {n}")
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
            if engine_rt is not None:
                rt = engine_rt
                rt.active[:n] = True
                rt.pos[:n] = pos
                rt.tok[:n] = tok
                rt.lora_idx[:n] = mode
                used = set(mode.tolist())
                fns["engine FastRuntime, base rows"] = lambda: rt.decode(n, a.key_len, {0})[0].max(-1).indices
                fns["engine FastRuntime, 4 modes"] = lambda: rt.decode(n, a.key_len, used)[0].max(-1).indices
            for fn in fns.values():
                fn()
            times = {k: [] for k in fns}
            for _ in range(a.reps):  # interleaved
                for k, fn in fns.items():
                    times[k] += timeit(fn, 1)
            out["ms_median"] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            out["ms_min"] = {k: min(v) * 1e3 for k, v in times.items()}
            first = next(iter(times))
            out[f"ratio_to_{first}_median"] = {k: statistics.median(x / y for x, y in zip(v, times[first]))
                                               for k, v in times.items()}
            out[f"ratio_to_{first}_range"] = {k: [min(x / y for x, y in zip(v, times[first])),
                                                  max(x / y for x, y in zip(v, times[first]))] for k, v in times.items()}
            res[f"rows={n}"] = out
            print(n, json.dumps(out), flush=True)
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
