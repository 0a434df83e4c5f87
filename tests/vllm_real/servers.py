"""Real vLLM servers for the tests: the OpenAI-compatible API server of the venv `make vllm` makes.

Each server is `python -m vllm.entrypoints.openai.api_server` (the `vllm` script of the CPU
package does not start here) on a free loopback port, serving the converted default model
under the name `smollm2`, with runtime LoRA loading, an API key and a small KV cache, so two
of them fit beside the test process on a 2-core, 24 GiB machine (about 3.5 GB each). Each
is pinned to its own core (`VLLM_CPU_OMP_THREADS_BIND`): vLLM binds its OpenMP team to core 0
by default, and two teams spinning on one core starve each other.

A server runs in its own process group (the API server starts an engine core and a worker
process), so `kill()` ends all three at once, as a crash or an OOM kill would, and `stop()`
ends them politely. Output goes to a log file whose tail is quoted when a start fails.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"
SERVED_NAME = "smollm2"
API_KEY = "test-key-7f3a"
MAX_MODEL_LEN = 2048
MAX_LORA_RANK = 8
#: Adapters in one batch (and, --max-cpu-loras unset, kept in memory): the 3 shipped domains, a
#: held candidate and a version being switched in, as docs/deployment.md sizes it. More may be
#: registered (test_more_adapters_than_max_loras_are_accepted_and_each_answers_as_itself).
MAX_LORAS = 5
#: Seconds a start may take: about 30 s alone, longer while two start together on 2 cores.
START_TIMEOUT_S = 300.0


def python() -> Path:
    """The vLLM venv's interpreter: VLLM_PYTHON, else .venv-vllm of this checkout."""
    return Path(os.environ.get("VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")


def unavailable() -> str | None:
    """Why real vLLM servers cannot run here, or None."""
    if not python().is_file():
        return f"no vLLM venv at {python().parent.parent}: run `make vllm` (or `make test-vllm`)"
    if not (MODEL_DIR / "config.json").is_file():
        return f"no converted model at {MODEL_DIR}: run `make setup`"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VllmServer:
    """One vLLM API server (with its engine and worker processes); see the module docstring."""

    name: str
    log_dir: Path
    core: int = 0
    lora: bool = True
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def command(self) -> list[str]:
        cmd = [str(python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL_DIR),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port),
               "--max-model-len", str(MAX_MODEL_LEN), "--api-key", API_KEY]
        if self.lora:
            cmd += ["--enable-lora", "--max-loras", str(MAX_LORAS), "--max-lora-rank", str(MAX_LORA_RANK)]
        return cmd

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("VLLM_")}
        env.update({
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": str(self.core), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        })
        return env

    def start(self) -> None:
        """Start on the same port as before (a restart keeps the replica's URL)."""
        assert not self.running, f"{self.name} is already running"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n==== start {self.starts}: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command(), env=self.environment(), cwd=self.log_dir,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until /health answers 200; RuntimeError with the log's tail if it dies or takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"vLLM server {self.name} exited with {self.proc and self.proc.returncode} "
                                   f"while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vLLM server {self.name} not ready after {timeout:g} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the whole process group: what a crash looks like to its clients."""
        if self.proc is not None:
            _signal_group(self.proc, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s; also reaps a group whose leader already exited."""
        if self.proc is None:
            return
        _signal_group(self.proc, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(self.proc, signal.SIGKILL)  # the engine and worker processes, whatever the leader did
        self.proc.wait(30)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the leader's pid
    except ProcessLookupError:
        pass


def start_all(servers: list[VllmServer]) -> None:
    """Start every server, then wait for all (they load in parallel); on failure stop them all."""
    try:
        for s in servers:
            if not s.running:
                s.start()
        for s in servers:
            s.wait_ready()
    except BaseException:
        for s in servers:
            s.stop()
        raise
