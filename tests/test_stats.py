"""qftbench.stats against cases with a known answer: the binomial interval, exact McNemar, exact enumeration."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from qftbench import stats


def test_item_bootstrap_matches_the_binomial_interval():
    """One seed, one stratum, many items: the bootstrap percentile interval approaches p +- 1.96 sqrt(p(1-p)/n)."""
    n, k = 2000, 600
    acc = np.zeros(n)
    acc[:k] = 1
    iv = stats.interval([acc[None, :]], key="binomial")
    p = k / n
    half = 1.959964 * math.sqrt(p * (1 - p) / n)
    assert iv.mean == p and iv.n_items == n and iv.n_seeds == 1
    assert iv.lo == pytest.approx(p - half, abs=0.003) and iv.hi == pytest.approx(p + half, abs=0.003)


def test_interval_is_deterministic_and_keyed():
    acc = np.random.default_rng(0).integers(0, 2, size=(3, 300))
    a = stats.interval([acc], key=("x", 1))
    assert a == stats.interval([acc], key=("x", 1))
    assert a.mean == pytest.approx(acc.mean())


def test_seed_level_adds_the_between_seed_variance():
    """Three seeds that disagree strongly on the same items: the interval must be wider than the item-only one
    of their pooled mean, and cover roughly the spread of the seed means."""
    rng = np.random.default_rng(1)
    n = 400
    seeds = np.stack([(rng.random(n) < p).astype(float) for p in (0.3, 0.5, 0.7)])
    two_level = stats.interval([seeds], key="s")
    items_only = stats.interval([seeds.mean(axis=0, keepdims=True)], key="s")
    assert (two_level.hi - two_level.lo) > 2 * (items_only.hi - items_only.lo)
    assert two_level.lo < 0.4 and two_level.hi > 0.6


def test_weighted_strata_mean():
    a = np.array([[1.0, 0.0, 1.0, 1.0]])
    b = np.array([[0.0, 0.0]])
    micro = stats.interval([a, b], [4, 2])
    macro = stats.interval([a, b])
    assert micro.mean == pytest.approx(3 / 6) and macro.mean == pytest.approx((0.75 + 0.0) / 2)
    assert micro.n_items == 6


def _exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial(b + c, 1/2), doubling the smaller tail, capped at 1."""
    n = b + c
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize("b,c", [(7, 2), (10, 1), (5, 5), (0, 6), (12, 4)])
def test_sign_flip_equals_exact_mcnemar_for_one_seed(b, c):
    """A right where B is wrong b times, the reverse c times, ties elsewhere: the paired sign-flip test on 0/1
    items is McNemar's exact test."""
    a = [1] * b + [0] * c + [1] * 5 + [0] * 3
    bb = [0] * b + [1] * c + [1] * 5 + [0] * 3
    r = stats.paired([np.array([a])], [np.array([bb])], key=(b, c))
    assert r.diff == pytest.approx((b - c) / len(a))
    assert r.p == pytest.approx(_exact_mcnemar(b, c), abs=1e-12)


def test_sign_flip_monte_carlo_close_to_enumeration():
    d = np.random.default_rng(3).normal(0.2, 1.0, size=18)
    exact = np.mean([abs(np.dot(s, d)) >= abs(d.sum()) - 1e-12
                     for s in itertools.product((1, -1), repeat=d.size)])
    assert stats.sign_flip_p(d, key="mc", flips=20_000) == pytest.approx(exact, abs=0.01)


def test_paired_interval_and_verdict():
    rng = np.random.default_rng(5)
    n = 500
    base = rng.random(n)
    a = (base < 0.6).astype(float)[None, :]
    b = (base < 0.5).astype(float)[None, :]  # A is right on every item B is, and on 10% more
    r = stats.paired([a], [b], key="v")
    assert r.diff == pytest.approx(a.mean() - b.mean())
    assert r.lo > 0 and r.distinguishable and r.p < 1e-3
    same = stats.paired([a], [a], key="v")
    assert same.diff == 0 and same.p == 1.0 and not same.distinguishable
    with pytest.raises(ValueError, match="same items"):
        stats.paired([a], [b[:, :10]])


def test_one_item_per_stratum_still_varies():
    """MMLU at one question per subject: 57 strata of one item each. Resampling within strata would give a
    zero-width interval; the pooled draw gives the question-level bootstrap (about the binomial interval)."""
    rng = np.random.default_rng(7)
    strata = [np.array([[float(x)]]) for x in (rng.random(57) < 0.3)]
    micro = stats.interval(strata, [1] * 57, key="one-per-subject")
    p = np.mean([s[0, 0] for s in strata])
    half = 1.959964 * math.sqrt(p * (1 - p) / 57)
    assert micro.mean == pytest.approx(p) and micro.hi - micro.lo > half  # clearly not degenerate
    assert micro.hi - micro.lo == pytest.approx(2 * half, rel=0.25)


def test_items_of_one_cluster_are_one_unit_of_the_bootstrap():
    """report.strata_args averages the items of a cluster (the synthetic task's phrasings of one fact): the
    interval of 30 facts asked 5 times each, every fact right or wrong in all 5 phrasings, is the interval of 30
    items, not of 150; clusters of unequal size are left as items (averaging them would re-weight items)."""
    from qftbench import report

    facts = np.array([1.0] * 12 + [0.0] * 18)
    per_item = np.repeat(facts, 5)[None, :]
    keys = [f"k{i}" for i in range(150)]
    clusters = [i // 5 for i in range(150)]
    aligned = {"_weighted": False, "qft_synthetic": (keys, per_item, clusters)}
    mats, w = report.strata_args(aligned)
    assert mats[0].shape == (1, 30) and w == [1.0]
    np.testing.assert_array_equal(mats[0][0], facts)
    clustered = stats.interval(mats, w, key=("c",))
    thirty = stats.interval([facts[None, :]], key=("c",))
    unclustered = stats.interval([per_item], key=("c",))
    assert (clustered.lo, clustered.hi) == (thirty.lo, thirty.hi)
    assert clustered.hi - clustered.lo > 2 * (unclustered.hi - unclustered.lo) * 0.9  # ~sqrt(5) wider
    # restricted to some items (a paired comparison's common items), clusters follow their items
    keep = {"qft_synthetic": keys[:10]}
    mats, _ = report.strata_args(aligned, keep)
    assert mats[0].shape == (1, 2)
    # unequal clusters: items stay items
    aligned = {"_weighted": False, "qft_synthetic": (keys[:7], per_item[:, :7], clusters[:7])}
    assert report.strata_args(aligned)[0][0].shape == (1, 7)
