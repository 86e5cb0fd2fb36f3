"""Warnings that a run may have traded the answer for consistency (docs/train.md, "Collapse").

- choice collapse: at a held-out check, the trained model gives one choice for at least
  `COLLAPSE_SHARE` of the eval wordings while neither the base model (the step-0 check) nor the
  reference answers are that one-sided.
- KL dominance: at the first update (the base model's outputs), kl_weight x KL exceeds CE, so
  the KL term steers; and CE then rises: its mean over the last quarter of the updates (at most
  20) exceeds the first update's CE by more than `CE_RISE` (relative) and `CE_FLOOR` nats. The
  answer is then no longer anchored: training is trading it for agreement.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from mechlora.data import QuestionGroup

COLLAPSE_SHARE = 0.95
CE_RISE = 0.10  # relative rise of CE, first update -> mean of the last ones
CE_FLOOR = 0.05  # and in nats: a model already near CE 0 does not warn over noise
MIN_STEPS = 4  # fewer applied updates than this: too short to tell a trend


def top_choice(choices: Sequence[str]) -> tuple[str | None, float]:
    """The most common of `choices` and its share (None, 0.0 when empty)."""
    if not choices:
        return None, 0.0
    choice, count = Counter(choices).most_common(1)[0]
    return choice, count / len(choices)


def answer_share(groups: Sequence[QuestionGroup]) -> tuple[str | None, float]:
    """The most common reference answer over every wording of `groups`."""
    return top_choice([g.answer for g in groups for _ in g.variants])


def choice_collapse(check: dict, base: dict | None, answers: float) -> str | None:
    """A warning when `check` (an eval row) answers one choice nearly always, unlike the base."""
    share = check.get("top_choice_share")
    if share is None or base is None or share < COLLAPSE_SHARE:
        return None
    if base["top_choice_share"] >= COLLAPSE_SHARE or answers >= COLLAPSE_SHARE:
        return None
    return (f"answer collapse at step {check['step']}: the trained model answers "
            f"{check['top_choice']!r} to {share:.0%} of the held-out wordings, against "
            f"{base['top_choice_share']:.0%} for the base model's most common answer and "
            f"{answers:.0%} in the reference answers; consistency may come from ignoring the "
            "question. Lower --kl-weight or --lr, or check accuracy with mechlora eval")


def kl_dominance(rows: Sequence[dict], kl_weight: float) -> str | None:
    """A warning when the KL term dominated the loss and CE rose over training."""
    rows = [r for r in rows if not r.get("skipped")]
    if len(rows) < MIN_STEPS or kl_weight == 0:
        return None
    w = max(1, min(20, len(rows) // 4))
    ce_first, kl_first = rows[0]["ce"], kl_weight * rows[0]["kl"]
    ce_last = sum(r["ce"] for r in rows[-w:]) / w
    if kl_first <= ce_first or ce_last <= max((1 + CE_RISE) * ce_first, ce_first + CE_FLOOR):
        return None
    return (f"the KL term outweighed CE at the first update (kl_weight x KL {kl_first:.3g} "
            f"against CE {ce_first:.3g}) and CE rose to {ce_last:.3g} (mean of the last {w} "
            "updates): the CE term no longer anchors the answer. Lower --kl-weight (now "
            f"{kl_weight:g})")
