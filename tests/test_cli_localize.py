"""`mechlora localize` end to end, and user mistakes that must not end in a traceback."""

import json

import pytest

from mechlora.cli import main
from mechlora.data import EXAMPLE_PATH, load_groups, write_groups


def run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


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
    (["--by", "colour"], "--by colour: use type or phenomenon"),
    (["--spec", "4-99"], "out of range"),
    (["--per-position"], "per_position patches each aligned position alone"),
    (["--compare-to", "nowhere"], "nowhere"),
    (["--adapter", "."], "not a PEFT adapter folder"),
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
])
def test_limits_fail_before_the_model_loads(tmp_path, small_pairs, capsys, args, message):
    code, _, err = run(["localize", "--model", "/no/such/model", "--pairs", str(small_pairs),
                        "--out", str(tmp_path / "o")] + args, capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_interventions_from_the_cli(tmp_path, small_pairs, capsys):
    """--heads, --per-position, --spec (auto and explicit), --by, TransformerLens site names:
    the JSON holds them, the terminal says them, the report shows them."""
    out = tmp_path / "loc"
    code, stdout, _ = run(["localize", "--model", "tiny-gemma3-text", "--pairs",
                           str(small_pairs), "--out", str(out), "--quiet", "--min-delta", "1e-3",
                           "--sites", "blocks.{l}.hook_resid_post,hook_attn_out,mlp",
                           "--heads", "--positions", "suffix:3", "--per-position",
                           "--spec", "auto", "--spec", "2-4", "--spec", "all", "--by", "type",
                           "--rule", "window:3"], capsys)
    assert code in (0, None)
    doc = json.loads((out / "localization.json").read_text())
    assert doc["components"] == ["resid", "attn", "mlp"]
    assert [s["label"] for s in doc["specs"]] == ["auto (window:3)", "explicit", "all"]
    assert doc["specs"][1]["spec"] == "2-4" and doc["specs"][2]["spec"] == "0-11"
    assert len(doc["heads"]["mean"]) == 12 and len(doc["by_position"]["labels"]) == 3
    assert doc["groups"]["by"] == "type"
    assert "spec 2-4 (explicit" in stdout and "sufficiency" in stdout and "type presence" in stdout
    html = (out / "report.html").read_text()
    for section in ("Does the spec carry the divergence?", "Attention heads", "Positions",
                    "Per type", "Directions: denoising and noising"):
        assert section in html
    code, stdout, _ = run(["select", str(out), "--rule", "window:3"], capsys)
    lines = stdout.splitlines()
    assert code == 0 and lines[2].startswith(f"spec {lines[0]} (auto (window:3)")
    code, stdout, _ = run(["select", str(out), "--rule", "topk:2"], capsys)
    assert "not measured" in stdout.splitlines()[2] and "--spec" in stdout


def test_compare_to_a_base_localization(tmp_path, small_pairs, capsys):
    from mechlora.models import load_model
    from mechlora.spec import LayerSpec

    base = tmp_path / "base"
    common = ["--model", "tiny-gemma3-text", "--pairs", str(small_pairs), "--quiet",
              "--min-delta", "1e-3", "--spec", "none", "--max-pairs-per-group", "2"]
    code, _, _ = run(["localize", "--out", str(base), *common], capsys)
    assert code in (0, None)
    subject = load_model("tiny-gemma3-text", device="cpu")
    from peft import get_peft_model

    spec = LayerSpec.of([3, 4], subject.n_layers)
    peft_model = get_peft_model(subject.model, spec.lora_config(subject.layers_path))
    peft_model.save_pretrained(tmp_path / "adapter")
    after = tmp_path / "after"
    code, stdout, _ = run(["localize", "--out", str(after), "--adapter", str(tmp_path / "adapter"),
                           "--compare-to", str(base), *common], capsys)
    assert code in (0, None)
    doc = json.loads((after / "comparison.json").read_text())
    assert doc["trained_layers"] == [3, 4] and doc["shrank_at"] == []
    assert abs(doc["remaining"]["mean"] - 1) < 1e-4  # an untrained LoRA changes nothing
    assert "before/after: 100% of the base divergence remains" in stdout
    assert "Before and after training" in (after / "report.html").read_text()


def test_heads_alone_need_no_spec(tmp_path, small_pairs, capsys):
    """`--sites attn.hook_z`: only the heads; no per-layer scores, so no selection and no
    default spec test (auto selects from per-layer scores)."""
    out = tmp_path / "heads"
    code, stdout, _ = run(["localize", "--model", "tiny-gemma3-text", "--pairs",
                           str(small_pairs), "--out", str(out), "--quiet", "--min-delta", "1e-3",
                           "--max-pairs-per-group", "1", "--sites", "attn.hook_z"], capsys)
    assert code in (0, None)
    doc = json.loads((out / "localization.json").read_text())
    assert doc["components"] == [] and "specs" not in doc and len(doc["heads"]["mean"]) == 12
    assert "selected" not in stdout
