"""`mechlora demo`: the question mechlora exists for, asked of a planted organism, offline.

organism (`organism-mid`: 8 layers, the question first readable at layer 4) -> localize its
flip pairs (training images) -> select a window -> `mechlora.compare`: LoRA on the localized
window (`auto`), on all layers, on an early window and on a random band of the same width, for
every training seed at one budget -> every adapter and the base evaluated on test images x a
paraphrase family that neither the organism nor any adapter saw (the first leave-one-family-out
fold) -> OUT/report.html and OUT/demo.json. The steps are public so that analyses reuse them.

    OUT/localize/         the localization (localization.json, report.html)
    OUT/compare/          mechlora compare's folder: adapters, predictions, compare.json, report
    OUT/demo.json         what ran, the selection, per-arm headline metrics, timing
    OUT/report.html       the answer: tables and figures
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mechlora.errors import MechloraError
from mechlora.io import prepare_out_dir, read_json, write_json

if TYPE_CHECKING:
    from mechlora.organism import Fold

SCHEMA_VERSION = 1
KIND = "mechlora.demo"
SETTINGS = "settings.json"  # the DemoConfig a resumed demo must match


@dataclass
class DemoConfig:
    preset: str = "organism-mid"  # the organism (docs/organism.md)
    seed: int | None = None       # organism and first training seed (None: preset's @SEED or 0)
    window: int = 2               # width of auto's window, the early window and the random band
    seeds: int = 2                # training seeds per arm
    test_groups: int = 200        # first N question groups of the fold's test file (time)
    localize_groups: int = 48     # training-image question groups to localize on
    pairs_per_group: int = 6      # ordered wording pairs per group (flip pairs are kept)
    steps: int = 100              # optimizer steps per adapter (the same budget for each arm)
    lr: float = 2e-3
    r: int = 8
    alpha: int = 16
    pairs_per_step: int = 8
    kl_weight: float = 1.0
    rebuild: bool = False
    quick: bool = False           # a reduced organism that trains in seconds (tests)

    def __post_init__(self) -> None:
        if self.seed is None:  # a bad preset is refused by validate
            tail = str(self.preset).partition("@")[2]
            self.seed = int(tail) if tail.isdigit() else 0

    @property
    def arms(self) -> list[str]:
        """The arms compared: localized, every layer, the first layers, a random band."""
        w = self.window
        return ["auto", "all", f"early:{w}", f"randband:{w}"]

    def validate(self) -> DemoConfig:
        """Refuse bad settings before anything is built or trained."""
        from mechlora.organism import ORGANISMS, parse_preset

        for name in ("window", "seeds", "test_groups", "localize_groups", "pairs_per_group",
                     "steps"):
            if getattr(self, name) < 1:
                raise MechloraError(f"{_option(name)} must be at least 1, got "
                                    f"{getattr(self, name)}")
        preset, _ = parse_preset(self.preset, self.seed)
        if self.window > ORGANISMS[preset]["layers"]:
            raise MechloraError(f"--window {self.window} is wider than {preset}'s "
                                f"{ORGANISMS[preset]['layers']} layers")
        train_config(self).validate()
        return self


CLI_OPTIONS = ("window", "seeds", "test_groups", "steps")  # the fields `mechlora demo` sets


def _option(name: str) -> str:
    """How a user set the field: its `mechlora demo` option, else the DemoConfig field."""
    return f"--{name.replace('_', '-')}" if name in CLI_OPTIONS else f"DemoConfig.{name}"


@dataclass
class Organism:
    path: Path
    fold: Fold         # the first leave-one-family-out fold
    meta: dict         # organism.json
    built: bool        # trained by this call (False: reused from the cache)

    @property
    def train_pairs(self) -> Path:  # train images x the fold's training families
        return self.fold.train

    @property
    def heldout(self) -> Path:      # test images x the fold's test family (never trained on)
        return self.fold.test

    def load(self):
        from mechlora.models import load_model

        return load_model(str(self.path), device="cpu", dtype="float32")


def organism(cfg: DemoConfig, progress: bool = True) -> Organism:
    """Build the organism (or reuse its cached build) and take its first fold."""
    from mechlora.organism import build_organism, load_folds, organism_dir, read_meta

    cached = read_meta(organism_dir(cfg.preset, cfg.seed, quick=cfg.quick)) is not None
    path = build_organism(preset=cfg.preset, seed=cfg.seed, rebuild=cfg.rebuild,
                          quick=cfg.quick, progress=progress)
    fold = next(iter(load_folds(path).values()))
    return Organism(path, fold, read_meta(path), built=cfg.rebuild or not cached)


def localize_flips(org: Organism, cfg: DemoConfig, progress: bool = True, subject=None):
    """Localize on the organism's flip pairs (training images); select auto's window.
    `subject`: the organism already loaded (default: load it)."""
    from mechlora.data import load_groups, make_pairs
    from mechlora.localize import localize
    from mechlora.select import select_layers

    subject = subject if subject is not None else org.load()
    groups = load_groups(org.train_pairs, limit=cfg.localize_groups)
    pairs = make_pairs(groups, max_pairs_per_group=cfg.pairs_per_group, seed=cfg.seed)
    loc = localize(subject, pairs, only_flips=True, progress=progress)
    if loc.n_pairs == 0:  # a model that never flips here: localize every pair instead
        loc = localize(subject, pairs, min_delta=1e-6, progress=progress)
    selection = select_layers(loc.scores, f"window:{cfg.window}")
    loc.settings["selection"] = {"rule": selection.rule, "spec": str(selection.spec),
                                 "covered": selection.covered, "reason": selection.reason}
    return loc, selection


def train_config(cfg: DemoConfig, **overrides):
    """The recipe every arm shares (compare trains each arm and seed with it)."""
    from mechlora.train import TrainConfig

    settings = dict(r=cfg.r, alpha=cfg.alpha, lr=cfg.lr, grad_accum=cfg.pairs_per_step,
                    max_steps=cfg.steps, epochs=10_000, kl_weight=cfg.kl_weight, seed=cfg.seed,
                    save_every=0, rule=f"window:{cfg.window}")
    return TrainConfig(**{**settings, **overrides})


def run_demo(out: str | Path = "runs/demo", cfg: DemoConfig | None = None, *,
             overwrite: bool = False, resume: bool = False, progress: bool = True,
             log=print) -> dict:
    """Run the demo; returns the summary written to OUT/demo.json.

    `resume`: continue a demo in `out` made with the same settings, reusing its localization
    and every finished adapter and evaluation (mechlora compare resumes)."""
    import torch

    from mechlora.compare import compare
    from mechlora.data import load_groups
    from mechlora.report.demo import write_report
    from mechlora.report.localize import write_localize_report
    from mechlora.result import LocalizationResult
    from mechlora.select import select_layers

    cfg = (cfg or DemoConfig()).validate()
    if overwrite and resume:
        raise MechloraError("--overwrite and --resume exclude each other: --resume continues "
                            "the demo in --out, --overwrite replaces it")
    if resume and cfg.rebuild:
        raise MechloraError("--rebuild and --resume exclude each other: the demo in --out "
                            "localized and trained on the organism that --rebuild replaces; "
                            "pass --overwrite with --rebuild, or --resume alone")
    settings = dataclasses.asdict(cfg)
    out = Path(out)
    if not (resume or overwrite) and (out / SETTINGS).is_file():
        raise MechloraError(f"{out} already holds a demo; pass --resume to continue it (same "
                            "settings), --overwrite to replace it, or choose another --out")
    if resume and (out / SETTINGS).is_file():
        old = read_json(out / SETTINGS)
        differ = [k for k in settings if k != "rebuild" and old.get(k) != settings[k]]
        if differ:
            raise MechloraError(f"{out} holds a demo with other settings ({', '.join(differ)} "
                                "differ); pass --overwrite to replace it, or choose another "
                                "--out")
    out = prepare_out_dir(out, overwrite, resume=resume)
    write_json(out / SETTINGS, settings)
    # The organism's matrices are tiny: a second thread costs more in sync than it computes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        log(f"1/4 model organism {cfg.preset.partition('@')[0]}@{cfg.seed}: build it, or "
            "reuse the cached one")
        org = organism(cfg, progress)
        t_org = time.perf_counter()
        log(f"    {org.path}")

        log("2/4 localize: patch every layer across its flip pairs (training images)")
        subject = org.load()
        if resume and (out / "localize" / "localization.json").is_file():
            loc = LocalizationResult.load(out / "localize")
            selection = select_layers(loc.scores, f"window:{cfg.window}")
        else:
            loc, selection = localize_flips(org, cfg, progress, subject)
            loc.save(out / "localize")
            write_localize_report(loc, out / "localize" / "report.html", selection)
        t_loc = time.perf_counter()
        log(f"    {loc.n_pairs} flip pairs; {selection.reason}")

        heldout = load_groups(org.heldout, limit=cfg.test_groups)
        log(f"3/4 compare {', '.join(cfg.arms)} x {cfg.seeds} seeds, {cfg.steps} steps of "
            f"{cfg.pairs_per_step} pairs each; evaluate on {len(heldout)} test questions "
            f"({org.fold.test_family}, never trained on)")
        result = compare(subject, org.train_pairs, heldout, out=out / "compare", arms=cfg.arms,
                         seeds=cfg.seeds, config=train_config(cfg),
                         from_localization=out / "localize", progress=progress,
                         swap=False)  # swapped films would cost a third of the evaluation time
        t_cmp = time.perf_counter()

        log("4/4 report")
        summary = summarize(cfg, org, loc, selection, result.doc, len(heldout),
                            timing={"organism": t_org - t0, "localize": t_loc - t_org,
                                    "compare": t_cmp - t_loc, "total": t_cmp - t0})
        write_json(out / "demo.json", summary)
        write_report(out / "report.html", summary, result.doc, loc, selection)
    finally:
        torch.set_num_threads(threads)
    log(f"done in {summary['seconds']['total']:.0f} s: {out}/report.html")
    return summary


def summarize(cfg: DemoConfig, org: Organism, loc, selection, doc: dict, n_test: int,
              timing: dict[str, float]) -> dict:
    """OUT/demo.json: what ran, the selection, per-arm headline metrics, timing."""
    meta, fold = org.meta, org.fold
    arms = {}
    for name, arm in doc["arms"].items():
        runs = arm["seeds"].values()
        steps = sum(r["steps"] for r in runs)
        arms[name] = {
            "layers": {s: r["spec"] for s, r in arm["seeds"].items()},
            "trainable_parameters": sorted({r["trainable_parameters"] for r in runs}),
            "steps": sorted({r["steps"] for r in runs}),
            "seconds_per_step": sum(r["train_seconds"] for r in runs) / steps if steps else None,
            "metrics": _headline(arm["metrics"]),
            "vs_base": _headline(arm["vs_base"]),
            "vs_auto": _headline(arm["vs_reference"]) if arm["vs_reference"] else None,
        }
    return {
        "schema_version": SCHEMA_VERSION, "kind": KIND,
        "config": dataclasses.asdict(cfg),
        "organism": {"path": str(org.path), "built": org.built, "preset": meta.get("preset"),
                     "seed": meta["config"]["seed"], "planted": meta.get("planted"),
                     "accuracy_train_phrasing": meta.get("accuracy_train_phrasing"),
                     "flip_rate_heldout": meta.get("flip_rate_heldout")},
        "data": {"fold": fold.name, "train": str(fold.train),
                 "train_families": list(fold.train_families), "test": str(fold.test),
                 "test_family": fold.test_family, "test_groups": n_test,
                 "test_groups_in_file": _count_lines(fold.test),
                 "test_subsample": f"the first {n_test} question groups of the test file"},
        "localization": {"folder": "localize", "n_pairs": loc.n_pairs,
                         "scores": [None if s != s else float(s) for s in loc.scores],
                         "selection": {"rule": selection.rule, "spec": str(selection.spec),
                                       "layers": list(selection.spec.layers),
                                       "covered": selection.covered,
                                       "reason": selection.reason}},
        "compare": {"folder": "compare", "arms": list(doc["arms"]), "seeds": doc["seeds"],
                    "reference": doc["reference"], "budget": doc["budget"],
                    "notes": doc["notes"]},
        "base": {"metrics": _headline(doc["base"]["metrics"])},
        "arms": arms,
        "seconds": {k: round(v, 1) for k, v in timing.items()},
    }


HEADLINE = ("original_flip_rate", "pairwise_flip_rate", "accuracy", "margin_diff",
            "text_only_agreement_gray")


def _headline(block: dict) -> dict:
    """The headline metrics of a compare.json block, as compare gives them."""
    keep = ("mean", "diff", "ci", "p", "per_seed", "n_seeds", "n_questions")
    return {m: {k: v for k, v in block[m].items() if k in keep}
            for m in HEADLINE if block.get(m)}


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())
