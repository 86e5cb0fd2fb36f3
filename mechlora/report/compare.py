"""report.html of `mechlora compare`, read from compare.json alone (nothing recomputed).

Flip rate vs accuracy per arm (a point per seed, the mean with its seed x question interval),
every selector's per-layer scores above the layers each arm trained, the single-layer curve,
before/after training per arm and seed (with localize_arms), and tables: metrics, paired
tests, parameters and cost per arm.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechlora.report.page import Page

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
SOURCE_COLORS = {"localization": "#d62728", "grad": "#1f77b4", "snr": "#2ca02c", "bi": "#9467bd"}
HEADLINE = (("original_flip_rate", "flip vs original"), ("pairwise_flip_rate", "flip all pairs"),
            ("accuracy", "accuracy"), ("margin_diff", "margin diff"),
            ("text_only_agreement_gray", "text-only (gray)"),
            ("text_only_agreement_noimage", "text-only (no image)"),
            ("swap_sensitivity", "swap sensitivity"))
RATES = {m for m, _ in HEADLINE} - {"margin_diff"}


def write_report(path: str | Path, doc: dict[str, Any], *, plotlyjs: str = "embed") -> Path:
    page = Page(f"mechlora compare: {doc['model']}")
    arms = doc["arms"]
    main = [name for name, a in arms.items() if not a["single"]]
    b = doc["budget"]
    page.text(f"{len(arms)} arms x {len(doc['seeds'])} seeds ({', '.join(map(str, doc['seeds']))}"
              f"), trained on {doc['data']['train']['n_groups']} question groups and evaluated "
              f"on {doc['data']['eval']['n_groups']} held-out questions "
              f"({doc['data']['eval']['n_variants']} wordings). Every arm: {b['steps']} steps "
              f"of {b['pairs_per_step']} pairs, the same {b['same_for_every_arm']}"
              + ("." if b["equal"] else "; WARNING: the arms did not all run the same steps."))
    for note in doc["notes"]:
        page.text(note, note=True)
    if main:
        page.heading("Flip rate vs accuracy")
        page.figure(front_figure(doc, main))
        page.heading("Metrics per arm (mean over seeds [95% interval over seeds and questions])")
        page.table(*metrics_table(doc, main))
    page.heading("Paired tests against the base model (arm minus base)")
    page.table(*tests_table(doc, "vs_base", main or list(arms)))
    if doc["reference"] is not None:
        page.heading(f"Paired tests against the reference arm (arm minus {doc['reference']})")
        page.table(*tests_table(doc, "vs_reference", [a for a in main if a != doc["reference"]]))
    page.text(f"Intervals: {doc['statistics']['interval']}. Tests: "
              f"{doc['statistics']['paired']}. p = n/a: fewer than 5 questions; sign-flip "
              f"p = n/a: fewer than {doc['statistics']['min_sign_flip_seeds']} seeds.", note=True)
    if doc.get("before_after"):
        before_after_section(page, doc)
    if doc["scores"]:
        page.heading("Per-layer scores and the layers each arm trained")
        page.figure(scores_figure(doc, main))
        page.table(*scores_table(doc))
    for single in doc["single"]:
        what = "layer" if single["width"] == 1 else f"width-{single['width']} window"
        page.heading(f"One adapter per {what}: does a score predict where fine-tuning helps?")
        page.figure(single_figure(single))
        page.table(*spearman_table(single))
        page.text(f"Reduction: base minus adapter {_metric_name(single['metric'])}, pooled over "
                  "seeds and questions. A window's score is the sum of its layers' scores. "
                  f"Spearman interval: {single['resampled']}.", note=True)
    page.heading("Trainable parameters and cost per arm")
    page.table(*cost_table(doc))
    page.text("Train seconds: the optimizer steps (metrics.jsonl), mean over seeds; eval seconds: "
              "answering every held-out wording in every image condition. Score costs are "
              "above, paid once for all arms.", note=True)
    return page.write(path, plotlyjs=plotlyjs)


# ---- figures ----------------------------------------------------------------------------------

def front_figure(doc: dict, names: list[str]) -> go.Figure:
    fig = go.Figure()
    base = doc["base"]["metrics"]
    _mean_point(fig, "base", base.get("accuracy"), base.get("original_flip_rate"), "#000000",
                "star")
    for i, name in enumerate(names):
        m = doc["arms"][name]["metrics"]
        color, label = PALETTE[i % len(PALETTE)], html.escape(name)
        acc, flip = m.get("accuracy"), m.get("original_flip_rate")
        if acc and flip:
            fig.add_trace(go.Scatter(
                x=acc["per_seed"], y=flip["per_seed"], mode="markers", legendgroup=label,
                showlegend=False, marker=dict(color=color, size=7, opacity=0.45),
                text=[f"{label} seed {s}" for s in doc["seeds"]], hoverinfo="text+x+y"))
        _mean_point(fig, label, acc, flip, color, "circle")
    fig.update_layout(title="Flip rate (original vs paraphrase) vs accuracy: small points are "
                            "seeds, large ones the mean with its 95% interval",
                      xaxis_title="accuracy", yaxis_title="flip rate", height=520,
                      xaxis_tickformat=".0%", yaxis_tickformat=".0%")
    return fig


def _mean_point(fig, label, acc, flip, color, symbol) -> None:
    if not acc or not flip:
        return

    def bars(m):
        lo, hi = m["ci"]
        if lo is None or hi is None:
            return None
        return dict(type="data", symmetric=False, array=[hi - m["mean"]],
                    arrayminus=[m["mean"] - lo], color=color)

    fig.add_trace(go.Scatter(x=[acc["mean"]], y=[flip["mean"]], mode="markers", name=label,
                             legendgroup=label, error_x=bars(acc), error_y=bars(flip),
                             marker=dict(color=color, size=13, symbol=symbol)))


def scores_figure(doc: dict, names: list[str]) -> go.Figure:
    n = doc["n_layers"]
    rows = 2 if names else 1
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        row_heights=[0.55, 0.45] if names else [1.0])
    for source, s in doc["scores"].items():
        values = np.asarray([np.nan if v is None else v for v in s["values"]], dtype=float)
        top = np.nanmax(np.abs(values)) if np.isfinite(values).any() else 0
        fig.add_trace(go.Scatter(x=list(range(n)), y=values / top if top else values,
                                 mode="lines+markers", name=source,
                                 line=dict(color=SOURCE_COLORS.get(source)),
                                 customdata=values, hovertemplate=f"{source} layer %{{x}}: "
                                 "%{customdata:.4g}<extra></extra>"), row=1, col=1)
    fig.update_yaxes(title_text="score / max |score|", row=1, col=1)
    if names:
        z, hover = [], []
        for name in names:
            share, text = _trained(doc, name, n)
            z.append(share)
            hover.append(text)
        fig.add_trace(go.Heatmap(z=z, x=list(range(n)), y=[html.escape(a) for a in names],
                                 colorscale=[[0, "#f7f7f7"], [1, "#08519c"]], zmin=0, zmax=1,
                                 showscale=False, text=hover, hoverinfo="text"), row=2, col=1)
        fig.update_yaxes(autorange="reversed", row=2, col=1)
    fig.update_xaxes(title_text="layer", dtick=1 if n <= 40 else None, row=rows, col=1)
    fig.update_layout(title="Per-layer scores (each divided by its largest magnitude); below, "
                            "the layers each arm trained (shade: share of seeds)",
                      height=420 + 26 * len(names))
    return fig


def _trained(doc: dict, name: str, n: int) -> tuple[list[float], list[str]]:
    """Share of seeds training each layer, and hover text with the ranks."""
    seeds = doc["arms"][name]["seeds"]
    share, ranks = np.zeros(n), [[] for _ in range(n)]
    for run in seeds.values():
        for layer in run["layers"]:
            share[layer] += 1 / len(seeds)
            ranks[layer].append(str((run["ranks"] or {}).get(str(layer), doc["config"]["r"])))
    text = [f"{html.escape(name)} layer {i}: {share[i]:.0%} of seeds"
            + (f", r={'/'.join(sorted(set(ranks[i])))}" if ranks[i] else "") for i in range(n)]
    return share.tolist(), text


def single_figure(single: dict) -> go.Figure:
    rows = single["windows"]
    x = [r["arm"] for r in rows]
    y = np.asarray([np.nan if r["reduction"] is None else r["reduction"] for r in rows])
    lo = np.asarray([np.nan if r["ci"][0] is None else r["ci"][0] for r in rows])
    hi = np.asarray([np.nan if r["ci"][1] is None else r["ci"][1] for r in rows])
    fig = go.Figure(go.Scatter(x=x, y=y, mode="lines+markers", name="flip reduction",
                               error_y=dict(type="data", symmetric=False, array=hi - y,
                                            arrayminus=y - lo)))
    fig.add_hline(y=0, line=dict(color="#999", dash="dot"))
    fig.update_layout(title=f"Flip reduction of one adapter per window (base minus adapter, "
                            f"{_metric_name(single['metric'])}; 95% interval over seeds and "
                            "questions)", xaxis_title="layers trained",
                      yaxis_title="flip reduction", yaxis_tickformat=".0%", height=420,
                      xaxis_type="category")
    return fig


def before_after_section(page: Page, doc: dict) -> None:
    ba = doc["before_after"]
    base = ba["base"]
    page.heading("Before and after training: where each adapter shrank the divergence")
    page.text(f"The base model localized on {base['n_pairs']} training pairs of "
              f"{base['n_groups']} questions (positions {base['positions']}; {base['file']}), "
              "and every adapter on the same pairs, each effect divided by the base model's gap "
              "m(a) - m(b): the share of the base divergence left, and the layers whose "
              "per-layer score dropped (interval above 0 and a mean drop above 1% of the gap; "
              "without intervals, fewer than 5 questions, a mean drop above 10%). These are the "
              "pairs the adapters were trained to fix, not held-out ones.", note=True)
    if ba.get("note"):
        page.text(ba["note"], note=True)
        return
    page.figure(before_after_figure(doc))
    page.table(*before_after_table(doc))


def before_after_figure(doc: dict) -> go.Figure:
    def values(v: list) -> np.ndarray:
        return np.asarray([np.nan if x is None else x for x in v], dtype=float)

    n = doc["n_layers"]
    fig = go.Figure(go.Scatter(x=list(range(n)), y=values(doc["before_after"]["base"]["score"]),
                               mode="lines+markers", name="base",
                               line=dict(color="#000000", width=3)))
    for i, (name, arm) in enumerate(doc["arms"].items()):
        runs = [r["before_after"] for r in arm["seeds"].values() if r.get("before_after")]
        if runs:
            with np.errstate(invalid="ignore"):
                mean = np.nanmean([values(r["score"]) for r in runs], axis=0)
            fig.add_trace(go.Scatter(x=list(range(n)), y=mean, mode="lines+markers",
                                     name=html.escape(name),
                                     line=dict(color=PALETTE[i % len(PALETTE)])))
    fig.add_hline(y=0, line=dict(color="#999", dash="dot"))
    fig.update_layout(title="Per-layer score in units of the base gap: the base, and each "
                            "adapted model (mean over seeds)", xaxis_title="layer",
                      yaxis_title="score (base units)", height=420,
                      xaxis_dtick=1 if n <= 40 else None)
    return fig


def before_after_table(doc: dict) -> tuple[list[str], list[list[str]]]:
    def layers(v: list | None) -> str:
        return "none" if not v else ", ".join(map(str, v))

    rows = []
    for name, arm in doc["arms"].items():
        for seed, run in arm["seeds"].items():
            entry = run.get("before_after")
            if not entry:
                continue
            left = entry["remaining"]
            rows.append([name, seed, layers(entry["trained_layers"]),
                         _fmt({"mean": left["mean"], "ci": [left["ci_low"], left["ci_high"]]},
                              "mean", True),
                         layers(entry["shrank_at"]), entry["verdict"]])
    return ["arm", "seed", "trained layers", "divergence left [95% CI]", "shrank at",
            "verdict"], rows


# ---- tables -----------------------------------------------------------------------------------

def _fmt(block: dict | None, key: str, rate: bool, signed: bool = False) -> str:
    if not block or block.get(key) is None:
        return "n/a"
    value, (lo, hi) = block[key], block["ci"]
    f = (lambda v: f"{100 * v:{'+' if signed else ''}.1f}%") if rate else \
        (lambda v: f"{v:{'+' if signed else ''}.3g}")
    return f"{f(value)} [{f(lo)}, {f(hi)}]" if lo is not None and hi is not None else \
        f"{f(value)} [n/a]"


def _p(p: float | None) -> str:
    return "n/a" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _present(doc: dict, names: list[str]) -> list[tuple[str, str]]:
    blocks = [doc["base"]["metrics"], *(doc["arms"][n]["metrics"] for n in names)]
    return [(m, label) for m, label in HEADLINE if any(m in b for b in blocks)]


def metrics_table(doc: dict, names: list[str]) -> tuple[list[str], list[list[str]]]:
    cols = _present(doc, names)
    header = ["arm", "layers", *(label for _, label in cols)]
    rows = [["base", "none", *(_fmt(doc["base"]["metrics"].get(m), "mean", m in RATES)
                               for m, _ in cols)]]
    for name in names:
        a = doc["arms"][name]
        rows.append([name, _layers(a), *(_fmt(a["metrics"].get(m), "mean", m in RATES)
                                         for m, _ in cols)])
    return header, rows


def tests_table(doc: dict, key: str, names: list[str]) -> tuple[list[str], list[list[str]]]:
    cols = [(m, label) for m, label in _present(doc, names) if m != "pairwise_flip_rate"]
    header = ["arm", *(f"{label}: diff [95% CI]" for _, label in cols),
              *(f"p ({label})" for _, label in cols[:1]), "seeds"]
    rows = []
    for name in names:
        tests = doc["arms"][name][key] or {}
        first = tests.get(cols[0][0]) if cols else None
        sign = first.get("sign_flip_p") if first else None
        p = _p(first.get("p")) if first else "n/a"
        if sign is not None:
            p += f" (sign-flip {_p(sign)})"
        rows.append([name, *(_fmt(tests.get(m), "diff", m in RATES, signed=True)
                             for m, _ in cols), p,
                     str(first["n_seeds"]) if first else "n/a"])
    return header, rows


def scores_table(doc: dict) -> tuple[list[str], list[list[str]]]:
    rows = []
    for source, s in doc["scores"].items():
        values = [v for v in s["values"] if v is not None]
        peak = int(np.argmax(values)) if values else None
        cost = s.get("cost") or {}
        rows.append([source, s["about"], peak, cost.get("seconds"), cost.get("forwards"),
                     cost.get("backwards"), s["file"]])
    return ["scores", "what", "peak layer", "seconds", "forwards", "backwards", "file"], rows


def spearman_table(single: dict) -> tuple[list[str], list[list[str]]]:
    rows = []
    for source, r in single["spearman"].items():
        rho, (lo, hi) = r["rho"], r["ci"]
        rows.append([source, "n/a" if rho is None else f"{rho:+.2f}",
                     "n/a" if lo is None else f"[{lo:+.2f}, {hi:+.2f}]",
                     len(r["window_scores"])])
    return ["scores", "Spearman rho (score vs flip reduction)", "95% interval", "windows"], rows


def cost_table(doc: dict) -> tuple[list[str], list[list[str]]]:
    rows = []
    for name, a in doc["arms"].items():
        runs = list(a["seeds"].values())
        params = sorted({r["trainable_parameters"] for r in runs})
        match = next((r["match"] for r in runs if r.get("match")), None)
        rows.append([name, _layers(a), " / ".join(f"{p:,}" for p in params),
                     f"matched to {match['reference']}" if match else f"r={doc['config']['r']}",
                     float(np.mean([r["train_seconds"] for r in runs])),
                     float(np.mean([r["eval_seconds"] for r in runs]))])
    return ["arm", "layers", "trainable parameters", "ranks", "train s", "eval s"], rows


def _layers(arm: dict) -> str:
    specs = {s: r["spec"] for s, r in arm["seeds"].items()}
    if len(set(specs.values())) == 1:
        return next(iter(specs.values()))
    return "; ".join(f"seed {s}: {spec}" for s, spec in specs.items())


def _metric_name(metric: str) -> str:
    return dict(HEADLINE).get(metric, metric)
