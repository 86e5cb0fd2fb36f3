"""LocalizationResult: intervals from the one cluster bootstrap (nan dropped, undefined with too
few question groups), and files that give back everything they were written from."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mechlora import stats
from mechlora.errors import MechloraError
from mechlora.result import LocalizationResult

L = 4


def make_result(n_groups: int = 6, per_group: int = 2, *, n_boot: int = 137,
                seed: int = 0) -> LocalizationResult:
    """A result with every field filled, including nan restoration and an excluded pair."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    groups = [f"q{g}" for g in range(n_groups) for _ in range(per_group)]
    pair_ids = [f"{g}:{k}>{k + 1}" for g, k in zip(groups, range(n), strict=True)]
    resid = np.cumsum(rng.uniform(0, 0.4, size=(n, L)), axis=1)
    resid[1, 2] = np.nan  # a pair whose patched margin was not finite at one layer
    return LocalizationResult(
        model="toy", n_layers=L, components=("resid", "attn", "mlp"), positions="last",
        engine="cached", pair_ids=pair_ids, group_ids=groups,
        restoration={"resid": resid, "attn": rng.normal(size=(n, L)),
                     "mlp": rng.normal(size=(n, L))},
        margin_a=rng.normal(size=n), margin_b=rng.normal(size=n),
        divergence={"cosine": rng.uniform(size=(n, L)),
                    "logit_lens_kl": rng.uniform(size=(n, L))},
        excluded=[{"id": "q9:0>1", "margin_a": 1.0, "margin_b": 0.9,
                   "reason": "|m(a) - m(b)| < 0.25"}],
        settings={"engine": "auto", "min_delta": 0.25, "only_flips": False,
                  "n_pairs_in": n + 1, "seconds": 1.5},
        n_boot=n_boot)


def test_round_trip_gives_back_every_field(tmp_path):
    result = make_result()
    result.save(tmp_path)
    back = LocalizationResult.load(tmp_path)
    assert back.n_boot == 137
    for name in ("model", "n_layers", "components", "positions", "engine", "pair_ids",
                 "group_ids", "excluded", "settings"):
        assert getattr(back, name) == getattr(result, name), name
    for c in result.components:
        np.testing.assert_array_equal(back.restoration[c], result.restoration[c])
        for a, b in zip(back.ci(c), result.ci(c), strict=True):
            np.testing.assert_array_equal(a, b)
    for k in result.divergence:
        np.testing.assert_array_equal(back.divergence[k], result.divergence[k])
    np.testing.assert_array_equal(back.margin_a, result.margin_a)
    np.testing.assert_array_equal(back.margin_b, result.margin_b)
    for a, b in zip(back.score_ci(), result.score_ci(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.summary() == result.summary()
    doc = json.loads((tmp_path / "localization.json").read_text())
    assert doc["schema_version"] == 2 and doc["n_boot"] == 137
    assert doc["interval"]["min_groups"] == stats.MIN_CLUSTERS


def test_intervals_are_the_package_bootstrap():
    result = make_result()
    groups = np.asarray(result.group_ids)
    lo, hi = result.ci("attn")
    ref_lo, ref_hi = stats.bootstrap_ci(groups, result.restoration["attn"], n_boot=137)
    np.testing.assert_array_equal(lo, ref_lo)
    np.testing.assert_array_equal(hi, ref_hi)


def test_nan_is_dropped_not_counted_as_zero():
    result = make_result(per_group=1)
    result.restoration["resid"][:] = 1.0
    result.restoration["resid"][0, 2] = np.nan
    lo, hi = result.ci("resid")
    # Every finite value is 1: mean and interval are exactly 1 (nan_to_num pulled them down).
    assert result.mean("resid")[2] == 1.0
    assert (lo[2], hi[2]) == (1.0, 1.0)
    result.restoration["resid"][:, 3] = np.nan
    assert math.isnan(result.mean("resid")[3]) and math.isnan(result.ci("resid")[0][3])


def test_interval_undefined_with_few_groups(tmp_path):
    few = make_result(n_groups=stats.MIN_CLUSTERS - 1, per_group=3)
    lo, hi = few.ci("resid")
    assert np.isnan(lo).all() and np.isnan(hi).all()
    assert np.isnan(few.score_ci()[0]).all()
    assert np.isfinite(few.mean("attn")).all()  # the means are still given
    few.save(tmp_path)
    doc = json.loads((tmp_path / "localization.json").read_text())
    assert doc["restoration"]["attn"]["ci_low"] == [None] * L
    enough = make_result(n_groups=stats.MIN_CLUSTERS, per_group=3)
    lo, hi = enough.ci("attn")
    assert np.isfinite(lo).all() and (lo < hi).all()


def test_version_1_still_reads(tmp_path):
    make_result().save(tmp_path)
    path = tmp_path / "localization.json"
    doc = json.loads(path.read_text())
    doc["schema_version"] = 1
    del doc["n_boot"], doc["interval"]
    path.write_text(json.dumps(doc))
    back = LocalizationResult.load(tmp_path)
    assert back.n_boot == 1000  # what every version-1 writer used
    doc["schema_version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(MechloraError, match="schema version 99"):
        LocalizationResult.load(tmp_path)
