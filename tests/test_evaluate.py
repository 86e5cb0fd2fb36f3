"""evaluate(): predictions match direct forwards, batching does not matter, adapters and
image conditions do what they say, outputs round-trip, and bad input gets clear errors."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mechlora.data import EXAMPLE_PATH, QuestionGroup, data_hash, load_groups, load_image
from mechlora.errors import DataError, MechloraError
from mechlora.evaluate import (
    EvalResult,
    arm_names,
    check_adapter,
    evaluate,
    plan_prompts,
    swap_images,
)
from mechlora.io import MARKER
from mechlora.metrics import compare, compute_metrics
from mechlora.models import wrap
from mechlora.models.presets import tiny_gemma3_text, tiny_gemma3_vlm
from mechlora.patching import margin

N_BOOT = 200
LM_TARGETS = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"


def _vlm():
    model, processor = tiny_gemma3_vlm(seed=0, n_layers=2)
    return wrap(model, processor, name="tiny-vlm-2")


def make_adapter(folder: Path, *, random_b: bool, targets: str = LM_TARGETS) -> Path:
    """A PEFT LoRA folder for the 2-layer tiny VLM; B = 0 (PEFT's init) changes nothing."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_gemma3_vlm(seed=0, n_layers=2)
    with warnings.catch_warnings():  # a transformers deprecation PEFT triggers
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    if random_b:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vlm():
    return _vlm()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"zero": make_adapter(root / "zero", random_b=False),
            "rand": make_adapter(root / "rand", random_b=True)}


@pytest.fixture(scope="module")
def run(vlm, adapters, tmp_path_factory):
    """One full run (base + two adapters, every image condition), written to a folder."""
    out = tmp_path_factory.mktemp("eval") / "out"
    result = evaluate(vlm, EXAMPLE_PATH, adapters=[adapters["zero"], adapters["rand"]],
                      noimage=True, decode=True, max_new_tokens=2, n_boot=N_BOOT,
                      progress=False, out=out)
    return result, out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _small_data(tmp_path: Path, groups: list[dict]) -> Path:
    """A data file in tmp_path with the example images copied beside it."""
    shutil.copytree(EXAMPLE_PATH.parent / "images", tmp_path / "images", dirs_exist_ok=True)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(g) + "\n" for g in groups))
    return path


# ---- outputs ----------------------------------------------------------------------------------

def test_outputs_and_schema(run):
    result, out = run
    doc = json.loads((out / "eval.json").read_text())
    assert doc["schema_version"] == 2
    assert list(doc["arms"]) == ["base", "zero", "rand"]
    assert doc["arms"]["base"]["adapter"] is None
    assert Path(doc["arms"]["rand"]["adapter"]).name == "rand"
    assert list(doc["comparisons"]) == ["zero", "rand"]
    groups = load_groups(EXAMPLE_PATH)
    assert doc["data"]["hash"] == data_hash(groups)
    assert doc["data"]["n_variants"] == sum(len(g.variants) for g in groups) == 36
    assert doc["settings"]["gray"] and doc["settings"]["swap"] and doc["settings"]["noimage"]
    records = _records(out)
    assert len(records) == 3 * 36
    rec = records[0]
    assert rec["pred_choice"] in ("yes", "no") and rec["correct"] == (rec["pred"] == rec["answer"])
    assert all(isinstance(r["decoded"], str) for r in records)
    assert "<script" in (out / "report.html").read_text()[:5_000_000]  # plotly embedded
    assert result.table().splitlines()[1:] and "rand" in result.table()
    assert "flip vs original" in result.table() and "flip all pairs" in result.table()


def test_metrics_are_compute_metrics_of_the_written_predictions(run):
    _, out = run
    doc = json.loads((out / "eval.json").read_text())
    records = _records(out)
    by_arm = {a: [r for r in records if r["arm"] == a] for a in doc["arms"]}
    for arm, recs in by_arm.items():
        expected = json.loads(json.dumps(compute_metrics(recs, n_boot=N_BOOT, seed=0)))
        assert doc["arms"][arm]["metrics"] == expected
    expected = json.loads(json.dumps(compare(by_arm["base"], by_arm["rand"], n_boot=N_BOOT)))
    assert doc["comparisons"]["rand"] == expected


def test_predictions_match_direct_forwards(vlm, run):
    """Independent check: one unbatched forward per wording, choices read by hand."""
    result, _ = run
    groups = load_groups(EXAMPLE_PATH)[:1]
    recs = {(r["group_id"], r["variant"]): r for r in result.records if r["arm"] == "base"}
    gray = vlm.gray_image()
    for g in groups:
        ids = vlm.answer_token_ids(g.choices)
        image = load_image(g.image)
        for v, variant in enumerate(g.variants):
            rec = recs[(g.id, v)]
            with torch.inference_mode():
                main = vlm.model(**vlm.encode([variant.text], [image])).logits[0, -1]
                grey = vlm.model(**vlm.encode([variant.text], [gray])).logits[0, -1]
                none = vlm.model(**vlm.encode([variant.text], [None])).logits[0, -1]
            assert rec["pred"] == int(main[ids].argmax())
            assert rec["margin"] == pytest.approx(float(margin(main, ids, g.answer_index)),
                                                  abs=1e-4)
            top2 = main[ids].topk(2).values
            assert rec["gap"] == pytest.approx(float(top2[0] - top2[1]), abs=1e-4)
            assert rec["pred_gray"] == int(grey[ids].argmax())
            assert rec["pred_noimage"] == int(none[ids].argmax())


def test_batch_size_does_not_change_predictions(vlm):
    groups = load_groups(EXAMPLE_PATH)[1:3]
    one = evaluate(vlm, groups, batch_size=1, noimage=True, n_boot=N_BOOT, progress=False)
    many = evaluate(vlm, groups, batch_size=16, noimage=True, n_boot=N_BOOT, progress=False)
    for a, b in zip(one.predictions["base"], many.predictions["base"], strict=True):
        assert (a.pred, a.pred_gray, a.pred_noimage, a.pred_swap) == \
               (b.pred, b.pred_gray, b.pred_noimage, b.pred_swap)
        assert a.margin == pytest.approx(b.margin, abs=1e-4)


def test_result_round_trips(run):
    result, out = run
    loaded = EvalResult.load(out)
    assert loaded.metrics == json.loads(json.dumps(result.metrics))
    assert loaded.predictions["rand"] == result.predictions["rand"]
    assert loaded.table() == result.table()


def test_gap_is_the_predicted_choices_lead_with_three_choices():
    """With three choices the margin is about the gold answer; the gap about the prediction."""
    from mechlora.data import Variant

    model, tok = tiny_gemma3_text(seed=0, n_layers=2)
    text = wrap(model, tok, name="tiny-text-2")
    choices = ("yes", "no", "maybe")
    groups = [QuestionGroup(id=f"g{k}", variants=(Variant(q), Variant(q + " Really?")),
                            answer=choices[k % 3], choices=choices)
              for k, q in enumerate(["Is it red?", "Is it big?", "Does it fly?", "Is it old?"])]
    result = evaluate(text, groups, n_boot=N_BOOT, progress=False)
    ids = text.answer_token_ids(choices)
    recs = {(r["group_id"], r["variant"]): r for r in result.records}
    for g in groups:
        for v, variant in enumerate(g.variants):
            with torch.inference_mode():
                logits = text.model(**text.encode([variant.text], [None])).logits[0, -1, ids]
            rec = recs[(g.id, v)]
            top2 = logits.topk(2).values
            assert rec["pred"] == int(logits.argmax())
            assert rec["gap"] == pytest.approx(float(top2[0] - top2[1]), abs=1e-4)
            others = torch.cat([logits[:g.answer_index], logits[g.answer_index + 1:]])
            assert rec["margin"] == pytest.approx(float(logits[g.answer_index] - others.max()),
                                                  abs=1e-4)
    assert result.metrics["base"]["flip_auroc"]["n_unscored"] == 0


def test_table_and_report_say_when_an_interval_is_undefined(tmp_path):
    from mechlora.report.eval import render_table, write_report

    rows = [{"group_id": g, "variant": v, "pred": (v + k) % 2, "answer": 0, "margin": 0.1 * v}
            for k, g in enumerate("ABC") for v in range(3)]
    doc = {"model": "m[x]", "data": {"path": None, "hash": "0" * 64, "n_groups": 3,
                                     "n_variants": 9},
           "arms": {"base": {"adapter": None, "metrics": compute_metrics(rows, n_boot=50)}},
           "comparisons": {}, "settings": {}}
    table = render_table(doc)
    assert "[n/a]" in table and "m[x]" in table  # rich would eat both as markup
    html_text = write_report(tmp_path / "r.html", doc, [], plotlyjs="cdn").read_text()
    assert "no CI" in html_text and "[n/a]" in html_text


def test_old_eval_json_is_refused_with_a_way_out(run, tmp_path):
    _, out = run
    copy = tmp_path / "v1"
    shutil.copytree(out, copy)
    doc = json.loads((copy / "eval.json").read_text())
    doc["schema_version"] = 1
    (copy / "eval.json").write_text(json.dumps(doc))
    with pytest.raises(MechloraError, match="schema version 1.*compute_metrics"):
        EvalResult.load(copy)


def test_predictions_with_unicode_line_separators_read_back(run, tmp_path):
    """Wordings may hold U+2028 and friends, raw in a UTF-8 predictions.jsonl."""
    _, out = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    records = _records(out)
    for i, ch in enumerate("\u2028\u2029\x85\x0b\x0c"):
        records[i]["text"] = f"Is there{ch}effusion?"
    (copy / "predictions.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    loaded = EvalResult.load(copy)
    assert loaded.records == records


# ---- adapters ---------------------------------------------------------------------------------

def test_zero_adapter_gives_the_base_metrics(run):
    result, _ = run
    assert result.metrics["zero"] == result.metrics["base"]
    assert result.predictions["zero"] == result.predictions["base"]
    assert result.comparisons["zero"]["pairwise_flip_rate"]["diff"] == 0


def test_random_adapter_changes_something(run):
    result, _ = run
    base = np.array([p.margin for p in result.predictions["base"]])
    rand = np.array([p.margin for p in result.predictions["rand"]])
    assert np.abs(base - rand).max() > 1e-2
    assert result.metrics["rand"] != result.metrics["base"]


def test_callers_model_is_left_unchanged(vlm, run):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    assert not isinstance(vlm.model, PeftModel)
    assert not any(isinstance(m, LoraLayer) for m in vlm.model.modules())
    assert not vlm.model.training


def test_arm_names_are_unique():
    paths = [Path("a/x"), Path("b/x"), Path("c/base"), Path("d/x-2")]
    assert arm_names(paths) == ["x", "x-2", "base-2", "x-2-2"]


# ---- image conditions -------------------------------------------------------------------------

def test_noimage_prompts_carry_no_image_tokens(vlm):
    groups = load_groups(EXAMPLE_PATH)[:2]
    n = sum(len(g.variants) for g in groups)
    cfg = vlm.base.config
    image_ids = {cfg.image_token_id, cfg.boi_token_index, cfg.eoi_token_index}
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def grab(module, args, kwargs):
        seen.append((kwargs["input_ids"], kwargs["attention_mask"]))

    handle = vlm.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        evaluate(vlm, groups, gray=False, swap=False, noimage=True, batch_size=5,
                 n_boot=N_BOOT, progress=False)
    finally:
        handle.remove()
    rows = [(ids[mask.bool()]) for batch, masks in seen for ids, mask in zip(batch, masks)]
    with_image = [r for r in rows if (r == cfg.image_token_id).any()]
    without = [r for r in rows if not (r == cfg.image_token_id).any()]
    assert len(with_image) == len(without) == n
    assert all(not any(int(t) in image_ids for t in r) for r in without)
    # The planned no-image prompts, encoded on their own, hold no pixel values either.
    prompts = plan_prompts([(g, v) for g in groups for v in range(len(g.variants))],
                           use_images=True, gray=False, noimage=True, swap=None)
    inputs = vlm.encode([p.text for p in prompts if p.condition == "noimage"],
                        [None for p in prompts if p.condition == "noimage"])
    assert "pixel_values" not in inputs
    assert not any(int(t) in image_ids for t in inputs["input_ids"].flatten())


def test_swap_is_a_seeded_derangement(run):
    groups = load_groups(EXAMPLE_PATH)
    swap = swap_images(groups, seed=0)
    assert swap == swap_images(groups, seed=0)
    assert set(swap) == {g.id for g in groups}
    for g in groups:
        assert swap[g.id].read_bytes() != g.image.read_bytes()
    assert swap_images(groups[:2], seed=0) == {}  # both use cxr_01: nothing to swap with
    result, _ = run
    recs = [r for r in result.records if r["arm"] == "base"]
    assert all(r["pred_swap"] is not None and r["swap_image"] != r["image"] for r in recs)


def test_text_model_skips_image_conditions(tmp_path):
    model, tok = tiny_gemma3_text(seed=0, n_layers=2)
    text = wrap(model, tok, name="tiny-text-2")
    groups = load_groups(EXAMPLE_PATH)[:2]
    result = evaluate(text, groups, n_boot=N_BOOT, progress=False, decode=True,
                      max_new_tokens=3)
    assert any("text-only" in n for n in result.notes)
    assert all(r["pred_gray"] is None and r["pred_swap"] is None for r in result.records)
    assert all(isinstance(r["decoded"], str) for r in result.records)
    assert result.metrics["base"]["text_only_agreement_gray"]["n"] == 0
    for option in ("gray", "swap", "noimage"):
        with pytest.raises(MechloraError, match="text-only"):
            evaluate(text, groups, n_boot=N_BOOT, progress=False, **{option: True})


def test_vlm_without_images_skips_image_conditions(vlm):
    groups = [QuestionGroup("q", load_groups(EXAMPLE_PATH)[0].variants[:2], "yes")]
    result = evaluate(vlm, groups, n_boot=N_BOOT, progress=False)
    assert any("no question has an image" in n for n in result.notes)
    with pytest.raises(MechloraError, match="no question has an image"):
        evaluate(vlm, groups, gray=True, n_boot=N_BOOT, progress=False)


# ---- errors -----------------------------------------------------------------------------------

def test_adapter_folder_errors(tmp_path, adapters):
    with pytest.raises(MechloraError, match="not found"):
        check_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MechloraError, match="not a PEFT adapter folder"):
        check_adapter(tmp_path / "empty")
    bad = shutil.copytree(adapters["zero"], tmp_path / "bad")
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(MechloraError, match="not a valid PEFT config"):
        check_adapter(bad)
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(MechloraError, match="takes LoRA adapters"):
        check_adapter(bad)
    weightless = shutil.copytree(adapters["zero"], tmp_path / "weightless")
    (weightless / "adapter_model.safetensors").unlink()
    with pytest.raises(MechloraError, match="no adapter weights"):
        check_adapter(weightless)


def test_adapter_for_another_model_is_refused_and_leaves_no_trace(vlm, tmp_path):
    from peft.tuners.lora import LoraLayer

    folder = make_adapter(tmp_path / "other", random_b=False)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["c_attn"]  # GPT-2's module name: matches nothing here
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MechloraError, match="does not fit"):
        evaluate(vlm, load_groups(EXAMPLE_PATH)[:1], adapters=[folder], progress=False)
    assert not any(isinstance(m, LoraLayer) for m in vlm.model.modules())


def test_bad_input_errors(vlm, tmp_path, adapters):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "q1", "question": "Is there?"}\n')
    with pytest.raises(DataError, match="paraphrases"):
        evaluate(vlm, bad, progress=False)
    with pytest.raises(MechloraError, match="empty"):
        evaluate(vlm, [], progress=False)
    with pytest.raises(MechloraError, match="batch size"):
        evaluate(vlm, EXAMPLE_PATH, batch_size=0, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("old")
    with pytest.raises(MechloraError, match="--overwrite"):
        evaluate(vlm, EXAMPLE_PATH, out=tmp_path / "full", progress=False)
    with pytest.raises(MechloraError, match="reads"):
        evaluate(vlm, EXAMPLE_PATH, adapters=[adapters["zero"]], out=adapters["zero"].parent,
                 overwrite=True, progress=False)
    assert (adapters["zero"] / "adapter_config.json").is_file()


# ---- command line -----------------------------------------------------------------------------

def _cli(argv: list[str]) -> int:
    from mechlora.cli import main

    try:
        main(argv)
    except SystemExit as e:  # typer may exit even on success
        return e.code or 0
    return 0


def test_cli_writes_outputs_escapes_text_and_refuses_to_overwrite(tmp_path, monkeypatch,
                                                                  capsys):
    from mechlora.models import presets

    monkeypatch.setitem(presets.PRESETS, "tiny-gemma3-vlm",
                        lambda: tiny_gemma3_vlm(seed=0, n_layers=2))
    data = _small_data(tmp_path, [
        {"id": "q1", "image": "images/cxr_01.png", "question": "Is there an effusion?",
         "paraphrases": [{"text": "<script>alert(1)</script> fluid?", "phenomenon": "x"}],
         "answer": "yes", "type": "presence"},
        {"id": "q2", "image": "images/cxr_02.png", "question": "Is there a pneumothorax?",
         "paraphrases": ["Is air in the pleural space?"], "answer": "no"},
    ])
    out = tmp_path / "out"
    argv = ["eval", "-m", "tiny-gemma3-vlm", "-p", str(data), "-o", str(out), "--n-boot",
            str(N_BOOT), "--no-progress"]
    assert _cli(argv) == 0
    printed = capsys.readouterr().out
    assert "flip rate" in printed and "base" in printed
    assert {p.name for p in out.iterdir()} == {"eval.json", "predictions.jsonl", "report.html",
                                               MARKER}
    report = (out / "report.html").read_text()
    assert "<script>alert(1)" not in report and "&lt;script&gt;alert(1)" in report
    assert _cli(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _cli([*argv, "--adapter", str(tmp_path / "nope"), "--overwrite"]) == 2
    assert "adapter folder" in capsys.readouterr().err


def test_model_that_already_carries_an_adapter_is_refused(adapters):
    from mechlora.models import load_adapter

    model, processor = tiny_gemma3_vlm(seed=0, n_layers=2)
    subject = wrap(load_adapter(model, adapters["zero"]), processor)
    with pytest.raises(MechloraError, match="already carries a PEFT adapter"):
        evaluate(subject, EXAMPLE_PATH, adapters=[adapters["rand"]], progress=False)
