"""UI strings: every English string has a Russian one with the same placeholders."""
from __future__ import annotations

import string

import pytest

from bot import i18n


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


@pytest.mark.parametrize("lang", [code for code in i18n.LANGUAGES if code != "en"])
def test_every_string_is_translated_with_the_same_placeholders(lang):
    table = i18n._STRINGS[lang]
    missing = sorted(set(i18n._EN) - set(table))
    assert missing == [], f"no {lang} text for {missing}"
    differ = {k: (_fields(i18n._EN[k]), _fields(table[k])) for k in i18n._EN if _fields(i18n._EN[k]) != _fields(table[k])}
    assert differ == {}
