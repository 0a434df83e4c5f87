"""The scripted engine with the real training service, for bot tests of training faults.

Answers come from tests.fakes.engine (scripted, instant); training is `engine.training`'s
`TrainingService` on a real adapters folder, so /train spawns the real `python -m
engine.train` child, writes the real job log and lock, and a killed bot leaves what it
really leaves. `factory` is an ENGINE_FACTORY for `python -m bot` in a subprocess;
`recording_factory` one whose engine logs the shape of each conversation it is asked to
continue, so a test of a bot process can see what went to the model.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from engine.config import EngineSettings, load_settings
from engine.training import TrainingService
from tests.fakes.engine import FakeEngine

REPO = Path(__file__).resolve().parents[2]
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

log = logging.getLogger(__name__)


def adapters_with_data(folder: Path, domain: str = "legal") -> Path:
    """An adapters folder holding the repo's training data of `domain` (no versions)."""
    shutil.copytree(REPO / "adapters" / domain / "data", folder / domain / "data")
    return folder


class WithTraining(FakeEngine):
    """FakeEngine whose `training` is the real TrainingService of `settings.adapters_dir`."""

    def __init__(self, settings: EngineSettings, **kw: Any) -> None:
        super().__init__(**kw)
        self.service = TrainingService(settings, model_id=MODEL_ID)

    @property
    def training(self) -> Any:
        return self.service

    async def close(self) -> None:
        await self.service.close()
        await super().close()


def training_settings(adapters: Path) -> EngineSettings:
    return load_settings(adapters_dir=adapters, model_cache_dir=REPO / "models")


def factory(settings: EngineSettings | None = None) -> WithTraining:
    """ENGINE_FACTORY target: ADAPTERS_DIR and MODEL_CACHE_DIR from the environment; FAKE_ENGINE_DELAY_S per piece."""
    return WithTraining(settings or load_settings(), default_delay=float(os.environ.get("FAKE_ENGINE_DELAY_S", "0")))


class Recording(FakeEngine):
    """FakeEngine that logs the roles of every conversation it is asked to continue (no text)."""

    def generate(self, messages: list[Any], mode: Any, params: Any = None, *, user: Any = None) -> Any:
        log.info("fake engine asked to continue %s", "/".join(m.role for m in messages))
        return super().generate(messages, mode, params, user=user)


def recording_factory(settings: object = None) -> Recording:
    """ENGINE_FACTORY target: FAKE_ENGINE_DELAY_S per piece, FAKE_ENGINE_PIECES pieces per answer."""
    n = os.environ.get("FAKE_ENGINE_PIECES")
    return Recording(default_delay=float(os.environ.get("FAKE_ENGINE_DELAY_S", "0")),
                     default_pieces=[f" word{i}" for i in range(int(n))] if n else None)
