"""report.html of `mechlora demo`: the arms compared (read from compare.json, nothing
recomputed) and the localization that chose `auto`'s window."""

from __future__ import annotations

from pathlib import Path

from mechlora.report.compare import _fmt, _layers, _p, cost_table, front_figure, tests_table
from mechlora.report.localize import restoration_figure, score_figure
from mechlora.report.page import Page

FLIP = "original_flip_rate"


def write_report(path: str | Path, summary: dict, doc: dict, loc, selection, *,
                 plotlyjs: str = "embed") -> Path:
    """`summary`: demo.json; `doc`: compare.json; `loc`, `selection`: the localization."""
    org, data, budget = summary["organism"], summary["data"], doc["budget"]
    planted = org.get("planted") or {}
    names = list(doc["arms"])
    page = Page("mechlora demo: does training the localized layers beat the alternatives?")
    depth = (f"whose answer position cannot read the question before layer {planted['commit']} "
             f"(the layers below attend to {planted.get('window')}-token windows)"
             if planted.get("commit") else "with full attention in every layer (nothing planted)")
    page.text(
        f"Organism {org['preset']}@{org['seed']}: a Gemma 3 VLM of {loc.n_layers} layers "
        f"{depth}. Every arm trains LoRA "
        f"for {budget['steps']} steps of {budget['pairs_per_step']} pairs on {data['fold']}'s "
        f"training file (train films x {', '.join(data['train_families'])}) with "
        f"{len(doc['seeds'])} training seed(s) ({', '.join(map(str, doc['seeds']))}), and is "
        f"evaluated on test films x {data['test_family']}, a paraphrase family that neither the "
        f"organism nor any adapter saw: {data['test_subsample']} ({data['test_groups']} of "
        f"{data['test_groups_in_file']}).")
    t = summary["seconds"]
    page.text(f"Time: {t['total']:.0f} s (organism {t['organism']:.0f} s, "
              f"{'built' if org.get('built') else 'reused from the cache'}; "
              f"localization {t['localize']:.0f} s; training and evaluating every arm and seed "
              f"{t['compare']:.0f} s).")
    page.text("Arms: " + "; ".join(f"{n}: {_layers(doc['arms'][n])}" for n in names)
              + ". Every arm: the same " + budget["same_for_every_arm"]
              + ("." if budget["equal"] else "; WARNING: the arms did not all run the same "
                 "steps."))
    for note in doc["notes"]:
        page.text(note, note=True)

    page.heading("Flip rate vs accuracy on the held-out family")
    page.figure(front_figure(doc, names))
    page.heading("Per arm (mean over seeds [95% interval over seeds and questions])")
    page.table(*headline_table(doc, names))
    page.text(verdict(doc, names))
    page.text(f"Flip: the share of (original, paraphrase) pairs of a question whose answers "
              f"differ. Intervals: {doc['statistics']['interval']}. Flip - {doc['reference']}: "
              f"{doc['statistics']['paired']}.", note=True)
    page.heading("Paired tests against the base model (arm minus base)")
    page.table(*tests_table(doc, "vs_base", names))
    page.heading("Trainable parameters and cost per arm")
    page.table(*cost_table(doc))

    page.heading("Localization: where the paraphrases diverge")
    page.text(f"{loc.n_pairs} ordered flip pairs of training films. {selection.reason}")
    page.figure(planted_score_figure(loc, selection, planted.get("commit")))
    page.table(*layers_table(doc, loc, planted))
    page.figure(restoration_figure(loc))
    page.text("Details: localize/report.html (every localization figure), compare/report.html "
              "and compare/compare.json (every metric, the paired tests against auto, the "
              "layers each arm trained), compare/arms/ARM/seed-S/ (the adapters, PEFT folders).",
              note=True)
    return page.write(path, plotlyjs=plotlyjs)


def headline_table(doc: dict, names: list[str]) -> tuple[list[str], list[list[str]]]:
    ref = doc["reference"]
    header = ["arm", "layers", "trainable parameters", "flip vs original", "accuracy",
              "margin diff", f"flip - {ref}", "p"]
    base = doc["base"]["metrics"]
    rows = [["base", "none", "0", _fmt(base.get(FLIP), "mean", True),
             _fmt(base.get("accuracy"), "mean", True), _fmt(base.get("margin_diff"), "mean",
                                                            False), "", ""]]
    for name in names:
        arm = doc["arms"][name]
        m, test = arm["metrics"], (arm["vs_reference"] or {}).get(FLIP)
        params = sorted({r["trainable_parameters"] for r in arm["seeds"].values()})
        rows.append([name, _layers(arm), " / ".join(f"{p:,}" for p in params),
                     _fmt(m.get(FLIP), "mean", True), _fmt(m.get("accuracy"), "mean", True),
                     _fmt(m.get("margin_diff"), "mean", False),
                     _fmt(test, "diff", True, signed=True) if test else "reference",
                     _p(test.get("p")) if test else ""])
    return header, rows


def verdict(doc: dict, names: list[str]) -> str:
    """One sentence per arm against the reference, from its paired flip-rate interval."""
    ref = doc["reference"]
    said = []
    for name in names:
        test = (doc["arms"][name]["vs_reference"] or {}).get(FLIP)
        if not test or test.get("diff") is None:
            continue
        lo, hi = test["ci"]
        if lo is None or hi is None:
            how = "no interval (too few seeds or questions)"
        elif hi < 0:
            how = "lower than " + ref + ", the interval excludes 0"
        elif lo > 0:
            how = "higher than " + ref + ", the interval excludes 0"
        else:
            how = "not distinguishable from " + ref + " (the interval includes 0)"
        said.append(f"{name} {100 * test['diff']:+.1f} points: {how}")
    if not said:
        return "No arm to compare with the reference."
    return f"Flip rate against {ref}: " + "; ".join(said) + "."


def planted_score_figure(loc, selection, commit: int | None):
    """The localization scores, the selected window in red, a line where k is planted."""
    fig = score_figure(loc, list(selection.spec.layers))
    if commit:
        fig.add_vline(x=commit - 0.5, line=dict(color="#555", dash="dash"),
                      annotation_text=f"planted k = {commit}: the question is readable from here",
                      annotation_position="top left")
    return fig


def layers_table(doc: dict, loc, planted: dict) -> tuple[list[str], list[list[str]]]:
    """Per layer: its attention, its localization score and restoration, the arms on it."""
    types = planted.get("layer_types") or [None] * loc.n_layers
    resid = loc.mean("resid") if "resid" in loc.components else None
    rows = []
    for layer in range(loc.n_layers):
        kind = {"sliding_attention": f"sliding ({planted.get('window')} tokens)",
                "full_attention": "full"}.get(types[layer], types[layer] or "")
        arms = [name for name, arm in doc["arms"].items()
                if any(layer in r["layers"] for r in arm["seeds"].values())]
        rows.append([layer, kind, _num(loc.scores[layer]),
                     "" if resid is None else _num(resid[layer]), ", ".join(arms)])
    return ["layer", "attention", f"score ({loc.score_name})", "resid restoration",
            "arms training it (any seed)"], rows



def _num(value: float) -> str:
    text = f"{value:.3f}"
    return "0.000" if text == "-0.000" else text
