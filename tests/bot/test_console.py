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
    env.update({"PYTHONPATH": str(REPO), "ENGINE_FACTORY": "tests.fakes.engine:factory",
                "DATABASE_PATH": str(tmp_path / "console.sqlite3"), "LANG": "C.UTF-8", **extra})
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
    assert "/adapter [name]" in out  # help
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


# ---- any bytes, no input, Ctrl-C while loading (subprocesses: what a shell or a container does) ----


@pytest.mark.parametrize("lang", ["C", "C.UTF-8"])  # surrogateescape and strict decoding of stdin
def test_binary_input_is_refused_or_answered_never_a_crash(tmp_path, lang):
    stdin = b"\x00\xff\xfe\n" + "caf\xe9 ok?\n".encode("latin-1") + b"still here\n"
    proc = subprocess.run([sys.executable, "-m", "bot"], cwd=tmp_path, env=_env(tmp_path, LANG=lang, LC_ALL=lang),
                          input=stdin, capture_output=True, timeout=120)
    out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "could not read that message" in out  # nothing but undecodable bytes: refused in words
    assert "bot> [base:assistant] answer to: caf\ufffd ok?" in out  # some undecodable: answered
    assert "bot> [base:assistant] answer to: still here" in out
    db = sqlite3.connect(tmp_path / "console.sqlite3")
    questions = [r[0] for r in db.execute("select text from messages where role = 'user' order by id")]
    db.close()
    assert questions == ["caf\ufffd ok?", "still here"]


@pytest.mark.parametrize("stdin", ["", "\n \n"])  # a pipe that ends at once, or with blank lines only
def test_without_a_token_and_without_any_input_the_process_fails_naming_bot_token(tmp_path, stdin):
    proc = subprocess.run([sys.executable, "-m", "bot"], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=120, input=stdin)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "BOT_TOKEN" in proc.stderr and "Traceback" not in proc.stderr


def test_dev_null_is_refused_before_the_engine_is_built(tmp_path):
    # a container without BOT_TOKEN: stdin is /dev/null. The engine cannot even be imported
    # here, so the stdin check must come before anything loads
    proc = subprocess.run([sys.executable, "-m", "bot"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                          env=_env(tmp_path, ENGINE_FACTORY="tests.fakes.nosuch:factory"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "BOT_TOKEN" in proc.stderr and "ENGINE_FACTORY" not in proc.stderr


def test_ctrl_c_while_the_model_loads_exits_with_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "bot"], cwd=tmp_path, env=_env(tmp_path, FAKE_ENGINE_START_S="600"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "fake engine: loading" not in seen:
            line = proc.stderr.readline()
            assert line, f"no loading line; stderr: {seen}"
            seen += line
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 130  # did not wait the 600 s "load" out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in rest
    assert len(rest.strip().splitlines()) == 1 and "interrupted" in rest


# ---- the commands (in-process: the real console on a pipe, the scripted engine) ----------------


async def _session(tmp_path: Path, engine, lines: list[str], monkeypatch, lang: str = "C.UTF-8") -> str:
    """Run the console chat on `lines` piped in; returns what it printed."""
    import io

    from bot.config import BotSettings
    from bot.console import run_console
    from bot.storage import Store

    monkeypatch.setenv("LANG", lang)
    monkeypatch.delenv("LC_ALL", raising=False)
    monkeypatch.delenv("LC_MESSAGES", raising=False)
    read_fd, write_fd = os.pipe()
    os.write(write_fd, ("\n".join(lines) + "\n").encode())
    os.close(write_fd)
    out = io.StringIO()
    store = Store(tmp_path / "console.sqlite3")
    try:
        with open(read_fd, "r", encoding="utf-8") as stdin:
            code = await run_console(BotSettings(_env_file=None), engine, store, stdin=stdin, stdout=out)
    finally:
        store.close()
    assert code == 0
    return out.getvalue()


async def test_adapter_and_role_commands_show_refuse_and_ignore_case(tmp_path, monkeypatch):
    from tests.fakes.engine import FakeEngine

    engine = FakeEngine()
    engine.broken["tax"] = "tax/v1 was trained for another base model"
    out = await _session(tmp_path, engine, [
        "/adapter", "/role", "/adapter tax", "q1", "/adapter LEGAL", "/role Lawyer", "q2", "/ROLE financial analyst",
        "/adapter none", "q3",
    ], monkeypatch)
    assert "adapter: none. Available: finance, legal, medical, none" in out  # bare /adapter: shown, not switched
    assert "role: assistant. Available: assistant, lawyer, doctor, financial_analyst." in out
    assert "tax has no serving version (tax/v1 was trained for another base model)" in out
    assert "bot> [base:assistant] answer to: q1" in out  # the refused switch changed nothing
    assert "bot> [legal:lawyer] answer to: q2" in out
    assert "bot> [base:financial_analyst] answer to: q3" in out
    assert all(c.user.first_name is None for c in engine.calls)  # not the Unix login


async def test_mode_without_adapters_and_questions_that_start_with_a_slash(tmp_path, monkeypatch):
    from tests.fakes.engine import FakeEngine

    engine = FakeEngine(adapters=())
    out = await _session(tmp_path, engine, ["/mode", "/etc/hosts, what is it?", "/stauts", "/frobnicate"], monkeypatch)
    assert "none (or none)" not in out
    assert "adapters: none available: only the base model" in out
    assert "bot> [base:assistant] answer to: /etc/hosts, what is it?" in out
    assert "Unknown command /stauts. Did you mean /status?" in out
    assert "Unknown command /frobnicate. /help lists the commands." in out


async def test_a_cut_answer_is_marked_and_continue_goes_on(tmp_path, monkeypatch):
    from tests.fakes.engine import FakeEngine

    engine = FakeEngine()
    engine.script("The answer stops in the mid", finish_reason="length")
    engine.script("dle of a word.")
    out = await _session(tmp_path, engine, ["/continue", "long question", "/continue"], monkeypatch)
    assert out.index("there is no answer to continue") < out.index("bot> The answer")
    assert "bot> The answer stops in the mid [cut at the length limit; /continue goes on]" in out
    assert "bot> dle of a word.\n" in out
    assert [m.content for m in engine.calls[1].messages] == [
        "long question", "The answer stops in the mid", "Continue.",
    ]


async def test_language_follows_lang_at_first_and_then_the_language_command(tmp_path, monkeypatch):
    from tests.fakes.engine import FakeEngine

    engine = FakeEngine()
    out = await _session(tmp_path, engine, ["/language", "hello", "/language en", "hi"], monkeypatch,
                         lang="ru_RU.UTF-8")
    assert "Чат в терминале" in out and "язык: Русский" in out
    assert [c.user.language for c in engine.calls] == ["ru", "en"]
    out = await _session(tmp_path, engine, ["/language", "again"], monkeypatch, lang="ru_RU.UTF-8")
    assert "language: English" in out  # the stored choice wins over LANG
    assert engine.calls[-1].user.language == "en"


async def test_status_counts_the_consoles_uptime(tmp_path):
    import io

    from bot.config import BotSettings
    from bot.console import Console
    from bot.storage import Store
    from tests.fakes.engine import FakeEngine

    out = io.StringIO()
    store = Store(tmp_path / "console.sqlite3")
    try:
        console = Console(BotSettings(_env_file=None), FakeEngine(), store, out)
        console.started_at -= 3725  # as if it had been running for 1 h 2 min 5 s
        await console.handle("/status")
    finally:
        store.close()
    assert "Uptime: bot 1h 2m 5s" in out.getvalue()


async def test_usage_counts_the_operators_tokens_and_sets_no_limit(tmp_path, monkeypatch):
    from tests.fakes.engine import FakeEngine

    monkeypatch.setenv("TOKENS_PER_DAY", "1")  # a limit for Telegram users; the operator at the terminal has none
    engine = FakeEngine()
    engine.script(pieces=["one ", "two ", "three"])
    engine.script(pieces=["four ", "five"])
    out = await _session(tmp_path, engine, ["first", "second", "/usage"], monkeypatch)
    assert "bot> four five" in out  # not refused
    assert "Today: 5 tokens · no limit" in out and "Admins have no limit." in out
