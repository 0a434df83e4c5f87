"""The effective sampling settings and the audit stamp both backends build (engine/audit.py)."""
from __future__ import annotations

import pytest

from engine.audit import audit_stamp, effective_sampling
from engine.config import load_settings
from engine.errors import EngineError
from engine.prompts import SystemPrompt
from engine.types import AuditStamp, GenerationParams


def test_overrides_replace_the_defaults_and_zero_temperature_stays_greedy() -> None:
    s = load_settings(temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1, max_new_tokens=64)
    assert effective_sampling(s, GenerationParams()) == effective_sampling(s, GenerationParams(max_new_tokens=64))
    got = effective_sampling(s, GenerationParams(temperature=0.0, top_k=0, max_new_tokens=5, seed=3))
    assert (got.temperature, got.top_k, got.max_new_tokens, got.seed) == (0.0, 0, 5, 3)
    assert (got.top_p, got.repetition_penalty) == (0.9, 1.1)


@pytest.mark.parametrize("max_new", [-1, 4096, 10_000])
def test_max_new_tokens_must_leave_room_in_the_context(max_new: int) -> None:
    s = load_settings(context_tokens=4096)
    with pytest.raises(EngineError, match="CONTEXT_TOKENS=4096"):
        effective_sampling(s, GenerationParams(max_new_tokens=max_new))


def test_stamp_round_trips_through_storage_and_drops_the_version_of_the_base_model() -> None:
    system = SystemPrompt("You are a lawyer.", "lawyer", "en", "ab" * 32)
    sampling = effective_sampling(load_settings(), GenerationParams(seed=1))
    stamp = audit_stamp(base_model="m", base_fingerprint="w1:00", quantization="bf16", adapter="legal",
                        adapter_version="v2", system=system, sampling=sampling, backend="vllm",
                        replica="http://r1:8000")
    assert AuditStamp.from_dict(stamp.to_dict()) == stamp
    assert (stamp.template, stamp.template_hash, stamp.template_language) == ("lawyer", "ab" * 32, "en")
    base = audit_stamp(base_model="m", base_fingerprint=None, quantization=None, adapter=None,
                       adapter_version="v2", system=system, sampling=sampling)
    assert base.adapter_version is None and base.backend == "local"
