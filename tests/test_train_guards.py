"""What a run reports about itself: held-out checks (mechlora.evaluate's metrics, the last step
always checked), the card's epochs under --max-steps, and the collapse guards on a planted
collapse (a model that answers right, retrained with an overwhelming KL weight)."""

from __future__ import annotations

import copy
import json

import pytest

from mechlora.data import EXAMPLE_PATH, load_groups
from mechlora.evaluate import evaluate
from mechlora.models import wrap
from mechlora.train import TrainConfig, train
from mechlora.training.guards import kl_dominance
from tests.test_train import FAST, tiny

GROUPS = load_groups(EXAMPLE_PATH)


def test_heldout_check_is_evaluate_and_runs_at_the_last_step() -> None:
    cfg = TrainConfig(**{**FAST.to_dict(), "eval_every": 3, "max_steps": 4})
    result = train(tiny(), GROUPS, layers="2-3", config=cfg, eval_pairs=GROUPS, progress=False)
    checks = [r for r in result.metrics if r["kind"] == "eval"]
    assert [r["step"] for r in checks] == [0, 3, 4]  # today: 0 and 3; step 4 was never checked
    again = evaluate(result.subject, GROUPS, gray=False, swap=False, progress=False, n_boot=1)
    m = again.metrics["base"]
    assert checks[-1]["flip_rate"] == m["pairwise_flip_rate"]["value"]
    assert checks[-1]["accuracy"] == m["accuracy"]["value"]
    assert checks[-1]["margin_diff"] == pytest.approx(m["margin_diff"]["value"], rel=1e-6)
    assert result.record["training"]["eval"]["step"] == 4


def test_card_counts_the_epochs_run_under_max_steps(tmp_path) -> None:
    cfg = TrainConfig(**{**FAST.to_dict(), "max_steps": 1})  # 2 updates per epoch, 10 epochs
    result = train(tiny(), GROUPS, layers="2-3", out=tmp_path / "run", config=cfg,
                   progress=False)
    assert result.record["training"]["epochs"] == 0.5
    card = (tmp_path / "run" / "README.md").read_text()
    assert "| Epochs | 0.5 of 10, stopped by --max-steps 1 (1 steps, 4 pairs) |" in card


@pytest.fixture(scope="module")
def answers_right():
    """The tiny VLM trained (CE + KL) until it answers every wording right, LoRA merged."""
    good = train(tiny(), GROUPS, layers="all", progress=False,
                 config=TrainConfig(**{**FAST.to_dict(), "epochs": 20}))
    return good.subject.model.merge_and_unload(), good.subject.processor


def test_guards_warn_on_a_planted_collapse(answers_right, tmp_path, capsys) -> None:
    model, processor = answers_right
    cfg = TrainConfig(**{**FAST.to_dict(), "kl_weight": 1e4, "lr": 1e-2, "epochs": 8})
    run = train(wrap(copy.deepcopy(model), processor, name="right"), GROUPS, layers="all",
                config=cfg, eval_pairs=GROUPS, out=tmp_path / "run", progress=False)
    checks = [r for r in run.metrics if r["kind"] == "eval"]
    # planted: the base answers right (61% "no", as the reference); training collapses it
    assert checks[0]["accuracy"] == 1.0 and checks[0]["top_choice_share"] < 0.7
    assert checks[-1]["top_choice_share"] == 1.0 and checks[-1]["accuracy"] < 0.7
    guards = {r["guard"] for r in run.metrics if r["kind"] == "warning"}
    assert guards == {"choice_collapse", "kl_dominance"}
    warned = run.record["training"]["warnings"]
    assert any(w.startswith("answer collapse at step") for w in warned)
    assert any("no longer anchors the answer" in w for w in warned)
    assert capsys.readouterr().err.count("warning: ") == 2  # printed even without a bar
    card = (tmp_path / "run" / "README.md").read_text()
    assert card.count("- **Warning**: ") == 2
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
              .split("\n") if line]
    assert sorted(r["guard"] for r in logged if r["kind"] == "warning") == sorted(guards)


def test_guards_stay_quiet_on_the_recipe(answers_right) -> None:
    model, processor = answers_right
    cfg = TrainConfig(**{**FAST.to_dict(), "epochs": 8})
    run = train(wrap(copy.deepcopy(model), processor, name="right"), GROUPS, layers="all",
                config=cfg, eval_pairs=GROUPS, progress=False)
    assert run.record["training"]["warnings"] == []
    # and from a random start the recipe's CE falls: no KL warning either
    fresh = train(tiny(), GROUPS, layers="2-3", config=FAST, progress=False)
    assert kl_dominance([r for r in fresh.metrics if r["kind"] == "train"], 1.0) is None


def test_kl_dominance_criterion_on_rows() -> None:
    def rows(ce, kl):
        return [{"ce": c, "kl": k} for c, k in zip(ce, kl, strict=True)]

    rising = rows([0.1, 0.5, 0.6, 0.7, 0.8], [0.01, 0, 0, 0, 0])
    assert kl_dominance(rising, 100.0) is not None  # 100 x 0.01 = 1 > CE 0.1, CE 0.1 -> 0.8
    assert kl_dominance(rising, 1.0) is None  # KL never outweighed CE
    assert kl_dominance(rows([0.1, 0.1, 0.12, 0.12, 0.13], [0.01] * 5), 100.0) is None  # noise
    assert kl_dominance(rising[:3], 100.0) is None  # too few updates to tell
