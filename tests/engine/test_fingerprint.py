"""engine.model.fingerprint: adapters are matched to the base model by its weights, not its name.

Small safetensors folders stand in for models (the recipe reads only headers and a few values
per tensor); the shipped adapters are checked against the real default model's folder.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.adapters.store import AdapterStore
from engine.adapters.validate import validate
from engine.errors import AdapterIncompatible
from engine.adapters.store import META_KEY
from engine.adapters.validate import base_mismatch
from engine.model.fingerprint import ModelIdentity, fingerprint_folder, stamp
from engine.model import main

REPO = Path(__file__).resolve().parents[2]
DEFAULT_FOLDER = REPO / "models" / "SmolLM2-135M-Instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(64, 16, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 32, generator=g),
        "model.norm.weight": torch.ones(16),
    }


def folder(root: Path, name: str, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    d = root / name
    d.mkdir()
    names = sorted(tensors)
    for i in range(shards):
        part = {k: tensors[k].contiguous() for k in names[i::shards]}
        save_file(part, str(d / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"))
    return d


def test_same_weights_match_however_they_are_stored(tmp_path: Path) -> None:
    w = weights()
    fp32 = fingerprint_folder(folder(tmp_path, "fp32", w))
    assert fp32 and fp32.startswith("w1:")
    as_bf16 = {k: v.to(torch.bfloat16) for k, v in w.items()}
    assert fingerprint_folder(folder(tmp_path, "bf16", as_bf16)) == fp32  # a bf16 copy of the same weights
    assert fingerprint_folder(folder(tmp_path, "sharded", w, shards=3)) == fp32


@pytest.mark.parametrize("change", ["other-seed", "one-value", "shape", "name"])
def test_other_weights_do_not_match(tmp_path: Path, change: str) -> None:
    w = weights()
    reference = fingerprint_folder(folder(tmp_path, "ref", w))
    other = dict(w)
    if change == "other-seed":
        other = weights(seed=1)
    elif change == "one-value":  # the first value of a tensor is always sampled
        other["model.norm.weight"] = w["model.norm.weight"].clone()
        other["model.norm.weight"][0] = 2.0
    elif change == "shape":
        other["model.layers.0.mlp.down_proj.weight"] = w["model.layers.0.mlp.down_proj.weight"][:, :16]
    else:
        other["model.final_norm.weight"] = other.pop("model.norm.weight")
    assert fingerprint_folder(folder(tmp_path, "other", other)) != reference


def test_non_safetensors_weights_get_a_fingerprint_too(tmp_path: Path) -> None:
    d = tmp_path / "bin"
    d.mkdir()
    torch.save(weights(), d / "pytorch_model.bin")
    first = fingerprint_folder(d)
    assert first and first.startswith("b1:") and fingerprint_folder(d) == first
    torch.save(weights(seed=1), d / "pytorch_model.bin")
    assert fingerprint_folder(d) != first
    assert fingerprint_folder(tmp_path / "bin" / "..") is None  # no weight files at all


FP = "w1:" + "a" * 32
OTHER_FP = "w1:" + "b" * 32
MATCHING = [
    # (meta, serving model, accepted?)
    ({"base_model": HUB_ID, META_KEY: FP}, ModelIdentity(HUB_ID, FP), True),
    # the converted folder of the same weights: another name, the same fingerprint
    ({"base_model": HUB_ID, META_KEY: FP}, ModelIdentity("SmolLM2-135M-Instruct", FP), True),
    # another model that took the same name: refused
    ({"base_model": HUB_ID, META_KEY: OTHER_FP}, ModelIdentity(HUB_ID, FP), False),
    # a version from before fingerprints: the name decides
    ({"base_model": HUB_ID}, ModelIdentity(HUB_ID, FP), True),
    ({"base_model": "other/model"}, ModelIdentity(HUB_ID, FP), False),
    # an engine that could not fingerprint its weights: the name decides
    ({"base_model": HUB_ID, META_KEY: FP}, ModelIdentity(HUB_ID, None), True),
    ({"base_model": HUB_ID, META_KEY: FP}, HUB_ID, True),
    ({"base_model": "other/model", META_KEY: FP}, HUB_ID, False),
]


@pytest.mark.parametrize("meta, model, accepted", MATCHING)
def test_fingerprint_decides_and_the_name_is_the_fallback(meta: dict, model: str, accepted: bool) -> None:
    reason = base_mismatch(meta, model)
    assert (reason is None) == accepted
    if not accepted:
        assert repr(str(model)) in reason


def test_a_version_without_fingerprint_is_accepted_with_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="engine.adapters.validate"):
        assert base_mismatch({"base_model": HUB_ID}, ModelIdentity(HUB_ID, FP), "adapter legal/v1") is None
    assert any("legal/v1" in r.getMessage() and META_KEY in r.getMessage() and "--stamp" in r.getMessage()
               for r in caplog.records)


def shipped_copy(root: Path, domain: str = "legal") -> AdapterStore:
    (root / domain).mkdir(parents=True)
    shutil.copytree(REPO / "adapters" / domain / "v1", root / domain / "v1")
    return AdapterStore(root)


def linear_shapes(version_dir: Path) -> dict[str, tuple[int, int]]:
    """The base model's linear shapes as the adapter's own matrices describe them."""
    from safetensors.torch import load_file

    shapes = {}
    for k, t in load_file(str(version_dir / "adapter_model.safetensors")).items():
        module = k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        if ".lora_A." in k:
            shapes[module] = (t.shape[1], shapes.get(module, (0, 0))[1])
        else:
            shapes[module] = (shapes.get(module, (0, 0))[0], t.shape[0])
    return shapes


def test_validate_accepts_the_converted_folder_and_refuses_a_namesake(tmp_path: Path) -> None:
    store = shipped_copy(tmp_path)
    version = store.version("legal", "v1")
    shapes = linear_shapes(version.path)
    fp = version.meta[META_KEY]
    assert validate(version, ModelIdentity("SmolLM2-135M-Instruct", fp), shapes).modules
    with pytest.raises(AdapterIncompatible, match="other weights"):
        validate(version, ModelIdentity(HUB_ID, OTHER_FP), shapes)


def test_shipped_adapters_carry_the_default_models_fingerprint() -> None:
    if not (DEFAULT_FOLDER / "config.json").is_file():
        pytest.fail(f"{DEFAULT_FOLDER} is missing; run `make setup` first")
    fp = fingerprint_folder(DEFAULT_FOLDER)
    for meta_path in sorted((REPO / "adapters").glob("*/v1/meta.json")):
        meta = json.loads(meta_path.read_text())
        assert meta.get(META_KEY) == fp, f"{meta_path}: {meta.get(META_KEY)} != {fp} (the default model's)"
        assert meta["base_model"] == HUB_ID  # the readable label stays


def test_stamp_records_the_fingerprint_only_where_the_name_matches(tmp_path: Path) -> None:
    store = shipped_copy(tmp_path / "a")
    legacy = store.version("legal", "v1").path
    meta = json.loads((legacy / "meta.json").read_text())
    del meta[META_KEY]
    (legacy / "meta.json").write_text(json.dumps(meta))
    lines = stamp([legacy], ModelIdentity("someone/else", FP))
    assert "left alone" in lines[0] and META_KEY not in json.loads((legacy / "meta.json").read_text())
    lines = stamp([legacy], ModelIdentity(HUB_ID, FP))
    assert "stamped" in lines[0] and json.loads((legacy / "meta.json").read_text())[META_KEY] == FP


def test_command_prints_the_configured_models_fingerprint(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL", str(DEFAULT_FOLDER))
    assert main(["--fingerprint"]) == 0
    out = capsys.readouterr().out
    assert out.split() == ["SmolLM2-135M-Instruct", fingerprint_folder(DEFAULT_FOLDER)]
