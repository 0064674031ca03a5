"""Uncertainty of accuracies over items and seeds, and paired comparisons of two configurations.

An accuracy cell is a weighted mean over *strata* (one task; MMLU's subjects; the seven commonsense tasks) of
per-item correctness, averaged over training seeds. Each stratum is a 0/1 (or fractional) matrix of shape
``(seeds, items)``: the same items, evaluated once per seed.

* :func:`interval` -- the mean and a 95% percentile interval of a **two-level bootstrap**: each replicate draws
  the seeds with replacement, then the items with replacement from the pool of all strata (the same items for
  every drawn seed, since the items are shared), each item weighted by its stratum's weight over its stratum's
  size, and recomputes the weighted mean (a ratio estimator; exact for the observed data). Items are not
  resampled within each stratum: MMLU at one question per subject would then give an interval of width 0.
  With one seed it is the ordinary item bootstrap; with many items and one stratum it approaches the binomial
  (Wald) interval.
* :func:`paired` -- the difference ``A - B`` of two configurations on the **same items**: replicates draw the
  seeds of A and of B independently and the items jointly (the pairing), giving a 95% interval; the p-value
  is a paired **sign-flip permutation test** on the per-item differences of the seed means (exact by
  enumeration up to 16 nonzero differences, else 20,000 random flips), which for one seed and 0/1 items is
  the exact McNemar test. A difference whose interval contains 0 is reported as inconclusive.

Every random draw comes from a generator seeded from the cell's own key (:func:`seed_of`), so the same
records always give the same bytes.
"""
from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

N_BOOT = 4000
N_FLIPS = 20_000
EXACT_FLIPS_UP_TO = 16
LEVEL = 0.95


def seed_of(*key) -> int:
    """A stable 64-bit seed from a key (sha256 of its repr): the same cell, the same draws, on any machine. Keys
    should hold plain str/int/float values: a numpy scalar's repr changes between numpy versions."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little")


def _check(strata: Sequence[np.ndarray], weights: Sequence[float] | None) -> tuple[list[np.ndarray], np.ndarray]:
    mats = [np.atleast_2d(np.asarray(a, dtype=np.float64)) for a in strata]
    if not mats or any(m.size == 0 for m in mats):
        raise ValueError("every stratum needs at least one seed and one item")
    if len({m.shape[0] for m in mats}) != 1:
        raise ValueError(f"all strata need the same seeds, got {[m.shape[0] for m in mats]}")
    w = np.ones(len(mats)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(mats),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights {weights!r} do not fit {len(mats)} strata")
    return mats, w / w.sum()


def _item_counts(rng: np.random.Generator, n: int, boot: int) -> np.ndarray:
    """``(boot, n)`` bootstrap multiplicities of n items (each row sums to n)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=boot).astype(np.float64)


def _seed_draws(rng: np.random.Generator, s: int, boot: int) -> np.ndarray:
    """``(boot, s)`` multiplicities of s seeds (each row sums to s); all ones when s == 1."""
    if s == 1:
        return np.ones((boot, 1))
    return rng.multinomial(s, np.full(s, 1.0 / s), size=boot).astype(np.float64)


def _pooled(mats: list[np.ndarray], w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All strata as one ``(seeds, items)`` matrix and per-item weights ``w_k / n_k``: the weighted mean of the
    pooled items equals the weighted mean of the strata means exactly."""
    return np.hstack(mats), np.concatenate([np.full(m.shape[1], wk / m.shape[1]) for m, wk in zip(mats, w)])


def _boot_means(x: np.ndarray, v: np.ndarray, seed_w: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Replicates of the weighted mean: item multiplicities ``counts (B, N)`` drawn from the pooled items (each
    item keeps its weight ``v``, so a replicate is the ratio ``sum c v x / sum c v``), seed multiplicities
    ``seed_w (B, S)``."""
    cv = counts * v                                  # (B, N)
    per_seed = (cv @ x.T) / cv.sum(axis=1, keepdims=True)   # (B, S): each seed's weighted mean over the draw
    return (per_seed * seed_w).sum(axis=1) / x.shape[0]


CHUNK = 500  # replicates drawn at a time (bounds memory: CHUNK x items multiplicities)


def _replicates(rng: np.random.Generator, groups: list[list[np.ndarray]], w: np.ndarray, boot: int) -> np.ndarray:
    """``(len(groups), boot)`` replicates of the weighted mean of each group of strata. The items are drawn from
    the pool of all strata (not within each stratum: a stratum of one item would then never vary, and small
    strata would understate the variance), once per replicate and shared by every group (pairing); the seeds are
    drawn per group."""
    out = np.empty((len(groups), boot))
    pooled = [_pooled(mats, w) for mats in groups]
    n = pooled[0][0].shape[1]
    for start in range(0, boot, CHUNK):
        k = min(CHUNK, boot - start)
        counts = _item_counts(rng, n, k)
        for g, (x, v) in enumerate(pooled):
            out[g, start:start + k] = _boot_means(x, v, _seed_draws(rng, x.shape[0], k), counts)
    return out


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    n_items: int
    n_seeds: int


def interval(strata: Sequence[np.ndarray], weights: Sequence[float] | None = None, *, key=(),
             boot: int = N_BOOT, level: float = LEVEL) -> Interval:
    """Mean and percentile interval (see the module docstring) of the weighted mean over strata."""
    mats, w = _check(strata, weights)
    mean = float(sum(wk * m.mean() for m, wk in zip(mats, w)))
    rng = np.random.default_rng(seed_of("interval", key))
    reps = _replicates(rng, [mats], w, boot)[0]
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return Interval(mean, float(lo), float(hi), sum(m.shape[1] for m in mats), mats[0].shape[0])


@dataclass(frozen=True)
class Paired:
    diff: float
    lo: float
    hi: float
    p: float
    n_items: int
    n_seeds_a: int
    n_seeds_b: int

    @property
    def distinguishable(self) -> bool:
        """True when the interval excludes 0 (else the difference is inconclusive at this scale)."""
        return self.lo > 0 or self.hi < 0


def paired(a: Sequence[np.ndarray], b: Sequence[np.ndarray], weights: Sequence[float] | None = None, *, key=(),
           boot: int = N_BOOT, flips: int = N_FLIPS, level: float = LEVEL) -> Paired:
    """``A - B`` on the same items (strata aligned item by item; the seeds of A and B may differ in number)."""
    ma, w = _check(a, weights)
    mb, _ = _check(b, weights)
    if [m.shape[1] for m in ma] != [m.shape[1] for m in mb]:
        raise ValueError("paired comparison needs the same items in A and B")
    diff = float(sum(wk * (x.mean() - y.mean()) for x, y, wk in zip(ma, mb, w)))
    rng = np.random.default_rng(seed_of("paired", key))
    ra, rb = _replicates(rng, [ma, mb], w, boot)  # the same item draws for A and B: the pairing
    reps = ra - rb
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    # per-item differences of the seed means, each with its weight in the statistic
    d = np.concatenate([wk * (x.mean(axis=0) - y.mean(axis=0)) / x.shape[1] for x, y, wk in zip(ma, mb, w)])
    return Paired(diff, float(lo), float(hi), sign_flip_p(d, key=key, flips=flips),
                  sum(m.shape[1] for m in ma), ma[0].shape[0], mb[0].shape[0])


def sign_flip_p(d: np.ndarray, *, key=(), flips: int = N_FLIPS) -> float:
    """Two-sided p-value of ``sum(d)`` under random sign flips of the per-item terms ``d`` (paired test).

    Exact (all ``2^k`` flips of the k nonzero terms) when k <= 16; else Monte Carlo with the +1 correction,
    ``(1 + #{|T*| >= |T|}) / (1 + flips)``."""
    d = np.asarray(d, dtype=np.float64)
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    t = abs(d.sum())
    tol = 1e-12 * max(1.0, np.abs(d).sum())
    if d.size <= EXACT_FLIPS_UP_TO:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        return float((np.abs(signs @ d) >= t - tol).mean())
    rng = np.random.default_rng(seed_of("flip", key))
    hits = 0
    for start in range(0, flips, 5000):
        k = min(5000, flips - start)
        signs = rng.integers(0, 2, size=(k, d.size), dtype=np.int8).astype(np.float64) * 2 - 1
        hits += int((np.abs(signs @ d) >= t - tol).sum())
    return (1 + hits) / (1 + flips)


__all__ = ["Interval", "Paired", "interval", "paired", "sign_flip_p", "seed_of", "N_BOOT", "LEVEL"]
