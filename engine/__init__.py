"""The engine: one quantized base model, hot-swapped LoRA adapters, role templates.

Importing `engine` does not import torch; `Engine` loads the heavy parts on `start()`. It
does bound OpenMP's spinning (GOMP_SPINCOUNT, unless the operator set a wait policy), which
must happen before torch loads
(`engine.serving.threads.default_wait_policy`).
"""
from engine.serving import threads as _threads

_threads.default_wait_policy()
from engine.types import *  # noqa: F401,F403  (the data types front ends may use)
from engine.errors import *  # noqa: F401,F403
from engine.face import EngineFace, TextStream  # noqa: F401  (the interface every backend implements)


def __getattr__(name: str):  # lazy, so `import engine` stays light
    if name == "Engine":
        from engine.engine import Engine

        return Engine
    raise AttributeError(name)
