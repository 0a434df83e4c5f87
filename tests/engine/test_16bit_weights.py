"""What QUANTIZATION=fp16 and bf16 share: a weight tied to the embedding stays for it, and
training through converted layers gets the plain fp32 model's gradients. Each kind's own
numbers (fbgemm's fp16 GEMM, oneDNN's bf16 product) are in test_fp16_weights.py and
test_bf16_weights.py."""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.weights import bf16_weights, fp16_weights


@dataclass(frozen=True)
class Kind:
    module: Any  # engine.weights.fp16_weights or .bf16_weights
    rounded: Callable[[torch.Tensor], torch.Tensor]  # a weight as the kind stores it, back in fp32
    served: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # what a converted layer computes, no bias
    tol: dict[str, float]  # of the served product against `served`
    grad_tol: dict[str, float]  # of the loss and the LoRA gradient against the plain model's


FP16 = Kind(fp16_weights, lambda w: w.half().float(), lambda x, w: F.linear(x, w.half().float()),
            dict(rtol=1e-5, atol=1e-5), dict(rtol=1e-4, atol=1e-5))
# bf16 also rounds the layer's input and output (fp16 keeps fp32 activations)
BF16 = Kind(bf16_weights, lambda w: w.bfloat16().float(), lambda x, w: F.linear(x.bfloat16(), w.bfloat16()).float(),
            dict(rtol=2 ** -7, atol=1e-3), dict(rtol=1e-6, atol=1e-6))
KINDS = [
    pytest.param(FP16, id="fp16", marks=pytest.mark.skipif(not fp16_weights.available(),
                                                           reason="this torch build has no fbgemm (not x86)")),
    pytest.param(BF16, id="bf16"),
]


def pair(seed: int, kind: Kind) -> tuple[nn.Module, nn.Module]:
    """The same two-layer model twice, its weights already exact in `kind`, the second one converted."""
    torch.manual_seed(seed)
    plain = nn.Sequential(OrderedDict(first=nn.Linear(12, 20), act=nn.Tanh(), second=nn.Linear(20, 6)))
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(kind.rounded(p))
    converted = copy.deepcopy(plain)
    assert kind.module.convert(converted).max_rel_error == 0
    return plain, converted


@pytest.mark.parametrize("kind", KINDS)
def test_a_weight_tied_to_the_embedding_is_kept_for_it(kind: Kind) -> None:
    torch.manual_seed(1)
    embed, head = nn.Embedding(40, 16), nn.Linear(16, 40, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(OrderedDict(embed=embed, head=head))
    report = kind.module.convert(model)
    assert (report.modules, report.freed_bytes) == (1, 0)
    assert model.head.weight is model.embed.weight and model.embed.weight.dtype == torch.float32
    ids = torch.tensor([3, 17, 39])
    with torch.inference_mode():
        logits = model(ids)
    torch.testing.assert_close(logits, kind.served(embed.weight[ids], embed.weight), **kind.tol)


@pytest.mark.parametrize("kind", KINDS)
def test_training_through_converted_layers_gets_the_plain_models_gradients(kind: Kind) -> None:
    from peft import LoraConfig, get_peft_model

    plain, converted = pair(2, kind)
    config = dict(r=2, lora_alpha=4, target_modules=["first"], init_lora_weights=False, lora_dropout=0.0)
    grads = []
    for model in (plain, converted):
        torch.manual_seed(3)  # the same LoRA initialisation for both
        peft_model = get_peft_model(model, LoraConfig(**config))
        lora_a = peft_model.base_model.model.first.lora_A["default"].weight
        assert lora_a.dtype == torch.float32 and lora_a.requires_grad  # peft read the fp32 weight's dtype
        x = torch.randn(4, 12, generator=torch.Generator().manual_seed(4))
        loss = peft_model(x).square().sum()
        loss.backward()  # reaches `first`'s LoRA only through `second`, a converted layer
        assert lora_a.grad is not None and lora_a.grad.abs().sum() > 0
        grads.append((loss.detach(), lora_a.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], **kind.grad_tol)
    torch.testing.assert_close(grads[1][1], grads[0][1], **kind.grad_tol)
