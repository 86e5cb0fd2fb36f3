"""analyses/gemma3_270m_lora.py: its pre-stated rules, and its steps end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mechlora.errors import MechloraError
from mechlora.metrics import VariantPrediction
from tests.analyses import load_analysis

gl = load_analysis("gemma3_270m_lora")


def _cand(lr, kl, steps, flip, acc, margin=1.0):
    return {"lr": lr, "kl_over": kl, "steps": steps, "flip_rate": flip, "accuracy": acc,
            "margin_diff": margin}


def test_setting_rule_takes_the_lowest_flip_rate_that_keeps_accuracy():
    base = {"accuracy": 0.80, "flip_rate": 0.12}
    cands = [_cand(5e-4, "vocab", 9, 0.10, 0.80),
             _cand(2e-3, "vocab", 27, 0.02, 0.70),  # lowest flips, but loses 10 points
             _cand(2e-3, "choices", 18, 0.05, 0.79),
             _cand(5e-4, "choices", 27, 0.08, 0.85)]
    chosen = gl.choose_setting(base, cands)
    assert (chosen["lr"], chosen["kl_over"], chosen["steps"]) == (2e-3, "choices", 18)
    assert chosen["eligible"] == 3 and chosen["tied"] == 1


def test_setting_rule_breaks_ties_by_steps_then_margin():
    base = {"accuracy": 0.80}
    cands = [_cand(5e-4, "vocab", 27, 0.050, 0.80, margin=0.1),
             _cand(2e-3, "vocab", 9, 0.058, 0.80, margin=0.9),  # within FLIP_TIE, fewer steps
             _cand(2e-3, "choices", 9, 0.055, 0.80, margin=0.5),  # same steps, smaller margin
             _cand(5e-4, "choices", 9, 0.070, 0.81, margin=0.0)]  # outside the tie
    chosen = gl.choose_setting(base, cands)
    assert (chosen["lr"], chosen["kl_over"], chosen["steps"]) == (2e-3, "choices", 9)
    assert chosen["tied"] == 3


def test_setting_rule_falls_back_to_the_most_accurate():
    chosen = gl.choose_setting({"accuracy": 0.9}, [_cand(5e-4, "vocab", 9, 0.0, 0.5),
                                                   _cand(2e-3, "vocab", 9, 0.3, 0.7)])
    assert chosen["accuracy"] == 0.7 and chosen["eligible"] == 0


def _pred(g, v, pred, mass):
    return VariantPrediction(group_id=g, variant=v, phenomenon=None, type=None, pred=pred,
                             answer=0, margin=1.0, choice_mass=mass)


def test_reading_rule_needs_both_mass_share_and_agreement():
    merged = [_pred(f"q{i}", v, 0, 0.5) for i in range(25) for v in range(2)]
    # the single tokens hold 95% of the merged mass and agree everywhere: first is adequate
    first = [_pred(p.group_id, p.variant, 0, 0.475) for p in merged]
    assert gl.choose_reading(first, merged)["reading"] == "first"
    # 80% of the mass: the model answers in other spellings too
    low = [_pred(p.group_id, p.variant, 0, 0.4) for p in merged]
    out = gl.choose_reading(low, merged)
    assert out["reading"] == "merged" and out["share_of_merged_mass"] == pytest.approx(0.8)
    # enough mass, but 2 of 50 wordings (96%) answer otherwise
    flip = [_pred(p.group_id, p.variant, int(i < 2), 0.5) for i, p in enumerate(merged)]
    out = gl.choose_reading(flip, merged)
    assert out["reading"] == "merged" and out["agreement"] == pytest.approx(0.96)


def test_crossing_is_where_the_curve_stays_above():
    assert gl.crossing([0.0, 0.6, 0.4, 0.5, 0.9, 1.0]) == 3
    assert gl.crossing([0.0, 0.1]) is None


def test_quick_run_end_to_end_and_resumed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, as the default is
    out = Path("run")
    argv = ["--quick", "--out", str(out), "--seeds", "1", "--arms", "auto,all@match=auto",
            "--results", str(tmp_path / "results")]
    summary = gl.main(argv)
    assert json.loads((tmp_path / "results" / "summary.json").read_text()) == summary
    assert (tmp_path / "results" / "compare.json").is_file()
    # the search chose one of its candidates, and compare trained with exactly that setting
    chosen = summary["search"]["chosen"]
    assert any(all(c[k] == chosen[k] for k in ("lr", "kl_over", "steps"))
               for c in summary["search"]["candidates"])
    cfg = summary["design"]["config"]
    assert (cfg["lr"], cfg["kl_over"], cfg["max_steps"]) == \
        (chosen["lr"], chosen["kl_over"], chosen["steps"])
    assert cfg["merge_variants"] == (summary["reading"]["cloze"]["reading"] == "merged")
    # the matched arm holds auto's parameter count on every layer
    arms = summary["arms"]
    assert arms["all@match=auto"]["layers"]["1"] == list(range(summary["model"]["n_layers"]))
    assert arms["all@match=auto"]["trainable_parameters"]["1"] == \
        arms["auto"]["trainable_parameters"]["1"]
    # `auto` trained the layers its rule picks from the cached localization scores
    auto = summary["selectors"]["localization"][gl.RULE]
    first, last = auto.split("-")
    assert arms["auto"]["layers"]["1"] == list(range(int(first), int(last) + 1))
    # the negated wordings were read with every adapter (paths given relative or absolute)
    assert set(summary["negation"]["arms"]) == {"auto", "all@match=auto"}
    # the docs' tables are rendered from the summary alone
    md = gl.tables(summary)
    assert f"| auto | {auto} |" in md and "| all@match=auto |" in md
    # a rerun trains nothing and gives the same numbers
    again = gl.main(argv)
    assert again["timing"]["compare_calls"][-1]["trained"] == 0
    assert again["arms"] == summary["arms"]


def test_a_cached_step_is_reused_only_with_its_settings(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return {"value": 3}

    path = tmp_path / "step.json"
    assert gl._cached(path, {"lr": 1e-3}, make)["value"] == 3
    assert gl._cached(path, {"lr": 1e-3}, make)["value"] == 3
    assert len(calls) == 1
    with pytest.raises(MechloraError, match="other settings"):
        gl._cached(path, {"lr": 2e-3}, make)
