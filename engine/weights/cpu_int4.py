"""`QUANTIZATION=int4` on a CPU: each decoder linear layer's weight kept in 4 bits (groups of 32
along the input, asymmetric, bf16 scale and zero per group) and multiplied by aten's
`_weight_int4pack_mm_for_cpu` with bf16 activations and an fp32 result.

Why: a decode step of a few rows reads every weight once and does little arithmetic with it,
so it goes at the speed of memory; 4-bit weights are a quarter of bf16's bytes
(docs/engine.md has the measured steps). And for the embedded default model they are its own
numbers: the GGUF's decoder layers are Q4_1 (groups of 32, `w = d·q + m`, q in 0..15), which is
this format with `scale = d`, `zero = m + 8·d` (the kernel computes `(q - 8)·scale + zero`), so
re-quantizing the converted fp32 weights recovers the GGUF's integers; what rounds is the
bf16 of the activations, scales and zeros, the order of `QUANTIZATION=bf16`'s rounding. A model
from another source is rounded to the nearest of 16 levels per group (Q4_1's quality).

The kernel has no matrix-unit path: from a few rows on it is compute-bound and slower than
bf16 on AMX tiles (prefill chunks, wide decode batches). `QUANTIZATION=int4+bf16` keeps a bf16
copy beside the 4-bit weight for batches of more than `NARROW_ROWS` rows: the fastest at every
batch size, at the memory of bf16 plus the 4-bit weights. `QUANTIZATION=int4` keeps only the
4-bit weights (the smallest model) and multiplies every batch with them.

Layers whose shapes the kernel cannot take (outputs not a multiple of 64, inputs not of 32)
stay as they were; the output head is not converted here (it was Q8_0 in the GGUF, and 4 bits
would lose a tenth of its precision): the loader makes it bf16.

As with `engine.weights.bf16_weights`, the converted modules stay `nn.Linear` subclasses (peft
wraps them as any linear layer), `weight` reads the served values back in fp32 on demand, and a
forward with gradients enabled (training) multiplies by that copy in fp32.

`exact=True` (tests) keeps fp32 scales and zeros and feeds fp32 activations to the same kernel
(its slow path): the products are then fp32 `F.linear` over the de-quantized weights up to
summation order, the fp32 twin of the served path.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.weights import bf16_weights
from engine.weights.fp16_weights import Conversion, owner_counts

#: Input features per scale and zero (Q4_1's block).
GROUP = 32
#: The kernel's packed layout interleaves blocks of this many output features.
BLOCK_N = 64
#: Rows up to which the 4-bit kernel beats bf16 on AMX tiles (measured on the default model's
#: products, docs/engine.md); wider batches use the bf16 copy where there is one.
NARROW_ROWS = 8


@functools.cache
def available() -> bool:
    """Whether this torch has the CPU int4 kernel and it runs here."""
    op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if op is None:
        return False
    try:
        packed, sz, _err = quantize(torch.ones(BLOCK_N, GROUP), torch.bfloat16)
        op(torch.ones(1, GROUP, dtype=torch.bfloat16), packed, GROUP, sz)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def quantize(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """w [out, in] fp32 -> (packed uint8 [out, in / 2], scales and zeros [in / 32, out, 2] in
    `dtype`, largest rounding of a weight relative to its group's range).

    Asymmetric round-to-nearest per group: the group's minimum is level 0, its maximum level
    15. For Q4_1 weights (the default model) this is the GGUF's own quantization, exactly."""
    out_f, in_f = w.shape
    g = w.detach().float().reshape(out_f, in_f // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((g - lo.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp_(0, 15)
    error = (q * safe.unsqueeze(-1) + lo.unsqueeze(-1) - g).abs_().amax(-1) / (hi - lo).clamp_min(1e-30)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(out_f, in_f).to(torch.int32), 2)
    sz = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return packed, sz, float(error.max())


def dequantize(packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [out, in] the kernel multiplies by (the inverse of `quantize`'s packing:
    per block of 64 outputs and each input k, byte j holds output j in its low nibble and
    output j + 32 in its high one)."""
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    p = packed.view(out_f // BLOCK_N, in_f, BLOCK_N // 2)
    q = torch.cat([p & 15, p >> 4], dim=-1).transpose(1, 2).reshape(out_f, in_f).float()
    scale = sz[..., 0].float().t().repeat_interleave(GROUP, dim=1)  # [out, in]
    zero = sz[..., 1].float().t().repeat_interleave(GROUP, dim=1)
    return (q - 8).mul_(scale).add_(zero)


class Int4Weight:
    """One 4-bit product (a layer's, or fused members' side by side), optionally with a bf16
    copy for wide batches (`QUANTIZATION=int4+bf16`)."""

    def __init__(self, packed: torch.Tensor, sz: torch.Tensor, w16: torch.Tensor | None) -> None:
        self.packed, self.sz, self.w16 = packed, sz, w16

    @property
    def out_features(self) -> int:
        return int(self.packed.shape[0])

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`F.linear(x, W, bias)` with an fp32 result (x's dtype): [..., in] -> [..., out]."""
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if self.w16 is not None and x2.shape[0] > NARROW_ROWS:
            return bf16_weights.matmul(x, self.w16, bias)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(self.sz.dtype), self.packed, GROUP, self.sz)
        y = y.to(x.dtype)
        if bias is not None:
            y.add_(bias)
        return y.view(*lead, self.out_features)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Output features [lo, hi) de-quantized to fp32 (block-aligned: the fused members')."""
        return dequantize(self.packed[lo:hi], self.sz[:, lo:hi])

    def nbytes(self) -> int:
        w16 = 0 if self.w16 is None else self.w16.untyped_storage().nbytes()
        return self.packed.untyped_storage().nbytes() + self.sz.untyped_storage().nbytes() + w16


class Int4Linear(nn.Linear):
    """An `nn.Linear` whose weight lives in `q4`'s output features `cols` (see the module
    docstring). Made only by `convert`, which swaps the class of a loaded `nn.Linear` in place;
    `fuse` points several at one shared `Int4Weight`."""

    q4: Int4Weight
    cols: tuple[int, int]

    @property  # type: ignore[override]
    def weight(self) -> torch.Tensor:
        return self.q4.rows(*self.cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # training: fp32 over the same weight values, differentiable
            return F.linear(x, self.weight, self.bias)
        lo, hi = self.cols
        if (lo, hi) == (0, self.q4.out_features):
            return self.q4.matmul(x, self.bias)
        y = self.q4.matmul(x)[..., lo:hi]  # a fused member called alone (off the serving path)
        return (y + self.bias if self.bias is not None else y).contiguous()


def convert(model: nn.Module, *, wide_copy: bool = False, exact: bool = False) -> Conversion:
    """Swap the plain fp32 CPU `nn.Linear`s inside `model`'s decoder layers (module paths with
    `.layers.`) for `Int4Linear`s, in place; `wide_copy` keeps a bf16 copy for wide batches,
    `exact` fp32 scales for fp32 activations (the tests' twin, see the module docstring)."""
    owners = owner_counts(model)
    modules = stored = freed = 0
    worst = 0.0
    for path, module in model.named_modules():
        if (type(module) is not nn.Linear or ".layers." not in f".{path}" or module.weight.dtype != torch.float32
                or module.weight.device.type != "cpu" or owners.get(id(module.weight), 0) > 1
                or module.out_features % BLOCK_N or module.in_features % GROUP):
            continue
        w = module.weight.detach()
        packed, sz, error = quantize(w, torch.float32 if exact else torch.bfloat16)
        module.q4 = Int4Weight(packed, sz, w.bfloat16() if wide_copy else None)
        module.cols = (0, module.out_features)
        worst = max(worst, error)
        stored += module.q4.nbytes()
        freed += w.numel() * 4
        module.__class__ = Int4Linear
        del module._parameters["weight"]
        modules += 1
    kind = ("int4+bf16" if wide_copy else "int4") + (" (fp32 scales)" if exact else "")
    return Conversion(modules, stored, freed, worst, kind)


def fuse(modules: list[Any]) -> Int4Weight | None:
    """One `Int4Weight` for `Int4Linear`s reading the same input (q/k/v, gate/up), their
    outputs side by side; the members then compute through their columns of it and hold no
    weight of their own, so no byte is added. None when they cannot be fused."""
    if not modules or any(type(m) is not Int4Linear for m in modules):
        return None
    if len({id(m.q4) for m in modules}) == 1:  # fused before: their weight, if they cover it in order
        q4, lo = modules[0].q4, 0
        for m in modules:
            if m.cols[0] != lo:
                return None
            lo = m.cols[1]
        return q4 if lo == q4.out_features else None
    if any(m.cols != (0, m.q4.out_features) for m in modules):
        return None
    if len({m.in_features for m in modules}) != 1 or len({m.q4.sz.dtype for m in modules}) != 1:
        return None
    if len({m.q4.w16 is None for m in modules}) != 1:
        return None
    w16 = None if modules[0].q4.w16 is None else torch.cat([m.q4.w16 for m in modules])
    q4 = Int4Weight(torch.cat([m.q4.packed for m in modules]), torch.cat([m.q4.sz for m in modules], dim=1), w16)
    lo = 0
    for m in modules:
        m.q4, m.cols = q4, (lo, lo + m.out_features)
        lo += m.out_features
    return q4


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the 4-bit weights (and their bf16 copies) under `model`; fused members count once."""
    seen = {id(m.q4): m.q4.nbytes() for m in model.modules() if isinstance(m, Int4Linear)}
    return sum(seen.values())
