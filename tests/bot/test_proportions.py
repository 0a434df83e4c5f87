"""The A/B statistics against published values (R's fisher.test, Wilson's 1927 interval)."""
from __future__ import annotations

import pytest

from bot.proportions import Rate, compare, fisher_exact, wilson


@pytest.mark.parametrize(("table", "p"), [
    ((8, 2, 1, 5), 0.034965),  # scipy.stats.fisher_exact's documented example
    ((3, 1, 1, 3), 0.485714),  # Fisher's lady tasting tea
    ((1, 9, 11, 3), 0.002759),  # Wikipedia's example
    ((0, 5, 0, 5), 1.0),  # nobody said 👍: nothing to tell apart
    ((10, 0, 0, 10), 1.0825e-05),
])
def test_fisher_exact_two_sided(table, p):
    assert fisher_exact(*table) == pytest.approx(p, rel=1e-3)


def test_fisher_exact_is_symmetric_and_refuses_negative_counts():
    assert fisher_exact(7, 3, 2, 8) == pytest.approx(fisher_exact(2, 8, 7, 3))
    assert fisher_exact(7, 3, 2, 8) == pytest.approx(fisher_exact(7, 2, 3, 8))
    with pytest.raises(ValueError, match="negative"):
        fisher_exact(-1, 2, 3, 4)


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (81, 263, 0.2553, 0.3662),
    (0, 10, 0.0, 0.2775),  # stays inside [0, 1] where the Wald interval collapses to a point
    (10, 10, 0.7225, 1.0),
    (0, 0, 0.0, 1.0),  # no ratings: nothing is known
])
def test_wilson_interval(k, n, low, high):
    lo, hi = wilson(k, n)
    assert (lo, hi) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))


def test_a_comparison_is_significant_below_five_percent():
    assert compare(Rate(30, 10), Rate(10, 30)).significant
    assert not compare(Rate(3, 1), Rate(1, 3)).significant
    assert Rate(0, 0).value is None and Rate(3, 1).value == 0.75
