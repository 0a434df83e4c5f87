"""Linear layers that read the same input, run as one product (q/k/v; gate/up).

Why: a decode step of a few rows is a sequence of small matrix products whose fixed cost per
call is a large share of their time, so four products per layer cost less than seven over
the same weights; the LoRA delta of a fused group is one product pair instead of one pair per module (see
`engine.serving.lora`). vLLM's `QKVParallelLinear`/`MergedColumnParallelLinear` do the same.

Memory stays as it was: the fused weight is the only copy. The member modules keep working
for anyone who calls them (the reference path, a test): a plain `nn.Linear` member's weight
(or a `Bf16Linear` member's bf16 weight) becomes a view into the fused weight, and an
`Fp16Linear` member computes through the fused pack and keeps its own columns (as does an
`Int4Linear` member through the fused 4-bit weight, `engine.weights.cpu_int4.fuse`); bitsandbytes
4-bit members (nf4, fp4) keep views of one packed weight (`engine.serving.fused_4bit`). Layers
whose weights cannot be concatenated (bitsandbytes `Linear8bitLt`, 4-bit layers repacked for
bitsandbytes' AVX-512 CPU kernel, hooked or mixed modules) are called one by one and their
outputs concatenated, so the runner sees one layout for every kind.

The numbers are those of the separate products: each output column is the same dot product
(checked bit for bit for MKL's sgemm, fbgemm's fp16 GEMM and oneDNN's bf16 product on this
project's shapes).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.weights import bf16_weights, cpu_int4, fp16_weights
from engine.serving import fused_4bit


class FusedLinear:
    """`modules`, all reading the same input, as one call returning [rows, sum of outputs].

    A product of bf16 weights can carry extra rows below its weight (`make_room`):
    `with_rows` returns x times those rows too, from the same kernel. The LoRA
    stacks put their A matrices there (see `engine.serving.lora`), so a LoRA shrink costs no
    product of its own.
    """

    def __init__(self, modules: list[Any]) -> None:
        self.modules = list(modules)
        self.sizes = [int(m.out_features) for m in self.modules]
        self.out_features = sum(self.sizes)
        self.kind, self._call = _fuse(self.modules)
        self._wide: tuple[torch.Tensor, torch.Tensor | None] | None = None  # weight and bias with the extra rows
        self._tops: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # extra -> views of their top rows
        self._int4_room: cpu_int4.Int4Weight | None = None  # a 4-bit product whose bf16 copy has the extra rows
        self._int4_bias: torch.Tensor | None = None  # that product's bias (without the extra rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(x)

    def with_rows(self, x: torch.Tensor, extra: int, skip: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The product of `x` [rows, in] and, from the same kernel, x times extra rows
        [skip, extra) (see `make_room`): ([rows, out_features], [rows, extra - skip]) views of
        one result."""
        n = self.out_features
        q4 = self._int4_room
        if q4 is not None and x.shape[0] <= cpu_int4.NARROW_ROWS:  # the 4-bit kernel, the shrink beside it
            # in fp32 over the rows' bf16 values: for a few rows and a few dozen ranks, a bf16
            # product of this shape costs several times more than the conversion and fp32's
            weight = self._wide[0]
            return q4.matmul(x, self._int4_bias), torch.mm(x, weight[n + skip:n + extra].float().t())
        top = self._tops.get(extra)
        if top is None:  # a view per row count, made once: a step asks for a few counts, many times
            assert self._wide is not None, "extra rows asked of a product without room for them"
            weight, bias = self._wide
            end = self.out_features + extra
            top = self._tops[extra] = (weight[:end], None if bias is None else bias[:end])
        y = bf16_weights.matmul(x, *top)
        return y[:, :n], y[:, n + skip:]

    def make_room(self, rows: int) -> torch.Tensor | None:
        """Room for `rows` extra weight rows below the product's, as a zeroed bf16 [rows, in]
        view to write them into; None where the product is not one bf16 weight (fp32, fp16,
        bitsandbytes, hooked or shared modules), which then has no extra rows.

        The members' bf16 weights become views of the wider tensor's top, so no byte of
        the model's weights is kept twice."""
        members = self.modules
        if self.kind in ("int4", "single") and all(type(m) is cpu_int4.Int4Linear for m in members):
            return self._make_room_int4(rows)
        if not all(type(m) is bf16_weights.Bf16Linear and m._parameters.get("weight") is None for m in members):
            return None
        if self.kind not in ("bf16", "single") or any(_hooked(m) for m in members):
            return None
        with torch.no_grad():
            parts = [m.w16 for m in members]
            wide = parts[0].new_zeros(self.out_features + rows, parts[0].shape[1])
            _copy_into_views(wide, members, parts, lambda m, view: setattr(m, "w16", view))
            bias = _bias(members)
            if bias is not None:
                bias = torch.cat([bias, bias.new_zeros(rows)])
        self._wide, self._tops = (wide, bias), {}
        base = wide[:self.out_features]
        if self.kind == "bf16":  # the plain call reads the same (moved) weight
            fused_bias = None if bias is None else bias[:self.out_features]
            self._call = lambda x: bf16_weights.matmul(x, base, fused_bias)
        return wide[self.out_features:]

    def _make_room_int4(self, rows: int) -> torch.Tensor | None:
        """`make_room` for 4-bit members with a bf16 copy (`QUANTIZATION=int4+bf16`): the
        rows go below the copy; narrow batches multiply them beside the 4-bit kernel. None
        without a copy (`QUANTIZATION=int4`: the LoRA shrink stays a separate fp32 product)."""
        q4 = self.modules[0].q4
        if q4.w16 is None or any(m.q4 is not q4 or _hooked(m) for m in self.modules):
            return None
        with torch.no_grad():
            wide = q4.w16.new_zeros(self.out_features + rows, q4.w16.shape[1])
            wide[:self.out_features].copy_(q4.w16)
        q4.w16 = wide[:self.out_features]
        self._int4_bias = _bias(self.modules)
        bias = None if self._int4_bias is None else torch.cat([self._int4_bias, self._int4_bias.new_zeros(rows)])
        self._wide, self._tops, self._int4_room = (wide, bias), {}, q4
        return wide[self.out_features:]


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
            bias = _fused_bias(modules)
            return "bf16", lambda x: bf16_weights.matmul(x, w16, bias)
    if all(type(m) is cpu_int4.Int4Linear for m in modules):
        q4 = cpu_int4.fuse(modules)
        if q4 is not None:
            bias = _fused_bias(modules)
            return "int4", lambda x: q4.matmul(x, bias)
    dense = _fuse_dense(modules)
    if dense is not None:
        weight, bias = dense
        return "dense", lambda x: F.linear(x, weight, bias)
    packed = fused_4bit.fuse(modules, _concat_into_views, _bias)
    if packed is not None:
        return "4-bit packed", packed
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
    if len({(m.weight.dtype, m.weight.device) for m in modules}) != 1:
        return None

    def set_weight(m: nn.Linear, view: torch.Tensor) -> None:
        m.weight = nn.Parameter(view, requires_grad=m.weight.requires_grad)

    weight = _concat_into_views(modules, [m.weight for m in modules], set_weight)
    return None if weight is None else (weight, _fused_bias(modules))


def _fuse_bf16(modules: list[Any]) -> torch.Tensor | None:
    """One bf16 weight for `Bf16Linear`s; their `w16` become views into it (no byte added)."""
    return _concat_into_views(modules, [m.w16 for m in modules], lambda m, view: setattr(m, "w16", view))


def _fused_bias(modules: list[Any]) -> torch.Tensor | None:
    """The product's bias: views of the members' biases when all have one (their biases become
    views into it), else a copy with zeros for those without (see `_bias`)."""
    if all(m.bias is not None for m in modules):
        def set_bias(m: nn.Linear, view: torch.Tensor) -> None:
            m.bias = nn.Parameter(view, requires_grad=m.bias.requires_grad)

        bias = _concat_into_views(modules, [m.bias for m in modules], set_bias)
        if bias is not None:
            return bias
    return _bias(modules)


def _concat_into_views(modules: list[Any], parts: list[torch.Tensor],
                       set_view: Callable[[Any, torch.Tensor], None]) -> torch.Tensor | None:
    """`parts` (one per member) concatenated along dim 0, each member then holding its block
    as a view (`set_view`), so no byte is added; members fused before (a second runtime over
    the same model) already are such views, and their tensor is rebuilt without a copy.
    None when parts overlap (a tensor shared between members, tied): leave them be."""
    whole = _back_to_back(parts)
    if whole is not None:
        return whole
    if _overlapping(parts):
        return None
    with torch.no_grad():
        whole = parts[0].new_empty(sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        _copy_into_views(whole, modules, parts, set_view)
    return whole


def _copy_into_views(whole: torch.Tensor, modules: list[Any], parts: list[torch.Tensor],
                     set_view: Callable[[Any, torch.Tensor], None]) -> None:
    """Copy `parts` one after another into the top rows of `whole`; each member then holds
    its block as a view (`set_view`)."""
    lo = 0
    for m, p in zip(modules, parts):
        whole[lo:lo + p.shape[0]].copy_(p.detach())
        set_view(m, whole[lo:lo + p.shape[0]])
        lo += p.shape[0]


def _overlapping(parts: list[torch.Tensor]) -> bool:
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in parts)
    return any(a_end > b_start for (_a, a_end), (b_start, _b) in zip(spans, spans[1:]))


def _bias(modules: list[Any]) -> torch.Tensor | None:
    """The members' biases side by side (zeros for a member without one); None if none has one."""
    present = next((m.bias for m in modules if m.bias is not None), None)
    if present is None:
        return None
    with torch.no_grad():  # zeros like a present bias: a member's weight may be packed (4-bit) or made on demand (bf16)
        return torch.cat([m.bias.detach() if m.bias is not None else present.new_zeros(m.out_features)
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
