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
    assert doc["schema_version"] == 3 and doc["n_boot"] == 137
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


def test_report_figures_say_when_there_is_no_interval():
    from mechlora.report.localize import restoration_figure, score_figure

    few = make_result(n_groups=stats.MIN_CLUSTERS - 1, per_group=3)
    enough = make_result(n_groups=stats.MIN_CLUSTERS, per_group=3)
    for fig, bands in ((restoration_figure(few), 0), (restoration_figure(enough), 3)):
        assert sum(t.fill == "toself" for t in fig.data) == bands
    assert "no interval" in restoration_figure(few).layout.title.text
    assert "no interval" in score_figure(few).layout.title.text
    assert "bootstrap" in score_figure(enough).layout.title.text


def full_result(n_groups: int = 6, seed: int = 1) -> LocalizationResult:
    """`make_result` with every version-3 field: labels, heads, positions, specs, a gap."""
    from mechlora.effects import SpecEffect, direction_of_id

    result = make_result(n_groups=n_groups, seed=seed)
    rng = np.random.default_rng(seed)
    n = result.n_pairs
    result.pair_ids = [f"q{i // 2}:{0 if i % 2 else 1}>{1 if i % 2 else 0}" for i in range(n)]
    result.directions = [direction_of_id(p) for p in result.pair_ids]
    result.types = ["presence" if i % 3 else None for i in range(n)]
    result.phenomena = ["lexical" if i % 2 else "register" for i in range(n)]
    result.heads = rng.normal(size=(n, L, 3))
    result.by_position = {"resid": rng.normal(size=(n, L, 2))}
    result.position_labels = ["-2 'x'", "-1 '\\n'"]
    result.gap = rng.uniform(1, 2, size=n)
    result.specs = [SpecEffect("1-2", (1, 2), "explicit", result.pair_ids, result.group_ids,
                               result.directions, rng.uniform(size=n), rng.uniform(size=n),
                               n_boot=result.n_boot, covered=0.5)]
    result.settings["by"] = "type"
    return result


def test_version_3_fields_round_trip(tmp_path):
    result = full_result()
    result.save(tmp_path)
    back = LocalizationResult.load(tmp_path)
    for name in ("types", "phenomena", "directions", "position_labels", "pair_ids"):
        assert getattr(back, name) == getattr(result, name), name
    np.testing.assert_array_equal(back.heads, result.heads)
    np.testing.assert_array_equal(back.by_position["resid"], result.by_position["resid"])
    np.testing.assert_array_equal(back.gap, result.gap)
    (spec,) = back.specs
    assert (spec.spec, spec.layers, spec.label, spec.covered) == ("1-2", (1, 2), "explicit", 0.5)
    np.testing.assert_array_equal(spec.sufficiency, result.specs[0].sufficiency)
    np.testing.assert_array_equal(spec.necessity, result.specs[0].necessity)
    assert back.summary() == result.summary()
    doc = json.loads((tmp_path / "localization.json").read_text())
    assert set(doc["directions"]) == {"original>paraphrase", "paraphrase>original"}
    assert doc["groups"]["by"] == "type" and set(doc["groups"]["values"]) == {"presence",
                                                                              "(none)"}
    assert len(doc["heads"]["mean"]) == L and len(doc["heads"]["mean"][0]) == 3
    assert doc["by_position"]["labels"] == result.position_labels
    assert doc["specs"][0]["sufficiency"]["mean"] == pytest.approx(
        float(result.specs[0].sufficiency.mean()))
    assert doc["pairs"][1]["direction"] == "original>paraphrase"


def test_subsets_keep_every_per_pair_array_in_step():
    result = full_result()
    part = result.where(direction="original>paraphrase")
    rows = [i for i, d in enumerate(result.directions) if d == "original>paraphrase"]
    assert part.pair_ids == [result.pair_ids[i] for i in rows]
    np.testing.assert_array_equal(part.heads, result.heads[rows])
    np.testing.assert_array_equal(part.restoration["mlp"], result.restoration["mlp"][rows])
    np.testing.assert_array_equal(part.specs[0].necessity, result.specs[0].necessity[rows])
    np.testing.assert_array_equal(part.gap, result.gap[rows])
    by = result.by("phenomenon")
    assert sum(p.n_pairs for p in by.values()) == result.n_pairs
    reordered = result.subset(np.arange(result.n_pairs)[::-1])
    assert reordered.pair_ids == result.pair_ids[::-1]
    np.testing.assert_array_equal(reordered.specs[0].sufficiency,
                                  result.specs[0].sufficiency[::-1])
    with pytest.raises(MechloraError, match="cannot split a localization by 'colour'"):
        result.by("colour")


def test_version_2_still_reads(tmp_path):
    """A version-2 file (no labels): directions come back from the pair ids."""
    make_result().save(tmp_path)
    path = tmp_path / "localization.json"
    doc = json.loads(path.read_text())
    doc["schema_version"] = 2
    for key in ("directions", "direction_notes"):
        del doc[key]
    for p in doc["pairs"]:
        del p["type"], p["phenomenon"], p["direction"]
    path.write_text(json.dumps(doc))
    back = LocalizationResult.load(tmp_path)
    assert back.pair_ids[:2] == ["q0:0>1", "q0:1>2"]  # make_result's ids
    assert back.directions[0] == "original>paraphrase"
    assert set(back.directions[1:]) == {"paraphrase>paraphrase"}
    assert back.types == [None] * back.n_pairs and back.heads is None and not back.specs


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
