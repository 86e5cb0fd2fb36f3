"""The localize report: restoration curves with CI bands, score bars, per-pair heatmap,
observational divergence."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechlora import stats
from mechlora.report.page import Page
from mechlora.result import LocalizationResult

COLORS = {"resid": "#1f77b4", "attn": "#ff7f0e", "mlp": "#2ca02c"}


def interval_note(lo: np.ndarray) -> str:
    """What a figure's title says about its intervals: they are undefined (all nan) below
    stats.MIN_CLUSTERS question groups, and then none is drawn."""
    if np.isnan(lo).all():
        return f"no interval: fewer than {stats.MIN_CLUSTERS} question groups"
    return "95% cluster bootstrap CI over question groups"


def restoration_figure(result: LocalizationResult) -> go.Figure:
    fig = go.Figure()
    x = np.arange(result.n_layers)
    note = ""
    for c in result.components:
        mean = result.mean(c)
        lo, hi = result.ci(c)
        note = interval_note(lo)
        color = COLORS.get(c, "#444")
        if not np.isnan(lo).all():
            fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]),
                                     y=np.concatenate([hi, lo[::-1]]), fill="toself",
                                     fillcolor=color, opacity=0.2, line=dict(width=0),
                                     hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(x=x, y=mean, mode="lines+markers", name=c,
                                 line=dict(color=color)))
    fig.update_layout(title=f"Restoration r per layer (mean over pairs; {note})",
                      xaxis_title="layer", yaxis_title="restoration r", height=420)
    return fig


def score_figure(result: LocalizationResult, selected: list[int] | None = None) -> go.Figure:
    lo, hi = result.score_ci()
    scores = result.scores
    chosen = set(selected or [])
    fig = go.Figure(go.Bar(
        x=np.arange(result.n_layers), y=scores,
        error_y=dict(type="data", symmetric=False, array=hi - scores, arrayminus=scores - lo),
        marker_color=["#d62728" if i in chosen else "#7f7f7f" for i in range(result.n_layers)]))
    fig.update_layout(title=f"Per-layer score ({result.score_name}; {interval_note(lo)}); "
                            "selected layers in red",
                      xaxis_title="layer", yaxis_title="score", height=380)
    return fig


def heatmap_figure(result: LocalizationResult) -> go.Figure:
    per_pair = result.per_pair_scores()
    labels = [html.escape(p) for p in result.pair_ids]
    fig = go.Figure(go.Heatmap(z=per_pair, x=np.arange(result.n_layers), y=labels,
                               colorscale="RdBu", zmid=0, colorbar=dict(title="score")))
    fig.update_layout(title="Per-pair score", xaxis_title="layer",
                      height=max(300, 18 * len(labels) + 120))
    return fig


def divergence_figure(result: LocalizationResult) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("cosine distance (last position)",
                                                        "logit-lens KL(a || b)"))
    for col, key in enumerate(("cosine", "logit_lens_kl"), start=1):
        values = result.divergence.get(key)
        if values is not None and len(values):
            fig.add_trace(go.Scatter(x=np.arange(result.n_layers), y=values.mean(0),
                                     mode="lines+markers", name=key), row=1, col=col)
    fig.update_layout(height=360, showlegend=False)
    return fig


def attribution_section(page: Page, info: dict) -> None:
    """Attribution-patching estimates next to the exact re-runs of the strongest sites."""
    page.heading("Attribution estimate vs exact patching")
    page.text("The restoration values in this report are first-order estimates "
              "((act_a - act_b) . dm/dact_b, one backward per prompt), not patched runs.",
              note=True)
    if "sites" not in info:
        page.text("No exact check was run (use --verify-top K).")
        return
    page.text(f"The {info['verify_top']} sites with the largest mean |estimate|, re-run with "
              f"exact patching (engine {info['exact_engine']}): Spearman rank correlation "
              f"{_num(info['spearman'])} over site means, {_num(info['spearman_pairs'])} over "
              f"pairs x sites; largest per-pair error {_num(info['max_abs_error'])}.")
    est, exact = np.asarray(info["estimate"], float), np.asarray(info["exact"], float)
    page.table(["site", "estimate (mean r)", "exact (mean r)", "difference"],
               [[s, float(e), float(x), float(e - x)]
                for s, e, x in zip(info["sites"], est, exact)])
    lim = [min(est.min(), exact.min(), 0.0), max(est.max(), exact.max(), 1.0)]
    fig = go.Figure([go.Scatter(x=lim, y=lim, mode="lines", line=dict(dash="dot", color="#999"),
                                showlegend=False),
                     go.Scatter(x=exact, y=est, mode="markers+text", text=info["sites"],
                                textposition="top center", showlegend=False)])
    fig.update_layout(xaxis_title="exact restoration", yaxis_title="attribution estimate",
                      height=380)
    page.figure(fig)


def _num(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.2f}"


def write_localize_report(result: LocalizationResult, path: str | Path,
                          selection=None, plotlyjs: str = "embed", comparison=None) -> Path:
    """The HTML report; `comparison` (a `mechlora.before_after.LocalizationComparison`) adds
    the before/after section."""
    from mechlora.report import interventions as more

    page = Page(f"mechlora localize: {result.model}")
    page.text(f"{result.n_pairs} pairs from {len(set(result.group_ids))} question groups, "
              f"{len(result.excluded)} excluded; positions '{result.positions}', engine "
              f"'{result.engine}', {result.n_layers} layers.")
    if result.gap is not None:
        page.text("Every restoration here is divided by the baseline model's gap m(a) - m(b) "
                  "of the pair (not this model's), so it compares with the baseline's.",
                  note=True)
    if selection is not None:
        page.heading("Selected layers").text(selection.reason)
    if comparison is not None:
        more.comparison_section(page, comparison)
    if result.n_pairs and result.components:
        page.heading("Restoration").figure(restoration_figure(result))
        page.text("r = (m(b<-a) - m(b)) / (m(a) - m(b)): 0 = patching the site does nothing, "
                  "1 = the recipient takes the donor's answer.", note=True)
        page.heading("Where the divergence is written").figure(
            score_figure(result, list(selection.spec.layers) if selection else None))
        page.figure(heatmap_figure(result))
    if result.n_pairs:
        more.specs_section(page, result)
        more.directions_section(page, result)
        more.heads_section(page, result)
        more.positions_section(page, result)
        more.groups_section(page, result)
        page.heading("Observational divergence").figure(divergence_figure(result))
        if "attribution" in result.settings:
            attribution_section(page, result.settings["attribution"])
    if result.excluded:
        page.heading("Excluded pairs").table(
            ["pair", "m(a)", "m(b)", "reason"],
            [[e["id"], e["margin_a"], e["margin_b"], e["reason"]] for e in result.excluded])
    return page.write(path, plotlyjs=plotlyjs)
