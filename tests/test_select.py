"""Selection rules on score vectors with planted, known answers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mechlora.errors import MechloraError
from mechlora.select import Selection, select_layers
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
