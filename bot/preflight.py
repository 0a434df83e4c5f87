"""Checks that run before aiogram, torch or transformers are imported.

`python -m bot` spends seconds importing aiogram and more loading the model; a wrong setting
found only after that wastes the operator's time (and, under a restart policy, loops). So the
entry point first reads both settings classes, warns about names that look like mistyped
settings, checks the folders and where the model comes from (a hub id that is neither
cached nor on a reachable hub), and only then imports the rest. Everything here imports in
well under a second.
"""
from __future__ import annotations

import logging

from bot.config import BotSettings, load_bot_settings
from engine.config import EngineSettings, load_settings, misspelt_settings
from engine.errors import ConfigError, ModelLoadError
from engine.logs import setup_logging_from
from engine.vllm.config import VllmSettings

log = logging.getLogger(__name__)

#: Exit code for a configuration the process cannot start with.
EXIT_CONFIG = 2


def preflight() -> int | None:
    """None when the process may go on; otherwise the exit code (the reason is logged)."""
    try:
        settings = load_bot_settings()
    except ConfigError as exc:
        setup_logging_from(object())  # text logs: the settings that choose the format are what is broken
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    setup_logging_from(settings)
    known = [*EngineSettings.model_fields, *BotSettings.model_fields, *VllmSettings.model_fields]
    for warning in misspelt_settings(known, complete=True):
        log.warning("%s", warning)
    try:
        engine_settings = load_settings()
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    if settings.engine_factory != BotSettings.model_fields["engine_factory"].default:
        return None  # another engine (the tests' scripted one) checks its own settings
    from engine.model import resolve_source  # light: no torch, no transformers

    problems = []
    for check in (engine_settings.check_folders, lambda: resolve_source(engine_settings)):
        try:
            check()
        except (ConfigError, ModelLoadError) as exc:
            problems.append(str(exc))
    if problems:
        log.error("cannot start: %s", "; ".join(problems))
        return EXIT_CONFIG
    return None
