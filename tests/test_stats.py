import math
from fractions import Fraction
from itertools import product

import numpy as np
import pytest
from scipy import stats as scipy_stats  # an independent reference (dev extra), not a dependency

from mechlora import stats

# ---- Wilson -----------------------------------------------------------------------------------

def test_wilson_hand_computed():
    lo, hi = stats.wilson_ci(5, 10)
    assert lo == pytest.approx(0.236593, abs=1e-6)
    assert hi == pytest.approx(0.763407, abs=1e-6)
    z2 = 1.959963984540054**2
    assert stats.wilson_ci(0, 10) == (0.0, pytest.approx(z2 / (10 + z2)))
    assert stats.wilson_ci(10, 10) == (pytest.approx(10 / (10 + z2)), 1.0)


def test_wilson_empty_is_nan():
    lo, hi = stats.wilson_ci(0, 0)
    assert math.isnan(lo) and math.isnan(hi)


@pytest.mark.parametrize("k,n", [(0, 1), (1, 3), (7, 20), (50, 158), (158, 158), (3, 1000)])
@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_wilson_matches_scipy(k, n, level):
    ref = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    lo, hi = stats.wilson_ci(k, n, level)
    assert lo == pytest.approx(ref.low, abs=1e-12)
    assert hi == pytest.approx(ref.high, abs=1e-12)


def test_wilson_rejects_bad_input():
    with pytest.raises(ValueError):
        stats.wilson_ci(5, 3)
    with pytest.raises(ValueError):
        stats.wilson_ci(1, 3, level=1.0)


# ---- two-proportion z -------------------------------------------------------------------------

def test_two_proportion_z_hand_computed():
    z, p = stats.two_proportion_z(30, 100, 20, 100)
    se = math.sqrt(0.25 * 0.75 * (2 / 100))
    assert z == pytest.approx(0.1 / se)
    assert z == pytest.approx(1.632993, abs=1e-6)
    assert p == pytest.approx(2 * scipy_stats.norm.sf(z), rel=1e-12)


def test_two_proportion_z_sign_and_symmetry():
    z1, p1 = stats.two_proportion_z(23, 158, 7, 158)
    z2, p2 = stats.two_proportion_z(7, 158, 23, 158)
    assert z1 > 0 and z2 == pytest.approx(-z1) and p1 == pytest.approx(p2)


def test_two_proportion_z_degenerate():
    assert stats.two_proportion_z(0, 10, 0, 20) == (0.0, 1.0)
    assert stats.two_proportion_z(10, 10, 20, 20) == (0.0, 1.0)
    assert stats.two_proportion_z(4, 10, 8, 20) == (0.0, 1.0)
    z, p = stats.two_proportion_z(1, 0, 1, 2)
    assert math.isnan(z) and math.isnan(p)


# ---- McNemar ----------------------------------------------------------------------------------

def test_mcnemar_hand_computed():
    assert stats.mcnemar(0, 5) == pytest.approx(2 / 32)
    assert stats.mcnemar(5, 0) == pytest.approx(2 / 32)
    assert stats.mcnemar(1, 5) == pytest.approx(2 * 7 / 64)
    assert stats.mcnemar(3, 3) == 1.0
    assert stats.mcnemar(0, 0) == 1.0
    assert stats.mcnemar(0, 1) == 1.0


@pytest.mark.parametrize("b01,b10", [(2, 9), (10, 3), (17, 17), (40, 61), (0, 30),
                                     (1400, 1600), (2500, 2610), (10, 4000)])
def test_mcnemar_matches_scipy_binomtest(b01, b10):
    ref = scipy_stats.binomtest(b01, b01 + b10, 0.5).pvalue
    assert stats.mcnemar(b01, b10) == pytest.approx(ref, rel=1e-9, abs=1e-300)


def test_mcnemar_paired_counts():
    before = np.array([1, 1, 0, 0, 1, 0, 0], dtype=bool)
    after = np.array([1, 0, 1, 1, 1, 1, 0], dtype=bool)
    r = stats.mcnemar_paired(before, after)
    assert (r.b01, r.b10) == (3, 1)
    assert r.p == pytest.approx(stats.mcnemar(3, 1))
    assert r.p == pytest.approx(2 * 5 / 16)
    with pytest.raises(ValueError):
        stats.mcnemar_paired(before, after[:-1])


# ---- sign-flip permutation --------------------------------------------------------------------

def test_sign_flip_hand_computed():
    # Sums of +-1 +-2 +-3: 6 4 2 0 0 -2 -4 -6; |T| >= 6 in 2 of 8 patterns.
    r = stats.sign_flip_test([1.0, 2.0, 3.0, 0.0, 0.0])
    assert r.exact and r.n_nonzero == 3
    assert r.p == pytest.approx(0.25)
    assert r.mean_diff == pytest.approx(6 / 5)


def test_sign_flip_all_zero_and_empty():
    assert stats.sign_flip_test(np.zeros(7)).p == 1.0
    assert stats.sign_flip_test([]).p == 1.0


def test_sign_flip_float_ties_counted():
    # Many sign patterns tie with the observed |sum| exactly, but not in floating point.
    d = [0.1, 0.2, -0.3, 0.3, 0.6, -0.4, 0.7]
    exact = [Fraction(str(x)) for x in d]
    obs = abs(sum(exact))
    hits = sum(abs(sum(s * x for s, x in zip(signs, exact, strict=True))) >= obs
               for signs in product((1, -1), repeat=len(d)))
    assert stats.sign_flip_test(d).p == pytest.approx(hits / 2 ** len(d))


def test_sign_flip_matches_scipy_exact():
    rng = np.random.default_rng(3)
    d = np.round(rng.normal(0.4, 1.0, size=12), 2)
    ref = scipy_stats.permutation_test((d,), np.mean, permutation_type="samples",
                                       n_resamples=np.inf).pvalue
    assert stats.sign_flip_test(d).p == pytest.approx(ref, rel=1e-9)


def test_sign_flip_monte_carlo_close_to_exact():
    rng = np.random.default_rng(1)
    d = rng.normal(0.3, 1.0, size=18)
    exact = stats.sign_flip_test(d, exact_max=20)
    mc = stats.sign_flip_test(d, exact_max=10, n_perm=20000, seed=5)
    assert exact.exact and not mc.exact
    assert mc.p == pytest.approx(exact.p, abs=0.01)
    assert stats.sign_flip_test(d, exact_max=10, seed=5).p == stats.sign_flip_test(
        d, exact_max=10, seed=5).p


# ---- cluster bootstrap ------------------------------------------------------------------------

def test_bootstrap_degenerate_cases():
    ids = np.repeat(np.arange(6), 2)
    assert stats.bootstrap_ci(ids, np.full(12, 2.0)) == (2.0, 2.0)
    lo, hi = stats.bootstrap_ci([], [])
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError):
        stats.bootstrap_ci([1, 2], [1.0])
    with pytest.raises(ValueError):
        stats.bootstrap_ci(ids, np.ones(12), n_boot=0)


def test_bootstrap_undefined_below_min_clusters():
    # One question, or four: an interval from so few clusters would mostly miss the truth.
    lo, hi = stats.bootstrap_ci(["a"] * 4, [0.0, 1.0, 1.0, 0.0])
    assert math.isnan(lo) and math.isnan(hi)
    ids = np.repeat(np.arange(stats.MIN_CLUSTERS - 1), 3)
    assert math.isnan(stats.bootstrap_ci(ids, np.arange(ids.size, dtype=float))[0])
    ids = np.repeat(np.arange(stats.MIN_CLUSTERS), 3)
    lo, hi = stats.bootstrap_ci(ids, np.arange(ids.size, dtype=float))
    assert lo < ids.size / 2 < hi
    assert stats.bootstrap_ci(["a"] * 4, [0.0, 1.0, 1.0, 0.0], min_clusters=1) == (0.5, 0.5)


def test_bootstrap_drops_nan_instead_of_counting_zero():
    ids = np.repeat(np.arange(10), 3)
    v = np.ones(30)
    v[[0, 4, 5]] = np.nan
    assert stats.bootstrap_ci(ids, v) == (1.0, 1.0)
    # The same as leaving those rows out; a cluster with only nan values is no cluster.
    rng = np.random.default_rng(0)
    w = rng.normal(size=30)
    w[[3, 4, 5]] = np.nan  # all of cluster 1
    keep = np.isfinite(w)
    # Cluster 1 has no finite value: resampling the other nine gives the same distribution,
    # but not the same draws, so compare with a wide tolerance and the count of clusters.
    lo, hi = stats.bootstrap_ci(ids, w, n_boot=4000)
    ref = stats.bootstrap_ci(ids[keep], w[keep], n_boot=4000)
    assert (lo, hi) == pytest.approx(ref, abs=0.08)
    few = np.full(30, np.nan)
    few[:3 * (stats.MIN_CLUSTERS - 1)] = 1.0
    assert math.isnan(stats.bootstrap_ci(ids, few)[0])


def test_bootstrap_matrix_equals_each_column():
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 12, size=60).astype(str)
    v = rng.normal(size=(60, 3, 2))
    v[rng.random(v.shape) < 0.1] = np.nan
    lo, hi = stats.bootstrap_ci(ids, v, n_boot=300, seed=4)
    assert lo.shape == hi.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            ref = stats.bootstrap_ci(ids, v[:, i, j], n_boot=300, seed=4)
            assert (lo[i, j], hi[i, j]) == pytest.approx(ref, rel=1e-12)


def test_bootstrap_replicates_match_a_direct_resampling():
    """The vectorised weights equal drawing clusters and pooling their rows by hand."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 15, size=80)
    v = rng.normal(size=80)
    n_boot, level = 400, 0.9
    lo, hi = stats.bootstrap_ci(ids, v, n_boot=n_boot, level=level, seed=3)
    # Same stream of draws: one [n_boot, n_clusters] block of integers from the same seed.
    clusters = np.unique(ids)
    draws = np.random.default_rng(3).integers(0, clusters.size, size=(n_boot, clusters.size))
    reps = [np.concatenate([v[ids == clusters[c]] for c in row]).mean() for row in draws]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(reps, [0.05, 0.95])), rel=1e-12)


def test_bootstrap_resamples_clusters_not_items():
    # 20 questions, each with 50 identical outcomes: the effective sample size is 20, not 1000.
    ids = np.repeat(np.arange(20), 50)
    v = np.repeat(np.arange(20) % 2, 50).astype(float)
    lo, hi = stats.bootstrap_ci(ids, v, n_boot=4000, seed=0)
    w_lo, w_hi = stats.wilson_ci(500, 1000)
    c_lo, c_hi = stats.wilson_ci(10, 20)
    assert hi - lo > 3 * (w_hi - w_lo)
    assert hi - lo == pytest.approx(c_hi - c_lo, rel=0.25)


def test_bootstrap_seed():
    ids = np.arange(50)
    v = np.arange(50, dtype=float)
    assert stats.bootstrap_ci(ids, v, seed=2) == stats.bootstrap_ci(ids, v, seed=2)
    assert stats.bootstrap_ci(ids, v, seed=2) != stats.bootstrap_ci(ids, v, seed=3)


# ---- seeds x questions ------------------------------------------------------------------------

def test_crossed_estimate_and_per_seed_are_weighted_means():
    d = np.array([[0.0, 1.0, np.nan], [2.0, 2.0, 4.0]])
    w = np.array([1.0, 3.0, 2.0])
    r = stats.crossed_bootstrap(d, weights=w, min_questions=1, n_boot=50)
    assert r.per_seed == pytest.approx((3 / 4, (2 + 6 + 8) / 6))
    assert r.estimate == pytest.approx((3 + 16) / 10)
    assert (r.n_seeds, r.n_questions) == (2, 3)
    with pytest.raises(ValueError, match="weights"):
        stats.crossed_bootstrap(d, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="n_seeds, n_questions"):
        stats.crossed_bootstrap(np.ones(4))


def test_crossed_exact_distribution_with_seed_effect_only():
    # d[s, q] = a_s: each replicate is the mean of a seed resample of (0, 1), so it is 0, 1/2
    # or 1 with probabilities 1/4, 1/2, 1/4, whatever the questions drawn.
    d = np.repeat([[0.0], [1.0]], 6, axis=1)
    r = stats.crossed_bootstrap(d, n_boot=4000, seed=1)
    assert r.estimate == 0.5 and r.ci == (0.0, 1.0)
    # P*(mean <= 0) is about 1/4: p = 2 (1 + #) / (1 + B) is about 1/2.
    assert r.p == pytest.approx(0.5, abs=0.05)
    const = stats.crossed_bootstrap(np.full((3, 8), 0.2), n_boot=500)
    assert const.ci == pytest.approx((0.2, 0.2)) and const.p == pytest.approx(2 / 501)
    zero = stats.crossed_bootstrap(np.zeros((3, 8)), n_boot=500)
    assert zero.ci == (0.0, 0.0) and zero.p == 1.0


def test_crossed_undefined_with_one_seed_or_few_questions():
    rng = np.random.default_rng(0)
    one = stats.crossed_bootstrap(rng.normal(size=(1, 30)))
    assert math.isnan(one.ci[0]) and math.isnan(one.p) and math.isfinite(one.estimate)
    few = stats.crossed_bootstrap(rng.normal(size=(4, stats.MIN_CLUSTERS - 1)))
    assert math.isnan(few.ci[1])
    # Seeds or questions with no data at all do not count.
    d = rng.normal(size=(3, 10))
    d[1:] = np.nan
    assert stats.crossed_bootstrap(d).n_seeds == 1 and math.isnan(stats.crossed_bootstrap(d).p)


def _simulated(rng, n_seeds, n_questions, mu, sd_seed, sd_question=0.5, sd_cell=1.0):
    return (mu + sd_seed * rng.normal(size=(n_seeds, 1))
            + sd_question * rng.normal(size=(1, n_questions))
            + sd_cell * rng.normal(size=(n_seeds, n_questions)))


def test_crossed_interval_includes_seed_variance():
    # Seeds that differ a lot: an interval over questions alone is far too narrow.
    rng = np.random.default_rng(3)
    d = _simulated(rng, 6, 40, 0.0, sd_seed=1.0)
    lo, hi = stats.crossed_bootstrap(d, n_boot=1000).ci
    q_lo, q_hi = stats.bootstrap_ci(np.tile(np.arange(40), 6), d.ravel(), n_boot=1000)
    assert hi - lo > 2.5 * (q_hi - q_lo)
    # Without seed variance the two agree roughly.
    d = _simulated(rng, 6, 40, 0.0, sd_seed=0.0, sd_cell=0.3)
    lo, hi = stats.crossed_bootstrap(d, n_boot=1000).ci
    q_lo, q_hi = stats.bootstrap_ci(np.tile(np.arange(40), 6), d.ravel(), n_boot=1000)
    assert hi - lo == pytest.approx(q_hi - q_lo, rel=0.35)


def test_crossed_finds_a_planted_difference_and_not_a_null_one():
    rng = np.random.default_rng(4)
    planted = stats.crossed_bootstrap(_simulated(rng, 6, 40, 1.0, sd_seed=0.5), n_boot=1000)
    assert planted.p < 0.01 and planted.ci[0] > 0
    ps = np.array([stats.crossed_bootstrap(_simulated(rng, 8, 30, 0.0, sd_seed=0.5),
                                           n_boot=300, seed=k).p for k in range(150)])
    # Roughly uniform under the null: about 5% below 0.05 (this bootstrap errs slightly
    # liberal with 8 seeds, see docs/metrics.md), about half below 0.5.
    assert np.mean(ps < 0.05) < 0.15
    assert 0.3 < np.mean(ps < 0.5) < 0.7
    assert 0.3 < ps.mean() < 0.7


def test_seed_sign_flip_exact():
    # Five seeds all better: the most extreme of 32 patterns on each side, p = 2 / 32.
    d = np.array([[1.0, 2.0], [2.0, 2.0], [0.5, 1.5], [3.0, 1.0], [1.0, 1.0]])
    r = stats.seed_sign_flip_test(d)
    assert r.exact and r.p == pytest.approx(2 / 32)
    assert r.mean_diff == pytest.approx(np.mean(d.mean(1)))
    assert math.isnan(stats.seed_sign_flip_test(d[:4]).p)  # too few seeds to ever reject
    rng = np.random.default_rng(6)
    d = rng.normal(0.3, 1.0, size=(9, 12))
    w = rng.integers(1, 5, size=12).astype(float)
    per_seed = (d * w).sum(1) / w.sum()
    ref = scipy_stats.permutation_test((per_seed,), np.mean, permutation_type="samples",
                                       n_resamples=np.inf).pvalue
    assert stats.seed_sign_flip_test(d, weights=w).p == pytest.approx(ref, rel=1e-9)


def test_seed_rate():
    rng = np.random.default_rng(7)
    pairs = rng.integers(1, 40, size=25).astype(float)  # wording pairs per question
    flips = rng.binomial(pairs.astype(int), 0.2, size=(3, 25))
    r = stats.seed_rate(flips / pairs, weights=pairs, n_boot=500)
    assert r.mean == pytest.approx(flips.sum() / (3 * pairs.sum()))  # the pooled rate
    assert r.per_seed == pytest.approx(tuple(flips.sum(1) / pairs.sum()))
    assert r.ci[0] < r.mean < r.ci[1] and (r.n_seeds, r.n_questions) == (3, 25)


# ---- AUROC ------------------------------------------------------------------------------------

def test_auroc_hand_computed():
    assert stats.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert stats.auroc([1.0, 1.0], [0, 1]) == 0.5
    assert stats.auroc([0, 1, 2, 3], [0, 0, 1, 1]) == 1.0
    assert stats.auroc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    # pos {2, 2}, neg {1, 2}: pairs 1, 0.5, 1, 0.5 -> 0.75
    assert stats.auroc([2, 2, 1, 2], [1, 1, 0, 0]) == pytest.approx(0.75)
    assert math.isnan(stats.auroc([1, 2], [1, 1]))
    with pytest.raises(ValueError):
        stats.auroc([float("nan"), 1.0], [0, 1])


def test_auroc_matches_mann_whitney():
    rng = np.random.default_rng(4)
    s = np.round(rng.normal(size=200), 1)  # rounding forces many ties
    y = rng.random(200) < 0.3 + 0.2 * (s > 0)
    u = scipy_stats.mannwhitneyu(s[y], s[~y]).statistic
    assert stats.auroc(s, y) == pytest.approx(u / (y.sum() * (~y).sum()), rel=1e-12)


def test_auroc_ci():
    rng = np.random.default_rng(5)
    s = rng.normal(size=100)
    y = rng.random(100) < 1 / (1 + np.exp(-2 * s))
    lo, hi = stats.auroc_ci(s, y, n_boot=500)
    assert 0.0 <= lo < stats.auroc(s, y) < hi <= 1.0
    lo, hi = stats.auroc_ci([1.0, 2.0], [1, 1])
    assert math.isnan(lo) and math.isnan(hi)
    lo, hi = stats.auroc_ci([1.0, 2.0, 3.0, 4.0], [0, 1, 0, 1])  # fewer than MIN_CLUSTERS
    assert math.isnan(lo) and math.isnan(hi)
