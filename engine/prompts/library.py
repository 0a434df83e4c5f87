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
import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from jinja2 import StrictUndefined, TemplateError as JinjaError, TemplateSyntaxError

from engine.errors import ConfigError, EngineError, InputTooLong, TemplateError, TemplateNotFound
from engine.prompts.limits import LimitedSandbox, RenderLimit, limits, render_limited
from engine.types import Message, RoleInfo, UserContext

if TYPE_CHECKING:
    from engine.config import EngineSettings

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
    sha256: str = ""  # of the file's source: what an answer's audit stamp names


@dataclass(frozen=True)
class SystemPrompt:
    """A rendered system prompt and which template source produced it (an answer's audit stamp).

    `language` is the variant's language, which is not the user's when their language has no
    file; where the template could not serve (broken, or failed for this user), `safe` is True,
    `language` is the safe prompt's and `sha256` is the safe prompt's text hash.
    """

    text: str
    role: str
    language: str
    sha256: str
    safe: bool = False


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


#: The prompt a user gets when their language's template of a role is broken and has no last
#: good version: plain, safe, and in their language, never another language's role text.
SAFE_PROMPTS = {
    "en": "You are a helpful assistant. Answer clearly and briefly.",
    "ru": "Ты — полезный ассистент. Отвечай по-русски, ясно и кратко.",
}


def safe_prompt(language: str) -> str:
    """The safe prompt in `language`; for a language without one, English that asks for it."""
    if language in SAFE_PROMPTS:
        return SAFE_PROMPTS[language]
    return f"{SAFE_PROMPTS[DEFAULT_LANGUAGE]} Answer in the user's language ({language})."


class TemplateLibrary:
    """All role templates of one folder, refreshed from disk at most every `poll_s` seconds.

    Rendering runs under a time and size budget (`engine.prompts.limits`), at load (the test
    render) and for every request, so a template that loops or grows without end is refused
    with its file instead of stalling whoever renders it. The engine renders off its event
    loop and refreshes from a poller thread (`start_polling`), so no disk read or render ever
    runs on the loop.
    """

    def __init__(self, folder: Path | str, poll_s: float = 1.0, *, render_timeout_s: float = 0.5,
                 max_chars: int = 16000) -> None:
        self.folder = Path(folder)
        self.poll_s = poll_s
        self.render_timeout_s = render_timeout_s
        self.max_chars = max_chars
        self._env = LimitedSandbox(
            undefined=StrictUndefined, autoescape=False, trim_blocks=True, lstrip_blocks=True
        )
        self._templates: dict[tuple[str, str], RoleTemplate] = {}
        self._errors: dict[str, str] = {}  # file name -> message, for the last failed load
        self._broken: dict[tuple[str, str], str] = {}  # (role, language) whose file fails now -> message
        self._reported: set[str] = set()  # request-time render errors already logged
        self._checked = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.refresh(force=True)

    # ---- loading -------------------------------------------------------------------
    def refresh(self, force: bool = False) -> dict[str, str]:
        """Re-read changed files. Returns the current errors by file name."""
        now = time.monotonic()
        if not force and now - self._checked < self.poll_s:
            return self.errors()
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
                    self._broken.pop(key, None)
                    if old is not None:
                        log.info("template %s reloaded", path.name)
                except TemplateError as exc:
                    self._errors[path.name] = str(exc)
                    self._errors[f"{path.name}#stamp"] = str(stamp)
                    self._broken[key] = str(exc)
                    fallback = "keeping the last good version" if old else \
                        f"users of {key[0]} in '{key[1]}' get a plain safe prompt in that language"
                    log.error("%s; %s", exc, fallback)
            for key in set(self._templates) - seen:
                log.info("template %s.%s.j2 removed", *key)
                del self._templates[key]
            for key in set(self._broken) - seen:
                del self._broken[key]
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
            with limits(self.render_timeout_s, self.max_chars):  # compiling folds constants
                code = self._env.compile(source, name=key[0], filename=filename)
            template = self._env.template_class.from_code(self._env, code, self._env.make_globals(None))
        except TemplateSyntaxError as exc:
            raise TemplateError(f"{path}, line {exc.lineno}: {exc.message}") from exc
        except RenderLimit as exc:
            raise TemplateError(f"{path}: {exc}") from exc
        meta = parse_meta(source)
        role = RoleTemplate(
            role=key[0], language=key[1], path=path, stamp=stamp,
            title=meta.get("title") or key[0].replace("_", " ").capitalize(),
            description=meta.get("description", ""),
            adapter=meta.get("adapter") or None,
            template=template,
            sha256=hashlib.sha256(source.encode("utf-8")).hexdigest(),
        )
        # a render error is a load error; so is an empty prompt, which is also what a poll sees
        # of a file caught between its truncation and its write (the last good version stays)
        if not self._render(role, dict(_SAMPLE, language=key[1])):
            raise TemplateError(f"{path}: renders an empty system prompt; write the role's instructions "
                                "in it, or delete the file")
        return role

    def _render(self, role: RoleTemplate, variables: dict[str, Any]) -> str:
        try:
            return render_limited(role.template, variables, self.render_timeout_s, self.max_chars).strip()
        except RenderLimit as exc:
            raise TemplateError(f"{role.path}: {exc}") from exc
        except JinjaError as exc:
            line = _error_line(exc, str(role.path))
            where = f", line {line}" if line else ""
            raise TemplateError(f"{role.path}{where}: {exc}") from exc
        except Exception as exc:  # the sandbox raises SecurityError and friends too
            raise TemplateError(f"{role.path}: {type(exc).__name__}: {exc}") from exc

    # ---- polling -------------------------------------------------------------------
    def start_polling(self) -> None:
        """Refresh from a daemon thread every `poll_s` (at least 0.2 s), so users never wait on disk."""
        if self._poller is not None:
            return

        def poll() -> None:
            while not self._stop.wait(max(self.poll_s, 0.2)):
                try:
                    self.refresh(force=True)
                except Exception:  # a poller that dies silently would freeze the templates
                    log.exception("refreshing the templates in %s failed", self.folder)

        self._poller = threading.Thread(target=poll, name="template-poller", daemon=True)
        self._poller.start()

    def stop_polling(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
            self._poller = None

    # ---- using ---------------------------------------------------------------------
    def roles(self, refresh: bool = True) -> list[RoleInfo]:
        """The roles that have at least one good template (`refresh=False`: no disk access)."""
        if refresh:
            self.refresh()
        by_role: dict[str, list[RoleTemplate]] = {}
        for (role, _), t in sorted(self._templates.items()):
            by_role.setdefault(role, []).append(t)
        out = []
        for role, variants in by_role.items():
            main = next((t for t in variants if t.language == DEFAULT_LANGUAGE), variants[0])
            errors = [msg for (r, _), msg in sorted(self._broken.items()) if r == role]
            out.append(RoleInfo(
                id=role, title=main.title, description=main.description,
                languages=tuple(t.language for t in variants), suggested_adapter=main.adapter,
                error="; ".join(errors) or None,
            ))
        out.sort(key=lambda r: (r.id != DEFAULT_ROLE, r.id))
        return out

    def variant(self, role: str, language: str) -> RoleTemplate:
        """The template for a user of `language`: theirs, else English, else any that exists.

        TemplateError when the file that should serve them is broken and has no last good
        version (`render_system` then uses the safe prompt of their language).
        """
        choice = self._choose(role, language)
        if isinstance(choice, RoleTemplate):
            return choice
        raise TemplateError(self._broken.get((role, choice)) or self._broken.get((role, language)) or
                            f"role template {role!r} is broken")

    def _choose(self, role: str, language: str) -> RoleTemplate | str:
        """A template, or the language whose safe prompt stands in for a broken one."""
        self.refresh()
        templates, broken = dict(self._templates), dict(self._broken)
        for lang in dict.fromkeys((language, DEFAULT_LANGUAGE)):
            t = templates.get((role, lang))
            if t is not None:
                return t
            if (role, lang) in broken:
                return language  # the file meant for them is broken: never another language's text
        anyv = [t for (r, _), t in sorted(templates.items()) if r == role]
        if anyv:
            return anyv[0]
        if any(r == role for r, _ in broken):
            return language
        known = sorted({r for r, _ in templates})
        raise TemplateNotFound(f"no role template {role!r} in {self.folder} (known: {', '.join(known) or 'none'})")

    def render_system(self, role: str, user: UserContext | None = None) -> str:
        """The system prompt for `role` and this user (`system_prompt` says more)."""
        return self.system_prompt(role, user).text

    def system_prompt(self, role: str, user: UserContext | None = None) -> SystemPrompt:
        """The system prompt for `role` and this user, with the template it came from; slow or
        blocking (disk, render): call it off the event loop. A template that fails for these
        values falls back to the safe prompt of the user's language, and the failure is logged once."""
        user = user or UserContext()
        language = user.language or DEFAULT_LANGUAGE
        t = self._choose(role, language)
        if not isinstance(t, RoleTemplate):
            return _safe(role, t)
        today = user.today or dt.date.today()
        try:
            text = self._render(t, {
                "first_name": (user.first_name or "").strip(),
                "language": language,
                "date": today.isoformat(),
            })
        except TemplateError as exc:
            if str(exc) not in self._reported:
                if len(self._reported) > 1000:  # bounded: messages may differ per user
                    self._reported.clear()
                self._reported.add(str(exc))
                log.error("%s; answering with the safe prompt in '%s'", exc, language)
            return _safe(role, language)
        return SystemPrompt(text, role, t.language, t.sha256)


def _safe(role: str, language: str) -> SystemPrompt:
    text = safe_prompt(language)
    return SystemPrompt(text, role, language, hashlib.sha256(text.encode("utf-8")).hexdigest(), safe=True)


class PromptBuilder:
    """System prompt + history -> token ids through the tokenizer's chat template.

    Earlier turns get a token budget of their own (`history_tokens`, HISTORY_TOKENS): a long
    pasted message is answered once and then drops out of what is sent, instead of making
    every later answer slow until /new. Then history is trimmed from the oldest turns so
    prompt + answer fit the context budget; the newest user turn is never dropped (if it
    alone does not fit, InputTooLong).
    """

    def __init__(self, tokenizer: Any, context_tokens: int, history_tokens: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.context_tokens = context_tokens
        self.history_tokens = history_tokens

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
        start = self._history_start(turns)
        while True:
            ids = self.encode(system, turns[start:])
            if len(ids) <= budget:
                return ids, start
            if start >= len(turns) - 1:
                raise InputTooLong(
                    f"the message is {len(ids)} tokens with the role prompt; the limit is {budget} "
                    f"(CONTEXT_TOKENS={self.context_tokens} minus MAX_NEW_TOKENS={max_new_tokens})"
                )
            start = _next_start(turns, start)

    def _history_start(self, turns: list[Message]) -> int:
        """The first turn to send so the earlier turns fit `history_tokens` (newest kept first)."""
        if self.history_tokens is None or len(turns) == 1:
            return 0
        sizes = [len(ids) for ids in self.tokenizer([m.content for m in turns[:-1]],
                                                     add_special_tokens=False)["input_ids"]]
        start = 0
        while start < len(turns) - 1 and sum(sizes[start:]) > self.history_tokens:
            start = _next_start(turns, start)
        return start


def _next_start(turns: list[Message], start: int) -> int:
    """Drop the oldest turn, then any assistant turn left at the front (history starts with the user)."""
    start += 1
    while start < len(turns) - 1 and turns[start].role != "user":
        start += 1
    return start


def load_templates(settings: "EngineSettings") -> TemplateLibrary:
    """The role templates with TEMPLATES_DIR, TEMPLATE_POLL_S and their render limits, as every
    backend serves them; ConfigError when not one role can be rendered (reads disk: off the loop)."""
    library = TemplateLibrary(settings.templates_dir, settings.template_poll_s,
                              render_timeout_s=settings.template_render_timeout_s,
                              max_chars=settings.template_max_chars)
    if not library.roles(refresh=False):
        errors = "; ".join(library.errors().values()) or "no *.j2 files"
        raise ConfigError(f"TEMPLATES_DIR={str(settings.templates_dir)!r}: no role template can be rendered ({errors})")
    return library


class PromptMaker:
    """(role, user, history) -> prompt token ids, the same for every backend: the role's system
    prompt, then `PromptBuilder` with CONTEXT_TOKENS and HISTORY_TOKENS. One construction, so the
    local engine and the vLLM backend cannot drift apart. Renders and tokenizes: call it off the
    event loop, one call at a time per tokenizer."""

    def __init__(self, templates: TemplateLibrary, tokenizer: Any, settings: "EngineSettings") -> None:
        self.templates = templates
        self.builder = PromptBuilder(tokenizer, settings.context_tokens, settings.history_tokens)

    def build(self, role: str, user: UserContext | None, messages: Sequence[Message],
              max_new_tokens: int) -> tuple[list[int], int]:
        """Token ids of the prompt and how many old turns were dropped; EngineError for a history
        that cannot be sent (InputTooLong when the newest message alone is too long)."""
        built = self.build_prompt(role, user, messages, max_new_tokens)
        return built.ids, built.trimmed_turns

    def build_prompt(self, role: str, user: UserContext | None, messages: Sequence[Message],
                     max_new_tokens: int) -> "BuiltPrompt":
        """As `build`, with the system prompt's template (for the answer's audit stamp)."""
        system = self.templates.system_prompt(role, user)
        try:
            ids, trimmed = self.builder.build(system.text, messages, max_new_tokens)
        except ValueError as exc:
            raise EngineError(str(exc)) from exc
        return BuiltPrompt(ids, trimmed, system)


@dataclass(frozen=True)
class BuiltPrompt:
    ids: list[int]
    trimmed_turns: int
    system: SystemPrompt


def end_token_ids(tokenizer: Any, config_eos: int | Sequence[int] | None = None) -> list[int]:
    """The ids that end an answer, for every backend: the tokenizer's EOS, the model's generation
    config's (`config_eos`: one id or several) and the chat templates' end markers it knows."""
    ids = {tokenizer.eos_token_id}
    ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    for special in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if isinstance(i, int))
