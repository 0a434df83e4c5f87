"""The engine's face: the one interface every front end programs against.

Three things implement it: the local engine (`engine.Engine`: the model in this process),
the vLLM backend (`engine.vllm.VllmEngine`: replicas of vLLM's OpenAI-compatible server)
and the tests' scripted fake (`tests/fakes/engine.py`). `bot/` types its engine as
`EngineFace`, so swapping the backend (ENGINE_BACKEND) changes nothing in the front end.

Structural (a `typing.Protocol`), not a base class: an implementation needs no import from
here, and `isinstance(x, EngineFace)` checks that the members are present. Keep this module
free of torch: `bot/` imports it.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

from engine.metrics import EngineMetrics
from engine.types import (
    EngineStatus, GenerationParams, GenerationResult, Message, Mode, ModeCatalog, ReloadReport, ResidentAdapter,
    UserContext,
)

#: ENGINE_BACKEND -> the 'module:callable' that builds that engine from EngineSettings.
BACKENDS: dict[str, str] = {"local": "engine:Engine", "vllm": "engine.vllm:VllmEngine"}


@runtime_checkable
class TextStream(Protocol):
    """What `generate` returns: an async iterator of text pieces.

    Nothing is submitted until the first `__anext__`, so the engine's refusals (busy, unknown
    adapter or role, too long) are raised there. `result` is complete once iteration ends.
    Leaving early (`aclose()` or `cancel()`) stops the generation and frees what it held.
    """

    result: GenerationResult

    def __aiter__(self) -> "TextStream": ...

    async def __anext__(self) -> str: ...

    async def aclose(self) -> None: ...

    def cancel(self) -> None: ...


@runtime_checkable
class EngineFace(Protocol):
    """See docs/engine-api.md for the contract of each member."""

    #: Prometheus metrics of this engine (its own registry); the ops port exports them.
    metrics: EngineMetrics
    #: The training service (engine/training/service.py), or None where training is not wired.
    training: Any

    async def start(self) -> None:
        """Load what serving needs; raise EngineError when the engine cannot serve at all."""
        ...

    async def close(self) -> None:
        """Stop taking requests, end running streams as cancelled, release everything."""
        ...

    def generate(self, messages: Sequence[Message], mode: Mode, params: GenerationParams | None = None,
                 *, user: UserContext | None = None) -> TextStream:
        """A stream of the answer to `messages` (history + the newest user turn) in `mode`."""
        ...

    def modes(self) -> ModeCatalog:
        """The adapters (with their versions and states) and the roles a user can choose."""
        ...

    async def reload(self, name: str | None = None) -> ReloadReport:
        """Serve the disk's `current` version of one adapter (None: of all, plus the templates)."""
        ...

    def status(self) -> EngineStatus:
        """A snapshot for /status and the health check; `ready` only when it can answer."""
        ...

    async def hold(self, name: str, versions: Sequence[str] = ()) -> tuple[ResidentAdapter, ...]:
        """Keep these versions of adapter `name` resident beside its serving one (an A/B's candidate).

        Declarative: each call replaces the set held for `name`; `()` lets them go (a version no
        request uses is then freed). Returns once every version is ready, with their resident
        entries; AdapterNotFound (not on disk) or AdapterInvalid (failed to load) leaves the
        previous set held. A held version is never evicted to make room and survives `reload`.
        """
        ...
