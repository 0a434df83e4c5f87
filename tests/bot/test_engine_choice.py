"""ENGINE_BACKEND picks the engine where the bot builds it; ENGINE_FACTORY overrides it (tests)."""
from __future__ import annotations

import pytest

from bot.app import build_engine
from bot.config import load_bot_settings
from engine.config import load_settings
from engine.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for name in ("ENGINE_BACKEND", "ENGINE_FACTORY", "VLLM_URLS"):
        monkeypatch.delenv(name, raising=False)


def test_the_default_is_the_local_engine():
    from engine.engine import Engine

    s = load_bot_settings(_env_file=None)
    assert (s.engine_backend, s.engine_factory) == ("local", None)
    assert type(build_engine(s.engine_factory, load_settings(_env_file=None), s.engine_backend)) is Engine


def test_engine_backend_vllm_builds_the_vllm_engine_from_the_vllm_settings(monkeypatch):
    from engine.vllm.engine import VllmEngine

    monkeypatch.setenv("ENGINE_BACKEND", "VLLM")  # names and values are case-insensitive
    monkeypatch.setenv("VLLM_URLS", "http://vllm-1:8000,http://vllm-2:8000")
    s = load_bot_settings(_env_file=None)
    engine = build_engine(s.engine_factory, load_settings(_env_file=None), s.engine_backend)
    assert type(engine) is VllmEngine
    assert engine.vllm.vllm_urls == ("http://vllm-1:8000", "http://vllm-2:8000")


def test_engine_backend_vllm_without_urls_fails_naming_the_setting(monkeypatch):
    monkeypatch.setenv("ENGINE_BACKEND", "vllm")
    s = load_bot_settings(_env_file=None)
    with pytest.raises(ConfigError, match="VLLM_URLS"):
        build_engine(s.engine_factory, load_settings(_env_file=None), s.engine_backend)


@pytest.mark.parametrize(("env", "expected"), [
    ({"ENGINE_BACKEND": "remote"}, "ENGINE_BACKEND"),
    ({"ENGINE_BACKEND": "vllm", "ENGINE_FACTORY": "tests.fakes.engine:factory"}, "set only one"),
])
def test_a_bad_choice_fails_naming_the_variable(monkeypatch, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=expected):
        load_bot_settings(_env_file=None)


def test_engine_factory_still_plugs_any_engine(monkeypatch):
    from tests.fakes.engine import FakeEngine

    monkeypatch.setenv("ENGINE_FACTORY", "tests.fakes.engine:factory")
    s = load_bot_settings(_env_file=None)
    assert type(build_engine(s.engine_factory, None, s.engine_backend)) is FakeEngine
