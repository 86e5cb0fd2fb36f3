"""`LocalizationResult`: per-pair restoration arrays, their summaries, and their files.

Files: `localization.json` (versioned schema, documented in docs/localize.md) and
`arrays.safetensors` (per-pair arrays, never pickled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mechlora import stats
from mechlora.errors import MechloraError
from mechlora.io import load_arrays, read_json, save_arrays, write_json

SCHEMA_VERSION = 2  # 2: records n_boot and how intervals were made ("interval")
READS = (1, 2)
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

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)

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
        return sum(self.restoration[c] for c in self.components if c in ("attn", "mlp"))

    @property
    def scores(self) -> np.ndarray:
        """The per-layer score the selector uses: the mean of `per_pair_scores` over pairs."""
        s = self.per_pair_scores()
        return _column_means(s, self.n_layers) if len(s) else np.zeros(self.n_layers)

    def score_ci(self) -> tuple[np.ndarray, np.ndarray]:
        return self._interval(self.per_pair_scores())

    def summary(self) -> dict[str, Any]:
        """The JSON document written as localization.json."""
        comps = {}
        for c in self.components:
            lo, hi = self.ci(c)
            comps[c] = {"mean": self.mean(c), "ci_low": lo, "ci_high": hi}
        lo, hi = self.score_ci()
        div = {k: _column_means(v, self.n_layers) for k, v in self.divergence.items()}
        return _finite({
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
            "restoration": comps,
            "score": {"name": self.score_name, "values": self.scores, "ci_low": lo, "ci_high": hi},
            "divergence": div,
            "pairs": [{"id": p, "group": g, "margin_a": ma, "margin_b": mb}
                      for p, g, ma, mb in zip(self.pair_ids, self.group_ids, self.margin_a,
                                              self.margin_b)],
            "excluded": self.excluded,
            "settings": self.settings,
        })

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {f"restoration.{c}": v for c, v in self.restoration.items()}
        arrays.update({f"divergence.{k}": v for k, v in self.divergence.items()})
        arrays.update(margin_a=self.margin_a, margin_b=self.margin_b)
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
        return cls(
            model=doc["model"], n_layers=doc["n_layers"], components=tuple(doc["components"]),
            positions=doc["positions"], engine=doc["engine"],
            pair_ids=[p["id"] for p in doc["pairs"]], group_ids=[p["group"] for p in doc["pairs"]],
            restoration={c: arrays[f"restoration.{c}"] for c in doc["components"]},
            margin_a=arrays["margin_a"], margin_b=arrays["margin_b"],
            divergence={k.split(".", 1)[1]: v for k, v in arrays.items()
                        if k.startswith("divergence.")},
            excluded=doc["excluded"], settings=doc["settings"],
            n_boot=doc.get("n_boot", V1_N_BOOT),
        )


def _finite(obj: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


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
    engines = {e for part in parts for e in part.engine.split("+")}
    settings = {**first.settings, "n_pairs_in": len(order), "processes": len(parts),
                "seconds": max(p.settings.get("seconds", 0.0) for p in parts)}
    return LocalizationResult(
        model=first.model, n_layers=first.n_layers, components=first.components,
        positions=first.positions, engine="+".join(sorted(engines)),
        pair_ids=[parts[k].pair_ids[i] for _, k, i in rows],
        group_ids=[parts[k].group_ids[i] for _, k, i in rows],
        restoration={c: take(lambda p, c=c: p.restoration[c]) for c in first.components},
        margin_a=take(lambda p: p.margin_a), margin_b=take(lambda p: p.margin_b),
        divergence={d: take(lambda p, d=d: p.divergence[d]) for d in first.divergence},
        excluded=excluded, settings=settings, n_boot=first.n_boot)
