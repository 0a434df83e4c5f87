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
    import os

    env = {k: os.environ.get(k) for k in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS",
                                          "TQDM_DISABLE")}
    yield
    for k, v in env.items():  # setup_logging switches progress bars off process-wide
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
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


def test_a_library_warning_repeated_every_step_is_logged_once_ours_every_time() -> None:
    out = io.StringIO()
    setup_logging("json", False, "INFO", stream=out)
    library = logging.getLogger("bitsandbytes.autograd._functions")
    for _ in range(3):  # what QUANTIZATION=int8 on a CPU does on every layer of every decode step
        library.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
        logging.getLogger("engine.scheduler").warning("queue full")
    library.warning("another library warning")
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["msg"] for e in events if e["logger"].startswith("bitsandbytes")] == [
        "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization",
        "another library warning"]
    assert [e["msg"] for e in events if e["logger"] == "engine.scheduler"] == ["queue full"] * 3

    out = io.StringIO()
    setup_logging("json", False, "DEBUG", stream=out)  # a fresh handler: the first is a WARNING again
    for _ in range(2):
        library.warning("MatMul8bitLt: inputs will be cast")
    assert [json.loads(line)["level"] for line in out.getvalue().splitlines()] == ["WARNING", "DEBUG"]


# ---- third-party libraries: through our handler, no progress bars off a terminal -------------------

LIBRARIES = r"""
import io, json, logging, sys, warnings
from engine.logs import setup_logging
early = sys.argv[1] == "early"  # transformers imported before or after setup_logging
if not early:
    import transformers
setup_logging(sys.argv[2], False, sys.argv[3])
import transformers
from engine.logs import adopt_library_logging
adopt_library_logging()  # what engine.model does after importing transformers
from transformers.utils import logging as hf_logging
import huggingface_hub.utils as hub_utils
hf_logging.get_logger("transformers.modeling_utils").warning("Some weights were not used")
hf_logging.get_logger("transformers.models.llama").warning("`past_key_values` is deprecated; use `cache`")
warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning,
                       "/venv/lib/python3.11/site-packages/transformers/modeling_utils.py", 3312)
warnings.warn_explicit("our own code is about to change", FutureWarning, "/srv/app/engine/model/loader.py", 1)
print(json.dumps({"bars": hf_logging.is_progress_bar_enabled(), "hub_bars": not hub_utils.are_progress_bars_disabled()}))
"""


def _run_libraries(order: str, fmt: str, level: str = "INFO") -> tuple[dict, list[str]]:
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TQDM_", "TRANSFORMERS_"))}
    done = subprocess.run([sys.executable, "-c", LIBRARIES, order, fmt, level], cwd=repo, capture_output=True,
                          text=True, timeout=120, env={**env, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr.splitlines()


@pytest.mark.parametrize("order", ["early", "late"])
def test_library_records_come_through_our_handler_and_deprecations_only_at_debug(order: str) -> None:
    state, lines = _run_libraries(order, "json")
    events = [json.loads(line) for line in lines]  # every line is JSON: no "[transformers] ..." lines
    assert [e["msg"] for e in events if e["logger"] == "transformers.modeling_utils"] == ["Some weights were not used"]
    assert not any("deprecated" in e["msg"] for e in events)  # library deprecation notices: DEBUG only
    assert any("our own code is about to change" in e["msg"] and e["level"] == "WARNING" for e in events)
    assert state == {"bars": False, "hub_bars": False}  # JSON logs: no tqdm bars

    _, debug = _run_libraries(order, "json", "DEBUG")
    deprecations = [json.loads(line) for line in debug if "deprecated" in line]
    assert len(deprecations) == 2 and all(e["level"] == "DEBUG" for e in deprecations)


def test_text_logs_into_a_pipe_draw_no_progress_bars() -> None:
    state, lines = _run_libraries("late", "text")
    assert state == {"bars": False, "hub_bars": False}
    assert all(line[:4].isdigit() for line in lines), lines  # our format only


@pytest.mark.model
def test_the_console_with_json_logs_prints_only_json_and_a_clean_first_answer(tmp_path) -> None:
    """The issue's run: `LOG_FORMAT=json python -m bot`, one question piped in, stderr merged
    into stdout as a terminal shows them. Every line is either the chat or one JSON object (no
    tqdm bar, no "[transformers]" line), and nothing lands inside the first answer."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "adapters").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TQDM_", "TRANSFORMERS_", "LOG_"))}
    env.update({
        "PYTHONPATH": str(repo), "LOG_FORMAT": "json", "MAX_NEW_TOKENS": "8", "TEMPERATURE": "0",
        "TEMPLATES_DIR": str(repo / "templates"), "ADAPTERS_DIR": str(tmp_path / "adapters"),
        "MODEL_CACHE_DIR": str(repo / "models"), "DATABASE_PATH": str(tmp_path / "bot.sqlite3"),
    })
    env.pop("BOT_TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "bot"], cwd=tmp_path, input="hello there\n", env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    chat, logs = [], []
    for line in done.stdout.splitlines():
        try:
            logs.append(json.loads(line))
        except ValueError:
            chat.append(line)
    assert any(e["msg"].startswith("engine ready") for e in logs)
    assert chat[0].startswith("Console chat") and chat[-1] == "bye", chat
    (answer,) = [line for line in chat if line.startswith("bot> ")]
    assert len(answer) > len("bot> ") and len(chat) == 3, chat  # nothing else, nothing inside the answer
