"""`compare`: train every arm for every seed at one budget, evaluate them all on one held-out
file, and compare them with seed-level statistics (docs/compare.md).

    OUT/design.json                      what the comparison is (a resumed one must match)
    OUT/scores/                          per-layer scores, computed once on the training pairs
    OUT/base/eval/                       the base model's predictions on the held-out file
    OUT/arms/ARM/seed-S/                 one adapter (mechlora train's folder) ...
    OUT/arms/ARM/seed-S/eval/            ... and its predictions (reused while they match)
    OUT/arms/ARM/seed-S/before_after/    with localize_arms: the adapter localized on the
                                         base localization's training pairs (reused too)
    OUT/compare.json, OUT/report.html    the comparison
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mechlora.compare.arms import Arm, canonical, choose, needed_scores, parse_arms
from mechlora.compare.summary import (
    FLIP,
    arm_metrics,
    by_phenomenon,
    paired,
    single_layer_test,
    table,
)
from mechlora.data import QuestionGroup, data_hash
from mechlora.errors import MechloraError
from mechlora.io import jsonable, prepare_out_dir, read_json, read_jsonl, write_json, write_jsonl
from mechlora.metrics import LOW_CHOICE_MASS, VariantPrediction
from mechlora.models.choices import LOW_MASS_NOTE
from mechlora.models.subject import Subject
from mechlora.select import SCORE_SOURCES, Scores, Selection, apply_selector
from mechlora.stats import MIN_SIGN_FLIP_SEEDS
from mechlora.training.config import TrainConfig
from mechlora.training.inputs import read_groups

SCHEMA_VERSION = 1
DEFAULT_ARMS = "auto,all,early:5,random:5"
DESIGN = "design.json"
# Settings that change no result (bookkeeping, memory): a resumed comparison may change them.
BOOKKEEPING = ("save_every", "keep_checkpoints", "eval_every", "micro_batch",
               "gradient_checkpointing", "skip_nonfinite")
PER_ARM = ("seed", "match_params")  # what differs between the runs besides the layers
POWER_NOTE = ("With {n} training seed{s} the seed-level intervals are optimistic and the tests "
              "have little power: in docs/metrics.md's simulation a nominal 95% interval covered "
              "the truth about 74% of the time with 3 seeds and 86% with 5, and the sign-flip "
              "test over seeds needs at least 5 seeds (6 to reach p < 0.05). Treat differences "
              "as descriptive and run more seeds before claiming one.")


@dataclass
class CompareResult:
    """compare.json (`doc`) and every arm's predictions: arm -> seed -> predictions (the base
    under "base", seed None)."""

    out: Path
    doc: dict[str, Any]
    predictions: dict[str, dict[int | None, list[VariantPrediction]]]

    @property
    def arms(self) -> dict[str, Any]:
        return self.doc["arms"]

    @classmethod
    def load(cls, out: str | Path) -> CompareResult:
        out = Path(out)
        doc = read_json(out / "compare.json")
        if doc.get("kind") != "mechlora.compare" or doc.get("schema_version") != SCHEMA_VERSION:
            raise MechloraError(f"{out}/compare.json is not a mechlora comparison of schema "
                                f"version {SCHEMA_VERSION}; rerun mechlora compare")
        preds = {"base": {None: _read_predictions(out / doc["base"]["folder"])}}
        for name, arm in doc["arms"].items():
            preds[name] = {int(s): _read_predictions(out / run["folder"])
                           for s, run in arm["seeds"].items()}
        return cls(out, doc, preds)


def compare(model: Subject | str, pairs: str | Path | Sequence[QuestionGroup],
            eval_pairs: str | Path | Sequence[QuestionGroup], *, out: str | Path,
            arms: str | Sequence[str] = DEFAULT_ARMS, seeds: int | Sequence[int] = 3,
            config: TrainConfig | None = None, reference: str | None = None,
            match_params: str | None = None, from_localization: str | Path | None = None,
            scores: Sequence[str] = (), gray: bool | None = None, noimage: bool = False,
            swap: bool | None = None, eval_batch_size: int = 16, n_boot: int = 2000,
            level: float = 0.95, overwrite: bool = False, progress: bool = True,
            dtype: str | None = None, device: str | None = None,
            trust_remote_code: bool = False, plotlyjs: str = "embed",
            localize_arms: bool = False) -> CompareResult:
    """Train every arm for every seed with `config` (the same budget for all), evaluate the
    base model and every adapter on `eval_pairs`, and write OUT/compare.json and report.html.

    `arms`: a comma-separated string or a list (grammar in `mechlora.compare.arms`); `seeds`:
    a count (starting at `config.seed`) or the seeds themselves. Finished arms, scores and
    predictions in `out` are reused. `reference`: the arm every arm is also tested against
    (default `auto` when it is an arm). `match_params`: a selector whose parameter count every
    arm but the single ones holds (as `@match=`). `scores`: score sources to compute and plot
    beyond those the arms need (a `single` arm adds all four). `gray`/`noimage`/`swap` as in
    `mechlora.evaluate`. `localize_arms`: localize the base once on a subset of the training
    pairs and every adapter on the same pairs, and say where each shrank the divergence
    (`mechlora.compare.localize_arms`; one localization sweep per arm and seed).
    """
    cfg = (config or TrainConfig()).validate()
    if cfg.match_params is not None:
        raise MechloraError("config.match_params is set per arm in a comparison; use "
                            "match_params= (--match-params) or ARM@match=REF")
    if n_boot < 1:
        raise MechloraError(f"n_boot must be at least 1, got {n_boot}")
    seed_list = _seeds(seeds, cfg.seed)
    parse_arms(arms, 10_000, match_params)  # the grammar fails before any model loads
    extra = _sources(scores)
    train_groups = read_groups(pairs, "training")
    eval_groups = read_groups(eval_pairs, "eval")
    from mechlora.training.model import load_subject, pick_device

    subject = load_subject(model, dtype, pick_device(model, device), trust_remote_code)
    n = subject.n_layers
    arm_list = parse_arms(arms, n, match_params)
    ref = _reference(reference, arm_list, n)
    sources = needed_scores(arm_list) | extra
    if any(a.single for a in arm_list):
        sources |= set(SCORE_SOURCES)
    design = _design(subject, cfg, train_groups, eval_groups)
    reads = [model if isinstance(model, str) else None, from_localization,
             *[p for p in (pairs, eval_pairs) if isinstance(p, (str, Path))],
             *{g.image.parent for g in [*train_groups, *eval_groups] if g.image is not None}]
    out = _prepare(Path(out), overwrite, design, reads)
    t0 = time.perf_counter()
    score_sets = _scores(subject, train_groups, sources, cfg, seed_list[0], out,
                         from_localization, progress)
    options = dict(gray=gray, noimage=noimage, swap=swap, batch_size=eval_batch_size,
                   n_boot=n_boot, merge_variants=cfg.merge_variants, progress=progress)
    log = tqdm.write if progress else (lambda *_: None)
    base = _predictions(subject, eval_groups, out / "base", None, options)
    log(f"base: flip {_rate(base.preds, FLIP):.1%}, accuracy "
        f"{_rate(base.preds, 'accuracy'):.1%} ({'reused' if base.reused else 'evaluated'})")
    runs: dict[str, dict[int, dict]] = {a.name: {} for a in arm_list}
    counts = {"trained": 0, "evaluated": int(not base.reused)}
    jobs = [(a, s) for a in arm_list for s in seed_list]
    bar = tqdm(jobs, desc="compare", unit="arm", disable=not progress)
    for arm, seed in bar:
        bar.set_postfix_str(f"{arm.name} seed {seed}")
        run = _train_and_evaluate(subject, arm, seed, train_groups, eval_groups, cfg,
                                  score_sets, out, options, progress)
        counts["trained"] += not run["reused_training"]
        counts["evaluated"] += not run["reused_eval"]
        runs[arm.name][seed] = run
        log(_summary_line(arm, seed, run))
    bar.close()
    before_after = None
    if localize_arms:
        before_after = _localize_arms(subject, train_groups, cfg, seed_list[0], out,
                                      from_localization, runs, counts, progress)
    doc = _document(subject, cfg, seed_list, arm_list, ref, score_sets, train_groups,
                    eval_groups, base, runs, design, n_boot=n_boot, level=level,
                    options=options, from_localization=from_localization,
                    before_after=before_after)
    doc["last_run"] = {**counts, "seconds": round(time.perf_counter() - t0, 3)}
    write_json(out / "compare.json", doc)
    from mechlora.report.compare import write_report

    write_report(out / "report.html", doc, plotlyjs=plotlyjs)
    preds = {"base": {None: base.preds},
             **{name: {s: r["preds"] for s, r in by_seed.items()} for name, by_seed in
                runs.items()}}
    return CompareResult(out, doc, preds)


# ---- setting up -------------------------------------------------------------------------------

def _seeds(seeds: int | Sequence[int], start: int) -> list[int]:
    if isinstance(seeds, bool):
        raise MechloraError("seeds must be a count or a list of seeds")
    if isinstance(seeds, int):
        if seeds < 1:
            raise MechloraError(f"--seeds must be at least 1, got {seeds}")
        return list(range(start, start + seeds))
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out):
        raise MechloraError(f"seeds must be distinct and at least one, got {list(seeds)}")
    return out


def _sources(scores: Sequence[str] | str) -> set[str]:
    names = scores.split(",") if isinstance(scores, str) else list(scores)
    out = set()
    for name in (s.strip().lower() for s in names):
        name = {"loc": "localization"}.get(name, name)
        if name and name not in SCORE_SOURCES:
            raise MechloraError(f"--scores {name}: use {', '.join(SCORE_SOURCES)}")
        if name:
            out.add(name)
    return out


def _reference(reference: str | None, arms: list[Arm], n: int) -> str | None:
    names = [a.name for a in arms]
    if reference is None:
        return "auto" if "auto" in names else None
    text = reference.strip().lower()
    name = canonical(text, n, text).replace(",", "+") if "@" not in text else text
    if name not in names:
        raise MechloraError(f"--reference {reference} is not one of the arms "
                            f"({', '.join(names)})")
    return name


def _design(subject: Subject, cfg: TrainConfig, train_groups, eval_groups) -> dict[str, Any]:
    config = {k: v for k, v in cfg.to_dict().items() if k not in (*BOOKKEEPING, *PER_ARM)}
    return {"model": subject.name, "n_layers": subject.n_layers,
            "train_sha256": data_hash(train_groups), "eval_sha256": data_hash(eval_groups),
            "config": config}


def _prepare(out: Path, overwrite: bool, design: dict, reads: list) -> Path:
    """A new folder, or the folder of this very comparison (resumed); never another's."""
    path = out / DESIGN
    if path.is_file() and not overwrite:
        old = read_json(path)
        differ = [k for k in sorted(set(old) | set(design)) if k != "config"
                  and old.get(k) != design.get(k)]
        old_cfg, new_cfg = old.get("config", {}), design["config"]
        differ += [f"config.{k}" for k in sorted(set(old_cfg) | set(new_cfg))
                   if old_cfg.get(k) != new_cfg.get(k)]
        if differ:
            raise MechloraError(f"{out} holds a comparison of another design ({', '.join(differ)}"
                                " differ); pass --overwrite to replace it, or choose another "
                                "--out")
        return prepare_out_dir(out, resume=True, inputs=reads)
    out = prepare_out_dir(out, overwrite, inputs=reads)
    write_json(path, design)
    return out


# ---- scores (once, on the training pairs) -----------------------------------------------------

def _scores(subject: Subject, groups, sources: set[str], cfg: TrainConfig, seed: int, out: Path,
            from_localization, progress: bool) -> dict[str, Scores]:
    """Each source's per-layer scores, computed once with the first training seed on the
    training pairs (snr: the weights) and kept in OUT/scores/; reused when present."""
    from mechlora.selectors import compute_scores
    from mechlora.training.layers import load_localization, localize_groups, score_options

    result = {}
    folder = out / "scores"
    for source in [s for s in SCORE_SOURCES if s in sources]:
        if source == "localization":
            here = folder / "localization"
            if from_localization is not None:
                loc, path = load_localization(from_localization, subject.n_layers), \
                    str(from_localization)
            elif (here / "localization.json").is_file():
                loc, path = load_localization(here, subject.n_layers), "scores/localization"
            else:
                if progress:
                    tqdm.write(f"scores: localizing {min(cfg.localize_groups, len(groups))} "
                               "training groups")
                loc = localize_groups(subject, groups, dataclasses.replace(cfg, seed=seed),
                                      progress=progress)
                loc.save(here)
                path = "scores/localization"
            result[source] = Scores.from_localization(loc, path)
            continue
        file = folder / f"{source}.json"
        if file.is_file():
            result[source] = Selection.load(file).scores
            continue
        if progress:
            tqdm.write(f"scores: {source} on the {len(groups)} training groups")
        options = score_options(source, cfg)
        if source in ("grad", "bi"):
            options["seed"] = seed
        scores = compute_scores(source, subject, None if source == "snr" else list(groups),
                                progress=progress, **options)
        apply_selector("all", scores, subject.n_layers, model=subject.name).save(file)
        result[source] = scores
    return result


# ---- before and after training (localize_arms) ------------------------------------------------

def _localize_arms(subject, train_groups, cfg: TrainConfig, seed: int, out: Path,
                   from_localization, runs, counts: dict, progress: bool) -> dict[str, Any]:
    """Localize the base once and every run's adapter on its pairs; each run gets its entry
    (`run["before_after"]`); returns compare.json's `before_after`."""
    from mechlora.compare import localize_arms as la

    base, where = la.base_localization(subject, train_groups, cfg, seed, out,
                                       from_localization, progress)
    counts["localized"] = 0
    if not base.n_pairs:
        return {**la.base_entry(base, where), "note": "the base localization kept no pair: "
                "nothing to compare the adapters with"}
    log = tqdm.write if progress else (lambda *_: None)
    for name, by_seed in runs.items():
        for seed_, run in by_seed.items():
            folder = out / run["folder"]
            comparison, reused = la.localize_run(
                subject, train_groups, base, folder,
                _sha256(folder / "adapter_model.safetensors"),
                merge_variants=cfg.merge_variants, progress=progress)
            counts["localized"] += not reused
            run["before_after"] = la.run_entry(comparison, run["folder"])
            log(f"{name} seed {seed_}: {comparison.verdict()}"
                f"{' (reused)' if reused else ''}")
    return la.base_entry(base, where)


# ---- one arm and seed -------------------------------------------------------------------------

@dataclass
class _Predictions:
    preds: list[VariantPrediction]
    seconds: float
    reused: bool
    notes: list[str]


def _train_and_evaluate(subject, arm: Arm, seed: int, train_groups, eval_groups,
                        cfg: TrainConfig, score_sets, out: Path, options, progress) -> dict:
    from mechlora.train import train_arm
    from mechlora.training.outputs import finished

    n = subject.n_layers
    selection = choose(arm.selector, seed, score_sets, n, cfg.rule, subject.name)
    match = None if arm.match is None else \
        choose(arm.match, seed, score_sets, n, cfg.rule, subject.name).spec
    run_cfg = dataclasses.replace(cfg, seed=seed,
                                  match_params=None if match is None else str(match))
    folder = out / "arms" / arm.folder / f"seed-{seed}"
    reused = finished(folder) is not None
    record = train_arm(subject, train_groups, folder, layers=selection, config=run_cfg,
                       progress=progress)
    evaluated = _predictions(subject, eval_groups, folder, folder, options)
    return {"folder": folder.relative_to(out).as_posix(), "selection": selection,
            "record": record, "train_seconds": _train_seconds(folder),
            "reused_training": reused, "reused_eval": evaluated.reused,
            "eval_seconds": evaluated.seconds, "preds": evaluated.preds,
            "notes": evaluated.notes}


def _train_seconds(folder: Path) -> float:
    rows = read_jsonl(folder / "metrics.jsonl") if (folder / "metrics.jsonl").is_file() else []
    return float(sum(r.get("seconds", 0.0) for r in rows if r["kind"] == "train"))


def _predictions(subject: Subject, groups, folder: Path, adapter: Path | None,
                 options: dict) -> _Predictions:
    """Predictions of the base (adapter None) or an adapter on `groups`, cached in
    FOLDER/eval/ and reused while the data, adapter weights and settings are the same."""
    from mechlora.evaluate import attached, evaluate

    here = folder / "eval"
    key = {"model": subject.name, "eval_sha256": data_hash(groups),
           "adapter_sha256": None if adapter is None else _sha256(adapter /
                                                                  "adapter_model.safetensors"),
           "dtype": str(next(subject.model.parameters()).dtype),
           **{k: options[k] for k in ("gray", "noimage", "swap", "merge_variants")}}
    if (here / "eval.json").is_file() and (here / "predictions.jsonl").is_file():
        doc = read_json(here / "eval.json")
        if doc.get("cache_key") == key:
            return _Predictions(_read_predictions(folder), doc["seconds"], True,
                                doc.get("notes", []))
    t0 = time.perf_counter()
    if adapter is None:
        result = evaluate(subject, groups, **options)
    else:
        with attached(subject, [adapter]) as (live, keys):
            live.model.set_adapter(keys[0])
            result = evaluate(live, groups, **options)
    seconds = time.perf_counter() - t0
    write_jsonl(here / "predictions.jsonl", result.records)
    write_json(here / "eval.json", {**result.to_json(), "cache_key": key, "seconds": seconds})
    return _Predictions(result.predictions["base"], seconds, False, result.notes)


def _read_predictions(folder: Path) -> list[VariantPrediction]:
    return [VariantPrediction.from_dict(r) for r in read_jsonl(folder / "eval" /
                                                                "predictions.jsonl")]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rate(preds: list[VariantPrediction], metric: str) -> float:
    t = table({0: preds}, list(dict.fromkeys(p.group_id for p in preds)))
    return float(t.sums[metric].sum() / max(t.counts[metric].sum(), 1))


def _summary_line(arm: Arm, seed: int, run: dict) -> str:
    lora, training = run["record"]["lora"], run["record"]["training"]
    final = training.get("final") or {}
    matched = f" (ranks matched to {lora['match']['reference']})" if lora.get("match") else ""
    loss = f", final loss {final['loss']:.3f}" if final.get("loss") is not None else ""
    return (f"{arm.name} seed {seed}: layers {run['selection'].spec}{matched}, "
            f"{lora['trainable_parameters']:,} parameters, {training['steps']} steps in "
            f"{run['train_seconds']:.0f} s{loss}{' (reused)' if run['reused_training'] else ''}"
            f"; flip {_rate(run['preds'], FLIP):.1%}, accuracy "
            f"{_rate(run['preds'], 'accuracy'):.1%}")


# ---- compare.json -----------------------------------------------------------------------------

def _document(subject, cfg: TrainConfig, seeds, arms: list[Arm], ref, score_sets, train_groups,
              eval_groups, base: _Predictions, runs, design, *, n_boot: int, level: float,
              options: dict, from_localization, before_after: dict | None = None
              ) -> dict[str, Any]:
    group_ids = [g.id for g in eval_groups]
    stats_kw = dict(n_boot=n_boot, level=level, seed=0)
    base_table = table({None: base.preds}, group_ids)
    tables = {a.name: table({s: r["preds"] for s, r in runs[a.name].items()}, group_ids)
              for a in arms}
    per_epoch, steps = cfg.steps(len(train_groups))
    shared = {k: v for k, v in cfg.to_dict().items() if k not in PER_ARM}
    doc_arms = {}
    for a in arms:
        doc_arms[a.name] = {
            "selector": a.selector, "match": a.match, "single": a.single or None,
            "seeds": {str(s): _run_entry(r) for s, r in runs[a.name].items()},
            "metrics": arm_metrics(tables[a.name], **stats_kw),
            "vs_base": paired(tables[a.name], base_table, **stats_kw),
            "vs_reference": None if ref is None or a.name == ref else
            paired(tables[a.name], tables[ref], **stats_kw),
            "by_phenomenon": by_phenomenon({s: r["preds"] for s, r in runs[a.name].items()},
                                           base.preds, group_ids, **stats_kw),
        }
    all_steps = {r["record"]["training"]["steps"] for by in runs.values() for r in by.values()}
    singles: dict[int, dict] = {}  # width -> arm -> (layers, table)
    for a in (a for a in arms if a.single):
        singles.setdefault(a.single, {})[a.name] = (
            runs[a.name][seeds[0]]["selection"].spec.layers, tables[a.name])
    notes = _notes(seeds, train_groups, eval_groups, base, runs)
    return jsonable({
        "schema_version": SCHEMA_VERSION, "kind": "mechlora.compare",
        "model": subject.name, "n_layers": subject.n_layers, "layers_path": subject.layers_path,
        "data": {"train": _data(train_groups), "eval": _data(eval_groups)},
        "seeds": seeds, "reference": ref,
        "config": shared,
        "budget": {"steps": steps, "steps_per_epoch": per_epoch,
                   "pairs_per_step": cfg.pairs_per_step, "n_train_groups": len(train_groups),
                   "equal": all_steps == {steps},
                   "same_for_every_arm": "training pairs, steps, batch, learning rate and its "
                                         "schedule, seeds and every other setting of config; "
                                         "arms differ only in their layers and LoRA ranks"},
        "eval": {**{k: options[k] for k in ("gray", "noimage", "swap", "batch_size")},
                 "choice_reading": "merged" if options["merge_variants"] else "first"},
        "scores": {source: _score_entry(s) for source, s in score_sets.items()},
        "base": {"folder": "base", "eval_seconds": base.seconds,
                 "metrics": arm_metrics(base_table, **stats_kw),
                 "by_phenomenon": by_phenomenon({None: base.preds}, base.preds, group_ids,
                                                **stats_kw)},
        "arms": doc_arms,
        "before_after": before_after,
        "single": [{"width": w, **single_layer_test(base_table, windows, score_sets,
                                                    **stats_kw)}
                   for w, windows in sorted(singles.items()) if len(windows) >= 2],
        "statistics": {
            "level": level, "n_boot": n_boot, "min_sign_flip_seeds": MIN_SIGN_FLIP_SEEDS,
            "interval": "per arm: mean over seeds and questions; percentile interval from "
                        "resampling training seeds and evaluation questions with replacement "
                        "(stats.seed_rate); wording pairs stay inside their question",
            "paired": "d[s, q] = arm A minus arm B (or the base) on question q with training "
                      "seed s; pooled mean of d, crossed seed x question bootstrap interval and "
                      "p (stats.crossed_bootstrap); sign-flip test over seeds "
                      f"(stats.seed_sign_flip_test) from {MIN_SIGN_FLIP_SEEDS} seeds on",
            "scores_seed": seeds[0], "from_localization": None if from_localization is None
            else str(from_localization)},
        "notes": notes,
    })


def _run_entry(run: dict) -> dict[str, Any]:
    record, sel = run["record"], run["selection"]
    lora = record["lora"]
    final = record["training"].get("final") or {}
    return {"folder": run["folder"], "layers": list(sel.spec.layers), "spec": str(sel.spec),
            "reason": sel.reason, "ranks": lora.get("ranks"), "match": lora.get("match"),
            "trainable_parameters": lora["trainable_parameters"],
            "steps": record["training"]["steps"], "final_loss": final.get("loss"),
            "train_seconds": run["train_seconds"], "eval_seconds": run["eval_seconds"],
            **({"before_after": run["before_after"]} if "before_after" in run else {})}


def _score_entry(scores: Scores) -> dict[str, Any]:
    path = scores.settings.get("path")
    return {"values": scores.values, "about": scores.about, "cost": scores.cost,
            "settings": {k: v for k, v in scores.settings.items() if k != "path"},
            "file": path if scores.source == "localization" else f"scores/{scores.source}.json"}


def _data(groups: list[QuestionGroup]) -> dict[str, Any]:
    source = groups[0].source if groups and all(g.source == groups[0].source for g in groups) \
        else None
    return {"path": source, "sha256": data_hash(groups), "n_groups": len(groups),
            "n_variants": sum(len(g.variants) for g in groups)}


def _notes(seeds, train_groups, eval_groups, base: _Predictions, runs) -> list[str]:
    notes = []
    if len(seeds) < MIN_SIGN_FLIP_SEEDS + 1:
        notes.append(POWER_NOTE.format(n=len(seeds), s="" if len(seeds) == 1 else "s"))
    seen = {g.id for g in train_groups} | {(g.question, g.image) for g in train_groups}
    leaked = [g.id for g in eval_groups if g.id in seen or (g.question, g.image) in seen]
    if leaked:
        notes.append(f"{len(leaked)} of the {len(eval_groups)} evaluation questions also appear "
                     f"in the training data (same id, or same question and image: "
                     f"{', '.join(leaked[:3])}{'...' if len(leaked) > 3 else ''}); the "
                     "evaluation is not held out for them")
    low = LOW_MASS_NOTE.split("{mass")[0].format(arm="base")  # evaluate's own, said once below
    said = [n for n in base.notes if not n.startswith(low)]
    for r in (r for by_seed in runs.values() for r in by_seed.values()):
        said += [n for n in r["notes"] if not n.startswith(low) and n not in said]
    masses = {"base": _mass(base.preds), **{name: float(np.nanmean(
        [_mass(r["preds"]) for r in by_seed.values()])) for name, by_seed in runs.items()}}
    below = {k: v for k, v in masses.items() if v < LOW_CHOICE_MASS}
    if below:
        notes.append("mean probability on the choices' tokens below "
                     f"{LOW_CHOICE_MASS:.0%}: " + ", ".join(f"{k} {v:.0%}" for k, v in
                                                            below.items())
                     + "; the model is mostly not answering in the format asked, so margins "
                     "between the choices say little (check the prompt format, or try "
                     "merge_variants)")
    return notes + said


def _mass(preds: list[VariantPrediction]) -> float:
    values = [p.choice_mass for p in preds if np.isfinite(p.choice_mass)]
    return float(np.mean(values)) if values else float("nan")

