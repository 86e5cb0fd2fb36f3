import json
import math

import numpy as np
import pytest

from mechlora import stats
from mechlora.metrics import (
    VariantPrediction,
    compare,
    compute_metrics,
    question_sums,
    to_predictions,
)


def vp(g, v, pred, answer, margin, ph=None, typ=None, gray=None, noimg=None, swap=None,
       gap=math.nan):
    return VariantPrediction(group_id=g, variant=v, phenomenon=ph, type=typ, pred=pred,
                             answer=answer, margin=margin, pred_gray=gray, pred_noimage=noimg,
                             pred_swap=swap, gap=gap)


# Three questions, worked by hand (see the comments in each test).
BASE = [
    vp("A", 0, 1, 1, 2.0, None, "yn", gray=0, noimg=1, swap=0),
    vp("A", 1, 1, 1, 1.0, "negation", "yn", gray=1, noimg=1, swap=0),
    vp("A", 2, 0, 1, -1.0, "synonym", "yn", gray=0, noimg=1, swap=0),
    vp("B", 0, 0, 0, 3.0, None, "yn", gray=0, noimg=1, swap=0),
    vp("B", 1, 0, 0, 2.5, "negation", "yn", gray=0, noimg=0, swap=1),
    vp("C", 0, 2, 2, 0.5, None, "mc", gray=2, swap=2),
    vp("C", 1, 0, 2, -0.5, "synonym", "mc", gray=0, swap=2),
    vp("C", 2, 1, 2, -2.0, "negation", "mc", gray=2, swap=2),
]


@pytest.fixture(scope="module")
def m():
    return compute_metrics(BASE, n_boot=300)


def test_accuracy(m):
    # A: 2 of 3 correct, B: 2 of 2, C: 1 of 3.
    acc = m["accuracy"]
    assert (acc["k"], acc["n"], acc["value"], acc["n_questions"]) == (5, 8, 5 / 8, 3)
    # 3 questions: too few for an interval (stats.MIN_CLUSTERS), so none rather than a narrow one
    assert acc["ci"] == [None, None] and acc["ci_method"] == "cluster bootstrap over questions"
    assert (m["n_variants"], m["n_groups"]) == (8, 3)


def test_pairwise_and_question_flip(m):
    # Pairs: A (0,1) same, (0,2) and (1,2) differ; B none; C all three differ -> 5 / 7.
    pf = m["pairwise_flip_rate"]
    assert (pf["k"], pf["n"]) == (5, 7)
    assert pf["ci"] == [None, None]
    # Question level: A and C flip, B does not. One item per question: Wilson is right.
    qf = m["question_flip_rate"]
    assert (qf["k"], qf["n"]) == (2, 3)
    assert qf["ci"] == pytest.approx(list(stats.wilson_ci(2, 3)))
    assert qf["ci_method"].startswith("Wilson")


def test_original_flip_rate(m):
    # Pairs (0, j): A (0,1) same, (0,2) differ; B (0,1) same; C (0,1), (0,2) differ -> 3 / 5.
    of = m["original_flip_rate"]
    assert (of["k"], of["n"], of["n_questions"]) == (3, 5, 3)
    # Over all phenomena it is the pair-weighted mean of the per-phenomenon flip rates.
    ph = m["by_phenomenon"]
    assert sum(b["flip_rate"]["k"] for b in ph.values()) == of["k"]
    assert sum(b["flip_rate"]["n"] for b in ph.values()) == of["n"]


def test_margin_diff(m):
    # A: 1 + 3 + 2, B: 0.5, C: 1 + 2.5 + 1.5 -> 11.5 over 7 pairs.
    md = m["margin_diff"]
    assert md["n"] == 7
    assert md["value"] == pytest.approx(11.5 / 7)
    assert md["ci"] == [None, None] and md["n_questions"] == 3


def test_image_ablations(m):
    gray, noimg, swap = (m["text_only_agreement_gray"], m["text_only_agreement_noimage"],
                         m["swap_sensitivity"])
    assert (gray["k"], gray["n"]) == (6, 8)  # A0 and C2 change with a gray image
    assert (noimg["k"], noimg["n"]) == (3, 5)  # C has no no-image run
    assert (swap["k"], swap["n"]) == (5, 8)  # pred != pred_swap: A0 A1 B1 C1 C2


def test_quadrants(m):
    # A: flips, original changes with gray -> inconsistent, image-reliant.
    # B: no flip, gray keeps 0 -> consistent, not reliant. C: flips, gray keeps 2.
    q = m["image_reliance_quadrants"]
    assert q["n"] == 3
    assert q["counts"] == {"consistent_image_reliant": 0, "consistent_not_image_reliant": 1,
                           "inconsistent_image_reliant": 1, "inconsistent_not_image_reliant": 1}
    assert q["fractions"]["inconsistent_image_reliant"] == pytest.approx(1 / 3)


def test_flip_auroc(m):
    # No gap recorded, originals all correct: their gap is their margin. Scores -gap:
    # A -2 (flip), B -3 (no flip), C -0.5 (flip): both flippers rank above B.
    a = m["flip_auroc"]
    assert (a["value"], a["n_pos"], a["n_neg"], a["n_unscored"]) == (1.0, 2, 1, 0)


def test_flip_auroc_uses_the_predicted_answers_confidence_with_three_choices():
    # Q1, Q2: the original answers 1 (gold 0) by a hair over choice 2, the gold far below:
    # margin -5 / -4 but gap 0.1 / 0.2, and a paraphrase flips. Q3, Q4: correct, gap 1 / 2,
    # stable. -|margin| ranks the flippers as the most confident (AUROC 0); the gap is right.
    rows = [vp("Q1", 0, 1, 0, -5.0, gap=0.1), vp("Q1", 1, 2, 0, -4.0, gap=0.3),
            vp("Q2", 0, 1, 0, -4.0, gap=0.2), vp("Q2", 1, 2, 0, -3.0, gap=0.1),
            vp("Q3", 0, 0, 0, 1.0, gap=1.0), vp("Q3", 1, 0, 0, 1.5, gap=1.5),
            vp("Q4", 0, 0, 0, 2.0, gap=2.0), vp("Q4", 1, 0, 0, 2.5, gap=2.5)]
    a = compute_metrics(rows, n_boot=50)["flip_auroc"]
    assert (a["value"], a["n_pos"], a["n_neg"]) == (1.0, 2, 2)
    assert stats.auroc([-5.0, -4.0, -1.0, -2.0], [1, 1, 0, 0]) == 0.0  # the old score
    # Without a recorded gap only correct originals can be scored (gap = margin there).
    no_gap = [{**r.__dict__, "gap": None} for r in rows]
    a = compute_metrics(no_gap, n_boot=50)["flip_auroc"]
    assert (a["n_pos"], a["n_neg"], a["n_unscored"], a["value"]) == (0, 2, 2, None)


def test_breakdown_by_type(m):
    yn, mc = m["by_type"]["yn"], m["by_type"]["mc"]
    assert (yn["accuracy"]["k"], yn["accuracy"]["n"]) == (4, 5)
    assert (yn["pairwise_flip_rate"]["k"], yn["pairwise_flip_rate"]["n"]) == (2, 4)
    assert (yn["question_flip_rate"]["k"], yn["question_flip_rate"]["n"]) == (1, 2)
    assert yn["margin_diff"]["value"] == pytest.approx(6.5 / 4)
    assert (mc["accuracy"]["k"], mc["pairwise_flip_rate"]["k"], mc["pairwise_flip_rate"]["n"]) \
        == (1, 3, 3)
    assert mc["margin_diff"]["value"] == pytest.approx(5 / 3)


def test_type_set_only_on_original_covers_whole_question():
    rows = [vp("A", 0, 1, 1, 1.0, typ="yn"), vp("A", 1, 0, 1, -1.0)]
    pf = compute_metrics(rows, n_boot=50)["by_type"]["yn"]["pairwise_flip_rate"]
    assert (pf["k"], pf["n"]) == (1, 1)


def test_breakdown_by_phenomenon(m):
    # negation pairs: (A0,A1) same |1|, (B0,B1) same |0.5|, (C0,C2) differ |2.5|.
    neg = m["by_phenomenon"]["negation"]
    assert neg["n_pairs"] == 3
    assert (neg["flip_rate"]["k"], neg["flip_rate"]["n"]) == (1, 3)
    assert neg["margin_diff"]["value"] == pytest.approx(4 / 3)
    assert (neg["accuracy"]["k"], neg["accuracy"]["n"]) == (2, 3)
    # synonym pairs: (A0,A2) differ |3|, (C0,C1) differ |1|.
    syn = m["by_phenomenon"]["synonym"]
    assert (syn["flip_rate"]["k"], syn["flip_rate"]["n"]) == (2, 2)
    assert syn["margin_diff"]["value"] == pytest.approx(2.0)
    assert syn["accuracy"]["k"] == 0


def test_output_is_strict_json(m):
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text) == m


def test_dicts_and_dataclasses_agree(m):
    rows = [{**r.__dict__, "extra": "ignored"} for r in BASE]
    assert compute_metrics(rows, n_boot=300) == m


def test_missing_data_gives_none_not_nan():
    rows = [{"group_id": 1, "variant": 0, "pred": 0, "answer": 0}]
    out = compute_metrics(rows, n_boot=50)
    assert out["margin_diff"]["value"] is None
    assert out["pairwise_flip_rate"]["n"] == 0
    assert out["flip_auroc"]["value"] is None
    assert out["image_reliance_quadrants"]["n"] == 0
    json.dumps(out, allow_nan=False)


def test_group_without_original_is_left_out_of_question_metrics():
    rows = [vp("A", 1, 0, 0, 1.0), vp("A", 2, 1, 0, 0.0), vp("B", 0, 0, 0, 1.0),
            vp("B", 1, 0, 0, 1.0)]
    out = compute_metrics(rows, n_boot=50)
    assert out["question_flip_rate"]["n"] == 1
    assert out["pairwise_flip_rate"]["n"] == 2  # pairs still count


def test_input_validation():
    with pytest.raises(ValueError, match="duplicate"):
        to_predictions([vp("A", 0, 1, 1, 0.0), vp("A", 0, 1, 1, 0.0)])
    with pytest.raises(ValueError, match="lacks"):
        to_predictions([{"group_id": "A", "variant": 0, "pred": 1}])


def test_order_of_records_does_not_matter(m):
    assert compute_metrics(list(reversed(BASE)), n_boot=300)["accuracy"] == m["accuracy"]


# ---- compare ----------------------------------------------------------------------------------

def _adapter():
    # A2 now answers 1 (margin 2.0); C answers 2 everywhere with margin 1.0. All correct.
    changed = {("A", 2): (1, 2.0), ("C", 0): (2, 1.0), ("C", 1): (2, 1.0), ("C", 2): (2, 1.0)}
    out = []
    for r in BASE:
        pred, margin = changed.get((r.group_id, r.variant), (r.pred, r.margin))
        out.append(vp(r.group_id, r.variant, pred, r.answer, margin, r.phenomenon, r.type,
                      gray=r.pred_gray, noimg=r.pred_noimage, swap=r.pred_swap))
    return out


def test_compare_identical_gives_zero_and_p_one():
    c = compare(BASE, BASE, n_boot=200)
    for key in ("accuracy", "original_flip_rate", "pairwise_flip_rate", "question_flip_rate",
                "margin_diff", "text_only_agreement_gray", "text_only_agreement_noimage"):
        block = c[key]
        assert block["diff"] == 0.0
        assert block["diff_ci"] == [None, None]  # 3 questions
        assert block["paired_test"]["p"] == 1.0
        if "unclustered" in block:
            z = block["unclustered"]["z_test"]
            assert z["z"] == 0.0 and z["p"] == 1.0
    assert (c["n_unmatched_base"], c["n_unmatched_adapter"]) == (0, 0)


def test_compare_hand_computed():
    c = compare(BASE, _adapter(), n_boot=200)
    acc = c["accuracy"]
    assert (acc["base"], acc["adapter"], acc["diff"]) == (5 / 8, 1.0, 3 / 8)
    # Per-question change in correct count: A +1, B 0, C +2 -> signs of {1, 2}: p = 2/4.
    assert acc["paired_test"]["p"] == pytest.approx(0.5)
    assert acc["paired_test"]["test"].startswith("paired sign-flip permutation over questions")
    # Kept apart, labelled: A2, C1, C2 become correct: exact McNemar 2 * (1/2)^3, and z.
    un = acc["unclustered"]
    assert "independent" in un["assumes"]
    assert (un["mcnemar"]["b01"], un["mcnemar"]["b10"]) == (3, 0)
    assert un["mcnemar"]["p"] == pytest.approx(0.25)
    z, p = stats.two_proportion_z(8, 8, 5, 8)
    assert un["z_test"]["z"] == pytest.approx(z) and un["z_test"]["z"] > 0
    assert un["z_test"]["p"] == pytest.approx(p)

    of = c["original_flip_rate"]
    # Flipped (0, j) pairs: A 1 -> 0, B 0 -> 0, C 2 -> 0: signs of {1, 2}: p = 2/4.
    assert (of["base"], of["adapter"], of["n"]) == (pytest.approx(3 / 5), 0.0, 5)
    assert of["paired_test"]["p"] == pytest.approx(0.5)

    pf = c["pairwise_flip_rate"]
    assert (pf["base"], pf["adapter"]) == (pytest.approx(5 / 7), 0.0)
    # Per-question change in flipped pairs: A -2, B 0, C -3 -> signs of {2, 3}: p = 2/4.
    assert pf["paired_test"]["p"] == pytest.approx(0.5)
    assert pf["paired_test"]["exact"] is True
    assert pf["unclustered"]["z_test"]["z"] < 0

    qf = c["question_flip_rate"]
    assert (qf["base"], qf["adapter"], qf["diff"]) == (pytest.approx(2 / 3), 0.0,
                                                       pytest.approx(-2 / 3))
    assert (qf["paired_test"]["b01"], qf["paired_test"]["b10"]) == (0, 2)
    assert qf["paired_test"]["p"] == pytest.approx(0.5)

    # Adapter pairs: A |2-1| |2-2| |1-2| = 2, B 0.5, C 0 -> 2.5 / 7; per question A -4, C -5.
    md = c["margin_diff"]
    assert md["base"] == pytest.approx(11.5 / 7) and md["adapter"] == pytest.approx(2.5 / 7)
    assert md["diff"] == pytest.approx(-9 / 7)
    assert md["paired_test"]["p"] == pytest.approx(0.5)
    assert md["diff_ci"] == [None, None]

    # Gray agreement: C2 starts agreeing (2 = gray); A2 (1 vs 0) and C1 (2 vs 0) stop -> 5/8.
    g = c["text_only_agreement_gray"]
    assert (g["base"], g["adapter"]) == (6 / 8, 5 / 8)
    # Per question: A loses A2 (-1), C swaps C1 for C2 (0): one non-zero change, p = 1.
    assert g["paired_test"]["p"] == 1.0
    assert (g["unclustered"]["mcnemar"]["b01"], g["unclustered"]["mcnemar"]["b10"]) == (1, 2)
    json.dumps(c, allow_nan=False)


def test_compare_aligns_on_shared_records():
    adapter = [r for r in _adapter() if (r.group_id, r.variant) != ("B", 1)]
    c = compare(BASE, list(reversed(adapter)), n_boot=100)
    assert (c["n_aligned_variants"], c["n_unmatched_base"], c["n_unmatched_adapter"]) == (7, 1, 0)
    # B loses its only paraphrase, so B leaves the question-level comparison.
    assert c["question_flip_rate"]["n"] == 2
    with pytest.raises(ValueError, match="share no"):
        compare(BASE, [vp("Z", 0, 1, 1, 0.0)])


def test_margin_nan_pairs_skipped():
    rows = [vp("A", 0, 1, 1, 1.0), vp("A", 1, 1, 1, math.nan), vp("A", 2, 1, 1, 3.0)]
    md = compute_metrics(rows, n_boot=50)["margin_diff"]
    assert (md["n"], md["value"]) == (1, 2.0)


# ---- clustered intervals on more questions ----------------------------------------------------

def _clustered(n_questions=12, n_wordings=9, seed=0):
    """Questions whose wordings mostly share one answer: items within a question correlate."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_questions):
        answer, usual = int(rng.integers(2)), int(rng.integers(2))
        for v in range(n_wordings):
            pred = usual if rng.random() < 0.85 else 1 - usual
            rows.append(vp(f"q{q}", v, pred, answer, rng.normal(), gray=usual,
                           gap=abs(rng.normal())))
    return rows


def test_headline_intervals_are_the_cluster_bootstrap():
    rows = _clustered()
    m = compute_metrics(rows, n_boot=400, seed=3)
    groups = np.asarray([int(r.group_id[1:]) for r in rows])  # clusters in order of appearance
    correct = np.asarray([r.pred == r.answer for r in rows])
    ref = stats.bootstrap_ci(groups, correct, n_boot=400, seed=3)
    assert m["accuracy"]["ci"] == pytest.approx(list(ref))
    # 36 pairs per question are far from independent: the honest interval is much wider
    # than a Wilson interval over pairs would be.
    pf = m["pairwise_flip_rate"]
    w_lo, w_hi = stats.wilson_ci(pf["k"], pf["n"])
    assert pf["ci"][1] - pf["ci"][0] > 2 * (w_hi - w_lo)
    for key in ("accuracy", "original_flip_rate", "pairwise_flip_rate", "margin_diff",
                "text_only_agreement_gray"):
        assert m[key]["ci_method"] == "cluster bootstrap over questions", key
        assert None not in m[key]["ci"], key


def test_no_headline_test_assumes_independent_items():
    base, adapter = _clustered(seed=0), _clustered(seed=1)
    c = compare(base, adapter, n_boot=100)

    def walk(block, path=()):
        for k, v in block.items():
            if isinstance(v, dict) and k != "unclustered":
                yield from walk(v, (*path, k))
            elif k == "test":
                yield path, v

    tests = dict(walk(c))
    assert tests  # every headline test is over questions
    for path, name in tests.items():
        assert "over questions" in name, path
    assert c["pairwise_flip_rate"]["diff_ci_method"] == "paired cluster bootstrap over questions"


def test_question_sums_pool_to_the_metrics():
    rows = _clustered(n_questions=7)
    m, qs = compute_metrics(rows, n_boot=50), question_sums(rows)
    assert qs.group_ids == [f"q{i}" for i in range(7)]
    for key in ("accuracy", "original_flip_rate", "pairwise_flip_rate", "question_flip_rate",
                "margin_diff", "text_only_agreement_gray"):
        pooled = qs.sums[key].sum() / qs.counts[key].sum()
        assert pooled == pytest.approx(m[key]["value"]), key
    assert (qs.counts["pairwise_flip_rate"] == 36).all()
    assert qs.values("accuracy") == pytest.approx(qs.sums["accuracy"] / 9)
    # Seeds x questions: one row per seed, the pairs per question as weights.
    rates = np.stack([question_sums(_clustered(n_questions=7, seed=s)).values(
        "pairwise_flip_rate") for s in range(3)])
    r = stats.seed_rate(rates, weights=qs.counts["pairwise_flip_rate"], n_boot=200)
    assert r.per_seed[0] == pytest.approx(m["pairwise_flip_rate"]["value"])
