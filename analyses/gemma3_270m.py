"""Where does the real Gemma 3 270M commit to its yes/no answer, and do paraphrases move it?

    python analyses/gemma3_270m.py [--out runs/analyses/gemma3_270m] [--groups N]
                                   [--max-pairs-per-group K] [--threads T] [--overwrite]

Uses mechlora's public API only, as a user would:

1. `mechlora.evaluate.evaluate`: the base model answers every wording of every question
   (accuracy, how often a paraphrase changes the answer) -> OUT/eval/.
2. `mechlora.localize`: resid / attn / mlp restoration at the last prompt position for the
   paraphrase pairs -> OUT/localization.json, OUT/arrays.safetensors, OUT/report.html.
3. The same result restricted, after the fact, to pairs whose margins differ by at least
   --robust-delta logits (r = (m(b<-a) - m(b)) / (m(a) - m(b)) explodes when the two margins
   are almost equal) -> OUT/robust/ (localization.json, report.html).
4. `mechlora.select.select_layers(scores, --rule)` on both: the layers a LoRA would target.
5. OUT/restoration.html (plotly: restoration curves, all pairs and robust subset),
   OUT/results.md (tables and headline numbers) and OUT/summary.json (the same numbers).

`--reuse` re-renders 3-5 from a finished OUT without loading the model.
Data: analyses/data/yesno_general.jsonl (120 text-only yes/no groups, 3 paraphrases each).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from plotly.subplots import make_subplots

import mechlora
from mechlora.errors import MechloraError
from mechlora.evaluate import EvalResult, evaluate
from mechlora.report.localize import restoration_figure, write_localize_report
from mechlora.select import select_layers

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "yesno_general.jsonl"
MODEL = "gemma3-270m"
SENSITIVITY = (0.1, 0.25, 0.5, 1.0)  # post-hoc |m(a) - m(b)| thresholds, in logits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/analyses/gemma3_270m", help="output folder")
    p.add_argument("--data", default=str(DATA), help="question groups (JSONL/CSV)")
    p.add_argument("--groups", type=int, default=None,
                   help="use the first N question groups (default: all)")
    p.add_argument("--max-pairs-per-group", type=int, default=1,
                   help="ordered paraphrase pairs localized per group (seeded subset; default 1)")
    p.add_argument("--min-delta", type=float, default=1e-3,
                   help="localize: exclude pairs with |m(a) - m(b)| below this (default 1e-3)")
    p.add_argument("--robust-delta", type=float, default=0.5,
                   help="the robust view keeps pairs with |m(a) - m(b)| >= this many logits "
                        "(default 0.5)")
    p.add_argument("--rule", default="window:3", help="layer-selection rule (docs/select.md)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on the shared 2-core machine one thread "
                        "ran about 3.5x faster than two)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-group pair subset")
    p.add_argument("--plotlyjs", choices=("embed", "cdn"), default="embed",
                   help="embed plotly.js in the HTML files (offline) or link the CDN")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--reuse", action="store_true",
                   help="do not run the model: re-render the tables and figures from --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


# ---- numbers ---------------------------------------------------------------------------------

def crossing(r: np.ndarray, level: float = 0.5) -> dict:
    """Where a restoration curve crosses `level`.

    first: first layer with r >= level; stays: first layer from which r stays >= level up to
    the last layer; interpolated: the fractional layer, linear between layers stays-1 and
    stays, where the curve passes `level` for the last time (None if it is above from 0).
    """
    r = np.asarray(r, dtype=float)
    above = r >= level
    first = int(np.argmax(above)) if above.any() else None
    stays = None
    for layer in range(len(r) - 1, -1, -1):
        if not above[layer]:
            break
        stays = layer
    interp = None
    if stays is not None and stays > 0:
        lo, hi = float(r[stays - 1]), float(r[stays])
        interp = stays - 1 + (level - lo) / (hi - lo)
    return {"level": level, "first": first, "stays": stays, "interpolated": interp}


def subset(result, min_abs_delta: float):
    """The pairs of `result` whose donor and recipient margins differ by >= min_abs_delta."""
    delta = np.abs(result.margin_a - result.margin_b)
    keep = np.flatnonzero(delta >= min_abs_delta)
    dropped = [{"id": result.pair_ids[i], "margin_a": float(result.margin_a[i]),
                "margin_b": float(result.margin_b[i]),
                "reason": f"|m(a) - m(b)| < {min_abs_delta} (post hoc)"}
               for i in np.flatnonzero(delta < min_abs_delta)]
    return dataclasses.replace(
        result,
        pair_ids=[result.pair_ids[i] for i in keep],
        group_ids=[result.group_ids[i] for i in keep],
        restoration={c: v[keep] for c, v in result.restoration.items()},
        margin_a=result.margin_a[keep], margin_b=result.margin_b[keep],
        divergence={k: v[keep] for k, v in result.divergence.items()},
        excluded=list(result.excluded) + dropped,
        settings={**result.settings, "post_hoc_min_abs_delta": min_abs_delta})


def select(result, rule: str) -> dict:
    try:
        s = select_layers(result.scores, rule)
    except MechloraError as e:  # e.g. no positive score
        return {"rule": rule, "layers": [], "spec": None, "covered": None, "reason": str(e)}
    return {"rule": s.rule, "layers": list(s.spec.layers), "spec": str(s.spec),
            "covered": s.covered, "reason": s.reason, "selection": s}


def median_resid(result) -> np.ndarray:
    r = result.restoration["resid"]
    return np.median(r, axis=0) if len(r) else np.full(result.n_layers, np.nan)


def view(result, rule: str) -> dict:
    """Per-layer table, crossings and selection of one set of pairs."""
    cis = {c: result.ci(c) for c in result.components}
    slo, shi = result.score_ci()
    med = median_resid(result)
    rows = []
    for layer in range(result.n_layers):
        row = {"layer": layer, "resid_median": float(med[layer]),
               "score": (float(result.scores[layer]), float(slo[layer]), float(shi[layer]))}
        for c in result.components:
            row[c] = (float(result.mean(c)[layer]), float(cis[c][0][layer]),
                      float(cis[c][1][layer]))
        rows.append(row)
    sel = select(result, rule)
    flipping = [bool(np.sign(a) != np.sign(b)) for a, b in zip(result.margin_a, result.margin_b)]
    return {
        "n_pairs": result.n_pairs, "n_groups": len(set(result.group_ids)),
        "n_excluded": len(result.excluded),
        "pairs_flipping": _rate(flipping),
        "median_abs_delta": (float(np.median(np.abs(result.margin_a - result.margin_b)))
                             if result.n_pairs else None),
        "crossing_mean": crossing(result.mean("resid")),
        "crossing_median": crossing(med),
        "score_peak": int(np.nanargmax(result.scores)) if result.n_pairs else None,
        "selection": {k: v for k, v in sel.items() if k != "selection"},
        "per_layer": rows,
        "_selection": sel.get("selection"),
    }


def sensitivity(result, thresholds: list[float], rule: str) -> list[dict]:
    rows = []
    for t in thresholds:
        sub = subset(result, t)
        sel = select(sub, rule)
        rows.append({"min_abs_delta": t, "n_pairs": sub.n_pairs,
                     "n_groups": len(set(sub.group_ids)),
                     "crossing_mean": crossing(sub.mean("resid")),
                     "crossing_median": crossing(median_resid(sub)),
                     "max_abs_resid_mean": float(np.nanmax(np.abs(sub.mean("resid"))))
                     if sub.n_pairs else None,
                     "selection": sel["spec"],
                     "score_peak": int(np.nanargmax(sub.scores)) if sub.n_pairs else None})
    return rows


def behaviour(ev: EvalResult, answers: dict[str, str]) -> dict:
    """Accuracy, yes-bias and paraphrase flips of the base model, from evaluate()'s output."""
    preds = ev.predictions["base"]
    by_group: dict[str, dict[int, object]] = {}
    for p in preds:
        by_group.setdefault(p.group_id, {})[p.variant] = p
    originals = [v[0] for v in by_group.values()]
    yes = 0  # index of "yes" in the default choices ("yes", "no")
    phen: dict[str, dict] = {}
    for ph in sorted({p.phenomenon for p in preds if p.phenomenon}):
        rows = [p for p in preds if p.phenomenon == ph]
        phen[ph] = {
            "says_yes": _rate([p.pred == yes for p in rows]),
            "accuracy": _rate([p.pred == p.answer for p in rows]),
            "flip_vs_original": _rate([p.pred != by_group[p.group_id][0].pred for p in rows]),
            "margin_diff": float(np.mean([abs(p.margin - by_group[p.group_id][0].margin)
                                          for p in rows])),
        }
    m = ev.metrics["base"]
    return {
        "n_groups": len(by_group),
        "n_variants": len(preds),
        "gold_yes": sum(answers[g] == "yes" for g in by_group),
        "accuracy_originals": _rate([o.pred == o.answer for o in originals]),
        "accuracy_originals_gold_yes": _rate([o.pred == o.answer for o in originals
                                              if answers[o.group_id] == "yes"]),
        "accuracy_originals_gold_no": _rate([o.pred == o.answer for o in originals
                                             if answers[o.group_id] == "no"]),
        "accuracy_all_wordings": _rate([p.pred == p.answer for p in preds]),
        "says_yes_originals": _rate([o.pred == yes for o in originals]),
        "says_yes_all_wordings": _rate([p.pred == yes for p in preds]),
        "paraphrase_flip_vs_original": _rate([vs[0].pred != vs[k].pred
                                              for vs in by_group.values() for k in vs if k]),
        "pairwise_flip_rate": _metric(m["pairwise_flip_rate"]),
        "question_flip_rate": _metric(m["question_flip_rate"]),
        "margin_diff": m["margin_diff"]["value"],
        "by_phenomenon": phen,
    }


def _rate(hits: list[bool]) -> dict:
    k, n = int(sum(hits)), len(hits)
    return {"k": k, "n": n, "value": k / n if n else None}


def _metric(block: dict) -> dict:
    return {"k": block.get("k"), "n": block.get("n"), "value": block.get("value")}


def _shown(path: Path) -> str:
    """The path relative to the working directory when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ---- outputs ---------------------------------------------------------------------------------

def restoration_html(panels: list[tuple[str, object, dict]], path: Path, plotlyjs: str) -> Path:
    """One panel per set of pairs: mean r per component with 95% CI bands, resid median."""
    fig = make_subplots(rows=1, cols=len(panels), shared_xaxes=True,
                        subplot_titles=[title for title, _, _ in panels])
    for col, (_, result, v) in enumerate(panels, start=1):
        for trace in restoration_figure(result).data:
            trace.showlegend = col == 1 and trace.showlegend is not False
            trace.legendgroup = trace.name
            fig.add_trace(trace, row=1, col=col)
        fig.add_scatter(x=np.arange(result.n_layers), y=median_resid(result), mode="lines",
                        name="resid median", legendgroup="median", showlegend=col == 1,
                        line=dict(color="#1f77b4", dash="dot"), row=1, col=col)
        fig.add_hline(y=0.5, line_dash="dot", line_color="#888", row=1, col=col)
        x = v["crossing_mean"]["interpolated"]
        if x is not None:
            fig.add_vline(x=x, line_dash="dash", line_color="#1f77b4", row=1, col=col,
                          annotation_text=f"mean resid r crosses 0.5 at {x:.1f}")
        fig.update_xaxes(title_text="layer", row=1, col=col)
        fig.update_yaxes(title_text="restoration r", row=1, col=col)
    fig.update_layout(height=480, width=560 * len(panels),
                      title="Gemma 3 270M, last prompt position: restoration r = "
                            "(m(b<-a) - m(b)) / (m(a) - m(b)) per layer (mean, 95% bootstrap CI "
                            "over question groups)")
    fig.write_html(str(path), include_plotlyjs=True if plotlyjs == "embed" else "cdn")
    return path


def fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def pct(block: dict) -> str:
    v = block.get("value")
    return "n/a" if v is None else f"{100 * v:.1f}% ({block['k']}/{block['n']})"


def _cell(value: tuple[float, float, float]) -> str:
    m, lo, hi = value
    return f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]"


def _cross(c: dict) -> str:
    return (f"first {c['first']}, stays from {c['stays']} "
            f"(interpolated {fmt(c['interpolated'], 1)})")


def layer_table(v: dict) -> list[str]:
    lines = ["| layer | resid r mean [95% CI] | resid r median | attn r mean [95% CI] | "
             "mlp r mean [95% CI] | score [95% CI] |",
             "|---|---|---|---|---|---|"]
    for row in v["per_layer"]:
        mark = " *" if row["layer"] in v["selection"]["layers"] else ""
        lines.append(f"| {row['layer']}{mark} | {_cell(row['resid'])} | "
                     f"{fmt(row['resid_median'])} | {_cell(row['attn'])} | {_cell(row['mlp'])} | "
                     f"{_cell(row['score'])} |")
    lines += ["", f"\\* selected by `{v['selection']['rule']}`: {v['selection']['reason']}."]
    return lines


def results_markdown(s: dict) -> str:
    b, full, rob = s["behaviour"], s["all_pairs"], s["robust"]
    secs = s["seconds"]
    n_loc = full["n_pairs"] + full["n_excluded"]
    lines = [
        "## Gemma 3 270M localization",
        "",
        f"Command: `{s['command']}`",
        "",
        f"Model `{s['model']}` ({s['n_layers']} layers, fp32, CPU, {s['threads']} torch "
        f"thread(s)); data `{s['data']}` ({b['n_groups']} question groups, {b['gold_yes']} with "
        f"gold answer yes; {b['n_variants']} wordings); positions `last`, engine "
        f"`{s['engine']}`. Time: model load {secs['load']:.0f} s, evaluation "
        f"{secs['evaluate']:.0f} s, localization {secs['localize']:.0f} s "
        f"({secs['localize'] / max(n_loc, 1):.1f} s/pair), total {secs['total']:.0f} s.",
        "",
        "### Behaviour of the base model (every wording of every group)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| accuracy on the original questions | {pct(b['accuracy_originals'])} |",
        f"| - gold answer yes | {pct(b['accuracy_originals_gold_yes'])} |",
        f"| - gold answer no | {pct(b['accuracy_originals_gold_no'])} |",
        f"| accuracy over all wordings | {pct(b['accuracy_all_wordings'])} |",
        f"| answers 'yes' (originals) | {pct(b['says_yes_originals'])} |",
        f"| answers 'yes' (all wordings) | {pct(b['says_yes_all_wordings'])} |",
        f"| paraphrase answer differs from the original's | "
        f"{pct(b['paraphrase_flip_vs_original'])} |",
        f"| pairwise flip rate (all unordered pairs of wordings) | "
        f"{pct(b['pairwise_flip_rate'])} |",
        f"| questions with at least one flipping paraphrase | {pct(b['question_flip_rate'])} |",
        f"| mean abs margin difference over pairs (logits) | {fmt(b['margin_diff'])} |",
        "",
        "| phenomenon | answers 'yes' | accuracy | differs from original | "
        "mean abs margin diff to original |",
        "|---|---|---|---|---|",
    ]
    for ph, d in b["by_phenomenon"].items():
        lines.append(f"| {ph} | {pct(d['says_yes'])} | {pct(d['accuracy'])} | "
                     f"{pct(d['flip_vs_original'])} | {fmt(d['margin_diff'])} |")
    lines += [
        "",
        "### Restoration at the last position",
        "",
        f"{n_loc} ordered pairs localized (up to {s['max_pairs_per_group']} per group); "
        f"**{s['n_excluded_by_localize']} excluded** by localize (|m(a) - m(b)| < "
        f"{s['min_delta']}). Of the localized pairs {pct(full['pairs_flipping'])} have "
        f"different predicted answers; median |m(a) - m(b)| = {fmt(full['median_abs_delta'])} "
        "logits.",
        "",
        "r = (m(b<-a) - m(b)) / (m(a) - m(b)), mean over pairs with a 95% bootstrap CI "
        "(resampling question groups); score = mean resid increment r_l - r_(l-1), the "
        "selector's input.",
        "",
        "Sensitivity to the smallest margin difference kept (post hoc, same run; crossing of "
        "the resid curve with r = 0.5):",
        "",
        "| min abs(m(a) - m(b)) | pairs | groups | mean curve crosses 0.5 | median curve crosses "
        f"0.5 | max abs mean r | `{s['rule']}` | score peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s["sensitivity"]:
        lines.append(f"| {r['min_abs_delta']:g} | {r['n_pairs']} | {r['n_groups']} | "
                     f"{_cross(r['crossing_mean'])} | {_cross(r['crossing_median'])} | "
                     f"{fmt(r['max_abs_resid_mean'])} | {r['selection']} | {r['score_peak']} |")
    lines += [
        "",
        f"#### Pairs with |m(a) - m(b)| >= {s['robust_delta']} ({rob['n_pairs']} pairs, "
        f"{rob['n_groups']} groups)",
        "",
        f"Resid r = 0.5: mean curve {_cross(rob['crossing_mean'])}; median curve "
        f"{_cross(rob['crossing_median'])}. {pct(rob['pairs_flipping'])} of these pairs flip.",
        "",
        *layer_table(rob),
        "",
        f"#### All {full['n_pairs']} localized pairs (|m(a) - m(b)| >= {s['min_delta']})",
        "",
        f"Resid r = 0.5: mean curve {_cross(full['crossing_mean'])}; median curve "
        f"{_cross(full['crossing_median'])}.",
        "",
        *layer_table(full),
        "",
    ]
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------

def run(args: argparse.Namespace, out: Path, groups) -> tuple:
    pairs = mechlora.make_pairs(groups, max_pairs_per_group=args.max_pairs_per_group,
                                seed=args.seed)
    print(f"{len(groups)} groups, {len(pairs)} pairs to localize", flush=True)
    t = time.perf_counter()
    subject = mechlora.load_model(MODEL)
    seconds = {"load": time.perf_counter() - t}
    print(f"loaded {MODEL} in {seconds['load']:.1f} s ({subject.n_layers} layers)", flush=True)

    t = time.perf_counter()
    ev = evaluate(subject, groups, out=out / "eval", overwrite=True, batch_size=32,
                  progress=not args.quiet, seed=args.seed)
    seconds["evaluate"] = time.perf_counter() - t
    print(f"evaluated every wording in {seconds['evaluate']:.1f} s", flush=True)

    t = time.perf_counter()
    result = mechlora.localize(subject, pairs, components=("resid", "attn", "mlp"),
                               positions="last", engine="auto", min_delta=args.min_delta,
                               progress=not args.quiet)
    seconds["localize"] = time.perf_counter() - t
    return ev, result, seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    command = "python analyses/gemma3_270m.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    t_start = time.perf_counter()
    groups = mechlora.load_groups(args.data)
    if args.groups is not None:
        groups = groups[: args.groups]
    answers = {g.id: g.answer for g in groups}

    if args.reuse:
        previous = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        result = mechlora.LocalizationResult.load(out)
        ev = EvalResult.load(out / "eval")
        seconds, command = previous["seconds"], previous["command"]
    else:
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            sys.exit(f"{out} already holds results; pass --overwrite or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        ev, result, seconds = run(args, out, groups)

    robust = subset(result, args.robust_delta)
    full_view, robust_view = view(result, args.rule), view(robust, args.rule)
    if full_view["_selection"] is not None:
        result.settings["selection"] = full_view["selection"]
    if robust_view["_selection"] is not None:
        robust.settings["selection"] = robust_view["selection"]
    result.save(out)
    robust.save(out / "robust")
    write_localize_report(result, out / "report.html", full_view["_selection"],
                          plotlyjs=args.plotlyjs)
    write_localize_report(robust, out / "robust" / "report.html", robust_view["_selection"],
                          plotlyjs=args.plotlyjs)
    restoration_html([(f"all {result.n_pairs} pairs (|m(a)-m(b)| >= {args.min_delta:g})",
                       result, full_view),
                      (f"{robust.n_pairs} pairs with |m(a)-m(b)| >= {args.robust_delta:g}",
                       robust, robust_view)],
                     out / "restoration.html", args.plotlyjs)

    if not args.reuse:
        seconds["total"] = time.perf_counter() - t_start
    thresholds = sorted({args.min_delta, *SENSITIVITY, args.robust_delta})
    summary = {
        "command": command, "model": MODEL, "n_layers": result.n_layers,
        "data": _shown(Path(args.data)), "threads": args.threads, "engine": result.engine,
        "max_pairs_per_group": args.max_pairs_per_group, "min_delta": args.min_delta,
        "robust_delta": args.robust_delta, "rule": args.rule,
        "n_excluded_by_localize": len(result.excluded),
        "behaviour": behaviour(ev, answers),
        "sensitivity": sensitivity(result, thresholds, args.rule),
        "all_pairs": {k: v for k, v in full_view.items() if k != "_selection"},
        "robust": {k: v for k, v in robust_view.items() if k != "_selection"},
        "seconds": seconds,
    }
    (out / "results.md").write_text(results_markdown(summary), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    b = summary["behaviour"]
    print(f"accuracy on originals {pct(b['accuracy_originals'])}; answers yes on originals "
          f"{pct(b['says_yes_originals'])}; paraphrase differs from original "
          f"{pct(b['paraphrase_flip_vs_original'])}")
    print(f"resid r crosses 0.5 (pairs with |delta| >= {args.robust_delta}): "
          f"{_cross(robust_view['crossing_mean'])}; {robust_view['selection']['reason']}")
    print(f"wrote {out}/results.md (total {seconds['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
