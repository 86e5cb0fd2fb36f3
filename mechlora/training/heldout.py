"""The held-out check during training: `mechlora.evaluate` on the eval pairs, adapter on."""

from __future__ import annotations

from collections.abc import Sequence

from mechlora.data import QuestionGroup
from mechlora.training.guards import top_choice
from mechlora.training.step import Run


def heldout_check(run: Run, groups: Sequence[QuestionGroup], step: int) -> dict:
    """An "eval" metrics row: pairwise flip rate, accuracy, margin difference, top choice.

    The metrics are `mechlora.evaluate`'s own (main image condition only; one bootstrap
    replicate, since only the point values are logged).
    """
    from mechlora.evaluate import BASE, evaluate

    rows_per_forward = 2 * (run.micro_batch or run.cfg.pairs_per_step)
    with run.acc.autocast():
        result = evaluate(run.subject, groups, gray=False, swap=False, progress=False, n_boot=1,
                          batch_size=rows_per_forward, merge_variants=run.cfg.merge_variants)
    m = result.metrics[BASE]  # the arm of the model as given, here with its adapter on
    choice, share = top_choice([r["pred_choice"] for r in result.records])
    return {"kind": "eval", "step": step, "flip_rate": m["pairwise_flip_rate"]["value"],
            "n_pairs": m["pairwise_flip_rate"]["n"], "accuracy": m["accuracy"]["value"],
            "margin_diff": m["margin_diff"]["value"], "top_choice": choice,
            "top_choice_share": share}
