"""The arms of a comparison: their grammar, and the layers (and ranks) each trains per seed.

    ARM      := SELECTOR ["@match=" SELECTOR] | "single" [":" W]
    SELECTOR := auto | all | SPEC | any selector of docs/select.md (grad:5, snr:5, bi:5,
                localization:window:5, window:5, early:5, middle:5, late:5, random:5, ...)

Arms are separated by commas, so a layer list inside one arm is written with "+" (`3+7-9`).
`auto` is localization with the run's rule (window:5 by default). `X@match=REF` trains X's
layers at the ranks whose LoRA count equals REF's layers at the recipe's rank. `single:W`
expands to one arm per width-W window across the depth (every start, stride 1; `single` is
W = 1), the arms of the Hase et al. test.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mechlora.errors import MechloraError
from mechlora.select import (
    BANDS,
    SELECTOR_HELP,
    Scores,
    Selection,
    apply_selector,
    band_layers,
    parse_selector,
    select_layers,
)
from mechlora.spec import LayerSpec

ARMS_HELP = ("arms are separated by commas: auto, all, a spec (15-19; a list as 3+7-9), any "
             "selector (grad:5, snr:5, bi:5, localization:window:5, early:5, middle:5, late:5, "
             "random:5, randband:5), X@match=REF (X's layers at REF's parameter count, e.g. "
             "all@match=auto), and single or single:W (one adapter per layer or per width-W "
             "window)")
SINGLE = "single"
MATCH = "@match="


@dataclass(frozen=True)
class Arm:
    """One arm: what picks its layers, and what its parameter count is matched to."""

    name: str                 # canonical: "auto", "grad:5", "all@match=auto", "3+7-9", "16"
    selector: str             # "auto", "grad:5", "all", "3,7-9"
    match: str | None = None  # the selector whose parameter count the arm holds
    single: int = 0           # one of the `single:W` arms: W, the window width; else 0

    @property
    def folder(self) -> str:
        """A file-safe folder name: 'grad:5' -> 'grad_5', 'all@match=auto' -> 'all_match_auto'."""
        return re.sub(r"[^a-z0-9.-]+", "_", self.name).strip("_") or "arm"


def parse_arms(arms: str | Sequence[str], n_layers: int, match_params: str | None = None
               ) -> list[Arm]:
    """The arms of `arms` (a comma-separated string, or one arm per item) for a model of
    `n_layers` layers; `match_params` matches every arm that has no @match of its own, but the
    single ones and the reference itself. Mistakes raise a MechloraError naming the arm."""
    items = arms.split(",") if isinstance(arms, str) else list(arms)
    out: dict[str, Arm] = {}
    for item in items:
        text = re.sub(r"\s+", "", str(item)).lower()
        if not text:
            raise MechloraError(f"an empty arm in {arms!r}; {ARMS_HELP}")
        for arm in _parse_one(text, n_layers, match_params):
            known = out.get(arm.name)
            if known is not None and not (known.single or arm.single):
                raise MechloraError(f"arm {arm.name} is given twice")
            out[arm.name] = Arm(arm.name, arm.selector, arm.match,
                                max(arm.single, known.single if known else 0))
    if not out:
        raise MechloraError(f"no arms given; {ARMS_HELP}")
    return list(out.values())


def _parse_one(text: str, n: int, match_params: str | None) -> list[Arm]:
    head, _, width = text.partition(":")
    if head == SINGLE:
        if "@" in text:
            raise MechloraError(f"arm {text}: single arms cannot be matched; {ARMS_HELP}")
        w = _width(width, n, text)
        return [Arm(_spec_name(spec), "all" if spec.is_all else str(spec), None, w)
                for spec in (LayerSpec(tuple(range(s, s + w)), n) for s in range(n - w + 1))]
    selector, *modifiers = text.split("@")
    match = match_params.strip().lower() if match_params else None
    for modifier in modifiers:
        key, eq, value = modifier.partition("=")
        if key != "match" or not eq or not value:
            raise MechloraError(f"arm {text}: unknown modifier @{modifier}; write @match=REF, "
                                "e.g. all@match=auto")
        match = value
    selector = canonical(selector, n, text)
    if match is not None:
        match = canonical(match, n, f"{text} (the @match reference)")
        if match == selector:  # already the reference's count
            match = None
    name = _spec_name(LayerSpec.parse(selector, n)) if _is_spec(selector) else selector
    return [Arm(name + (MATCH + _display(match, n) if match else ""), selector, match)]


def canonical(selector: str, n: int, where: str) -> str:
    """A selector checked against a model of `n` layers: 'auto', 'all', '3,7-9', 'grad:5'..."""
    text = selector.replace("+", ",")
    if text == "auto":
        return text
    if text.partition(":")[0] == SINGLE:
        raise MechloraError(f"arm {where}: single is a set of arms, not a reference")
    try:
        source, rule = parse_selector(text)
        if source is not None:
            select_layers(np.ones(n), rule)  # checks the rule and its K
        elif rule.partition(":")[0] in BANDS:
            band_layers(rule.partition(":")[0], rule.partition(":")[2], n)
        else:
            spec = LayerSpec.parse(rule, n)
            return "all" if spec.is_all else str(spec)
    except MechloraError as e:
        raise MechloraError(f"arm {where}: {e}") from None
    return text


def needed_scores(arms: Sequence[Arm]) -> set[str]:
    """The score sources the arms read (auto reads localization)."""
    sources = set()
    for arm in arms:
        for selector in (arm.selector, arm.match):
            if selector is None:
                continue
            source = "localization" if selector == "auto" else parse_selector(selector)[0]
            if source is not None:
                sources.add(source)
    return sources


def choose(selector: str, seed: int, scores: dict[str, Scores], n: int, rule: str,
           model: str | None = None) -> Selection:
    """The selection `selector` makes for training seed `seed`: bands are drawn with the seed;
    scores come from `scores` (computed once); bands and specs report their coverage of the
    localization scores when there are some."""
    if selector == "auto":
        return select_layers(scores["localization"], rule)
    source, _ = parse_selector(selector)
    reference = scores.get(source or "localization")
    return apply_selector(selector, reference, n, seed=seed, model=model)


def _is_spec(selector: str) -> bool:
    return selector[:1].isdigit()


def _spec_name(spec: LayerSpec) -> str:
    return "all" if spec.is_all else str(spec).replace(",", "+")


def _display(selector: str, n: int) -> str:
    return _spec_name(LayerSpec.parse(selector, n)) if _is_spec(selector) else selector


def _width(width: str, n: int, text: str) -> int:
    if not width:
        return 1
    if not width.isdigit() or not 1 <= int(width) <= n:
        raise MechloraError(f"arm {text}: single:W needs a window width 1 <= W <= {n} (the "
                            "model's layers)")
    return int(width)


__all__ = ["ARMS_HELP", "SELECTOR_HELP", "Arm", "canonical", "choose", "needed_scores",
           "parse_arms"]
