"""Tiny random models of the supported architectures, with random peft LoRA adapters on disk.

The reference is transformers + peft themselves: a full forward of the peft model with one
adapter active, no cache. The fast path must give the same logits, row by row, whatever the
other rows of its batch use.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

ARCHS = {
    # name: (config class path, extra config)
    "llama": ("transformers.LlamaConfig", {}),
    "llama-gqa": ("transformers.LlamaConfig", {"num_key_value_heads": 1}),
    "qwen2-bias": ("transformers.Qwen2Config", {"num_key_value_heads": 2, "use_sliding_window": False}),
    "mistral": ("transformers.MistralConfig", {"num_key_value_heads": 2, "sliding_window": None}),
    # QUANTIZATION=fp16 (the CPU default): the same models with fbgemm's packed fp16 linears
    "llama-gqa-fp16": ("transformers.LlamaConfig", {"num_key_value_heads": 1}),
    "qwen2-bias-fp16": ("transformers.Qwen2Config", {"num_key_value_heads": 2, "use_sliding_window": False}),
    # QUANTIZATION=bf16 (the default on a CPU with AMX): bf16 weights and linear products
    "llama-gqa-bf16": ("transformers.LlamaConfig", {"num_key_value_heads": 1}),
    "qwen2-bias-bf16": ("transformers.Qwen2Config", {"num_key_value_heads": 2, "use_sliding_window": False}),
    # QUANTIZATION=nf4 (the CUDA default) in bitsandbytes' row-major layout, the one its CUDA
    # kernels read: q/k/v and gate/up as one 4-bit product each (`engine.serving.fused_4bit`)
    "llama-gqa-nf4": ("transformers.LlamaConfig", {"num_key_value_heads": 1}),
    "qwen2-bias-nf4": ("transformers.Qwen2Config", {"num_key_value_heads": 2, "use_sliding_window": False}),
}


@dataclass
class TinyModel:
    name: str
    model: Any  # the base transformers model (unwrapped)
    adapters: dict[str, Path]  # adapter name -> peft folder
    vocab: int


#: How close the fast path's logits are to peft's. fp32 and fp16 products: 1e-4 (the same
#: dot products, summed in another order). bf16 products: the LoRA shrink comes out of the
#: bf16 product (A rides below its weight, `engine.serving.lora`), so it multiplies the bf16
#: copy of the product's input by A rounded to bf16, where peft multiplies in fp32: measured
#: at most 0.0044 apart on these models, whose adapters move logits by 0.15 on average and
#: up to 0.77; 1e-2 keeps 15x below the mean move, so a missing or wrong adapter still fails.
EXACT = {"atol": 1e-4, "rtol": 1e-4}
BF16_SHRINK = {"atol": 1e-2, "rtol": 1e-4}


def close_to_peft(tiny: "TinyModel", adapter: str | None) -> dict[str, float]:
    """`assert_close` tolerances for a row of `tiny` with `adapter` (None: the base model)."""
    return BF16_SHRINK if adapter is not None and tiny.name.endswith("-bf16") else EXACT


def _config(name: str) -> Any:
    import importlib

    path, extra = ARCHS[name]
    module, cls = path.rsplit(".", 1)
    config_cls = getattr(importlib.import_module(module), cls)
    return config_cls(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, tie_word_embeddings=False, **({"num_key_value_heads": 4} | extra),
    )


def _save_adapter(model: Any, folder: Path, seed: int, r: int, targets: Any) -> Path:
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, lora_dropout=0.0))
    peft_model.save_pretrained(str(folder))
    return folder


def build_tiny(name: str, tmp: Path) -> TinyModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(name), dtype=torch.float32).eval()
    adapters = {
        "a": _save_adapter(model, tmp / f"{name}-a", 1, 4, "all-linear"),
        "b": _save_adapter(model, tmp / f"{name}-b", 2, 8, ["q_proj", "v_proj", "down_proj"]),
    }
    if name.endswith("-fp16"):
        from engine.weights import fp16_weights

        assert fp16_weights.convert(model).modules == 2 * 7 + 1  # every projection and the untied head
    if name.endswith("-bf16"):
        from engine.weights import bf16_weights

        assert bf16_weights.convert(model).modules == 2 * 7 + 1
    if name.endswith("-nf4"):
        model = _nf4(model, tmp / f"{name}-base")
    return TinyModel(name, model, adapters, model.config.vocab_size)


def _nf4(model: Any, folder: Path) -> Any:
    """`model` saved and loaded again in nf4 (double quantization, as `QUANTIZATION=nf4`), its
    4-bit layers kept in bitsandbytes' row-major layout: on a CPU with AVX512-BF16 bitsandbytes
    would repack them for its CPU kernel on their first call; a GPU reads this layout."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model.save_pretrained(str(folder))
    quantized = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True)).eval()
    layers = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return quantized


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny(request.param, tmp_path_factory.mktemp("tiny"))
