"""Data that crosses the engine's boundary.

Front ends (bot, console, benchmarks) see only these plain dataclasses: never a tensor,
never a Telegram object. Keep them free of torch so `bot/` imports without it.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

Role = Literal["system", "user", "assistant"]
AdapterState = Literal["loading", "ready", "failed", "retired"]

#: The adapter id that means "no adapter" (peft's own spelling), so one code path serves both.
BASE_ADAPTER = "__base__"


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Mode:
    """What a user talks to: an adapter (or the bare base model) plus a role template."""

    adapter: str | None = None
    role: str = "assistant"

    @property
    def key(self) -> str:
        return f"{self.adapter or 'base'}:{self.role}"


@dataclass(frozen=True)
class UserContext:
    """Template variables that describe the person; nothing Telegram-specific."""

    first_name: str | None = None
    language: str = "en"
    today: _dt.date | None = None  # None: the engine uses today's date


@dataclass(frozen=True)
class GenerationParams:
    """Per-request overrides; None means the engine's configured default."""

    max_new_tokens: int | None = None
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    #: Keep generating through end-of-sequence tokens until max_new_tokens (benchmarks: a fixed
    #: amount of work per request whatever the model would say). Never set by the bot.
    ignore_eos: bool = False
    #: Answer with this version of `Mode.adapter` instead of the serving one (an A/B of a
    #: candidate). It must be on disk; a version that is not resident is loaded first (`hold`
    #: keeps it resident). AdapterNotFound when it is not on disk, AdapterInvalid when it failed.
    adapter_version: str | None = None


FinishReason = Literal["stop", "length", "cancelled", "error", "context"]


@dataclass(frozen=True)
class EffectiveSampling:
    """The sampling settings a request was generated with: the defaults with its overrides applied."""

    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int  # 0 = off
    repetition_penalty: float
    seed: int | None = None


@dataclass(frozen=True)
class AuditStamp:
    """What produced one answer, so an admin can tell why two answers differ (/why).

    `quantization` is here because the base fingerprint is the same for every quantization of
    one checkpoint (engine/model/fingerprint.py), while the weights that ran are not.
    """

    base_model: str  # the engine's model id
    base_fingerprint: str | None  # "w1:<hex>" of the base weights; None where the backend cannot tell
    adapter: str | None  # None: the base model
    adapter_version: str | None
    template: str  # the role template id
    template_hash: str  # sha256 of the template source that rendered the system prompt
    sampling: EffectiveSampling
    backend: Literal["local", "vllm"] = "local"
    replica: str | None = None  # the vLLM replica's base URL that answered
    quantization: str | None = None
    template_language: str | None = None  # the language variant of the template used

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "AuditStamp":
        """Back from `to_dict` (stored JSON); keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        sampling = values.get("sampling")
        if isinstance(sampling, dict):
            names = {f.name for f in fields(EffectiveSampling)}
            values["sampling"] = EffectiveSampling(**{k: v for k, v in sampling.items() if k in names})
        return cls(**values)  # type: ignore[arg-type]


@dataclass
class GenerationResult:
    """Filled in when a generation stream ends; the bot stores it with the message."""

    text: str = ""
    adapter: str | None = None
    adapter_version: str | None = None
    role: str = "assistant"
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of those, taken from the prefix cache instead of computed
    completion_tokens: int = 0
    trimmed_turns: int = 0  # oldest history turns dropped to fit the context budget
    finish_reason: FinishReason | None = None
    queue_wait_s: float = 0.0
    time_to_first_token_s: float | None = None
    duration_s: float = 0.0
    stamp: AuditStamp | None = None  # set once the request is admitted (its version and settings are known)


@dataclass(frozen=True)
class AdapterVersionInfo:
    name: str
    version: str  # "v3"
    created: str | None = None
    base_model: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    is_current: bool = False
    state: AdapterState | None = None  # None: on disk, not resident
    #: trained and not promoted (meta.json "status": "candidate"): what an A/B can test
    candidate: bool = False


@dataclass(frozen=True)
class AdapterInfo:
    """One domain: its current version and every version on disk."""

    name: str
    current: str | None
    versions: tuple[AdapterVersionInfo, ...] = ()
    error: str | None = None  # why the current version is not serving, if it is not


@dataclass(frozen=True)
class RoleInfo:
    id: str
    title: str
    description: str = ""
    languages: tuple[str, ...] = ("en",)
    suggested_adapter: str | None = None
    error: str | None = None  # last reload failed; the last good version is still used


@dataclass(frozen=True)
class ModeCatalog:
    adapters: tuple[AdapterInfo, ...]
    roles: tuple[RoleInfo, ...]

    def adapter(self, name: str) -> AdapterInfo | None:
        return next((a for a in self.adapters if a.name == name), None)

    def role(self, role_id: str) -> RoleInfo | None:
        return next((r for r in self.roles if r.id == role_id), None)


@dataclass(frozen=True)
class ResidentAdapter:
    name: str
    version: str
    state: AdapterState
    bytes: int
    file_bytes: int
    in_flight: int  # requests currently generating with it


ReplicaState = Literal["starting", "registering", "ready", "down", "incompatible"]


@dataclass(frozen=True)
class ReplicaStatus:
    """One inference server behind the engine (the vLLM backend); the local engine has none."""

    name: str  # its base URL
    state: ReplicaState
    in_flight: int = 0  # requests streaming from it now
    adapters: int = 0  # adapter versions registered on it
    requests: int = 0  # requests it has answered or is answering
    failures: int = 0  # times it was taken out (errors, timeouts, refusals)
    error: str | None = None  # why it is down or incompatible
    retry_in_s: float | None = None  # when a down replica is tried again


@dataclass(frozen=True)
class EngineStatus:
    model: str
    quantization: str
    device: str
    dtype: str
    model_bytes: int
    process_rss_bytes: int
    gpu_allocated_bytes: int | None
    adapters: tuple[ResidentAdapter, ...]
    queue_depth: int
    active_requests: int
    tokens_generated: int
    uptime_s: float
    ready: bool  # started, and able to answer (some role template renders)
    problems: tuple[str, ...] = ()  # why it is not ready, for /status and /healthz
    backend: str = "local"  # ENGINE_BACKEND: local (this process) or vllm (replicas)
    replicas: tuple[ReplicaStatus, ...] = ()


@dataclass(frozen=True)
class ReloadReport:
    """What `Engine.reload` did: per adapter, the version now serving or the error."""

    loaded: dict[str, str] = field(default_factory=dict)  # name -> version
    unchanged: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # name -> reason
    templates: dict[str, str] = field(default_factory=dict)  # template -> error (only failures)


# ---- training (engine.training) -------------------------------------------------------

TrainingEventKind = Literal[
    "queued", "started", "progress", "evaluating", "finished", "failed", "cancelled"
]


@dataclass(frozen=True)
class TrainingEvent:
    """One step of a training job's life, streamed from the training process."""

    job_id: str
    domain: str
    kind: TrainingEventKind
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eta_s: float | None = None
    message: str = ""  # human-readable detail; the reason on failure
    metrics: dict[str, float] = field(default_factory=dict)  # eval loss/perplexity
    version: str | None = None  # the version written, when there is one
    promoted: bool = False

    @property
    def final(self) -> bool:
        return self.kind in ("finished", "failed", "cancelled")
