"""The batched device sampler against the per-row reference (`engine.sampling`)."""
from __future__ import annotations

import pytest
import torch

from engine.runtime.sampler import BatchSampler
from engine.sampling import penalized, reference_probs

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
