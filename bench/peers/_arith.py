"""The arithmetic of side-by-side runs: plain numbers in, plain numbers out (no torch, no Node).

Each process of either side gives one number per row (its median run for the single streams);
the runs alternate, so run i of the engine and run i of the peer shared the machine's state of
that minute, and their quotient is the figure that holds on a shared, drifting machine. The
table shows the median of those quotients and their range, and each side's own spread.
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Sequence

from bench._serving_report import Row, Trace, median_run


@dataclasses.dataclass
class Measured:
    """One row of one process: the table row (median of its repeats) and the users' own rate."""

    row: Row
    per_user_tok_s: float | None  # the median stream's tokens / (its last token - its submission)

    def to_json(self) -> dict[str, Any]:
        return {"row": dataclasses.asdict(self.row), "per_user_tok_s": self.per_user_tok_s}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Measured":
        return cls(Row(**data["row"]), data["per_user_tok_s"])


def per_user(traces: Sequence[Trace]) -> float | None:
    """The median stream's own rate: its tokens over the time from its submission to its last token."""
    rates = sorted(t.tokens / (t.arrivals[-1] - t.submitted) for t in traces
                   if t.arrivals and t.arrivals[-1] > t.submitted)
    return rates[(len(rates) - 1) // 2] if rates else None


def median_measured(runs: Sequence[tuple[Row, float | None]]) -> Measured:
    """The run with the median tok/s (the lower middle for an even count), every run's tok/s kept."""
    ordered = sorted(runs, key=lambda r: r[0].tokens_per_s)
    return Measured(median_run([r for r, _ in runs]), ordered[(len(ordered) - 1) // 2][1])


@dataclasses.dataclass(frozen=True)
class Spread:
    """A figure over several runs: the median, the smallest and the largest."""

    median: float
    low: float
    high: float

    @property
    def relative(self) -> float:
        """(largest - smallest) / median: how far one process can be from the next."""
        return (self.high - self.low) / self.median if self.median else float("inf")


def spread(values: Sequence[float | None]) -> Spread | None:
    """The spread of the values that were measured; None when none was."""
    got = [v for v in values if v is not None]
    if not got:
        return None
    return Spread(statistics.median(got), min(got), max(got))


def paired_ratios(engine: Sequence[float | None], peer: Sequence[float | None]) -> Spread | None:
    """engine[i] / peer[i] for each alternation i where both were measured, summarized."""
    return spread([e / p for e, p in zip(engine, peer) if e is not None and p])
