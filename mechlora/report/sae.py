"""The `mechlora sae` reports: ranked features, feature patches, a clamped evaluation.

Every number comes from the result's own summary (what sae.json holds); user text (pair and
question ids, file paths) goes through the page builder's escaping.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from mechlora.report.eval import num, pct, pval
from mechlora.report.page import Page

INTERVAL_NOTE = ("Intervals: 95% percentile cluster bootstrap over question groups (wordings of "
                 "one question are not independent); n/a with fewer than 5 groups.")


def _sae_line(doc: dict) -> str:
    sae = doc["sae"]
    k = f", k={sae['k']}" if sae.get("k") else ""
    hook = f", its config reads '{sae['hook']}'" if sae.get("hook") else ""
    return (f"SAE {sae['source']} ({sae['layout']} layout, {sae['activation']}{k}, "
            f"{sae['d_sae']} features over {sae['d_model']} dimensions{hook}) attached at "
            f"{doc['site']} (the output of decoder layer {doc['layer']}) of {doc['model']}; "
            f"positions '{doc['positions']}'.")


def _bars(names: list[str], mean, lo, hi, *, title: str, yaxis: str, colors=None) -> go.Figure:
    mean, lo, hi = (np.asarray(v, dtype=float) for v in (mean, lo, hi))
    ok = np.isfinite(lo) & np.isfinite(hi)
    fig = go.Figure(go.Bar(
        x=names, y=mean, marker_color=colors,
        error_y=dict(type="data", symmetric=False, array=np.where(ok, hi - mean, 0),
                     arrayminus=np.where(ok, mean - lo, 0), visible=bool(ok.any()))))
    fig.update_layout(title=title, yaxis_title=yaxis, height=400, xaxis_type="category")
    return fig


def _nan(values) -> list[float]:
    return [np.nan if v is None else v for v in values]


def write_rank_report(ranking, path: str | Path, plotlyjs: str = "embed") -> Path:
    doc = ranking.summary()
    page = Page(f"mechlora sae rank: {doc['model']}")
    page.text(_sae_line(doc))
    kind = ("mean |z_a - z_b|" if doc["score"] == "abs" else
            "mean (z_a - z_b) x sign(m(a) - m(b)): positive = higher in the wording whose "
            "margin is larger")
    page.text(f"{doc['n_pairs']} pairs of wordings from {doc['n_groups']} questions "
              f"({'flip pairs only' if doc['settings'].get('only_flips') else 'all pairs'}); "
              f"score: {kind}.")
    fit = doc["fit"]
    page.text(f"Reconstruction on these prompts: ||e|| / ||x|| = {fit['relative_error']:.3g} on "
              f"average (largest {fit['relative_error_max']:.3g}), {fit['l0']:.1f} active "
              f"features per position, over {fit['n_positions']} positions. A large error "
              "means the SAE does not describe this model's residual stream well (an SAE "
              "trained on another model, or on a base model before tuning).")
    feats = doc["features"]
    if feats:
        names = [f"f{r['id']}" for r in feats]
        page.heading("Top features").figure(_bars(
            names, [r["mean"] for r in feats], _nan(r["ci_low"] for r in feats),
            _nan(r["ci_high"] for r in feats), title="Score of the top features (95% CI)",
            yaxis="score"))
        page.text(INTERVAL_NOTE, note=True)
        page.table(["rank", "feature", "score", "95% CI", "active on (share of wordings)"],
                   [[r["rank"], r["id"], r["mean"], _ci(r["ci_low"], r["ci_high"]),
                     r["active_share"]] for r in feats])
        labels = [html.escape(p) for p in ranking.pair_ids]
        heat = go.Figure(go.Heatmap(z=ranking.per_pair, x=names, y=labels, colorscale="RdBu",
                                    zmid=0, colorbar=dict(title="score")))
        heat.update_layout(title="Per pair", xaxis_type="category",
                           height=max(300, 18 * len(labels) + 120))
        page.heading("Per pair").figure(heat)
    return page.write(path, plotlyjs=plotlyjs)


def _ci(lo, hi) -> str:
    return "n/a" if lo is None or hi is None else f"[{lo:.3g}, {hi:.3g}]"


def write_patch_report(result, path: str | Path, plotlyjs: str = "embed") -> Path:
    doc = result.summary()
    page = Page(f"mechlora sae patch: {doc['model']}")
    page.text(_sae_line(doc))
    page.text(f"{doc['n_pairs']} ordered pairs from {doc['n_groups']} questions, "
              f"{doc['n_excluded']} excluded (|m(a) - m(b)| < {doc['settings']['min_delta']}); "
              f"engine '{doc['engine']}'; features from: {doc['settings']['features_from']}.")
    rows = doc["rows"]
    colors = ["#d62728" if r["name"][1:].isdigit() or r["name"] == "set"
              else "#7f7f7f" if r["name"].startswith("random") else "#1f77b4" for r in rows]
    page.heading("Restoration").figure(_bars(
        [r["name"] for r in rows], _nan(r["mean"] for r in rows),
        _nan(r["ci_low"] for r in rows), _nan(r["ci_high"] for r in rows),
        title="Restoration r when the recipient takes these features from the donor",
        yaxis="restoration r", colors=colors))
    page.text("x' = x_b + sum over F of (z_a[f] - z_b[f]) W_dec[f]: the rest of the residual, "
              "the SAE's error term included, stays the recipient's. r = (m(b<-a) - m(b)) / "
              "(m(a) - m(b)): 0 = nothing of the donor's answer, 1 = all of it. random: as many "
              "features drawn among those that differ in the pair; all_features: the SAE's "
              "whole reconstruction; resid: the whole residual (localize's resid r).", note=True)
    page.text(INTERVAL_NOTE, note=True)
    page.table(["row", "features", "mean r", "95% CI"],
               [[r["name"], _features(r["features"]), r["mean"],
                 _ci(r["ci_low"], r["ci_high"])] for r in rows])
    err = doc["error_share"]
    page.text(f"Error term's share of the restoration, r(resid) - r(all_features): "
              f"{'n/a' if err['mean'] is None else format(err['mean'], '.3g')} "
              f"{_ci(err['ci_low'], err['ci_high'])}.")
    if result.n_pairs:
        labels = [html.escape(p) for p in result.pair_ids]
        heat = go.Figure(go.Heatmap(z=result.restoration, x=result.rows, y=labels,
                                    colorscale="RdBu", zmid=0, zmin=-1.5, zmax=1.5,
                                    colorbar=dict(title="r")))
        heat.update_layout(title="Per pair (colours clipped to [-1.5, 1.5]; hover for values)",
                           xaxis_type="category",
                           height=max(300, 18 * len(labels) + 120))
        page.heading("Per pair").figure(heat)
    if doc["excluded"]:
        page.heading("Excluded pairs").table(
            ["pair", "m(a)", "m(b)", "reason"],
            [[e["id"], e["margin_a"], e["margin_b"], e["reason"]] for e in doc["excluded"]])
    return page.write(path, plotlyjs=plotlyjs)


def _features(value) -> str:
    if isinstance(value, list):
        shown = ", ".join(str(f) for f in value[:12])
        return shown + (f" ... ({len(value)})" if len(value) > 12 else "") or "(none)"
    return str(value)


LABELS = {"accuracy": "accuracy", "pairwise_flip_rate": "flip rate (all pairs)",
          "original_flip_rate": "flip rate (vs original)",
          "question_flip_rate": "questions with a flip", "margin_diff": "margin difference"}


def write_clamp_report(result, path: str | Path, plotlyjs: str = "embed") -> Path:
    doc = result.summary()
    page = Page(f"mechlora sae clamp: {doc['model']}")
    page.text(_sae_line(doc))
    where = "the last position" if doc["positions"] == "last" else "every position"
    page.text(f"Feature {doc['feature']} clamped to {doc['value']['value']:.4g} "
              f"('{doc['value']['spec']}') at {where}: x' = x + (v - z_f(x)) W_dec[f], the "
              "rest of the residual and the error term kept.")
    head = doc["headline"]
    rows = []
    for key, label in LABELS.items():
        h = head[key]
        fmt = num if key == "margin_diff" else pct
        diff = "n/a" if h["diff"] is None else (
            f"{h['diff']:+.3g}" if key == "margin_diff" else f"{100 * h['diff']:+.1f} pts")
        rows.append([label, fmt({"value": h["base"], "ci": h["base_ci"]}),
                     fmt({"value": h["clamped"], "ci": h["clamped_ci"]}), diff, pval(h["p"])])
    for note in doc["settings"].get("notes", []):
        page.text(f"Note: {note}")
    page.heading("Base vs clamped").table(["metric", "base", "clamped", "difference", "p"], rows)
    page.text("p: paired test over questions (sign-flip permutation; exact McNemar over "
              "questions for 'questions with a flip'), clamped vs base. " + INTERVAL_NOTE,
              note=True)
    rates = [k for k in LABELS if k != "margin_diff"]
    fig = go.Figure([go.Bar(name=arm, x=[LABELS[k] for k in rates],
                            y=_nan(head[k][arm] for k in rates)) for arm in ("base", "clamped")])
    fig.update_layout(barmode="group", yaxis_title="rate", height=380,
                      title="Accuracy and flip rates")
    page.figure(fig)
    return page.write(path, plotlyjs=plotlyjs)
