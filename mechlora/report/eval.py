"""The evaluation table (printed) and report.html, both read from an eval.json document.

Nothing is recomputed here: every number comes from `mechlora.metrics` via eval.json; the
margin scatter only re-pairs the per-wording margins of predictions.jsonl for plotting.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from mechlora.metrics import QUADRANTS
from mechlora.report.page import Page

NA = "n/a"
NOTE = ("Flip vs original: pairs (original wording, paraphrase) whose answers differ, the paper's "
        "flip rate; flip all pairs: every pair of wordings of a question. Intervals: 95% cluster "
        "bootstrap over questions (wordings of one question are not independent; n/a with fewer "
        "than 5 questions). p: paired sign-flip permutation test over questions, adapter vs "
        "base. See docs/metrics.md.")


def _get(d: dict | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def pct(block: dict | None) -> str:
    """'14.6% [9.9, 21.0]' from a metrics block with value and interval ('[n/a]': undefined)."""
    value = _get(block, "value")
    if value is None:
        return NA
    lo, hi = (_get(block, "ci") or [None, None])[:2]
    if lo is None or hi is None:
        return f"{100 * value:.1f}% [{NA}]"
    return f"{100 * value:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def num(block: dict | None) -> str:
    value = _get(block, "value")
    if value is None:
        return NA
    lo, hi = (_get(block, "ci") or [None, None])[:2]
    if lo is None or hi is None:
        return f"{value:.3g} [{NA}]"
    return f"{value:.3g} [{lo:.3g}, {hi:.3g}]"


def pval(p: float | None) -> str:
    if p is None:
        return NA
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _relation(p: float | None) -> str:
    """'= 0.002' or '< 0.001', to follow a 'p'."""
    return "< 0.001" if p is not None and p < 0.001 else f"= {pval(p)}"


def _p(c: dict | None, key: str) -> str:
    return "-" if c is None else pval(_get(c, key, "paired_test", "p"))


def summary(doc: dict) -> tuple[list[str], list[list[str]]]:
    """The paper-style table: one row per arm; p-values compare each adapter with the base."""
    arms = doc["arms"]
    has = {k: any(_get(a, "metrics", k, "n") for a in arms.values())
           for k in ("text_only_agreement_gray", "text_only_agreement_noimage")}
    header = ["arm", "questions / wordings", "flip vs original [95% CI]",
              "flip all pairs [95% CI]", "accuracy [95% CI]", "margin diff [95% CI]"]
    if has["text_only_agreement_gray"] or not has["text_only_agreement_noimage"]:
        header.append("text-only (gray)")
    if has["text_only_agreement_noimage"]:
        header.append("text-only (no image)")
    header += ["p flip vs original", "p flip all pairs", "p accuracy"]
    rows = []
    for name, arm in arms.items():
        m, c = arm["metrics"], doc["comparisons"].get(name)
        row = [name, f"{m['n_groups']} / {m['n_variants']}", pct(m["original_flip_rate"]),
               pct(m["pairwise_flip_rate"]), pct(m["accuracy"]), num(m["margin_diff"])]
        if "text-only (gray)" in header:
            row.append(pct(m["text_only_agreement_gray"]))
        if has["text_only_agreement_noimage"]:
            row.append(pct(m["text_only_agreement_noimage"]))
        row += [_p(c, "original_flip_rate"), _p(c, "pairwise_flip_rate"), _p(c, "accuracy")]
        rows.append(row)
    return header, rows


def rich_table(doc: dict):
    from rich.markup import escape
    from rich.table import Table

    header, rows = summary(doc)
    table = Table(title=escape(f"{doc['model']}: base vs adapters"), caption=NOTE,
                  caption_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*map(escape, row))  # "[n/a]" and arm names are text, not rich markup
    return table


def render_table(doc: dict, width: int = 240) -> str:
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, highlight=False).print(rich_table(doc))
    return buf.getvalue()


# ---- figures ----------------------------------------------------------------------------------

BAR_METRICS = (("original_flip_rate", "flip vs original"),
               ("pairwise_flip_rate", "flip (all pairs)"),
               ("question_flip_rate", "flip (questions)"), ("accuracy", "accuracy"),
               ("text_only_agreement_gray", "text-only agr. (gray)"),
               ("text_only_agreement_noimage", "text-only agr. (no image)"),
               ("swap_sensitivity", "swap sensitivity"))


def _defined(value: float | None, ci: list | None) -> bool:
    return value is not None and ci is not None and None not in ci[:2]


def _bars_with_intervals(values: list, cis: list) -> dict:
    """Bar arguments: error bars from [lo, hi] intervals, and 'no CI' written on a bar whose
    interval is undefined. Caps are off: plotly draws a cap even for a missing interval,
    which would read as a zero-width one."""
    ok = [_defined(v, ci) for v, ci in zip(values, cis, strict=True)]
    return dict(
        error_y=dict(type="data", symmetric=False, width=0, thickness=2,
                     array=[ci[1] - v if d else 0 for v, ci, d in zip(values, cis, ok)],
                     arrayminus=[v - ci[0] if d else 0 for v, ci, d in zip(values, cis, ok)]),
        text=["" if d or v is None else "no CI" for v, d in zip(values, ok)],
        textposition="outside")


def rate_bars(doc: dict):
    """Grouped bars of every rate per arm with 95% intervals (cluster bootstrap over
    questions; Wilson for the question-level flip rate)."""
    import plotly.graph_objects as go

    arms = doc["arms"]
    shown = [(k, label) for k, label in BAR_METRICS
             if any(_get(a, "metrics", k, "value") is not None for a in arms.values())]
    fig = go.Figure()
    for name, arm in arms.items():
        blocks = [arm["metrics"][k] for k, _ in shown]
        y = [b["value"] for b in blocks]
        fig.add_bar(name=html.escape(name), x=[label for _, label in shown], y=y,
                    **_bars_with_intervals(y, [b.get("ci") for b in blocks]))
    fig.update_layout(barmode="group", yaxis=dict(title="rate", range=[0, 1.05], tickformat=".0%"),
                      height=420, margin=dict(t=30))
    return fig


def margin_bars(doc: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, arm in doc["arms"].items():
        b = arm["metrics"]["margin_diff"]
        fig.add_bar(name=html.escape(name), x=[html.escape(name)], y=[b["value"]],
                    showlegend=False, **_bars_with_intervals([b["value"]], [b.get("ci")]))
    fig.update_layout(yaxis_title="mean |margin difference| over pairs", height=320,
                      margin=dict(t=30))
    return fig


def margin_pairs(records: Sequence[dict], arm: str) -> list[tuple[dict, dict]]:
    """Unordered pairs of wordings of one question (the pairs behind the pairwise flip rate)."""
    by_group: dict[str, list[dict]] = {}
    for r in records:
        if r["arm"] == arm:
            by_group.setdefault(str(r["group_id"]), []).append(r)
    return [pair for recs in by_group.values()
            for pair in combinations(sorted(recs, key=lambda r: r["variant"]), 2)]


def margin_scatter(doc: dict, records: Sequence[dict]):
    """Margin of wording a vs wording b for every pair, one panel per arm, red = answers differ."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    arms = list(doc["arms"])
    ncols = min(len(arms), 3)
    nrows = -(-len(arms) // ncols)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=[html.escape(a) for a in arms])
    for i, arm in enumerate(arms):
        row, col = i // ncols + 1, i % ncols + 1
        pairs = margin_pairs(records, arm)
        for flip, color, label in ((False, "#888", "same answer"), (True, "#d62728", "flip")):
            sel = [(a, b) for a, b in pairs if (a["pred"] != b["pred"]) == flip]
            # Hover text is user text inside plotly's JSON: escaped like the rest of the page.
            text = [html.escape(f"{a['group_id']}: [{a['variant']}] {a['text']} / "
                                f"[{b['variant']}] {b['text']}") for a, b in sel]
            fig.add_trace(go.Scatter(x=[a["margin"] for a, _ in sel],
                                     y=[b["margin"] for _, b in sel], mode="markers",
                                     marker=dict(color=color, size=7, opacity=0.7),
                                     name=label, legendgroup=label, showlegend=i == 0,
                                     text=text, hoverinfo="text+x+y"), row=row, col=col)
        fig.update_xaxes(title_text="margin, wording a", row=row, col=col)
        fig.update_yaxes(title_text="margin, wording b", row=row, col=col)
    fig.update_layout(height=380 * nrows, margin=dict(t=40))
    return fig


def quadrant_bars(doc: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    arms = [html.escape(a) for a in doc["arms"]]
    for q in QUADRANTS:
        counts = [_get(a, "metrics", "image_reliance_quadrants", "counts", q) or 0
                  for a in doc["arms"].values()]
        fig.add_bar(name=q.replace("_", " "), x=arms, y=counts)
    fig.update_layout(barmode="stack", yaxis_title="questions", height=360, margin=dict(t=30))
    return fig


# ---- tables -----------------------------------------------------------------------------------

def comparison_rows(c: dict) -> list[list[object]]:
    rows = []
    for key, label in (("original_flip_rate", "flip vs original"),
                       ("pairwise_flip_rate", "flip (all pairs)"),
                       ("question_flip_rate", "flip (questions)"),
                       ("accuracy", "accuracy"), ("margin_diff", "margin diff"),
                       ("text_only_agreement_gray", "text-only agr. (gray)"),
                       ("text_only_agreement_noimage", "text-only agr. (no image)")):
        b = c.get(key)
        if b is None:
            continue
        test = b["paired_test"]
        rows.append([label, b["n"], b["n_questions"], b["base"], b["adapter"], b["diff"],
                     _interval(b["diff_ci"]), f"{test['test']}: p {_relation(test['p'])}"])
    return rows


def breakdown_rows(doc: dict, key: str) -> list[list[object]]:
    """Per question type or paraphrase phenomenon, per arm."""
    rows = []
    levels = sorted({lv for a in doc["arms"].values() for lv in a["metrics"][key]})
    for level in levels:
        for name, arm in doc["arms"].items():
            m = arm["metrics"][key].get(level)
            if m is None:
                continue
            if key == "by_type":
                rows.append([level, name, m["n_groups"], pct(m["original_flip_rate"]),
                             pct(m["pairwise_flip_rate"]), pct(m["question_flip_rate"]),
                             pct(m["accuracy"]), num(m["margin_diff"])])
            else:
                rows.append([level, name, m["n_pairs"], pct(m["flip_rate"]), pct(m["accuracy"]),
                             num(m["margin_diff"])])
    return rows


def write_report(path: str | Path, doc: dict, records: Sequence[dict], *,
                 plotlyjs: str = "embed") -> Path:
    """report.html: the table, rate bars with intervals, margin scatter, quadrants, breakdowns."""
    data = doc["data"]
    page = Page(f"mechlora eval: {doc['model']}")
    page.text(f"Data: {data.get('path') or '(in memory)'} - {data['n_groups']} questions, "
              f"{data['n_variants']} wordings (sha256 {data['hash'][:12]}).")
    for name, arm in doc["arms"].items():
        page.text(f"{name}: {arm['adapter'] or 'base model, no adapter'}", note=True)
    for note in doc.get("notes", []):
        page.text(f"Note: {note}", note=True)

    page.heading("Base vs adapters")
    header, rows = summary(doc)
    page.table(header, rows).text(NOTE, note=True)
    page.heading("Rates with 95% intervals").figure(rate_bars(doc))
    page.text("Intervals: cluster bootstrap over questions, since the wordings and pairs of one "
              "question are not independent; the question-level flip rate (one item per "
              "question) has a Wilson interval. 'no CI': fewer than 5 questions, too few for "
              "an interval.",
              note=True)
    page.heading("Margin difference (95% cluster-bootstrap interval)").figure(margin_bars(doc))
    for name, c in doc["comparisons"].items():
        page.heading(f"{name} vs base (diff = adapter - base)")
        page.table(["metric", "items", "questions", "base", "adapter", "diff",
                    "diff 95% CI (paired, over questions)", "paired test"], comparison_rows(c))
    if doc["comparisons"]:
        page.text("Tests over wordings or pairs that assume they are independent (pooled "
                  "z-test, McNemar over wordings) are in eval.json under 'unclustered', for "
                  "comparison with published numbers only.", note=True)

    page.heading("Margins of paired wordings")
    page.text("Each point is a pair of wordings of one question: the margin (logit of the "
              "reference answer minus the best other choice) of one against the other. Off the "
              "diagonal the wordings disagree in confidence; red pairs flip the answer.",
              note=True)
    page.figure(margin_scatter(doc, records))

    if any(_get(a, "metrics", "image_reliance_quadrants", "n") for a in doc["arms"].values()):
        page.heading("Image reliance: consistency x reliance on the image")
        page.text("Per question, the original wording: image-reliant when its answer changes "
                  "with a uniform gray image; consistent when no paraphrase flips it. "
                  "Consistent but not image-reliant may mean answering from language priors.",
                  note=True)
        page.figure(quadrant_bars(doc))

    page.heading("Flip detection from one pass: AUROC of the original's confidence gap")
    page.text("Per question, score = -(logit of the original wording's predicted choice minus "
              "the best other choice): does an unsure original answer predict that some "
              "paraphrase flips it? 0.5 = no signal.", note=True)
    page.table(["arm", "AUROC", "95% CI", "flipping questions", "stable questions"],
               [[n, _fmt(a["metrics"]["flip_auroc"]["value"]),
                 _interval(a["metrics"]["flip_auroc"]["ci"]),
                 a["metrics"]["flip_auroc"]["n_pos"],
                 a["metrics"]["flip_auroc"]["n_neg"]] for n, a in doc["arms"].items()])

    by_type = breakdown_rows(doc, "by_type")
    if by_type:
        page.heading("By question type")
        page.table(["type", "arm", "questions", "flip vs original", "flip (all pairs)",
                    "flip (questions)", "accuracy", "margin diff"], by_type)
    by_ph = breakdown_rows(doc, "by_phenomenon")
    if by_ph:
        page.heading("By paraphrase phenomenon (pairs original - paraphrase)")
        page.table(["phenomenon", "arm", "pairs", "flip rate", "accuracy", "margin diff"], by_ph)

    page.heading("Settings")
    page.table(["setting", "value"], [[k, str(v)] for k, v in doc["settings"].items()])
    return page.write(path, plotlyjs=plotlyjs)


def _fmt(value: float | None) -> str:
    return NA if value is None else f"{value:.3g}"


def _interval(ci: Sequence[float | None]) -> str:
    lo, hi = ci[:2]
    return NA if lo is None or hi is None else f"[{lo:.3g}, {hi:.3g}]"
