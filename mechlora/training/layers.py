"""Which layers to adapt: `--layers auto|all|SPEC|SELECTOR`, and the scores behind them.

`auto` applies `--rule` to a localization (`--from`, or one run here on the training pairs);
any selector of docs/select.md (`grad:5`, `snr:5`, `bi:5`, `random:5`, `early:5`,
`localization:window:5`, ...) reads its scores from `--from` (a localization folder or a saved
selection.json) or computes them here on the training pairs. `--match-params SPEC` gives the
chosen layers the ranks whose LoRA count equals SPEC's at `--r` (`spec.match_ranks`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mechlora.data import QuestionGroup, make_pairs
from mechlora.errors import MechloraError
from mechlora.models.subject import Subject
from mechlora.result import LocalizationResult
from mechlora.select import (
    FILE_NAME,
    Scores,
    Selection,
    apply_selector,
    on_source,
    parse_selector,
    select_layers,
)
from mechlora.spec import LayerSpec, RankMatch, match_ranks
from mechlora.training.config import TrainConfig


@dataclass
class LayerChoice:
    """The layers to adapt, and where they came from."""

    spec: LayerSpec
    how: str  # "auto", "all", "explicit" or "selector"
    selection: Selection | None = None
    localization: LocalizationResult | None = None
    localization_path: str | None = None
    localized_here: bool = False
    given: str | None = None  # --layers as given ("grad:5"); None for a LayerSpec or Selection


def resolve_layers(subject: Subject, groups: Sequence[QuestionGroup],
                   layers: str | LayerSpec | Selection, cfg: TrainConfig, from_localization=None,
                   out: Path | None = None, resume: bool = False, acc=None,
                   progress: bool = True) -> LayerChoice:
    """`layers` -> a LayerChoice.

    "auto" applies `cfg.rule` to a localization (given, or run here); a selector reads its
    scores from `from_localization` (a localization or a saved selection) or computes them on
    `groups`; a `Selection` is used as it is.
    """
    n = subject.n_layers
    if isinstance(layers, Selection):
        _check_layers(layers.spec, subject)
        return LayerChoice(layers.spec, "selector", layers)
    saved = load_source(from_localization, n) if from_localization is not None else None
    loc = saved if isinstance(saved, LocalizationResult) else None
    path = None if from_localization is None else str(from_localization)
    if isinstance(layers, LayerSpec):
        _check_layers(layers, subject)
        return _explicit(layers, "explicit", saved, path)
    text = str(layers).strip().lower()
    if isinstance(saved, Selection) and saved.scores is not None:
        text = on_source(text, saved.scores.source)  # window:3 --from grad.json: on grad's
    if text == "auto" and isinstance(saved, Selection):
        _check_layers(saved.spec, subject)
        return LayerChoice(saved.spec, "auto", saved, given=text)
    source, rule = ("localization", cfg.rule) if text == "auto" else parse_selector(text)
    if source is None and (rule == "all" or rule[0].isdigit()):
        spec = LayerSpec.parse(rule, n)
        return _explicit(spec, "all" if rule == "all" else "explicit", saved, path, text)
    how = "auto" if text == "auto" else "selector"
    if source is None:  # a band: random ones drawn with the training seed
        selection = apply_selector(text, _reference(saved), n, seed=cfg.seed, model=subject.name)
        return LayerChoice(selection.spec, how, selection, loc, path if loc else None, given=text)
    if source == "localization":
        select_layers(np.ones(n), rule)  # a mistyped rule fails before localizing
        here = out / "localization" if out is not None else None
        if loc is None and isinstance(saved, Selection) and saved.scores is not None \
                and saved.scores.source == "localization":
            selection = select_layers(saved.scores, rule)
            return LayerChoice(selection.spec, how, selection, given=text)
        if loc is None and resume and here is not None and (here / "localization.json").is_file():
            loc, path = load_localization(here, n), "localization"  # recorded by the first try
        if loc is None:
            loc = _localize_here(subject, groups, cfg, here, acc, progress, text)
            path = "localization" if here is not None else None
        selection = select_layers(Scores.from_localization(loc, path), rule)
        return LayerChoice(selection.spec, how, selection, loc, path,
                           localized_here=path == "localization", given=text)
    if isinstance(saved, Selection) and saved.scores is not None \
            and saved.scores.source == source:
        selection = apply_selector(text, saved.scores, n, model=subject.name)
    else:
        selection = _scores_here(subject, groups, text, cfg, out, resume, acc, progress)
    return LayerChoice(selection.spec, how, selection, given=text)


def match_params(subject: Subject, spec: LayerSpec, cfg: TrainConfig) -> RankMatch | None:
    """The per-layer ranks `cfg.match_params` asks for (None without it)."""
    if cfg.match_params is None:
        return None
    try:
        reference = LayerSpec.parse(cfg.match_params, subject.n_layers)
    except MechloraError as e:
        raise MechloraError(f"--match-params {cfg.match_params}: {e}") from None
    return match_ranks(subject.base, spec, reference, subject.layers_path, modules=cfg.modules,
                       r=cfg.r)


def load_source(path, n_layers: int) -> LocalizationResult | Selection:
    """--from: a saved selection (selection.json or its folder) or a localization."""
    path = Path(path)
    if path.name == FILE_NAME or (path.suffix.lower() == ".json" and path.name !=
                                  "localization.json") or (path / FILE_NAME).is_file():
        if not path.exists():
            raise MechloraError(f"--from {path} not found; give a localization folder or a "
                                "saved selection (selection.json)")
        selection = Selection.load(path)
        if selection.spec.n_layers != n_layers:
            raise MechloraError(f"the selection in {path} was made for a model with "
                                f"{selection.spec.n_layers} layers; this model has {n_layers}")
        return selection
    if path.name == "localization.json":
        path = path.parent
    return load_localization(path, n_layers)


def load_localization(path, n_layers: int) -> LocalizationResult:
    path = Path(path)
    if (path / "localization" / "localization.json").is_file():
        path = path / "localization"  # a training run's folder: use what it recorded
    loc = LocalizationResult.load(path)
    if loc.n_layers != n_layers:
        raise MechloraError(f"the localization in {path} was made on a model with {loc.n_layers} "
                            f"layers; this model has {n_layers}: localize this model first")
    return loc


def localize_groups(subject: Subject, groups: Sequence[QuestionGroup], cfg: TrainConfig, *,
                    progress: bool = True) -> LocalizationResult:
    """The localization `--layers auto` runs: `cfg.localize_groups` groups drawn with
    `cfg.seed`, two ordered pairs of wordings each."""
    from mechlora.localize import localize

    rng = random.Random(cfg.seed)
    keep = sorted(rng.sample(range(len(groups)), min(cfg.localize_groups, len(groups))))
    sample = [groups[i] for i in keep]
    return localize(subject, make_pairs(sample, max_pairs_per_group=2, seed=cfg.seed),
                    progress=progress, merge_variants=cfg.merge_variants)


def score_options(source: str, cfg: TrainConfig) -> dict:
    """The selector options that follow the run's recipe (grad probes the recipe's LoRA and
    loss)."""
    if source == "grad":
        return dict(r=cfg.r, alpha=cfg.alpha, modules=cfg.modules, kl_weight=cfg.kl_weight,
                    kl_temperature=cfg.kl_temperature, kl_over=cfg.kl_over,
                    merge_variants=cfg.merge_variants)
    return dict(modules=cfg.modules) if source == "snr" else {}


def _explicit(spec: LayerSpec, how: str, saved, path, given: str | None = None) -> LayerChoice:
    """A spec or `all`; with --from, its coverage of the saved scores is recorded."""
    if isinstance(saved, LocalizationResult):
        return LayerChoice(spec, how, select_layers(saved.scores, str(spec)), saved, path,
                           given=given)
    reference = _reference(saved)
    selection = apply_selector(str(spec), reference, spec.n_layers) if reference else None
    return LayerChoice(spec, how, selection, given=given)


def _reference(saved) -> Scores | None:
    """Saved scores a band or spec reports its coverage against."""
    if isinstance(saved, LocalizationResult):
        return Scores.from_localization(saved)
    return saved.scores if isinstance(saved, Selection) else None


def _check_layers(spec: LayerSpec, subject: Subject) -> None:
    if spec.n_layers != subject.n_layers:
        raise MechloraError(f"the layer spec {spec} was made for {spec.n_layers} layers; "
                            f"{subject.name} has {subject.n_layers}")


def _scores_here(subject, groups, selector: str, cfg: TrainConfig, out: Path | None,
                 resume: bool, acc, progress: bool) -> Selection:
    """grad / snr / bi scores computed on the training groups (seed: the run's), saved to
    OUT/selection.json; a resumed run reads them back."""
    from mechlora.selectors import choose_layers

    here = out / FILE_NAME if out is not None else None
    main = acc is None or acc.is_main_process
    if here is not None and resume and here.is_file():
        return Selection.load(here)
    if here is not None and not main:  # the main process scores; the others read its result
        acc.wait_for_everyone()
        return Selection.load(here)
    source, _ = parse_selector(selector)
    if progress and main:
        tqdm.write(f"layers {selector}: computing {source} scores on the {len(groups)} "
                   "training groups first")
    selection = choose_layers(selector, subject, list(groups), seed=cfg.seed,
                              progress=progress and main, **score_options(source, cfg))
    if here is not None:
        selection.save(here)
        if acc is not None:
            acc.wait_for_everyone()
    return selection


def _localize_here(subject, groups, cfg: TrainConfig, here: Path | None, acc, progress: bool,
                   given: str) -> LocalizationResult:
    main = acc is None or acc.is_main_process
    if here is not None and not main:  # the main process localizes; the others read its result
        acc.wait_for_everyone()
        return LocalizationResult.load(here)
    if progress and main:
        rule = f"; rule {cfg.rule}" if given == "auto" else ""
        tqdm.write(f"layers {given}: no localization given (--from), so localizing "
                   f"{min(cfg.localize_groups, len(groups))} of the {len(groups)} training "
                   f"groups first{rule}")
    loc = localize_groups(subject, groups, cfg, progress=progress and main)
    if here is not None:
        loc.save(here)
        if acc is not None:
            acc.wait_for_everyone()
    return loc
