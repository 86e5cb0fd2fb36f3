"""`mechlora localize` and `select` for what comes after the per-layer sweep: spec tests,
heads, positions, groups, TransformerLens site names, before/after; and their bad input."""

import json

import pytest

from tests.test_cli_localize import run, small_pairs  # noqa: F401 (a fixture)


@pytest.mark.parametrize("args, message", [
    (["--by", "colour"], "--by colour: use type or phenomenon"),
    (["--spec", "4-99"], "out of range"),
    (["--per-position"], "per_position patches each aligned position alone"),
    (["--compare-to", "nowhere"], "nowhere"),
    (["--adapter", "."], "not a PEFT adapter folder"),
])
def test_bad_options_give_a_clear_error(tmp_path, small_pairs, capsys, args, message):  # noqa: F811
    base = ["localize", "--model", "tiny-gemma3-text", "--pairs", str(small_pairs),
            "--out", str(tmp_path / "o"), "--quiet", "--max-pairs-per-group", "1"]
    code, _, err = run(base + args, capsys)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("specs", [["none", "2-3"], ["2-3", "None"], ["auto", "none"]])
def test_spec_none_beside_other_specs_is_refused_before_the_model_loads(
        tmp_path, small_pairs, capsys, monkeypatch, specs):  # noqa: F811
    import mechlora.models

    def no_model(*args, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mechlora.models, "load_model", no_model)
    args = [a for s in specs for a in ("--spec", s)]
    code, _, err = run(["localize", "--model", "tiny-gemma3-text", "--pairs", str(small_pairs),
                        "--out", str(tmp_path / "o"), "--quiet", *args], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "--spec none turns the spec test off, so it cannot come with other specs" in err
    assert not (tmp_path / "o").exists()


def test_interventions_from_the_cli(tmp_path, small_pairs, capsys):  # noqa: F811
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


def test_compare_to_a_base_localization(tmp_path, small_pairs, capsys):  # noqa: F811
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


def test_heads_alone_need_no_spec(tmp_path, small_pairs, capsys):  # noqa: F811
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


def test_select_with_localization_scores_measures_the_spec(small_pairs, capsys):  # noqa: F811
    code, stdout, _ = run(["select", "--scores", "localization", "--model", "tiny-gemma3-text",
                           "--pairs", str(small_pairs), "--rule", "window:2", "--quiet"], capsys)
    lines = stdout.splitlines()
    assert code == 0 and lines[1].startswith(f"window:2 -> {lines[0]}")
    assert lines[2].startswith(f"spec {lines[0]} (explicit): sufficiency ")
    assert "necessity" in lines[2]  # (2 questions: no intervals)
