"""engine.adapters.validate: an adapter's files checked against the base model, without the model.

Each case builds a tiny adapter folder with safetensors against a small table of linear
layer shapes (module path -> (in_features, out_features)), then breaks one thing.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file

from engine.adapters.store import CONFIG_FILE, META_FILE, WEIGHTS_FILE, AdapterStore
from engine.adapters.validate import validate
from engine.errors import AdapterIncompatible, AdapterInvalid

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
RANK = 4
SHAPES = {
    "model.layers.0.self_attn.q_proj": (16, 16),
    "model.layers.0.self_attn.v_proj": (16, 8),
    "model.layers.0.mlp.down_proj": (32, 16),
    "model.layers.1.self_attn.q_proj": (16, 16),
}
TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj"]


def key(module: str, part: str) -> str:
    return f"base_model.model.{module}.lora_{part}.weight"


def good_tensors(r: int = RANK) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for module in TARGETS:
        inf, outf = SHAPES[module]
        out[key(module, "A")] = torch.randn(r, inf, generator=g)
        out[key(module, "B")] = torch.zeros(outf, r)
    return out


def good_config() -> dict[str, Any]:
    return {
        "peft_type": "LORA", "r": RANK, "lora_alpha": 8, "task_type": "CAUSAL_LM",
        "target_modules": ["q_proj", "v_proj", "down_proj"], "base_model_name_or_path": MODEL_ID,
    }


def good_meta() -> dict[str, Any]:
    return {"name": "legal", "version": "v1", "base_model": MODEL_ID, "status": "promoted"}


def build(root: Path, tensors: dict[str, torch.Tensor] | None = None, config: Any = None, meta: Any = None) -> Path:
    p = root / "legal" / "v1"
    p.mkdir(parents=True)
    save_file(good_tensors() if tensors is None else tensors, str(p / WEIGHTS_FILE))
    (p / CONFIG_FILE).write_text(json.dumps(good_config() if config is None else config), encoding="utf-8")
    (p / META_FILE).write_text(json.dumps(good_meta() if meta is None else meta), encoding="utf-8")
    return p


def check(root: Path):
    return validate(AdapterStore(root).version("legal", "v1"), MODEL_ID, SHAPES)


# ---- the good case ---------------------------------------------------------------------

def test_valid_adapter(tmp_path: Path) -> None:
    p = build(tmp_path)
    result = check(tmp_path)
    assert result.modules == frozenset(TARGETS)
    assert result.file_bytes == (p / WEIGHTS_FILE).stat().st_size > 0
    assert result.version.path == p


@pytest.mark.parametrize(
    "variant",
    [
        {"config": {**good_config(), "peft_type": "lora"}},  # peft_type case does not matter
        {"tensors": {k: v.to(torch.bfloat16) for k, v in good_tensors().items()}},
        {"tensors": {**good_tensors(), "base_model.model.lm_head.modules_to_save.weight": torch.zeros(2, 2)}},
        {"tensors": {k: v for k, v in good_tensors().items() if "q_proj" in k}},  # a subset of layers
        {"meta": {**good_meta(), "status": "rejected", "extra": [1, 2]}},  # other meta keys are not ours to judge
    ],
    ids=["lowercase-peft-type", "bfloat16", "modules-to-save-extra", "one-module", "extra-meta"],
)
def test_valid_variants(tmp_path: Path, variant: dict[str, Any]) -> None:
    build(tmp_path, **variant)
    assert check(tmp_path).modules


# ---- broken adapters ---------------------------------------------------------------------

Break = Callable[[Path], None]


def rm(name: str) -> Break:
    return lambda p: (p / name).unlink()


def write(name: str, data: bytes | str) -> Break:
    def apply(p: Path) -> None:
        if isinstance(data, str):
            (p / name).write_text(data, encoding="utf-8")
        else:
            (p / name).write_bytes(data)
    return apply


def tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Break:
    def apply(p: Path) -> None:
        t = good_tensors()
        change(t)
        save_file(t, str(p / WEIGHTS_FILE))
    return apply


def config(**changes: Any) -> Break:
    return write(CONFIG_FILE, json.dumps({**good_config(), **changes}))


def meta(**changes: Any) -> Break:
    return write(META_FILE, json.dumps({**good_meta(), **changes}))


def truncate(p: Path) -> None:
    data = (p / WEIGHTS_FILE).read_bytes()
    (p / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"

BROKEN: list[tuple[str, Break, type[Exception], list[str]]] = [
    # (id, how to break it, exact error type, words in the message)
    ("base-model-differs", meta(base_model="Qwen/Qwen2.5-0.5B"), AdapterIncompatible,
     ["'Qwen/Qwen2.5-0.5B'", repr(MODEL_ID)]),
    ("base-model-absent", write(META_FILE, json.dumps({"name": "legal"})), AdapterIncompatible,
     ["None", repr(MODEL_ID)]),
    ("no-weights", rm(WEIGHTS_FILE), AdapterInvalid, [WEIGHTS_FILE, "missing"]),
    ("no-config", rm(CONFIG_FILE), AdapterInvalid, [CONFIG_FILE, "missing"]),
    ("no-meta", rm(META_FILE), AdapterInvalid, [META_FILE, "missing"]),
    ("meta-not-json", write(META_FILE, "{oops"), AdapterInvalid, [META_FILE, "not valid JSON"]),
    ("meta-not-object", write(META_FILE, "[]"), AdapterInvalid, [META_FILE, "not a JSON object"]),
    ("config-not-json", write(CONFIG_FILE, "{"), AdapterInvalid, [CONFIG_FILE, "not valid JSON"]),
    ("config-not-object", write(CONFIG_FILE, '"LORA"'), AdapterInvalid, [CONFIG_FILE, "LORA"]),
    ("config-not-lora", config(peft_type="IA3"), AdapterInvalid, [CONFIG_FILE, "peft_type LORA"]),
    ("config-no-peft-type", write(CONFIG_FILE, json.dumps({"r": RANK})), AdapterInvalid, ["peft_type LORA"]),
    ("config-no-rank", write(CONFIG_FILE, json.dumps({"peft_type": "LORA"})), AdapterInvalid, ["rank r", "None"]),
    ("config-rank-zero", config(r=0), AdapterInvalid, ["rank r", "0"]),
    ("config-rank-string", config(r="4"), AdapterInvalid, ["rank r", "'4'"]),
    ("corrupt-weights", write(WEIGHTS_FILE, random.Random(0).randbytes(512)), AdapterInvalid,
     [WEIGHTS_FILE, "cannot be read"]),
    ("empty-weights-file", write(WEIGHTS_FILE, b""), AdapterInvalid, [WEIGHTS_FILE, "cannot be read"]),
    ("truncated-weights", truncate, AdapterInvalid, [WEIGHTS_FILE, "cannot be read"]),
    ("no-tensors", lambda p: save_file({}, str(p / WEIGHTS_FILE)), AdapterInvalid, ["holds no tensors"]),
    ("no-lora-tensors", lambda p: save_file({"base_model.model.lm_head.weight": torch.zeros(2, 2)},
                                            str(p / WEIGHTS_FILE)), AdapterInvalid, ["no lora_A/lora_B"]),
    ("config-rank-differs", config(r=8), AdapterIncompatible, ["rank 8", f"has shape ({RANK}, ", "expected (8, "]),
    ("lora-A-wrong-rank", tensors(lambda t: t.__setitem__(key(Q, "A"), torch.zeros(RANK + 1, 16))),
     AdapterIncompatible, [key(Q, "A"), f"({RANK + 1}, 16)", f"expected ({RANK}, 16)", Q]),
    ("lora-B-wrong-out", tensors(lambda t: t.__setitem__(key(V, "B"), torch.zeros(16, RANK))),
     AdapterIncompatible, [key(V, "B"), f"expected (8, {RANK})"]),
    ("lora-A-transposed", tensors(lambda t: t.__setitem__(key(Q, "A"), torch.zeros(16, RANK))),
     AdapterIncompatible, [key(Q, "A")]),
    ("lora-A-1d", tensors(lambda t: t.__setitem__(key(Q, "A"), torch.zeros(RANK * 16))), AdapterIncompatible,
     [key(Q, "A")]),
    ("unknown-module", tensors(lambda t: t.__setitem__(key("model.layers.7.self_attn.q_proj", "A"),
                                                          torch.zeros(RANK, 16))),
     AdapterIncompatible, ["'model.layers.7.self_attn.q_proj'", "does not have"]),
    ("nan", tensors(lambda t: t[key(Q, "A")].__setitem__((0, 3), float("nan"))), AdapterInvalid,
     [key(Q, "A"), "NaN"]),
    ("inf", tensors(lambda t: t[key(V, "B")].__setitem__((1, 1), float("-inf"))), AdapterInvalid,
     [key(V, "B"), "infinite"]),
]


@pytest.mark.parametrize("case, breaks, error, words", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_adapter_refused(
    tmp_path: Path, case: str, breaks: Break, error: type[Exception], words: list[str]
) -> None:
    p = build(tmp_path)
    breaks(p)
    with pytest.raises(AdapterInvalid) as err:
        check(tmp_path)
    assert type(err.value) is error
    msg = str(err.value)
    assert "adapter legal/v1" in msg and str(p) in msg  # which adapter, and where on disk
    for word in words:
        assert word in msg


def test_nan_in_bfloat16_is_found(tmp_path: Path) -> None:
    t = {k: v.to(torch.bfloat16) for k, v in good_tensors().items()}
    t[key(Q, "B")][0, 0] = float("nan")
    build(tmp_path, tensors=t)
    with pytest.raises(AdapterInvalid, match="NaN"):
        check(tmp_path)


def test_other_base_model_accepted_when_engine_serves_it(tmp_path: Path) -> None:
    build(tmp_path, meta={**good_meta(), "base_model": "my/other-model"})
    version = AdapterStore(tmp_path).version("legal", "v1")
    assert validate(version, "my/other-model", SHAPES).modules == frozenset(TARGETS)
    with pytest.raises(AdapterIncompatible):
        validate(version, MODEL_ID, SHAPES)
