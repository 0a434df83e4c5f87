"""Linear layers that read the same input, run as one product (q/k/v; gate/up).

Why: a decode step of a few rows is a sequence of small matrix products whose fixed cost per
call is a large share of their time. On a 2-core CPU a SmolLM2 layer's seven products at one
row took ~640 µs and the same weights in four products ~420 µs (`QUANTIZATION=fp16`); the
LoRA delta of a fused group is one product pair instead of one pair per module (see
`engine.runtime.lora`). vLLM's `QKVParallelLinear`/`MergedColumnParallelLinear` do the same.

Memory stays as it was: the fused weight is the only copy. The member modules keep working
for anyone who calls them (the reference path, a test): a plain `nn.Linear` member's weight
becomes a view into the fused weight, and an `Fp16Linear` member computes through the fused
pack and keeps its own columns. Layers whose weights cannot be concatenated (bitsandbytes
`Linear4bit`/`Linear8bitLt`, hooked or mixed modules) are called one by one and their outputs
concatenated, so the runner sees one layout for every kind.

The numbers are those of the separate products: each output column is the same dot product
(checked bit for bit for MKL's sgemm and fbgemm's fp16 GEMM on this project's shapes).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine import bf16_weights, fp16_weights


class FusedLinear:
    """`modules`, all reading the same input, as one call returning [rows, sum of outputs]."""

    def __init__(self, modules: list[Any]) -> None:
        self.modules = list(modules)
        self.sizes = [int(m.out_features) for m in self.modules]
        self.out_features = sum(self.sizes)
        self.in_features = int(self.modules[0].in_features)
        self.kind, self._call = _fuse(self.modules)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(x)


def _fuse(modules: list[Any]) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    if len(modules) == 1:
        return "single", modules[0]
    if any(_hooked(m) for m in modules) or len({m.in_features for m in modules}) != 1:
        return "concatenated", _concatenated(modules)
    if all(type(m) is fp16_weights.Fp16Linear and m._parameters.get("weight") is None for m in modules):
        pack = fp16_weights.fuse(modules)
        return "fp16 packed", lambda x: torch.ops.quantized.linear_dynamic_fp16(x, pack)
    if all(type(m) is bf16_weights.Bf16Linear and m._parameters.get("weight") is None for m in modules):
        w16 = _fuse_bf16(modules)
        if w16 is not None:
            bias = _bias(modules)
            return "bf16", lambda x: bf16_weights.matmul(x, w16, bias)
    dense = _fuse_dense(modules)
    if dense is not None:
        weight, bias = dense
        return "dense", lambda x: F.linear(x, weight, bias)
    return "concatenated", _concatenated(modules)


def _concatenated(modules: list[Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    def call(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in modules], dim=-1)
    return call


def _hooked(module: Any) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_hf_hook", None))


def _fuse_dense(modules: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One weight for plain `nn.Linear`s of one dtype and device; the members' weights (and
    biases) become views into it, so no byte is added. None when they cannot be fused."""
    if not all(type(m) is nn.Linear for m in modules):
        return None
    weights = [m.weight for m in modules]
    if len({(w.dtype, w.device) for w in weights}) != 1:
        return None
    biases = [m.bias for m in modules]
    weight = _back_to_back(weights)  # fused before (a second runtime over the same model)
    if weight is not None:
        bias = _back_to_back(biases) if all(b is not None for b in biases) else _bias(modules)
        return weight, bias
    if _overlapping(weights):
        return None  # a weight shared between members (tied): leave them be
    with torch.no_grad():
        weight = torch.cat([w.detach() for w in weights])
        bias = _bias(modules)
        lo = 0
        for m in modules:
            hi = lo + m.out_features
            m.weight = nn.Parameter(weight[lo:hi], requires_grad=m.weight.requires_grad)
            if bias is not None and all(b is not None for b in biases):
                m.bias = nn.Parameter(bias[lo:hi], requires_grad=m.bias.requires_grad)
            lo = hi
    return weight, bias


def _fuse_bf16(modules: list[Any]) -> torch.Tensor | None:
    """One bf16 weight for `Bf16Linear`s; their `w16` become views into it (no byte added)."""
    parts = [m.w16 for m in modules]
    weight = _back_to_back(parts)
    if weight is not None:
        return weight
    if _overlapping(parts):
        return None
    weight = torch.cat(parts)
    lo = 0
    for m in modules:
        m.w16 = weight[lo:lo + m.out_features]
        lo += m.out_features
    return weight


def _overlapping(parts: list[torch.Tensor]) -> bool:
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in parts)
    return any(a_end > b_start for (_a, a_end), (b_start, _b) in zip(spans, spans[1:]))


def _bias(modules: list[Any]) -> torch.Tensor | None:
    """The members' biases side by side (zeros for a member without one); None if none has one."""
    if all(m.bias is None for m in modules):
        return None
    with torch.no_grad():
        return torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                          for m in modules])


def _back_to_back(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor `parts` are consecutive blocks of, when they are (members fused before);
    rebuilt as a view of their shared storage, so fusing again copies nothing."""
    first = parts[0]
    storage, offset = first.untyped_storage(), first.storage_offset()
    rows = 0
    for p in parts:
        if (not p.is_contiguous() or p.untyped_storage().data_ptr() != storage.data_ptr()
                or p.storage_offset() != offset + rows * p[0].numel() or p.shape[1:] != first.shape[1:]):
            return None
        rows += p.shape[0]
    shape = (rows, *first.shape[1:])
    with torch.no_grad():
        return first.new_empty(0).set_(storage, offset, shape, torch.empty(shape, device="meta").stride())
