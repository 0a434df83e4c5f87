"""The batched device sampler: what one row draws (greedy, temperature, top-k, top-p, the
repetition penalty), and a batch of rows against the per-row reference below."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from engine.serving.sampler import BatchSampler


def penalized(logits: torch.Tensor, repetition_penalty: float, seen: torch.Tensor | None) -> torch.Tensor:
    """The reference: one row's logits in fp32 with the repetition penalty applied to the seen tokens."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None and seen.numel():
        picked = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
    return logits


def reference_probs(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The reference: the distribution one row samples from (temperature > 0), after top-k and
    top-p; not normalised after top-p (sampling does not need it)."""
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


# ---- one row ---------------------------------------------------------------------------------

def draws(logits: list[float] | torch.Tensor, n: int, seed: int = 0, *, temperature: float = 0.0, top_k: int = 0,
          top_p: float = 1.0, repetition_penalty: float = 1.0, seen: list[int] | None = None) -> list[int]:
    """`n` independent draws from one row's logits: `n` rows with the same settings (their
    seeds derived from `seed`), one step; `seen` is the prompt the penalty applies to."""
    logits = torch.as_tensor(logits, dtype=torch.float32) if isinstance(logits, list) else logits
    s = BatchSampler(n, logits.shape[-1], "cpu")
    for i in range(n):
        s.set_row(i, temperature=temperature, top_k=top_k, top_p=top_p, penalty=repetition_penalty,
                  seed=seed * 1_000_003 + i, prompt=seen or [])
    return s.sample(logits.unsqueeze(0).expand(n, -1), slice(0, n), s.plan(list(range(n)))).tolist()


def pick(logits: list[float] | torch.Tensor, seed: int = 0, **settings: object) -> int:
    """One row's token (greedy unless `temperature` is given)."""
    return draws(logits, 1, seed, **settings)[0]  # type: ignore[arg-type]


def random_rows(n: int, vocab: int = 200, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(vocab, generator=g) * 3 for _ in range(n)]


# ---- greedy --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "logits, expected",
    [
        ([0.1, 0.2, 3.0, -1.0], 2),
        ([5.0, 1.0, 1.0], 0),
        ([-3.0, -2.0, -7.0], 1),
        ([0.0, float("-inf"), 1e-3], 2),
        ([1.0], 0),
    ],
)
@pytest.mark.parametrize("settings", [{}, {"top_k": 1}, {"top_p": 0.1}, {"top_k": 50, "top_p": 0.9}])
def test_greedy_picks_argmax(logits: list[float], expected: int, settings: dict[str, float]) -> None:
    assert pick(logits, temperature=0.0, **settings) == expected  # top_k/top_p do not matter when greedy


def test_greedy_accepts_half_precision() -> None:
    row = random_rows(1)[0]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert pick(row.to(dtype)) == int(torch.argmax(row.to(dtype).float()))


# ---- sampling ------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible() -> None:
    row = random_rows(1)[0] / 3  # a flat-ish distribution, so many tokens are possible
    a = draws(row, 40, seed=1234, temperature=1.0)
    b = draws(row, 40, seed=1234, temperature=1.0)
    c = draws(row, 40, seed=4321, temperature=1.0)
    assert a == b
    assert a != c
    assert len(set(a)) > 5  # really sampling, not collapsing to one token


def test_sampling_follows_the_distribution() -> None:
    logits = [math.log(0.7), math.log(0.2), math.log(0.1)]
    counts = Counter(draws(logits, 3000, temperature=1.0))
    assert abs(counts[0] / 3000 - 0.7) < 0.04
    assert abs(counts[1] / 3000 - 0.2) < 0.04
    assert abs(counts[2] / 3000 - 0.1) < 0.04


def test_low_temperature_sharpens_high_flattens() -> None:
    logits = [1.0, 0.0]
    cold = Counter(draws(logits, 1000, temperature=0.2))[0]
    warm = Counter(draws(logits, 1000, temperature=1.0))[0]
    hot = Counter(draws(logits, 1000, temperature=5.0))[0]
    assert cold > warm > hot > 400


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_one_equals_greedy(temperature: float) -> None:
    for i, row in enumerate(random_rows(30, seed=1)):
        assert pick(row, seed=7 + i, temperature=temperature, top_k=1) == pick(row)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_tiny_top_p_equals_greedy(temperature: float) -> None:
    for i, row in enumerate(random_rows(30, seed=2)):
        assert pick(row, seed=7 + i, temperature=temperature, top_p=1e-6) == pick(row)


def test_top_k_limits_candidates() -> None:
    logits = [3.0, 2.9, 2.8, 0.0, -1.0, 2.85]
    seen = set(draws(logits, 600, temperature=5.0, top_k=3))
    assert seen == {0, 1, 5}


@pytest.mark.parametrize(
    "top_p, allowed",
    [(0.3, {0}), (0.5, {0, 1}), (0.75, {0, 1, 2}), (0.95, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_nucleus(top_p: float, allowed: set[int]) -> None:
    probs = [0.4, 0.3, 0.2, 0.1]
    logits = [math.log(p) for p in probs]
    assert set(draws(logits, 800, temperature=1.0, top_p=top_p)) == allowed


# ---- repetition penalty ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "logits, seen, penalty, expected",
    [
        ([2.0, 1.9, -1.0], None, 1.5, 0),  # nothing seen: no change
        ([2.0, 1.9, -1.0], [0], 1.0, 0),  # penalty 1: no change
        ([2.0, 1.9, -1.0], [0], 1.5, 1),  # positive logit divided: 2.0 -> 1.33 < 1.9
        ([2.0, 1.9, -1.0], [0, 1], 1.5, 0),  # both penalised: order kept
        ([-1.0, -1.2, -5.0], [0], 1.5, 1),  # negative logit multiplied: -1.0 -> -1.5 < -1.2
        ([2.0, 1.5, 0.0], [0, 0, 0], 1.2, 0),  # duplicates penalise once: 2.0 -> 1.67 > 1.5
        ([2.0, 1.9, -1.0], [], 1.5, 0),  # empty seen
    ],
)
def test_repetition_penalty(logits: list[float], seen: list[int] | None, penalty: float, expected: int) -> None:
    assert pick(logits, repetition_penalty=penalty, seen=seen) == expected


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-penalty", "dense-penalty"])
def test_repetition_penalty_does_not_modify_the_callers_logits(sparse: bool) -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    before = logits.clone()
    s = BatchSampler(1, 3, "cpu", sparse_penalty=sparse)
    s.set_row(0, temperature=0.0, top_k=0, top_p=1.0, penalty=2.0, seed=0, prompt=[0, 2])
    assert int(s.sample(logits, slice(0, 1), s.plan([0]))[0]) == 1
    assert torch.equal(logits, before)


def test_repetition_penalty_applies_before_sampling() -> None:
    logits = [math.log(0.5), math.log(0.5)]
    counts = Counter(draws(logits, 1000, temperature=1.0, repetition_penalty=2.0, seen=[0]))
    assert counts[1] > counts[0] * 1.5  # log(0.5) * 2 makes token 0 much less likely


# ---- a batch of rows against the per-row reference ---------------------------------------------

V = 200
ROWS = [  # temperature, top_k, top_p, penalty, seen
    dict(temperature=0.7, top_k=50, top_p=0.9, penalty=1.1, prompt=[1, 2, 3, 150]),
    dict(temperature=1.3, top_k=0, top_p=0.5, penalty=1.0, prompt=[]),
    dict(temperature=0.5, top_k=7, top_p=1.0, penalty=1.5, prompt=list(range(0, 200, 3))),
    dict(temperature=1.0, top_k=20, top_p=0.95, penalty=1.0, prompt=[9]),
]


def sampler_with(rows: list[dict], seeds: list[int] | None = None, sparse: bool | None = None) -> BatchSampler:
    s = BatchSampler(len(rows), V, "cpu", sparse_penalty=sparse)
    for i, r in enumerate(rows):
        s.set_row(i, seed=(seeds or list(range(len(rows))))[i], **r)
    return s


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-penalty", "dense-penalty"])  # CPU's, GPU's
@pytest.mark.parametrize("k_rows", [[0, 1, 2, 3], [0, 2, 3], [2]])
def test_filtered_distributions_equal_the_per_row_reference(k_rows: list[int], sparse: bool) -> None:
    torch.manual_seed(0)
    rows = [ROWS[i] for i in k_rows]
    logits = torch.randn(len(rows), V) * 3
    kept = logits.clone()
    s = sampler_with(rows, sparse=sparse)
    assert s.sparse_penalty is sparse
    got = s.probs(logits, slice(0, len(rows)), s.plan(list(range(len(rows)))))
    for i, r in enumerate(rows):
        seen = torch.tensor(r["prompt"], dtype=torch.long)
        ref = reference_probs(penalized(logits[i], r["penalty"], seen), temperature=r["temperature"],
                              top_k=r["top_k"], top_p=r["top_p"])
        torch.testing.assert_close(got[i], ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(logits, kept)  # the caller's logits are not written


def test_the_penalty_is_sparse_on_a_cpu_and_dense_elsewhere() -> None:
    assert BatchSampler(2, V, "cpu").sparse_penalty
    assert not BatchSampler(2, V, "meta").sparse_penalty


@pytest.mark.parametrize("greedy", [(), (1,), (0, 1, 2)])
def test_all_sampled_all_greedy_and_mixed_batches_pick_as_the_reference(greedy: tuple[int, ...]) -> None:
    """The vocabulary-wide argmax is skipped when no row is greedy; the other rows draw alike."""
    torch.manual_seed(3)
    rows = [dict(r, temperature=0.0) if i in greedy else r for i, r in enumerate(ROWS[:3])]
    logits = torch.randn(3, V) * 3
    s = sampler_with(rows)
    plan = s.plan([0, 1, 2])
    assert (plan.all_greedy, plan.any_greedy) == (len(greedy) == 3, bool(greedy))
    tokens = s.sample(logits, slice(0, 3), plan)
    probs = sampler_with(rows).probs(logits, slice(0, 3), plan) if len(greedy) < 3 else None
    for i, r in enumerate(rows):
        seen = torch.tensor(r["prompt"], dtype=torch.long)
        pen = penalized(logits[i], r["penalty"], seen)
        if i in greedy:
            assert int(tokens[i]) == int(pen.argmax())
        else:
            assert float(probs[i, int(tokens[i])]) > 0  # a token of the row's filtered distribution


def test_greedy_rows_take_the_penalised_argmax_beside_sampled_rows() -> None:
    torch.manual_seed(1)
    rows = [dict(ROWS[0], temperature=0.0), ROWS[1], dict(ROWS[2], temperature=0.0)]
    logits = torch.randn(3, V)
    s = sampler_with(rows)
    tokens = s.sample(logits.clone(), slice(0, 3), s.plan([0, 1, 2]))
    for i in (0, 2):
        seen = torch.tensor(rows[i]["prompt"], dtype=torch.long)
        assert int(tokens[i]) == int(penalized(logits[i], rows[i]["penalty"], seen).argmax())


def run_row(row: dict, seed: int, neighbours: list[dict], steps: int = 12) -> list[int]:
    """One seeded row's tokens over `steps`, with other rows (and their own seeds) beside it."""
    rows = neighbours + [row]
    s = sampler_with(rows, seeds=[1000 + i for i in range(len(neighbours))] + [seed])
    torch.manual_seed(7)
    fixed = torch.randn(steps, V)  # the row's logits per step, the same in every run
    out = []
    for t in range(steps):
        logits = torch.randn(len(rows), V)  # neighbours: anything
        logits[-1] = fixed[t]
        tokens = s.sample(logits, slice(0, len(rows)), s.plan(list(range(len(rows)))))
        out.append(int(tokens[-1]))
    return out


def test_a_seeded_row_draws_the_same_tokens_whatever_else_is_in_the_batch() -> None:
    alone = run_row(ROWS[3], 42, [])
    assert run_row(ROWS[3], 42, [ROWS[0], ROWS[1]]) == alone
    assert run_row(ROWS[3], 42, [ROWS[2], dict(ROWS[0], temperature=0.0), ROWS[1]]) == alone
    assert run_row(ROWS[3], 43, [ROWS[0]]) != alone


def test_draws_follow_the_filtered_distribution() -> None:
    """4,000 seeded rows drawing from one distribution: frequencies match the probabilities."""
    logits = torch.full((V,), -30.0)
    logits[:5] = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]))
    n = 4000
    s = BatchSampler(n, V, "cpu")
    for i in range(n):
        s.set_row(i, temperature=1.0, top_k=0, top_p=1.0, penalty=1.0, seed=i, prompt=[])
    tokens = s.sample(logits.expand(n, V).clone(), slice(0, n), s.plan(list(range(n))))
    freq = torch.bincount(tokens, minlength=V)[:5].float() / n
    torch.testing.assert_close(freq, torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]), atol=0.025, rtol=0)
    assert int(torch.bincount(tokens, minlength=V)[5:].sum()) == 0


def test_penalty_books_sampled_tokens_only_for_active_rows() -> None:
    s = sampler_with([dict(ROWS[0], temperature=0.0), dict(ROWS[0], temperature=0.0)])
    logits = torch.zeros(2, V)
    logits[:, 77] = 5.0
    s.sample(logits, slice(0, 2), s.plan([0, 1]), active=torch.tensor([True, False]))
    assert bool(s.seen[0, 77]) and not bool(s.seen[1, 77])
    assert s.step.tolist() == [1, 0]
