"""The organism presets: build time, accuracy, held-out flips, and where localization puts them.

    python analyses/organisms.py [--presets organism-mid ...] [--seeds 0 1 2] [--groups 48]

For each preset and seed: build the organism (or reuse the cached build) on one thread, read
its own check (test films x the paraphrase families it never saw), and localize its flip pairs
on the first fold's training file (train films, training families) with resid/attn/mlp at the
last position. Reports the planted commit layer k, the onset (the first layer whose mean
|resid restoration| exceeds 0.05: nothing below k can restore anything), the score peak
(largest resid increment) and the `window:2` selection, and the flip rate when the caller
passes no `token_type_ids`. Writes results.md and summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mechlora.data import load_groups, make_pairs
from mechlora.io import atomic_write_text, write_json
from mechlora.localize import localize
from mechlora.models import load_model
from mechlora.organism import (
    ORGANISMS,
    build_organism,
    load_folds,
    organism_config,
    read_meta,
)
from mechlora.organism.train import quick_check
from mechlora.select import select_layers

ONSET = 0.05  # mean |r| above which a layer counts as restoring


def measure(preset: str, seed: int, groups: int, pairs_per_group: int, quick: bool) -> dict:
    folder = build_organism(preset=preset, seed=seed, quick=quick, progress=False)
    meta = read_meta(folder)
    fold = next(iter(load_folds(folder).values()))
    pairs = make_pairs(load_groups(fold.train)[:groups], max_pairs_per_group=pairs_per_group,
                       seed=seed)
    subject = load_model(str(folder), device="cpu", dtype="float32")
    t0 = time.perf_counter()
    loc = localize(subject, pairs, only_flips=True, logit_lens=False, progress=False)
    resid = loc.restoration["resid"]
    mean_abs = np.abs(resid).mean(0) if loc.n_pairs else np.zeros(loc.n_layers)
    restoring = np.flatnonzero(mean_abs > ONSET)
    selection = select_layers(loc.scores, "window:2") if loc.n_pairs else None
    check = meta["check"]
    # The organism is trained with and without token_type_ids: does it answer the same?
    plain = quick_check(subject.model, subject.processor,
                        organism_config(preset, seed, quick=quick), token_types=False)
    return {
        "preset": preset, "seed": seed, "folder": str(folder),
        "layers": meta["config"]["layers"], "commit": meta["config"]["commit"],
        "window": meta["config"]["window"],
        "build_seconds": meta.get("build_seconds"), "train_seconds": meta["train_seconds"],
        "train_cpu_seconds": meta["train_cpu_seconds"],
        "accuracy_train_phrasing": check["accuracy_train_phrasing"],
        "accuracy_test_families": check["accuracy_heldout_paraphrases"],
        "flip_rate_test_families": check["flip_rate_heldout"],
        "flip_rate_by_family": check["flip_rate_by_phenomenon"],
        "without_token_type_ids": {k: plain[k] for k in ("accuracy_train_phrasing",
                                                          "flip_rate_heldout")},
        "localize": {
            "fold": fold.name, "n_pairs": loc.n_pairs, "n_excluded": len(loc.excluded),
            "max_abs_resid_below_commit": float(np.abs(resid[:, :meta["config"]["commit"]])
                                                .max(initial=0.0)),
            "resid_mean": loc.mean("resid").round(4).tolist() if loc.n_pairs else None,
            "scores": loc.scores.round(4).tolist(),
            "onset": int(restoring[0]) if len(restoring) else None,
            "peak": int(np.argmax(loc.scores)) if loc.n_pairs else None,
            "window2": str(selection.spec) if selection else None,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    }


def table(rows: list[dict]) -> str:
    families = list(rows[0]["flip_rate_by_family"]) if rows else []
    head = ["preset", "seed", "L / k / w", "build s (train CPU s)", "acc. training phrasing",
            "flip rate, test families", *(f"flips {f}" for f in families),
            "flips without token_type_ids", "onset",
            "score peak", "window:2", "pairs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        loc = r["localize"]
        cells = [r["preset"], r["seed"], f"{r['layers']} / {r['commit']} / {r['window']}",
                 f"{r['build_seconds']:.0f} ({r['train_cpu_seconds']:.0f})",
                 f"{r['accuracy_train_phrasing']:.1%}", f"{r['flip_rate_test_families']:.1%}",
                 *(f"{r['flip_rate_by_family'][f]:.1%}" for f in families),
                 f"{r['without_token_type_ids']['flip_rate_heldout']:.1%}",
                 loc["onset"], loc["peak"], loc["window2"], loc["n_pairs"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(ORGANISMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--groups", type=int, default=48, help="training groups to localize on")
    parser.add_argument("--pairs-per-group", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="reduced organisms (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("runs/analyses/organisms"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for preset in args.presets:
        for seed in args.seeds:
            rows.append(measure(preset, seed, args.groups, args.pairs_per_group, args.quick))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    summary = {"schema_version": 1, "command": " ".join(["python", *sys.argv]),
               "onset_threshold": ONSET, "torch_threads": torch.get_num_threads(), "rows": rows}
    write_json(args.out / "summary.json", summary)
    atomic_write_text(args.out / "results.md", table(rows) + "\n")
    print(json.dumps({"out": str(args.out)}))


if __name__ == "__main__":
    main()
