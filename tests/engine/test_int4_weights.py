"""QUANTIZATION=int4 / int4+bf16 (the CPU default where AMX is there): 4-bit decoder weights.

What must hold: the 4-bit form of a Q4_1 weight (groups of 32, `d·q + m`) is that weight
exactly; a converted layer computes `F.linear` over it with bf16 activations (within bf16's
rounding) and, in the fp32 twin (`exact=True`), with fp32 ones (fp32's summation order only);
fused products share one weight; `int4+bf16` takes its bf16 copy above `NARROW_ROWS` rows and
carries the LoRA shrink in extra rows of it. On the real default model (whose decoder is
Q4_1) the fast path against the fp32 oracle (transformers + peft over the converted fp32
weights): the twin within fp32 noise and token for token, the served path within bf16's
precision, LoRA rows included.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.serving.fused import FusedLinear
from engine.weights import cpu_int4
from tests.engine.test_bf16_weights import fast_logits, peft_model

pytestmark = pytest.mark.skipif(not cpu_int4.available(), reason="this torch has no CPU int4 kernel")


def q4_1(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    """A weight as a Q4_1 GGUF stores it: per group of 32, fp16 `d` and `m`, `w = d·q + m`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_f, in_f // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # Q4_1 puts the group's minimum at 0 and its maximum at 15
    d = (torch.rand(out_f, in_f // 32, 1, generator=g) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(out_f, in_f // 32, 1, generator=g) * 0.15).half().float()
    return (d * q + m).reshape(out_f, in_f)


def test_a_q4_1_weight_is_kept_exactly_and_multiplied_in_bf16() -> None:
    w = q4_1(128, 96, 0)
    bias = torch.randn(128)
    layer = nn.Linear(96, 128)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(bias)
    model = nn.ModuleDict({"layers": nn.ModuleList([layer])})  # a decoder layer's path: `.layers.`
    twin = copy.deepcopy(model)
    report = cpu_int4.convert(model)
    cpu_int4.convert(twin, exact=True)
    conv = model["layers"][0]
    assert type(conv) is cpu_int4.Int4Linear and isinstance(conv, nn.Linear)
    assert (report.modules, report.kind, report.max_rel_error) == (1, "int4", 0.0)  # the levels are the weight's
    assert report.packed_bytes == cpu_int4.stored_bytes(model) == 128 * 96 // 2 + 96 // 32 * 128 * 2 * 2
    assert [n for n, _ in model.named_parameters()] == ["layers.0.bias"]  # the fp32 weight is gone
    torch.testing.assert_close(twin["layers"][0].weight, w, rtol=0, atol=0)  # read back on demand: exact
    x = torch.randn(5, 7, 96)
    with torch.inference_mode():
        out, exact = conv(x), twin["layers"][0](x)
        one = conv(x[:1, :1])
    assert out.dtype == torch.float32 and out.shape == (5, 7, 128) and out.is_contiguous()
    torch.testing.assert_close(exact, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)  # the fp32 twin
    served = F.linear(x.bfloat16().float(), conv.weight) + bias  # bf16 activations, bf16 scales and zeros
    torch.testing.assert_close(out, served, rtol=2 ** -7, atol=1e-2)  # the kernel rounds its result to bf16
    torch.testing.assert_close(one[0, 0], out[0, 0], rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(out, F.linear(x, w, bias), rtol=3e-2, atol=3e-2)


def test_layers_outside_the_decoder_or_of_other_shapes_stay_as_they_were() -> None:
    model = nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(96, 100), nn.Linear(90, 64)]), "head": nn.Linear(96, 128)})
    assert cpu_int4.convert(model).modules == 0
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def test_fused_members_share_one_weight_and_keep_their_outputs() -> None:
    members = [nn.Linear(64, 192), nn.Linear(64, 64, bias=False), nn.Linear(64, 64)]
    with torch.no_grad():
        for i, m in enumerate(members):
            m.weight.copy_(q4_1(m.out_features, 64, i))
    model = nn.ModuleDict({"layers": nn.ModuleList(members)})
    cpu_int4.convert(model)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        before = [m(x) for m in members]
    stored = cpu_int4.stored_bytes(model)
    fused = FusedLinear(members)
    assert fused.kind == "int4" and cpu_int4.stored_bytes(model) == stored  # no byte added
    assert len({id(m.q4) for m in members}) == 1
    with torch.inference_mode():
        out = fused(x)
        after = [m(x) for m in members]
    torch.testing.assert_close(out, torch.cat(before, dim=1), rtol=0, atol=0)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    again = FusedLinear(members)  # a second runtime over the same model: the same weight
    assert again.kind == "int4" and cpu_int4.stored_bytes(model) == stored
    with torch.inference_mode():
        torch.testing.assert_close(again(x), out, rtol=0, atol=0)


def test_int4_plus_bf16_takes_the_copy_for_wide_batches_and_carries_the_lora_rows() -> None:
    members = [nn.Linear(64, 128), nn.Linear(64, 64)]
    with torch.no_grad():
        for i, m in enumerate(members):
            m.weight.copy_(q4_1(m.out_features, 64, 10 + i))
    w = torch.cat([m.weight.detach() for m in members])
    bias = torch.cat([m.bias.detach() for m in members])
    only4 = copy.deepcopy(members)
    cpu_int4.convert(nn.ModuleDict({"layers": nn.ModuleList(members)}), wide_copy=True)
    cpu_int4.convert(nn.ModuleDict({"layers": nn.ModuleList(only4)}))
    assert FusedLinear(only4).make_room(8) is None  # without a bf16 copy the shrink stays an fp32 product
    product = FusedLinear(members)
    x = torch.randn(40, 64)
    narrow, wide = cpu_int4.NARROW_ROWS, cpu_int4.NARROW_ROWS + 1
    with torch.inference_mode():
        plain, plain4 = product(x), product(x[:narrow])
        room = product.make_room(12)
        assert room is not None and room.shape == (12, 64) and room.dtype == torch.bfloat16 and not room.any()
        room.copy_(torch.randn(12, 64))
        torch.testing.assert_close(product(x), plain, rtol=0, atol=0)
        torch.testing.assert_close(product(x[:narrow]), plain4, rtol=0, atol=0)
        four = torch.cat([m(x[:narrow]) for m in only4], dim=1)
        sixteen = F.linear(x[:wide].bfloat16(), w.bfloat16()).float() + bias
        got = [product.with_rows(x[:rows], 7, 3) for rows in (narrow, wide)]
    torch.testing.assert_close(plain4, four, rtol=0, atol=0)  # up to NARROW_ROWS: the 4-bit kernel
    torch.testing.assert_close(plain[:wide], sixteen, rtol=2 ** -7, atol=2e-3)  # above: the bf16 copy
    for (out, extra), rows, expected in zip(got, (narrow, wide), (plain4, plain[:wide])):
        torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)
        assert extra.shape == (rows, 4)
        if rows <= narrow:  # beside the 4-bit kernel: fp32 over the rows' bf16 values
            torch.testing.assert_close(extra, x[:rows] @ room[3:7].float().T, rtol=1e-5, atol=1e-5)
        else:  # from the bf16 copy's own kernel, in bf16
            torch.testing.assert_close(extra, x[:rows].bfloat16().float() @ room[3:7].float().T, rtol=1e-2, atol=1e-3)


@pytest.mark.model
def test_the_fast_path_serves_the_real_model_in_int4_as_the_fp32_oracle_does() -> None:
    """Teacher-forced over three prompts in one mixed batch with two adapters, along the fp32
    oracle's greedy tokens (transformers + peft over the converted fp32 weights, which are the
    GGUF's Q4_1 values): the fp32 twin equals it to fp32 noise, token for token; the served
    int4 and int4+bf16 paths stay within bf16's precision of it, in logits and in the log-prob
    of every token."""
    from engine import model as engine_model
    from engine.config import load_settings

    s = load_settings(quantization="none", max_batch_size=4, context_tokens=512, max_new_tokens=64,
                      max_resident_adapters=2)
    fp32 = engine_model.load(s).model
    tok = engine_model.load_tokenizer(engine_model.prepare(s))
    texts = ["What should I know before signing a contract?", "How do I lower a fever at home?",
             "Is it wise to put all my savings into one stock?"]
    seqs = [tok(t)["input_ids"] for t in texts]
    domains = [None, "legal", "medical"]
    steps = 8
    refs, conts = [], []
    with torch.inference_mode():
        for d, q in zip(domains, seqs):
            m = peft_model(fp32, d)
            seq = list(q)
            for _ in range(steps):
                seq.append(int(m(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            refs.append(m(input_ids=torch.tensor([seq])).logits[0, len(q) - 1:].float())
            conts.append(seq[len(q):])

    def served(**convert) -> list[torch.Tensor]:
        from engine.weights import bf16_weights

        model = copy.deepcopy(fp32)
        assert cpu_int4.convert(model, **convert).modules == 30 * 7
        if not convert.get("exact"):
            bf16_weights.convert(model)  # the head, as the loader does
        return fast_logits(model, s, domains, seqs, conts)

    for kind, convert, logit_tol, logprob_tol in [
        ("fp32 twin", {"exact": True}, 1e-3, 1e-4),
        # bf16-level closeness, as test_bf16_weights (measured here: see docs/engine.md)
        ("int4", {}, 0.3, 0.25),
        ("int4+bf16", {"wide_copy": True}, 0.3, 0.25),
    ]:
        flips = 0
        for d, got, ref, cont in zip(domains, served(**convert), refs, conts):
            spread = float(ref.std())
            err = float((got - ref).abs().max())
            targets = torch.tensor(cont)
            lp = got[:-1].log_softmax(-1).gather(1, targets[:, None]) - ref[:-1].log_softmax(-1).gather(1, targets[:, None])
            assert err < logit_tol * spread, (kind, d, err, spread)
            assert float(lp.abs().max()) < logprob_tol, (kind, d, float(lp.abs().max()))
            flips += int((got.argmax(-1) != ref.argmax(-1)).sum())
        positions = len(seqs) * (steps + 1)
        assert flips == 0 if kind == "fp32 twin" else flips <= positions // 10, (kind, flips, positions)
