"""Settings of the vLLM backend (ENGINE_BACKEND=vllm): where the replicas are and how long to wait.

Read from the environment and `.env` like the engine's own settings, validated once, frozen.
The engine settings still apply: MODEL names the base model the replicas must serve (and
whose tokenizer builds the prompts here), CONTEXT_TOKENS and the sampling defaults are the
same, ADAPTERS_DIR is where this process reads and writes adapters.
"""
from __future__ import annotations

from typing import Annotated
from urllib.parse import urlparse

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.config import format_validation_error
from engine.errors import ConfigError

UrlList = Annotated[tuple[str, ...], NoDecode]


class VllmSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True, env_ignore_empty=True,
    )

    vllm_urls: UrlList = Field(
        (), description="Comma-separated base URLs of the vLLM replicas, e.g. http://vllm-1:8000,http://vllm-2:8000.",
    )
    vllm_api_key: SecretStr | None = Field(
        None, description="The replicas' --api-key (sent as a Bearer token); unset = no key.",
    )
    vllm_model: str | None = Field(
        None, description="The replicas' --served-model-name; unset = the model id of MODEL "
        "(HuggingFaceTB/SmolLM2-135M-Instruct for the default).",
    )
    vllm_adapters_dir: str | None = Field(
        None, description="ADAPTERS_DIR as the replicas see it (a shared volume); unset = the same path as here.",
    )
    vllm_connect_timeout_s: float = Field(5.0, gt=0, le=600, description="Opening a connection to a replica.")
    vllm_first_token_timeout_s: float = Field(
        60.0, gt=0, le=3600,
        description="From sending a request to its first token; past it the request goes to another replica.",
    )
    vllm_stall_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Longest silence between two pieces of a streamed answer before it fails.",
    )
    vllm_admin_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Listing models and loading or unloading an adapter on a replica.",
    )
    vllm_retry_after_s: float = Field(
        10.0, ge=0, le=3600, description="How long a replica that failed is left out before it is tried again.",
    )
    vllm_health_interval_s: float = Field(
        5.0, gt=0, le=3600, description="How often each replica is checked (restarts, adapters, coming back).",
    )
    vllm_max_in_flight: int = Field(
        256, ge=1, le=100000,
        description="Requests sent to one replica at once; when every replica is full, new ones get 'busy'.",
    )

    @field_validator("vllm_urls", mode="before")
    @classmethod
    def _urls(cls, v: object) -> object:
        if isinstance(v, str):
            v = [p for p in v.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
        if isinstance(v, (list, tuple)):
            out = []
            for raw in v:
                url = str(raw).strip().rstrip("/").removesuffix("/v1")  # the OpenAI clients' spelling; we add /v1
                parsed = urlparse(url)
                if parsed.scheme not in ("http", "https") or not parsed.netloc:
                    raise ValueError(f"expected http(s)://host:port base URLs, got {raw!r}")
                if url in out:
                    raise ValueError(f"{url} is listed twice")
                out.append(url)
            return tuple(out)
        return v

    @field_validator("vllm_model", "vllm_adapters_dir")
    @classmethod
    def _blank_is_unset(cls, v: str | None) -> str | None:
        return v.strip() or None if isinstance(v, str) else v

    @property
    def api_key(self) -> str | None:
        return self.vllm_api_key.get_secret_value() if self.vllm_api_key else None


def load_vllm_settings(**overrides: object) -> VllmSettings:
    """Read settings once; raise ConfigError naming each bad variable."""
    try:
        return VllmSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(f"invalid vLLM settings: {format_validation_error(exc)}") from exc
