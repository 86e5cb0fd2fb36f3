"""Does localization inform fine-tuning? The planted-depth organisms (issue 13).

    python analyses/localization_vs_editing.py               # every part, in priority order
    python analyses/localization_vs_editing.py --parts main --presets organism-mid
    python analyses/localization_vs_editing.py --parts dose   # the KL-weight dose-response
    python analyses/localization_vs_editing.py --quick        # quick organisms, a smoke test

Every part is `mechlora.compare` in its own folder under --out, so a rerun reuses every
finished adapter and evaluation; stop it at any time and run the same command again.

Design (fixed before any adapter was trained):
  organisms  PRESETS (planted commit layer k: below k the answer position cannot read the
             question) and the full-attention control; organism seeds ORGANISM_SEEDS
             (organism-mid at three seeds, the others at seed 0).
  data       the first leave-one-family-out fold of each build: LoRA trains on its training
             file (train films x three paraphrase families), the settings are chosen on its
             validation file (validation films x the validation family), and every arm is scored
             on the first TEST_GROUPS questions of its test file (test films x the fourth
             family): wordings and films that no training step of the organism or of any
             adapter saw.
  settings   `search`: the `all` arm on organism-mid (organism seed 0, LoRA seed 0) for each
             learning rate of GRID, checked on the validation file every CHECK_EVERY steps;
             `choose_setting` picks (lr, steps) and every other part uses them. The rule first
             stated (`first_rule`: lowest flip rate losing at most 2 points of accuracy) chose
             40 steps at lr 5e-4, which removed 6.7 of 31.7 points of validation flips: too
             little training for 2-layer windows to differ. It was replaced by the net-gain
             rule after the validation checks and before any test number was computed; both
             picks are in search.json.
  arms       organism-mid@0: every width-2 window (`single:2`), every single layer
             (`single`), all layers, all layers at the parameter count of `auto`
             (`all@match=auto`), `auto` (localization, window:2) and a random band
             (`randband:2`); every other organism and organism seed: ARMS_OTHER. SEEDS LoRA
             seeds everywhere, the same budget for every arm (compare.json `budget`). The
             windows' and single layers' flip reductions give the Spearman test of each
             selector's scores (widths 2 and 1).
  dose       organism-mid, `auto` and `all`, kl_weight 0 (CE only: the control) and 4 beside
             the main comparison's 1, SEEDS seeds: a flip-vs-accuracy front.
  cut        The full design (every organism and organism seed with every arm and single
             layer, five KL weights) is about 400 trainings; on the shared 2-core machine one
             training and its evaluation took 20-80 s, so the matched and random arms and the
             single layers run on organism-mid@0 only, the KL weights are 0, 1 and 4, and only
             organism-mid has three organism seeds.

Decision rule (stated before running; `verdict` applies it):
  For each organism the best window is the width-2 window with the lowest mean held-out flip
  rate (`original_flip_rate`) over seeds, among windows whose mean accuracy is at least the base
  model's minus ACCURACY_SLACK (all windows if none is).
  - "tracks k": in every planted organism the best window starts within one layer of k.
  - "early wins": the best window is 0-1 in every organism, planted or not.
  - otherwise "neither", reported per organism.
  Secondary: `auto` vs `all@match=auto` (the paired seed x question interval of compare):
  "auto better" / "auto worse" when the interval of the flip-rate difference excludes 0,
  otherwise "no difference detected".

Writes OUT/summary.json, OUT/results.md and OUT/report.html, and copies summary.json and
results.md to --results (default analyses/results/localization_vs_editing; not with --quick).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from mechlora.errors import MechloraError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCHEMA_VERSION = 1
PRESETS = ("organism-mid", "organism-full", "organism-late", "organism-early", "organism-w3")
ARMS = "single:2,all,all@match=auto,auto,randband:2,single"  # organism-mid@0
ARMS_OTHER = "single:2,all,auto"  # every other organism (the compute budget, see above)
SEEDS = (1, 2, 3)
ORGANISM_SEEDS = {"organism-mid": (0, 1, 2)}  # the other presets: seed 0
DOSE = (0.0, 4.0)  # and RECIPE's kl_weight 1, read from the main comparison of organism-mid
DOSE_ARMS = "auto,all"
GRID = dict(lr=(5e-4, 2e-3))
STEPS, CHECK_EVERY = 120, 40
RECIPE = dict(r=8, alpha=16, dropout=0.05, grad_accum=8, kl_weight=1.0, schedule="constant",
              epochs=10_000, save_every=0, rule="window:2", localize_groups=48)
TEST_GROUPS = VALIDATION_GROUPS = 120
LOCALIZE_GROUPS = 48
ACCURACY_DROP, FLIP_TIE = 0.02, 0.01  # the settings rule
ACCURACY_SLACK = 0.05  # the decision rule: a window may not win by losing accuracy
FLIP = "original_flip_rate"
METRICS = (FLIP, "accuracy", "margin_diff", "text_only_agreement_gray", "swap_sensitivity")
PARTS = ("main", "dose")  # the settings search runs first in every call (cached)


# ---- rules ------------------------------------------------------------------------------------

def choose_setting(base: dict, candidates: list[dict]) -> dict[str, Any]:
    """The settings rule: the check with the largest net gain on the validation file, the flip
    rate it removes minus the accuracy it loses (base - check; a gain in accuracy counts 0);
    gains within FLIP_TIE of the best are tied, and a tie goes to the fewest steps, then the
    lower learning rate."""
    def gain(c):
        return (base["flip_rate"] - c["flip_rate"]) - max(0.0, base["accuracy"] - c["accuracy"])

    top = max(gain(c) for c in candidates)
    tied = [c for c in candidates if gain(c) >= top - FLIP_TIE - 1e-12]
    best = min(tied, key=lambda c: (c["steps"], c["lr"]))
    return {**best, "net_gain": gain(best),
            "why": f"largest validation net gain (flip removed minus accuracy lost) "
                   f"{gain(best):+.3f}; {len(tied)} within {FLIP_TIE} of it, the fewest steps"}


def first_rule(base: dict, candidates: list[dict]) -> dict[str, Any]:
    """The rule stated first and replaced (see the module docstring): the lowest validation
    flip rate among checks that lose at most ACCURACY_DROP accuracy, fewest steps on ties."""
    eligible = [c for c in candidates if c["accuracy"] >= base["accuracy"] - ACCURACY_DROP - 1e-9]
    if not eligible:
        return max(candidates, key=lambda c: c["accuracy"])
    low = min(c["flip_rate"] for c in eligible)
    return min((c for c in eligible if c["flip_rate"] <= low + FLIP_TIE + 1e-12),
               key=lambda c: (c["steps"], c["lr"]))


def best_window(windows: dict[str, dict], base_accuracy: float) -> dict[str, Any]:
    """The decision rule's best window. `windows`: arm -> {layers, flip, accuracy} (means)."""
    floor = base_accuracy - ACCURACY_SLACK
    eligible = {a: w for a, w in windows.items() if w["accuracy"] >= floor - 1e-12}
    pool = eligible or windows
    arm = min(pool, key=lambda a: (pool[a]["flip"], pool[a]["layers"][0]))
    return {"arm": arm, "layers": pool[arm]["layers"], "start": pool[arm]["layers"][0],
            "flip": pool[arm]["flip"], "accuracy": pool[arm]["accuracy"],
            "accuracy_floor": floor, "n_eligible": len(eligible)}


def verdict(organisms: list[dict]) -> dict[str, Any]:
    """The decision rule over every measured organism: {"verdict", "why", "per_organism"}."""
    def key(o: dict) -> str:
        return f"{o['name']}@{o['organism_seed']}"

    planted = [o for o in organisms if o["k"] > 0]
    per = {key(o): {"k": o["k"], "best_start": o["best"]["start"],
                    "within_one_of_k": abs(o["best"]["start"] - o["k"]) <= 1,
                    "best_is_0_1": o["best"]["layers"] == [0, 1]} for o in organisms}
    if planted and all(per[key(o)]["within_one_of_k"] for o in planted):
        v, why = "tracks k", "in every planted organism the best window starts within one of k"
    elif organisms and all(p["best_is_0_1"] for p in per.values()):
        v, why = "early wins", "the best window is 0-1 in every organism"
    else:
        v, why = "neither", "the best window neither tracks k everywhere nor is 0-1 everywhere"
    if not planted:
        v, why = "undecided", "no planted organism measured"
    return {"verdict": v, "why": why, "per_organism": per}


def matched_test(doc: dict) -> dict[str, Any] | None:
    """auto vs all@match=auto on the flip rate, from compare.json's paired statistics."""
    arms = doc["arms"]
    if "auto" not in arms or "all@match=auto" not in arms:
        return None
    if doc["reference"] != "auto":  # every comparison here is made with reference="auto"
        return None
    t = arms["all@match=auto"]["vs_reference"][FLIP]
    diff, ci = -t["diff"], [-t["ci"][1], -t["ci"][0]] if t["ci"][0] is not None else t["ci"]
    lo, hi = ci
    call = ("undefined" if lo is None else "auto better" if hi < 0 else
            "auto worse" if lo > 0 else "no difference detected")
    return {"diff_auto_minus_matched": diff, "ci": ci, "p": t.get("p"),
            "sign_flip_p": t.get("sign_flip_p"), "call": call, "covers": t.get("covers")}


# ---- the parts --------------------------------------------------------------------------------

def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def organism_files(preset: str, seed: int, quick: bool) -> dict[str, Any]:
    from mechlora.organism import build_organism, load_folds, read_meta

    path = build_organism(preset=preset, seed=seed, quick=quick, progress=not quick)
    fold = next(iter(load_folds(path).values()))
    meta = read_meta(path)
    return {"path": path, "fold": fold, "k": meta["planted"]["commit"],
            "window": meta["planted"]["window"]}


def localization(org: dict, folder: Path) -> Path:
    """`auto`'s scores: the flip pairs of LOCALIZE_GROUPS training groups (as
    analyses/organisms.py), localized once per organism and kept in `folder`."""
    from mechlora.data import load_groups, make_pairs
    from mechlora.localize import localize
    from mechlora.models import load_model

    if (folder / "localization.json").is_file():
        from mechlora.result import LocalizationResult

        made_on = LocalizationResult.load(folder).model
        if made_on != str(org["path"]):
            raise MechloraError(f"{folder} localizes {made_on}, not {org['path']}; choose "
                                "another --out")
        return folder
    groups = load_groups(org["fold"].train)[:LOCALIZE_GROUPS]
    pairs = make_pairs(groups, max_pairs_per_group=6, seed=0)
    subject = load_model(str(org["path"]), device="cpu", dtype="float32")
    loc = localize(subject, pairs, only_flips=True, progress=False)
    if loc.n_pairs == 0:  # a quick organism may not flip at all: every pair instead
        loc = localize(subject, pairs, min_delta=1e-3, progress=False)
    loc.save(folder)
    return folder


def config(lr: float, steps: int, **overrides):
    from mechlora.train import TrainConfig

    return TrainConfig(**{**RECIPE, "lr": lr, "max_steps": steps, **overrides})


def part_search(args, out: Path) -> dict:
    """The settings rule on organism-mid's validation file; cached in OUT/search.json."""
    from mechlora.data import load_groups
    from mechlora.io import read_json, read_jsonl, write_json
    from mechlora.train import train_arm

    path = out / "search.json"
    org = organism_files("organism-mid", 0, args.quick)
    key = {"organism": str(org["path"]), "grid": list(args.grid), "steps": args.steps,
           "check_every": args.check_every, "validation_groups": args.validation_groups,
           "recipe": RECIPE}
    if path.is_file():
        doc = read_json(path)
        if doc.get("key") != key:
            raise MechloraError(f"{path} was made with other settings ({doc.get('key')}); "
                                "choose another --out")
        return doc
    validation = load_groups(org["fold"].validation)[:args.validation_groups]
    runs, base = [], None
    for lr in args.grid:
        folder = out / "search" / f"lr{lr:g}"
        _log(f"search: all layers, lr {lr:g}, {args.steps} steps, validation check every "
             f"{args.check_every}")
        train_arm(str(org["path"]), org["fold"].train, folder, layers="all",
                  config=config(lr, args.steps, seed=0, eval_every=args.check_every),
                  eval_pairs=validation, progress=not args.quick)
        rows = read_jsonl(folder / "metrics.jsonl")
        checks = [r for r in rows if r["kind"] == "eval"]
        base = base or next(r for r in checks if r["step"] == 0)
        runs += [{"lr": lr, "steps": r["step"], **{k: r[k] for k in
                  ("flip_rate", "accuracy", "margin_diff", "n_pairs")}}
                 for r in checks if r["step"] > 0]
    base = {k: base[k] for k in ("flip_rate", "accuracy", "margin_diff", "n_pairs")}
    chosen = choose_setting(base, runs)
    replaced = first_rule(base, runs)
    _log(f"search: lr {chosen['lr']:g}, {chosen['steps']} steps ({chosen['why']})")
    doc = {"key": key, "organism": "organism-mid@0", "fold": org["fold"].name, "arm": "all",
           "seed": 0,
           "validation_groups": len(validation), "base": base, "checks": runs,
           "chosen": chosen, "rule": _first_paragraph(choose_setting.__doc__),
           "first_rule": {"rule": _first_paragraph(first_rule.__doc__), "would_choose": replaced}}
    write_json(path, doc)
    return doc


def part_main(args, out: Path, chosen: dict) -> list[dict]:
    """One comparison per organism (and organism seed); returns their summaries."""
    import mechlora
    from mechlora.data import load_groups

    rows = []
    for preset in args.presets:
        for oseed in args.organism_seeds or ORGANISM_SEEDS.get(preset, (0,)):
            org = organism_files(preset, oseed, args.quick)
            mid = preset == "organism-mid" and oseed == 0
            arms = args.arms or (ARMS if mid else ARMS_OTHER)
            seeds = args.seeds or SEEDS
            test = load_groups(org["fold"].test)[:args.test_groups]
            loc = localization(org, out / "localization" / f"{preset}-seed{oseed}")
            _log(f"main: {preset}@{oseed} (k={org['k']}): arms {arms}; seeds {list(seeds)}")
            result = mechlora.compare(str(org["path"]), org["fold"].train, test,
                                      out=out / "main" / f"{preset}-seed{oseed}", arms=arms,
                                      seeds=list(seeds),
                                      config=config(chosen["lr"], chosen["steps"]),
                                      reference="auto", from_localization=loc,
                                      n_boot=args.n_boot, progress=not args.quick,
                                      plotlyjs="cdn")
            rows.append(organism_summary(preset, oseed, org, result.doc))
            _log(f"main: {preset}@{oseed}: best window {rows[-1]['best']['arm']}, auto "
                 f"{rows[-1]['auto_layers']}, {result.doc['last_run']}")
    return rows


def part_dose(args, out: Path, chosen: dict) -> list[dict]:
    """organism-mid, `auto` and `all`, every kl_weight of --dose; RECIPE's own weight is read
    from the main comparison of organism-mid when it is there."""
    import mechlora
    from mechlora.data import load_groups

    org = organism_files("organism-mid", 0, args.quick)
    test = load_groups(org["fold"].test)[:args.test_groups]
    loc = localization(org, out / "localization" / "organism-mid-seed0")
    points = []
    for kl in args.dose:
        _log(f"dose: kl_weight {kl:g}")
        result = mechlora.compare(str(org["path"]), org["fold"].train, test,
                                  out=out / "dose" / f"kl{kl:g}", arms=DOSE_ARMS,
                                  seeds=list(args.seeds or SEEDS),
                                  config=config(chosen["lr"], chosen["steps"], kl_weight=kl),
                                  reference="auto", from_localization=loc,
                                  n_boot=args.n_boot, progress=not args.quick, plotlyjs="cdn")
        for arm, a in result.doc["arms"].items():
            points.append({"kl_weight": kl, "arm": arm, **_metrics(a["metrics"])})
        base = _metrics(result.doc["base"]["metrics"])
    main = out / "main" / "organism-mid-seed0" / "compare.json"
    if points and main.is_file():
        from mechlora.io import read_json

        doc = read_json(main)
        points += [{"kl_weight": RECIPE["kl_weight"], "arm": arm,
                    **_metrics(doc["arms"][arm]["metrics"])}
                   for arm in DOSE_ARMS.split(",") if arm in doc["arms"]]
        points.sort(key=lambda p: (p["arm"], p["kl_weight"]))
    return [{"kl_weight": None, "arm": "base", **base}, *points] if points else []


# ---- summaries --------------------------------------------------------------------------------

def _metrics(block: dict) -> dict:
    return {m: {"mean": block[m]["mean"], "ci": block[m]["ci"],
                "per_seed": block[m].get("per_seed")} for m in METRICS if m in block}


def organism_summary(preset: str, oseed: int, org: dict, doc: dict) -> dict[str, Any]:
    arms = doc["arms"]
    base = doc["base"]["metrics"]
    first = str(doc["seeds"][0])

    def layers(a):
        return arms[a]["seeds"][first]["layers"]

    windows = {a: {"layers": layers(a), "flip": arms[a]["metrics"][FLIP]["mean"],
                   "accuracy": arms[a]["metrics"]["accuracy"]["mean"]}
               for a in arms if arms[a]["single"] == 2}
    for w in windows.values():  # descriptive, not part of the decision rule: the settings' gain
        w["net_gain"] = (base[FLIP]["mean"] - w["flip"]) - max(
            0.0, base["accuracy"]["mean"] - w["accuracy"])
    auto_by_seed = {s: r["layers"] for s, r in arms["auto"]["seeds"].items()}
    ranked = sorted(windows, key=lambda a: windows[a]["flip"])
    auto_window = next((a for a in windows if windows[a]["layers"] == layers("auto")), None)
    return {
        "name": preset, "organism_seed": oseed, "k": org["k"],
        "window": org["window"], "fold": org["fold"].name,
        "compare": str(Path("main") / f"{preset}-seed{oseed}" / "compare.json"),
        "base": _metrics(base), "by_phenomenon_base": doc["base"].get("by_phenomenon"),
        "auto_layers": layers("auto"), "auto_layers_by_seed": auto_by_seed,
        "auto_window_rank": ranked.index(auto_window) + 1 if auto_window else None,
        "n_windows": len(windows), "windows": windows,
        "best": best_window(windows, base["accuracy"]["mean"]) if windows else None,
        "arms": {a: {"layers": layers(a), "trainable": arms[a]["seeds"][first]
                     ["trainable_parameters"], **_metrics(arms[a]["metrics"])}
                 for a in arms},
        "auto_vs_matched": matched_test(doc),
        "spearman": [{"width": s["width"], **{src: {"rho": v["rho"], "ci": v["ci"]}
                                              for src, v in s["spearman"].items()}}
                     for s in doc["single"]],
        "budget": doc["budget"], "seeds": doc["seeds"], "last_run": doc["last_run"],
    }


def _first_paragraph(text: str) -> str:
    return " ".join(text.split("\n\n")[0].split())


def _pct(block: dict | None, signed: bool = False) -> str:
    if not block or block.get("mean") is None:
        return "n/a"
    lo, hi = block["ci"] if block.get("ci") else (None, None)
    sign = "+" if signed else ""
    ci = f" [{lo:{sign}.1%}, {hi:{sign}.1%}]" if lo is not None else ""
    return f"{block['mean']:{sign}.1%}{ci}"


def markdown(summary: dict) -> str:
    lines = [f"Verdict: **{summary['verdict']['verdict']}** ({summary['verdict']['why']}).", ""]
    if summary.get("search"):
        c = summary["search"]["chosen"]
        lines += [f"Settings (validation, organism-mid, `all`): lr {c['lr']:g}, {c['steps']} "
                  f"steps ({c['why']}).", ""]
    lines += ["| organism | k | auto (window:2) | auto's rank among the windows | best window | "
              "windows within the accuracy slack | best window flip / acc. | base flip / acc. | "
              "auto flip / acc. | all flip / acc. | all@match=auto flip / acc. | "
              "auto - all@match=auto |", "|---" * 12 + "|"]
    for o in summary["organisms"]:
        a = o["arms"]
        t = o["auto_vs_matched"]
        test = ("n/a" if not t else f"{t['diff_auto_minus_matched']:+.1%} "
                f"[{t['ci'][0]:+.1%}, {t['ci'][1]:+.1%}] ({t['call']})"
                if t["ci"][0] is not None else f"{t['diff_auto_minus_matched']:+.1%} (no interval)")
        b = o["best"]

        lines.append(
            f"| {o['name']}@{o['organism_seed']} | {o['k']} | "
            f"{_span(o['auto_layers'])} | {o['auto_window_rank']} of {o['n_windows']} | "
            f"{_span(b['layers'])} | {b['n_eligible']} of {o['n_windows']} | "
            f"{b['flip']:.1%} / {b['accuracy']:.1%} | {_pct(o['base'][FLIP])} / "
            f"{o['base']['accuracy']['mean']:.1%} | {_fa(a, 'auto')} | {_fa(a, 'all')} | "
            f"{_fa(a, 'all@match=auto')} | {test} |")
    lines += ["", "Flip rate / accuracy / net gain (flips removed minus accuracy lost, against the "
              "base; descriptive, not the decision rule) of every width-2 window, means over "
              "seeds (* the decision rule's best window):", "",
              "| organism | " + " | ".join(f"{i}-{i + 1}" for i in range(7)) + " |",
              "|---" * 8 + "|"]
    for o in summary["organisms"]:
        by_start = {w["layers"][0]: w for w in o["windows"].values()}
        cells = [f"{by_start[i]['flip']:.1%} / {by_start[i]['accuracy']:.1%} / "
                 f"{by_start[i]['net_gain']:+.1%}"
                 + ("*" if by_start[i]["layers"] == o["best"]["layers"] else "")
                 if i in by_start else "" for i in range(7)]
        lines.append(f"| {o['name']}@{o['organism_seed']} | " + " | ".join(cells) + " |")
    for o in summary["organisms"]:
        for s in o["spearman"]:
            lines += ["", f"Spearman, {o['name']}@{o['organism_seed']}, width {s['width']}: "
                      + "; ".join(f"{src} {v['rho']:+.2f}" +
                                  (f" [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}]"
                                   if v["ci"] and v["ci"][0] is not None else "")
                                  for src, v in s.items() if src != "width"
                                  and v["rho"] is not None)]
    for o in summary["organisms"]:
        lines += ["", f"Every arm of {o['name']}@{o['organism_seed']} (test family "
                  f"{o['fold']}; mean over seeds [95% interval over seeds and questions]):", "",
                  "| arm | layers | LoRA parameters | flip | accuracy | margin diff | "
                  "text-only agreement (gray) | swap sensitivity |", "|---" * 8 + "|",
                  f"| base | | | {_pct(o['base'][FLIP])} | {_pct(o['base']['accuracy'])} | "
                  f"{o['base']['margin_diff']['mean']:.2f} | "
                  f"{_pct(o['base'].get('text_only_agreement_gray'))} | "
                  f"{_pct(o['base'].get('swap_sensitivity'))} |"]
        for name, a in o["arms"].items():
            lines.append(f"| {name} | {_span(a['layers'])} | {a['trainable']:,} | "
                         f"{_pct(a[FLIP])} | {_pct(a['accuracy'])} | "
                         f"{a['margin_diff']['mean']:.2f} | "
                         f"{_pct(a.get('text_only_agreement_gray'))} | "
                         f"{_pct(a.get('swap_sensitivity'))} |")
    if summary.get("dose"):
        lines += ["", "KL dose-response (organism-mid@0):", "",
                  "| kl_weight | arm | flip | accuracy | margin diff |", "|---|---|---|---|---|"]
        for p in summary["dose"]:
            kl = "-" if p["kl_weight"] is None else f"{p['kl_weight']:g}"
            lines.append(f"| {kl} | {p['arm']} | {_pct(p[FLIP])} | {_pct(p['accuracy'])} | "
                         f"{p['margin_diff']['mean']:.2f} |")
    return "\n".join(lines) + "\n"


def _fa(arms: dict, name: str) -> str:
    if name not in arms:
        return "n/a"
    return f"{_pct(arms[name][FLIP])} / {arms[name]['accuracy']['mean']:.1%}"


def _span(layers: list[int]) -> str:
    return str(layers[0]) if len(layers) == 1 else (
        f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1))
        else "+".join(map(str, layers)))


def report(summary: dict, path: Path) -> None:
    import plotly.graph_objects as go

    from mechlora.report.page import Page

    page = Page("Does localization inform fine-tuning? Planted-depth organisms")
    page.text(f"Verdict: {summary['verdict']['verdict']}: {summary['verdict']['why']}. "
              f"Command: {summary['command']}")
    fig = go.Figure()
    for o in summary["organisms"]:
        starts = sorted(w["layers"][0] for w in o["windows"].values())
        by = {w["layers"][0]: w for w in o["windows"].values()}
        fig.add_scatter(x=starts, y=[by[s]["flip"] for s in starts], mode="lines+markers",
                        name=f"{o['name']}@{o['organism_seed']} (k={o['k']})")
    fig.update_layout(xaxis_title="first layer of the width-2 window",
                      yaxis_title="held-out flip rate (mean over seeds)", height=420)
    page.heading("Flip rate of every width-2 window").figure(fig)
    rows = [[f"{o['name']}@{o['organism_seed']}", o["k"], _span(o["auto_layers"]),
             _span(o["best"]["layers"]), f"{o['best']['flip']:.1%}",
             _pct(o["arms"]["auto"][FLIP]), _pct(o["arms"].get("all", {}).get(FLIP)),
             (o["auto_vs_matched"] or {}).get("call", "n/a")] for o in summary["organisms"]]
    page.table(["organism", "k", "auto", "best window", "its flip", "auto flip", "all flip",
                "auto vs all@match=auto"], rows)
    if summary.get("dose"):
        fig = go.Figure()
        for arm in ("auto", "all"):
            pts = [p for p in summary["dose"] if p["arm"] == arm]
            fig.add_scatter(x=[p["accuracy"]["mean"] for p in pts],
                            y=[p[FLIP]["mean"] for p in pts], mode="lines+markers+text",
                            text=[f"KL {p['kl_weight']:g}" for p in pts],
                            textposition="top center", name=arm)
        base = next(p for p in summary["dose"] if p["arm"] == "base")
        fig.add_scatter(x=[base["accuracy"]["mean"]], y=[base[FLIP]["mean"]], mode="markers",
                        marker=dict(symbol="x", size=12, color="black"), name="base")
        fig.update_layout(xaxis_title="held-out accuracy", yaxis_title="held-out flip rate",
                          height=420)
        page.heading("KL weight: flip rate vs accuracy (organism-mid)").figure(fig)
    page.text("Each comparison's own report: main/*/report.html, dose/*/report.html.", note=True)
    page.write(path)


# ---- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--organism-seeds", nargs="+", type=int, default=None,
                        help="organism seeds for every preset (default: ORGANISM_SEEDS)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="LoRA seeds (default: 1 2 3)")
    parser.add_argument("--arms", default=None, help="arms for every organism (default: see "
                        "the docstring)")
    parser.add_argument("--dose", nargs="+", type=float, default=list(DOSE))
    parser.add_argument("--out", type=Path, default=None,
                        help="working folder (default runs/analyses/localization_vs_editing)")
    parser.add_argument("--results", default=None,
                        help="where summary.json and results.md are copied ('' to skip)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="quick organisms, 2 steps, a few questions: a smoke test")
    args = parser.parse_args(argv)
    if args.arms is not None:
        names = [a.strip() for a in args.arms.split(",")]
        if "auto" not in names or "single:2" not in names:
            raise MechloraError(f"--arms {args.arms}: the summary needs `auto` and `single:2` "
                                "(the windows it ranks); add them")
    import torch

    torch.set_num_threads(args.threads)
    sizes = (dict(grid=(5e-3,), steps=2, check_every=1, test_groups=6, validation_groups=6,
                  n_boot=50) if args.quick else
             dict(grid=GRID["lr"], steps=STEPS, check_every=CHECK_EVERY,
                  test_groups=TEST_GROUPS, validation_groups=VALIDATION_GROUPS, n_boot=2000))
    for k, v in sizes.items():
        setattr(args, k, v)
    name = "localization_vs_editing" + ("_quick" if args.quick else "")
    out = args.out or ROOT / "runs" / "analyses" / name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    search = part_search(args, out)
    chosen = search["chosen"]
    organisms = part_main(args, out, chosen) if "main" in args.parts else []
    dose = part_dose(args, out, chosen) if "dose" in args.parts else []
    from mechlora.io import atomic_write_text, write_json

    summary = {"schema_version": SCHEMA_VERSION,
               "kind": "mechlora.analysis.localization_vs_editing",
               "command": "python analyses/localization_vs_editing.py " + " ".join(
                   sys.argv[1:] if argv is None else argv),
               "design": {"arms": args.arms or {"organism-mid@0": ARMS, "other": ARMS_OTHER},
                          "seeds": args.seeds or SEEDS,
                          "organism_seeds": args.organism_seeds or ORGANISM_SEEDS,
                          "test_groups": args.test_groups,
                          "recipe": RECIPE, "dose": args.dose, "quick": args.quick},
               "decision_rule": _first_paragraph(best_window.__doc__) + " " +
               _first_paragraph(verdict.__doc__), "search": search,
               "organisms": organisms, "verdict": verdict(organisms), "dose": dose,
               "seconds_this_call": round(time.perf_counter() - t0, 1)}
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "results.md", markdown(summary))
    report(summary, out / "report.html")
    results = (Path(args.results) if args.results else None) if args.results is not None else (
        None if args.quick else HERE / "results" / "localization_vs_editing")
    if results:
        results.mkdir(parents=True, exist_ok=True)
        for f in ("summary.json", "results.md"):
            shutil.copyfile(out / f, results / f)
    _log(f"done: {out / 'summary.json'}; verdict {summary['verdict']['verdict']}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except MechloraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
