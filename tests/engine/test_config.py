"""Engine settings: read from the environment and `.env`, validated once, named in errors."""
from __future__ import annotations

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
    ({"MAX_NEW_TOKENS": "2048", "CONTEXT_TOKENS": "2048"}, ["MAX_NEW_TOKENS=2048", "CONTEXT_TOKENS=2048"]),
    ({"MAX_NEW_TOKENS": "4000"}, ["MAX_NEW_TOKENS=4000", "CONTEXT_TOKENS=2048"]),
    ({"MAX_NEW_TOKENS": "-1"}, ["MAX_NEW_TOKENS"]),
    ({"MAX_NEW_TOKENS": "0"}, ["MAX_NEW_TOKENS"]),
    ({"MAX_NEW_TOKENS": "many"}, ["MAX_NEW_TOKENS", "'many'"]),
    ({"CONTEXT_TOKENS": "-5"}, ["CONTEXT_TOKENS"]),
    ({"TEMPERATURE": "-0.1"}, ["TEMPERATURE"]),
    ({"TOP_P": "0"}, ["TOP_P"]),
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
    assert (s.resolved_quantization("cpu"), s.resolved_quantization("cuda:0")) == ("none", "nf4")
    assert load_settings(quantization="int8").resolved_quantization("cuda") == "int8"  # explicit wins
    assert s.serving_runtime == "auto"
    assert s.max_new_tokens < s.context_tokens
    assert (s.adapters_dir, s.templates_dir) == (Path("adapters"), Path("templates"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU
    assert s.resolved_device() == "cpu"
    assert torch_dtype(s, "cpu") == torch.float32
    assert load_settings(device="cpu").resolved_device() == "cpu"


def test_config_imports_without_torch() -> None:
    """The bot imports engine.config; it must not drag torch in."""
    code = "import sys, engine.config, engine.errors, engine.types; sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr or "engine.config imported torch"
