"""`mechlora demo`: the whole method on the model organism, offline, on a laptop CPU.

organism -> localize its flip pairs -> select a window -> train the window and all layers
with the same budget -> evaluate base / window / all on test images and a paraphrase family
that neither the organism nor the adapters saw (the first leave-one-family-out fold) -> one
report. The steps are public so that analyses reuse them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from mechlora.io import prepare_out_dir, write_json
from mechlora.report.page import Page


@dataclass
class DemoConfig:
    seed: int = 0                # organism seed; training seeds derive from it
    window: int = 2              # width of the auto-selected window (the organism has 8 layers)
    localize_groups: int = 48    # training-image question groups to localize on
    pairs_per_group: int = 6     # ordered wording pairs per group (flip pairs are kept)
    steps: int = 150             # optimizer steps per adapter arm (the same budget for each)
    lr: float = 2e-3
    r: int = 8
    alpha: int = 16
    pairs_per_step: int = 8
    kl_weight: float = 1.0
    rebuild: bool = False
    quick: bool = False          # a reduced organism that trains in seconds (tests)


@dataclass
class Organism:
    path: Path
    train_pairs: Path  # the fold's training file: train images x its training families
    heldout: Path      # its test file: test images x its test family (never trained on)

    def load(self):
        from mechlora.models import load_model

        return load_model(str(self.path), device="cpu", dtype="float32")


def organism(cfg: DemoConfig, progress: bool = True) -> Organism:
    from mechlora.organism import build_organism, load_folds

    path = build_organism(seed=cfg.seed, rebuild=cfg.rebuild, quick=cfg.quick,
                          progress=progress)
    fold = next(iter(load_folds(path).values()))
    return Organism(path, fold.train, fold.test)


def localize_flips(org: Organism, cfg: DemoConfig, progress: bool = True):
    """Localize on the organism's flip pairs (training images), select a window."""
    from mechlora.data import load_groups, make_pairs
    from mechlora.localize import localize
    from mechlora.select import select_layers

    groups = load_groups(org.train_pairs)[: cfg.localize_groups]
    pairs = make_pairs(groups, max_pairs_per_group=cfg.pairs_per_group, seed=cfg.seed)
    subject = org.load()
    loc = localize(subject, pairs, only_flips=True, progress=progress)
    if loc.n_pairs == 0:  # a model that never flips here: localize every pair instead
        loc = localize(subject, pairs, min_delta=1e-6, progress=progress)
    selection = select_layers(loc.scores, f"window:{cfg.window}")
    loc.settings["selection"] = {"rule": selection.rule, "spec": str(selection.spec),
                                 "covered": selection.covered, "reason": selection.reason}
    return loc, selection


def train_config(cfg: DemoConfig, **overrides):
    from mechlora.train import TrainConfig

    settings = dict(r=cfg.r, alpha=cfg.alpha, lr=cfg.lr, grad_accum=cfg.pairs_per_step,
                    max_steps=cfg.steps, epochs=10_000, kl_weight=cfg.kl_weight, seed=cfg.seed,
                    save_every=0)
    return TrainConfig(**{**settings, **overrides})


def train_arm(org: Organism, layers: str, out: Path, cfg: DemoConfig, progress: bool = True,
              **overrides) -> Path:
    """One LoRA adapter on `layers` with the demo's budget; returns its folder."""
    from mechlora.train import train

    train(org.load(), org.train_pairs, layers=layers, out=out,
          config=train_config(cfg, **overrides), progress=progress)
    return out


def run_demo(out: str | Path = "runs/demo", cfg: DemoConfig | None = None, *,
             overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Run the demo; returns the summary written to OUT/demo.json."""
    import torch

    from mechlora.evaluate import evaluate
    from mechlora.report.localize import write_localize_report

    cfg = cfg or DemoConfig()
    out = prepare_out_dir(out, overwrite)
    # The organism's matrices are tiny: a second thread costs more in sync than it computes.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    log("1/5 model organism: build it, or reuse the cached one")
    org = organism(cfg, progress)
    log(f"    {org.path}")

    log("2/5 localize: patch every layer across its flip pairs (training images)")
    loc, selection = localize_flips(org, cfg, progress)
    loc.save(out / "localize")
    write_localize_report(loc, out / "localize" / "report.html", selection)
    log(f"    {loc.n_pairs} flip pairs; {selection.reason}")

    arms = {"window": str(selection.spec), "all": "all"}
    log(f"3/5 train: the selected window ({selection.spec}) and all layers, {cfg.steps} steps "
        f"of {cfg.pairs_per_step} pairs each")
    adapters = [train_arm(org, layers, out / f"adapter-{name}", cfg, progress)
                for name, layers in arms.items()]

    log("4/5 evaluate base, window and all on test images x a paraphrase family never trained "
        "on")
    result = evaluate(org.load(), org.heldout, adapters=adapters, out=out / "eval",
                      progress=progress)
    log(result.table())

    log("5/5 report")
    summary = {"organism": str(org.path), "selection": loc.settings["selection"],
               "localization": {"n_pairs": loc.n_pairs, "scores": loc.scores.tolist()},
               "train": {"arms": arms, "config": dataclasses.asdict(cfg)},
               "eval": result.metrics, "comparisons": result.comparisons,
               "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "demo.json", summary)
    _report(out, loc, selection, result, summary)
    log(f"done in {summary['seconds']:.0f} s: {out}/report.html")
    return summary


def _report(out: Path, loc, selection, result, summary: dict) -> None:
    from mechlora.report.localize import restoration_figure, score_figure

    page = Page("mechlora demo: the model organism, end to end")
    page.text(f"Organism: {summary['organism']}. Total time {summary['seconds']:.0f} s.")
    page.heading("1. Localization").text(selection.reason)
    page.figure(restoration_figure(loc)).figure(score_figure(loc, list(selection.spec.layers)))
    page.heading("2. Evaluation on test images and an unseen paraphrase family "
                 "(base vs adapters, same training budget)")
    page.pre(result.table())
    page.text("Details: localize/report.html, eval/report.html, adapter-*/README.md.", note=True)
    page.write(out / "report.html")
