"""`mechlora localize` end to end, and user mistakes that must not end in a traceback."""

import json

import pytest

from mechlora.data import EXAMPLE_PATH, load_groups, write_groups
from tests.cli import run_cli

run = run_cli


@pytest.fixture
def small_pairs(tmp_path):
    path = tmp_path / "data" / "pairs.jsonl"
    path.parent.mkdir()
    groups = load_groups(EXAMPLE_PATH)[:2]
    write_groups(path, [g.__class__(**{**g.__dict__, "image": None}) for g in groups])
    return path


def test_localize_writes_json_arrays_and_report(tmp_path, small_pairs, capsys):
    out = tmp_path / "loc"
    code, stdout, _ = run(["localize", "--model", "tiny-gemma3-text", "--pairs", str(small_pairs),
                           "--out", str(out), "--max-pairs-per-group", "1", "--quiet"], capsys)
    assert code in (0, None)
    doc = json.loads((out / "localization.json").read_text())
    assert doc["schema_version"] == 3 and doc["n_layers"] == 12
    assert doc["n_pairs"] + doc["n_excluded"] == 2
    assert len(doc["score"]["values"]) == 12
    assert doc["settings"]["selection"]["spec"]
    assert (out / "arrays.safetensors").stat().st_size > 0
    html = (out / "report.html").read_text()
    assert "plotly" in html and "Restoration" in html
    assert "selected" in stdout
    assert doc["settings"]["logit_lens"] is True


def test_no_logit_lens_records_the_cosine_divergence_only(tmp_path, small_pairs, capsys):
    from mechlora.result import LocalizationResult

    out = tmp_path / "loc"
    code, _, _ = run(["localize", "--model", "tiny-gemma3-text", "--pairs", str(small_pairs),
                      "--out", str(out), "--max-pairs-per-group", "1", "--min-delta", "1e-6",
                      "--no-logit-lens", "--quiet"], capsys)
    assert code in (0, None)
    result = LocalizationResult.load(out)
    assert result.settings["logit_lens"] is False
    assert set(result.divergence) == {"cosine"} and result.divergence["cosine"].shape == (2, 12)

    code, _, err = run(["localize", "--model", "tiny-gemma3-text", "--pairs", str(small_pairs),
                        "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--pairs", "missing.jsonl"], "missing.jsonl"),
    (["--positions", "first"], "positions"),
    (["--sites", "resid,neurons"], "unknown site 'neurons'"),
    (["--engine", "warp"], "engine"),
    (["--model", "/no/such/model"], "does not exist"),
    (["--rule", "window:99"], "window"),
])
def test_bad_input_gives_a_clear_error(tmp_path, small_pairs, capsys, args, message):
    base = ["localize", "--model", "tiny-gemma3-text", "--pairs", str(small_pairs),
            "--out", str(tmp_path / "o"), "--quiet", "--max-pairs-per-group", "1"]
    code, _, err = run(base + args, capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_bad_data_line_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "question": "Is it?", "paraphrases": ["Is it so?"], '
                   '"answer": "yes"}\n{"id": "b", "question": "x"\n')
    code, _, err = run(["localize", "--model", "tiny-gemma3-text", "--pairs", str(bad),
                        "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "bad.jsonl:2" in err


def test_help_says_what_each_engine_costs(capsys):
    code, out, _ = run(["localize", "--help"], capsys)
    assert code in (0, None)
    text = " ".join(out.split())
    assert "deep copy" in text and "--max-bytes" in text and "bidirectional" in text


@pytest.mark.parametrize("args, message", [
    (["--min-delta", "0"], "min_delta must be a positive"),
    (["--max-bytes", "lots"], "--max-bytes 'lots' is not a size"),
    (["--max-rows", "0"], "max_rows must be at least 1"),
    (["--spec", "15-19", "--engine", "attribution"],
     "engine attribution estimates per-layer sites only; --spec need an exact engine"),
    (["--heads", "--engine", "attribution"], "--heads need an exact engine"),
])
def test_limits_fail_before_the_model_loads(tmp_path, small_pairs, capsys, args, message):
    code, _, err = run(["localize", "--model", "/no/such/model", "--pairs", str(small_pairs),
                        "--out", str(tmp_path / "o")] + args, capsys)
    assert code == 2 and message in err and "Traceback" not in err

