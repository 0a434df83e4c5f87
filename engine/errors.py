"""Domain errors. Each message names the offending value so the user can fix it.

Front ends map these to short replies in one place; the log keeps the detail.
"""
from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class ConfigError(EngineError):
    """A setting has a value the engine cannot use."""


class ModelLoadError(EngineError):
    """The base model or its tokenizer could not be loaded."""


class AdapterNotFound(EngineError):
    """No adapter (or version) of that name is on disk."""


class AdapterInvalid(EngineError):
    """An adapter's files are missing, corrupt, or do not fit the base model."""


class AdapterIncompatible(AdapterInvalid):
    """The adapter was trained for another base model or has shapes this model lacks."""


class TemplateNotFound(EngineError):
    """No role template of that id."""


class TemplateError(EngineError):
    """A role template failed to parse or render (the message names file and line)."""


class EngineBusy(EngineError):
    """The request queue is full; try again shortly."""


class EngineClosed(EngineError):
    """The engine is shutting down and takes no new requests."""


class InputTooLong(EngineError):
    """The newest message alone does not fit the context budget."""


class TrainingError(EngineError):
    """A training job could not start or failed."""


class TrainingBusy(TrainingError):
    """Another training job is running (the message says which)."""


class NoTrainingData(TrainingError):
    """The domain has no usable training data."""


class TrainingStorageError(TrainingError):
    """The adapters volume cannot be written (read-only, full, no permission): `problem` says which."""

    def __init__(self, message: str, *, path: str, problem: str) -> None:
        super().__init__(message)
        self.path = path
        self.problem = problem  # "read-only" | "full" | "denied" | "unwritable"
