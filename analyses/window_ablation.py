"""Does the localized window beat other windows of the same width, with the same budget?

    python analyses/window_ablation.py [--seeds 0 1] [--steps 60] [--random 2]

Windows: early (layers 0..W-1), the localized one, late (the last W layers), and `--random`
random contiguous windows (seeded); each trained with CE + symmetric KL for the same number of
steps and evaluated on held-out images x held-out paraphrase families.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np

from mechlora.demo import DemoConfig, localize_flips, organism, train_arm
from mechlora.evaluate import evaluate
from mechlora.io import atomic_write_text, write_json

KEYS = [("pairwise_flip_rate", "flip rate"), ("accuracy", "accuracy"),
        ("margin_diff", "|margin diff|")]


def windows(n_layers: int, width: int, localized: str, n_random: int, seed: int) -> dict:
    spans = {"early": f"0-{width - 1}", "localized": localized,
             "late": f"{n_layers - width}-{n_layers - 1}"}
    rng = random.Random(seed)
    for i in range(n_random):
        start = rng.randrange(0, n_layers - width + 1)
        spans[f"random{i}"] = f"{start}-{start + width - 1}"
    return spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--random", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/analyses/window_ablation"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = DemoConfig(steps=args.steps)
    org = organism(cfg)
    loc, selection = localize_flips(org, cfg)
    spans = windows(loc.n_layers, cfg.window, str(selection.spec), args.random, seed=123)
    print(selection.reason, spans)
    rows = []
    for seed in args.seeds:
        adapters = []
        for name, layers in spans.items():
            folder = args.out / f"seed{seed}" / name
            if not (folder / "adapter_model.safetensors").is_file():
                train_arm(org, layers, folder, cfg, seed=seed, progress=False)
            adapters.append(folder)
        result = evaluate(org.load(), org.heldout, adapters=adapters, progress=False,
                          out=args.out / f"seed{seed}" / "eval", overwrite=True)
        for arm, metrics in result.metrics.items():
            p = result.comparisons.get(arm, {}).get("pairwise_flip_rate", {}).get(
                "paired_test", {}).get("p")
            rows.append({"seed": seed, "arm": arm, "layers": spans.get(arm, "-"), "p": p,
                         **{k: metrics[k].get("value") for k, _ in KEYS}})
        print(f"seed {seed} done", flush=True)
    write_json(args.out / "summary.json", {"selection": selection.reason, "windows": spans,
                                           "rows": rows, "steps": args.steps})
    lines = [f"Localized: {selection.reason}", "",
             "| window | layers | " + " | ".join(t for _, t in KEYS) +
             " | flip p vs base (per seed) |", "|---|---|" + "---|" * len(KEYS) + "---|"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        sel = [r for r in rows if r["arm"] == arm]
        cells = [f"{np.mean([r[k] for r in sel]):.3f}" for k, _ in KEYS]
        ps = ", ".join(f"{r['p']:.2g}" for r in sel if r["p"] is not None)
        lines.append(f"| {arm} | {sel[0]['layers']} | " + " | ".join(cells) + f" | {ps} |")
    lines.append(f"\nMeans over seeds {args.seeds}; {args.steps} steps per arm; "
                 f"{time.perf_counter() - t0:.0f} s.")
    table = "\n".join(lines)
    atomic_write_text(args.out / "results.md", table + "\n")
    print(table)


if __name__ == "__main__":
    main()
