import math
from fractions import Fraction
from itertools import product

import numpy as np
import pytest

from mechlora import stats

scipy_stats = pytest.importorskip("scipy.stats")  # independent reference only, not a dependency


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
    assert stats.bootstrap_ci(["a"] * 4, [0.0, 1.0, 1.0, 0.0]) == (0.5, 0.5)
    assert stats.bootstrap_ci([1, 2, 3], [2.0, 2.0, 2.0]) == (2.0, 2.0)
    lo, hi = stats.bootstrap_ci([], [])
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError):
        stats.bootstrap_ci([1, 2], [1.0])


def test_bootstrap_mean_fast_path_equals_generic_path():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 40, size=300).astype(str)
    v = rng.normal(size=300)
    fast = stats.bootstrap_ci(ids, v, n_boot=500, seed=7)
    slow = stats.bootstrap_ci(ids, v, lambda x: float(np.mean(x)), n_boot=500, seed=7)
    assert fast == pytest.approx(slow, rel=1e-12)
    assert fast[0] < v.mean() < fast[1]


def test_bootstrap_resamples_clusters_not_items():
    # 20 questions, each with 50 identical outcomes: the effective sample size is 20, not 1000.
    ids = np.repeat(np.arange(20), 50)
    v = np.repeat(np.arange(20) % 2, 50).astype(float)
    lo, hi = stats.bootstrap_ci(ids, v, n_boot=4000, seed=0)
    w_lo, w_hi = stats.wilson_ci(500, 1000)
    c_lo, c_hi = stats.wilson_ci(10, 20)
    assert hi - lo > 3 * (w_hi - w_lo)
    assert hi - lo == pytest.approx(c_hi - c_lo, rel=0.25)


def test_bootstrap_other_statistic_and_seed():
    ids = np.arange(50)
    v = np.arange(50, dtype=float)
    lo, hi = stats.bootstrap_ci(ids, v, np.median, n_boot=300, seed=2)
    assert lo < 24.5 < hi
    assert stats.bootstrap_ci(ids, v, seed=2) == stats.bootstrap_ci(ids, v, seed=2)
    assert stats.bootstrap_ci(ids, v, seed=2) != stats.bootstrap_ci(ids, v, seed=3)


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
