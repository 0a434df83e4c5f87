"""The vLLM backend (ENGINE_BACKEND=vllm): the engine face over vLLM OpenAI-compatible servers.

Importing this package does not import torch (only adapter validation and the model's
shapes, at start, do).
"""
from engine.vllm.config import VllmSettings, load_vllm_settings  # noqa: F401


def __getattr__(name: str):  # lazy: aiohttp and the prompt code load only when used
    if name == "VllmEngine":
        from engine.vllm.engine import VllmEngine

        return VllmEngine
    raise AttributeError(name)
