"""Turn per-layer divergence scores into the layers to fine-tune.

Scores are one number per language layer, higher meaning more of the paraphrase divergence is
written there (e.g. restoration increments). NaN counts as 0. "Coverage" is always measured
against the positive part of the scores: a negative layer pushes the answers back together, so it
holds none of the divergence to fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from mechlora.errors import MechloraError
from mechlora.spec import LayerSpec

DEFAULT_WINDOW = 5
RULES_HELP = ("valid rules: window:K (best contiguous K layers; bare 'window' is window:5), "
              "mass:P (smallest contiguous window holding fraction P of the positive score, "
              "0 < P <= 1), topk:K (the K highest-scoring layers), all, or an explicit spec "
              "such as 15-19 or 3,7-9")
# Float sums of equal windows can differ in the last bits; within this relative tolerance
# two candidates count as tied, so the earliest-window rule is deterministic.
_REL_TOL = 1e-9
_SPEC_CHARS = re.compile(r"[\d\s,\-]+")


@dataclass(frozen=True)
class Selection:
    """The chosen layers, the rule that chose them, and how much of the divergence they hold."""

    spec: LayerSpec
    rule: str
    covered: float
    reason: str


def select_layers(scores: np.ndarray, rule: str) -> Selection:
    """Apply `rule` to per-layer `scores` (shape [n_layers]); see RULES_HELP for the rules."""
    values = _clean(scores)
    name, _, arg = rule.strip().lower().partition(":")
    name, arg = name.strip(), arg.strip()
    if name == "window":
        return _window(values, _count_arg("window", arg or str(DEFAULT_WINDOW), len(values)))
    if name == "mass":
        return _mass(values, _fraction_arg(arg))
    if name == "topk":
        return _topk(values, _count_arg("topk", arg, len(values)))
    if name == "all" and not arg:
        return _finish(values, LayerSpec.all(len(values)), "all", "every layer")
    if _SPEC_CHARS.fullmatch(rule):
        # Looks like a spec: let LayerSpec say what is wrong with it (e.g. the valid range).
        spec = LayerSpec.parse(rule, len(values))
        return _finish(values, spec, str(spec), "explicit spec")
    raise MechloraError(f"unknown layer-selection rule {rule!r}; {RULES_HELP}")


def _clean(scores: np.ndarray) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise MechloraError(f"layer scores must be one number per layer (shape [n_layers]), "
                            f"got shape {values.shape}")
    if np.isinf(values).any():
        raise MechloraError("layer scores contain infinities; check the localization output "
                            "(a restoration divided by a near-zero margin gap?)")
    return np.nan_to_num(values, nan=0.0)


def _count_arg(name: str, arg: str, n_layers: int) -> int:
    if not arg.isdigit() or int(arg) < 1:
        raise MechloraError(f"{name}:K needs a whole number of layers K >= 1, e.g. {name}:5; "
                            f"got {name}:{arg}")
    k = int(arg)
    if k > n_layers:
        raise MechloraError(f"{name}:{k} asks for more layers than the model's {n_layers}; "
                            f"use K <= {n_layers}, or 'all'")
    return k


def _fraction_arg(arg: str) -> float:
    try:
        p = float(arg)
    except ValueError:
        p = float("nan")
    if not 0.0 < p <= 1.0:
        raise MechloraError(f"mass:P needs a fraction 0 < P <= 1 of the positive score, "
                            f"e.g. mass:0.8; got mass:{arg}")
    return p


def _require_divergence(values: np.ndarray, rule: str) -> None:
    if not (values > 0).any():
        raise MechloraError(f"{rule}: the scores hold no positive divergence (all zero, negative "
                            "or NaN), so there is nothing to localize; check the localization run "
                            "or choose layers with an explicit spec such as 15-19 or 'all'")


def _window(values: np.ndarray, k: int) -> Selection:
    rule = f"window:{k}"
    _require_divergence(values, rule)
    sums = np.array([values[s:s + k].sum() for s in range(len(values) - k + 1)])
    start = _earliest_best(sums, _tol(values))
    spec = LayerSpec(tuple(range(start, start + k)), len(values))
    return _finish(values, spec, rule, f"best contiguous {k} layers")


def _mass(values: np.ndarray, p: float) -> Selection:
    rule = f"mass:{p:.12g}"
    _require_divergence(values, rule)
    pos = np.clip(values, 0.0, None)
    tol = _tol(pos)
    need = p * pos.sum() - tol
    for k in range(1, len(pos) + 1):
        sums = np.array([pos[s:s + k].sum() for s in range(len(pos) - k + 1)])
        if (sums >= need).any():
            start = _earliest_best(np.where(sums >= need, sums, -np.inf), tol)
            spec = LayerSpec(tuple(range(start, start + k)), len(pos))
            return _finish(values, spec, rule,
                           f"smallest contiguous window reaching {p * 100:g}%")
    raise AssertionError("the full window always holds all of the positive score")


def _topk(values: np.ndarray, k: int) -> Selection:
    _require_divergence(values, f"topk:{k}")
    # Stable sort on the negated scores: equal scores keep the earlier layer first.
    order = np.argsort(-values, kind="stable")[:k]
    spec = LayerSpec.of(order.tolist(), len(values))
    return _finish(values, spec, f"topk:{k}", f"the {k} highest-scoring layers")


def _tol(values: np.ndarray) -> float:
    return _REL_TOL * max(float(np.abs(values).sum()), 1e-300)


def _earliest_best(sums: np.ndarray, tol: float) -> int:
    return int(np.flatnonzero(sums >= sums.max() - tol)[0])


def _finish(values: np.ndarray, spec: LayerSpec, rule: str, what: str) -> Selection:
    pos = np.clip(values, 0.0, None)
    total = float(pos.sum())
    if total <= 0:
        return Selection(spec, rule, 0.0, f"{rule} -> {spec}: {what}, no positive score to cover")
    covered = float(pos[list(spec.layers)].sum()) / total
    peak = int(np.argmax(pos))
    where = "" if peak in spec else ", outside the selection"
    return Selection(spec, rule, covered, f"{rule} -> {spec}: {what}, {covered:.0%} of the "
                                          f"positive score (peak layer {peak}{where})")
