"""`LocalizationResult`: per-pair restoration arrays, their summaries, and their files.

Files: `localization.json` (versioned schema, documented in docs/localize.md) and
`arrays.safetensors` (per-pair arrays, never pickled). Besides the per-layer sweep a result
may hold per-head and per-position restoration, layer-spec effects (mechlora/effects.py), and
per-pair labels (question type, phenomenon, direction) that `where` and `by` split it on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mechlora import stats
from mechlora.effects import SpecEffect, direction_of_id
from mechlora.errors import MechloraError
from mechlora.io import jsonable, load_arrays, read_json, save_arrays, write_json

# 2: records n_boot and how intervals were made ("interval"). 3: per-pair type, phenomenon
# and direction; per-direction curves; optional heads, by_position, specs, groups, gap.
SCHEMA_VERSION = 3
READS = (1, 2, 3)
GROUP_KEYS = ("type", "phenomenon", "direction")
UNLABELLED = "(none)"
V1_N_BOOT = 1000  # version 1 did not record n_boot; every writer of it used 1000


def _column_means(values: np.ndarray, n_layers: int) -> np.ndarray:
    """Per-layer mean over pairs of the finite values (nan where a layer has none)."""
    if not len(values):
        return np.full(n_layers, np.nan)
    ok = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, values, 0.0).sum(0) / ok.sum(0)


@dataclass
class LocalizationResult:
    """Restoration r = (m(b<-a) - m(b)) / (m(a) - m(b)) per pair, layer and component."""

    model: str
    n_layers: int
    components: tuple[str, ...]
    positions: str
    engine: str
    pair_ids: list[str]
    group_ids: list[str]
    restoration: dict[str, np.ndarray]          # component -> [n_pairs, n_layers]
    margin_a: np.ndarray                        # [n_pairs] donor margins
    margin_b: np.ndarray                        # [n_pairs] recipient margins
    divergence: dict[str, np.ndarray]           # "cosine" / "logit_lens_kl" -> [n_pairs, L]
    excluded: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    n_boot: int = 1000
    types: list[str | None] = field(default_factory=list)       # per pair: question type
    phenomena: list[str | None] = field(default_factory=list)   # per pair (docs/localize.md)
    directions: list[str | None] = field(default_factory=list)  # per pair: effects.DIRECTIONS
    heads: np.ndarray | None = None              # [n_pairs, L, n_heads]: one head at a time
    by_position: dict[str, np.ndarray] = field(default_factory=dict)  # c -> [n_pairs, L, P]
    position_labels: list[str] = field(default_factory=list)  # the P aligned positions
    specs: list[SpecEffect] = field(default_factory=list)     # sufficiency / necessity
    gap: np.ndarray | None = None  # [n_pairs] the denominators, when not m(a) - m(b)

    def __post_init__(self) -> None:
        n = len(self.pair_ids)
        self.directions = list(self.directions) or [direction_of_id(p) for p in self.pair_ids]
        self.types = list(self.types) or [None] * n
        self.phenomena = list(self.phenomena) or [None] * n

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)

    # -- splitting --------------------------------------------------------------------------
    def labels(self, key: str) -> list[str]:
        """Each pair's `key` ("type", "phenomenon" or "direction"); unlabelled as "(none)"."""
        if key not in GROUP_KEYS:
            raise MechloraError(f"cannot split a localization by '{key}'; use "
                                f"{', '.join(GROUP_KEYS)}")
        values = {"type": self.types, "phenomenon": self.phenomena,
                  "direction": self.directions}[key]
        return [UNLABELLED if v is None else v for v in values]

    def subset(self, rows: np.ndarray) -> LocalizationResult:
        """The pairs a boolean mask keeps, or the pairs at integer indices in that order,
        with every per-pair array (specs included)."""
        idx = as_index(rows)

        def pick(values: list) -> list:
            return [values[i] for i in idx]

        return dataclasses.replace(
            self, pair_ids=pick(self.pair_ids), group_ids=pick(self.group_ids),
            restoration={c: v[idx] for c, v in self.restoration.items()},
            margin_a=self.margin_a[idx], margin_b=self.margin_b[idx],
            divergence={k: v[idx] for k, v in self.divergence.items()},
            types=pick(self.types), phenomena=pick(self.phenomena),
            directions=pick(self.directions),
            heads=None if self.heads is None else self.heads[idx],
            by_position={c: v[idx] for c, v in self.by_position.items()},
            specs=[s.subset(idx) for s in self.specs],
            gap=None if self.gap is None else self.gap[idx])

    def where(self, **labels: str) -> LocalizationResult:
        """The pairs with these labels, e.g. `where(direction="original>paraphrase")`."""
        mask = np.ones(self.n_pairs, dtype=bool)
        for key, value in labels.items():
            mask &= np.array([v == value for v in self.labels(key)], dtype=bool)
        return self.subset(mask)

    def by(self, key: str) -> dict[str, LocalizationResult]:
        """One result per value of `key` ("type", "phenomenon" or "direction"), in order of
        first appearance."""
        values = self.labels(key)
        return {v: self.subset(np.array([x == v for x in values], dtype=bool))
                for v in dict.fromkeys(values)}

    def mean(self, component: str) -> np.ndarray:
        """Per-layer mean restoration over pairs (non-finite values left out)."""
        return _column_means(self.restoration[component], self.n_layers)

    def _interval(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """95% cluster bootstrap over question groups; nan (undefined) with fewer than
        stats.MIN_CLUSTERS groups."""
        return stats.bootstrap_ci(np.asarray(self.group_ids), values, n_boot=self.n_boot)

    def ci(self, component: str) -> tuple[np.ndarray, np.ndarray]:
        return self._interval(self.restoration[component])

    @property
    def score_name(self) -> str:
        return "resid_increment" if "resid" in self.components else "attn_plus_mlp"

    def per_pair_scores(self) -> np.ndarray:
        """[n_pairs, L]: where each pair's divergence is written into the residual stream.

        With resid sites: the increment r_l - r_{l-1} of the residual-stream restoration
        (r_{-1} = 0), which sums to r at the last layer. Otherwise attn + mlp restoration.
        """
        if "resid" in self.components:
            r = self.restoration["resid"]
            return np.diff(r, axis=1, prepend=0.0)
        parts = [self.restoration[c] for c in self.components if c in ("attn", "mlp")]
        return sum(parts) if parts else np.zeros((self.n_pairs, self.n_layers))

    @property
    def scores(self) -> np.ndarray:
        """The per-layer score the selector uses: the mean of `per_pair_scores` over pairs."""
        s = self.per_pair_scores()
        return _column_means(s, self.n_layers) if len(s) else np.zeros(self.n_layers)

    def score_ci(self) -> tuple[np.ndarray, np.ndarray]:
        return self._interval(self.per_pair_scores())

    def curves(self) -> dict[str, dict[str, np.ndarray]]:
        """Per component: the mean restoration per layer and its interval."""
        out = {}
        for c in self.components:
            lo, hi = self.ci(c)
            out[c] = {"mean": self.mean(c), "ci_low": lo, "ci_high": hi}
        return out

    def score_summary(self) -> dict[str, Any]:
        lo, hi = self.score_ci()
        return {"name": self.score_name, "values": self.scores, "ci_low": lo, "ci_high": hi}

    def summary(self) -> dict[str, Any]:
        """The JSON document written as localization.json."""
        from mechlora.breakdown import extras

        div = {k: _column_means(v, self.n_layers) for k, v in self.divergence.items()}
        return jsonable({
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "n_layers": self.n_layers,
            "components": list(self.components),
            "positions": self.positions,
            "engine": self.engine,
            "n_pairs": self.n_pairs,
            "n_groups": len(set(self.group_ids)),
            "n_excluded": len(self.excluded),
            "n_boot": self.n_boot,
            "interval": {"method": "percentile cluster bootstrap over question groups",
                         "level": 0.95, "n_boot": self.n_boot, "seed": 0,
                         "min_groups": stats.MIN_CLUSTERS},
            "restoration": self.curves(),
            "score": self.score_summary(),
            "divergence": div,
            "pairs": [{"id": p, "group": g, "type": t, "phenomenon": ph, "direction": d,
                       "margin_a": ma, "margin_b": mb}
                      for p, g, t, ph, d, ma, mb in zip(
                          self.pair_ids, self.group_ids, self.types, self.phenomena,
                          self.directions, self.margin_a, self.margin_b)],
            "excluded": self.excluded,
            "settings": self.settings,
            **extras(self),
        })

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {f"restoration.{c}": v for c, v in self.restoration.items()}
        arrays.update({f"divergence.{k}": v for k, v in self.divergence.items()})
        arrays.update(margin_a=self.margin_a, margin_b=self.margin_b)
        if self.heads is not None:
            arrays["heads"] = self.heads
        arrays.update({f"by_position.{c}": v for c, v in self.by_position.items()})
        for i, effect in enumerate(self.specs):
            arrays[f"spec.{i}.sufficiency"] = effect.sufficiency
            arrays[f"spec.{i}.necessity"] = effect.necessity
            if effect.complement is not None:
                arrays[f"spec.{i}.complement"] = effect.complement
        if self.gap is not None:
            arrays["gap"] = self.gap
        save_arrays(out / "arrays.safetensors",
                    {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()})
        write_json(out / "localization.json", self.summary())
        return out

    @classmethod
    def load(cls, path: str | Path) -> LocalizationResult:
        path = Path(path)
        folder = path.parent if path.name == "localization.json" else path
        doc = read_json(folder / "localization.json")
        if doc.get("schema_version") not in READS:
            raise MechloraError(f"{folder}/localization.json has schema version "
                                f"{doc.get('schema_version')}; this mechlora reads versions "
                                f"{', '.join(map(str, READS))}: rerun mechlora localize")
        if not (folder / "arrays.safetensors").is_file():
            raise MechloraError(f"{folder} has no arrays.safetensors; rerun mechlora localize")
        arrays = load_arrays(folder / "arrays.safetensors")
        pairs = doc["pairs"]
        n_boot = doc.get("n_boot", V1_N_BOOT)
        ids, groups = [p["id"] for p in pairs], [p["group"] for p in pairs]
        directions = [p.get("direction") or direction_of_id(p["id"]) for p in pairs]
        specs = [SpecEffect(e["spec"], tuple(e["layers"]), e["label"], ids, groups, directions,
                            arrays[f"spec.{i}.sufficiency"], arrays[f"spec.{i}.necessity"],
                            tuple(e["components"]), n_boot, e.get("covered"),
                            arrays.get(f"spec.{i}.complement"))
                 for i, e in enumerate(doc.get("specs", []))]
        return cls(
            model=doc["model"], n_layers=doc["n_layers"], components=tuple(doc["components"]),
            positions=doc["positions"], engine=doc["engine"], pair_ids=ids, group_ids=groups,
            restoration={c: arrays[f"restoration.{c}"] for c in doc["components"]},
            margin_a=arrays["margin_a"], margin_b=arrays["margin_b"],
            divergence={k.split(".", 1)[1]: v for k, v in arrays.items()
                        if k.startswith("divergence.")},
            excluded=doc["excluded"], settings=doc["settings"], n_boot=n_boot,
            types=[p.get("type") for p in pairs], phenomena=[p.get("phenomenon") for p in pairs],
            directions=directions, heads=arrays.get("heads"),
            by_position={k.split(".", 1)[1]: v for k, v in arrays.items()
                         if k.startswith("by_position.")},
            position_labels=doc.get("by_position", {}).get("labels", []),
            specs=specs, gap=arrays.get("gap"),
        )


def as_index(rows) -> np.ndarray:
    """Integer row indices from a boolean mask or from indices."""
    rows = np.asarray(rows)
    return np.flatnonzero(rows) if rows.dtype == bool else rows.astype(int)



def merge_results(parts: list[LocalizationResult], order: list[str]) -> LocalizationResult:
    """One result from shards of a pair list, rows in the original pair order."""
    rank = {pid: i for i, pid in enumerate(order)}
    rows = sorted((rank[pid], k, i) for k, part in enumerate(parts)
                  for i, pid in enumerate(part.pair_ids))
    first = parts[0]

    def take(get) -> np.ndarray:
        picked = [get(parts[k])[i] for _, k, i in rows]
        return np.stack(picked) if picked else get(first)[:0]

    excluded = sorted((e for part in parts for e in part.excluded), key=lambda e: rank[e["id"]])
    ids = [parts[k].pair_ids[i] for _, k, i in rows]
    groups = [parts[k].group_ids[i] for _, k, i in rows]
    directions = [parts[k].directions[i] for _, k, i in rows]
    specs = [dataclasses.replace(s, pair_ids=ids, group_ids=groups, directions=directions,
                                 sufficiency=take(lambda p, j=j: p.specs[j].sufficiency),
                                 necessity=take(lambda p, j=j: p.specs[j].necessity),
                                 complement=None if s.complement is None else
                                 take(lambda p, j=j: p.specs[j].complement))
             for j, s in enumerate(first.specs)]
    engines = {e for part in parts for e in part.engine.split("+")}
    settings = {**first.settings, "n_pairs_in": len(order), "processes": len(parts),
                "seconds": max(p.settings.get("seconds", 0.0) for p in parts)}
    return LocalizationResult(
        model=first.model, n_layers=first.n_layers, components=first.components,
        positions=first.positions, engine="+".join(sorted(engines)),
        pair_ids=ids, group_ids=groups,
        restoration={c: take(lambda p, c=c: p.restoration[c]) for c in first.components},
        margin_a=take(lambda p: p.margin_a), margin_b=take(lambda p: p.margin_b),
        divergence={d: take(lambda p, d=d: p.divergence[d]) for d in first.divergence},
        excluded=excluded, settings=settings, n_boot=first.n_boot,
        types=[parts[k].types[i] for _, k, i in rows],
        phenomena=[parts[k].phenomena[i] for _, k, i in rows], directions=directions,
        heads=None if first.heads is None else take(lambda p: p.heads),
        by_position={c: take(lambda p, c=c: p.by_position[c]) for c in first.by_position},
        position_labels=first.position_labels, specs=specs,
        gap=None if first.gap is None else take(lambda p: p.gap))
