"""Fused products (q/k/v, gate/up): the same numbers, the same bytes, and the members still work.

The fast path computes linear layers that read the same input as one product. These tests
hold it to three promises: the fused output is the members' outputs side by side; no weight
is copied (the members become views of, or columns in, the one fused weight); and whoever
calls a member afterwards (the reference path, a test, a second runtime) gets what it got
before.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.weights import fp16_weights
from engine.config import load_settings
from engine.model import memory_footprint
from engine.serving.runner import FastRuntime
from engine.serving.fused import FusedLinear
from engine.serving.lora import lora_groups
from tests.engine.serving.conftest import TinyModel
from tests.engine.serving.test_runner import SEQS, reference_logits, runtime

needs_fbgemm = pytest.mark.skipif(not fp16_weights.available(), reason="this torch build has no fbgemm (not x86)")


def _members(bias: bool = True) -> list[nn.Linear]:
    torch.manual_seed(3)
    return [nn.Linear(32, 48, bias=bias), nn.Linear(32, 16, bias=bias), nn.Linear(32, 16, bias=bias)]


def _storage_bytes(tensors) -> int:
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def test_dense_members_become_views_of_one_weight_with_the_same_outputs() -> None:
    members = _members()
    x = torch.randn(5, 32)
    before = [m(x).detach() for m in members]
    params_before = _storage_bytes(p for m in members for p in m.parameters())
    fused = FusedLinear(members)
    assert fused.kind == "dense" and fused.sizes == [48, 16, 16] and fused.out_features == 80
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.cat(before, dim=1), rtol=1e-6, atol=1e-6)
        for m, b in zip(members, before):
            torch.testing.assert_close(m(x), b, rtol=0, atol=0)
    assert _storage_bytes(p for m in members for p in m.parameters()) == params_before  # nothing copied
    assert all(m.weight.requires_grad for m in members)
    members[1].weight.data.mul_(2)  # a write through a member shows in the fused product
    with torch.no_grad():
        torch.testing.assert_close(fused(x)[:, 48:64], members[1](x), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(members[1](x), before[1])
    again = FusedLinear(members)  # a second runtime over the same model reuses the fused weight
    assert again.kind == "dense" and torch.equal(again(x), fused(x))
    assert _storage_bytes(p for m in members for p in m.parameters()) == params_before


def test_a_member_whose_weight_is_shared_or_hooked_is_called_on_its_own() -> None:
    members = _members(bias=False)
    x = torch.randn(3, 32)
    members[2].register_forward_hook(lambda _m, _i, out: out * 0)
    fused = FusedLinear(members)
    assert fused.kind == "concatenated"
    with torch.no_grad():
        out = fused(x)
    assert torch.equal(out[:, 64:], torch.zeros(3, 16))  # the hook ran
    tied = _members(bias=False)
    tied[1].weight = nn.Parameter(tied[0].weight[8:24])  # overlaps the first member's weight
    assert FusedLinear(tied).kind == "concatenated"


@needs_fbgemm
def test_fp16_members_share_one_pack_and_keep_their_columns() -> None:
    model = nn.ModuleList(_members())
    fp16_weights.convert(model)
    x = torch.randn(7, 32)
    with torch.no_grad():
        before = [m(x) for m in model]
        weights = [m.weight.clone() for m in model]
    packed = fp16_weights.packed_bytes(model)
    fused = FusedLinear(list(model))
    assert fused.kind == "fp16 packed"
    assert fp16_weights.packed_bytes(model) == packed
    assert all("packed" not in vars(m) for m in model)  # the members' own packs are released
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.cat(before, dim=1), rtol=1e-6, atol=1e-6)
        for m, b, w in zip(model, before, weights):
            torch.testing.assert_close(m(x), b, rtol=1e-6, atol=1e-6)
            assert torch.equal(m.weight, w)
    copied = copy.deepcopy(model)  # tests and the benches copy models
    with torch.no_grad():
        torch.testing.assert_close(copied[2](x), before[2], rtol=1e-6, atol=1e-6)
    assert fp16_weights.fuse(list(model)) is model[0].shared_pack[0]  # fusing again reuses the pack
    y = torch.randn(2, 32, requires_grad=True)  # training through a member still differentiates
    model[1](y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_lora_groups_follow_the_products_and_skip_untargeted_members() -> None:
    targets = {"l.q": (64, 64), "l.v": (64, 16), "l.o": (64, 64)}
    products = [[("l.q", 64), ("l.k", 16), ("l.v", 16)], [("l.gate", 96), ("l.up", 96)]]
    groups = {g.key: g for g in lora_groups(targets, products)}
    assert set(groups) == {"l.q+l.k+l.v", "l.o"}  # gate/up carry no LoRA: no group
    qkv = groups["l.q+l.k+l.v"]
    assert (qkv.members, qkv.columns, qkv.out_features) == (("l.q", "l.v"), ((0, 64), (80, 96)), 96)
    assert groups["l.o"].columns == ((0, 64),)


@pytest.mark.parametrize("tiny", ["llama", "qwen2-bias-fp16", "qwen2-bias-nf4"], indirect=True)
def test_the_reference_path_on_the_same_model_is_unchanged_by_a_runtime(tiny: TinyModel) -> None:
    """The fast runtime fuses the loaded model's own modules; the model itself must answer as
    before and hold the same bytes (the engine's memory report reads it)."""
    model = copy.deepcopy(tiny.model)
    ids = torch.tensor([SEQS[0]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    size, held = memory_footprint(model), _storage_bytes(model.parameters())
    s = load_settings(max_batch_size=2, context_tokens=128, max_new_tokens=4, max_resident_adapters=1, max_lora_rank=8)
    FastRuntime(model, s)
    FastRuntime(model, s)  # a second one over the same model fuses nothing twice
    assert (memory_footprint(model), _storage_bytes(model.parameters())) == (size, held)
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tiny", ["llama-gqa", "qwen2-bias-fp16"], indirect=True)
def test_served_modules_that_cover_part_of_a_product_match_peft(tiny: TinyModel) -> None:
    """LORA_TARGET_MODULES naming only some members of a fused product (k_proj left out)."""
    rt, slots = runtime(tiny, lora_target_modules="q_proj,v_proj,down_proj", only=("b",))
    k = rt.cache.allocate()
    out = rt.prefill([(k, slots["b"], SEQS[1], 0)])
    torch.testing.assert_close(out[0], reference_logits(tiny, "b", SEQS[1])[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tiny", ["qwen2-bias-nf4", "llama-gqa-nf4"], indirect=True)
def test_4bit_members_share_one_packed_weight_with_the_same_outputs(tiny: TinyModel) -> None:
    """nf4 q/k/v (with biases on Qwen2) and gate/up: one 4-bit product each, the members'
    packed bytes moved into it rather than copied, every column what the member computes."""
    model = copy.deepcopy(tiny.model)
    layer = model.model.layers[0]
    att, mlp = layer.self_attn, layer.mlp
    x = torch.randn(5, model.config.hidden_size)
    for members in ([att.q_proj, att.k_proj, att.v_proj], [mlp.gate_proj, mlp.up_proj]):
        with torch.inference_mode():
            before = [m(x) for m in members]
            one = torch.cat([m(x[:1]) for m in members], dim=1)  # one row: bitsandbytes' other kernel
        held = _storage_bytes(m.weight.data for m in members)
        fused = FusedLinear(members)
        assert fused.kind == "4-bit packed"
        assert len({m.weight.data.untyped_storage().data_ptr() for m in members}) == 1
        assert _storage_bytes(m.weight.data for m in members) == held
        with torch.inference_mode():
            torch.testing.assert_close(fused(x), torch.cat(before, dim=1), rtol=0, atol=0)
            torch.testing.assert_close(fused(x[:1]), one, rtol=0, atol=0)
            for m, b in zip(members, before):
                torch.testing.assert_close(m(x), b, rtol=0, atol=0)
        again = FusedLinear(members)  # a second runtime over the same model copies nothing
        assert again.kind == "4-bit packed" and _storage_bytes(m.weight.data for m in members) == held


@pytest.mark.parametrize("tiny", ["llama-gqa-nf4"], indirect=True)
def test_4bit_layers_repacked_for_the_cpu_kernel_or_mixed_are_called_one_by_one(tiny: TinyModel) -> None:
    """bitsandbytes repacks 4-bit layers for its AVX-512 CPU kernel (not row after row, so
    not fusable), and members of different settings cannot share a product."""
    model = copy.deepcopy(tiny.model)
    att = model.model.layers[0].self_attn
    att.k_proj.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on such a CPU
    assert FusedLinear([att.q_proj, att.k_proj, att.v_proj]).kind == "concatenated"
    mlp = model.model.layers[1].mlp
    mlp.up_proj.compute_dtype = torch.bfloat16
    assert FusedLinear([mlp.gate_proj, mlp.up_proj]).kind == "concatenated"


@pytest.mark.parametrize("tiny", ["llama-gqa-nf4"], indirect=True)
def test_a_4bit_product_that_disagrees_with_its_members_is_not_used(tiny: TinyModel) -> None:
    from engine.serving import fused_4bit

    members = [getattr(tiny.model.model.layers[0].mlp, n) for n in ("gate_proj", "up_proj")]
    width = sum(m.out_features for m in members)

    def right(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in members], dim=-1)

    def check(call) -> str | None:
        return fused_4bit._disagreement(call, members, torch.device("cpu"), torch.float32)

    assert check(right) is None
    assert "off by" in check(lambda x: right(x).flip(-1))  # columns in the wrong order
    assert "shape" in check(lambda x: right(x)[:, :width - 1])
    assert "RuntimeError" in check(lambda x: torch.mm(x, x))  # a kernel that refuses the layout
