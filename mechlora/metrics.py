"""Paraphrase-consistency metrics from a table of per-variant predictions.

One record per (question, paraphrase variant); variant 0 is the original wording. All
definitions, intervals and tests are written out in docs/metrics.md. Output dicts are
JSON-serialisable: undefined numbers (no data) are None, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, fields
from itertools import combinations
from typing import Any

import numpy as np

from mechlora import stats
from mechlora.io import jsonable

__all__ = [
    "VariantPrediction",
    "compare",
    "compute_metrics",
    "group_predictions",
    "original_pair_table",
    "pair_table",
    "question_sums",
    "question_table",
    "to_predictions",
]

QUADRANTS = (
    "consistent_image_reliant",
    "consistent_not_image_reliant",  # "consistent but dangerous": may be ignoring the image
    "inconsistent_image_reliant",
    "inconsistent_not_image_reliant",
)


@dataclass(frozen=True)
class VariantPrediction:
    """The model's answer to one wording of one question.

    `margin`: logit of the gold answer's first token minus the largest other choice's (guide
    section 2); nan when not measured. `pred_gray` / `pred_noimage` / `pred_swap`: the
    prediction with a uniform gray image, with no image, with another question's image.
    `gap`: logit of the predicted choice's first token minus the largest other choice's
    (>= 0; how sure the model is of its own answer); nan when not recorded. `choice_mass`: the
    probability the model puts on the choices' tokens at all (nan when not recorded).
    """

    group_id: Hashable
    variant: int
    phenomenon: str | None
    type: str | None
    pred: int
    answer: int
    margin: float
    pred_gray: int | None = None
    pred_noimage: int | None = None
    pred_swap: int | None = None
    gap: float = math.nan
    choice_mass: float = math.nan

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> VariantPrediction:
        """Build from a mapping; unknown keys are ignored, missing optional ones are None."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in row.items() if k in known}
        kw.setdefault("phenomenon", None)
        kw.setdefault("type", None)
        for key in ("margin", "gap", "choice_mass"):
            value = kw.get(key)
            kw[key] = math.nan if value is None else float(value)
        missing = [k for k in ("group_id", "variant", "pred", "answer") if k not in kw]
        if missing:
            raise ValueError(f"prediction record lacks {', '.join(missing)}: {dict(row)}")
        return cls(**kw)


def to_predictions(rows: Iterable[VariantPrediction | Mapping[str, Any]]
                   ) -> list[VariantPrediction]:
    """Normalise records, reject duplicate (group_id, variant), order by group then variant.

    Groups keep their order of first appearance (ids of mixed types need not be sortable).
    """
    recs = [r if isinstance(r, VariantPrediction) else VariantPrediction.from_dict(r)
            for r in rows]
    first_seen: dict[Hashable, int] = {}
    seen: set[tuple[Hashable, int]] = set()
    for r in recs:
        key = (r.group_id, r.variant)
        if key in seen:
            raise ValueError(f"duplicate prediction for group {r.group_id!r} variant {r.variant}")
        seen.add(key)
        first_seen.setdefault(r.group_id, len(first_seen))
    return sorted(recs, key=lambda r: (first_seen[r.group_id], r.variant))


def group_predictions(preds: Iterable[VariantPrediction]
                      ) -> dict[Hashable, list[VariantPrediction]]:
    """Group id -> its records, in the order given (sorted by variant after to_predictions)."""
    groups: dict[Hashable, list[VariantPrediction]] = {}
    for r in preds:
        groups.setdefault(r.group_id, []).append(r)
    return groups


@dataclass
class PairTable:
    """Pairs of variants within a group, as aligned arrays."""

    group: np.ndarray  # group id index of each pair
    flip: np.ndarray  # bool: the two predictions differ
    margin_absdiff: np.ndarray  # |m_i - m_j|, nan when a margin is missing


def _table(rows: list[tuple[int, VariantPrediction, VariantPrediction]]) -> PairTable:
    return PairTable(np.asarray([g for g, _, _ in rows], dtype=int),
                     np.asarray([a.pred != b.pred for _, a, b in rows], dtype=bool),
                     np.asarray([abs(a.margin - b.margin) for _, a, b in rows], dtype=float))


def pair_table(preds: list[VariantPrediction]) -> PairTable:
    """Every unordered pair of wordings per group, in a deterministic order (for pairing)."""
    return _table([(gi, a, b) for gi, recs in enumerate(group_predictions(preds).values())
                   for a, b in combinations(recs, 2)])


def _original_pairs(preds: list[VariantPrediction]
                    ) -> list[tuple[int, VariantPrediction, VariantPrediction]]:
    """(group index, original, paraphrase) for every paraphrase of a group with variant 0."""
    rows = []
    for gi, recs in enumerate(group_predictions(preds).values()):
        orig = next((r for r in recs if r.variant == 0), None)
        if orig is not None:
            rows.extend((gi, orig, r) for r in recs if r.variant != 0)
    return rows


def original_pair_table(preds: list[VariantPrediction]) -> PairTable:
    """The pairs (original wording, paraphrase j) for every paraphrase j: the paper's pairs."""
    return _table(_original_pairs(preds))


@dataclass
class QuestionTable:
    """One row per question that has an original (variant 0) and at least one paraphrase."""

    group: np.ndarray  # group id index
    flip: np.ndarray  # bool: some paraphrase's prediction differs from the original's
    gap0: np.ndarray  # confidence of the original's answer (see `_confidence`); nan unknown
    image_reliant: np.ndarray  # float 1/0: original's pred changes with a gray image; nan unknown


def _confidence(r: VariantPrediction) -> float:
    """Logit of the predicted choice minus the best other. Without a recorded gap it is known
    only when the prediction is the gold answer: then it equals the margin."""
    if math.isfinite(r.gap):
        return r.gap
    return r.margin if r.pred == r.answer else math.nan


def question_table(preds: list[VariantPrediction]) -> QuestionTable:
    g_idx, flip, gap0, reliant = [], [], [], []
    for gi, recs in enumerate(group_predictions(preds).values()):
        orig = next((r for r in recs if r.variant == 0), None)
        if orig is None or len(recs) < 2:
            continue
        g_idx.append(gi)
        flip.append(any(r.pred != orig.pred for r in recs if r.variant != 0))
        gap0.append(_confidence(orig))
        reliant.append(math.nan if orig.pred_gray is None else float(orig.pred != orig.pred_gray))
    return QuestionTable(np.asarray(g_idx, dtype=int), np.asarray(flip, dtype=bool),
                         np.asarray(gap0, dtype=float), np.asarray(reliant, dtype=float))


# ---- summaries --------------------------------------------------------------------------------

BOOTSTRAP = "cluster bootstrap over questions"
WILSON = "Wilson (one item per question)"
SIGN_FLIP = "paired sign-flip permutation over questions (two-sided)"


@dataclass(frozen=True)
class _Opts:
    level: float
    n_boot: int
    seed: int


def _boot(clusters: np.ndarray, values: np.ndarray, o: _Opts) -> list[float]:
    return list(stats.bootstrap_ci(clusters, values, n_boot=o.n_boot, level=o.level,
                                   seed=o.seed))


def _proportion(hits: np.ndarray, clusters: np.ndarray | None, o: _Opts) -> dict[str, Any]:
    """A rate and its interval: cluster bootstrap over questions when several items share a
    question (`clusters`), Wilson when each item is its own question (clusters None)."""
    hits = np.asarray(hits, dtype=bool)
    k, n = int(hits.sum()), int(hits.size)
    out: dict[str, Any] = {"value": k / n if n else None, "k": k, "n": n}
    if clusters is None:
        out.update(ci=list(stats.wilson_ci(k, n, o.level)), ci_method=WILSON)
    else:
        out.update(n_questions=int(np.unique(clusters).size), ci=_boot(clusters, hits, o),
                   ci_method=BOOTSTRAP)
    return out


def _mean(values: np.ndarray, clusters: np.ndarray, o: _Opts) -> dict[str, Any]:
    """Mean over finite values with a cluster-bootstrap CI."""
    ok = np.isfinite(values)
    v, c = values[ok], clusters[ok]
    return {"value": float(v.mean()) if v.size else None, "n": int(v.size),
            "n_questions": int(np.unique(c).size), "ci": _boot(c, v, o),
            "ci_method": BOOTSTRAP}


# Below this mean probability on the choices the model is mostly not answering in the format
# asked, and margins between the choices say little about what it would write.
LOW_CHOICE_MASS = 0.5


def _choice_mass(preds: list[VariantPrediction], o: _Opts, low: float = LOW_CHOICE_MASS
                 ) -> dict[str, Any]:
    """Mean probability on the choices' tokens, and the share of wordings below `low`."""
    gid = {g: i for i, g in enumerate(group_predictions(preds))}
    mass = np.asarray([r.choice_mass for r in preds], dtype=float)
    clusters = np.asarray([gid[r.group_id] for r in preds], dtype=int)
    out = _mean(mass, clusters, o)
    known = np.isfinite(mass)
    out["share_low"] = float((mass[known] < low).mean()) if known.any() else None
    out["low_threshold"] = low
    return out


def _core(preds: list[VariantPrediction], o: _Opts) -> dict[str, Any]:
    """Accuracy, flip rates (vs the original, all pairs, per question), margin difference."""
    gid = {g: i for i, g in enumerate(group_predictions(preds))}
    var_group = np.asarray([gid[r.group_id] for r in preds], dtype=int)
    correct = np.asarray([r.pred == r.answer for r in preds], dtype=bool)
    pairs, originals = pair_table(preds), original_pair_table(preds)
    q = question_table(preds)
    return {
        "n_variants": len(preds),
        "n_groups": len(gid),
        "accuracy": _proportion(correct, var_group, o),
        "original_flip_rate": _proportion(originals.flip, originals.group, o),
        "pairwise_flip_rate": _proportion(pairs.flip, pairs.group, o),
        "question_flip_rate": _proportion(q.flip, None, o),
        "margin_diff": _mean(pairs.margin_absdiff, pairs.group, o),
    }


def _agreement(preds: list[VariantPrediction], attr: str, *, differ: bool,
               o: _Opts) -> dict[str, Any]:
    """Share of variants whose pred equals (differ=False) or differs from `attr`."""
    gid = {g: i for i, g in enumerate(group_predictions(preds))}
    have = [r for r in preds if getattr(r, attr) is not None]
    hits = np.asarray([(r.pred != getattr(r, attr)) == differ for r in have], dtype=bool)
    clusters = np.asarray([gid[r.group_id] for r in have], dtype=int)
    return _proportion(hits, clusters, o)


def _quadrants(q: QuestionTable) -> dict[str, Any]:
    known = np.isfinite(q.image_reliant)
    flip, reliant = q.flip[known], q.image_reliant[known].astype(bool)
    masks = (~flip & reliant, ~flip & ~reliant, flip & reliant, flip & ~reliant)
    counts = {name: int(m.sum()) for name, m in zip(QUADRANTS, masks, strict=True)}
    n = int(known.sum())
    return {"n": n, "counts": counts,
            "fractions": {k: (c / n if n else None) for k, c in counts.items()}}


def _flip_auroc(q: QuestionTable, o: _Opts) -> dict[str, Any]:
    """Does a small confidence gap of the original's answer predict that the question flips?"""
    ok = np.isfinite(q.gap0)
    score, label = -q.gap0[ok], q.flip[ok]
    return {"value": stats.auroc(score, label), "n_pos": int(label.sum()),
            "n_neg": int((~label).sum()), "n_unscored": int((~ok).sum()),
            "score": "-(logit of the original's predicted choice - best other choice)",
            "ci": list(stats.auroc_ci(score, label, n_boot=o.n_boot, level=o.level,
                                      seed=o.seed)),
            "ci_method": "percentile bootstrap over questions"}


def _group_type(recs: list[VariantPrediction]) -> str | None:
    """A question's type: its original's, else the first one given (often set on one row)."""
    orig = next((r for r in recs if r.variant == 0 and r.type is not None), None)
    if orig is not None:
        return orig.type
    return next((r.type for r in recs if r.type is not None), None)


def _by_type(preds: list[VariantPrediction], o: _Opts) -> dict[str, Any]:
    """Core metrics over the questions of each type (whole questions, so pairs stay intact)."""
    by: dict[str, list[VariantPrediction]] = {}
    for recs in group_predictions(preds).values():
        t = _group_type(recs)
        if t is not None:
            by.setdefault(t, []).extend(recs)
    return {t: _core(by[t], o) for t in sorted(by)}


def _by_phenomenon(preds: list[VariantPrediction], o: _Opts) -> dict[str, Any]:
    """Per phenomenon: pairs (original, paraphrase showing it)."""
    rows: dict[str, list[tuple[int, VariantPrediction, VariantPrediction]]] = {}
    for gi, orig, r in _original_pairs(preds):
        if r.phenomenon is not None:
            rows.setdefault(r.phenomenon, []).append((gi, orig, r))
    out = {}
    for ph in sorted(rows):
        t = _table(rows[ph])
        correct = np.asarray([b.pred == b.answer for _, _, b in rows[ph]], dtype=bool)
        out[ph] = {"n_pairs": int(t.group.size),
                   "accuracy": _proportion(correct, t.group, o),
                   "flip_rate": _proportion(t.flip, t.group, o),
                   "margin_diff": _mean(t.margin_absdiff, t.group, o)}
    return out



def _settings(level: float, n_boot: int, seed: int, **extra: Any) -> dict[str, Any]:
    return {"level": level, "n_boot": n_boot, "seed": seed,
            "min_questions_for_interval": stats.MIN_CLUSTERS, **extra}


def compute_metrics(preds: Iterable[VariantPrediction | Mapping[str, Any]], *,
                    n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                    low_choice_mass: float = LOW_CHOICE_MASS) -> dict[str, Any]:
    """All single-model metrics (see docs/metrics.md) as a JSON-serialisable dict.

    `low_choice_mass`: the choice mass below which a wording counts as not answering in the
    format asked (0.5 suits yes/no; an open cloze spreads over many words and needs less)."""
    recs = to_predictions(preds)
    o = _Opts(level=level, n_boot=n_boot, seed=seed)
    q = question_table(recs)
    out = _core(recs, o)
    out.update({
        "text_only_agreement_gray": _agreement(recs, "pred_gray", differ=False, o=o),
        "text_only_agreement_noimage": _agreement(recs, "pred_noimage", differ=False, o=o),
        "swap_sensitivity": _agreement(recs, "pred_swap", differ=True, o=o),
        "image_reliance_quadrants": _quadrants(q),
        "flip_auroc": _flip_auroc(q, o),
        "choice_mass": _choice_mass(recs, o, low_choice_mass),
        "by_type": _by_type(recs, o),
        "by_phenomenon": _by_phenomenon(recs, o),
        "settings": _settings(level, n_boot, seed),
    })
    return jsonable(out)


# ---- per question (for statistics over seeds) ------------------------------------------------

@dataclass
class QuestionSums:
    """Per question, the numerator and the denominator of each pooled metric.

    The pooled metric is sums[m].sum() / counts[m].sum(); sums[m] / counts[m] is the question's
    own value. For seeds x questions statistics (stats.crossed_bootstrap, seed_rate) stack the
    per-question values of each seed and pass `counts[m]` as the weights.
    """

    group_ids: list[Hashable]
    sums: dict[str, np.ndarray]  # metric -> [n_questions]
    counts: dict[str, np.ndarray]  # metric -> [n_questions]

    def values(self, metric: str) -> np.ndarray:
        """Each question's value of `metric` (nan where it has no item)."""
        c = self.counts[metric]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(c > 0, self.sums[metric] / np.where(c > 0, c, 1), np.nan)


def question_sums(preds: Iterable[VariantPrediction | Mapping[str, Any]]) -> QuestionSums:
    """Accuracy, the flip rates, margin difference and text-only agreement per question."""
    recs = to_predictions(preds)
    groups = list(group_predictions(recs))
    gid = {g: i for i, g in enumerate(groups)}
    n = len(groups)
    sums, counts = {}, {}

    def add(name: str, clusters: np.ndarray, values: np.ndarray) -> None:
        ok = np.isfinite(values)
        sums[name] = np.bincount(clusters[ok], weights=values[ok], minlength=n)
        counts[name] = np.bincount(clusters[ok], minlength=n).astype(float)

    add("accuracy", np.asarray([gid[r.group_id] for r in recs], dtype=int),
        np.asarray([r.pred == r.answer for r in recs], dtype=float))
    for name, t in (("original_flip_rate", original_pair_table(recs)),
                    ("pairwise_flip_rate", pair_table(recs))):
        add(name, t.group, t.flip.astype(float))
    q = question_table(recs)
    add("question_flip_rate", q.group, q.flip.astype(float))
    t = pair_table(recs)
    add("margin_diff", t.group, t.margin_absdiff)
    for name, attr in (("text_only_agreement_gray", "pred_gray"),
                       ("text_only_agreement_noimage", "pred_noimage")):
        have = [r for r in recs if getattr(r, attr) is not None]
        add(name, np.asarray([gid[r.group_id] for r in have], dtype=int),
            np.asarray([r.pred == getattr(r, attr) for r in have], dtype=float))
    return QuestionSums(groups, sums, counts)


# ---- base vs adapter --------------------------------------------------------------------------

def _align(base: list[VariantPrediction], adapter: list[VariantPrediction]
           ) -> tuple[list[VariantPrediction], list[VariantPrediction]]:
    """Keep the (group_id, variant) keys present in both, in base order."""
    a_by_key = {(r.group_id, r.variant): r for r in adapter}
    b = [r for r in base if (r.group_id, r.variant) in a_by_key]
    return b, [a_by_key[(r.group_id, r.variant)] for r in b]


INDEPENDENCE = "independent items: ignores that the items of one question are correlated"


def _unclustered(b_hits: np.ndarray, a_hits: np.ndarray, unit: str) -> dict[str, Any]:
    """Tests over items that assume independence: kept to compare with published numbers,
    never the headline (docs/metrics.md)."""
    k1, k2, n = int(b_hits.sum()), int(a_hits.sum()), int(b_hits.size)
    # Adapter first so that the sign of z matches the sign of diff = adapter - base.
    z, p = stats.two_proportion_z(k2, n, k1, n)
    mc = stats.mcnemar_paired(b_hits, a_hits)
    return {"assumes": INDEPENDENCE,
            "z_test": {"test": f"two-proportion z-test over {unit} (pooled, two-sided)",
                       "z": z, "p": p},
            "mcnemar": {"test": f"exact McNemar over {unit} (two-sided)", "b01": mc.b01,
                        "b10": mc.b10, "p": mc.p}}


def _signflip_block(diff: np.ndarray, clusters: np.ndarray, n_questions: int, n_perm: int,
                    seed: int) -> dict[str, Any]:
    """Sign-flip test on per-question sums of the per-item differences."""
    per_q = np.bincount(clusters, weights=diff, minlength=n_questions) if diff.size else diff
    r = stats.sign_flip_test(per_q, n_perm=n_perm, seed=seed)
    return {"test": SIGN_FLIP, "n_questions": int(np.unique(clusters).size), "exact": r.exact,
            "p": r.p}


def _paired(b_vals: np.ndarray, a_vals: np.ndarray, clusters: np.ndarray, o: _Opts,
            test: dict[str, Any] | None = None, *, n_q: int = 0, n_perm: int = 0
            ) -> dict[str, Any]:
    """Base, adapter, their difference with a paired cluster-bootstrap interval, and the paired
    test: `test`, else the sign-flip test over questions."""
    b_vals, a_vals = np.asarray(b_vals, dtype=float), np.asarray(a_vals, dtype=float)
    diff, n = a_vals - b_vals, int(b_vals.size)
    return {"base": float(b_vals.mean()) if n else None,
            "adapter": float(a_vals.mean()) if n else None,
            "diff": float(diff.mean()) if n else None, "n": n,
            "n_questions": int(np.unique(clusters).size),
            "diff_ci": _boot(clusters, diff, o), "diff_ci_method": f"paired {BOOTSTRAP}",
            "paired_test": test or _signflip_block(diff, clusters, n_q, n_perm, o.seed)}


def compare(base: Iterable[VariantPrediction | Mapping[str, Any]],
            adapter: Iterable[VariantPrediction | Mapping[str, Any]], *, n_boot: int = 2000,
            seed: int = 0, level: float = 0.95, n_perm: int = 10000) -> dict[str, Any]:
    """Base vs adapter on the (group_id, variant) records both have; diff = adapter - base.

    Every interval resamples questions and every headline test permutes within questions
    (docs/metrics.md); tests that treat wordings or pairs as independent are kept apart
    under `unclustered`.
    """
    b_all, a_all = to_predictions(base), to_predictions(adapter)
    b, a = _align(b_all, a_all)
    if not b:
        raise ValueError("base and adapter predictions share no (group_id, variant) record")
    o = _Opts(level=level, n_boot=n_boot, seed=seed)
    gid = {g: i for i, g in enumerate(group_predictions(b))}
    n_q = len(gid)
    var_group = np.asarray([gid[r.group_id] for r in b], dtype=int)

    def binary(hb: np.ndarray, ha: np.ndarray, clusters: np.ndarray, unit: str
               ) -> dict[str, Any]:
        return {**_paired(hb, ha, clusters, o, n_q=n_q, n_perm=n_perm),
                "unclustered": _unclustered(hb, ha, unit)}

    correct_b = np.asarray([r.pred == r.answer for r in b], dtype=bool)
    correct_a = np.asarray([r.pred == r.answer for r in a], dtype=bool)
    out: dict[str, Any] = {
        "n_aligned_variants": len(b), "n_aligned_groups": n_q,
        "n_unmatched_base": len(b_all) - len(b), "n_unmatched_adapter": len(a_all) - len(a),
        "accuracy": binary(correct_b, correct_a, var_group, "wordings"),
    }
    ob, oa = original_pair_table(b), original_pair_table(a)
    out["original_flip_rate"] = binary(ob.flip, oa.flip, ob.group, "pairs (original, j)")
    pb, pa = pair_table(b), pair_table(a)
    out["pairwise_flip_rate"] = binary(pb.flip, pa.flip, pb.group, "pairs")

    # One item per question: McNemar over questions respects both pairing and independence.
    qb, qa = question_table(b), question_table(a)
    mc = stats.mcnemar_paired(qb.flip, qa.flip)
    out["question_flip_rate"] = _paired(
        qb.flip, qa.flip, qb.group, o, {"test": "exact McNemar over questions (two-sided)",
                                        "n_questions": int(qb.group.size), "b01": mc.b01,
                                        "b10": mc.b10, "p": mc.p})

    ok = np.isfinite(pb.margin_absdiff) & np.isfinite(pa.margin_absdiff)
    out["margin_diff"] = _paired(pb.margin_absdiff[ok], pa.margin_absdiff[ok], pb.group[ok], o,
                                 n_q=n_q, n_perm=n_perm)
    for key, attr in (("text_only_agreement_gray", "pred_gray"),
                      ("text_only_agreement_noimage", "pred_noimage")):
        both = [(rb, ra) for rb, ra in zip(b, a, strict=True)
                if getattr(rb, attr) is not None and getattr(ra, attr) is not None]
        if not both:
            continue
        hb = np.asarray([rb.pred == getattr(rb, attr) for rb, _ in both], dtype=bool)
        ha = np.asarray([ra.pred == getattr(ra, attr) for _, ra in both], dtype=bool)
        clusters = np.asarray([gid[rb.group_id] for rb, _ in both], dtype=int)
        out[key] = binary(hb, ha, clusters, "wordings")
    out["settings"] = _settings(level, n_boot, seed, n_perm=n_perm)
    return jsonable(out)
