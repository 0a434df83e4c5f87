"""QUANTIZATION=bf16 (the CPU default where AMX is there): bf16 weights and linear products.

What must hold: a converted layer computes `F.linear` in bf16 with an fp32 result, for any
leading shape and any row count (the one-row `mv` and the many-row `mm` are the same numbers);
fused products share one weight; and on the real default
model the fast path serves what transformers computes over the same bf16 layers, within bf16's
precision (bf16 rounds each linear layer's input, so the last bits of the fp32 parts, which
differ between the two paths, can flip a near-tie; that is why this is not token equality).
The tied head and training through converted layers: test_16bit_weights.py.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from engine.weights import bf16_weights
from engine.serving.fused import FusedLinear


def test_a_converted_linear_computes_in_bf16_with_an_fp32_result() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = nn.Sequential(layer)
    report = bf16_weights.convert(model)
    assert type(model[0]) is bf16_weights.Bf16Linear and isinstance(model[0], nn.Linear)
    assert (report.modules, report.packed_bytes, report.freed_bytes, report.kind) == (1, 64 * 48 * 2, 64 * 48 * 4, "bf16")
    assert 0 < report.max_rel_error <= 2 ** -8
    assert [n for n, _ in model.named_parameters()] == ["0.bias"]  # the fp32 weight is gone
    torch.testing.assert_close(model[0].weight, w.bfloat16().float(), rtol=0, atol=0)  # read back on demand
    x = torch.randn(5, 7, 64)  # any leading shape, as nn.Linear takes
    with torch.inference_mode():
        out = model(x)
        one = model(x[:1, :1])  # a single row: torch.mv
    assert out.dtype == torch.float32 and out.shape == (5, 7, 48) and out.is_contiguous()
    expected = F.linear(x.bfloat16(), w.bfloat16()).float() + b
    torch.testing.assert_close(out, expected, rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(one[0, 0], out[0, 0], rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=3e-2, atol=3e-2)
    assert bf16_weights.stored_bytes(model) == 64 * 48 * 2


def test_every_row_count_gets_the_same_bf16_product() -> None:
    """One row (`mv`), a decode step's few rows (`W @ xᵀ`) and a prefill chunk's many (`x @ Wᵀ`,
    from WIDE_ROWS on) are three kernels for one product: within bf16 rounding of each other
    and of F.linear over the bf16 values, and contiguous fp32 either way."""
    torch.manual_seed(4)
    layer = nn.Linear(96, 80)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = nn.Sequential(layer)
    bf16_weights.convert(model)
    x = torch.randn(300, 96)
    with torch.inference_mode():
        expected = F.linear(x.bfloat16().float(), w.bfloat16().float()) + b  # exact fp32 over the bf16 values
        for rows in (1, 5, bf16_weights.WIDE_ROWS - 1, bf16_weights.WIDE_ROWS, 300):
            out = model(x[:rows])
            assert out.dtype == torch.float32 and out.shape == (rows, 80) and out.is_contiguous()
            torch.testing.assert_close(out, expected[:rows], rtol=2 ** -7, atol=2e-3)
    wide = nn.Linear(96, bf16_weights.BIG_TRANSPOSE // 40 + 1)  # past BIG_TRANSPOSE at 40 rows: in blocks
    ww = wide.weight.detach().clone()
    model = nn.Sequential(wide)
    bf16_weights.convert(model)
    with torch.inference_mode():
        got = model(x[:40])
        assert got.is_contiguous() and got.shape == (40, ww.shape[0])
        # the same numbers as one product over the whole weight (blocks of it, transposed as they come)
        torch.testing.assert_close(got, torch.mm(ww.bfloat16(), x[:40].bfloat16().t()).t().float() + wide.bias,
                                   rtol=0, atol=0)


def test_fused_members_share_one_weight_and_keep_their_outputs() -> None:
    torch.manual_seed(5)
    model = nn.ModuleList([nn.Linear(32, 24, bias=True), nn.Linear(32, 8, bias=False), nn.Linear(32, 8, bias=True)])
    bf16_weights.convert(model)
    x = torch.randn(6, 32)
    with torch.inference_mode():
        before = [m(x) for m in model]
    stored = bf16_weights.stored_bytes(model)
    fused = FusedLinear(list(model))
    assert fused.kind == "bf16" and bf16_weights.stored_bytes(model) == stored  # no byte added
    assert len({m.w16.untyped_storage().data_ptr() for m in model}) == 1
    with torch.inference_mode():
        out = fused(x)
        after = [m(x) for m in model]
    torch.testing.assert_close(out, torch.cat(before, dim=1), rtol=0, atol=0)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    again = FusedLinear(list(model))  # a second runtime over the same model: the same weight
    assert bf16_weights.stored_bytes(model) == stored
    with torch.inference_mode():
        torch.testing.assert_close(again(x), out, rtol=0, atol=0)


def test_the_fast_path_serves_the_real_model_in_bf16_as_transformers_does() -> None:
    """Teacher-forced over three prompts in one mixed batch with two adapters: the fast path's
    logits against transformers + peft over the same bf16 layers, and bf16 against fp32."""
    from engine import model as engine_model
    from engine.config import load_settings

    s = load_settings(quantization="bf16", max_batch_size=4, context_tokens=512, max_new_tokens=64,
                       max_resident_adapters=2)
    loaded = engine_model.load(s)
    fp32 = engine_model.load(s.model_copy(update={"quantization": "none"})).model
    tok = loaded.tokenizer
    texts = ["What should I know before signing a contract?", "How do I lower a fever at home?",
             "Is it wise to put all my savings into one stock?"]
    seqs = [tok(t)["input_ids"] for t in texts]
    domains = [None, "legal", "medical"]
    steps = 8  # teacher-forced decode steps after the prefill, along the bf16 reference's greedy tokens
    refs, refs32, conts = [], [], []
    with torch.inference_mode():
        for d, q in zip(domains, seqs):
            m, m32 = peft_model(loaded.model, d), peft_model(fp32, d)
            seq = list(q)
            for _ in range(steps):
                seq.append(int(m(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            refs.append(m(input_ids=torch.tensor([seq])).logits[0, len(q) - 1:].float())
            refs32.append(m32(input_ids=torch.tensor([seq])).logits[0, len(q) - 1:].float())
            conts.append(seq[len(q):])
    fast_rows = fast_logits(loaded.model, s, domains, seqs, conts)
    flips = flips32 = 0
    for d, got, ref, ref32 in zip(domains, fast_rows, refs, refs32):
        spread = float(ref32.std())
        # bf16-level closeness (measured: at most 0.06 of the logits' spread between the paths,
        # 0.11 between bf16 and fp32), not fp32's 1e-5
        assert float((got - ref).abs().max()) < 0.3 * spread, (d, float((got - ref).abs().max()), spread)
        assert float((ref - ref32).abs().max()) < 0.6 * spread, (d, float((ref - ref32).abs().max()), spread)
        flips += int((got.argmax(-1) != ref.argmax(-1)).sum())
        flips32 += int((ref.argmax(-1) != ref32.argmax(-1)).sum())
    positions = len(seqs) * (steps + 1)
    assert flips <= positions // 10 and flips32 <= positions // 10, (flips, flips32, positions)


def peft_model(model: nn.Module, domain: str | None) -> nn.Module:
    """A copy of `model`, with the shipped v1 of `domain` on it (None: the base model)."""
    from peft import PeftModel

    from tests.engine.test_fast_path import ROOT as REPO

    m = copy.deepcopy(model)
    return m if domain is None else PeftModel.from_pretrained(m, str(REPO / "adapters" / domain / "v1")).eval()


def fast_logits(model: nn.Module, s, domains: list[str | None], seqs: list[list[int]],
                conts: list[list[int]]) -> list[torch.Tensor]:
    """The fast path's logits for each prompt in `seqs` (one mixed batch, adapters `domains`):
    the prefill's last position, then one decode step per token of `conts` (teacher-forced)."""
    from engine.serving.runner import FastRuntime
    from tests.engine.serving.test_runner import adapter_modules
    from tests.engine.test_fast_path import ROOT as REPO

    rt = FastRuntime(model, s)
    slot_of: dict[str | None, int] = {None: 0}
    for d in domains:
        if d is not None and d not in slot_of:
            folder = REPO / "adapters" / d / "v1"
            slot_of[d] = rt.lora.load(d, folder, folder / "adapter_model.safetensors", adapter_modules(folder), d)
    with torch.inference_mode():
        kv = [rt.cache.allocate() for _ in seqs]
        fast = [rt.prefill([(k, slot_of[d], q, 0) for k, d, q in zip(kv, domains, seqs)])]
        for k, d, q in zip(kv, domains, seqs):
            rt.lora_idx[k], rt.pos[k], rt.active[k] = slot_of[d], len(q), True
        for step in range(len(conts[0])):
            for k, c in zip(kv, conts):
                rt.tok[k] = c[step]
            logits, _ = rt.decode(rt.cache.high(), max(len(q) for q in seqs) + step + 1, set(slot_of.values()))
            fast.append(logits[kv])
            for k in kv:
                rt.pos[k] += 1
    return [torch.stack([f[i] for f in fast]) for i in range(len(seqs))]


def test_room_below_a_bf16_product_gives_extra_columns_from_the_same_kernel() -> None:
    """`make_room` (where the LoRA stacks keep their A): the product's columns and the members
    stay bit for bit what they were, `with_rows` adds x times the first n extra rows (in bf16,
    like the product) without the bias, and the members' weights move into the wider tensor
    rather than being kept twice."""
    torch.manual_seed(6)
    model = nn.ModuleList([nn.Linear(32, 24, bias=True), nn.Linear(32, 8, bias=False)])
    lone = nn.ModuleList([nn.Linear(32, 16, bias=True)])
    bf16_weights.convert(model)
    bf16_weights.convert(lone)
    for members in (list(model), list(lone)):
        product = FusedLinear(members)
        width = product.out_features
        for rows in (1, 5, 130):  # mv, W @ x.T and x @ W.T (bf16_weights.matmul's three forms)
            x = torch.randn(rows, 32)
            with torch.inference_mode():
                plain = product(x)
                room = product.make_room(12)
                assert room is not None and room.shape == (12, 32) and room.dtype == torch.bfloat16
                assert not room.any()  # zeros until a LoRA version is written there
                room.copy_(torch.randn(12, 32))
                assert all(m.w16.untyped_storage().data_ptr() == room.untyped_storage().data_ptr() for m in members)
                torch.testing.assert_close(product(x), plain, rtol=0, atol=0)
                for m, (lo, hi) in zip(members, [(0, 24), (24, 32)] if len(members) == 2 else [(0, 16)]):
                    torch.testing.assert_close(m(x), plain[:, lo:hi], rtol=0, atol=0)
                out, extra = product.with_rows(x, 7, 0)
                out2, extra2 = product.with_rows(x, 7, 3)  # the first 3 extra rows skipped
            assert out.shape == out2.shape == (rows, width)
            assert extra.shape == (rows, 7) and extra2.shape == (rows, 4)
            torch.testing.assert_close(out, plain, rtol=0, atol=2e-6)
            torch.testing.assert_close(out2, out, rtol=0, atol=0)
            expected = x.bfloat16().float() @ room[:7].float().T  # no bias on the extra columns
            torch.testing.assert_close(extra, expected, rtol=1e-2, atol=1e-3)
            torch.testing.assert_close(extra2, extra[:, 3:], rtol=0, atol=0)


def test_only_one_bf16_weight_makes_room() -> None:
    """fp32 layers (their LoRA stays a separate fp32 product) and a hooked bf16 layer make none."""
    plain = FusedLinear([nn.Linear(32, 8), nn.Linear(32, 8)])
    assert plain.make_room(4) is None
    hooked = nn.ModuleList([nn.Linear(32, 8)])
    bf16_weights.convert(hooked)
    hooked[0].register_forward_hook(lambda *_: None)
    assert FusedLinear(list(hooked)).make_room(4) is None
