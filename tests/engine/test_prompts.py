"""Role templates (TemplateLibrary) and prompt budgeting (PromptBuilder).

Templates are copied to tmp_path and edited there; the library polls with poll_s=0 so every
call sees the disk. PromptBuilder runs on the real SmolLM2 tokenizer (no model weights).
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import pytest

from engine.errors import InputTooLong, TemplateError, TemplateNotFound
from engine.prompts import SAFE_PROMPTS, PromptBuilder, TemplateLibrary, parse_meta
from engine.types import Message, UserContext

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "templates"
SHIPPED_FILES = sorted(p.name for p in SHIPPED.glob("*.j2"))
TODAY = dt.date(2025, 3, 4)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "templates"
    shutil.copytree(SHIPPED, d)
    return d


@pytest.fixture
def lib(folder: Path) -> TemplateLibrary:
    return TemplateLibrary(folder, poll_s=0)


def rewrite(path: Path, text: str) -> None:
    """Replace a file and force a new mtime, so the change is seen even on coarse clocks."""
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    new = max(old, path.stat().st_mtime_ns) + 5_000_000_000
    os.utime(path, ns=(new, new))


def render(lib: TemplateLibrary, role: str, language: str = "en", first_name: str | None = None) -> str:
    return lib.render_system(role, UserContext(first_name=first_name, language=language, today=TODAY))


# ---- shipped templates ---------------------------------------------------------------

def test_shipped_templates_exist_for_both_languages() -> None:
    roles = {name.split(".")[0] for name in SHIPPED_FILES}
    assert {"assistant", "lawyer", "doctor", "financial_analyst"} <= roles
    for role in roles:
        assert f"{role}.en.j2" in SHIPPED_FILES and f"{role}.ru.j2" in SHIPPED_FILES


def test_shipped_templates_load_without_errors(lib: TemplateLibrary) -> None:
    assert lib.refresh(force=True) == {}
    assert all(r.error is None for r in lib.roles())


@pytest.mark.parametrize("first_name", [None, "Анна", "Ann"])
@pytest.mark.parametrize("name", SHIPPED_FILES)
def test_shipped_template_renders(lib: TemplateLibrary, name: str, first_name: str | None) -> None:
    role, language, _ = name.split(".")
    text = render(lib, role, language, first_name)
    assert text and text == text.strip()
    assert "2025-03-04" in text
    assert "{{" not in text and "{%" not in text and "{#" not in text
    assert "title:" not in text  # the metadata comment is not part of the prompt
    if first_name:
        assert first_name in text
    else:
        assert "Ann" not in text and "None" not in text
    cyrillic = any("\u0400" <= ch <= "\u04ff" for ch in text.replace(first_name or "", ""))
    assert cyrillic == (language == "ru")


@pytest.mark.parametrize(
    "role, title_en, title_ru, adapter",
    [
        ("assistant", "Assistant", "Ассистент", None),
        ("lawyer", "Lawyer", "Юрист", "legal"),
        ("doctor", "Doctor", "Врач", "medical"),
        ("financial_analyst", "Financial analyst", "Финансовый аналитик", "finance"),
    ],
)
def test_metadata_parsed(lib: TemplateLibrary, role: str, title_en: str, title_ru: str, adapter: str | None) -> None:
    info = next(r for r in lib.roles() if r.id == role)
    assert info.title == title_en
    assert info.suggested_adapter == adapter
    assert info.description
    assert info.languages == ("en", "ru")
    ru = lib.variant(role, "ru")
    assert (ru.title, ru.adapter, ru.language) == (title_ru, adapter, "ru")


def test_default_role_listed_first(lib: TemplateLibrary) -> None:
    ids = [r.id for r in lib.roles()]
    assert ids[0] == "assistant"
    assert ids[1:] == sorted(ids[1:])


@pytest.mark.parametrize(
    "source, expected",
    [
        ("{#\ntitle: X\nadapter: legal\n#}\nbody", {"title": "X", "adapter": "legal"}),
        ("{#- Title : Spaced Out -#}body", {"title": "Spaced Out"}),
        ("\n  {#\ndescription: a: b\n#}", {"description": "a: b"}),
        ("{# no key value here #}", {}),
        ("body first {# title: late #}", {}),
        ("", {}),
    ],
)
def test_parse_meta(source: str, expected: dict[str, str]) -> None:
    assert parse_meta(source) == expected


def test_title_defaults_to_role_id(folder: Path, lib: TemplateLibrary) -> None:
    (folder / "tax_advisor.en.j2").write_text("You advise on taxes.", encoding="utf-8")
    info = next(r for r in lib.roles() if r.id == "tax_advisor")
    assert (info.title, info.suggested_adapter, info.description) == ("Tax advisor", None, "")


def test_file_without_language_is_english(folder: Path, lib: TemplateLibrary) -> None:
    (folder / "poet.j2").write_text("You write poems.", encoding="utf-8")
    assert lib.variant("poet", "en").language == "en"
    assert render(lib, "poet", "ru") == "You write poems."


# ---- language fallback and unknown roles --------------------------------------------

@pytest.mark.parametrize("language", ["de", "fr", "", "xx"])
def test_unknown_language_falls_back_to_english(lib: TemplateLibrary, language: str) -> None:
    assert render(lib, "lawyer", language, "Ann") == render(lib, "lawyer", "en", "Ann")


def test_role_without_english_uses_what_exists(folder: Path, lib: TemplateLibrary) -> None:
    (folder / "babushka.ru.j2").write_text("Ты бабушка.", encoding="utf-8")
    assert render(lib, "babushka", "en") == "Ты бабушка."


@pytest.mark.parametrize("role", ["pirate", "Lawyer", "lawyer.en", ""])
def test_unknown_role_lists_known_ones(lib: TemplateLibrary, role: str) -> None:
    with pytest.raises(TemplateNotFound) as err:
        render(lib, role)
    msg = str(err.value)
    assert repr(role) in msg
    for known in ("assistant", "doctor", "financial_analyst", "lawyer"):
        assert known in msg


def test_empty_folder_says_none_known(tmp_path: Path) -> None:
    lib = TemplateLibrary(tmp_path / "missing", poll_s=0)
    assert lib.roles() == []
    with pytest.raises(TemplateNotFound, match="known: none"):
        render(lib, "assistant")


# ---- broken templates ----------------------------------------------------------------

BROKEN = [
    # (id, source, line the error is on, words in the message)
    ("syntax", "{# title: Lawyer #}\nYou are a lawyer.\n{% if first_name %}\nHi\n", 4, "endif"),
    ("bad-tag", "{# title: Lawyer #}\nYou are a lawyer.\n{% iff first_name %}{% endif %}\n", 3, "iff"),
    ("undefined", "{# title: Lawyer #}\nYou are a lawyer.\n{{ frist_name }}\n", 3, "frist_name"),
    ("undefined-attr", "{# title: Lawyer #}\nA\nB\n{{ date.nope }}\n", 4, "nope"),
    ("sandbox", "{# title: Lawyer #}\n{{ ''.__class__.__mro__ }}\n", 2, "unsafe"),
    ("sandbox-globals", "{# title: Lawyer #}\n\n{{ lipsum.__globals__ }}\n", 3, "unsafe"),
]


@pytest.mark.parametrize("case, source, line, words", BROKEN, ids=[c[0] for c in BROKEN])
def test_new_broken_template_reported_with_file_and_line(
    folder: Path, lib: TemplateLibrary, case: str, source: str, line: int, words: str
) -> None:
    path = folder / "broken.en.j2"
    path.write_text(source, encoding="utf-8")
    errors = lib.refresh()
    assert set(errors) == {"broken.en.j2"}
    assert f"{path}, line {line}" in errors["broken.en.j2"]
    assert words in errors["broken.en.j2"]
    # never listed (it has no good version), and a user whose stored mode names it gets the
    # safe prompt of their language instead of an error
    assert "broken" not in {r.id for r in lib.roles()}
    assert render(lib, "broken") == SAFE_PROMPTS["en"]
    assert render(lib, "broken", "ru") == SAFE_PROMPTS["ru"]


@pytest.mark.parametrize("case, source, line, words", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_edit_keeps_last_good_version(
    folder: Path, lib: TemplateLibrary, case: str, source: str, line: int, words: str
) -> None:
    path = folder / "lawyer.en.j2"
    good = render(lib, "lawyer", "en", "Ann")
    rewrite(path, source)
    errors = lib.refresh()
    assert f"{path}, line {line}" in errors["lawyer.en.j2"]
    assert render(lib, "lawyer", "en", "Ann") == good  # the last good version still serves
    info = next(r for r in lib.roles() if r.id == "lawyer")
    assert info.error is not None and "lawyer.en.j2" in info.error
    assert info.title == "Lawyer"
    # other roles and the other language are unaffected
    assert next(r for r in lib.roles() if r.id == "doctor").error is None
    assert "юрист" in render(lib, "lawyer", "ru")

    rewrite(path, "{# title: Barrister\nadapter: legal #}\nYou are a barrister. Today is {{ date }}.")
    assert lib.refresh() == {}
    assert render(lib, "lawyer") == "You are a barrister. Today is 2025-03-04."
    info = next(r for r in lib.roles() if r.id == "lawyer")
    assert (info.title, info.error) == ("Barrister", None)


@pytest.mark.parametrize("source", ["", "  \n", "{# title: Lawyer #}\n{% if false %}x{% endif %}"],
                         ids=["empty", "blank", "renders-nothing"])
def test_a_template_that_renders_nothing_keeps_the_last_good_version(
    folder: Path, lib: TemplateLibrary, source: str
) -> None:
    """An empty file is also what a poll sees of a template caught between truncation and write."""
    path = folder / "lawyer.en.j2"
    good = render(lib, "lawyer", "en", "Ann")
    rewrite(path, source)
    errors = lib.refresh()
    assert "empty system prompt" in errors["lawyer.en.j2"] and str(path) in errors["lawyer.en.j2"]
    assert render(lib, "lawyer", "en", "Ann") == good
    rewrite(path, "You are a barrister.")
    assert lib.refresh() == {} and render(lib, "lawyer") == "You are a barrister."


def test_broken_file_is_reported_once_per_change(folder: Path, lib: TemplateLibrary, caplog) -> None:
    path = folder / "doctor.en.j2"
    rewrite(path, "{{ oops }}")
    with caplog.at_level("ERROR", logger="engine.prompts"):
        lib.refresh()
        lib.refresh()
        lib.roles()
    assert sum("doctor.en.j2" in r.getMessage() for r in caplog.records) == 1
    rewrite(path, "{{ oops2 }}")
    errors = lib.refresh()
    assert "oops2" in errors["doctor.en.j2"]


def test_sandbox_refuses_attribute_access_at_render_time(folder: Path, lib: TemplateLibrary, caplog) -> None:
    """A template that only misbehaves for some users passes the load check; rendering still
    refuses, logs the file, and that user gets the safe prompt of their language."""
    (folder / "sneaky.en.j2").write_text(
        "Hello.{% if first_name == 'Eve' %} {{ ''.__class__.__mro__ }}{% endif %}", encoding="utf-8"
    )
    assert render(lib, "sneaky", first_name="Ann") == "Hello."
    with caplog.at_level("ERROR", logger="engine.prompts"):
        assert render(lib, "sneaky", first_name="Eve") == SAFE_PROMPTS["en"]
    assert any("sneaky.en.j2" in r.getMessage() and "unsafe" in r.getMessage() for r in caplog.records)


def test_broken_template_of_the_users_language_never_serves_another_language(folder: Path) -> None:
    """An English template broken from the start: English users get the safe English prompt,
    not the Russian role text ("Отвечай по-русски"); Russian users keep their template."""
    rewrite(folder / "assistant.en.j2", "{# title: Assistant #}\nYou help. {{ frist_name }}\n")
    lib = TemplateLibrary(folder, poll_s=0)
    english = render(lib, "assistant", "en", "Ann")
    assert english == SAFE_PROMPTS["en"]
    assert not any("а" <= c.lower() <= "я" for c in english)
    assert "ассистент" in render(lib, "assistant", "ru", "Аня").lower()
    # a language with no file of its own falls back to English, here broken: the safe prompt
    # (English, asking for the user's language), never the Russian text
    german = render(lib, "assistant", "de")
    assert german.startswith(SAFE_PROMPTS["en"]) and "(de)" in german
    info = next(r for r in lib.roles() if r.id == "assistant")
    assert info.error and "assistant.en.j2" in info.error


def test_broken_russian_template_gives_the_safe_russian_prompt(folder: Path) -> None:
    rewrite(folder / "lawyer.ru.j2", "{% if %}")
    lib = TemplateLibrary(folder, poll_s=0)
    assert render(lib, "lawyer", "ru") == SAFE_PROMPTS["ru"]
    assert "lawyer" in render(lib, "lawyer", "en").lower()


def test_system_prompt_names_the_variant_and_the_hash_of_its_source(folder: Path) -> None:
    """What an answer's audit stamp records: the file that served (the English one for a German
    user), the sha256 of its source, which changes with an edit; the safe prompt where it broke."""
    import hashlib

    lib = TemplateLibrary(folder, poll_s=0)
    source = (folder / "lawyer.en.j2").read_bytes()
    got = lib.system_prompt("lawyer", UserContext(language="de", today=TODAY))
    assert (got.role, got.language, got.safe) == ("lawyer", "en", False)
    assert got.sha256 == hashlib.sha256(source).hexdigest()
    assert got.text == render(lib, "lawyer", "de")
    assert lib.system_prompt("lawyer", UserContext(language="ru", today=TODAY)).language == "ru"
    rewrite(folder / "lawyer.en.j2", source.decode() + "\nCite the article.\n")
    edited = lib.system_prompt("lawyer", UserContext(language="en", today=TODAY))
    assert edited.sha256 != got.sha256 and not edited.safe
    rewrite(folder / "lawyer.ru.j2", "{% if %}")
    broken = TemplateLibrary(folder, poll_s=0).system_prompt("lawyer", UserContext(language="ru", today=TODAY))
    assert broken.safe and broken.language == "ru" and broken.text == SAFE_PROMPTS["ru"]
    assert broken.sha256 == hashlib.sha256(SAFE_PROMPTS["ru"].encode()).hexdigest()


# ---- render limits: a template cannot stall or flood whoever renders it -----------------

LIMITS = [
    # (id, template source, words in the error)
    ("nested-loops", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "TEMPLATE_RENDER_TIMEOUT_S"),
    ("recursion", "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}",
     "TEMPLATE_RENDER_TIMEOUT_S"),
    ("long-output", "{% for i in range(100000) %}word {% endfor %}", "TEMPLATE_MAX_CHARS"),
    ("repeat", "{{ 'x' * 1000000000 }}", "TEMPLATE_MAX_CHARS"),
    ("pad-filter", "{{ 'x'|center(1000000000) }}", "TEMPLATE_MAX_CHARS"),
    ("pad-method", "{{ 'x'.ljust(1000000000) }}", "TEMPLATE_MAX_CHARS"),
    ("format-width", "{{ '{:>1000000000}'.format(1) }}", "TEMPLATE_MAX_CHARS"),
    ("percent-width", "{{ '%1000000000d' % 1 }}", "TEMPLATE_MAX_CHARS"),
    ("doubling", "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                 "{% endfor %}{{ ns.s|length }}", "TEMPLATE_MAX_CHARS"),
    ("power", "{{ 10 ** 100000000 }}", "too large"),
]


@pytest.mark.parametrize("case, source, words", LIMITS, ids=[c[0] for c in LIMITS])
def test_render_limits_refuse_a_runaway_template_and_keep_the_last_good_version(
    folder: Path, case: str, source: str, words: str
) -> None:
    lib = TemplateLibrary(folder, poll_s=0, render_timeout_s=0.2, max_chars=4000)
    good = render(lib, "lawyer", "en", "Ann")
    path = folder / "lawyer.en.j2"
    rewrite(path, "{# title: Lawyer #}\nYou are a lawyer.\n" + source)
    errors = lib.refresh()
    assert str(path) in errors["lawyer.en.j2"] and words in errors["lawyer.en.j2"]
    assert render(lib, "lawyer", "en", "Ann") == good


def test_a_template_slow_only_for_some_users_falls_back_for_them(folder: Path, caplog) -> None:
    lib = TemplateLibrary(folder, poll_s=0, render_timeout_s=0.2, max_chars=4000)
    (folder / "slow.en.j2").write_text(
        "Hello.{% if first_name == 'Eve' %}{% for i in range(100000) %}{% for j in range(100000) %}"
        "{% endfor %}{% endfor %}{% endif %}", encoding="utf-8")
    assert render(lib, "slow", first_name="Ann") == "Hello."
    with caplog.at_level("ERROR", logger="engine.prompts"):
        assert render(lib, "slow", first_name="Eve") == SAFE_PROMPTS["en"]
    assert any("slow.en.j2" in r.getMessage() and "TEMPLATE_RENDER_TIMEOUT_S" in r.getMessage()
               for r in caplog.records)


def test_bad_file_name_reported(folder: Path, lib: TemplateLibrary) -> None:
    (folder / "Lawyer2.EN.j2").write_text("x", encoding="utf-8")
    errors = lib.refresh()
    assert "Lawyer2.EN.j2" in errors
    assert "<role>.<lang>.j2" in errors["Lawyer2.EN.j2"]


def test_non_utf8_file_reported(folder: Path, lib: TemplateLibrary) -> None:
    (folder / "latin.en.j2").write_bytes("Caf\xe9".encode("latin-1"))
    assert "UTF-8" in lib.refresh()["latin.en.j2"]


# ---- files appearing and disappearing -------------------------------------------------

def test_new_file_picked_up(folder: Path, lib: TemplateLibrary) -> None:
    (folder / "chef.en.j2").write_text("{# title: Chef #}\nYou cook. {{ first_name }}", encoding="utf-8")
    assert render(lib, "chef", first_name="Ann") == "You cook. Ann"
    assert "chef" in {r.id for r in lib.roles()}


def test_removed_file_disappears(folder: Path, lib: TemplateLibrary) -> None:
    en = render(lib, "doctor", "en")
    (folder / "doctor.ru.j2").unlink()
    assert render(lib, "doctor", "ru") == en
    assert next(r for r in lib.roles() if r.id == "doctor").languages == ("en",)
    (folder / "doctor.en.j2").unlink()
    assert "doctor" not in {r.id for r in lib.roles()}
    with pytest.raises(TemplateNotFound):
        render(lib, "doctor")


def test_removed_broken_file_clears_its_error(folder: Path, lib: TemplateLibrary) -> None:
    broken = folder / "broken.en.j2"
    badname = folder / "Bad.j2"
    broken.write_text("{% if %}", encoding="utf-8")
    badname.write_text("x", encoding="utf-8")
    assert set(lib.refresh()) == {"broken.en.j2", "Bad.j2"}
    broken.unlink()
    badname.unlink()
    assert lib.refresh() == {}


def test_poll_interval_limits_disk_checks(folder: Path) -> None:
    lib = TemplateLibrary(folder, poll_s=3600)
    (folder / "chef.en.j2").write_text("You cook.", encoding="utf-8")
    with pytest.raises(TemplateNotFound):
        render(lib, "chef")  # not looked at yet: the poll interval has not passed
    lib.refresh(force=True)
    assert render(lib, "chef") == "You cook."


# ---- PromptBuilder on the real tokenizer -----------------------------------------------



SYSTEM = "You are a careful lawyer. Today is 2025-03-04."


def conversation(turns: int) -> list[Message]:
    """Alternating user/assistant turns of distinct text, ending with the user's."""
    out = []
    for i in range(turns):
        role = "user" if i % 2 == 0 else "assistant"
        out.append(Message(role, f"Turn {i}: " + " ".join(f"word{i}x{j}" for j in range(12))))
    if out[-1].role != "user":
        out.append(Message("user", f"Final question {turns}?"))
    return out


def last_user_start_before(turns: list[Message], index: int) -> int | None:
    return next((i for i in range(index - 1, -1, -1) if turns[i].role == "user"), None)


def check_trim(builder: PromptBuilder, turns: list[Message], max_new: int) -> int:
    """Build and check the invariants; returns how many turns were dropped."""
    budget = builder.context_tokens - max_new
    ids, dropped = builder.build(SYSTEM, turns, max_new)
    assert len(ids) <= budget
    assert ids == builder.encode(SYSTEM, turns[dropped:])
    assert turns[-1].content in builder.tokenizer.decode(ids)
    if dropped:
        assert turns[dropped].role == "user"  # never starts with a dangling answer
        earlier = last_user_start_before(turns, dropped)
        if earlier is not None:  # dropping less would not have fit: only what was needed went
            assert len(builder.encode(SYSTEM, turns[earlier:])) > budget
    return dropped


def test_short_history_kept_whole(tokenizer) -> None:
    turns = conversation(6)
    builder = PromptBuilder(tokenizer, 2048)
    ids, dropped = builder.build(SYSTEM, turns, 256)
    assert dropped == 0
    assert ids == builder.encode(SYSTEM, turns)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n" + SYSTEM)
    assert text.endswith("<|im_start|>assistant\n")  # generation prompt added
    assert all(m.content in text for m in turns)


@pytest.mark.parametrize("context, max_new", [(1024, 256), (512, 128), (400, 150), (300, 64), (256, 128)])
def test_history_trimmed_from_oldest(tokenizer, context: int, max_new: int) -> None:
    turns = conversation(21)
    builder = PromptBuilder(tokenizer, context)
    full = len(builder.encode(SYSTEM, turns))
    assert full > context - max_new  # the case really needs trimming
    dropped = check_trim(builder, turns, max_new)
    assert 0 < dropped < len(turns)


def test_trim_never_starts_with_assistant_turn(tokenizer) -> None:
    """Irregular histories (two answers in a row, answers first) at every budget."""
    turns = [
        Message("assistant", "Welcome! I am the lawyer bot, ask me anything about contracts."),
        Message("user", "What is a contract? " * 5),
        Message("assistant", "A contract is an agreement the law enforces. " * 4),
        Message("assistant", "Also: it needs an offer, acceptance and consideration. " * 3),
        Message("user", "Can a verbal agreement be a contract? " * 3),
        Message("assistant", "Often yes, with exceptions such as land sales. " * 4),
        Message("user", "What about emails?"),
    ]
    builder = PromptBuilder(tokenizer, 4096)
    sizes = [len(builder.encode(SYSTEM, turns[i:])) for i in range(len(turns))]
    seen = set()
    for budget in range(sizes[-1], sizes[0] + 2, 3):
        builder.context_tokens = budget + 64
        seen.add(check_trim(builder, turns, 64))
    assert seen == {0, 1, 4, 6}  # only cuts that start at a user turn


def test_system_and_empty_messages_ignored(tokenizer) -> None:
    builder = PromptBuilder(tokenizer, 2048)
    turns = [Message("system", "IGNORE ME"), Message("user", "hi"), Message("assistant", ""), Message("user", "again")]
    ids, dropped = builder.build(SYSTEM, turns, 100)
    assert dropped == 0
    assert ids == builder.encode(SYSTEM, [Message("user", "hi"), Message("user", "again")])
    assert "IGNORE ME" not in tokenizer.decode(ids)


@pytest.mark.parametrize(
    "turns",
    [[], [Message("user", "q"), Message("assistant", "a")], [Message("user", "")], [Message("system", "s")]],
)
def test_last_message_must_be_users(tokenizer, turns: list[Message]) -> None:
    with pytest.raises(ValueError, match="user"):
        PromptBuilder(tokenizer, 2048).build(SYSTEM, turns, 100)


@pytest.mark.parametrize("history", [0, 4, 9])
def test_input_too_long(tokenizer, history: int) -> None:
    long = Message("user", "Please read this clause carefully. " * 120)
    turns = conversation(history)[:history] + [long] if history else [long]
    builder = PromptBuilder(tokenizer, 512)
    alone = len(builder.encode(SYSTEM, [long]))
    assert alone > 512 - 128
    with pytest.raises(InputTooLong) as err:
        builder.build(SYSTEM, turns, 128)
    msg = str(err.value)
    assert f"{alone} tokens" in msg
    assert "384" in msg and "CONTEXT_TOKENS=512" in msg and "MAX_NEW_TOKENS=128" in msg


def test_newest_turn_fits_exactly(tokenizer) -> None:
    turns = conversation(9)
    builder = PromptBuilder(tokenizer, 4096)
    alone = len(builder.encode(SYSTEM, turns[-1:]))
    builder.context_tokens = alone + 100
    ids, dropped = builder.build(SYSTEM, turns, 100)
    assert len(ids) == alone and dropped == len(turns) - 1
    builder.context_tokens = alone + 99
    with pytest.raises(InputTooLong):
        builder.build(SYSTEM, turns, 100)


def test_long_pasted_message_leaves_the_history_by_its_own_token_budget(tokenizer) -> None:
    """HISTORY_TOKENS: a long paste is answered, then no longer sent with every later question."""
    paste = Message("user", "Please review this contract: " + "clause " * 1200)
    turns = [paste, Message("assistant", "It looks fine."), Message("user", "And the deposit?"),
             Message("assistant", "Two months of rent."), Message("user", "What about pets?")]
    builder = PromptBuilder(tokenizer, 8192, history_tokens=256)
    ids, dropped = builder.build(SYSTEM, turns, 256)
    assert dropped == 2  # the paste and its answer; the history starts with a user turn
    text = tokenizer.decode(ids)
    assert "clause clause" not in text and "And the deposit?" in text and "What about pets?" in text
    # the context alone would have kept everything
    assert PromptBuilder(tokenizer, 8192).build(SYSTEM, turns, 256)[1] == 0
    # the newest message is not limited by the history budget (only by the context)
    ids, dropped = builder.build(SYSTEM, [paste], 256)
    assert dropped == 0 and "clause clause" in tokenizer.decode(ids)
    # 0 = no earlier turns at all
    ids, dropped = PromptBuilder(tokenizer, 8192, history_tokens=0).build(SYSTEM, turns, 256)
    assert dropped == 4 and ids == builder.encode(SYSTEM, turns[-1:])
