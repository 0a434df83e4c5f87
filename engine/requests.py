"""A request on its way to the model thread: its prompt, sampling settings and how it ends.

Plain data shared by the engine face, the scheduler and the runtimes; nothing here touches
torch, so the face and the request types import without it.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from engine.types import AuditStamp, GenerationResult


@dataclass
class SamplingSettings:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int | None
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens


@dataclass(eq=False)
class Request:
    """A submitted generation; `emit` is the only way text leaves the model thread."""

    prompt_ids: list[int]
    domain: str | None
    sampling: SamplingSettings
    sink: Callable[[object], None]  # thread-safe: hands an item to the consumer's event loop
    result: GenerationResult
    #: the version of `domain` it asked for (None: whichever serves when it is admitted)
    version: str | None = None
    #: its audit stamp but for the adapter version, which admission fills in
    stamp: AuditStamp | None = None
    submitted: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: object) -> None:
        try:
            self.sink(item)
        except RuntimeError:  # the consumer's event loop is gone: nobody is listening
            self.cancelled.set()


class StreamEnd:
    """Sentinel after the last piece: the result is complete."""
