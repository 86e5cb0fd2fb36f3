"""Results of `mechlora sae rank|patch|clamp` and their files.

Each writes a folder: `sae.json` (schema_version, `operation`; documented in docs/sae.md),
`arrays.safetensors` (per-pair arrays, never pickled; rank and patch) or `predictions.jsonl`
(clamp), and `report.html`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mechlora import stats
from mechlora.errors import MechloraError
from mechlora.io import (
    jsonable,
    load_arrays,
    prepare_out_dir,
    read_json,
    read_jsonl,
    save_arrays,
    write_json,
    write_jsonl,
)

SCHEMA_VERSION = 1
FILE = "sae.json"



def column_means(values: np.ndarray) -> np.ndarray:
    """Mean over rows of the finite values, per column (nan where a column has none)."""
    ok = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, values, 0.0).sum(0) / ok.sum(0)


def interval(n_boot: int) -> dict:
    return {"method": "percentile cluster bootstrap over question groups", "level": 0.95,
            "n_boot": n_boot, "seed": 0, "min_groups": stats.MIN_CLUSTERS}


def _read(path: str | Path, operation: str) -> tuple[Path, dict]:
    path = Path(path)
    folder = path.parent if path.name == FILE else path
    doc = read_json(folder / FILE)
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise MechloraError(f"{folder}/{FILE} has schema version {doc.get('schema_version')}; "
                            f"this mechlora reads {SCHEMA_VERSION}: rerun mechlora sae "
                            f"{operation}")
    if doc.get("operation") != operation:
        raise MechloraError(f"{folder}/{FILE} holds a '{doc.get('operation')}' result, not "
                            f"'{operation}'")
    return folder, doc


def _pairs(ids: list[str], groups: list[str], ma: np.ndarray, mb: np.ndarray) -> list[dict]:
    return [{"id": p, "group": g, "margin_a": a, "margin_b": b}
            for p, g, a, b in zip(ids, groups, ma, mb)]


@dataclass
class FeatureRanking:
    """Features ranked by their activation difference between the wordings of a pair."""

    model: str
    layer: int
    positions: str
    score: str                 # "abs" | "signed"
    sae: dict[str, Any]
    pair_ids: list[str]
    group_ids: list[str]
    margin_a: np.ndarray
    margin_b: np.ndarray
    mean: np.ndarray           # [d_sae] mean score over pairs
    top: np.ndarray            # [N] feature ids, best first
    per_pair: np.ndarray       # [n_pairs, N] scores of the top features
    active: np.ndarray         # [d_sae] share of wordings on which the feature is active
    fit: dict[str, Any] = field(default_factory=dict)  # relative_error, l0 on these residuals
    n_boot: int = 1000
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)

    def features(self, k: int) -> list[int]:
        """The k best-ranked features."""
        if not 1 <= k <= len(self.top):
            raise MechloraError(f"this ranking holds {len(self.top)} features; asked for {k}")
        return [int(f) for f in self.top[:k]]

    def ci(self) -> tuple[np.ndarray, np.ndarray]:
        """95% cluster-bootstrap interval of each top feature's mean score."""
        return stats.bootstrap_ci(np.asarray(self.group_ids), self.per_pair, n_boot=self.n_boot)

    def summary(self) -> dict[str, Any]:
        lo, hi = self.ci()
        rows = [{"rank": i + 1, "id": int(f), "mean": self.mean[f], "ci_low": lo[i],
                 "ci_high": hi[i], "active_share": self.active[f]}
                for i, f in enumerate(self.top)]
        return jsonable({
            "schema_version": SCHEMA_VERSION, "operation": "rank", "model": self.model,
            "layer": self.layer, "site": f"resid@{self.layer}", "positions": self.positions,
            "score": self.score, "sae": self.sae, "n_pairs": self.n_pairs,
            "n_groups": len(set(self.group_ids)), "n_boot": self.n_boot,
            "interval": interval(self.n_boot), "fit": self.fit, "features": rows,
            "pairs": _pairs(self.pair_ids, self.group_ids, self.margin_a, self.margin_b),
            "settings": self.settings})

    def save(self, out: str | Path, *, overwrite: bool = False, plotlyjs: str = "embed"
             ) -> Path:
        from mechlora.report.sae import write_rank_report

        folder = prepare_out_dir(out, overwrite)
        save_arrays(folder / "arrays.safetensors", {
            "mean": self.mean.astype(np.float64), "active": self.active.astype(np.float64),
            "top": self.top.astype(np.int64), "per_pair": self.per_pair.astype(np.float64),
            "margin_a": self.margin_a.astype(np.float64),
            "margin_b": self.margin_b.astype(np.float64)})
        write_json(folder / FILE, self.summary())
        write_rank_report(self, folder / "report.html", plotlyjs=plotlyjs)
        return folder

    @classmethod
    def load(cls, path: str | Path) -> FeatureRanking:
        folder, doc = _read(path, "rank")
        arrays = load_arrays(folder / "arrays.safetensors")
        return cls(model=doc["model"], layer=doc["layer"], positions=doc["positions"],
                   score=doc["score"], sae=doc["sae"],
                   pair_ids=[p["id"] for p in doc["pairs"]],
                   group_ids=[p["group"] for p in doc["pairs"]], margin_a=arrays["margin_a"],
                   margin_b=arrays["margin_b"], mean=arrays["mean"], top=arrays["top"],
                   per_pair=arrays["per_pair"], active=arrays["active"], fit=doc["fit"],
                   n_boot=doc["n_boot"], settings=doc["settings"])


@dataclass
class FeaturePatchResult:
    """Restoration per pair and patched row (see `patch_features` for the rows)."""

    model: str
    layer: int
    positions: str
    engine: str
    sae: dict[str, Any]
    features: list[int]
    rows: list[str]
    pair_ids: list[str]
    group_ids: list[str]
    restoration: np.ndarray        # [n_pairs, n_rows]
    random_features: np.ndarray    # [n_pairs, n_random, len(features)], -1 = none drawn
    margin_a: np.ndarray
    margin_b: np.ndarray
    excluded: list[dict] = field(default_factory=list)
    n_boot: int = 1000
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)

    def row(self, name: str) -> np.ndarray:
        """Per-pair restoration of one row."""
        if name not in self.rows:
            raise MechloraError(f"no row '{name}'; rows: {', '.join(self.rows)}")
        return self.restoration[:, self.rows.index(name)]

    def mean(self) -> np.ndarray:
        return column_means(self.restoration) if self.n_pairs else np.full(len(self.rows),
                                                                            np.nan)

    def ci(self) -> tuple[np.ndarray, np.ndarray]:
        return stats.bootstrap_ci(np.asarray(self.group_ids), self.restoration,
                                  n_boot=self.n_boot)

    def error_share(self) -> np.ndarray:
        """Per pair r(resid) - r(all_features): the restoration the SAE's error term carries."""
        return self.row("resid") - self.row("all_features")

    def summary(self) -> dict[str, Any]:
        mean, (lo, hi) = self.mean(), self.ci()
        size = len(self.features)
        rows = []
        for i, name in enumerate(self.rows):
            feats: Any = ([int(name[1:])] if name[1:].isdigit() else self.features
                          if name == "set" else "every feature" if name == "all_features"
                          else "the whole residual" if name == "resid"
                          else f"{size} random features whose activation differs in the pair")
            rows.append({"name": name, "features": feats, "mean": mean[i], "ci_low": lo[i],
                         "ci_high": hi[i]})
        err = self.error_share()
        e_lo, e_hi = stats.bootstrap_ci(np.asarray(self.group_ids), err, n_boot=self.n_boot)
        return jsonable({
            "schema_version": SCHEMA_VERSION, "operation": "patch", "model": self.model,
            "layer": self.layer, "site": f"resid@{self.layer}", "positions": self.positions,
            "engine": self.engine, "sae": self.sae, "features": self.features,
            "n_pairs": self.n_pairs, "n_groups": len(set(self.group_ids)),
            "n_excluded": len(self.excluded), "n_boot": self.n_boot,
            "interval": interval(self.n_boot), "rows": rows,
            "error_share": {"definition": "r(resid) - r(all_features)",
                            "mean": float(np.nanmean(err)) if len(err) else None,
                            "ci_low": e_lo, "ci_high": e_hi},
            "pairs": _pairs(self.pair_ids, self.group_ids, self.margin_a, self.margin_b),
            "excluded": self.excluded, "settings": self.settings})

    def save(self, out: str | Path, *, overwrite: bool = False, plotlyjs: str = "embed"
             ) -> Path:
        from mechlora.report.sae import write_patch_report

        folder = prepare_out_dir(out, overwrite)
        save_arrays(folder / "arrays.safetensors", {
            "restoration": self.restoration.astype(np.float64),
            "random_features": self.random_features.astype(np.int64),
            "margin_a": self.margin_a.astype(np.float64),
            "margin_b": self.margin_b.astype(np.float64)})
        write_json(folder / FILE, self.summary())
        write_patch_report(self, folder / "report.html", plotlyjs=plotlyjs)
        return folder

    @classmethod
    def load(cls, path: str | Path) -> FeaturePatchResult:
        folder, doc = _read(path, "patch")
        arrays = load_arrays(folder / "arrays.safetensors")
        return cls(model=doc["model"], layer=doc["layer"], positions=doc["positions"],
                   engine=doc["engine"], sae=doc["sae"], features=doc["features"],
                   rows=[r["name"] for r in doc["rows"]],
                   pair_ids=[p["id"] for p in doc["pairs"]],
                   group_ids=[p["group"] for p in doc["pairs"]],
                   restoration=arrays["restoration"],
                   random_features=arrays["random_features"], margin_a=arrays["margin_a"],
                   margin_b=arrays["margin_b"], excluded=doc["excluded"],
                   n_boot=doc["n_boot"], settings=doc["settings"])


HEADLINE = ("accuracy", "pairwise_flip_rate", "original_flip_rate", "question_flip_rate",
            "margin_diff")


@dataclass
class ClampResult:
    """`mechlora.evaluate` with and without one feature clamped."""

    model: str
    layer: int
    feature: int
    positions: str                   # "last" | "all"
    value: float
    value_spec: str
    sae: dict[str, Any]
    base: dict[str, Any]             # compute_metrics of the unclamped model
    clamped: dict[str, Any]          # compute_metrics with the clamp
    comparison: dict[str, Any]       # metrics.compare(base, clamped): diff = clamped - base
    records: list[dict] = field(default_factory=list)  # predictions.jsonl rows, both arms
    settings: dict[str, Any] = field(default_factory=dict)

    def headline(self) -> dict[str, Any]:
        """Per headline metric: base, clamped, their difference with its interval and test."""
        out = {}
        for key in HEADLINE:
            c = self.comparison.get(key, {})
            out[key] = {"base": self.base[key]["value"], "clamped": self.clamped[key]["value"],
                        "base_ci": self.base[key]["ci"], "clamped_ci": self.clamped[key]["ci"],
                        "diff": c.get("diff"), "diff_ci": c.get("diff_ci"),
                        "p": (c.get("paired_test") or {}).get("p")}
        return out

    def summary(self) -> dict[str, Any]:
        return jsonable({
            "schema_version": SCHEMA_VERSION, "operation": "clamp", "model": self.model,
            "layer": self.layer, "site": f"resid@{self.layer}", "positions": self.positions,
            "feature": self.feature, "value": {"spec": self.value_spec, "value": self.value},
            "sae": self.sae, "headline": self.headline(), "base": self.base,
            "clamped": self.clamped, "comparison": self.comparison, "settings": self.settings})

    def save(self, out: str | Path, *, overwrite: bool = False, plotlyjs: str = "embed"
             ) -> Path:
        from mechlora.report.sae import write_clamp_report

        folder = prepare_out_dir(out, overwrite)
        write_jsonl(folder / "predictions.jsonl", self.records)
        write_json(folder / FILE, self.summary())
        write_clamp_report(self, folder / "report.html", plotlyjs=plotlyjs)
        return folder

    @classmethod
    def load(cls, path: str | Path) -> ClampResult:
        folder, doc = _read(path, "clamp")
        return cls(model=doc["model"], layer=doc["layer"], feature=doc["feature"],
                   positions=doc["positions"], value=doc["value"]["value"],
                   value_spec=doc["value"]["spec"], sae=doc["sae"], base=doc["base"],
                   clamped=doc["clamped"], comparison=doc["comparison"],
                   records=read_jsonl(folder / "predictions.jsonl"), settings=doc["settings"])
