"""Engine settings: read from the environment and `.env`, validated once, named in errors."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import EngineSettings, load_settings
from engine.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
ENV_NAMES = [name.upper() for name in EngineSettings.model_fields]


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = tmp_path (no stray `.env`) and none of the engine's variables from the shell."""
    monkeypatch.chdir(tmp_path)
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return tmp_path


BAD = [
    # (environment, variables the message must name)
    ({"QUANTIZATION": "q3"}, ["QUANTIZATION", "'q3'"]),
    ({"DEVICE": "gpu7"}, ["DEVICE", "gpu7", "cuda:N"]),
    ({"DEVICE": "cuda:x"}, ["DEVICE"]),
    ({"COMPUTE_DTYPE": "float8"}, ["COMPUTE_DTYPE"]),
    ({"KV_CACHE_DTYPE": "fp8"}, ["KV_CACHE_DTYPE", "'fp8'"]),
    ({"MAX_NEW_TOKENS": "2048", "CONTEXT_TOKENS": "2048"}, ["MAX_NEW_TOKENS=2048", "CONTEXT_TOKENS=2048"]),
    ({"MAX_NEW_TOKENS": "4000"}, ["MAX_NEW_TOKENS=4000", "CONTEXT_TOKENS=2048"]),
    ({"MAX_NEW_TOKENS": "-1"}, ["MAX_NEW_TOKENS"]),
    ({"MAX_NEW_TOKENS": "0"}, ["MAX_NEW_TOKENS"]),
    ({"MAX_NEW_TOKENS": "many"}, ["MAX_NEW_TOKENS", "'many'"]),
    ({"CONTEXT_TOKENS": "-5"}, ["CONTEXT_TOKENS"]),
    ({"TEMPERATURE": "-0.1"}, ["TEMPERATURE"]),
    ({"TOP_P": "0"}, ["TOP_P"]),
    ({"CPU_THREADS": "0"}, ["CPU_THREADS"]),
    ({"CPU_THREADS": "two"}, ["CPU_THREADS", "'two'"]),
    ({"TOP_P": "1.5"}, ["TOP_P"]),
    ({"TOP_K": "-1"}, ["TOP_K"]),
    ({"REPETITION_PENALTY": "0.5"}, ["REPETITION_PENALTY"]),
    ({"MAX_RESIDENT_ADAPTERS": "0"}, ["MAX_RESIDENT_ADAPTERS"]),
    ({"MAX_BATCH_SIZE": "-2"}, ["MAX_BATCH_SIZE"]),
    ({"MAX_QUEUE": "0"}, ["MAX_QUEUE"]),
    ({"TEMPLATE_POLL_S": "-1"}, ["TEMPLATE_POLL_S"]),
    ({"LORA_R": "0"}, ["LORA_R"]),
    ({"LORA_DROPOUT": "1"}, ["LORA_DROPOUT"]),
    ({"QUANTIZATION": "q3", "DEVICE": "gpu7"}, ["QUANTIZATION", "DEVICE"]),  # every bad one, at once
]


@pytest.mark.parametrize("env, names", BAD, ids=[" ".join(f"{k}={v}" for k, v in e.items()) for e, _ in BAD])
def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], names: list[str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    for name in names:
        assert name in str(err.value)


def test_bad_value_in_dotenv(clean_env: Path) -> None:
    (clean_env / ".env").write_text("DEVICE=gpu7\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="DEVICE"):
        load_settings()


@pytest.mark.parametrize("override", [{"quantization": "q3"}, {"max_new_tokens": 500, "context_tokens": 400}])
def test_bad_override_raises_config_error(override: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        load_settings(**override)


@pytest.mark.parametrize(
    "value, expected",
    [("auto", "auto"), ("cpu", "cpu"), ("CPU", "cpu"), (" cuda ", "cuda"), ("cuda:1", "cuda:1"), ("mps", "mps")],
)
def test_device_values(monkeypatch: pytest.MonkeyPatch, value: str, expected: str) -> None:
    monkeypatch.setenv("DEVICE", value)
    assert load_settings().device == expected


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "MODEL": "/srv/models/other", "QUANTIZATION": "int8", "DEVICE": "cpu", "COMPUTE_DTYPE": "bfloat16",
        "MAX_NEW_TOKENS": "100", "CONTEXT_TOKENS": "1024", "TEMPERATURE": "0", "TOP_K": "0",
        "ADAPTERS_DIR": "/srv/adapters", "TEMPLATES_DIR": "/srv/templates", "MAX_BATCH_SIZE": "4",
        "LORA_TARGET_MODULES": "q_proj,v_proj", "TEMPLATE_POLL_S": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = load_settings()
    assert (s.model, s.quantization, s.device, s.compute_dtype) == ("/srv/models/other", "int8", "cpu", "bfloat16")
    assert (s.max_new_tokens, s.context_tokens, s.temperature, s.top_k) == (100, 1024, 0.0, 0)
    assert (s.adapters_dir, s.templates_dir) == (Path("/srv/adapters"), Path("/srv/templates"))
    assert (s.max_batch_size, s.lora_target_modules, s.template_poll_s) == (4, "q_proj,v_proj", 0.0)


def test_lowercase_environment_names_also_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("max_new_tokens", "77")
    assert load_settings().max_new_tokens == 77


def test_dotenv_read_and_environment_wins(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".env").write_text(
        "CONTEXT_TOKENS=4096\nMAX_NEW_TOKENS=512\nBOT_TOKEN=123:abc\nSOMETHING_ELSE=1\n", encoding="utf-8"
    )
    s = load_settings()
    assert (s.context_tokens, s.max_new_tokens) == (4096, 512)  # unrelated keys (the bot's) are ignored
    monkeypatch.setenv("MAX_NEW_TOKENS", "256")
    assert load_settings().max_new_tokens == 256
    assert load_settings(max_new_tokens=64).max_new_tokens == 64  # explicit arguments win over both


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(Exception):
        s.max_new_tokens = 5  # type: ignore[misc]


def test_defaults_are_cpu_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from engine.model import torch_dtype

    s = load_settings()
    assert s.model == "smollm2"
    assert s.device == "auto" and s.compute_dtype == "auto"
    assert s.quantization == "auto"
    from engine.weights import bf16_weights, cpu_int4, fp16_weights

    amx = "int4+bf16" if cpu_int4.available() else "bf16"
    cpu_default = amx if bf16_weights.available() else "fp16" if fp16_weights.available() else "none"
    assert (s.resolved_quantization("cpu"), s.resolved_quantization("cuda:0")) == (cpu_default, "nf4")
    assert load_settings(compute_dtype="bfloat16").resolved_quantization("cpu") == "none"  # fp16/bf16 keep fp32 activations
    assert load_settings(quantization="int8").resolved_quantization("cuda") == "int8"  # explicit wins
    assert s.serving_runtime == "auto"
    assert (s.resolved_prefill_chunk("cpu"), s.resolved_prefill_chunk("cuda:0")) == (512, 8192)
    assert load_settings(prefill_chunk_tokens=64).resolved_prefill_chunk("cuda") == 64  # explicit wins
    assert s.prefix_cache_tokens == 4096
    assert s.max_new_tokens < s.context_tokens
    assert (s.adapters_dir, s.templates_dir) == (Path("adapters"), Path("templates"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU
    assert s.resolved_device() == "cpu"
    assert torch_dtype(s, "cpu") == torch.float32
    assert load_settings(device="cpu").resolved_device() == "cpu"


def test_cpu_threads_are_the_usable_cores_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a 2-core machine
    assert load_settings().resolved_cpu_threads() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert load_settings().resolved_cpu_threads() == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})  # one core: still one thread
    assert load_settings().resolved_cpu_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the operator's OpenMP setting wins over the rule
    assert load_settings().resolved_cpu_threads() == 4
    monkeypatch.setenv("CPU_THREADS", "2")  # and ours wins over both
    assert load_settings().resolved_cpu_threads() == 2


def test_config_imports_without_torch() -> None:
    """The bot imports engine.config; it must not drag torch in."""
    code = "import sys, engine.config, engine.errors, engine.types; sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr or "engine.config imported torch"


# ---- DEVICE against the installed torch -------------------------------------------------------


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:7"])
def test_a_device_this_torch_cannot_use_is_a_config_error_naming_device(device: str) -> None:
    import torch

    if int(device.partition(":")[2] or 0) < _cuda_devices():
        pytest.skip(f"{device} exists on this machine; cuda:7 covers the error here")
    with pytest.raises(ConfigError) as err:
        load_settings(device=device).resolved_device()
    msg = str(err.value)
    assert f"DEVICE={device}" in msg
    if torch.version.cuda is None:  # a CPU-only build: say so, with its version
        assert "without CUDA" in msg and torch.__version__ in msg
    else:
        assert "GPU" in msg


def test_auto_and_cpu_always_resolve() -> None:
    assert load_settings(device="cpu").resolved_device() == "cpu"
    assert load_settings().resolved_device() in ("cpu", "cuda")


# ---- names that are not settings ---------------------------------------------------------------

TYPOS = [
    ("MAX_NEW_TOKEN", "MAX_NEW_TOKENS"),
    ("QUANTISATION", "QUANTIZATION"),
    ("max_new_token", "MAX_NEW_TOKENS"),  # names are case-insensitive
    ("TEMPLATE_POLL", "TEMPLATE_POLL_S"),
    ("ADAPTER_DIR", "ADAPTERS_DIR"),
]


@pytest.mark.parametrize("typo, meant", TYPOS)
def test_a_mistyped_name_in_dotenv_or_the_environment_is_reported_with_the_closest_setting(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, typo: str, meant: str
) -> None:
    from engine.config import misspelt_settings

    (clean_env / ".env").write_text(f"{typo}=60\n", encoding="utf-8")
    (warning,) = misspelt_settings(EngineSettings.model_fields, environ={})
    assert typo.upper() in warning and f"did you mean {meant}?" in warning and ".env" in warning
    (clean_env / ".env").unlink()
    monkeypatch.setenv(typo, "60")
    (warning,) = misspelt_settings(EngineSettings.model_fields)
    assert f"did you mean {meant}?" in warning and "environment" in warning


def test_unrelated_names_are_left_alone(clean_env: Path) -> None:
    from engine.config import misspelt_settings

    (clean_env / ".env").write_text("HF_TOKEN=x\nCOMPOSE_PROJECT_NAME=bot\nMAX_NEW_TOKENS=60\n", encoding="utf-8")
    env = {"PATH": "/bin", "HOME": "/root", "HOSTNAME": "box", "CUDA_VISIBLE_DEVICES": "0", "LANG": "C",
           "TERM": "xterm", "PWD": "/", "USER": "root", "TOKENIZERS_PARALLELISM": "false", "DEVICE": "cpu"}
    assert misspelt_settings(EngineSettings.model_fields, environ=env, complete=True) == []
    # with every setting of the process known, an unknown name in .env is reported even without a close match
    (clean_env / ".env").write_text("SOMETHING_ELSE=1\n", encoding="utf-8")
    (warning,) = misspelt_settings(EngineSettings.model_fields, environ={}, complete=True)
    assert "SOMETHING_ELSE" in warning and "not a setting" in warning


def test_an_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_new_token .*did you mean max_new_tokens"):
        load_settings(max_new_token=5)


# ---- folders --------------------------------------------------------------------------------------


def test_check_folders_names_the_setting_and_notes_an_empty_adapters_folder(clean_env: Path) -> None:
    (clean_env / "templates").mkdir()
    (clean_env / "adapters").mkdir()
    with pytest.raises(ConfigError, match="TEMPLATES_DIR='templates'.*has no role templates"):
        load_settings().check_folders()
    (clean_env / "templates" / "assistant.en.j2").write_text("You help.", encoding="utf-8")
    (note,) = load_settings().check_folders()
    assert "ADAPTERS_DIR" in note and "serving the base model only" in note
    (clean_env / "adapters" / "legal" / "data").mkdir(parents=True)
    assert load_settings().check_folders() == []
    with pytest.raises(ConfigError, match="ADAPTERS_DIR=.*is not a folder"):
        load_settings(adapters_dir=clean_env / "templates" / "assistant.en.j2").check_folders()


@pytest.mark.parametrize("quantization", ["fp16", "bf16", "int4", "int4+bf16"])
@pytest.mark.parametrize("device, dtype, words", [
    ("cuda:0", "auto", ["QUANTIZATION={q}", "DEVICE=cuda:0", "{alt}"]),
    ("cpu", "bfloat16", ["QUANTIZATION={q}", "COMPUTE_DTYPE=bfloat16", "float32"]),
])
def test_cpu_weight_formats_where_they_cannot_run_say_what_to_set(quantization: str, device: str, dtype: str,
                                                                   words: list[str]) -> None:
    s = load_settings(quantization=quantization, compute_dtype=dtype)
    with pytest.raises(ConfigError) as err:
        s.resolved_quantization(device)
    alt = "QUANTIZATION=nf4" if quantization.startswith("int4") else "COMPUTE_DTYPE"  # a GPU's counterpart
    assert all(w.format(q=quantization, alt=alt) in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("quantization", ["int4", "int4+bf16"])
def test_int4_without_the_kernel_says_what_to_set(monkeypatch: pytest.MonkeyPatch, quantization: str) -> None:
    from engine.weights import cpu_int4

    monkeypatch.setattr(cpu_int4, "available", lambda: False)
    with pytest.raises(ConfigError, match=rf"QUANTIZATION={re.escape(quantization)}: .*no CPU int4 kernel.*set QUANTIZATION=bf16, fp16 or auto"):
        load_settings(quantization=quantization).resolved_quantization("cpu")


def test_auto_takes_bf16_only_on_a_cpu_with_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 runs on emulation without AMX tiles (slower than fp16 there), so auto asks the CPU;
    with AMX it takes the 4-bit kernel for narrow steps beside the bf16 copy, where torch has it."""
    import torch

    from engine.weights import cpu_int4, fp16_weights

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(cpu_int4, "available", lambda: True)
    assert load_settings().resolved_quantization("cpu") == "int4+bf16"
    monkeypatch.setattr(cpu_int4, "available", lambda: False)
    assert load_settings().resolved_quantization("cpu") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert load_settings().resolved_quantization("cpu") == ("fp16" if fp16_weights.available() else "none")
    assert load_settings(quantization="bf16").resolved_quantization("cpu") == "bf16"  # explicit wins


@pytest.mark.parametrize(("settings", "device", "expected"), [
    ({}, "cpu", "float32"),  # every CPU quantization keeps float32 activations
    ({"quantization": "bf16"}, "cpu", "float32"),  # not bf16 by default (see resolved_kv_cache_dtype)
    ({}, "cuda", "bfloat16"),  # COMPUTE_DTYPE=auto on CUDA
    ({"compute_dtype": "float32"}, "cuda", "float32"),  # the exact-equality GPU runs keep fp32
    ({"compute_dtype": "float16"}, "cuda:1", "float16"),
    ({"kv_cache_dtype": "bfloat16"}, "cpu", "bfloat16"),  # explicit wins
    ({"kv_cache_dtype": "float32", "compute_dtype": "bfloat16"}, "cuda", "float32"),
])
def test_kv_cache_dtype_auto_is_the_compute_dtype(settings: dict[str, str], device: str, expected: str) -> None:
    assert load_settings(**settings).resolved_kv_cache_dtype(device) == expected
