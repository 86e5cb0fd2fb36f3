"""Seed-level statistics of a comparison, from per-seed, per-question values.

For every arm and seed, `metrics.question_sums` gives each evaluation question's numerator and
denominator of every metric (and `swap_sensitivity` is added here). Stacked over seeds they form
[seeds, questions] tables; `stats.seed_rate` turns a table into the arm's mean with a seed x
question interval, and `stats.crossed_bootstrap` on d[s, q] = arm A - arm B is the paired
comparison. Wording pairs are never the unit: they stay inside their question.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from mechlora import stats
from mechlora.metrics import VariantPrediction, question_sums, to_predictions
from mechlora.select import Scores

METRICS = ("original_flip_rate", "pairwise_flip_rate", "accuracy", "margin_diff",
           "text_only_agreement_gray", "text_only_agreement_noimage", "swap_sensitivity")
FLIP = "original_flip_rate"  # the headline flip rate (the paper's): original vs each paraphrase
NAN = float("nan")


@dataclass
class Table:
    """One arm's per-seed, per-question numerators and denominators ([seeds, questions])."""

    seeds: list[int]
    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]

    def values(self, metric: str) -> np.ndarray:
        c = self.counts[metric]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(c > 0, self.sums[metric] / np.where(c > 0, c, 1), NAN)

    def rows(self, seeds: Sequence[int]) -> Table:
        """The rows of `seeds` (a seedless table, the base, repeats its one row)."""
        idx = [0] * len(seeds) if self.seeds == [None] else [self.seeds.index(s) for s in seeds]
        return Table(list(seeds), {k: v[idx] for k, v in self.sums.items()},
                     {k: v[idx] for k, v in self.counts.items()})


def table(preds_by_seed: dict, group_ids: Sequence[Hashable]) -> Table:
    """Stack the per-question sums of each seed's predictions, questions in `group_ids` order."""
    seeds = list(preds_by_seed)
    sums = {m: np.zeros((len(seeds), len(group_ids))) for m in METRICS}
    counts = {m: np.zeros((len(seeds), len(group_ids))) for m in METRICS}
    where = {g: i for i, g in enumerate(group_ids)}
    for row, seed in enumerate(seeds):
        recs = to_predictions(preds_by_seed[seed])
        q = question_sums(recs)
        cols = [where[g] for g in q.group_ids]
        for m in METRICS[:-1]:
            sums[m][row, cols], counts[m][row, cols] = q.sums[m], q.counts[m]
        for r in recs:  # swap sensitivity: the answer changes with another question's image
            if r.pred_swap is not None:
                sums["swap_sensitivity"][row, where[r.group_id]] += r.pred != r.pred_swap
                counts["swap_sensitivity"][row, where[r.group_id]] += 1
    return Table(seeds, sums, counts)


def has(t: Table, metric: str) -> bool:
    return bool(t.counts[metric].sum() > 0)


def arm_metrics(t: Table, *, n_boot: int, level: float, seed: int,
                metrics: Sequence[str] = METRICS) -> dict:
    """Each metric's mean over seeds and questions, its seed x question interval, and the value
    of each seed (one seed: the interval resamples questions only)."""
    out = {}
    for m in metrics:
        if not has(t, m):
            continue
        r = stats.crossed_bootstrap(t.values(m), weights=t.counts[m], n_boot=n_boot,
                                    level=level, seed=seed, min_seeds=1)
        out[m] = {"mean": r.estimate, "ci": list(r.ci), "per_seed": list(r.per_seed),
                  "n_seeds": r.n_seeds, "n_questions": r.n_questions}
    return out


def paired(a: Table, b: Table, *, n_boot: int, level: float, seed: int,
           metrics: Sequence[str] = METRICS) -> dict:
    """A minus B per seed and question, on the seeds both have (B may be the seedless base):
    the pooled difference, its seed x question interval and p (`crossed_bootstrap`), and the
    sign-flip test over seeds from `stats.MIN_SIGN_FLIP_SEEDS` seeds on. With one seed the
    interval resamples questions only (`covers` says so)."""
    seeds = [s for s in a.seeds if b.seeds == [None] or s in b.seeds]
    a, b = a.rows(seeds), b.rows(seeds)
    out = {}
    for m in metrics:
        if not (has(a, m) and has(b, m)):
            continue
        d = a.values(m) - b.values(m)
        w = np.minimum(a.counts[m], b.counts[m])
        r = stats.crossed_bootstrap(d, weights=w, n_boot=n_boot, level=level, seed=seed,
                                    min_seeds=1)
        flip = stats.seed_sign_flip_test(d, weights=w)
        out[m] = {"diff": r.estimate, "ci": list(r.ci), "p": r.p, "per_seed": list(r.per_seed),
                  "n_seeds": r.n_seeds, "n_questions": r.n_questions,
                  "covers": "seeds and questions" if r.n_seeds > 1 else
                  "questions only (one seed: training variance not covered)",
                  "sign_flip_p": None if np.isnan(flip.p) else flip.p}
    return out


def by_phenomenon(preds_by_seed: dict, base: list[VariantPrediction],
                  group_ids: Sequence[Hashable], **kw) -> dict:
    """Per paraphrase phenomenon, the flip rate of (original, paraphrase showing it) pairs
    over seeds, and its paired difference from the base."""
    phenomena = sorted({p.phenomenon for p in base if p.variant != 0 and p.phenomenon})
    out = {}
    for ph in phenomena:
        def keep(recs, ph=ph):
            return [r for r in recs if r.variant == 0 or r.phenomenon == ph]

        t = table({s: keep(p) for s, p in preds_by_seed.items()}, group_ids)
        b = table({None: keep(base)}, group_ids)
        out[ph] = {"original_flip_rate": arm_metrics(t, metrics=[FLIP], **kw).get(FLIP),
                   "vs_base": paired(t, b, metrics=[FLIP], **kw).get(FLIP)
                   if t.seeds != [None] else None}
    return out


# ---- the single-layer test (Hase et al. 2023) -------------------------------------------------

def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); nan when either is constant."""
    rx, ry = (stats._average_ranks(np.asarray(v, dtype=float)) for v in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / den) if den > 0 else NAN


def window_scores(scores: Scores, windows: Sequence[Sequence[int]]) -> np.ndarray:
    """A window's score: the sum of its layers' scores (NaN counts as 0, as in select)."""
    values = np.nan_to_num(scores.values, nan=0.0)
    return np.asarray([values[list(w)].sum() for w in windows])


def single_layer_test(base: Table, windows: dict[str, tuple[Sequence[int], Table]],
                      scores: dict[str, Scores], *, n_boot: int, level: float, seed: int,
                      metric: str = FLIP) -> dict:
    """Per window, the flip reduction (base minus adapter, pooled over seeds and questions,
    with its seed x question interval), and per score source the Spearman correlation of the
    windows' scores with their reductions, with a bootstrap interval.

    The interval resamples the training seeds and the evaluation questions with replacement,
    once per replicate for every window together (a seed or question drawn twice counts twice
    in every window and in the base), and recomputes every reduction and the correlation. The
    scores are held fixed: they were computed once on the training pairs, so their own noise
    is not in the interval. With fewer than `stats.MIN_CLUSTERS` questions it is undefined.
    """
    names = list(windows)
    seeds = sorted(set.intersection(*(set(t.seeds) for _, t in windows.values())))
    tables = [windows[n][1].rows(seeds) for n in names]
    b = base.rows(seeds)
    rows = []
    for name, t in zip(names, tables, strict=True):
        d = b.values(metric) - t.values(metric)
        r = stats.crossed_bootstrap(d, weights=np.minimum(b.counts[metric], t.counts[metric]),
                                    n_boot=n_boot, level=level, seed=seed)
        rows.append({"arm": name, "layers": list(windows[name][0]), "reduction": r.estimate,
                     "ci": list(r.ci), "per_seed": list(r.per_seed)})
    reduction = np.asarray([row["reduction"] for row in rows])
    reps = _replicate_reductions(b, tables, metric, n_boot=n_boot, seed=seed)
    alpha = 1 - level
    n_questions = int(np.all([t.counts[metric].sum(0) > 0 for t in (b, *tables)], 0).sum())
    out = {}
    for source, s in scores.items():
        w = window_scores(s, [windows[n][0] for n in names])
        rho_reps = np.asarray([spearman(w, rep) for rep in reps])
        rho_reps = rho_reps[np.isfinite(rho_reps)]
        ok = (len(names) >= 3 and len(seeds) >= 1 and rho_reps.size > 0
              and n_questions >= stats.MIN_CLUSTERS)  # as every interval: none below
        ci = list(np.quantile(rho_reps, [alpha / 2, 1 - alpha / 2])) if ok else [NAN, NAN]
        out[source] = {"rho": spearman(w, reduction) if len(names) >= 3 else NAN,
                       "ci": [float(c) for c in ci], "window_scores": w.tolist()}
    return {"metric": metric, "seeds": seeds, "n_questions": n_questions, "windows": rows,
            "spearman": out,
            "resampled": "training seeds and evaluation questions, with replacement, jointly for "
                         "every window and the base; the scores are held fixed (computed once "
                         "on the training pairs)"}


def _replicate_reductions(base: Table, tables: list[Table], metric: str, *, n_boot: int,
                          seed: int) -> np.ndarray:
    """[n_boot, windows] bootstrap replicates of base rate - window rate (pooled), from one
    seed x question resampling shared by every window and the base (`stats.crossed_replicates`;
    the seedless base, repeated over the seeds by `Table.rows`, keeps its ratio)."""
    sums = np.stack([t.sums[metric] for t in (*tables, base)], axis=-1)    # [S, Q, W + 1]
    counts = np.stack([t.counts[metric] for t in (*tables, base)], axis=-1)
    reps = stats.crossed_replicates(sums, counts, n_boot=n_boot, seed=seed)
    return reps[:, -1:] - reps[:, :-1]
