"""Per-job training options (LoRA shape itself comes from EngineSettings: LORA_R, ...).

Plain data, no torch: the service passes them to the training process on its command
line, and `python -m engine.train` builds them from its flags.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from engine.errors import ConfigError


@dataclass(frozen=True)
class TrainOptions:
    epochs: float = 3.0
    """Passes over the training rows (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps; None = run `epochs`."""
    learning_rate: float = 5e-4
    """Peak learning rate of the linear schedule (LoRA on a 135M model likes 2e-4..1e-3)."""
    batch_size: int = 8
    grad_accum: int = 1
    warmup: float = 0.05
    """Warm-up as a fraction of all steps, rounded down to whole steps (short runs get none)."""
    max_seq_len: int = 512
    """Rows are cut to this many tokens; rows left with no answer tokens are dropped."""
    eval_batch_size: int = 8
    seed: int = 0
    dataset: str | None = None
    """A hub data set id to train on instead of adapters/<domain>/data (needs network)."""

    def __post_init__(self) -> None:
        checks = (
            ("epochs", self.epochs > 0, "a positive number"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, "at least 1"),
            ("learning_rate", 0 < self.learning_rate < 1, "in (0, 1): at 0 nothing is learned"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("grad_accum", self.grad_accum >= 1, "at least 1"),
            ("warmup", 0 <= self.warmup < 1, "a fraction in [0, 1)"),
            ("max_seq_len", self.max_seq_len >= 16, "at least 16"),
            ("eval_batch_size", self.eval_batch_size >= 1, "at least 1"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"training option {name}={getattr(self, name)!r}: expected {expected}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)
