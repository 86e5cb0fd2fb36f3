"""The paper's table on the model organism: base vs targeted vs full LoRA, each with and without
the consistency term, over several training seeds.

    python analyses/paper_table.py [--seeds 0 1 2] [--steps 60] [--out runs/analyses/paper_table]

Arms (same training budget): `window` (the localized window) and `all` (every layer), each with
KL weight 1 (CE + symmetric KL) and KL weight 0 (CE only on the same paraphrase pairs: the
control that credits the consistency term). Evaluated on held-out images x held-out paraphrase
families: pairwise flip rate, accuracy, mean |margin difference|, text-only agreement (gray
image), with 95% intervals and, per arm, the paired test against the base.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mechlora.demo import DemoConfig, localize_flips, organism, train_arm
from mechlora.evaluate import evaluate
from mechlora.io import atomic_write_text, write_json

METRICS = [("pairwise_flip_rate", "flip rate"), ("question_flip_rate", "question flip"),
           ("accuracy", "accuracy"), ("margin_diff", "|margin diff|"),
           ("text_only_agreement_gray", "text-only agr.")]


def fmt(block: dict) -> str:
    value = block.get("value")
    ci = block.get("ci_wilson") or block.get("ci_bootstrap") or block.get("ci")
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("runs/analyses/paper_table"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = DemoConfig(steps=args.steps)
    org = organism(cfg)
    loc, selection = localize_flips(org, cfg)
    print(selection.reason)
    arms = {"window": str(selection.spec), "all": "all"}
    rows, per_seed = [], {}
    for seed in args.seeds:
        adapters = []
        for name, layers in arms.items():
            for kl in (1.0, 0.0):
                arm = f"{name}-{'kl' if kl else 'ce'}"
                folder = args.out / f"seed{seed}" / arm
                if not (folder / "adapter_model.safetensors").is_file():
                    train_arm(org, layers, folder, cfg, kl_weight=kl, seed=seed, progress=False)
                adapters.append(folder)
                print(f"seed {seed}: trained {arm}", flush=True)
        result = evaluate(org.load(), org.heldout, adapters=adapters, progress=False,
                          out=args.out / f"seed{seed}" / "eval", overwrite=True)
        per_seed[seed] = {"metrics": result.metrics, "comparisons": result.comparisons}
        for arm, metrics in result.metrics.items():
            comp = result.comparisons.get(arm, {})
            p = comp.get("pairwise_flip_rate", {}).get("paired_test", {}).get("p")
            rows.append({"seed": seed, "arm": arm,
                         **{k: metrics[k].get("value") for k, _ in METRICS},
                         "flip_p_vs_base": p,
                         "cells": {k: fmt(metrics[k]) for k, _ in METRICS}})
    write_json(args.out / "summary.json", {"selection": selection.reason, "rows": rows,
                                           "per_seed": per_seed, "steps": args.steps})
    lines = [f"Localized window: {selection.reason}", "",
             "| seed | arm | " + " | ".join(t for _, t in METRICS) + " | flip p vs base |",
             "|---|---|" + "---|" * len(METRICS) + "---|"]
    for r in rows:
        p = f"{r['flip_p_vs_base']:.2g}" if r["flip_p_vs_base"] is not None else ""
        lines.append(f"| {r['seed']} | {r['arm']} | " +
                     " | ".join(r["cells"][k] for k, _ in METRICS) + f" | {p} |")
    lines += ["", "Mean over seeds (sd):", "",
              "| arm | " + " | ".join(t for _, t in METRICS) + " |",
              "|---|" + "---|" * len(METRICS)]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        cells = []
        for k, _ in METRICS:
            vals = np.array([r[k] for r in rows if r["arm"] == arm and r[k] is not None])
            cells.append(f"{vals.mean():.3f} ({vals.std(ddof=1) if len(vals) > 1 else 0:.3f})"
                         if len(vals) else "n/a")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines.append(f"\n{time.perf_counter() - t0:.0f} s; flip p: sign-flip test over questions "
                 "(paired, base vs arm, pairwise flips; docs/metrics.md).")
    table = "\n".join(lines)
    atomic_write_text(args.out / "results.md", table + "\n")
    print(table)
    print(json.dumps({"out": str(args.out)}))


if __name__ == "__main__":
    main()
