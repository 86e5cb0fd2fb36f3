"""Small statistics for the evaluation metrics, numpy only (no scipy at runtime).

Conventions: `level` is the two-sided confidence level; p-values are two-sided; an undefined
quantity (no data, or too few clusters for an interval) is `nan`, never an exception, so a
report can say "n = 0" instead of crashing. Every bootstrap in mechlora is the one cluster
bootstrap here (`bootstrap_ci` over questions, `crossed_bootstrap` over seeds x questions, and
its replicates shared by several columns, `crossed_replicates`).
Formulas and when to use which: docs/metrics.md.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

__all__ = [
    "MIN_CLUSTERS",
    "MIN_SIGN_FLIP_SEEDS",
    "CrossedBootstrapResult",
    "McNemarResult",
    "SeedRate",
    "SignFlipResult",
    "auroc",
    "auroc_ci",
    "bootstrap_ci",
    "crossed_bootstrap",
    "crossed_replicates",
    "mcnemar",
    "mcnemar_paired",
    "normal_two_sided_p",
    "seed_rate",
    "seed_sign_flip_test",
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


# ---- cluster bootstrap (one implementation: questions, or seeds x questions) -------------------

MIN_CLUSTERS = 5
"""Fewest clusters (questions) for which a bootstrap interval is given; with fewer it is nan.

With n clusters a percentile bootstrap of a mean has few distinct resamples and shrinks the
standard error by sqrt((n - 1) / n): a nominal 95% interval covered the truth in 51% of
simulated data sets at n = 2, 74% at 3, 84% at 5 and 89% at 10 (docs/metrics.md,
analyses/bootstrap_coverage.py). Below 5 an interval looks precise and misses too often."""

MIN_SIGN_FLIP_SEEDS = 5
"""Fewest seeds for the sign-flip test over seeds: with m seeds its smallest p is 2 / 2^m
(0.0625 at 5 seeds, 0.25 at 3), so with fewer it cannot reject at any usual level."""


def _resample_counts(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """[size, n]: how often each of n units is drawn in each of `size` resamples of n."""
    draws = rng.integers(0, n, size=(size, n))
    offsets = np.arange(size)[:, None] * n
    flat = np.bincount((draws + offsets).ravel(), minlength=size * n)
    return flat.reshape(size, n).astype(float)


def _replicate_ratios(sums: np.ndarray, counts: np.ndarray, *, n_boot: int, seed: int,
                      resample_rows: bool) -> np.ndarray:
    """[n_boot, K] bootstrap replicates of sum(sums) / sum(counts) over a [R, C, K] table.

    Every replicate resamples the C columns (questions) with replacement, and the R rows
    (seeds) too when `resample_rows`, independently of the columns: the crossed design, where
    a cell whose row is drawn i times and whose column j times counts i * j times. A replicate
    with no count in one of the K columns gives nan there.
    """
    n_rows, n_cols, k = sums.shape
    by_col = [t.transpose(1, 0, 2).reshape(n_cols, n_rows * k) for t in (sums, counts)]
    rng = np.random.default_rng(seed)
    reps = np.empty((n_boot, k))
    block = max(1, min(n_boot, (1 << 22) // (n_cols + 2 * n_rows * k)))  # bounds the memory
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        w_col = _resample_counts(rng, n_cols, size)
        w_row = (_resample_counts(rng, n_rows, size) if resample_rows
                 else np.ones((size, n_rows)))[:, :, None]
        num, den = ((w_row * (w_col @ t).reshape(size, n_rows, k)).sum(1) for t in by_col)
        with np.errstate(invalid="ignore", divide="ignore"):
            reps[start:start + size] = num / den
    return reps


def _percentiles(reps: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Per column of [B, K] replicates, the two-sided percentile interval of the finite ones."""
    alpha = 1.0 - level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column with no finite replicate
        lo, hi = np.nanquantile(reps, [alpha / 2, 1 - alpha / 2], axis=0)
    return lo, hi


def _check_boot(n_boot: int, level: float) -> None:
    _z_crit(level)
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")


def bootstrap_ci(cluster_ids: np.ndarray, values: np.ndarray, *, n_boot: int = 2000,
                 level: float = 0.95, seed: int = 0, min_clusters: int = MIN_CLUSTERS
                 ) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """Percentile cluster-bootstrap CI of the mean of `values`, resampling whole clusters.

    `values` is [n] or [n, ...] (one row per item: a pair, a wording) and `cluster_ids[i]`
    names the cluster (question) of row i. A replicate draws as many clusters as there are,
    with replacement, and takes the mean over every row of the drawn clusters (a cluster drawn
    twice counts twice): the pooled mean, as in the point estimate. This keeps the correlation
    between the items of one question, which an item-level bootstrap or Wilson interval
    ignores. Non-finite values are left out (column by column), never counted as 0. Where fewer
    than `min_clusters` clusters hold a finite value the interval is undefined: (nan, nan),
    not a zero-width interval. Returns floats for [n] input, else arrays of shape
    `values.shape[1:]`.
    """
    _check_boot(n_boot, level)
    ids = np.asarray(cluster_ids)
    v = np.asarray(values, dtype=float)
    if ids.ndim != 1 or v.ndim == 0 or ids.shape[0] != v.shape[0]:
        raise ValueError(f"cluster_ids and values differ in length: {ids.shape} vs {v.shape}")
    flat = v.reshape(v.shape[0], math.prod(v.shape[1:]))
    lo = hi = np.full(flat.shape[1], NAN)
    if v.shape[0]:
        _, inv = np.unique(ids, return_inverse=True)
        inv = inv.ravel()
        ok = np.isfinite(flat)
        sums = np.zeros((int(inv.max()) + 1, flat.shape[1]))
        counts = np.zeros_like(sums)
        np.add.at(sums, inv, np.where(ok, flat, 0.0))
        np.add.at(counts, inv, ok)
        reps = _replicate_ratios(sums[None], counts[None], n_boot=n_boot, seed=seed,
                                 resample_rows=False)
        lo, hi = _percentiles(reps, level)
        few = (counts > 0).sum(0) < min_clusters
        lo[few], hi[few] = NAN, NAN
    if v.ndim == 1:
        return (float(lo[0]), float(hi[0]))
    return lo.reshape(v.shape[1:]), hi.reshape(v.shape[1:])


# ---- seeds x questions (comparing trained arms) -----------------------------------------------

@dataclass(frozen=True)
class CrossedBootstrapResult:
    estimate: float  # weighted mean of the finite cells of d[s, q]
    ci: tuple[float, float]  # percentile interval, resampling seeds and questions
    p: float  # two-sided bootstrap p-value of mean == 0
    per_seed: tuple[float, ...]  # weighted mean over questions, one per seed (nan: no data)
    n_seeds: int  # seeds with data
    n_questions: int  # questions with data


@dataclass(frozen=True)
class SeedRate:
    mean: float  # weighted mean over seeds and questions
    ci: tuple[float, float]  # seed + question interval (crossed bootstrap)
    per_seed: tuple[float, ...]  # the rate of each seed (one point per seed in a plot)
    n_seeds: int
    n_questions: int


def _seed_table(values: np.ndarray, weights: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sums and weights per (seed, question) cell; non-finite cells weigh 0."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2:
        raise ValueError(f"values must be [n_seeds, n_questions], got shape {v.shape}")
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
    try:
        w = np.broadcast_to(w, v.shape)
    except ValueError:
        raise ValueError(f"weights of shape {w.shape} do not fit values of shape {v.shape}; "
                         "give [n_questions] or [n_seeds, n_questions]") from None
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    ok = np.isfinite(v) & (w > 0)
    return np.where(ok, v * w, 0.0), np.where(ok, w, 0.0)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), NAN)


def crossed_bootstrap(values: np.ndarray, *, weights: np.ndarray | None = None,
                      n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                      min_seeds: int = 2, min_questions: int = MIN_CLUSTERS
                      ) -> CrossedBootstrapResult:
    """Mean of per-(seed, question) values d[s, q] with a seed x question bootstrap.

    Training seeds and questions are both random draws and every seed answers the same
    questions (a crossed design). Each replicate draws a resample of the seeds and,
    independently, one of the questions, both with replacement, and takes the weighted mean
    of d over the drawn cells (a cell whose seed is drawn i times and whose question j times
    counts i * j times). `weights` ([n_questions] or [n_seeds, n_questions], e.g. the number
    of wording pairs per question) make the mean the pooled one; nan cells are left out.
    The p-value inverts the percentile interval: p = min(1, 2 min(P*(mean <= 0),
    P*(mean >= 0))), with +1 in numerator and denominator. The interval and p are nan with
    fewer than `min_seeds` seeds (one seed cannot show training variance) or `min_questions`
    questions. For d = rate(A) - rate(B) per seed and question this is the comparison of
    arms A and B; see docs/metrics.md for its coverage with few seeds.
    """
    _check_boot(n_boot, level)
    sums, counts = _seed_table(values, weights)
    rows, cols = counts.sum(1) > 0, counts.sum(0) > 0
    per_seed = tuple(float(x) for x in _ratio(sums.sum(1), counts.sum(1)))
    estimate = float(_ratio(sums.sum(), counts.sum()))
    n_seeds, n_questions = int(rows.sum()), int(cols.sum())
    if n_seeds < min_seeds or n_questions < min_questions:
        return CrossedBootstrapResult(estimate, (NAN, NAN), NAN, per_seed, n_seeds, n_questions)
    table = [t[rows][:, cols][:, :, None] for t in (sums, counts)]
    reps = _replicate_ratios(*table, n_boot=n_boot, seed=seed, resample_rows=True)[:, 0]
    reps = reps[np.isfinite(reps)]
    lo, hi = _percentiles(reps[:, None], level)
    below, above = (1 + np.sum(reps <= 0), 1 + np.sum(reps >= 0))
    p = min(1.0, 2 * min(below, above) / (1 + reps.size))
    return CrossedBootstrapResult(estimate, (float(lo[0]), float(hi[0])), float(p), per_seed,
                                  n_seeds, n_questions)


def crossed_replicates(sums: np.ndarray, counts: np.ndarray, *, n_boot: int = 2000,
                       seed: int = 0) -> np.ndarray:
    """[n_boot, K] seed x question bootstrap replicates of the pooled ratios
    sum(sums[..., k]) / sum(counts[..., k]) of a [n_seeds, n_questions, K] table.

    The resampling of `crossed_bootstrap`, shared by the K columns: each replicate draws the
    questions and, independently, the seeds once for all of them, so statistics that combine
    columns (differences, a rank correlation over windows) keep their dependence. A column
    constant over seeds (an untrained base) gives its question-resampled ratio. nan where a
    replicate draws no count.
    """
    _check_boot(n_boot, 0.95)
    sums, counts = np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)
    if sums.ndim != 3 or sums.shape != counts.shape:
        raise ValueError(f"sums and counts must be [n_seeds, n_questions, K] alike, got "
                         f"{sums.shape} and {counts.shape}")
    return _replicate_ratios(sums, counts, n_boot=n_boot, seed=seed, resample_rows=True)


def seed_rate(values: np.ndarray, *, weights: np.ndarray | None = None, n_boot: int = 2000,
              level: float = 0.95, seed: int = 0) -> SeedRate:
    """One arm's rate over seeds: values[s, q] is seed s's rate on question q (e.g. flipped
    pairs / pairs); the mean over seeds and questions with a seed + question interval
    (`crossed_bootstrap`), and the rate of each seed. Pass the pairs per question as
    `weights` to get the pooled rate."""
    r = crossed_bootstrap(values, weights=weights, n_boot=n_boot, level=level, seed=seed)
    return SeedRate(r.estimate, r.ci, r.per_seed, r.n_seeds, r.n_questions)


def seed_sign_flip_test(values: np.ndarray, *, weights: np.ndarray | None = None,
                        min_seeds: int = MIN_SIGN_FLIP_SEEDS) -> SignFlipResult:
    """Exact sign-flip test over seeds of mean d == 0, on d[s, q] per seed and question.

    Each seed's weighted mean over questions is one paired difference; under H0 its sign is
    exchangeable, and all 2^m sign patterns are enumerated (up to 20 seeds; Monte Carlo
    above). The questions are held fixed: the test generalises over training seeds, not over
    questions (`crossed_bootstrap` covers both). With fewer than `min_seeds` seeds with data
    p is nan: the smallest p it can give is 2 / 2^m.
    """
    sums, counts = _seed_table(values, weights)
    per_seed = _ratio(sums.sum(1), counts.sum(1))
    per_seed = per_seed[np.isfinite(per_seed)]
    if per_seed.size < min_seeds:
        mean = float(per_seed.mean()) if per_seed.size else NAN
        return SignFlipResult(mean_diff=mean, p=NAN, exact=True,
                              n_nonzero=int(np.sum(per_seed != 0)))
    return sign_flip_test(per_seed, exact_max=20)


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
             level: float = 0.95, seed: int = 0, min_items: int = MIN_CLUSTERS
             ) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUROC, resampling items (one item per question).

    Replicates that miss a class are dropped; (nan, nan) with fewer than `min_items` items or
    a single class, as for `bootstrap_ci`.
    """
    _check_boot(n_boot, level)
    s = np.asarray(scores, dtype=float).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.size < min_items or y.all() or not y.any():
        return (NAN, NAN)
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, s.size, size=s.size)
        reps[b] = auroc(s[idx], y[idx])
    lo, hi = _percentiles(reps[:, None], level)
    return (float(lo[0]), float(hi[0]))
