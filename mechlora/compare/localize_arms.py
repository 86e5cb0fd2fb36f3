"""Before and after training, per arm and seed: `compare(..., localize_arms=True)`.

The base model is localized once on a subset of the **training** pairs (the pairs the
adapters were trained to fix): the comparison's own localization scores when it has them,
else `--localize-groups` training groups drawn with the first seed, kept in
OUT/scores/localization/. Each adapter is then localized on exactly those pairs in units of
the base gaps (`mechlora.before_after.localize_adapter`), and compared with the base: how much
of the divergence remains, and at which layers it shrank (docs/localize.md, "Before and after
training"). Each run's adapted localization and comparison live in
OUT/arms/ARM/seed-S/before_after/ and are reused while the adapter and the base are the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mechlora.before_after import (
    LocalizationComparison,
    check_comparable,
    compare_localizations,
    localize_adapter,
)
from mechlora.data import Pair, QuestionGroup, make_pairs
from mechlora.io import read_json, write_json
from mechlora.models.subject import Subject
from mechlora.result import LocalizationResult
from mechlora.training.config import TrainConfig

FOLDER = "before_after"
ABOUT = ("each adapter localized on the base localization's training pairs, in units of the "
         "base model's gap m(a) - m(b) per pair (mechlora.before_after); the pairs are the "
         "ones the adapters were trained to fix, not held out")


def base_localization(subject: Subject, groups: Sequence[QuestionGroup], cfg: TrainConfig,
                      seed: int, out: Path, from_localization, progress: bool
                      ) -> tuple[LocalizationResult, str]:
    """The base localization to compare every adapter with, and where it is: `--from` when
    its pairs are training pairs, else OUT/scores/localization (made here when absent)."""
    from mechlora.training.layers import load_localization, localize_groups

    n = subject.n_layers
    if from_localization is not None:
        loc = load_localization(from_localization, n)
        if set(loc.pair_ids) <= {p.id for p in make_pairs(groups)}:
            return loc, str(from_localization)
    here = out / "scores" / "localization"
    if (here / "localization.json").is_file():
        return load_localization(here, n), "scores/localization"
    loc = localize_groups(subject, groups, dataclasses.replace(cfg, seed=seed),
                          progress=progress)
    loc.save(here)
    return loc, "scores/localization"


def fingerprint(base: LocalizationResult) -> str:
    """What an adapted run depends on besides its adapter: the base's pairs and gaps."""
    gaps = base.gap if base.gap is not None else base.margin_a - base.margin_b
    text = json.dumps([base.model, base.positions, list(base.components), base.pair_ids,
                       gaps.tolist()])
    return hashlib.sha256(text.encode()).hexdigest()


def base_pairs(groups: Sequence[QuestionGroup], base: LocalizationResult) -> list[Pair]:
    """Exactly the base's pairs (so no clean run is spent on others)."""
    keep, used = set(base.pair_ids), set(base.group_ids)
    return [p for p in make_pairs([g for g in groups if g.id in used]) if p.id in keep]


def localize_run(subject: Subject, groups: Sequence[QuestionGroup], base: LocalizationResult,
                 folder: Path, adapter_sha256: str, *, merge_variants: bool, progress: bool
                 ) -> tuple[LocalizationComparison, bool]:
    """The adapter in `folder` against `base`, and whether it was reused from
    FOLDER/before_after/ (its comparison.json's cache_key: the adapter's weights and the base)."""
    check_comparable(base, subject.n_layers, base.components,
                     "merged" if merge_variants else "first", f"this comparison ({subject.name})")
    here = folder / FOLDER
    key = {"adapter_sha256": adapter_sha256, "base": fingerprint(base)}
    if (here / "comparison.json").is_file() and (here / "localization.json").is_file() \
            and read_json(here / "comparison.json").get("cache_key") == key:
        return compare_localizations(base, LocalizationResult.load(here)), True
    comparison = localize_adapter(subject, base_pairs(groups, base), folder, base,
                                  progress=progress, logit_lens=False,
                                  merge_variants=merge_variants)
    comparison.adapted.save(here)
    write_json(here / "comparison.json", {**comparison.summary(), "cache_key": key})
    return comparison, False


def run_entry(comparison: LocalizationComparison, folder: str) -> dict[str, Any]:
    """compare.json's arms.ARM.seeds.S.before_after: the comparison in brief."""
    shrank, test = comparison.shrank_at()
    return {"folder": f"{folder}/{FOLDER}", "trained_layers": comparison.trained_layers,
            "n_pairs": comparison.base.n_pairs, "remaining": comparison.remaining(),
            "score": comparison.adapted.scores, "score_shrink": comparison.score_shrink(),
            "shrank_at": shrank, "test": test, "verdict": comparison.verdict()}


def base_entry(base: LocalizationResult, where: str) -> dict[str, Any]:
    """compare.json's before_after: the base every run is compared with."""
    return {"base": {"file": where, "n_pairs": base.n_pairs,
                     "n_groups": len(set(base.group_ids)), "positions": base.positions,
                     "components": list(base.components), "score": base.scores},
            "about": ABOUT}
