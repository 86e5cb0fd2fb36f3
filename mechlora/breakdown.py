"""A localization split up: per direction, per question type or phenomenon, per head and per
position, and the notes that say when the two patching directions disagree.

Directions (pair (a, b) patches donor a into recipient b; variant 0 is the original
question): `original>paraphrase` is denoising in the sense of Zhang & Nanda (2024), the
original's activations written into a paraphrase's run; `paraphrase>original` is noising.
They disagree (`direction_notes`) when, at some layer and component, both have intervals
(at least `stats.MIN_CLUSTERS` question groups each) and the intervals do not overlap, or
when the selection rule picks different layers from each direction's scores.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mechlora import stats
from mechlora.effects import DIRECTIONS, ORIGINAL_TO_PARAPHRASE, PARAPHRASE_TO_ORIGINAL
from mechlora.errors import MechloraError

DEFAULT_RULE = "window:5"


def selection_of(result, rule: str) -> dict[str, Any]:
    """The layers `rule` picks from `result`'s scores ({"spec", "covered", "reason"}), or why
    none (no pairs, no positive score)."""
    from mechlora.select import select_layers

    if not result.n_pairs:
        return {"spec": None, "covered": None, "reason": "no pairs"}
    try:
        chosen = select_layers(result.scores, rule)
    except MechloraError as e:
        return {"spec": None, "covered": None, "reason": str(e)}
    return {"spec": str(chosen.spec), "covered": chosen.covered, "reason": chosen.reason}


def rule_of(result) -> str:
    """The selection rule of a result: the one the CLI reported, else the one `localize`
    was given, else window:5."""
    return ((result.settings.get("selection") or {}).get("rule") or result.settings.get("rule")
            or DEFAULT_RULE)


def part_summary(part, rule: str) -> dict[str, Any]:
    """Pair counts, restoration curves, score and selection of one part of a result."""
    return {"n_pairs": part.n_pairs, "n_groups": len(set(part.group_ids)),
            "restoration": part.curves(), "score": part.score_summary(),
            "selection": selection_of(part, rule)}


def direction_notes(result, rule: str | None = None) -> list[str]:
    """Where denoising (original>paraphrase) and noising (paraphrase>original) disagree."""
    rule = rule or rule_of(result)
    parts = {d: result.where(direction=d) for d in (ORIGINAL_TO_PARAPHRASE,
                                                    PARAPHRASE_TO_ORIGINAL)}
    if any(p.n_pairs == 0 for p in parts.values()):
        return []
    den, noi = parts[ORIGINAL_TO_PARAPHRASE], parts[PARAPHRASE_TO_ORIGINAL]
    notes = []
    for c in result.components:
        (lo_d, hi_d), (lo_n, hi_n) = den.ci(c), noi.ci(c)
        apart = np.isfinite(lo_d) & np.isfinite(lo_n) & ((hi_d < lo_n) | (hi_n < lo_d))
        if apart.any():
            layers = ", ".join(str(i) for i in np.flatnonzero(apart))
            notes.append(f"{c}: the 95% intervals of the two directions do not overlap at "
                         f"layer(s) {layers}")
    s_d, s_n = selection_of(den, rule)["spec"], selection_of(noi, rule)["spec"]
    if s_d and s_n and s_d != s_n:
        notes.append(f"{rule} selects {s_d} from the original>paraphrase pairs but {s_n} from "
                     "the paraphrase>original pairs")
    few = [d for d, p in parts.items() if len(set(p.group_ids)) < stats.MIN_CLUSTERS]
    if few and not notes:
        notes.append(f"fewer than {stats.MIN_CLUSTERS} question groups in {', '.join(few)}: "
                     "no intervals, so no disagreement test")
    return notes


def head_summary(result) -> dict[str, Any]:
    lo, hi = stats.bootstrap_ci(np.asarray(result.group_ids), result.heads, n_boot=result.n_boot)
    return {"n_heads": result.heads.shape[2], "mean": _means(result.heads),
            "ci_low": lo, "ci_high": hi}


def position_summary(result) -> dict[str, Any]:
    out: dict[str, Any] = {"labels": result.position_labels, "components": {}}
    for c, values in result.by_position.items():
        lo, hi = stats.bootstrap_ci(np.asarray(result.group_ids), values, n_boot=result.n_boot)
        out["components"][c] = {"mean": _means(values), "ci_low": lo, "ci_high": hi}
    return out


def _means(values: np.ndarray) -> np.ndarray:
    ok = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, values, 0.0).sum(0) / ok.sum(0)


def extras(result) -> dict[str, Any]:
    """The parts of localization.json beyond the per-layer sweep (schema version 3)."""
    rule = rule_of(result)
    out: dict[str, Any] = {
        "directions": {d: part_summary(p, rule) for d in DIRECTIONS
                       if (p := result.where(direction=d)).n_pairs},
        "direction_notes": direction_notes(result, rule),
    }
    if result.heads is not None:
        out["heads"] = head_summary(result)
    if result.by_position:
        out["by_position"] = position_summary(result)
    if result.specs:
        out["specs"] = [s.summary() for s in result.specs]
    key = result.settings.get("by")
    if key:
        out["groups"] = {"by": key, "values": {v: part_summary(p, rule)
                                               for v, p in result.by(key).items()}}
    if result.gap is not None:
        out["normalization"] = result.settings.get("normalization", {"by": "given gap"})
    return out
