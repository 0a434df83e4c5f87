"""bitsandbytes 4-bit layers that read the same input (q/k/v; gate/up), run as one product.

Why: on a GPU a decode step of a small model is kernel launches, not arithmetic. Called one
by one, q/k/v and gate/up are five 4-bit kernels per layer and two concatenations; as one
product each, two kernels: 150 fewer per decode step of the default model (30 layers), in
every CUDA graph too.

A 4-bit weight is packed row after row, two values a byte, with one scale (absmax) per block
of `blocksize` values; when every member's values fill whole blocks, the members' packed
weights and scales laid end to end are those of the stacked weight [sum of outs, in]. The
packed bytes become one tensor whose blocks the members keep as views (no byte kept twice).
The scales cannot simply be laid end to end when they are themselves quantized ("nested",
bitsandbytes' double quantization: one mean offset per tensor), so the fused product holds
them de-quantized in float32, as bitsandbytes' own kernels compute them: 4 bytes per block
of 64 weights (an eighth of their packed bytes; 4.2 MiB for the default model).

Not fused (the caller concatenates the members' outputs): other layer types, mixed settings,
members that do not fill whole blocks, and layers bitsandbytes repacks for its AVX-512 CPU
kernel (a CPU with AVX512-BF16 serves nf4 in that layout, which is not row after row). A
product is checked once against its members on its device before it is used; if they
disagree it is not used, and the log says so.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


def fuse(modules: list[Any], concat_into_views: Callable[..., torch.Tensor | None],
         side_by_side: Callable[[list[Any]], torch.Tensor | None]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """One call computing `modules` (bitsandbytes `Linear4bit`s) side by side, or None when
    they cannot be fused. `concat_into_views` and `side_by_side` are `engine.serving.fused`'s
    helpers: the members' bytes packed into one tensor they keep views of, and their biases
    side by side."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState, dequantize_blockwise
    except ImportError:
        return None
    if not all(isinstance(m, bnb.nn.Linear4bit) for m in modules):
        return None
    states = [getattr(m.weight, "quant_state", None) for m in modules]
    if any(s is None or getattr(s, "packing_format_for_cpu", False) for s in states):
        return None
    device, dtype = modules[0].weight.device, modules[0].compute_dtype
    if device.type == "cpu" and any(getattr(m, "support_avx512bf16_for_cpu", False) for m in modules):
        return None  # bitsandbytes repacks these for its AVX-512 kernel on their first call
    settings = {(s.quant_type, s.blocksize, s.dtype, m.compute_dtype, m.weight.device) for m, s in zip(modules, states)}
    whole_blocks = all(len(s.shape) == 2 and s.shape[0] * s.shape[1] % s.blocksize == 0 for s in states)
    if dtype is None or len(settings) != 1 or not whole_blocks:
        return None
    with torch.no_grad():
        packed = concat_into_views(modules, [m.weight.data for m in modules],
                                   lambda m, view: setattr(m.weight, "data", view))
        if packed is None:
            return None
        absmax = torch.cat([(dequantize_blockwise(s.absmax, s.state2) + s.offset) if s.nested else s.absmax.float()
                            for s in states])
        bias = side_by_side(modules)
        if bias is not None:
            bias = bias.to(dtype)
    first = states[0]
    state = QuantState(absmax=absmax, shape=torch.Size([sum(int(s.shape[0]) for s in states), int(first.shape[1])]),
                       code=first.code, blocksize=first.blocksize, quant_type=first.quant_type, dtype=first.dtype)

    def call(x: torch.Tensor) -> torch.Tensor:
        return bnb.matmul_4bit(x.to(dtype), packed, quant_state=state, bias=bias).to(x.dtype)

    problem = _disagreement(call, modules, device, dtype)
    if problem:
        log.warning("4-bit %s not fused (its members are called one by one): %s",
                    "+".join(type(m).__name__ for m in modules), problem)
        return None
    return call


def _disagreement(call: Callable[[torch.Tensor], torch.Tensor], modules: list[Any], device: torch.device,
                  dtype: torch.dtype) -> str | None:
    """Why the fused call does not compute what its members do (None when it does), for one
    row and for a few (bitsandbytes picks another kernel for each)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    try:
        with torch.inference_mode():
            for rows in (1, 5):
                x = torch.randn(rows, modules[0].in_features, generator=generator).to(device, dtype)
                got = call(x).float()
                want = torch.cat([m(x) for m in modules], dim=-1).float()
                if got.shape != want.shape:
                    return f"{rows} rows: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
                # the same dot products; only the rounding of the scales' de-quantization may differ
                tolerance = 1e-2 * float(want.abs().max()) + 1e-6
                off = float((got - want).abs().max())
                if not off <= tolerance:
                    return f"{rows} rows: off by {off:.3g} (tolerance {tolerance:.3g})"
    except Exception as exc:  # a kernel that refuses the fused layout: the members still work
        return f"{type(exc).__name__}: {exc}"
    return None
