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

__all__ = [
    "VariantPrediction",
    "compare",
    "compute_metrics",
    "group_predictions",
    "pair_table",
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

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> VariantPrediction:
        """Build from a mapping; unknown keys are ignored, missing optional ones are None."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in row.items() if k in known}
        kw.setdefault("phenomenon", None)
        kw.setdefault("type", None)
        margin = kw.get("margin")
        kw["margin"] = math.nan if margin is None else float(margin)
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
    """All unordered pairs of variants within a group, as aligned arrays."""

    group: np.ndarray  # group id index of each pair
    flip: np.ndarray  # bool: the two predictions differ
    margin_absdiff: np.ndarray  # |m_i - m_j|, nan when a margin is missing


def pair_table(preds: list[VariantPrediction]) -> PairTable:
    """Enumerate unordered pairs per group, in a deterministic order (for paired comparisons)."""
    g_idx, flip, absdiff = [], [], []
    for gi, recs in enumerate(group_predictions(preds).values()):
        for a, b in combinations(recs, 2):
            g_idx.append(gi)
            flip.append(a.pred != b.pred)
            absdiff.append(abs(a.margin - b.margin))
    return PairTable(np.asarray(g_idx, dtype=int), np.asarray(flip, dtype=bool),
                     np.asarray(absdiff, dtype=float))


@dataclass
class QuestionTable:
    """One row per question that has an original (variant 0) and at least one paraphrase."""

    group: np.ndarray  # group id index
    flip: np.ndarray  # bool: some paraphrase's prediction differs from the original's
    margin0: np.ndarray  # margin of the original variant
    image_reliant: np.ndarray  # float 1/0: original's pred changes with a gray image; nan unknown


def question_table(preds: list[VariantPrediction]) -> QuestionTable:
    g_idx, flip, m0, reliant = [], [], [], []
    for gi, recs in enumerate(group_predictions(preds).values()):
        orig = next((r for r in recs if r.variant == 0), None)
        if orig is None or len(recs) < 2:
            continue
        g_idx.append(gi)
        flip.append(any(r.pred != orig.pred for r in recs if r.variant != 0))
        m0.append(orig.margin)
        reliant.append(math.nan if orig.pred_gray is None else float(orig.pred != orig.pred_gray))
    return QuestionTable(np.asarray(g_idx, dtype=int), np.asarray(flip, dtype=bool),
                         np.asarray(m0, dtype=float), np.asarray(reliant, dtype=float))


# ---- summaries --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Opts:
    level: float
    n_boot: int
    seed: int


def _proportion(hits: np.ndarray, clusters: np.ndarray | None, o: _Opts) -> dict[str, Any]:
    """Rate with its Wilson CI (headline) and, for clustered items, a cluster-bootstrap CI."""
    hits = np.asarray(hits, dtype=bool)
    k, n = int(hits.sum()), int(hits.size)
    out: dict[str, Any] = {"value": k / n if n else None, "k": k, "n": n,
                           "ci_wilson": list(stats.wilson_ci(k, n, o.level))}
    if clusters is not None:
        out["ci_bootstrap"] = list(stats.bootstrap_ci(clusters, hits, n_boot=o.n_boot,
                                                      level=o.level, seed=o.seed))
    return out


def _mean(values: np.ndarray, clusters: np.ndarray, o: _Opts) -> dict[str, Any]:
    """Mean over finite values with a cluster-bootstrap CI."""
    ok = np.isfinite(values)
    v, c = values[ok], clusters[ok]
    return {"value": float(v.mean()) if v.size else None, "n": int(v.size),
            "ci_bootstrap": list(stats.bootstrap_ci(c, v, n_boot=o.n_boot, level=o.level,
                                                    seed=o.seed))}


def _core(preds: list[VariantPrediction], o: _Opts) -> dict[str, Any]:
    """Accuracy, pairwise flip, question-level flip and margin difference."""
    gid = {g: i for i, g in enumerate(group_predictions(preds))}
    var_group = np.asarray([gid[r.group_id] for r in preds], dtype=int)
    correct = np.asarray([r.pred == r.answer for r in preds], dtype=bool)
    pairs = pair_table(preds)
    q = question_table(preds)
    return {
        "n_variants": len(preds),
        "n_groups": len(gid),
        "accuracy": _proportion(correct, var_group, o),
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
    ok = np.isfinite(q.margin0)
    score, label = -np.abs(q.margin0[ok]), q.flip[ok]
    return {"value": stats.auroc(score, label), "n_pos": int(label.sum()),
            "n_neg": int((~label).sum()),
            "ci_bootstrap": list(stats.auroc_ci(score, label, n_boot=o.n_boot, level=o.level,
                                                seed=o.seed))}


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
    for gi, recs in enumerate(group_predictions(preds).values()):
        orig = next((r for r in recs if r.variant == 0), None)
        if orig is None:
            continue
        for r in recs:
            if r.variant != 0 and r.phenomenon is not None:
                rows.setdefault(r.phenomenon, []).append((gi, orig, r))
    out = {}
    for ph in sorted(rows):
        g = np.asarray([gi for gi, _, _ in rows[ph]], dtype=int)
        flip = np.asarray([a.pred != b.pred for _, a, b in rows[ph]], dtype=bool)
        diff = np.asarray([abs(a.margin - b.margin) for _, a, b in rows[ph]], dtype=float)
        correct = np.asarray([b.pred == b.answer for _, _, b in rows[ph]], dtype=bool)
        out[ph] = {"n_pairs": int(g.size),
                   "accuracy": _proportion(correct, g, o),
                   "flip_rate": _proportion(flip, g, o),
                   "margin_diff": _mean(diff, g, o)}
    return out


def _jsonable(x: Any) -> Any:
    """nan/inf -> None, numpy scalars -> Python, tuples -> lists (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def compute_metrics(preds: Iterable[VariantPrediction | Mapping[str, Any]], *,
                    n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """All single-model metrics (see docs/metrics.md) as a JSON-serialisable dict."""
    recs = to_predictions(preds)
    o = _Opts(level=level, n_boot=n_boot, seed=seed)
    q = question_table(recs)
    out = _core(recs, o)
    out.update({
        "text_only_agreement_gray": _agreement(recs, "pred_gray", differ=False, o=o),
        "text_only_agreement_noimage": _agreement(recs, "pred_noimage", differ=False, o=o),
        "swap_sensitivity": _agreement(recs, "pred_swap", differ=True, o=o),
        "image_reliance_quadrants": _quadrants(q),
        "flip_auroc_margin": _flip_auroc(q, o),
        "by_type": _by_type(recs, o),
        "by_phenomenon": _by_phenomenon(recs, o),
        "settings": {"level": level, "n_boot": n_boot, "seed": seed},
    })
    return _jsonable(out)


# ---- base vs adapter --------------------------------------------------------------------------

def _align(base: list[VariantPrediction], adapter: list[VariantPrediction]
           ) -> tuple[list[VariantPrediction], list[VariantPrediction]]:
    """Keep the (group_id, variant) keys present in both, in base order."""
    a_by_key = {(r.group_id, r.variant): r for r in adapter}
    b = [r for r in base if (r.group_id, r.variant) in a_by_key]
    return b, [a_by_key[(r.group_id, r.variant)] for r in b]


def _z_block(k1: int, n1: int, k2: int, n2: int) -> dict[str, Any]:
    # Adapter first so that the sign of z matches the sign of diff = adapter - base.
    z, p = stats.two_proportion_z(k2, n2, k1, n1)
    return {"test": "two-proportion z-test (pooled, two-sided)", "z": z, "p": p}


def _mcnemar_block(base: np.ndarray, adapter: np.ndarray, unit: str) -> dict[str, Any]:
    r = stats.mcnemar_paired(base, adapter)
    return {"test": f"exact McNemar over {unit} (two-sided)", "n": int(base.size),
            "b01": r.b01, "b10": r.b10, "p": r.p}


def _signflip_block(diff: np.ndarray, clusters: np.ndarray, n_questions: int, n_perm: int,
                    seed: int) -> dict[str, Any]:
    """Sign-flip test on per-question sums of the per-item differences."""
    per_q = np.bincount(clusters, weights=diff, minlength=n_questions) if diff.size else diff
    r = stats.sign_flip_test(per_q, n_perm=n_perm, seed=seed)
    return {"test": "paired sign-flip permutation over questions (two-sided)",
            "n_questions": int(np.unique(clusters).size), "exact": r.exact, "p": r.p}


def _paired_binary(b_hits: np.ndarray, a_hits: np.ndarray, clusters: np.ndarray,
                   o: _Opts) -> dict[str, Any]:
    k1, k2, n = int(b_hits.sum()), int(a_hits.sum()), int(b_hits.size)
    diff = a_hits.astype(float) - b_hits.astype(float)
    return {"base": k1 / n if n else None, "adapter": k2 / n if n else None,
            "diff": (k2 - k1) / n if n else None, "n": n,
            "diff_ci_bootstrap": list(stats.bootstrap_ci(clusters, diff, n_boot=o.n_boot,
                                                         level=o.level, seed=o.seed)),
            "z_test": _z_block(k1, n, k2, n)}


def compare(base: Iterable[VariantPrediction | Mapping[str, Any]],
            adapter: Iterable[VariantPrediction | Mapping[str, Any]], *, n_boot: int = 2000,
            seed: int = 0, level: float = 0.95, n_perm: int = 10000) -> dict[str, Any]:
    """Base vs adapter on the (group_id, variant) records both have; diff = adapter - base."""
    b_all, a_all = to_predictions(base), to_predictions(adapter)
    b, a = _align(b_all, a_all)
    if not b:
        raise ValueError("base and adapter predictions share no (group_id, variant) record")
    o = _Opts(level=level, n_boot=n_boot, seed=seed)
    gid = {g: i for i, g in enumerate(group_predictions(b))}
    n_q = len(gid)
    var_group = np.asarray([gid[r.group_id] for r in b], dtype=int)

    correct_b = np.asarray([r.pred == r.answer for r in b], dtype=bool)
    correct_a = np.asarray([r.pred == r.answer for r in a], dtype=bool)
    acc = _paired_binary(correct_b, correct_a, var_group, o)
    acc["paired_test"] = _mcnemar_block(correct_b, correct_a, "variants")
    # Variants of one question are correlated; this test respects that, McNemar does not.
    acc["clustered_paired_test"] = _signflip_block(
        correct_a.astype(float) - correct_b.astype(float), var_group, n_q, n_perm, seed)

    pb, pa = pair_table(b), pair_table(a)
    pflip = _paired_binary(pb.flip, pa.flip, pb.group, o)
    pflip["paired_test"] = _signflip_block(pa.flip.astype(float) - pb.flip.astype(float),
                                           pb.group, n_q, n_perm, seed)

    qb, qa = question_table(b), question_table(a)
    qflip = _paired_binary(qb.flip, qa.flip, qb.group, o)
    qflip["paired_test"] = _mcnemar_block(qb.flip, qa.flip, "questions")

    ok = np.isfinite(pb.margin_absdiff) & np.isfinite(pa.margin_absdiff)
    mb, ma, mg = pb.margin_absdiff[ok], pa.margin_absdiff[ok], pb.group[ok]
    mdiff = ma - mb
    margin = {"base": float(mb.mean()) if mb.size else None,
              "adapter": float(ma.mean()) if ma.size else None,
              "diff": float(mdiff.mean()) if mdiff.size else None, "n": int(mdiff.size),
              "diff_ci_bootstrap": list(stats.bootstrap_ci(mg, mdiff, n_boot=n_boot,
                                                           level=level, seed=seed)),
              "paired_test": _signflip_block(mdiff, mg, n_q, n_perm, seed)}

    out: dict[str, Any] = {
        "n_aligned_variants": len(b), "n_aligned_groups": n_q,
        "n_unmatched_base": len(b_all) - len(b), "n_unmatched_adapter": len(a_all) - len(a),
        "accuracy": acc, "pairwise_flip_rate": pflip, "question_flip_rate": qflip,
        "margin_diff": margin,
    }
    for key, attr in (("text_only_agreement_gray", "pred_gray"),
                      ("text_only_agreement_noimage", "pred_noimage")):
        both = [(rb, ra) for rb, ra in zip(b, a, strict=True)
                if getattr(rb, attr) is not None and getattr(ra, attr) is not None]
        if not both:
            continue
        hb = np.asarray([rb.pred == getattr(rb, attr) for rb, _ in both], dtype=bool)
        ha = np.asarray([ra.pred == getattr(ra, attr) for _, ra in both], dtype=bool)
        clusters = np.asarray([gid[rb.group_id] for rb, _ in both], dtype=int)
        block = _paired_binary(hb, ha, clusters, o)
        block["paired_test"] = _mcnemar_block(hb, ha, "variants")
        out[key] = block
    out["settings"] = {"level": level, "n_boot": n_boot, "seed": seed, "n_perm": n_perm}
    return _jsonable(out)
