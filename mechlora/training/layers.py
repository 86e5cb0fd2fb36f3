"""Which layers to adapt: `--layers auto|all|SPEC`, and for auto the localization behind it."""

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
from mechlora.select import Selection, select_layers
from mechlora.spec import LayerSpec
from mechlora.training.config import TrainConfig


@dataclass
class LayerChoice:
    """The layers to adapt, and where they came from."""

    spec: LayerSpec
    how: str  # "auto", "all" or "explicit"
    selection: Selection | None = None
    localization: LocalizationResult | None = None
    localization_path: str | None = None
    localized_here: bool = False


def resolve_layers(subject: Subject, groups: Sequence[QuestionGroup], layers: str | LayerSpec,
                   cfg: TrainConfig, from_localization=None, out: Path | None = None,
                   resume: bool = False, acc=None, progress: bool = True) -> LayerChoice:
    """`layers` -> a LayerChoice; "auto" selects from a localization, run here when not given."""
    n = subject.n_layers
    text = "" if isinstance(layers, LayerSpec) else str(layers).strip().lower()
    loc, path = None, None
    if from_localization is not None:
        loc, path = load_localization(from_localization, n), str(from_localization)
    if isinstance(layers, LayerSpec):
        if layers.n_layers != n:
            raise MechloraError(f"the layer spec {layers} was made for {layers.n_layers} layers; "
                                f"{subject.name} has {n}")
        spec, how = layers, "explicit"
    elif text == "all":
        spec, how = LayerSpec.all(n), "all"
    elif text != "auto":
        spec, how = LayerSpec.parse(text, n), "explicit"
    else:
        select_layers(np.ones(n), cfg.rule)  # a mistyped rule fails before localizing
        here = out / "localization" if out is not None else None
        if loc is None and resume and here is not None and (here / "localization.json").is_file():
            loc, path = load_localization(here, n), "localization"  # recorded by the first try
        if loc is None:
            loc = _localize_here(subject, groups, cfg, here, acc, progress)
            path = "localization" if here is not None else None
        selection = select_layers(loc.scores, cfg.rule)
        return LayerChoice(selection.spec, "auto", selection, loc, path,
                           localized_here=path == "localization")
    selection = select_layers(loc.scores, str(spec)) if loc is not None else None
    return LayerChoice(spec, how, selection, loc, path)


def load_localization(path, n_layers: int) -> LocalizationResult:
    path = Path(path)
    if (path / "localization" / "localization.json").is_file():
        path = path / "localization"  # a training run's folder: use what it recorded
    loc = LocalizationResult.load(path)
    if loc.n_layers != n_layers:
        raise MechloraError(f"the localization in {path} was made on a model with {loc.n_layers} "
                            f"layers; this model has {n_layers}: localize this model first")
    return loc


def _localize_here(subject, groups, cfg: TrainConfig, here: Path | None, acc, progress: bool
                   ) -> LocalizationResult:
    from mechlora.localize import localize

    main = acc is None or acc.is_main_process
    if here is not None and not main:  # the main process localizes; the others read its result
        acc.wait_for_everyone()
        return LocalizationResult.load(here)
    rng = random.Random(cfg.seed)
    keep = sorted(rng.sample(range(len(groups)), min(cfg.localize_groups, len(groups))))
    sample = [groups[i] for i in keep]
    if progress and main:
        tqdm.write(f"layers auto: no localization given (--from), so localizing {len(sample)} of "
                   f"the {len(groups)} training groups first; rule {cfg.rule}")
    loc = localize(subject, make_pairs(sample, max_pairs_per_group=2, seed=cfg.seed),
                   progress=progress and main, merge_variants=cfg.merge_variants)
    if here is not None:
        loc.save(here)
        if acc is not None:
            acc.wait_for_everyone()
    return loc
