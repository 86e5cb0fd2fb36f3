"""The paper's table on the model organism: base vs targeted vs full LoRA, each with and without
the consistency term, over several training seeds.

    python analyses/paper_table.py [--seeds 0 1 2] [--steps 150] [--out runs/analyses/paper_table]

Arms (same training budget): `window` (the localized window) and `all` (every layer), each with
KL weight 1 (CE + symmetric KL) and KL weight 0 (CE only on the same paraphrase pairs: the
control that credits the consistency term). Evaluated on held-out images x held-out paraphrase
families: pairwise flip rate, accuracy, mean |margin difference|, text-only agreement (gray
image), with 95% intervals; per arm the paired test against the base, and per layer set the
paired test of CE + KL against CE only. Adapters and evaluations already in `--out` are reused
(delete a seed's folder to redo it). Writes results.md, summary.json and paper_table.html.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechlora.demo import DemoConfig, localize_flips, organism, train_arm
from mechlora.evaluate import evaluate
from mechlora.io import atomic_write_text, write_json
from mechlora.metrics import compare

METRICS = [("pairwise_flip_rate", "flip rate"), ("question_flip_rate", "question flip"),
           ("accuracy", "accuracy"), ("margin_diff", "|margin diff|"),
           ("text_only_agreement_gray", "text-only agr.")]
ARMS = ("base", "window-kl", "window-ce", "all-kl", "all-ce")


def fmt(block: dict) -> str:
    value = block.get("value")
    ci = block.get("ci_wilson") or block.get("ci_bootstrap") or block.get("ci")
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else f"{value:.3f}"


def run_seed(org, cfg: DemoConfig, arms: dict[str, str], seed: int, out: Path) -> dict:
    """Train (or reuse) the four adapters of one seed and evaluate them (or reuse the eval).
    Returns {"metrics": arm -> metrics, "predictions": arm -> prediction rows}."""
    folder = out / f"seed{seed}"
    adapters = []
    for name, layers in arms.items():
        for kl in (1.0, 0.0):
            arm = f"{name}-{'kl' if kl else 'ce'}"
            if not (folder / arm / "adapter_model.safetensors").is_file():
                train_arm(org, layers, folder / arm, cfg, kl_weight=kl, seed=seed,
                          progress=False)
                print(f"seed {seed}: trained {arm}", flush=True)
            adapters.append(folder / arm)
    eval_dir = folder / "eval"
    if not (eval_dir / "predictions.jsonl").is_file():
        evaluate(org.load(), org.heldout, adapters=adapters, progress=False, out=eval_dir,
                 overwrite=True)
    saved = json.loads((eval_dir / "eval.json").read_text())
    rows = [json.loads(line) for line in (eval_dir / "predictions.jsonl").open()]
    return {"metrics": {arm: block["metrics"] for arm, block in saved["arms"].items()},
            "predictions": {arm: [r for r in rows if r["arm"] == arm] for arm in ARMS}}


def paired(a: list[dict], b: list[dict]) -> dict:
    """b - a on pairwise flips, accuracy and margin difference, paired over questions."""
    c = compare(a, b)
    return {"flip_diff": c["pairwise_flip_rate"]["diff"],
            "flip_p": c["pairwise_flip_rate"]["paired_test"]["p"],
            "acc_diff": c["accuracy"]["diff"],
            "acc_p": c["accuracy"]["paired_test"]["p"],
            "margin_diff": c["margin_diff"]["diff"],
            "margin_p": c["margin_diff"]["paired_test"]["p"]}


def figure(rows: list[dict], seeds: list[int]) -> go.Figure:
    keys = [("pairwise_flip_rate", "pairwise flip rate"), ("accuracy", "accuracy"),
            ("margin_diff", "mean |margin difference|")]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in keys])
    for col, (key, _) in enumerate(keys, start=1):
        means = [np.mean([r[key] for r in rows if r["arm"] == arm]) for arm in ARMS]
        fig.add_bar(x=list(ARMS), y=means, name="mean over seeds", marker_color="#9ab",
                    showlegend=col == 1, row=1, col=col)
        for seed in seeds:
            fig.add_scatter(x=list(ARMS), y=[next(r[key] for r in rows if r["arm"] == arm and
                                                  r["seed"] == seed) for arm in ARMS],
                            mode="markers", name=f"seed {seed}", showlegend=col == 1,
                            marker=dict(size=8, color=f"hsl({seed * 110 % 360}, 60%, 40%)"),
                            row=1, col=col)
    fig.update_layout(title="Base vs LoRA arms on held-out images x held-out paraphrases",
                      height=420, width=1150)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="as `mechlora demo`")
    parser.add_argument("--out", type=Path, default=Path("runs/analyses/paper_table"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = DemoConfig(steps=args.steps)
    org = organism(cfg)
    _, selection = localize_flips(org, cfg)
    print(selection.reason, flush=True)
    arms = {"window": str(selection.spec), "all": "all"}
    rows, controls = [], []
    for seed in args.seeds:
        got = run_seed(org, cfg, arms, seed, args.out)
        preds = got["predictions"]
        for arm in ARMS:
            metrics = got["metrics"][arm]
            vs_base = paired(preds["base"], preds[arm]) if arm != "base" else {}
            rows.append({"seed": seed, "arm": arm,
                         **{k: metrics[k].get("value") for k, _ in METRICS},
                         "flip_p_vs_base": vs_base.get("flip_p"),
                         "cells": {k: fmt(metrics[k]) for k, _ in METRICS}})
        for name in arms:  # the control: same pairs and budget, with vs without the KL term
            controls.append({"seed": seed, "layers": name,
                             **paired(preds[f"{name}-ce"], preds[f"{name}-kl"])})
    write_json(args.out / "summary.json", {"selection": selection.reason, "arms": arms,
                                           "rows": rows, "kl_vs_ce": controls,
                                           "steps": args.steps, "seeds": args.seeds})
    figure(rows, args.seeds).write_html(args.out / "paper_table.html", include_plotlyjs=True)
    table = "\n".join(tables(rows, controls, selection.reason, args, time.perf_counter() - t0))
    atomic_write_text(args.out / "results.md", table + "\n")
    print(table)


def tables(rows: list[dict], controls: list[dict], reason: str, args, seconds: float
           ) -> list[str]:
    lines = [f"Localized window: {reason}", "",
             "| seed | arm | " + " | ".join(t for _, t in METRICS) + " | flip p vs base |",
             "|---|---|" + "---|" * len(METRICS) + "---|"]
    for r in rows:
        p = f"{r['flip_p_vs_base']:.2g}" if r["flip_p_vs_base"] is not None else ""
        lines.append(f"| {r['seed']} | {r['arm']} | " +
                     " | ".join(r["cells"][k] for k, _ in METRICS) + f" | {p} |")
    lines += ["", f"Mean over seeds {args.seeds} (sd):", "",
              "| arm | " + " | ".join(t for _, t in METRICS) + " |",
              "|---|" + "---|" * len(METRICS)]
    for arm in ARMS:
        cells = []
        for k, _ in METRICS:
            vals = np.array([r[k] for r in rows if r["arm"] == arm and r[k] is not None])
            cells.append(f"{vals.mean():.3f} ({vals.std(ddof=1) if len(vals) > 1 else 0:.3f})"
                         if len(vals) else "n/a")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "CE + KL minus CE only (same pairs, same budget), paired over questions:", "",
              "| seed | layers | flip rate diff (p) | accuracy diff (p) | |margin diff| diff (p) |",
              "|---|---|---|---|---|"]
    for c in controls:
        lines.append(f"| {c['seed']} | {c['layers']} | {c['flip_diff']:+.3f} ({c['flip_p']:.2g}) "
                     f"| {c['acc_diff']:+.3f} ({c['acc_p']:.2g}) | {c['margin_diff']:+.3f} "
                     f"({c['margin_p']:.2g}) |")
    lines.append(f"\n{args.steps} steps of 8 pairs per arm; {seconds:.0f} s. p: two-sided "
                 "sign-flip permutation test over questions (10,000 permutations, floor 1e-4; "
                 "docs/metrics.md).")
    return lines


if __name__ == "__main__":
    main()
