"""Does the localized window beat other windows of the same width, with the same budget?

    python analyses/window_ablation.py [--seeds 0 1 2] [--steps 150] [--max-windows 8]

Windows of the localized window's width: every contiguous one when there are at most
`--max-windows` (the organism's 6 layers give 5 at width 2), else the early, middle and late
ones, the localized one and random ones (seeded) up to that count. Each is trained with
CE + symmetric KL for the same number of steps and evaluated on held-out images x held-out
paraphrase families; the localized window is compared with every other one, paired over
questions. Adapters and evaluations already in `--out` are reused. Writes results.md,
summary.json and window_ablation.html.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from mechlora.demo import DemoConfig, localize_flips, organism, train_arm
from mechlora.evaluate import evaluate
from mechlora.io import atomic_write_text, write_json
from mechlora.metrics import compare

KEYS = [("pairwise_flip_rate", "flip rate"), ("accuracy", "accuracy"),
        ("margin_diff", "|margin diff|")]


def windows(n_layers: int, width: int, localized: str, max_windows: int, seed: int
            ) -> dict[str, list[str]]:
    """Spec -> roles (early, middle, late, localized, random) of the windows to train."""
    starts = list(range(n_layers - width + 1))
    spec = {s: f"{s}-{s + width - 1}" for s in starts}
    roles: dict[str, list[str]] = {}
    for role, s in (("early", 0), ("middle", starts[len(starts) // 2]), ("late", starts[-1])):
        roles.setdefault(spec[s], []).append(role)
    roles.setdefault(localized, []).append("localized")
    rest = [spec[s] for s in starts if spec[s] not in roles]
    if len(starts) <= max_windows:
        for s in rest:
            roles[s] = []
    else:
        for s in random.Random(seed).sample(rest, min(len(rest), max_windows - len(roles))):
            roles[s] = ["random"]
    return dict(sorted(roles.items(), key=lambda kv: int(kv[0].split("-")[0])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="as `mechlora demo`")
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/analyses/window_ablation"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = DemoConfig(steps=args.steps)
    org = organism(cfg)
    loc, selection = localize_flips(org, cfg)
    localized = str(selection.spec)
    width = len(selection.spec.layers)
    spans = windows(loc.n_layers, width, localized, args.max_windows, seed=123)
    print(selection.reason, spans, flush=True)
    rows, versus = [], []
    for seed in args.seeds:
        folder = args.out / f"seed{seed}"
        adapters = []
        for layers in spans:
            arm = f"layers{layers}"
            if not (folder / arm / "adapter_model.safetensors").is_file():
                train_arm(org, layers, folder / arm, cfg, seed=seed, progress=False)
            adapters.append(folder / arm)
        if not (folder / "eval" / "predictions.jsonl").is_file():
            evaluate(org.load(), org.heldout, adapters=adapters, progress=False,
                     out=folder / "eval", overwrite=True)
        saved = json.loads((folder / "eval" / "eval.json").read_text())
        preds: dict[str, list] = {}
        for line in (folder / "eval" / "predictions.jsonl").open():
            r = json.loads(line)
            preds.setdefault(r["arm"], []).append(r)
        for arm, block in saved["arms"].items():
            rows.append({"seed": seed, "arm": arm, **{k: block["metrics"][k].get("value")
                                                      for k, _ in KEYS}})
        for layers in spans:
            if layers != localized:
                c = compare(preds[f"layers{layers}"], preds[f"layers{localized}"])
                versus.append({"seed": seed, "other": layers,
                               "flip_diff": c["pairwise_flip_rate"]["diff"],
                               "flip_p": c["pairwise_flip_rate"]["paired_test"]["p"],
                               "margin_diff": c["margin_diff"]["diff"],
                               "margin_p": c["margin_diff"]["paired_test"]["p"]})
        print(f"seed {seed} done", flush=True)
    write_json(args.out / "summary.json", {"selection": selection.reason, "windows": spans,
                                           "rows": rows, "localized_vs_other": versus,
                                           "steps": args.steps, "seeds": args.seeds})
    figure(rows, spans, localized).write_html(args.out / "window_ablation.html",
                                              include_plotlyjs=True)
    table = "\n".join(tables(rows, versus, spans, selection.reason, args,
                             time.perf_counter() - t0))
    atomic_write_text(args.out / "results.md", table + "\n")
    print(table)


def figure(rows: list[dict], spans: dict[str, list[str]], localized: str) -> go.Figure:
    fig = go.Figure()
    arms = [f"layers{s}" for s in spans]
    for key, title in KEYS[:1] + KEYS[2:]:
        fig.add_bar(x=[a.removeprefix("layers") for a in arms],
                    y=[np.mean([r[key] for r in rows if r["arm"] == a]) for a in arms],
                    name=title,
                    error_y=dict(type="data", array=[np.std([r[key] for r in rows
                                                             if r["arm"] == a])
                                                     for a in arms]))
    fig.update_layout(title=f"Windows of one width, same budget (localized: {localized}); "
                      "means over seeds, bars = sd", xaxis_title="adapted layers",
                      barmode="group", height=420, width=900)
    return fig


def tables(rows, versus, spans, reason, args, seconds) -> list[str]:
    lines = [f"Localized: {reason}", "",
             "| arm | layers | role | " + " | ".join(t for _, t in KEYS) +
             " | per seed flip rate |", "|---|---|---|" + "---|" * len(KEYS) + "---|"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        sel = [r for r in rows if r["arm"] == arm]
        layers = arm.removeprefix("layers") if arm != "base" else "-"
        role = ", ".join(spans.get(layers, [])) if arm != "base" else "no adapter"
        cells = [f"{np.mean([r[k] for r in sel]):.3f}" for k, _ in KEYS]
        per = ", ".join(f"{r['pairwise_flip_rate']:.3f}" for r in sel)
        lines.append(f"| {arm} | {layers} | {role} | " + " | ".join(cells) + f" | {per} |")
    lines += ["", "Localized window minus each other window, paired over questions:", "",
              "| seed | other window | flip rate diff (p) | |margin diff| diff (p) |",
              "|---|---|---|---|"]
    for v in versus:
        lines.append(f"| {v['seed']} | {v['other']} | {v['flip_diff']:+.3f} ({v['flip_p']:.2g})"
                     f" | {v['margin_diff']:+.3f} ({v['margin_p']:.2g}) |")
    lines.append(f"\nMeans over seeds {args.seeds}; {args.steps} steps of 8 pairs per arm "
                 f"(CE + symmetric KL); {seconds:.0f} s. p: two-sided sign-flip permutation "
                 "test over questions (floor 1e-4).")
    return lines


if __name__ == "__main__":
    main()
