"""Planted ground truth (tests/planted.py) for what a researcher asks after a localization:
is the spec enough, which direction restores, which head, which position, which group."""

from pathlib import Path

import numpy as np
import pytest

from mechlora import stats
from mechlora.breakdown import direction_notes
from mechlora.effects import ORIGINAL_TO_PARAPHRASE, PARAPHRASE_TO_ORIGINAL
from mechlora.errors import MechloraError
from mechlora.interventions import parse_specs, spec_effect
from mechlora.localize import localize
from mechlora.patching import RUNNERS
from mechlora.result import LocalizationResult, merge_results
from tests.planted import (
    and_subject,
    head_subject,
    more_groups,
    planted_groups,
    planted_subject,
    position_subject,
    spread_subject,
    two_gate_subject,
    typed_groups,
)

KW = dict(progress=False, logit_lens=False)


@pytest.fixture(scope="module")
def spread():
    return spread_subject(layers=(3, 4, 5))


def test_a_gate_spread_over_layers_3_to_5_is_sufficient_and_necessary_as_a_spec(spread):
    result = localize(spread, more_groups(), specs=["3-5", "4", "4-5", "3-4", "all"], **KW)
    effects = {e.spec: e for e in result.specs}
    assert set(effects) == {"3-5", "4", "4-5", "3-4", "0-7"} and result.n_pairs == 12
    # 3-4 holds layer 3's attention, which every gate reads downstream: sufficient too
    for spec in ("3-5", "3-4", "0-7"):
        for which in ("sufficiency", "necessity"):
            stat = effects[spec].stat(which)
            assert stat["mean"] > 0.99 and stat["ci_low"] > 0.95, (spec, which)
    for spec, top in (("4", 0.5), ("4-5", 0.9)):  # one or two of the three gates
        for which in ("sufficiency", "necessity"):
            stat = effects[spec].stat(which)
            assert 0.1 < stat["ci_low"] and stat["ci_high"] < top, (spec, which, stat)
    assert effects["4-5"].stat("sufficiency")["mean"] > effects["4"].stat("sufficiency")["mean"]
    # each MLP alone carries a part: the per-layer sweep does not say "3-5 suffices"
    assert (result.mean("mlp")[3:6] < 0.5).all() and (result.mean("mlp")[3:6] > 0.1).all()


def test_necessity_as_the_complement_of_the_spec(spread, tmp_path):
    """necessity_complement = 1 - r(every attn and mlp output outside S, patched at once).
    Outside 3-5 nothing carries the phrasing (attention only at 3, the MLPs after 3 write
    only their gates, those before 3 see only the shared last token): the complement
    restores nothing, necessity_complement = 1. The complement of 4 holds layer 3's
    attention, which hands every gate a's input: it restores almost all, so layer 4 is not
    necessary; its value is the sufficiency of the spec 0-3+5-7 measured as such."""
    result = localize(spread, more_groups(), specs=["3-5", "4", "0-3,5-7", "all"], **KW)
    effects = {e.spec: e for e in result.specs}
    np.testing.assert_allclose(effects["3-5"].complement, 0, atol=1e-5)
    np.testing.assert_allclose(effects["3-5"].necessity_complement, 1, atol=1e-5)
    np.testing.assert_allclose(effects["4"].complement, effects["0-3,5-7"].sufficiency,
                               atol=1e-6)
    assert effects["4"].stat("necessity_complement")["ci_high"] < 0.05
    # noising 4 says otherwise: without 4's difference, a's answer falls part of the way
    assert effects["4"].stat("necessity")["ci_low"] > 0.1
    assert (effects["0-7"].necessity_complement == 1).all()  # nothing outside every layer
    doc = result.summary()["specs"]
    assert doc[0]["necessity_complement"]["mean"] == pytest.approx(1, abs=1e-5)
    assert set(doc[1]["by_direction"][ORIGINAL_TO_PARAPHRASE]) >= {"necessity_complement"}
    assert "necessity (complement) 1.00" in effects["3-5"].text()
    full = localize(spread, more_groups()[:3], specs=["4"], engine="full", **KW).specs[0]
    np.testing.assert_allclose(full.complement, effects["4"].complement[:full.n_pairs],
                               atol=1e-5)
    # saved, read back, and gathered from shards (several processes) alike
    loaded = LocalizationResult.load(result.save(tmp_path / "loc"))
    halves = merge_results([result.subset(np.arange(6, 12)), result.subset(np.arange(6))],
                           result.pair_ids)
    for other in (loaded, halves):
        for mine, theirs in zip(result.specs, other.specs, strict=True):
            np.testing.assert_array_equal(theirs.complement, mine.complement)


def test_spec_auto_tests_what_the_rule_selects(spread):
    result = localize(spread, more_groups(), specs=["auto", "4"], rule="window:3",
                      components=["attn", "mlp"], **KW)
    auto, four = result.specs
    assert auto.spec == "3-5" and auto.label == "auto (window:3)" and four.spec == "4"
    assert auto.stat("sufficiency")["mean"] > 0.99
    assert auto.covered == pytest.approx(1.0) and four.covered < 0.2
    effect = spec_effect(spread, more_groups(), "4", progress=False)
    np.testing.assert_allclose(effect.sufficiency,  # other row shapes: fp32 rounding only
                               localize(spread, more_groups(), specs=["4"], **KW)
                               .specs[0].sufficiency, atol=1e-6)


def test_sufficiency_and_necessity_are_the_patched_runs_they_claim(spread):
    """Sufficiency of (a, b) is the multi-site patch of a into b; necessity of (a, b) is the
    patch of b into a, i.e. the sufficiency of (b, a): checked pair by pair against the
    `full` engine's one forward per row, and against each other."""
    result = localize(spread, more_groups()[:3], specs=["4"], engine="full", **KW)
    cached = localize(spread, more_groups()[:3], specs=["4"], engine="cached", **KW)
    (full,), (fast,) = result.specs, cached.specs
    np.testing.assert_allclose(fast.sufficiency, full.sufficiency, atol=1e-5)
    np.testing.assert_allclose(fast.necessity, full.necessity, atol=1e-5)
    index = {pid: i for i, pid in enumerate(full.pair_ids)}
    for i, pid in enumerate(full.pair_ids):
        group, ab = pid.rsplit(":", 1)
        a, b = ab.split(">")
        reverse = index[f"{group}:{b}>{a}"]
        assert full.necessity[i] == pytest.approx(full.sufficiency[reverse], abs=1e-6)


def test_only_one_direction_restores_where_the_answer_needs_two_conditions():
    """Layer 2's MLP raises a flag; layer 3 answers yes only with the flag AND phrasing A.
    Original (A) into paraphrase (B) at mlp@2 supplies the flag alone: nothing moves.
    Paraphrase into original removes it: the answer flips."""
    subject = and_subject(k=2)
    result = localize(subject, more_groups(), **KW)
    den = result.where(direction=ORIGINAL_TO_PARAPHRASE)
    noi = result.where(direction=PARAPHRASE_TO_ORIGINAL)
    assert den.n_pairs == noi.n_pairs == 6
    assert abs(den.mean("mlp")[2]) < 0.2 and noi.mean("mlp")[2] > 0.7
    np.testing.assert_allclose(den.mean("attn")[2], 1, atol=0.05)  # symmetric site
    np.testing.assert_allclose(noi.mean("attn")[2], 1, atol=0.05)
    notes = direction_notes(result)
    assert any(n.startswith("mlp: the 95% intervals") and "layer(s) 2" in n for n in notes)
    doc = result.summary()
    assert doc["direction_notes"] == notes
    assert doc["directions"][PARAPHRASE_TO_ORIGINAL]["restoration"]["mlp"]["mean"][2] > 0.7


def test_directions_agree_when_the_gate_is_symmetric():
    result = localize(planted_subject(2, groups=more_groups()), more_groups(), **KW)
    assert direction_notes(result) == []


def test_a_gate_in_one_head_is_found_at_that_head():
    subject = head_subject(k=2, head=3)  # GQA: head 3 reads kv head 1
    result = localize(subject, more_groups(), heads=True, **KW)
    mean = result.heads.mean(0)
    assert np.unravel_index(np.argmax(mean), mean.shape) == (2, 3)
    assert mean[2, 3] > 0.99 and np.abs(np.delete(mean.ravel(), 2 * 4 + 3)).max() < 1e-4
    doc = result.summary()["heads"]
    assert doc["n_heads"] == 4 and doc["ci_low"][2][3] > 0.95


def test_a_gate_at_one_suffix_position_is_found_at_that_position():
    """position_subject: the phrasing reaches the last position only through the 'm' of
    'model' (6 from the end), between layers 1 and 3."""
    subject = position_subject(k1=1, k2=3)
    result = localize(subject, more_groups(), positions="suffix:10", per_position=True,
                      components=["resid", "attn"], **KW)
    resid = result.by_position["resid"].mean(0)  # [L, P]
    labels = result.position_labels
    assert labels[4] == "-6 'm'" and labels[-1].startswith("-1 ")
    np.testing.assert_allclose(resid[1:3, 4], 1, atol=1e-4)  # 'm' carries it at layers 1-2
    np.testing.assert_allclose(resid[3:, 9], 1, atol=1e-4)   # the last position from layer 3
    others = resid.copy()
    others[1:3, 4] = others[3:, 9] = 0
    assert np.abs(others).max() < 1e-4
    attn = result.by_position["attn"].mean(0)
    assert attn[1, 4] > 0.99 and attn[3, 9] > 0.99


def test_per_type_scores_intervals_and_selections_find_each_types_layer():
    """two_gate_subject: questions of type x diverge at layer 2's MLP, type y at layer 4's.
    Pooled, the scores show both; split by type, each finds its own layer."""
    subject = two_gate_subject(kx=2, ky=4)
    result = localize(subject, typed_groups(), by="type", components=["mlp"], rule="topk:1",
                      specs=["auto"], **KW)
    assert result.n_pairs == 12 and set(np.flatnonzero(result.scores > 0.4)) == {2, 4}
    doc = result.summary()["groups"]
    assert doc["by"] == "type" and list(doc["values"]) == ["x", "y"]
    for value, layer in (("x", 2), ("y", 4)):
        part = doc["values"][value]
        assert part["n_pairs"] == 6 and part["n_groups"] == 3
        assert int(np.argmax(part["score"]["values"])) == layer
        assert part["selection"]["spec"] == str(layer)
        assert part["score"]["ci_low"][layer] is None  # 3 questions: no interval
    by = result.by("type")
    np.testing.assert_allclose(by["x"].mean("mlp")[[2, 4]], [1, 0], atol=0.05)
    np.testing.assert_allclose(by["y"].mean("mlp")[[2, 4]], [0, 1], atol=0.05)
    assert result.specs[0].spec == "2"  # topk:1 of the pooled scores: the x layer (first)
    assert set(result.by("phenomenon")) == {"lexical"}
    assert stats.MIN_CLUSTERS > 3


def test_spec_options_are_checked(tiny_text):
    with pytest.raises(MechloraError, match="out of range.*numbered 0-5"):
        localize(tiny_text, planted_groups(), specs=["4-9"], **KW)
    with pytest.raises(MechloraError, match="estimates per-layer sites only; specs"):
        localize(tiny_text, planted_groups(), specs=["all"], engine="attribution", **KW)
    with pytest.raises(MechloraError, match="no sites to patch"):
        localize(tiny_text, planted_groups(), components=[], **KW)
    assert set(RUNNERS) >= {"full", "batched", "cached"}
    assert parse_specs(["none"], 6) == ([], False) and parse_specs(" None ", 6) == ([], False)
    with pytest.raises(MechloraError, match=r"cannot come with other specs \(2-3\)"):
        parse_specs(["none", "2-3"], 6)


def test_a_bad_rule_or_group_key_fails_before_any_model_work(tiny_text, monkeypatch):
    """`auto` selects only after the sweep, and `by` splits only after it: both are checked
    first, so a typo costs nothing (the sweep here would fail the test)."""
    import sys

    def no_sweep(*args, **kw):
        raise AssertionError("the sweep ran")

    monkeypatch.setattr(sys.modules["mechlora.localize"], "run_sweep", no_sweep)
    with pytest.raises(MechloraError, match="unknown layer-selection rule 'windw:5'"):
        localize(tiny_text, planted_groups(), specs=["auto"], rule="windw:5", **KW)
    with pytest.raises(MechloraError, match="window:9 asks for more layers than the model's 6"):
        localize(tiny_text, planted_groups(), specs=["auto"], rule="window:9",
                 adapter="/nonexistent/adapter", **KW)
    with pytest.raises(MechloraError, match="cannot split a localization by 'typ'; use type"):
        localize(tiny_text, planted_groups(), by="typ", **KW)


def test_an_auto_pass_that_keeps_other_pairs_stops_the_run(spread, monkeypatch):
    """The auto spec's second pass must keep the sweep's pairs, else its per-pair values
    would sit beside other pairs' scores: an error, also under python -O."""
    import sys

    module = sys.modules["mechlora.localize"]
    real, calls = module.run_sweep, []

    def second_drops_a_pair(*args, **kw):
        result = real(*args, **kw)
        calls.append(1)
        return result.subset(np.arange(result.n_pairs - 1)) if len(calls) == 2 else result

    monkeypatch.setattr(module, "run_sweep", second_drops_a_pair)
    with pytest.raises(MechloraError, match="the auto spec's pass kept 11 pairs, the per-layer "
                                            "sweep 12"):
        localize(spread, more_groups(), specs=["auto"], rule="window:3", components=["mlp"],
                 **KW)


def test_a_selection_finds_its_localization_beside_it(tmp_path, monkeypatch):
    """A selection's scores name their localization folder as given (relative): it is found
    beside the selection file from any working directory."""
    from types import SimpleNamespace

    from mechlora.interventions import localization_folder

    (tmp_path / "runs" / "loc").mkdir(parents=True)
    (tmp_path / "runs" / "loc" / "localization.json").write_text("{}")
    (tmp_path / "runs" / "sel").mkdir()
    (tmp_path / "elsewhere").mkdir()
    selection = SimpleNamespace(scores=SimpleNamespace(source="localization",
                                                       settings={"path": "../loc"}))
    monkeypatch.chdir(tmp_path / "elsewhere")
    found = localization_folder(tmp_path / "runs" / "sel", selection)
    assert found is not None and found.resolve() == (tmp_path / "runs" / "loc").resolve()
    monkeypatch.chdir(tmp_path)  # the path as given from where it was given still works
    selection.scores.settings["path"] = "runs/loc"
    assert localization_folder(tmp_path / "runs" / "sel", selection) == Path("runs/loc")
