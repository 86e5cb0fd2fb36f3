"""Small statistics for the evaluation metrics, numpy only (no scipy at runtime).

Conventions: `level` is the two-sided confidence level; p-values are two-sided; an undefined
quantity (no data) is `nan`, never an exception, so a report can say "n = 0" instead of crashing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

__all__ = [
    "McNemarResult",
    "SignFlipResult",
    "auroc",
    "auroc_ci",
    "bootstrap_ci",
    "mcnemar",
    "mcnemar_paired",
    "normal_two_sided_p",
    "sign_flip_test",
    "two_proportion_z",
    "wilson_ci",
]

NAN = float("nan")


def _z_crit(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def normal_two_sided_p(z: float) -> float:
    """P(|Z| >= |z|) for a standard normal Z."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def wilson_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n; (nan, nan) when n == 0."""
    if n == 0:
        return (NAN, NAN)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    z = _z_crit(level)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The bounds are exactly 0 / 1 at the extremes; keep float noise from leaking out.
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """Pooled two-proportion z-test of p1 == p2; z = (p1 - p2) / se, two-sided p.

    Both proportions 0 (or both 1) gives zero pooled variance: there is no evidence of a
    difference, so (0.0, 1.0). An empty sample gives (nan, nan).
    """
    if n1 == 0 or n2 == 0:
        return (NAN, NAN)
    p1, p2 = k1 / n1, k2 / n2
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0.0:
        return (0.0, 1.0)
    z = (p1 - p2) / se
    return (z, normal_two_sided_p(z))


def _binom_half_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    if n <= 2000:
        # Exact integer arithmetic: int / int division is correctly rounded even for huge ints.
        term, tail = 1, 1
        for i in range(k):
            term = term * (n - i) // (i + 1)
            tail += term
        return tail / (1 << n)
    # Large n: log-space recurrence of the pmf, then log-sum-exp (relative error ~1e-12).
    i = np.arange(k, dtype=float)
    log_pmf = -n * math.log(2.0) + np.concatenate(([0.0], np.cumsum(np.log((n - i) / (i + 1)))))
    top = log_pmf.max()
    return float(math.exp(top) * np.exp(log_pmf - top).sum())


def mcnemar(b01: int, b10: int) -> float:
    """Exact McNemar test: two-sided binomial test of b01 vs b10 discordant pairs at p = 1/2."""
    if b01 < 0 or b10 < 0:
        raise ValueError("discordant counts must be non-negative")
    n = b01 + b10
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * _binom_half_cdf(min(b01, b10), n))


@dataclass(frozen=True)
class McNemarResult:
    b01: int  # before False, after True
    b10: int  # before True, after False
    p: float


def mcnemar_paired(before: np.ndarray, after: np.ndarray) -> McNemarResult:
    """Exact McNemar test on two aligned boolean arrays (same items, two conditions)."""
    x = np.asarray(before, dtype=bool)
    y = np.asarray(after, dtype=bool)
    if x.shape != y.shape:
        raise ValueError(f"arrays must be aligned, got shapes {x.shape} and {y.shape}")
    b01 = int(np.sum(~x & y))
    b10 = int(np.sum(x & ~y))
    return McNemarResult(b01=b01, b10=b10, p=mcnemar(b01, b10))


@dataclass(frozen=True)
class SignFlipResult:
    mean_diff: float
    p: float
    exact: bool  # True: all 2^m sign patterns enumerated; False: Monte Carlo
    n_nonzero: int


def _sign_rows(m: int, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of the 2^m x m matrix of all +-1 sign patterns."""
    codes = np.arange(start, stop, dtype=np.int64)[:, None]
    bits = (codes >> np.arange(m, dtype=np.int64)) & 1
    return 1.0 - 2.0 * bits


def sign_flip_test(diffs: np.ndarray, *, n_perm: int = 10000, seed: int = 0,
                   exact_max: int = 16, chunk: int = 4096) -> SignFlipResult:
    """Paired sign-flip permutation test of mean(diffs) == 0, two-sided.

    `diffs` holds one paired difference per independent unit (question). Under H0 each
    difference is symmetric about 0, so its sign is exchangeable. Zeros carry no information
    and are dropped. With m <= exact_max non-zero differences all 2^m sign patterns are
    enumerated (exact p); otherwise p = (1 + #{|T*| >= |T|}) / (1 + n_perm).
    """
    d = np.asarray(diffs, dtype=float).ravel()
    if np.any(~np.isfinite(d)):
        raise ValueError("diffs must be finite")
    mean = float(d.mean()) if d.size else NAN
    d = d[d != 0.0]
    m = d.size
    if m == 0:
        return SignFlipResult(mean_diff=mean, p=1.0, exact=True, n_nonzero=0)
    obs = abs(d.sum())
    # Permuted sums equal to the observed one can differ by rounding; count them as ties.
    thresh = obs - 1e-9 * np.abs(d).sum()
    if m <= exact_max:
        total = 1 << m
        hits = 0
        for start in range(0, total, chunk):
            rows = _sign_rows(m, start, min(total, start + chunk))
            hits += int(np.sum(np.abs(rows @ d) >= thresh))
        return SignFlipResult(mean_diff=mean, p=hits / total, exact=True, n_nonzero=m)
    rng = np.random.default_rng(seed)
    hits = 0
    block = max(1, min(n_perm, (1 << 22) // m))
    for start in range(0, n_perm, block):
        size = min(block, n_perm - start)
        signs = rng.integers(0, 2, size=(size, m)) * 2.0 - 1.0
        hits += int(np.sum(np.abs(signs @ d) >= thresh))
    return SignFlipResult(mean_diff=mean, p=(1 + hits) / (1 + n_perm), exact=False, n_nonzero=m)


def _percentile_ci(reps: np.ndarray, level: float) -> tuple[float, float]:
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return (NAN, NAN)
    alpha = 1.0 - level
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def bootstrap_ci(cluster_ids: np.ndarray, values: np.ndarray,
                 stat: Callable[[np.ndarray], float] = np.mean, *, n_boot: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of stat(values), resampling whole clusters with replacement.

    `cluster_ids[i]` names the cluster (question) of `values[i]`. A replicate draws as many
    clusters as there are, with replacement, and applies `stat` to all values of the drawn
    clusters (a cluster drawn twice counts twice). This keeps the correlation between values
    of one question, which an item-level bootstrap or Wilson interval would ignore.
    `stat=np.mean` takes a vectorised path (a ratio of weighted sums); any other callable is
    applied per replicate to the same draws. Empty input gives (nan, nan).
    """
    ids = np.asarray(cluster_ids)
    v = np.asarray(values, dtype=float).ravel()
    if ids.shape[0] != v.shape[0]:
        raise ValueError(f"cluster_ids and values differ in length: {ids.shape[0]} vs {v.size}")
    if v.size == 0:
        return (NAN, NAN)
    _, inv = np.unique(ids, return_inverse=True)
    inv = inv.ravel()
    n_c = int(inv.max()) + 1
    sums = np.bincount(inv, weights=v, minlength=n_c)
    counts = np.bincount(inv, minlength=n_c).astype(float)
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    block = max(1, min(n_boot, (1 << 22) // n_c))  # bounds memory of the weight matrix
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        draws = rng.integers(0, n_c, size=(size, n_c))
        offsets = np.arange(size)[:, None] * n_c
        w = np.bincount((draws + offsets).ravel(), minlength=size * n_c).reshape(size, n_c)
        if stat is np.mean:
            reps[start:start + size] = (w @ sums) / (w @ counts)
        else:
            for r in range(size):
                reps[start + r] = stat(np.repeat(v, w[r][inv]))
    return _percentile_ci(reps, level)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.concatenate(([0], np.flatnonzero(xs[1:] != xs[:-1]) + 1))
    ends = np.concatenate((starts[1:], [xs.size]))
    ranks = np.empty(xs.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney U).

    nan when either class is empty.
    """
    s = np.asarray(scores, dtype=float).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if np.any(np.isnan(s)):
        raise ValueError("scores must not contain nan")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return NAN
    rank_sum = _average_ranks(s)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc_ci(scores: np.ndarray, labels: np.ndarray, *, n_boot: int = 2000,
             level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUROC, resampling items (each item its own cluster).

    Replicates that miss a class are dropped.
    """
    s = np.asarray(scores, dtype=float).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.size == 0 or y.all() or not y.any():
        return (NAN, NAN)
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, s.size, size=s.size)
        reps[b] = auroc(s[idx], y[idx])
    return _percentile_ci(reps, level)
