"""What a request is generated with, and the audit stamp that records it: one place for both backends.

The settings' defaults with a request's overrides applied (`effective_sampling`) and the answer's
`AuditStamp` are built here, so the local engine and the vLLM backend cannot drift apart on what
`temperature=None` means or on what `/why` shows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from engine.errors import EngineError
from engine.types import AuditStamp, EffectiveSampling, GenerationParams

if TYPE_CHECKING:
    from engine.config import EngineSettings
    from engine.prompts import SystemPrompt


def effective_sampling(settings: "EngineSettings", params: GenerationParams) -> EffectiveSampling:
    """The settings' defaults with the request's overrides; EngineError for a max_new_tokens that
    leaves no room in CONTEXT_TOKENS (checked before any prompt is built)."""
    s, p = settings, params
    max_new = p.max_new_tokens or s.max_new_tokens
    if not 0 < max_new < s.context_tokens:
        raise EngineError(f"max_new_tokens={max_new} must be between 1 and CONTEXT_TOKENS-1 "
                          f"(CONTEXT_TOKENS={s.context_tokens})")
    return EffectiveSampling(
        max_new_tokens=max_new,
        temperature=s.temperature if p.temperature is None else p.temperature,
        top_p=p.top_p or s.top_p,
        top_k=s.top_k if p.top_k is None else p.top_k,
        repetition_penalty=p.repetition_penalty or s.repetition_penalty,
        seed=p.seed,
    )


def audit_stamp(*, base_model: str, base_fingerprint: str | None, quantization: str | None,
                adapter: str | None, adapter_version: str | None, system: "SystemPrompt",
                sampling: EffectiveSampling, backend: Literal["local", "vllm"] = "local",
                replica: str | None = None) -> AuditStamp:
    """The stamp of one admitted request (its adapter version is the one that will answer)."""
    return AuditStamp(
        base_model=base_model, base_fingerprint=base_fingerprint, quantization=quantization,
        adapter=adapter, adapter_version=adapter_version if adapter is not None else None,
        template=system.role, template_hash=system.sha256, template_language=system.language,
        sampling=sampling, backend=backend, replica=replica,
    )
