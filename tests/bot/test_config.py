"""BotSettings: parsing, and start-up errors that name the variable."""
from __future__ import annotations

import subprocess
import sys

import pytest

from bot.config import load_bot_settings
from engine.errors import ConfigError


def test_defaults_work_without_any_environment():
    s = load_bot_settings(_env_file=None)
    assert s.token is None  # console chat
    assert s.admin_ids == frozenset() and s.allowed_user_ids == frozenset()
    assert s.stream_edit_interval_s == 1.0 and s.ops_port is None


def test_values_come_from_the_environment_and_dotenv(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("BOT_TOKEN=1:abc\nADMIN_IDS=5\n")
    monkeypatch.setenv("ALLOWED_USER_IDS", " 1, 2 ;3 ")
    monkeypatch.setenv("OPS_PORT", "")  # empty = unset
    s = load_bot_settings()
    assert s.token == "1:abc" and "1:abc" not in repr(s)  # the token is a secret
    assert s.admin_ids == {5} and s.allowed_user_ids == {1, 2, 3}
    assert s.ops_port is None
    assert s.may_chat(5) and s.may_chat(2) and not s.may_chat(9)  # admins may always chat


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("ADMIN_IDS", "12,abc", "ADMIN_IDS"),
    ("ALLOWED_USER_IDS", "x", "ALLOWED_USER_IDS"),
    ("OPS_PORT", "70000", "OPS_PORT"),
    ("STREAM_EDIT_INTERVAL_S", "-1", "STREAM_EDIT_INTERVAL_S"),
    ("LOG_FORMAT", "xml", "LOG_FORMAT"),
    ("LOG_LEVEL", "loud", "LOG_LEVEL"),
    ("WEBHOOK_URL", "ftp://x", "WEBHOOK_URL"),
    ("WEBHOOK_SECRET", "has spaces", "WEBHOOK_SECRET"),
    ("ENGINE_FACTORY", "no_colon", "ENGINE_FACTORY"),
    ("RATE_LIMIT_WINDOW_S", "0", "RATE_LIMIT_WINDOW_S"),
])
def test_a_bad_value_fails_naming_the_variable(monkeypatch, variable, value, expected):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as err:
        load_bot_settings(_env_file=None)
    assert expected in str(err.value)


def test_main_exits_2_with_the_variable_named(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bot"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "ADMIN_IDS": "oops", "PYTHONPATH": str(_repo())},
    )
    assert proc.returncode == 2
    assert "ADMIN_IDS" in proc.stderr


def test_the_front_end_imports_without_torch():
    code = ("import sys, bot.app, bot.console, bot.handlers, bot.storage, bot.streaming; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=_repo(), timeout=120)


def _repo():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]
