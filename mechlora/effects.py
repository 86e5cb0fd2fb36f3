"""Per-pair effects of multi-site interventions, and the summaries built on them.

`SpecEffect` holds, for one layer spec S and every pair (donor a, recipient b), the two
numbers that say whether S carries the divergence (docs/localize.md, "Does the spec carry
the divergence?"):

    sufficiency  s = (m(b <- a@S) - m(b)) / (m(a) - m(b))    denoising S: b runs with a's
                                                              attn and mlp outputs at every
                                                              layer of S
    necessity    n = (m(a) - m(a <- b@S)) / (m(a) - m(b))    noising S: a runs with b's

    necessity_complement  1 - (m(b <- a@~S) - m(b)) / (m(a) - m(b))   denoising every attn and
                                                              mlp output outside S at once:
                                                              what the rest cannot restore

(Zhang & Nanda 2024; Heimersheim & Nanda 2024: denoising a set of sites tests whether it is
sufficient to carry a's answer, noising it whether a's answer needs it.) Over a pair set
holding both directions, noising S equals denoising S on the reversed pairs, so the pooled
necessity equals the sufficiency; the complement form asks instead whether everything but S
can carry the answer without it (1: only through S; for S = all the complement is empty, so
it is 1 by definition). Patched sites are
written at the run's aligned positions; everything downstream is recomputed. Intervals are
the cluster bootstrap over question groups, as for every localization number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mechlora import stats

ORIGINAL_TO_PARAPHRASE = "original>paraphrase"   # donor: the original question (denoising)
PARAPHRASE_TO_ORIGINAL = "paraphrase>original"   # recipient: the original question (noising)
BETWEEN_PARAPHRASES = "paraphrase>paraphrase"
DIRECTIONS = (ORIGINAL_TO_PARAPHRASE, PARAPHRASE_TO_ORIGINAL, BETWEEN_PARAPHRASES)
WHICH = ("sufficiency", "necessity", "necessity_complement")  # what a spec test reports


def direction_of(a: int, b: int) -> str:
    """The direction of pair (donor variant a, recipient variant b); variant 0 is the
    original question."""
    if a == 0:
        return ORIGINAL_TO_PARAPHRASE
    return PARAPHRASE_TO_ORIGINAL if b == 0 else BETWEEN_PARAPHRASES


def direction_of_id(pair_id: str) -> str | None:
    """The direction read back from a pair id `group:a>b` (results written before v3);
    None for an id of another form."""
    a, _, b = pair_id.rsplit(":", 1)[-1].partition(">")
    if not (a.isdigit() and b.isdigit()):
        return None
    return direction_of(int(a), int(b))


def mean_ci(group_ids: Sequence[str], values: np.ndarray, n_boot: int) -> dict:
    """{"mean", "ci_low", "ci_high"}: the finite values' mean and its 95% cluster bootstrap
    interval over question groups (nan with fewer than `stats.MIN_CLUSTERS` groups)."""
    values = np.asarray(values, dtype=float)
    ok = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, values, 0.0).sum(0) / ok.sum(0) if len(values) else np.nan
    lo, hi = stats.bootstrap_ci(np.asarray(group_ids), values, n_boot=n_boot) \
        if len(values) else (np.nan, np.nan)
    return {"mean": mean, "ci_low": lo, "ci_high": hi}


@dataclass
class SpecEffect:
    """Sufficiency and necessity of one layer spec, per pair (rows as in the result)."""

    spec: str                        # e.g. "15-19"
    layers: tuple[int, ...]
    label: str                       # why it was tested: "auto (window:5)", "all", "explicit"
    pair_ids: list[str]
    group_ids: list[str]
    directions: list[str]
    sufficiency: np.ndarray          # [n_pairs]
    necessity: np.ndarray            # [n_pairs]
    components: tuple[str, ...] = ("attn", "mlp")
    n_boot: int = 1000
    covered: float | None = field(default=None)  # the spec's share of the positive score
    complement: np.ndarray | None = None  # [n_pairs] r of denoising every layer outside S

    def __post_init__(self) -> None:
        self.sufficiency = np.asarray(self.sufficiency, dtype=float)
        self.necessity = np.asarray(self.necessity, dtype=float)
        if self.complement is not None:
            self.complement = np.asarray(self.complement, dtype=float)

    @property
    def necessity_complement(self) -> np.ndarray | None:
        """Per pair, 1 - r(complement): the share the rest of the model cannot restore."""
        return None if self.complement is None else 1.0 - self.complement

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)

    def where(self, direction: str | None = None) -> SpecEffect:
        """The pairs of one direction (all pairs for None)."""
        if direction is None:
            return self
        return self.subset(np.array([d == direction for d in self.directions], dtype=bool))

    def subset(self, rows: np.ndarray) -> SpecEffect:
        """The pairs a boolean mask keeps, or those at integer indices, in that order."""
        rows = np.asarray(rows)
        idx = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(int)
        return SpecEffect(self.spec, self.layers, self.label, [self.pair_ids[i] for i in idx],
                          [self.group_ids[i] for i in idx], [self.directions[i] for i in idx],
                          self.sufficiency[idx], self.necessity[idx], self.components,
                          self.n_boot, self.covered,
                          None if self.complement is None else self.complement[idx])

    def stat(self, which: str, direction: str | None = None) -> dict | None:
        """`which` ("sufficiency", "necessity" or "necessity_complement"): mean and interval,
        optionally of one direction's pairs (None for a complement that was not measured)."""
        part = self.where(direction)
        values = getattr(part, which)
        return None if values is None else mean_ci(part.group_ids, values, self.n_boot)

    def summary(self) -> dict:
        """The JSON entry: means and intervals over all pairs and per direction."""
        out = {"spec": self.spec, "layers": list(self.layers), "label": self.label,
               "components": list(self.components), "covered": self.covered,
               "n_pairs": self.n_pairs, "n_groups": len(set(self.group_ids))}
        for which in WHICH:
            out[which] = self.stat(which)
        out["by_direction"] = {
            d: {"n_pairs": part.n_pairs, **{w: part.stat(w) for w in WHICH}}
            for d in DIRECTIONS if (part := self.where(d)).n_pairs}
        return out

    def text(self) -> str:
        """One line per direction present, for the terminal."""
        def num(x: float) -> str:
            return f"{0.0 if abs(x) < 0.005 else x:.2f}"  # never "-0.00"

        def fmt(s: dict) -> str:
            ci = "" if not np.isfinite(s["ci_low"]) else f" [{num(s['ci_low'])}, " \
                f"{num(s['ci_high'])}]"
            return f"{num(s['mean'])}{ci}"

        def both(part: SpecEffect) -> str:
            text = (f"sufficiency {fmt(part.stat('sufficiency'))}, necessity "
                    f"{fmt(part.stat('necessity'))}")
            if part.complement is not None:
                text += f", necessity (complement) {fmt(part.stat('necessity_complement'))}"
            return text

        cover = "" if self.covered is None else f"; covers {self.covered:.0%} of the score"
        lines = [f"spec {self.spec} ({self.label}{cover}): {both(self)} over {self.n_pairs} "
                 "pairs"]
        for d in DIRECTIONS:
            part = self.where(d)
            if part.n_pairs and part.n_pairs < self.n_pairs:
                lines.append(f"  {d}: {both(part)} ({part.n_pairs} pairs)")
        return "\n".join(lines)
