"""QUANTIZATION=fp16 (the CPU default where AMX is missing): fbgemm's packed fp16 linear layers.

What must hold: a converted layer multiplies by its weight rounded to fp16 and nothing else
(no activation quantization); peft wraps the converted layers and keeps its LoRA weights in
fp32. The tied head and training through converted layers: test_16bit_weights.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.weights import fp16_weights
from tests.engine.test_16bit_weights import FP16, pair

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


def test_peft_inference_on_converted_layers_equals_the_plain_model() -> None:
    from peft import LoraConfig, get_peft_model

    plain, converted = pair(5, FP16)
    outs = []
    for model in (plain, converted):
        torch.manual_seed(6)
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["first", "second"], init_lora_weights=False))
        with torch.inference_mode():
            outs.append(peft_model(torch.ones(3, 12)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
