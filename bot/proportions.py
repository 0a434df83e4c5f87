"""Two small statistics of 👍 rates: the Wilson interval and Fisher's exact test.

An A/B in a chat bot collects tens of ratings per version, not thousands. At those counts
the normal approximation behind a two-proportion z-test is unreliable (expected cells under
5), so the comparison uses Fisher's exact test, which is exact at any size; the interval of
each rate is Wilson's score interval, which stays inside [0, 1] and behaves at 0 or n
successes where the textbook Wald interval collapses. Both are a few lines of arithmetic in
log space; scipy would add tens of megabytes for them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95 % interval
ALPHA = 0.05  # a difference is "significant" when Fisher's p is below this


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of the proportion successes/n; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_exact(a: int, b: int, c: int, d: int) -> float:
    """Two-sided p-value of Fisher's exact test on the 2×2 table [[a, b], [c, d]].

    The p-value sums the probabilities of every table with the same margins that is at most
    as likely as the observed one (the convention of R's fisher.test and scipy).
    """
    if min(a, b, c, d) < 0:
        raise ValueError(f"counts must not be negative: {[[a, b], [c, d]]}")
    row1, row2, col1 = a + b, c + d, a + c
    n = row1 + row2
    if row1 == 0 or row2 == 0 or col1 == 0 or col1 == n:
        return 1.0
    log_total = _log_comb(n, col1)

    def log_p(x: int) -> float:
        return _log_comb(row1, x) + _log_comb(row2, col1 - x) - log_total

    observed = log_p(a)
    tolerance = 1e-7  # tables as likely as the observed one, up to rounding, count as such
    p = sum(math.exp(lp) for x in range(max(0, col1 - row2), min(row1, col1) + 1)
            if (lp := log_p(x)) <= observed + tolerance)
    return min(1.0, p)


@dataclass(frozen=True)
class Rate:
    """The 👍 rate of one version: 👍 / (👍 + 👎) with its 95 % interval."""

    up: int
    down: int

    @property
    def rated(self) -> int:
        return self.up + self.down

    @property
    def value(self) -> float | None:
        return self.up / self.rated if self.rated else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.up, self.rated)


@dataclass(frozen=True)
class Comparison:
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def compare(first: Rate, second: Rate) -> Comparison:
    """Fisher's exact test of two versions' 👍/👎 counts."""
    return Comparison(fisher_exact(first.up, first.down, second.up, second.down))
