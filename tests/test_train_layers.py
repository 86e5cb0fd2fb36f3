"""train's --match-params and selector --layers: counts on MedGemma-4B (meta), real runs on a tiny
Gemma 3 VLM (4 language layers, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from mechlora.data import EXAMPLE_PATH, load_groups
from mechlora.errors import MechloraError
from mechlora.models import wrap
from mechlora.models.presets import tiny_gemma3_vlm
from mechlora.select import Selection, apply_selector, band_layers
from mechlora.spec import LayerSpec, count_lora_parameters, plan
from mechlora.train import TrainConfig, train, train_arm
from tests.cli import run_cli

GROUPS = load_groups(EXAMPLE_PATH)
ONE_STEP = TrainConfig(max_steps=1, grad_accum=4, dropout=0.0, save_every=0)


def tiny():
    model, processor = tiny_gemma3_vlm(0, n_layers=4)
    return wrap(model, processor, name="tiny-gemma3-vlm")


cli = run_cli


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_dry_run_on_medgemma_prints_both_counts_and_the_difference(capsys) -> None:
    code, out, err = cli(["train", "--dry-run", "--model", "medgemma-4b", "--layers", "all",
                          "--match-params", "15-19"], capsys)
    assert code == 0, err
    assert "trainable  4,382,720 (0.10%) of 4,300,079,472" in out  # not 29,802,496
    assert ("matched    0-33 (34 layers: 22 at r=2 and 12 at r=3): 4,382,720 trainable "
            "parameters; 15-19 at r=16: 4,382,720; difference +0") in out
    # a reference that is not a whole number of rank steps of the chosen layers' total
    code, out, _ = cli(["train", "--dry-run", "--model", "medgemma-4b", "--layers", "0-2",
                        "--match-params", "16", "--r", "5"], capsys)
    # one layer at r=5 = 5 rank steps; 3 layers: 1 each + 2 extra, exact
    assert code == 0 and "(3 layers: 2 at r=2 and 1 at r=1)" in out and "difference +0" in out
    code, _, err = cli(["train", "--dry-run", "--model", "medgemma-4b", "--layers", "all",
                        "--match-params", "16"], capsys)
    assert code == 2 and "match on fewer layers" in err and "Traceback" not in err
    code, _, err = cli(["train", "--dry-run", "--model", "medgemma-4b", "--layers", "all",
                        "--match-params", "30-40"], capsys)
    assert code == 2 and err.startswith("error: --match-params 30-40: layer 40")


def test_dry_run_selectors_on_meta(capsys) -> None:
    code, out, _ = cli(["train", "--dry-run", "--model", "medgemma-4b", "--layers", "random:5",
                        "--seed", "3"], capsys)
    drawn = band_layers("random", 5, 34, seed=3).spec
    assert code == 0 and f"layers     {drawn} (random:5 -> {drawn}" in out
    assert "4,382,720" in out
    code, out, _ = cli(["train", "--dry-run", "--model", "medgemma-4b", "--layers", "grad:5"],
                       capsys)
    assert code == 0 and "grad scores are computed on the training pairs first" in out
    code, _, err = cli(["train", "--dry-run", "--model", "medgemma-4b", "--layers", "gard:5"],
                       capsys)
    assert code == 2 and "unknown selector 'gard:5'" in err


def test_matched_run_trains_the_reference_count_with_peft(tmp_path) -> None:
    subject = tiny()
    reference = plan(subject.base, LayerSpec.parse("2-3", 4), subject.layers_path).trainable
    cfg = TrainConfig(**{**ONE_STEP.to_dict(), "match_params": "2-3"})
    result = train(subject, GROUPS, layers="all", out=tmp_path / "run", config=cfg,
                   progress=False)
    assert trainable(result.subject.model) == reference  # PEFT's own count, not our arithmetic
    record = json.loads((tmp_path / "run" / "mechlora.json").read_text())
    assert record["lora"]["trainable_parameters"] == reference
    assert record["lora"]["match"] == {"reference": "2-3 at r=16", "target": reference,
                                       "trainable": reference, "difference": 0,
                                       "rank_step": reference // 32}
    assert record["lora"]["ranks"] == {"0": 8, "1": 8, "2": 8, "3": 8}
    assert record["config"]["match_params"] == "2-3"
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16  # alpha / r kept at 32 / 16
    assert "4 layers at 8, matched to 2-3 at r=16" in (tmp_path / "run" / "README.md").read_text()
    _, n = count_lora_parameters(subject.base, LayerSpec.all(4).lora_config(
        subject.layers_path, ranks={i: 8 for i in range(4)}))
    assert n == reference


def test_selector_layers_are_computed_saved_and_recorded(tmp_path) -> None:
    subject = tiny()
    result = train(subject, GROUPS, layers="grad:2", out=tmp_path / "grad", config=ONE_STEP,
                   progress=False)
    saved = Selection.load(tmp_path / "grad" / "selection.json")
    assert saved.scores.source == "grad" and result.spec == saved.spec
    assert saved.scores.settings["seed"] == 0 and saved.scores.settings["r"] == 16
    record = json.loads((tmp_path / "grad" / "mechlora.json").read_text())
    assert record["layers"]["how"] == "selector" and record["layers"]["given"] == "grad:2"
    assert record["layers"]["selector"] == "grad:topk:2"
    assert record["selection"]["scores"]["values"] == pytest.approx(saved.scores.values.tolist())
    assert "chosen by grad:topk:2" in (tmp_path / "grad" / "README.md").read_text()

    # --from a saved selection: auto uses it as it is, a rule reads its scores
    from_saved = train(tiny(), GROUPS, layers="auto", from_localization=tmp_path / "grad"
                       / "selection.json", config=ONE_STEP, progress=False)
    assert from_saved.spec == saved.spec and from_saved.layers.how == "auto"
    window = train(tiny(), GROUPS, layers="window:3", from_localization=tmp_path / "grad",
                   config=ONE_STEP, progress=False)
    assert window.spec == apply_selector("grad:window:3", saved.scores).spec
    assert window.layers.selection.selector == "grad:window:3"

    # random bands are drawn with the training seed
    for seed in (0, 5):
        cfg = TrainConfig(**{**ONE_STEP.to_dict(), "seed": seed})
        drawn = train(tiny(), GROUPS, layers="random:2", config=cfg, progress=False)
        assert drawn.spec == band_layers("random", 2, 4, seed=seed).spec


def test_train_arm_reuses_selector_and_selection_arms(tmp_path, monkeypatch) -> None:
    import mechlora.training.step as S

    subject = tiny()
    selection = apply_selector("early:2", None, 4)
    record = train_arm(subject, GROUPS, tmp_path / "a", layers=selection, config=ONE_STEP,
                       progress=False)
    assert record["layers"]["list"] == [0, 1] and record["selection"]["selector"] == "early:2"
    record_b = train_arm(subject, GROUPS, tmp_path / "b", layers="random:2", config=ONE_STEP,
                         progress=False)
    monkeypatch.setattr(S, "optimizer_step", None)  # finished arms do not train again
    assert train_arm(subject, GROUPS, tmp_path / "a", layers=selection, config=ONE_STEP) == record
    assert train_arm(subject, GROUPS, tmp_path / "b", layers="random:2",
                     config=ONE_STEP) == record_b
    with pytest.raises(MechloraError, match="finished run of another"):
        train_arm(subject, GROUPS, tmp_path / "b", layers="random:3", config=ONE_STEP)
    with pytest.raises(MechloraError, match="finished run of another"):
        train_arm(subject, GROUPS, tmp_path / "a", layers=selection,
                  config=TrainConfig(**{**ONE_STEP.to_dict(), "match_params": "3"}))
    assert torch.is_grad_enabled()
