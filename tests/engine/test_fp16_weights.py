"""QUANTIZATION=fp16 (the CPU default): fbgemm's packed fp16 linear layers.

What must hold: a converted layer multiplies by its weight rounded to fp16 and nothing else
(no activation quantization); a weight shared with another module stays for that module;
training through converted layers gets the gradients of the same model in plain fp32; peft
wraps the converted layers and keeps its LoRA weights in fp32.
"""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import fp16_weights

pytestmark = pytest.mark.skipif(not fp16_weights.available(), reason="this torch build has no fbgemm (not x86)")


def test_a_converted_linear_multiplies_by_its_fp16_rounded_weight() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = nn.Sequential(layer)
    report = fp16_weights.convert(model)
    assert type(model[0]) is fp16_weights.Fp16Linear and isinstance(model[0], nn.Linear)
    assert (report.modules, report.packed_bytes, report.freed_bytes) == (1, 64 * 48 * 2, 64 * 48 * 4)
    assert 0 < report.max_rel_error <= 2 ** -11
    assert [n for n, _ in model.named_parameters()] == ["0.bias"]  # the fp32 weight is gone
    torch.testing.assert_close(model[0].weight, w.half().float(), rtol=0, atol=0)  # read back on demand
    x = torch.randn(5, 7, 64)  # any leading shape, as nn.Linear takes
    with torch.inference_mode():
        out = model(x)
    torch.testing.assert_close(out, F.linear(x, w.half().float(), b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-2, atol=1e-2)
    # each row alone gives its row of the batch: no per-batch activation scale
    with torch.inference_mode():
        alone = torch.stack([model(x[i]) for i in range(5)])
    torch.testing.assert_close(alone, out, rtol=1e-5, atol=1e-5)
    assert fp16_weights.packed_bytes(model) == 64 * 48 * 2


def test_a_weight_tied_to_the_embedding_is_kept_for_it() -> None:
    torch.manual_seed(1)
    embed, head = nn.Embedding(40, 16), nn.Linear(16, 40, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(OrderedDict(embed=embed, head=head))
    report = fp16_weights.convert(model)
    assert (report.modules, report.freed_bytes) == (1, 0)
    assert model.head.weight is model.embed.weight and model.embed.weight.dtype == torch.float32
    ids = torch.tensor([3, 17, 39])
    with torch.inference_mode():
        logits = model(ids)
    torch.testing.assert_close(logits, F.linear(embed.weight[ids], embed.weight.half().float()), rtol=1e-5, atol=1e-5)


def _pair(seed: int) -> tuple[nn.Module, nn.Module]:
    """The same two-layer model twice, its weights already fp16-exact, the second one converted."""
    torch.manual_seed(seed)
    plain = nn.Sequential(OrderedDict(first=nn.Linear(12, 20), act=nn.Tanh(), second=nn.Linear(20, 6)))
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(p.half().float())
    import copy

    converted = copy.deepcopy(plain)
    assert fp16_weights.convert(converted).max_rel_error == 0
    return plain, converted


def test_training_through_converted_layers_gets_the_plain_models_gradients() -> None:
    from peft import LoraConfig, get_peft_model

    plain, converted = _pair(2)
    config = dict(r=2, lora_alpha=4, target_modules=["first"], init_lora_weights=False, lora_dropout=0.0)
    grads = []
    for model in (plain, converted):
        torch.manual_seed(3)  # the same LoRA initialisation for both
        peft_model = get_peft_model(model, LoraConfig(**config))
        lora_a = peft_model.base_model.model.first.lora_A["default"].weight
        assert lora_a.dtype == torch.float32 and lora_a.requires_grad
        x = torch.randn(4, 12)
        torch.manual_seed(4)
        loss = peft_model(x).square().sum()
        loss.backward()  # reaches `first`'s LoRA only through `second`, a converted layer
        assert lora_a.grad is not None and lora_a.grad.abs().sum() > 0
        grads.append((loss.detach(), lora_a.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-5)


def test_peft_inference_on_converted_layers_equals_the_plain_model() -> None:
    from peft import LoraConfig, get_peft_model

    plain, converted = _pair(5)
    outs = []
    for model in (plain, converted):
        torch.manual_seed(6)
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["first", "second"], init_lora_weights=False))
        with torch.inference_mode():
            outs.append(peft_model(torch.ones(3, 12)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
