"""`mechlora select` end to end: saved scores, scores computed on a model, bands, mistakes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mechlora.data import QuestionGroup, Variant, write_groups
from mechlora.result import LocalizationResult
from mechlora.select import Selection, band_layers
from tests.cli import run_cli

run = run_cli


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_groups(path, [QuestionGroup(f"q{i}", (Variant(a), Variant(b, "lexical")), "yes")
                        for i, (a, b) in enumerate([("is it red?", "would you say it is red?"),
                                                    ("is it big?", "is it large?")])])
    return path


@pytest.fixture
def locdir(tmp_path):
    scores = np.zeros(12)
    scores[[5, 6, 7]] = [1.0, 3.0, 1.0]
    restoration = np.tile(np.cumsum(scores) / scores.sum(), (2, 1))
    result = LocalizationResult(
        model="tiny-gemma3-text", n_layers=12, components=("resid",), positions="last",
        engine="cached", pair_ids=["q:0>1", "q:1>0"], group_ids=["q", "q"],
        restoration={"resid": restoration}, margin_a=np.ones(2), margin_b=-np.ones(2),
        divergence={})
    return result.save(tmp_path / "loc")


def test_select_reads_a_localization_as_before(locdir, capsys) -> None:
    code, out, _ = run(["select", str(locdir), "--rule", "mass:0.6"], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0] == "6" and lines[1].startswith("mass:0.6 -> 6:")
    code, out, _ = run(["select", str(locdir)], capsys)
    assert out.splitlines()[0] == "3-7"  # window:5 by default; ties take the earliest


def test_select_computes_scores_saves_and_reloads(tmp_path, pairs, capsys) -> None:
    out_file = tmp_path / "bi.json"
    code, out, err = run(["select", "--scores", "bi", "--model", "tiny-gemma3-text", "--pairs",
                          str(pairs), "--device", "cpu", "--rule", "topk:3", "--out",
                          str(out_file), "-q"], capsys)
    assert code == 0, err
    spec, reason, wrote = out.splitlines()
    saved = Selection.load(out_file)
    assert str(saved.spec) == spec and saved.reason == reason and wrote.endswith("bi.json")
    assert saved.selector == "bi:topk:3" and saved.model == "tiny-gemma3-text"
    assert saved.scores.settings["data"]["path"] == str(pairs)
    assert saved.scores.cost["forwards"] == 1
    code, out, _ = run(["select", str(out_file), "--rule", "window:2"], capsys)
    window = out.splitlines()[0]
    values = saved.scores.values
    best = max(range(11), key=lambda s: values[s:s + 2].sum())
    assert window == f"{best}-{best + 1}"
    code, out, _ = run(["select", str(out_file)], capsys)
    assert out.splitlines()[0] == spec


def test_select_bands_need_only_a_model(tmp_path, capsys) -> None:
    code, out, _ = run(["select", "--model", "tiny-gemma3-text", "--rule", "random:4", "--seed",
                        "3", "--out", str(tmp_path / "r"), "--device", "cpu"], capsys)
    assert code == 0
    assert out.splitlines()[0] == str(band_layers("random", 4, 12, seed=3).spec)
    doc = json.loads((tmp_path / "r" / "selection.json").read_text())
    assert doc["source"] == "random" and doc["settings"] == {"seed": 3} and doc["scores"] is None


@pytest.mark.parametrize("argv, fragment", [
    (["select"], "give SOURCE"),
    (["select", "--model", "tiny-gemma3-text"], "say which scores"),
    (["select", "--model", "tiny-gemma3-text", "--scores", "grad"], "give --pairs"),
    (["select", "--model", "tiny-gemma3-text", "--scores", "gradient"], "use one of"),
    (["select", "--model", "tiny-gemma3-text", "--scores", "snr", "--rule", "bi:3"],
     "drop one of them"),
    (["select", "--model", "tiny-gemma3-text", "--rule", "early:13"], "more layers than"),
    (["select", "--model", "tiny-gemma3-text", "--rule", "peak"], "unknown selector"),
])
def test_select_mistakes_exit_2_with_one_line(argv, fragment: str, capsys) -> None:
    code, _, err = run(argv + ["--device", "cpu"] if "--model" in argv else argv, capsys)
    assert code == 2 and fragment in err and "Traceback" not in err


def test_select_source_mistakes(tmp_path, locdir, capsys) -> None:
    code, _, err = run(["select", str(locdir), "--scores", "bi"], capsys)
    assert code == 2 and "not both" in err
    code, _, err = run(["select", str(locdir), "--rule", "grad:3"], capsys)
    assert code == 2 and "reads grad scores, but these are localization scores" in err
    code, _, err = run(["select", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "nothing not found" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(["select", str(tmp_path / "empty")], capsys)
    assert code == 2 and "neither a selection.json nor a localization.json" in err
    (tmp_path / "taken.json").write_text("{}")
    code, _, err = run(["select", str(locdir), "--out", str(tmp_path / "taken.json")], capsys)
    assert code == 2 and "--overwrite" in err
    code, _, _ = run(["select", str(locdir), "--out", str(tmp_path / "taken.json"),
                      "--overwrite"], capsys)
    assert code == 0 and Selection.load(tmp_path / "taken.json").spec.layers == (3, 4, 5, 6, 7)
