"""Process-wide logging: one line per event, as text or JSON, without user text by default.

Operators read these lines with `docker logs`, journald or a log shipper; each event is one
line (a traceback is folded into the same line) so grep and shippers never split an event.

User message text is personal data. Code never puts it into the message string; it passes
it as the `content` extra field (`log.info("answer sent", extra=content(text))`). The
`ContentFilter` on the handler replaces that field by its length unless LOG_CONTENT=true,
so one switch decides, for every logger, whether text reaches the log.

Other `extra` fields (user_id, adapter, request_id, ...) are kept: `key=value` after the
message in text form, top-level keys in JSON. Torch-free: the bot and the training process
both call `setup_logging` first thing.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]

#: The `extra` key that carries user text; see `content()`.
CONTENT_FIELD = "content"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__
) | {"message", "asctime", "taskName"}

# Third-party loggers whose DEBUG lines may echo user text (aiogram's scene history dumps
# FSM data); without LOG_CONTENT they are held at INFO whatever LOG_LEVEL says.
_CONTENT_LEAKING_LOGGERS = ("aiogram.scene", "aiogram.middlewares")


def content(text: str | None, **fields: Any) -> dict[str, Any]:
    """The `extra=` mapping for a log call that carries user text (kept only with LOG_CONTENT)."""
    return {CONTENT_FIELD: text, **fields}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class ContentFilter(logging.Filter):
    """Drops user text from records unless allowed; leaves its length so volume stays visible."""

    def __init__(self, allow_content: bool) -> None:
        super().__init__()
        self.allow_content = allow_content

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.allow_content and CONTENT_FIELD in record.__dict__:
            text = record.__dict__.pop(CONTENT_FIELD)
            record.content_chars = len(text) if isinstance(text, str) else 0
        return True


class TextFormatter(logging.Formatter):
    """`2025-01-01T12:00:00.123Z INFO bot.chat: answer sent user_id=5 content_chars=12`."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in extras.items())
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info)
        if record.stack_info:
            line += " | " + self.formatStack(record.stack_info)
        return _one_line(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, extra fields, exc (when any)."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            data.setdefault(key, value)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def _timestamp(record: logging.LogRecord) -> str:
    ts = _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _text_value(value: Any) -> str:
    """`key=value` stays greppable: bare when simple, JSON-quoted when it has spaces or quotes."""
    if isinstance(value, (bool, int, float)) or value is None:
        return str(value)
    text = value if isinstance(value, str) else repr(value)
    if not text or any(c in text for c in ' ="\\'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _one_line(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\\r").replace("\n", "\\n")


_HANDLER_MARK = "_loratg_handler"


def setup_logging(
    fmt: LogFormat | str = "text",
    log_content: bool = False,
    level: str | int = "INFO",
    stream: TextIO | None = None,
) -> logging.Handler:
    """Install the one root handler (replacing a previous call's) and return it.

    The arguments are the LOG_FORMAT (text | json), LOG_CONTENT and LOG_LEVEL settings;
    `setup_logging_from(settings)` reads them off a settings object.
    """
    requested_format, requested_level = fmt, level
    fmt = str(fmt).strip().lower()
    if fmt not in ("text", "json"):
        raise ValueError(f"LOG_FORMAT={requested_format!r}: expected 'text' or 'json'")
    level = logging.getLevelName(level.strip().upper()) if isinstance(level, str) else level
    if not isinstance(level, int):
        raise ValueError(f"LOG_LEVEL={requested_level!r}: expected DEBUG, INFO, WARNING or ERROR")

    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContentFilter(log_content))
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()  # a StreamHandler leaves its stream open
    handler.addFilter(LibraryNoiseFilter())
    root.addHandler(handler)
    root.setLevel(level)
    for name in _CONTENT_LEAKING_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if log_content else max(logging.INFO, level))
    logging.captureWarnings(True)
    if fmt != "text" or not getattr(stream, "isatty", lambda: False)():
        disable_progress_bars()
    adopt_library_logging()
    return handler


# ---- third-party libraries --------------------------------------------------------------------
#
# transformers installs its own stderr handler ("[transformers] ...", never JSON) and stops its
# records from reaching ours; it and huggingface_hub draw tqdm bars ("Loading weights: 100%|...")
# whatever the log format. And library deprecation notices ("`past_key_values` is deprecated")
# are for their developers, not for an operator: printed in the middle of the console's first
# answer they only confuse.

_LIBRARY_PREFIXES = ("transformers", "huggingface_hub", "peft", "accelerate", "bitsandbytes", "datasets",
                     "torch", "trl", "safetensors", "tokenizers")
_DEPRECATION = ("DeprecationWarning", "FutureWarning", "PendingDeprecationWarning", "deprecated")


class LibraryNoiseFilter(logging.Filter):
    """Library deprecation notices, and a library warning already logged once, go out as DEBUG
    (shown only with LOG_LEVEL=DEBUG).

    Why the repeats: some libraries warn on every call of a hot function (bitsandbytes'
    "MatMul8bitLt: inputs will be cast ..." once per layer per decode step with QUANTIZATION=int8
    on a CPU), which buried everything else in the log. The first one still says it.
    """

    #: distinct library warnings remembered; past it, the oldest are forgotten (logged again once)
    MAX_REMEMBERED = 1024

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[tuple[str, str], None] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not self._from_library(record):
            return True
        message = record.getMessage()
        key = (record.name, str(record.msg))
        repeated = key in self._seen
        if not repeated:
            self._seen[key] = None
            if len(self._seen) > self.MAX_REMEMBERED:
                del self._seen[next(iter(self._seen))]
        if not repeated and not any(word in message for word in _DEPRECATION):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)

    @staticmethod
    def _from_library(record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":  # warnings.warn(): the message starts with the file's path
            text = str(record.msg)
            return "site-packages" in text or "dist-packages" in text
        return record.name.split(".", 1)[0] in _LIBRARY_PREFIXES


def disable_progress_bars() -> None:
    """No tqdm bars from the libraries: set before they import, switched off if they already have."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars as hub_off

        hub_off()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def adopt_library_logging() -> None:
    """Send transformers' records through our handler instead of its own (call after importing it).

    A no-op until `setup_logging` has installed our handler, so a library user who never
    called it keeps transformers' defaults.
    """
    if "transformers" not in sys.modules:
        return
    if not any(getattr(h, _HANDLER_MARK, False) for h in logging.getLogger().handlers):
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        hf_logging.disable_progress_bar()


def setup_logging_from(settings: Any, stream: TextIO | None = None) -> logging.Handler:
    """`setup_logging` from any settings object with log_format, log_content and log_level."""
    return setup_logging(
        fmt=getattr(settings, "log_format", "text"),
        log_content=bool(getattr(settings, "log_content", False)),
        level=getattr(settings, "log_level", "INFO"),
        stream=stream,
    )
