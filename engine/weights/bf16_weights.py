"""`QUANTIZATION=bf16` on a CPU with AMX: each linear layer's weight kept once, in bf16, and
multiplied by the CPU's bf16 matrix units; everything else stays fp32.

Why: fbgemm's fp16 GEMM (`QUANTIZATION=fp16`) converts its weights to fp32 and multiplies on
the vector units, so from a few rows on a decode step is compute-bound. A CPU with AMX tiles
(Intel Sapphire Rapids and later) multiplies bf16 matrices several times faster than that,
from decode steps of a few rows to prefill chunks (`python -m bench.quantization`). Up to
`WIDE_ROWS` rows (decode steps) the product is written as `W @ xᵀ` (oneDNN's fast case for a
few rows), a single row as `torch.mv`, which reads the weight once at memory speed; from
`WIDE_ROWS` rows on (prefill chunks) as `x @ Wᵀ`, whose result needs no transposing copy.

The price is bf16's rounding: weights to 2^-9 of their size (fp16 keeps 2^-11), the linear
layers' inputs and outputs to bf16 (the residual stream, norms, attention, the LoRA expand
and the KV cache stay fp32; the LoRA shrink rides in the bf16 product, see
`engine.serving.lora`). That is the precision a GPU serves in (`COMPUTE_DTYPE=auto` is bf16 on CUDA),
but greedy answers drift from fp32's sooner than with fp16, and the kernel's summation order
depends on the batch's row count, so a row's numbers may differ in the last bits with the
batch it is in (as on a GPU). Where AMX is missing, bf16 runs on emulation and is slower than
fp16, so `QUANTIZATION=auto` takes it only where `available()` says the tiles are there.

As with `engine.weights.fp16_weights`, the converted modules stay `nn.Linear` subclasses (peft wraps
them as any linear layer) and `weight` reads back an fp32 copy on demand. A forward with
gradients enabled (training) multiplies by that copy in fp32, so training sees a plain
`F.linear` over the served weight values, without bf16's rounding of activations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.weights.fp16_weights import Conversion, swap_linears


def available() -> bool:
    """Whether this CPU has AMX bf16 tiles (and this torch can tell)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check and check())
    except RuntimeError:
        return False


#: Rows from which `x @ Wᵀ` beats `W @ xᵀ` plus its transposing copy (measured on the default
#: model's products summed over a layer, one core).
WIDE_ROWS = 128
#: Result size from which `W @ xᵀ` runs in blocks of `BLOCK_ROWS` rows of W, each block's
#: result transposed and converted while it is still in the cache: one transposing conversion
#: of a large result misses the caches (it pays off for the default model's output head from
#: a few dozen rows on, and costs below that).
BIG_TRANSPOSE = 1 << 20
BLOCK_ROWS = 8192


def matmul(x: torch.Tensor, w16: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w16, bias)` in bf16 with an fp32 result: [..., in] -> [..., out].

    One row (a single stream's decode step) takes the fewest tensor operations: on a CPU each
    one costs microseconds more than its arithmetic once the weights have streamed through
    the caches, and a decode step makes hundreds of them."""
    if x.numel() == x.shape[-1]:
        y = torch.mv(w16, x.reshape(-1).to(torch.bfloat16)).to(x.dtype)
        if bias is not None:
            y.add_(bias)
        return y.view(*x.shape[:-1], w16.shape[0])
    lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    rows = x2.shape[0]
    if rows < WIDE_ROWS:
        out = w16.shape[0]
        if out * rows < BIG_TRANSPOSE:
            y = torch.mm(w16, x2.t()).t().to(x.dtype, memory_format=torch.contiguous_format)
        else:
            xt, y = x2.t(), torch.empty(rows, out, dtype=x.dtype, device=x.device)
            for lo in range(0, out, BLOCK_ROWS):
                y[:, lo:lo + BLOCK_ROWS].copy_(torch.mm(w16[lo:lo + BLOCK_ROWS], xt).t())
    else:
        y = torch.mm(x2, w16.t()).to(x.dtype)
    if bias is not None:
        y.add_(bias)
    return y.view(*lead, w16.shape[0])


class Bf16Linear(nn.Linear):
    """An `nn.Linear` whose weight lives in `w16` ([out, in] bf16; see the module docstring).

    Made only by `convert`, which swaps the class of a loaded `nn.Linear` in place: module
    paths, hooks and the bias stay as they were.
    """

    w16: torch.Tensor

    @property  # type: ignore[override]
    def weight(self) -> torch.Tensor:
        shared = self._parameters.get("weight")  # a weight tied to another module (the embedding) stays
        return shared if shared is not None else self.w16.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # training: fp32 over the same weight values, differentiable
            return F.linear(x, self.weight, self.bias)
        return matmul(x, self.w16, self.bias)


def convert(model: nn.Module) -> Conversion:
    """Swap every plain fp32 CPU `nn.Linear` of `model` for a `Bf16Linear`, in place (a weight
    shared with another module, a tied head, is kept beside its bf16 copy)."""
    tiny = torch.finfo(torch.bfloat16).tiny

    def store(module: nn.Linear, w: torch.Tensor) -> float:
        module.w16 = w.bfloat16()
        return float((module.w16.float() - w).abs_().div_(w.abs().clamp_min(tiny)).max())

    return swap_linears(model, Bf16Linear, store, "bf16")


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the bf16 weights under `model` (not counted by `get_memory_footprint`); members
    fused into one product share one tensor and count once."""
    seen: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, Bf16Linear):
            seen[m.w16.untyped_storage().data_ptr()] = m.w16.untyped_storage().nbytes()
    return sum(seen.values())
