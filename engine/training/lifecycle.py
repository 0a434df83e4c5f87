"""The training service's start and close, the same for every engine backend.

An engine offers `/train` only where the training stack imports; closing it never stops the
engine's own close (a failure is logged).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

if TYPE_CHECKING:
    from engine.config import EngineSettings
    from engine.metrics import EngineMetrics
    from engine.training.service import TrainingService

log = logging.getLogger(__name__)


def open_training(settings: "EngineSettings", *, model_id: Any, reload: Callable[[str], Awaitable[Any]],
                  metrics: "EngineMetrics") -> "TrainingService | None":
    """The training service for an engine serving `model_id`; None (logged) where it cannot import."""
    try:
        from engine.training.service import TrainingService
    except ImportError as exc:
        log.warning("training is not available: %s", exc)
        return None
    return TrainingService(settings, model_id=model_id, reload=reload, metrics=metrics)


async def close_training(service: "TrainingService | None") -> None:
    """Stop the running job's watcher; a failure is logged, never raised into the engine's close."""
    if service is None:
        return
    try:
        await service.close()
    except Exception:
        log.exception("closing the training service failed")
