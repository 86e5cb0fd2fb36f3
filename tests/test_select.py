"""Selection rules on score vectors with planted, known answers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mechlora.errors import MechloraError
from mechlora.select import (
    Scores,
    Selection,
    apply_selector,
    band_layers,
    load_selection,
    on_source,
    parse_selector,
    select_layers,
)
from mechlora.spec import LayerSpec


def planted(n: int = 34, **peaks: float) -> np.ndarray:
    """Zeros with values at the given layers: planted(l16=5.0)."""
    scores = np.zeros(n)
    for key, value in peaks.items():
        scores[int(key.removeprefix("l"))] = value
    return scores


MEDGEMMA_LIKE = planted(l14=0.5, l15=2, l16=5, l17=2, l18=1, l19=1)  # positive total 11.5


def layers(selection: Selection) -> str:
    return str(selection.spec)


# ---------------------------------------------------------------- window


def test_window_finds_planted_block() -> None:
    sel = select_layers(MEDGEMMA_LIKE, "window:5")
    assert sel.spec == LayerSpec.parse("15-19", 34)
    assert sel.rule == "window:5"
    assert sel.covered == pytest.approx(11 / 11.5)
    assert sel.reason == ("window:5 -> 15-19: best contiguous 5 layers, "
                          "96% of the positive score (peak layer 16)")


def test_bare_window_means_five_and_rules_ignore_case_and_spaces() -> None:
    assert select_layers(MEDGEMMA_LIKE, "window").rule == "window:5"
    assert layers(select_layers(MEDGEMMA_LIKE, " WINDOW : 5 ")) == "15-19"


def test_window_ties_take_earliest() -> None:
    assert layers(select_layers(planted(l3=1, l20=1), "window:1")) == "3"
    # equal in exact arithmetic, unequal in floats: 0.3+0.2+0.1 < 0.1+0.2+0.3
    scores = np.array([0.3, 0.2, 0.1, 0.0, 0.1, 0.2, 0.3])
    assert layers(select_layers(scores, "window:3")) == "0-2"


def test_window_sums_negatives() -> None:
    # the big pair 2 and 4 straddles a layer that undoes the divergence
    scores = planted(10, l2=3, l3=-5, l4=3, l5=1)
    sel = select_layers(scores, "window:2")
    assert layers(sel) == "4-5"
    assert sel.covered == pytest.approx(4 / 7)


def test_window_treats_nan_as_zero() -> None:
    scores = planted(10, l2=1, l3=1)
    scores[[6, 7, 8]] = np.nan
    sel = select_layers(scores, "window:2")
    assert layers(sel) == "2-3" and sel.covered == 1.0
    assert "peak layer 2" in sel.reason
    assert np.isnan(scores[6])  # the caller's array is left alone


def test_window_as_wide_as_the_model() -> None:
    sel = select_layers(planted(4, l1=1), "window:4")
    assert sel.spec.is_all and sel.covered == 1.0


# ---------------------------------------------------------------- mass


@pytest.mark.parametrize("rule, expected", [
    ("mass:0.5", "3"),      # layer 3 alone holds 4 of 8
    ("mass:0.75", "1-3"),   # 6 of 8 needs three layers; 1-3, 2-4, 3-5 tie -> earliest
    ("mass:1", "1-5"),      # every positive layer
    ("mass:0.1", "3"),
])
def test_mass_smallest_window(rule: str, expected: str) -> None:
    scores = planted(10, l1=1, l2=1, l3=4, l4=1, l5=1)
    sel = select_layers(scores, rule)
    assert layers(sel) == expected
    assert sel.covered >= float(rule.split(":")[1]) - 1e-12


def test_mass_ignores_negative_layers() -> None:
    # clipped at 0: the -9 neither blocks the window nor counts against it
    scores = planted(10, l2=2, l3=-9, l4=2)
    sel = select_layers(scores, "mass:1")
    assert layers(sel) == "2-4" and sel.covered == 1.0


def test_mass_ties_prefer_more_mass_then_earliest() -> None:
    assert layers(select_layers(np.array([2, 2, 0, 0, 3, 2.0]), "mass:0.4")) == "4-5"
    assert layers(select_layers(np.array([2, 2, 0, 0, 2, 2.0]), "mass:0.5")) == "0-1"


def test_mass_tolerates_float_rounding_at_p_1() -> None:
    scores = np.full(34, 0.1)
    assert select_layers(scores, "mass:1").spec.is_all


def test_mass_reason() -> None:
    sel = select_layers(MEDGEMMA_LIKE, "mass:0.8")
    assert layers(sel) == "15-18"  # 10 of 11.5
    assert sel.reason == ("mass:0.8 -> 15-18: smallest contiguous window reaching 80%, "
                          "87% of the positive score (peak layer 16)")


# ---------------------------------------------------------------- topk


def test_topk_picks_scattered_peaks() -> None:
    sel = select_layers(planted(l3=2, l16=5, l25=3, l26=1), "topk:3")
    assert layers(sel) == "3,16,25"
    assert sel.covered == pytest.approx(10 / 11)
    assert sel.reason.startswith("topk:3 -> 3,16,25: the 3 highest-scoring layers, 91% of")


def test_topk_ties_take_earlier_layers() -> None:
    assert layers(select_layers(planted(10, l2=1, l5=1, l8=1), "topk:2")) == "2,5"


def test_topk_with_negatives_and_nan() -> None:
    scores = np.array([-1.0, 2.0, -3.0, -0.5, np.nan])
    assert layers(select_layers(scores, "topk:2")) == "1,4"   # NaN counts as 0 > -0.5
    assert layers(select_layers(scores, "topk:3")) == "1,3-4"


# ---------------------------------------------------------------- all and explicit specs


def test_all() -> None:
    sel = select_layers(MEDGEMMA_LIKE, "all")
    assert sel.spec.is_all and sel.covered == 1.0 and sel.rule == "all"
    assert sel.reason == "all -> 0-33: every layer, 100% of the positive score (peak layer 16)"


def test_all_and_explicit_work_without_divergence() -> None:
    sel = select_layers(np.zeros(34), "all")
    assert sel.spec.is_all and sel.covered == 0.0
    assert "no positive score to cover" in sel.reason
    assert layers(select_layers(np.zeros(34), "15-19")) == "15-19"


def test_explicit_specs() -> None:
    sel = select_layers(MEDGEMMA_LIKE, " 15 - 19 ")
    assert sel.spec == LayerSpec.parse("15-19", 34) and sel.rule == "15-19"
    assert sel.covered == pytest.approx(11 / 11.5)
    assert layers(select_layers(MEDGEMMA_LIKE, "3,7-9")) == "3,7-9"
    outside = select_layers(MEDGEMMA_LIKE, "20-25")
    assert outside.covered == 0.0
    assert "peak layer 16, outside the selection" in outside.reason


def test_selection_is_frozen() -> None:
    sel = select_layers(MEDGEMMA_LIKE, "all")
    with pytest.raises(dataclasses.FrozenInstanceError):
        sel.rule = "window:5"  # type: ignore[misc]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("rule, fragment", [
    ("window:0", "K >= 1"),
    ("window:x", "K >= 1"),
    ("window:2.5", "K >= 1"),
    ("window:35", "more layers than the model's 34"),
    ("topk:0", "K >= 1"),
    ("topk", "K >= 1"),
    ("topk:99", "K <= 34"),
    ("mass", "0 < P <= 1"),
    ("mass:0", "0 < P <= 1"),
    ("mass:1.5", "0 < P <= 1"),
    ("mass:abc", "0 < P <= 1"),
    ("mass:nan", "0 < P <= 1"),
    ("15-40", "numbered 0-33"),
    ("19-15", "write 15-19"),
])
def test_bad_arguments(rule: str, fragment: str) -> None:
    with pytest.raises(MechloraError, match=fragment):
        select_layers(MEDGEMMA_LIKE, rule)


@pytest.mark.parametrize("rule", ["peak", "windows:5", "all:3", "", "top3", "layers 15-19"])
def test_unknown_rule_lists_valid_rules(rule: str) -> None:
    with pytest.raises(MechloraError) as err:
        select_layers(MEDGEMMA_LIKE, rule)
    message = str(err.value)
    for name in ("window:K", "mass:P", "topk:K", "all", "15-19"):
        assert name in message


@pytest.mark.parametrize("rule", ["window:5", "window", "mass:0.8", "topk:3"])
@pytest.mark.parametrize("scores", [np.zeros(34), -np.ones(34), np.full(34, np.nan)])
def test_no_divergence_is_an_error(rule: str, scores: np.ndarray) -> None:
    with pytest.raises(MechloraError, match="no positive divergence.*explicit spec"):
        select_layers(scores, rule)


@pytest.mark.parametrize("scores", [np.zeros((2, 34)), np.zeros(0), np.array([1.0, np.inf])])
def test_bad_scores(scores: np.ndarray) -> None:
    with pytest.raises(MechloraError):
        select_layers(scores, "all")


# ---------------------------------------------------------------- selectors: grammar


@pytest.mark.parametrize("text, parsed", [
    ("window:5", ("localization", "window:5")),
    ("mass:0.8", ("localization", "mass:0.8")),
    ("grad:5", ("grad", "topk:5")),
    ("GRAD : 5", ("grad", "topk:5")),
    ("snr", ("snr", "topk:5")),
    ("bi:window:3", ("bi", "window:3")),
    ("localization:4", ("localization", "window:4")),
    ("loc:topk:3", ("localization", "topk:3")),
    ("random:5", (None, "random:5")),
    ("randband:3", (None, "randband:3")),
    ("early:2", (None, "early:2")),
    ("all", (None, "all")),
    ("15-19", (None, "15-19")),
])
def test_parse_selector(text: str, parsed: tuple) -> None:
    assert parse_selector(text) == parsed


@pytest.mark.parametrize("text", ["gradient:5", "peak", "", "rand:3"])
def test_unknown_selector_lists_the_grammar(text: str) -> None:
    with pytest.raises(MechloraError, match="grad, snr, bi.*early:K.*random:K"):
        parse_selector(text)


def test_on_source_retargets_bare_rules_only() -> None:
    assert on_source("window:5", "grad") == "grad:window:5"
    assert on_source("topk:3", "bi") == "bi:topk:3"
    assert on_source("early:3", "grad") == "early:3"
    assert on_source("snr:3", "grad") == "snr:3"


# ---------------------------------------------------------------- selectors: bands and random


@pytest.mark.parametrize("name, k, expected", [
    ("early", 5, "0-4"), ("late", 5, "29-33"), ("middle", 5, "14-18"), ("middle", 4, "15-18"),
    ("middle", 1, "16"), ("early", 34, "0-33"), ("late", 34, "0-33"), ("middle", 34, "0-33"),
    ("random", 34, "0-33"), ("randband", 34, "0-33"),
])
def test_bands(name: str, k: int, expected: str) -> None:
    sel = band_layers(name, k, 34)
    assert layers(sel) == expected and sel.rule == f"{name}:{k}" and sel.covered is None


def test_middle_band_is_centred_on_odd_depths() -> None:
    assert layers(band_layers("middle", 3, 9)) == "3-5"
    assert layers(band_layers("middle", 2, 9)) == "3-4"


@pytest.mark.parametrize("k, fragment", [(35, "more layers than the model's 34"), (0, "K >= 1"),
                                         ("x", "K >= 1"), ("", "K >= 1")])
def test_band_errors(k, fragment: str) -> None:
    for name in ("early", "middle", "late", "random", "randband"):
        with pytest.raises(MechloraError, match=fragment):
            band_layers(name, k, 34)


def test_random_is_reproducible_by_seed_and_varies_across_seeds() -> None:
    draws = [band_layers("random", 5, 34, seed=s).spec for s in range(10)]
    assert draws[3] == band_layers("random", 5, 34, seed=3).spec
    assert len(set(draws)) == 10
    assert all(len(d) == 5 for d in draws)
    assert any(len(_runs_of(d)) > 1 for d in draws)  # scattered, not a band
    sel = band_layers("random", 5, 34, seed=3)
    assert sel.settings == {"seed": 3} and "scattered (seed 3)" in sel.reason


def test_randband_is_contiguous_reproducible_and_varies() -> None:
    bands = [band_layers("randband", 4, 34, seed=s).spec for s in range(20)]
    assert all(len(_runs_of(b)) == 1 and len(b) == 4 for b in bands)
    assert len({b.layers[0] for b in bands}) > 5
    assert bands[7] == band_layers("randband", 4, 34, seed=7).spec


def _runs_of(spec: LayerSpec) -> list[str]:
    return str(spec).split(",")


def test_band_with_reference_scores_reports_coverage() -> None:
    sel = apply_selector("early:5", Scores("localization", MEDGEMMA_LIKE))
    assert layers(sel) == "0-4" and sel.covered == 0.0
    assert sel.reason == ("early:5 -> 0-4: the first 5 layers, 0% of the positive score "
                          "(peak layer 16, outside the selection)")
    grad = apply_selector("late:20", Scores("grad", MEDGEMMA_LIKE))
    assert grad.covered == pytest.approx(1.0) and "of the positive grad score" in grad.reason


# ---------------------------------------------------------------- selectors on any scores


def test_rules_apply_to_any_scores() -> None:
    scores = Scores("grad", planted(l3=1, l30=5, l31=4, l32=1), about="grad (test)",
                    model="m")
    top = select_layers(scores, "topk:2")
    assert layers(top) == "30-31" and top.selector == "grad:topk:2" and top.scores is scores
    assert top.reason.startswith("grad (test): topk:2 -> 30-31: the 2 highest-scoring layers")
    assert layers(apply_selector("grad:window:3", scores)) == "30-32"
    assert layers(apply_selector("grad:3", scores)) == "3,30-31"
    with pytest.raises(MechloraError, match="reads snr scores, but these are grad scores"):
        apply_selector("snr:3", scores)
    with pytest.raises(MechloraError, match="compute them first"):
        apply_selector("grad:3", None, 34)


def test_localization_reasons_are_unchanged_through_scores() -> None:
    plain = select_layers(MEDGEMMA_LIKE, "window:5")
    via = apply_selector("window:5", Scores("localization", MEDGEMMA_LIKE))
    assert via.spec == plain.spec and via.reason == plain.reason
    assert via.selector == "localization:window:5"


def test_all_and_specs_without_scores() -> None:
    sel = apply_selector("all", None, 34)
    assert sel.spec.is_all and sel.covered is None and sel.reason == "all -> 0-33: every layer"
    assert layers(apply_selector("15-19", None, 34)) == "15-19"
    with pytest.raises(MechloraError, match="numbered 0-33"):
        apply_selector("30-40", None, 34)


# ---------------------------------------------------------------- saved selections


def test_selection_round_trips_through_json(tmp_path) -> None:
    scores = Scores("grad", np.r_[np.nan, np.arange(1.0, 34)], about="grad (test)", model="m",
                    settings={"seed": 2, "data": {"n_pairs": 3}},
                    cost={"seconds": 1.5, "forwards": 1},
                    details={"self_attn.q_proj": np.arange(34.0)})
    sel = select_layers(scores, "window:3")
    path = sel.save(tmp_path / "out")
    assert path == tmp_path / "out" / "selection.json"
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == 1 and doc["kind"] == "mechlora.selection"
    assert (doc["source"], doc["rule"], doc["spec"], doc["n_layers"]) == ("grad", "window:3",
                                                                          "31-33", 34)
    assert doc["scores"]["values"][0] is None and doc["model"] == "m"
    back = Selection.load(tmp_path / "out")
    assert back == sel and back.reason == sel.reason and back.covered == sel.covered
    np.testing.assert_array_equal(back.scores.values, scores.values)
    np.testing.assert_array_equal(back.scores.details["self_attn.q_proj"], np.arange(34.0))
    assert back.scores.settings == scores.settings and back.scores.cost == scores.cost
    band = band_layers("random", 4, 34, seed=9, model="m")
    again = Selection.load(band.save(tmp_path / "band.json"))
    assert again == band and again.settings == {"seed": 9} and again.scores is None


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d.update(schema_version=99), "schema version 99"),
    (lambda d: d.pop("kind"), "not a mechlora selection"),
    (lambda d: d.pop("rule"), "field 'rule' is missing"),
    (lambda d: d.update(spec="30-40"), "numbered 0-33"),
    (lambda d: d["scores"].update(values=[1.0, 2.0]), "2 scores for a model of 34 layers"),
    (lambda d: d["scores"].update(values="ab"), "wrong type"),
])
def test_bad_selection_files(tmp_path, edit, fragment: str) -> None:
    doc = select_layers(Scores("bi", MEDGEMMA_LIKE), "topk:3").to_dict()
    edit(doc)
    path = tmp_path / "selection.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(MechloraError, match=fragment) as err:
        Selection.load(path)
    assert str(path) in str(err.value)


def test_load_selection_reapplies_rules_to_saved_scores(tmp_path) -> None:
    saved = select_layers(Scores("snr", planted(l3=1, l30=5, l31=4, l32=1)), "topk:2")
    saved.save(tmp_path / "s.json")
    assert load_selection(tmp_path / "s.json") == saved
    window = load_selection(tmp_path / "s.json", "window:3")
    assert layers(window) == "30-32" and window.selector == "snr:window:3"
    band = load_selection(tmp_path / "s.json", "early:2")
    assert layers(band) == "0-1" and band.covered == 0.0


def test_load_selection_from_localization_folders(tmp_path) -> None:
    from mechlora.result import LocalizationResult

    restoration = np.cumsum(np.tile(MEDGEMMA_LIKE / MEDGEMMA_LIKE.sum(), (2, 1)), axis=1)
    result = LocalizationResult(
        model="m", n_layers=34, components=("resid",), positions="last", engine="cached",
        pair_ids=["q:0>1", "q:1>0"], group_ids=["q", "q"], restoration={"resid": restoration},
        margin_a=np.ones(2), margin_b=-np.ones(2), divergence={}, settings={"seconds": 2.0})
    result.save(tmp_path / "run" / "localization")
    for where in (tmp_path / "run", tmp_path / "run" / "localization",
                  tmp_path / "run" / "localization" / "localization.json"):
        sel = load_selection(where)
        assert layers(sel) == "15-19" and sel.scores.source == "localization"
        assert sel.reason == select_layers(MEDGEMMA_LIKE, "window:5").reason
    assert layers(load_selection(tmp_path / "run", "topk:1")) == "16"
    assert layers(load_selection(tmp_path / "run", "random:3")) == str(
        band_layers("random", 3, 34).spec)
    with pytest.raises(MechloraError, match="neither a selection.json nor a localization.json"):
        load_selection(tmp_path)


def test_selection_source_names_what_chose_the_layers() -> None:
    loc = Scores("localization", MEDGEMMA_LIKE)
    assert apply_selector("grad:2", Scores("grad", MEDGEMMA_LIKE)).source == "grad"
    assert apply_selector("window:5", loc).source == "localization"
    assert apply_selector("random:3", loc).source == "random"  # loc only measures coverage
    assert apply_selector("all", loc).source == "all"
    assert apply_selector("15-19", None, 34).source == "explicit"
    assert select_layers(MEDGEMMA_LIKE, "window:5").source is None  # bare arrays: unknown
