"""Small, valid adapter versions of the default model, written in the documented layout.

`write_adapter` makes `adapters/<domain>/vN/` with peft's two files (a rank-`r` LoRA on the
q_proj and v_proj of the first two layers, random A and zero B) and our meta.json, then
(optionally) points `current` at it through AdapterStore, as promotion does. Tiny and fast,
so tests of the adapter life cycle need neither the shipped adapters nor training.
"""
from __future__ import annotations

import json
from pathlib import Path

from engine.adapters.store import AdapterStore

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"


def _shapes() -> dict[str, tuple[int, int]]:
    config = json.loads((MODEL_DIR / "config.json").read_text())
    hidden, head_dim = config["hidden_size"], config.get("head_dim") or config["hidden_size"] // config[
        "num_attention_heads"]
    return {
        f"model.layers.{i}.self_attn.{name}": (hidden, out)
        for i in range(2)
        for name, out in (("q_proj", config["num_attention_heads"] * head_dim),
                          ("v_proj", config["num_key_value_heads"] * head_dim))
    }


def write_adapter(root: Path, domain: str, version: str = "v1", *, r: int = 4, base_model: str = MODEL_ID,
                  current: bool = True, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    path = root / domain / version
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (inf, outf) in _shapes().items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, inf, generator=g) * 0.01
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(outf, r)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "task_type": "CAUSAL_LM",
        "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": base_model,
    }))
    (path / "meta.json").write_text(json.dumps({
        "name": domain, "version": version, "base_model": base_model, "status": "promoted",
        "metrics": {"eval_loss": 1.5}, "training": {"r": r},
    }))
    if current:
        AdapterStore(root).set_current(domain, version)
    return path
