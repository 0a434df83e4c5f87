"""Role templates and the prompt they turn into.

A role is a Jinja2 file `templates/<role>.<lang>.j2` (or `<role>.j2` for English) whose
leading comment holds its metadata as `key: value` lines (title, description, adapter).
Templates are rendered in a sandbox with StrictUndefined, so a typo fails loudly instead of
silently producing an empty system prompt. Files are re-read when they change; a template
that fails to parse or render is reported with its file and line and the last good version
stays in use, so an admin editing a template on a live bot cannot break it.
"""
from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from jinja2 import StrictUndefined, TemplateError as JinjaError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import InputTooLong, TemplateError, TemplateNotFound
from engine.types import Message, RoleInfo, UserContext

log = logging.getLogger(__name__)

DEFAULT_ROLE = "assistant"
DEFAULT_LANGUAGE = "en"
_META_RE = re.compile(r"^\s*\{#-?(.*?)-?#\}", re.S)
_FILE_RE = re.compile(r"^(?P<role>[a-z0-9_][a-z0-9_-]*)(?:\.(?P<lang>[a-z]{2,3}))?\.j2$")
_SAMPLE = {"first_name": "Ann", "language": "en", "date": "2025-01-01"}


@dataclass(frozen=True)
class RoleTemplate:
    role: str
    language: str
    path: Path
    stamp: tuple[int, int]  # (mtime_ns, size): what "changed" means
    title: str
    description: str
    adapter: str | None
    template: Any  # jinja2.Template


def parse_meta(source: str) -> dict[str, str]:
    """The leading `{# key: value #}` comment as a dict (empty when there is none)."""
    m = _META_RE.match(source)
    if not m:
        return {}
    meta = {}
    for line in m.group(1).splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            meta[key.strip().lower()] = value.strip()
    return meta


def _error_line(exc: BaseException, filename: str) -> int | None:
    """The template line a render error happened on (jinja rewrites tracebacks to it)."""
    if isinstance(exc, TemplateSyntaxError):
        return exc.lineno
    tb, line = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class TemplateLibrary:
    """All role templates of one folder, refreshed from disk at most every `poll_s` seconds."""

    def __init__(self, folder: Path | str, poll_s: float = 1.0) -> None:
        self.folder = Path(folder)
        self.poll_s = poll_s
        self._env = ImmutableSandboxedEnvironment(
            undefined=StrictUndefined, autoescape=False, trim_blocks=True, lstrip_blocks=True
        )
        self._templates: dict[tuple[str, str], RoleTemplate] = {}
        self._errors: dict[str, str] = {}  # file name -> message, for the last failed load
        self._checked = 0.0
        self._lock = threading.Lock()
        self.refresh(force=True)

    # ---- loading -------------------------------------------------------------------
    def refresh(self, force: bool = False) -> dict[str, str]:
        """Re-read changed files. Returns the current errors by file name."""
        now = time.monotonic()
        if not force and now - self._checked < self.poll_s:
            return dict(self._errors)
        with self._lock:
            self._checked = now
            seen: set[tuple[str, str]] = set()
            files = sorted(self.folder.glob("*.j2")) if self.folder.is_dir() else []
            for path in files:
                m = _FILE_RE.match(path.name)
                if not m:
                    self._errors[path.name] = (
                        f"{path}: file name must be <role>.<lang>.j2 (lowercase role, 2-3 letter language)"
                    )
                    continue
                key = (m.group("role"), m.group("lang") or DEFAULT_LANGUAGE)
                seen.add(key)
                try:
                    st = path.stat()
                except OSError:
                    continue
                stamp = (st.st_mtime_ns, st.st_size)
                old = self._templates.get(key)
                if old is not None and old.stamp == stamp:
                    continue
                if path.name in self._errors and self._errors.get(f"{path.name}#stamp") == str(stamp):
                    continue  # same broken file as last time; already reported
                try:
                    self._templates[key] = self._load(path, key, stamp)
                    self._errors.pop(path.name, None)
                    self._errors.pop(f"{path.name}#stamp", None)
                    if old is not None:
                        log.info("template %s reloaded", path.name)
                except TemplateError as exc:
                    self._errors[path.name] = str(exc)
                    self._errors[f"{path.name}#stamp"] = str(stamp)
                    log.error("%s%s", exc, "; keeping the last good version" if old else "")
            for key in set(self._templates) - seen:
                log.info("template %s.%s.j2 removed", *key)
                del self._templates[key]
            present = {p.name for p in files}
            for name in [n for n in self._errors if n.partition("#")[0] not in present]:
                del self._errors[name]  # a deleted broken file is no longer an error
            return self.errors()

    def errors(self) -> dict[str, str]:
        return {k: v for k, v in self._errors.items() if not k.endswith("#stamp")}

    def _load(self, path: Path, key: tuple[str, str], stamp: tuple[int, int]) -> RoleTemplate:
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateError(f"{path}: cannot read as UTF-8 text: {exc}") from exc
        filename = str(path)
        try:
            code = self._env.compile(source, name=key[0], filename=filename)
            template = self._env.template_class.from_code(self._env, code, self._env.make_globals(None))
        except TemplateSyntaxError as exc:
            raise TemplateError(f"{path}, line {exc.lineno}: {exc.message}") from exc
        meta = parse_meta(source)
        role = RoleTemplate(
            role=key[0], language=key[1], path=path, stamp=stamp,
            title=meta.get("title") or key[0].replace("_", " ").capitalize(),
            description=meta.get("description", ""),
            adapter=meta.get("adapter") or None,
            template=template,
        )
        self._render(role, dict(_SAMPLE, language=key[1]))  # a render error is a load error
        return role

    def _render(self, role: RoleTemplate, variables: dict[str, Any]) -> str:
        try:
            return role.template.render(**variables).strip()
        except JinjaError as exc:
            line = _error_line(exc, str(role.path))
            where = f", line {line}" if line else ""
            raise TemplateError(f"{role.path}{where}: {exc}") from exc
        except Exception as exc:  # the sandbox raises SecurityError and friends too
            raise TemplateError(f"{role.path}: {type(exc).__name__}: {exc}") from exc

    # ---- using ---------------------------------------------------------------------
    def roles(self) -> list[RoleInfo]:
        self.refresh()
        by_role: dict[str, list[RoleTemplate]] = {}
        for (role, _), t in sorted(self._templates.items()):
            by_role.setdefault(role, []).append(t)
        out = []
        for role, variants in by_role.items():
            main = next((t for t in variants if t.language == DEFAULT_LANGUAGE), variants[0])
            errors = [self._errors[t.path.name] for t in variants if t.path.name in self._errors]
            out.append(RoleInfo(
                id=role, title=main.title, description=main.description,
                languages=tuple(t.language for t in variants), suggested_adapter=main.adapter,
                error="; ".join(errors) or None,
            ))
        out.sort(key=lambda r: (r.id != DEFAULT_ROLE, r.id))
        return out

    def variant(self, role: str, language: str) -> RoleTemplate:
        self.refresh()
        for lang in (language, DEFAULT_LANGUAGE):
            t = self._templates.get((role, lang))
            if t is not None:
                return t
        anyv = [t for (r, _), t in self._templates.items() if r == role]
        if anyv:
            return anyv[0]
        known = sorted({r for r, _ in self._templates})
        raise TemplateNotFound(f"no role template {role!r} in {self.folder} (known: {', '.join(known) or 'none'})")

    def render_system(self, role: str, user: UserContext | None = None) -> str:
        user = user or UserContext()
        t = self.variant(role, user.language or DEFAULT_LANGUAGE)
        today = user.today or dt.date.today()
        return self._render(t, {
            "first_name": (user.first_name or "").strip(),
            "language": user.language or DEFAULT_LANGUAGE,
            "date": today.isoformat(),
        })


class PromptBuilder:
    """System prompt + history -> token ids through the tokenizer's chat template.

    History is trimmed from the oldest turns so prompt + answer fit the context budget;
    the newest user turn is never dropped (if it alone does not fit, InputTooLong).
    """

    def __init__(self, tokenizer: Any, context_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.context_tokens = context_tokens

    def encode(self, system: str, messages: Sequence[Message]) -> list[int]:
        chat = ([{"role": "system", "content": system}] if system else []) + [
            {"role": m.role, "content": m.content} for m in messages
        ]
        text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def build(self, system: str, messages: Sequence[Message], max_new_tokens: int) -> tuple[list[int], int]:
        """Token ids of the prompt, and how many old messages were dropped to fit."""
        turns = [m for m in messages if m.role != "system" and m.content]
        if not turns or turns[-1].role != "user":
            raise ValueError("the last message must be the user's")
        budget = self.context_tokens - max_new_tokens
        start = 0
        while True:
            ids = self.encode(system, turns[start:])
            if len(ids) <= budget:
                return ids, start
            if start >= len(turns) - 1:
                raise InputTooLong(
                    f"the message is {len(ids)} tokens with the role prompt; the limit is {budget} "
                    f"(CONTEXT_TOKENS={self.context_tokens} minus MAX_NEW_TOKENS={max_new_tokens})"
                )
            # drop the oldest turn, then any assistant turn left at the front
            start += 1
            while start < len(turns) - 1 and turns[start].role != "user":
                start += 1
