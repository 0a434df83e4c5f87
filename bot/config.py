"""Front-end settings (Telegram bot and console chat): read once at start, validated, frozen.

Separate from `EngineSettings` because an operator tunes them separately and because this
module must import without torch. Both read the same environment and `.env`.
A bad value stops the start with a message naming the variable, like the engine's settings.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.config import format_validation_error
from engine.errors import ConfigError

IdSet = Annotated[frozenset[int], NoDecode]

#: What @BotFather hands out: the bot's numeric id, a colon, 30+ characters of A-Z a-z 0-9 _ -.
#: Shorter secrets are accepted (test servers and local Bot API servers use them).
TOKEN_RE = re.compile(r"[0-9]{1,20}:[A-Za-z0-9_-]{1,200}")


class BotSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True,
        env_ignore_empty=True,
    )

    bot_token: SecretStr | None = Field(
        None, description="Telegram bot token; unset = console chat in the terminal."
    )
    admin_ids: IdSet = Field(
        frozenset(), description="Comma-separated Telegram user ids allowed to use admin commands."
    )
    allowed_user_ids: IdSet = Field(
        frozenset(), description="Comma-separated Telegram user ids allowed to chat; empty = everyone."
    )
    allow_guests: bool = Field(
        False, description="With ALLOWED_USER_IDS set, users not on it may chat too, within the guest budgets."
    )
    database_path: Path = Field(Path("data/bot.sqlite3"), description="SQLite file of users and history.")

    tokens_per_day: int = Field(
        0, ge=0, description="Generated tokens a user may use per day; 0 = unlimited (admins are never limited)."
    )
    tokens_per_month: int = Field(0, ge=0, description="Generated tokens a user may use per month; 0 = unlimited.")
    guest_tokens_per_day: int | None = Field(
        None, ge=0, description="TOKENS_PER_DAY for guests (ALLOW_GUESTS); unset = the same as everyone's."
    )
    guest_tokens_per_month: int | None = Field(
        None, ge=0, description="TOKENS_PER_MONTH for guests; unset = the same as everyone's."
    )
    budget_timezone: str = Field(
        "UTC", description="IANA time zone whose midnight and first of the month start a new budget period "
        "(e.g. Europe/Moscow); also the days of /stats."
    )

    bot_api_url: str | None = Field(
        None, description="Another Bot API server (a local telegram-bot-api, or the tests' fake)."
    )
    webhook_url: str | None = Field(
        None, description="Public HTTPS URL Telegram posts updates to; unset = long polling."
    )
    webhook_secret: SecretStr | None = Field(
        None, description="Secret Telegram sends in X-Telegram-Bot-Api-Secret-Token (1-256 of A-Za-z0-9_-)."
    )
    webhook_host: str = Field("0.0.0.0", description="Interface the webhook server listens on.")
    webhook_port: int = Field(8080, ge=1, le=65535, description="Port the webhook server listens on.")
    webhook_path: str | None = Field(
        None, description="Path the webhook server answers on; unset = the path of WEBHOOK_URL."
    )

    rate_limit_messages: int = Field(
        20, ge=0, description="Messages a user may send per RATE_LIMIT_WINDOW_S; 0 = no limit."
    )
    rate_limit_window_s: float = Field(60.0, gt=0, description="Window of the per-user rate limit, seconds.")
    max_pending_per_user: int = Field(
        3, ge=0, description="Messages queued behind a user's running answer before they are told to wait."
    )
    history_turns: int = Field(
        24, ge=1, le=1000, description="Recent turns sent to the engine (it trims further to the context)."
    )

    stream_edit_interval_s: float = Field(
        1.0, ge=0.0, le=60.0, description="Minimum time between edits of messages in one chat (Telegram: ~1/s)."
    )
    telegram_retry_for_s: float = Field(
        600.0, ge=0.0, le=86400.0,
        description="How long an answer's final text keeps being retried while Telegram is unreachable (5xx, no "
        "network), seconds; the answer is saved either way.",
    )
    telegram_backoff_max_s: float = Field(
        5.0, gt=0.0, le=300.0,
        description="Longest wait between two attempts to reach Telegram: the answer lands this soon after it returns.",
    )
    telegram_sends_per_s: float = Field(
        30.0, ge=0.0, le=1000.0,
        description="Messages sent or edited per second over all chats (Telegram allows about 30); 0 = no limit.",
    )
    shutdown_grace_s: float = Field(
        4.0, ge=0.0, le=600.0, description="On SIGTERM, how long running answers may finish before they are cancelled."
    )
    engine_backend: Literal["local", "vllm"] = Field(
        "local", description="Where answers are generated: local (the model in this process) or vllm (VLLM_URLS).",
    )
    engine_factory: str | None = Field(
        None,
        description="'module:callable' building the engine from EngineSettings; unset = ENGINE_BACKEND's engine "
        "(tests plug a scripted engine here).",
    )

    ops_host: str = Field("0.0.0.0", description="Interface of the ops side port (/healthz, /metrics).")
    ops_port: int | None = Field(None, ge=0, le=65535, description="Ops side port; unset = no ops server.")

    log_format: Literal["text", "json"] = Field("text", description="text or json (one object per line).")
    log_content: bool = Field(False, description="Log user message text (off by default: privacy).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO")

    @field_validator("admin_ids", "allowed_user_ids", mode="before")
    @classmethod
    def _ids(cls, v: object) -> object:
        if isinstance(v, str):
            parts = [p.strip() for p in v.replace(";", ",").split(",") if p.strip()]
            try:
                return frozenset(int(p) for p in parts)
            except ValueError:
                raise ValueError(f"expected comma-separated integer Telegram ids like '123,456', got {v!r}")
        if isinstance(v, int):
            return frozenset({v})
        return v

    @field_validator("bot_token")
    @classmethod
    def _token(cls, v: SecretStr | None) -> SecretStr | None:
        """Checked with the other settings, so a typo stops the start before the model loads."""
        if v is None:
            return None
        token = v.get_secret_value().strip()
        if not token:
            return None
        if not TOKEN_RE.fullmatch(token):
            # never echo the secret; say what is wrong with its shape
            problems = []
            if ":" not in token:
                problems.append("it has no ':'")
            elif not token.partition(":")[0].isdigit():
                problems.append("the part before ':' is not the bot's numeric id")
            if any(c.isspace() for c in token):
                problems.append("it contains blanks or quotes" if any(c in "'\"" for c in token) else
                                "it contains blanks")
            elif any(c in "'\"" for c in token):
                problems.append("it contains quotes")
            detail = "; ".join(problems) or "it has characters other than A-Z, a-z, 0-9, _ and - after ':'"
            raise ValueError(
                f"expected the token @BotFather gave you, like 123456789:AAH4aBcD... ({len(token)} characters "
                f"given; {detail})"
            )
        return SecretStr(token)

    @field_validator("log_format", "engine_backend", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.strip().upper() if isinstance(v, str) else v

    @field_validator("budget_timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        v = v.strip()
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"expected an IANA time zone like 'UTC' or 'Europe/Moscow', got {v!r}") from None
        return v

    @field_validator("engine_factory")
    @classmethod
    def _factory(cls, v: str | None) -> str | None:
        if v is None:
            return None
        module, sep, attr = v.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"expected 'module:callable', got {v!r}")
        return v

    @field_validator("webhook_url", "bot_api_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"expected an http(s):// URL, got {v!r}")
        return v.strip()

    @model_validator(mode="after")
    def _one_engine_choice(self) -> "BotSettings":
        if self.engine_factory is not None and self.engine_backend != "local":
            raise ValueError(f"ENGINE_FACTORY={self.engine_factory} and ENGINE_BACKEND={self.engine_backend} both "
                             "choose the engine; set only one")
        return self

    @model_validator(mode="after")
    def _secret(self) -> "BotSettings":
        secret = self.webhook_secret.get_secret_value() if self.webhook_secret else None
        if secret is not None:
            ok = 1 <= len(secret) <= 256 and all(c.isalnum() or c in "_-" for c in secret)
            if not ok:
                raise ValueError("WEBHOOK_SECRET must be 1-256 characters of A-Z, a-z, 0-9, _ and -")
        return self

    @property
    def token(self) -> str | None:
        return self.bot_token.get_secret_value() if self.bot_token else None

    def is_admin(self, user_id: int | None) -> bool:
        return user_id is not None and user_id in self.admin_ids

    def may_chat(self, user_id: int | None) -> bool:
        if user_id is None:
            return False
        return (not self.allowed_user_ids or self.allow_guests or user_id in self.allowed_user_ids
                or self.is_admin(user_id))

    def is_guest(self, user_id: int | None) -> bool:
        """Chats only because ALLOW_GUESTS lets people off the allowlist in (the guest budgets apply)."""
        return (user_id is not None and bool(self.allowed_user_ids) and user_id not in self.allowed_user_ids
                and not self.is_admin(user_id))


_SECRETS = ("bot_token", "webhook_secret")


def _describe(exc: ValidationError) -> str:
    """format_validation_error, without ever showing the value of a secret."""
    secret = [e for e in exc.errors() if e.get("loc") and str(e["loc"][0]) in _SECRETS]
    if not secret:
        return format_validation_error(exc)
    parts = [f"{str(e['loc'][0]).upper()}: {e.get('msg', 'invalid')}" for e in secret]
    others = [e for e in exc.errors() if e not in secret]
    if others:
        rest = ValidationError.from_exception_data(exc.title, others)  # type: ignore[arg-type]
        parts.append(format_validation_error(rest))
    return "; ".join(parts)


def load_bot_settings(**overrides: object) -> BotSettings:
    """Read settings once; raise ConfigError naming each bad variable."""
    try:
        return BotSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(f"invalid bot settings: {_describe(exc)}") from exc
