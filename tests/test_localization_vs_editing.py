"""analyses/localization_vs_editing.py: its rules on planted inputs, and one quick run whose
summary agrees with the compare.json and localization it was built from."""

from __future__ import annotations

import json

import pytest

from tests.analyses import load_analysis

lve = load_analysis("localization_vs_editing")


def _windows(flips: list[float], accuracies: list[float] | None = None) -> dict:
    accuracies = accuracies or [0.9] * len(flips)
    return {f"{i}-{i + 1}": {"layers": [i, i + 1], "flip": f, "accuracy": a}
            for i, (f, a) in enumerate(zip(flips, accuracies, strict=True))}


def test_best_window_may_not_win_by_losing_accuracy():
    windows = _windows([0.05, 0.20, 0.10], [0.50, 0.90, 0.90])
    best = lve.best_window(windows, base_accuracy=0.9)
    assert best["arm"] == "2-3" and best["n_eligible"] == 2  # 0-1 flips least but lost 40 points
    assert lve.best_window(windows, base_accuracy=0.54)["arm"] == "0-1"
    # no window keeps the accuracy: the rule falls back to every window
    assert lve.best_window(_windows([0.3, 0.1], [0.1, 0.1]), 0.9)["arm"] == "1-2"


def _organism(name: str, k: int, start: int, seed: int = 0) -> dict:
    return {"name": name, "organism_seed": seed, "k": k,
            "best": {"start": start, "layers": [start, start + 1]}}


@pytest.mark.parametrize("organisms,expected", [
    ([_organism("mid", 4, 5), _organism("late", 6, 6), _organism("full", 0, 3)], "tracks k"),
    ([_organism("mid", 4, 0), _organism("late", 6, 0), _organism("full", 0, 0)], "early wins"),
    ([_organism("mid", 4, 4), _organism("late", 6, 0), _organism("full", 0, 0)], "neither"),
    ([_organism("full", 0, 0)], "undecided"),
    # every organism seed counts: one seed at 0-1 is enough to refute "tracks k"
    ([_organism("mid", 4, 0, seed=0), _organism("mid", 4, 4, seed=1)], "neither"),
])
def test_verdict_applies_the_stated_rule(organisms, expected):
    assert lve.verdict(organisms)["verdict"] == expected


def test_choose_setting_weighs_flips_removed_against_accuracy_lost():
    base = {"accuracy": 0.80, "flip_rate": 0.30}
    checks = [dict(lr=1e-3, steps=40, flip_rate=0.25, accuracy=0.80),   # gain 0.05
              dict(lr=1e-3, steps=80, flip_rate=0.10, accuracy=0.75),   # gain 0.15
              dict(lr=2e-3, steps=40, flip_rate=0.00, accuracy=0.55),   # gain 0.05: collapse
              dict(lr=2e-3, steps=120, flip_rate=0.09, accuracy=0.745)]  # gain 0.155: tied
    chosen = lve.choose_setting(base, checks)
    assert (chosen["lr"], chosen["steps"]) == (1e-3, 80)  # the tie goes to fewer steps
    assert chosen["net_gain"] == pytest.approx(0.15)
    # an accuracy gain is not credited: flips alone decide between these two
    assert lve.choose_setting(base, [dict(lr=1, steps=1, flip_rate=0.2, accuracy=0.99),
                                     dict(lr=2, steps=1, flip_rate=0.1, accuracy=0.8)])["lr"] == 2
    assert lve.first_rule(base, checks)["steps"] == 40


def test_arms_without_the_windows_or_auto_are_refused_before_any_work(tmp_path):
    from mechlora.errors import MechloraError

    for arms in ("all,auto", "single:2,all"):
        with pytest.raises(MechloraError, match="needs `auto` and `single:2`"):
            lve.main(["--quick", "--arms", arms, "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_quick_run_summarises_its_comparisons(tmp_path):
    from mechlora.result import LocalizationResult
    from mechlora.select import select_layers

    args = ["--quick", "--parts", "main", "--presets", "organism-mid", "--organism-seeds", "0",
            "--seeds", "1", "2",
            "--arms", "single:2,all,all@match=auto,auto", "--out", str(tmp_path)]
    summary = lve.main(args)
    (org,) = summary["organisms"]
    doc = json.loads((tmp_path / org["compare"]).read_text())
    assert doc["seeds"] == [1, 2] and doc["budget"]["equal"]
    # auto trained the window that window:2 picks on the saved localization
    loc = LocalizationResult.load(tmp_path / "localization" / "organism-mid-seed0")
    assert org["auto_layers"] == list(select_layers(loc.scores, "window:2").spec.layers)
    # the best window is recomputed from compare.json's per-seed flip rates
    flips = {a: sum(v["metrics"][lve.FLIP]["per_seed"]) / 2 for a, v in doc["arms"].items()
             if v["single"] == 2}
    assert org["n_windows"] == len(flips) == doc["n_layers"] - 1
    floor = doc["base"]["metrics"]["accuracy"]["mean"] - lve.ACCURACY_SLACK
    eligible = {a: f for a, f in flips.items()
                if doc["arms"][a]["metrics"]["accuracy"]["mean"] >= floor} or flips
    assert org["best"]["flip"] == pytest.approx(min(eligible.values()))
    assert org["k"] == 4 and org["auto_vs_matched"]["call"] in (
        "auto better", "auto worse", "no difference detected")
    md = (tmp_path / "results.md").read_text()
    assert "organism-mid@0" in md and summary["verdict"]["verdict"] in md
    assert "<table>" in (tmp_path / "report.html").read_text()
    # a rerun trains nothing
    again = lve.main(args)
    assert again["organisms"][0]["last_run"]["trained"] == 0
