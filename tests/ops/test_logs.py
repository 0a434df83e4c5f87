"""Logging: one line per event, text or JSON, user text only with LOG_CONTENT=true."""
from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from bot.config import load_bot_settings
from engine.logs import content, setup_logging, setup_logging_from

SECRET = "my diagnosis is confidential"


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    others = {name: logging.getLogger(name).level for name in ("aiogram.scene", "aiogram.middlewares")}
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    for name, lvl in others.items():
        logging.getLogger(name).setLevel(lvl)
    logging.captureWarnings(False)


def _emit(fmt: str, log_content: bool) -> list[str]:
    out = io.StringIO()
    setup_logging(fmt, log_content, "INFO", stream=out)
    log = logging.getLogger("bot.chat")
    log.info("answer sent to %s", "Ann", extra=content(SECRET, user_id=7, adapter="legal"))
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("turn failed\nafter the first piece")
    return out.getvalue().splitlines()


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("log_content", [False, True])
def test_one_line_per_event_and_content_only_when_allowed(fmt: str, log_content: bool) -> None:
    lines = _emit(fmt, log_content)
    assert len(lines) == 2, lines  # two events, two lines: the traceback stays on its line
    assert (SECRET in lines[0]) is log_content
    assert "Traceback" in lines[1] and "ValueError" in lines[1]
    if fmt == "json":
        first, second = (json.loads(line) for line in lines)
        assert first["msg"] == "answer sent to Ann"
        assert (first["level"], first["logger"], first["user_id"], first["adapter"]) == ("INFO", "bot.chat", 7, "legal")
        if log_content:
            assert first["content"] == SECRET
        else:
            assert "content" not in first and first["content_chars"] == len(SECRET)
        assert second["level"] == "ERROR" and "ValueError: bad\nthing" in second["exc"]
    else:
        assert "INFO bot.chat: answer sent to Ann" in lines[0]
        assert "user_id=7" in lines[0] and "adapter=legal" in lines[0]
        assert (f"content_chars={len(SECRET)}" in lines[0]) is not log_content
        assert "ERROR bot.chat: turn failed\\nafter the first piece" in lines[1]


def test_calling_setup_again_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("text", stream=first)
    setup_logging("json", stream=second)
    logging.getLogger("engine.scheduler").warning("queue full")
    assert first.getvalue() == ""
    assert [json.loads(line)["msg"] for line in second.getvalue().splitlines()] == ["queue full"]


def test_level_filters_and_third_party_debug_is_held_back_without_content() -> None:
    out = io.StringIO()
    setup_logging("text", False, "DEBUG", stream=out)
    logging.getLogger("engine.adapters").debug("loaded legal v2")
    logging.getLogger("aiogram.scene").debug("Push state=%s data=%s to history", "s", {"text": SECRET})
    assert "loaded legal v2" in out.getvalue()
    assert SECRET not in out.getvalue()

    out = io.StringIO()
    setup_logging("text", False, "WARNING", stream=out)
    logging.getLogger("engine.adapters").info("loaded legal v2")
    assert out.getvalue() == ""


@pytest.mark.parametrize("kwargs,setting", [
    ({"fmt": "xml"}, "LOG_FORMAT"),
    ({"level": "LOUD"}, "LOG_LEVEL"),
])
def test_bad_values_name_the_setting(kwargs: dict, setting: str) -> None:
    with pytest.raises(ValueError, match=setting):
        setup_logging(**kwargs)


def test_setup_from_the_bot_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_FORMAT", "JSON")
    monkeypatch.setenv("LOG_CONTENT", "true")
    monkeypatch.setenv("LOG_LEVEL", "warning")
    settings = load_bot_settings(_env_file=None)
    out = io.StringIO()
    setup_logging_from(settings, stream=out)
    logging.getLogger("bot.chat").info("hidden by level")
    logging.getLogger("bot.chat").warning("slow answer", extra=content(SECRET))
    (line,) = out.getvalue().splitlines()
    assert json.loads(line)["content"] == SECRET
