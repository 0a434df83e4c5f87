"""`QUANTIZATION=fp16` on a CPU: each linear layer's weight kept once, in 16 bits, in fbgemm's
packed layout, and multiplied in fp32.

Why: on a CPU a decode step is its matmuls, and each reads its whole fp32 weight from memory
for a handful of rows. fbgemm's fp16 GEMM (`torch.ops.quantized.linear_dynamic_fp16`) reads
half the bytes and blocks small batches better than MKL's sgemm (`python -m bench.quantization`
measures the step). The
rounding is fp16's, at most 2^-11 (4.9e-4) of each weight (of 2^-14 for the tiny ones that fp16
keeps as subnormals), eight times finer than bf16;
activations, norms, attention, LoRA and the KV cache stay fp32, and there is no activation
quantization, so a row's numbers never depend on the other rows of its batch.

The converted modules stay `nn.Linear` subclasses, so peft wraps them as it wraps any linear
layer (the reference path, training) and our decode path calls them as they are. Their
`weight` is read back from the packed form on demand (peft reads its dtype and device once per
adapter); a forward that needs gradients (training) multiplies by that fp32 copy, so autograd
sees a plain `F.linear` over the same values the served model uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

#: fp16's smallest normal number: below it, weights are stored to within 2^-25 absolute.
FP16_TINY = 2.0 ** -14


def available() -> bool:
    """Whether this torch has fbgemm's fp16 linear kernels (x86 builds do; ARM's qnnpack does not)."""
    engines = set(getattr(torch.backends.quantized, "supported_engines", ()))
    return bool(engines & {"fbgemm", "x86"}) and hasattr(torch.ops.quantized, "linear_dynamic_fp16")


class Fp16Linear(nn.Linear):
    """An `nn.Linear` whose weight lives in fbgemm's packed fp16 form (see the module docstring).

    Made only by `convert`, which swaps the class of a loaded `nn.Linear` in place: module
    paths, hooks and the bias stay as they were.
    """

    packed: Any  # torch.ScriptObject: fbgemm's PackedGemmMatrixFP16 with the bias
    # set by `fuse` instead of `packed`: (a pack shared with sibling layers, this layer's output columns)
    shared_pack: tuple[Any, int, int] | None = None

    @property  # type: ignore[override]
    def weight(self) -> torch.Tensor:
        shared = self._parameters.get("weight")  # a weight tied to another module (the embedding) stays
        if shared is not None:
            return shared
        if self.shared_pack is not None:
            pack, lo, hi = self.shared_pack
            return torch.ops.quantized.linear_unpack_fp16(pack)[0][lo:hi]
        return torch.ops.quantized.linear_unpack_fp16(self.packed)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return F.linear(x, self.weight, self.bias)  # training: differentiable, the same weight values
        if self.shared_pack is not None:  # the siblings' columns are computed too: fine off the serving path
            pack, lo, hi = self.shared_pack
            return torch.ops.quantized.linear_dynamic_fp16(x, pack)[..., lo:hi].contiguous()
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


@dataclass(frozen=True)
class Conversion:
    """What `convert` (or `engine.weights.bf16_weights.convert`) did, for the load log."""

    modules: int
    packed_bytes: int  # bytes now held in the 16-bit weights
    freed_bytes: int  # fp32 weight bytes released (a tied weight stays)
    max_rel_error: float  # the largest rounding of a weight, relative to max(|weight|, the format's tiny)
    kind: str = "fp16"

    def describe(self) -> str:
        return (f"{self.modules} linear layers with {self.kind} weights ({self.packed_bytes / 2**20:.0f} MiB, "
                f"{self.freed_bytes / 2**20:.0f} MiB of fp32 freed, largest rounding {self.max_rel_error:.1e})")


def owner_counts(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> how many modules hold it (2 or more: tied, e.g. a head and the embedding)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return owners


def convert(model: nn.Module) -> Conversion:
    """Swap every plain fp32 `nn.Linear` of `model` for an `Fp16Linear`, in place.

    Weights shared with another module (a head tied to the embedding) are packed too but also
    kept, since the other module still reads them.
    """
    if not available():
        raise RuntimeError("this torch has no fbgemm fp16 kernels (torch.ops.quantized.linear_dynamic_fp16)")

    def store(module: nn.Linear, w: torch.Tensor) -> float:
        bias = None if module.bias is None else module.bias.detach()
        module.packed = torch.ops.quantized.linear_prepack_fp16(w, bias)
        # relative to the weight, or to fp16's smallest normal for the tiny ones it keeps as subnormals
        return float((w.half().float() - w).abs_().div_(w.abs().clamp_min(FP16_TINY)).max())

    return swap_linears(model, Fp16Linear, store, "fp16")


def swap_linears(model: nn.Module, cls: type, store: Callable[[nn.Linear, torch.Tensor], float],
                 kind: str) -> Conversion:
    """Turn every plain fp32 CPU `nn.Linear` of `model` into a `cls`, in place: `store(module,
    weight)` keeps the 16-bit form on the module and returns its largest relative rounding; the
    fp32 weight is then dropped, unless another module shares it (a tied head)."""
    owners = owner_counts(model)
    modules = stored = freed = 0
    worst = 0.0
    for module in model.modules():
        if type(module) is not nn.Linear or module.weight.dtype != torch.float32 or module.weight.device.type != "cpu":
            continue
        w = module.weight.detach()
        worst = max(worst, store(module, w))
        stored += w.numel() * 2
        tied = owners.get(id(module.weight), 0) > 1
        module.__class__ = cls
        if not tied:
            freed += w.numel() * 4
            del module._parameters["weight"]
        modules += 1
    return Conversion(modules, stored, freed, worst, kind)


def fuse(modules: list[Fp16Linear]) -> Any:
    """One fbgemm pack holding `modules`' weights one after another (their outputs side by side),
    for layers that read the same input (q/k/v, gate/up; see `engine.serving.fused`).

    The members keep answering as before, through their columns of the shared pack, and drop
    their own packs, so the bytes held do not change. Fusing the same members again (a second
    runtime over the same model) returns the pack they already share.
    """
    if not modules or any(type(m) is not Fp16Linear or "weight" in m._parameters for m in modules):
        raise ValueError("fuse takes Fp16Linear layers whose weight lives only in their pack")
    first = modules[0].shared_pack
    if first is not None and first[1] == 0:
        lo = 0
        for m in modules:
            if m.shared_pack is None or m.shared_pack[0] is not first[0] or m.shared_pack[1] != lo:
                break
            lo = m.shared_pack[2]
        else:
            if lo == torch.ops.quantized.linear_unpack_fp16(first[0])[0].shape[0]:
                return first[0]
    weights, biases = [], []
    for m in modules:
        w = m.weight.detach()  # already fp16 values: packing them again rounds nothing
        weights.append(w)
        biases.append(m.bias.detach() if m.bias is not None else w.new_zeros(w.shape[0]))
    bias = torch.cat(biases) if any(m.bias is not None for m in modules) else None
    pack = torch.ops.quantized.linear_prepack_fp16(torch.cat(weights), bias)
    lo = 0
    for m, w in zip(modules, weights):
        m.shared_pack = (pack, lo, lo + w.shape[0])
        m.__dict__.pop("packed", None)
        lo += w.shape[0]
    return pack


def packed_bytes(model: nn.Module) -> int:
    """Bytes of the packed fp16 weights under `model` (not counted by `get_memory_footprint`)."""
    return sum(m.in_features * m.out_features * 2 for m in model.modules() if isinstance(m, Fp16Linear))
