"""Report sections for what a localization adds to the per-layer sweep: the two patching
directions, layer-spec tests, heads, positions, groups, and a before/after comparison.

Each `*_section(page, ...)` appends headings, text, tables and figures to a `Page`;
`comparison_section` is what `mechlora compare` attaches per arm.
"""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechlora.breakdown import direction_notes, rule_of, selection_of
from mechlora.effects import DIRECTIONS, WHICH
from mechlora.report.page import Page

DIRECTION_COLORS = {"original>paraphrase": "#1f77b4", "paraphrase>original": "#d62728",
                    "paraphrase>paraphrase": "#7f7f7f"}
DIRECTION_NAMES = {"original>paraphrase": "original into paraphrase (denoising)",
                   "paraphrase>original": "paraphrase into original (noising)",
                   "paraphrase>paraphrase": "between paraphrases"}


def _band(fig, x, mean, lo, hi, color, name, row=None, col=None, dash=None, legend=True):
    where = {} if row is None else {"row": row, "col": col}
    if np.isfinite(lo).any():
        fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([hi, lo[::-1]]),
                                 fill="toself", fillcolor=color, opacity=0.15, line=dict(width=0),
                                 hoverinfo="skip", showlegend=False), **where)
    fig.add_trace(go.Scatter(x=x, y=mean, mode="lines+markers", name=name, legendgroup=name,
                             showlegend=legend, line=dict(color=color, dash=dash)), **where)


def directions_section(page: Page, result) -> None:
    parts = {d: p for d in DIRECTIONS if (p := result.where(direction=d)).n_pairs}
    if len(parts) < 2 or not result.components:
        return
    page.heading("Directions: denoising and noising")
    page.text("Pair (a, b) patches a into b. original>paraphrase writes the original question's "
              "activations into a paraphrase's run (denoising: is the site sufficient to carry "
              "the original's answer?); paraphrase>original writes a paraphrase's into the "
              "original's run (noising: does the original's answer need the site?).", note=True)
    comps = list(result.components)
    fig = make_subplots(rows=1, cols=len(comps), subplot_titles=comps, shared_yaxes=True)
    x = np.arange(result.n_layers)
    for i, c in enumerate(comps, start=1):
        for d, part in parts.items():
            lo, hi = part.ci(c)
            _band(fig, x, part.mean(c), lo, hi, DIRECTION_COLORS[d],
                  f"{DIRECTION_NAMES[d]} ({part.n_pairs} pairs)", 1, i, legend=i == 1)
    fig.update_layout(height=380, legend=dict(orientation="h", y=-0.25),
                      title="Restoration per direction (mean, 95% bootstrap CI)")
    page.figure(fig)
    notes = direction_notes(result)
    page.text("The directions disagree: " + "; ".join(notes) if notes and "fewer" not in notes[0]
              else (notes[0] if notes else "The directions agree: no layer where their 95% "
                    "intervals separate, and the same selection."))


def specs_section(page: Page, result) -> None:
    if not result.specs:
        return
    page.heading("Does the spec carry the divergence?")
    page.text("Every attn and mlp output of the spec's layers patched at once. Sufficiency "
              "(denoising): (m(b<-a@S) - m(b)) / (m(a) - m(b)). Necessity (noising): "
              "(m(a) - m(a<-b@S)) / (m(a) - m(b)); over both directions of every pair it "
              "equals the sufficiency. Necessity (complement): 1 - (m(b<-a@~S) - m(b)) / "
              "(m(a) - m(b)), every attn and mlp output outside S denoised at once: 1 = the "
              "rest of the model cannot carry the answer without S (1 by definition for all "
              "layers). 1 = the spec carries the whole divergence.", note=True)
    rows = []
    for e in result.specs:
        for d in (None, *DIRECTIONS):
            part = e.where(d)
            if not part.n_pairs or (d is not None and part.n_pairs == e.n_pairs):
                continue
            covered = "" if d is not None or e.covered is None else f"{e.covered:.0%}"
            rows.append([e.spec if d is None else "", e.label if d is None else d, covered,
                         part.n_pairs, *(_ci(part.stat(w)) for w in WHICH)])
    page.table(["spec", "tested as / direction", "score covered", "pairs", "sufficiency",
                "necessity (noising S)", "necessity (complement)"], rows)


def _ci(stat: dict | None) -> str:
    if stat is None:
        return "not measured"
    mean, lo, hi = (0.0 if abs(float(stat[k])) < 0.005 else float(stat[k])  # never -0.00
                    for k in ("mean", "ci_low", "ci_high"))
    return f"{mean:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) else "")


def heads_section(page: Page, result) -> None:
    if result.heads is None or not result.n_pairs:
        return
    page.heading("Attention heads")
    mean = np.nanmean(result.heads, axis=0)  # [L, H]
    fig = go.Figure(go.Heatmap(z=mean.T, x=np.arange(result.n_layers),
                               y=[f"head {h}" for h in range(mean.shape[1])], colorscale="RdBu",
                               zmid=0, colorbar=dict(title="r")))
    fig.update_layout(title="Restoration of one head at a time (input of o_proj, mean over "
                      "pairs)", xaxis_title="layer", height=max(300, 26 * mean.shape[1] + 160),
                      yaxis_autorange="reversed")
    page.figure(fig)
    flat = np.nan_to_num(mean)
    top = [(i, h) for i, h in zip(*np.unravel_index(np.argsort(-np.abs(flat), axis=None),
                                                      flat.shape)) if abs(flat[i, h]) >= 0.01][:5]
    page.text("Strongest heads: " + (", ".join(f"layer {i} head {h} (r = {mean[i, h]:.2f})"
                                               for i, h in top) or "none reaches |r| = 0.01"))


def positions_section(page: Page, result) -> None:
    if not result.by_position or not result.n_pairs:
        return
    page.heading("Positions")
    page.text("Each aligned position patched alone (label: offset from the end, token).",
              note=True)
    labels = [html.escape(label) for label in result.position_labels]
    for c, values in result.by_position.items():
        mean = np.nanmean(values, axis=0)  # [L, P]
        fig = go.Figure(go.Heatmap(z=mean.T, x=np.arange(result.n_layers), y=labels,
                                   colorscale="RdBu", zmid=0, colorbar=dict(title="r")))
        fig.update_layout(title=f"{c}: restoration of one position at a time",
                          xaxis_title="layer", height=max(300, 24 * len(labels) + 160),
                          yaxis_autorange="reversed")
        page.figure(fig)


def groups_section(page: Page, result) -> None:
    key = result.settings.get("by")
    if not key or not result.n_pairs or not result.components:
        return
    parts = result.by(key)
    page.heading(f"Per {key}")
    names = [html.escape(str(v)) for v in parts]
    z = np.stack([p.scores for p in parts.values()])
    fig = go.Figure(go.Heatmap(z=z, x=np.arange(result.n_layers), y=names, colorscale="RdBu",
                               zmid=0, colorbar=dict(title="score")))
    fig.update_layout(title=f"Per-layer score ({result.score_name}) per {key}",
                      xaxis_title="layer", height=max(300, 30 * len(names) + 160))
    page.figure(fig)
    rule = rule_of(result)
    page.table([key, "pairs", "questions", f"selection ({rule})", "score covered"],
               [[v, p.n_pairs, len(set(p.group_ids)), (s := selection_of(p, rule))["spec"]
                 or s["reason"], s["covered"]] for v, p in parts.items()])


def comparison_section(page: Page, comparison) -> None:
    """Base and adapted curves overlaid per component, in units of the base gap, with the
    trained layers shaded and the layers whose score dropped named."""
    page.heading("Before and after training")
    page.text(comparison.verdict())
    page.text("Both curves divide by the base model's gap m(a) - m(b) of each pair: the adapted "
              "curve is the share of the base divergence a site still carries.", note=True)
    comps = comparison.components
    fig = make_subplots(rows=1, cols=len(comps) + 1, subplot_titles=[*comps, "score drop"])
    x = np.arange(comparison.base.n_layers)
    for i, c in enumerate(comps, start=1):
        for res, color, name in ((comparison.base, "#1f77b4", "base"),
                                 (comparison.adapted, "#d62728", "adapted")):
            lo, hi = res.ci(c)
            _band(fig, x, res.mean(c), lo, hi, color, name, 1, i, legend=i == 1)
    drop = comparison.score_shrink()
    fig.add_trace(go.Bar(x=x, y=drop["mean"], marker_color="#2ca02c", name="score drop",
                         error_y=dict(type="data", symmetric=False,
                                      array=np.nan_to_num(drop["ci_high"] - drop["mean"]),
                                      arrayminus=np.nan_to_num(drop["mean"] - drop["ci_low"]))),
                  row=1, col=len(comps) + 1)
    for layer in comparison.trained_layers or ():
        for col in range(1, len(comps) + 2):
            fig.add_vrect(x0=layer - 0.5, x1=layer + 0.5, fillcolor="#ffdd57", opacity=0.25,
                          line_width=0, row=1, col=col)
    fig.update_layout(height=400, legend=dict(orientation="h", y=-0.2),
                      title="Restoration before and after (trained layers shaded)")
    page.figure(fig)
