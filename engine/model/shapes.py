"""The shapes of a model's linear layers: what adapter validation checks a LoRA's matrices against."""
from __future__ import annotations

import functools
from typing import Any


def linear_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear layer by module path: what validation checks against."""
    shapes = {}
    for name, module in model.named_modules():
        inf, outf = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if isinstance(inf, int) and isinstance(outf, int):
            shapes[name] = (inf, outf)
    return shapes


@functools.lru_cache(maxsize=4)
def config_linear_shapes(load_path: str) -> dict[str, tuple[int, int]]:
    """The same, from the model's config on the meta device, without loading a single weight
    (the vLLM backend, whose replicas hold the weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(load_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return linear_shapes(model)
