"""`python -m bot` without BOT_TOKEN: the console chat, driven through a pipe like tmux would."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BOT_TOKEN",)}
    env.update(PYTHONPATH=str(REPO), ENGINE_FACTORY="tests.fakes.engine:factory",
               DATABASE_PATH=str(tmp_path / "console.sqlite3"), LANG="C.UTF-8", **extra)
    return env


def _console(tmp_path: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bot"], cwd=tmp_path, env=_env(tmp_path, **extra), text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _read_until(proc: subprocess.Popen, marker: str, timeout: float = 60.0) -> str:
    """Read stdout char by char until `marker` appears (fails after `timeout`)."""
    seen = ""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, f"{marker!r} not seen; output so far: {seen!r}"
        ch = proc.stdout.read(1)
        assert ch, f"stdout closed before {marker!r}; output: {seen!r}; stderr: {proc.stderr.read()}"
        seen += ch
    return seen


def test_a_piped_session_chats_switches_modes_and_exits_on_eof(tmp_path):
    script = "\n".join([
        "/help", "hello there", "/adapter legal", "/role lawyer", "is this binding?", "/mode",
        "/adapter nope", "/reset", "/status", "after reset",
    ]) + "\n"
    proc = subprocess.run([sys.executable, "-m", "bot"], cwd=tmp_path, env=_env(tmp_path), input=script,
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert "/adapter <name>" in out  # help
    assert "bot> [base:assistant] answer to: hello there" in out
    assert "bot> [legal:lawyer] answer to: is this binding?" in out
    assert "no adapter 'nope'" in out
    assert "Quantization: nf4" in out  # status
    assert "bot> [legal:lawyer] answer to: after reset" in out
    assert out.rstrip().endswith("bye")
    db = sqlite3.connect(tmp_path / "console.sqlite3")  # same storage as the bot
    assert db.execute("select adapter, role, conversation from users where id = 0").fetchone() == ("legal", "lawyer", 2)
    db.close()


def test_ctrl_c_stops_a_running_answer_then_ends_the_chat(tmp_path):
    proc = _console(tmp_path, FAKE_ENGINE_DELAY_S="0.05", FAKE_ENGINE_PIECES="2000")
    try:
        _read_until(proc, "Ctrl-D to leave.")
        proc.stdin.write("tell me a long story\n")
        proc.stdin.flush()
        _read_until(proc, "word3")
        proc.send_signal(signal.SIGINT)  # first Ctrl-C: stop the answer
        _read_until(proc, "[stopped]")
        proc.stdin.write("/mode\n")  # the chat goes on
        proc.stdin.flush()
        _read_until(proc, "adapters:")
        proc.send_signal(signal.SIGINT)  # second Ctrl-C, nothing running: leave
        out = _read_until(proc, "bye")
        assert proc.wait(timeout=60) == 0
        assert "word1999" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
