"""The base model: where it comes from, loading it once, and the fingerprint of its weights.

`loader` resolves the source (the embedded GGUF, a file, a folder, a hub id), converts a GGUF
once and loads the model and tokenizer; `fingerprint` identifies the weights adapters were
trained on. `python -m engine.model --prepare` converts the configured model once;
`--fingerprint` prints its fingerprint and `--stamp DIR...` records it in adapter versions.
"""
from engine.model.loader import (
    EMBEDDED_MODEL_ID, LoadedModel, ModelSource, load, load_tokenizer, main, memory_footprint, prepare, resolve_source,
    torch_dtype,
)

__all__ = [
    "EMBEDDED_MODEL_ID", "LoadedModel", "ModelSource", "load", "load_tokenizer", "main", "memory_footprint", "prepare",
    "resolve_source", "torch_dtype",
]
