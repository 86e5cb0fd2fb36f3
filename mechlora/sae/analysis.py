"""Rank SAE features by how the paraphrases of a pair differ on them, and patch the top ones.

Both read resid@layer at the aligned positions of each prompt's clean run
(`mechlora.localize.clean_run`), encode it with the SAE, and work on feature activations z:

- `rank_features`: per unordered pair of wordings, |z_a - z_b| (or the signed difference,
  oriented toward the wording with the larger margin) averaged over the aligned positions;
  features ranked by the mean over pairs, with cluster-bootstrap intervals over questions.
- `patch_features`: the recipient's residual with some features taken from the donor,
  x' = x_b + sum_{f in F} (z_a[f] - z_b[f]) W_dec[f] (everything else of x_b, error term
  included, kept), written in as an ordinary resid patch, so the exact engines of
  `mechlora.patching` (cached where exact) run it unchanged; restoration
  r = (m(b<-a) - m(b)) / (m(a) - m(b)) as in `mechlora localize`.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mechlora import memory
from mechlora.data import Pair, QuestionGroup, load_groups, load_image, make_pairs
from mechlora.errors import MechloraError
from mechlora.localize import (
    CleanRun,
    check_limits,
    check_positions,
    clean_run,
    parse_positions,
    screen,
)
from mechlora.models.subject import Subject
from mechlora.patching import RUNNERS, SitePatch, choose_engine
from mechlora.probes import Site
from mechlora.sae.model import SAE, attach_layer, patched_resid
from mechlora.sae.result import FeaturePatchResult, FeatureRanking

SCORES = ("abs", "signed")


def as_pairs(pairs, *, both_directions: bool = True) -> list[Pair]:
    """Pairs from a data file, question groups, or pairs; `both_directions=False` keeps one
    ordered pair per unordered pair of wordings."""
    if isinstance(pairs, (str, Path)):
        pairs = load_groups(pairs)
    pairs = list(pairs)
    if pairs and isinstance(pairs[0], QuestionGroup):
        return make_pairs(pairs, both_directions=both_directions)
    if both_directions:
        return pairs
    seen: set[tuple[str, int, int]] = set()
    kept = []
    for p in pairs:
        key = (p.group.id, min(p.a, p.b), max(p.a, p.b))
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept


def _subject(subject) -> Subject:
    from mechlora.bridges import as_subject
    from mechlora.models import wrap

    subject = as_subject(subject)
    return subject if isinstance(subject, Subject) else wrap(subject, None)


def _check_positions(positions: str) -> None:
    if parse_positions(positions)[0] == "image":
        raise MechloraError("SAE features are read at the aligned prompt positions: use "
                            "positions last or suffix:K (the image precedes the question, so "
                            "its activations do not differ between paraphrases)")


def _check_aligned(subject: Subject, pair: Pair, a: CleanRun, b: CleanRun,
                   positions: str) -> None:
    """Refuse positions that are not the same tokens in both wordings (`suffix:K` reaching
    into the question) or cannot differ between them, naming the first differing token
    (`mechlora.localize.check_positions`, the check `screen` makes for localize and patch)."""
    if len(a.positions) != len(b.positions):
        raise MechloraError(f"pair {pair.id}: {len(a.positions)} vs {len(b.positions)} "
                            f"aligned positions for '{positions}'")
    check_positions(subject, pair, a, b, positions)


def _groups_of_runs(subject: Subject, sae: SAE, pairs: Sequence[Pair], layer: int,
                    positions: str, *, keep_prefix: bool, merge_variants: bool, bar: tqdm
                    ) -> Iterator[tuple[QuestionGroup, object, list[Pair], dict, dict]]:
    """Per question: its choice tokens, its pairs, each wording's clean run and its feature
    activations z [P, d_sae] at the aligned positions (one forward per wording)."""
    site = Site(layer, "resid")
    answer_ids: dict[tuple, object] = {}
    for _, chunk in itertools.groupby(pairs, key=lambda p: p.group.id):
        chunk = list(chunk)
        g = chunk[0].group
        if g.choices not in answer_ids:
            answer_ids[g.choices] = subject.choice_tokens(g.choices, merge=merge_variants,
                                                          where=(g.source, g.line))
        ids = answer_ids[g.choices]
        image = load_image(g.image) if (g.image is not None and subject.is_vlm) else None
        runs: dict[int, CleanRun] = {}
        for v in dict.fromkeys(v for p in chunk for v in (p.a, p.b)):
            runs[v] = clean_run(subject, g.variants[v].text, image, g.answer_index, ids,
                                [site], positions, keep_prefix=keep_prefix)
        z = {v: sae.encode(run.values[site]) for v, run in runs.items()}
        yield g, ids, chunk, runs, z
        bar.update(len(chunk))


def rank_features(subject, sae: SAE, pairs, *, layer: int | None = None,
                  positions: str = "last", score: str = "abs", only_flips: bool = True,
                  top: int = 20, n_boot: int = 1000, progress: bool = True,
                  merge_variants: bool = False) -> FeatureRanking:
    """Rank the SAE's features by how differently the two wordings of a pair activate them.

    Each unordered pair of wordings counts once. `score="abs"`: mean over pairs of
    |z_a[f] - z_b[f]|; `"signed"`: mean of (z_a[f] - z_b[f]) * sign(m(a) - m(b)), positive
    when the feature is higher in the wording whose margin is larger (toward the reference
    answer), ranked by its absolute value. Multi-position sets average over the positions.
    `only_flips` (default) keeps the pairs whose predicted answers differ. The `top`
    features get per-pair values and 95% cluster-bootstrap intervals over questions. `fit`
    records how well the SAE reconstructs these residuals (||e|| / ||x|| and L0 over every
    wording's aligned positions): an SAE trained on another model shows it here.
    """
    subject = _subject(subject)
    if score not in SCORES:
        raise MechloraError(f"unknown score '{score}'; use {' or '.join(SCORES)}")
    if top < 1:
        raise MechloraError(f"top must be at least 1, got {top}")
    _check_positions(positions)
    layer = attach_layer(sae, subject, layer)
    pairs = as_pairs(pairs, both_directions=False)
    if not pairs:
        raise MechloraError("no pairs to rank: the data has no paraphrase pairs")
    t0 = time.perf_counter()
    total = torch.zeros(sae.d_sae, dtype=torch.float64)
    active = torch.zeros(sae.d_sae, dtype=torch.float64)
    n_wordings, errors, l0 = 0, [], []
    site = Site(layer, "resid")
    rows, ids_, groups, ma, mb = [], [], [], [], []
    bar = tqdm(total=len(pairs), desc="sae rank", unit="pair", disable=not progress)
    with torch.inference_mode():
        for g, _, chunk, runs, z in _groups_of_runs(subject, sae, pairs, layer, positions,
                                                    keep_prefix=False,
                                                    merge_variants=merge_variants, bar=bar):
            for v, zv in z.items():
                active += (zv != 0).any(0).double().cpu()
                x = runs[v].values[site].float()
                errors += (sae.error(x).norm(dim=-1).cpu() / x.norm(dim=-1).cpu()).tolist()
                l0 += (zv != 0).sum(-1).cpu().tolist()
                n_wordings += 1
            for pair in chunk:
                a, b = runs[pair.a], runs[pair.b]
                _check_aligned(subject, pair, a, b, positions)  # as sae patch and localize
                if only_flips and a.pred == b.pred:
                    continue
                dz = (z[pair.a] - z[pair.b]).float()
                value = (dz.abs() if score == "abs"
                         else dz * float(np.sign(a.margin - b.margin))).mean(0).cpu()
                total += value.double()
                rows.append(value.to_sparse())
                ids_.append(pair.id)
                groups.append(g.id)
                ma.append(a.margin)
                mb.append(b.margin)
    bar.close()
    if not rows:
        why = ("no pair's predicted answers differ (pass only_flips=False / --all-pairs to "
               "rank on every pair)" if only_flips else "no pairs")
        raise MechloraError(f"nothing to rank: {why}")
    mean = (total / len(rows)).numpy()
    order = np.argsort(-(np.abs(mean) if score == "signed" else mean), kind="stable")
    chosen = order[:min(top, sae.d_sae)]
    per_pair = torch.stack(rows).to_dense()[:, torch.from_numpy(chosen)].numpy()
    return FeatureRanking(
        model=subject.name, layer=layer, positions=positions, score=score,
        sae=sae.describe(), pair_ids=ids_, group_ids=groups, margin_a=np.array(ma),
        margin_b=np.array(mb), mean=mean, top=chosen, per_pair=per_pair.astype(np.float64),
        active=(active / max(n_wordings, 1)).numpy(), n_boot=n_boot,
        fit={"relative_error": float(np.mean(errors)), "relative_error_max": float(max(errors)),
             "l0": float(np.mean(l0)), "n_positions": len(errors)},
        settings={"only_flips": only_flips, "n_pairs_in": len(pairs),
                  "n_wordings": n_wordings, "choice_reading":
                  "merged" if merge_variants else "first",
                  "seconds": round(time.perf_counter() - t0, 3)})


ROW_SET, ROW_ALL, ROW_RESID = "set", "all_features", "resid"


def row_names(features: Sequence[int], n_random: int) -> list[str]:
    """The patched rows of every pair: each feature alone, the set together (unless it is one
    feature), `n_random` random sets of the same size, every feature, the whole residual."""
    names = [f"f{f}" for f in features]
    if len(features) != 1:
        names.append(ROW_SET)
    return names + [f"random{i + 1}" for i in range(n_random)] + [ROW_ALL, ROW_RESID]


def patch_features(subject, sae: SAE, pairs, features: Sequence[int], *,
                   layer: int | None = None, positions: str = "last", engine: str = "auto",
                   n_random: int = 5, seed: int = 0, only_flips: bool = False,
                   min_delta: float = 0.25, max_rows: int | None = None,
                   max_bytes: int | None = None, n_boot: int = 1000, progress: bool = True,
                   merge_variants: bool = False, features_from: str = "given"
                   ) -> FeaturePatchResult:
    """Restoration when the recipient takes some features' activations from the donor.

    Rows per ordered pair (donor a, recipient b), all in one engine call per recipient:
    `f{id}` each of `features` alone; `set` all of them together (absent for a single
    feature; with no features it is the unpatched recipient, r = 0); `random{i}` a random
    set of the same size among the other features whose activation differs in this pair
    (drawn per pair, seeded by `seed` and the pair id); `all_features` every feature
    (x_b + x_hat_a - x_hat_b: what the SAE reconstruction carries); `resid` the whole
    residual x_a (the `localize` resid restoration at this layer). The error term's share is
    r(resid) - r(all_features). Pairs with |m(a) - m(b)| < `min_delta` are excluded, as in
    localize. `features_from` records where the features came from (e.g. a ranking on the
    same pairs, which is then not a held-out test).
    """
    subject = _subject(subject)
    check_limits(min_delta=min_delta, max_rows=max_rows, max_bytes=max_bytes)
    _check_positions(positions)
    layer = attach_layer(sae, subject, layer)
    features = [int(f) for f in dict.fromkeys(features)]
    bad = [f for f in features if not 0 <= f < sae.d_sae]
    if bad:
        raise MechloraError(f"feature {bad[0]} does not exist: the SAE has {sae.d_sae} "
                            f"features (0-{sae.d_sae - 1})")
    if n_random < 0:
        raise MechloraError(f"n_random must be 0 or more, got {n_random}")
    pairs = as_pairs(pairs)
    if not pairs:
        raise MechloraError("no pairs to patch: the data has no paraphrase pairs")
    site = Site(layer, "resid")
    names = row_names(features, n_random)
    chosen = torch.tensor(features, dtype=torch.long)
    keep_prefix = engine == "cached" or (engine == "auto" and subject.family.cached)
    t0 = time.perf_counter()
    restoration: dict[str, np.ndarray] = {}
    drawn: dict[str, np.ndarray] = {}
    kept_rows: list[tuple[Pair, CleanRun, CleanRun]] = []
    excluded: list[dict] = []
    used = set()
    bar = tqdm(total=len(pairs), desc="sae patch", unit="pair", disable=not progress)
    with torch.inference_mode():
        for g, ids, chunk, runs, z in _groups_of_runs(subject, sae, pairs, layer, positions,
                                                      keep_prefix=keep_prefix,
                                                      merge_variants=merge_variants, bar=bar):
            kept = [(p, d) for p in chunk
                    if (d := screen(p, runs[p.a], runs[p.b], positions=positions,
                                    only_flips=only_flips, min_delta=min_delta,
                                    excluded=excluded, subject=subject)) is not None]
            for v in dict.fromkeys(p.b for p, _ in kept):
                donors = [(p, d) for p, d in kept if p.b == v]
                b = runs[v]
                x_b, patches = b.values[site], []
                for p, _ in donors:
                    sets, drawn[p.id] = _row_sets(chosen, z[p.a], z[p.b], n_random,
                                                  f"{seed}:{p.id}")
                    values = [patched_resid(sae, x_b, z[p.a], z[v], s) for s in sets]
                    values.append(runs[p.a].values[site])  # the whole residual
                    patches += [SitePatch(site, b.positions, x) for x in values]
                name = choose_engine(engine, subject, b.inputs, patches)
                used.add(name)
                extra = {"prefix": b.prefix} if name == "cached" else {}
                margins = RUNNERS[name](subject, b.inputs, patches, ids, g.answer_index,
                                        max_rows=max_rows, max_bytes=max_bytes, **extra)
                margins = margins.float().cpu().numpy().reshape(len(donors), len(names))
                for (p, delta), m in zip(donors, margins):
                    restoration[p.id] = (m - b.margin) / delta
            kept_rows += [(p, runs[p.a], runs[p.b]) for p, _ in kept]
    bar.close()
    size = len(features)
    return FeaturePatchResult(
        model=subject.name, layer=layer, positions=positions,
        engine="+".join(sorted(used)) or engine, sae=sae.describe(), features=features,
        rows=names, pair_ids=[p.id for p, _, _ in kept_rows],
        group_ids=[p.group.id for p, _, _ in kept_rows],
        restoration=_stack([restoration[p.id] for p, _, _ in kept_rows], len(names)),
        random_features=np.stack([drawn[p.id] for p, _, _ in kept_rows]) if kept_rows
        else np.zeros((0, n_random, size), dtype=np.int64),
        margin_a=np.array([a.margin for _, a, _ in kept_rows]),
        margin_b=np.array([b.margin for _, _, b in kept_rows]),
        excluded=excluded, n_boot=n_boot,
        settings={"engine": engine, "only_flips": only_flips, "min_delta": min_delta,
                  "n_random": n_random, "seed": seed, "features_from": features_from,
                  "max_rows": max_rows, "max_bytes": max_bytes or memory.DEFAULT_MAX_BYTES,
                  "n_pairs_in": len(pairs),
                  "choice_reading": "merged" if merge_variants else "first",
                  "seconds": round(time.perf_counter() - t0, 3)})


def _row_sets(chosen: torch.Tensor, z_a: torch.Tensor, z_b: torch.Tensor,
              n_random: int, seed: str) -> tuple[list[torch.Tensor | None], np.ndarray]:
    """The feature set of every row but `resid` (None = all features), and the random draws
    [n_random, len(chosen)] (-1 where the pair has too few differing features)."""
    sets: list[torch.Tensor | None] = [chosen[i:i + 1] for i in range(len(chosen))]
    if len(chosen) != 1:
        sets.append(chosen)
    differ = ((z_a != z_b).any(0)).cpu()
    differ[chosen] = False
    pool = differ.nonzero().flatten().tolist()
    rng = random.Random(seed)
    draws = np.full((n_random, len(chosen)), -1, dtype=np.int64)
    for i in range(n_random):
        pick = sorted(rng.sample(pool, min(len(chosen), len(pool))))
        draws[i, :len(pick)] = pick
        sets.append(torch.tensor(pick, dtype=torch.long))
    sets.append(None)
    return sets, draws


def _stack(values: list[np.ndarray], width: int) -> np.ndarray:
    return np.stack(values) if values else np.zeros((0, width))
