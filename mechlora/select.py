"""Turn per-layer scores into the layers to fine-tune, and keep the choice as a file.

Scores are one number per language layer, higher meaning "adapt this layer": the divergence a
localization finds written there (restoration increments), or a rival selector's measure
(`mechlora.selectors`: gradient norm, weight signal-to-noise, block influence). NaN counts as 0.
"Coverage" is always measured against the positive part of the scores: a negative layer pushes
the answers back together, so it holds none of the divergence to fix.

A *selector* is one string naming where the scores come from and the rule that reads them
(SELECTOR_HELP; docs/select.md): `window:5` (localization scores, as before), `grad:5`,
`snr:window:5`, `random:5`, `early:5`, `all`, `15-19`. A `Selection` saves to a versioned
`selection.json` that `Selection.load` reads back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mechlora.errors import MechloraError
from mechlora.io import jsonable, read_json, write_json
from mechlora.spec import LayerSpec

SCHEMA_VERSION = 1
FILE_NAME = "selection.json"
DEFAULT_WINDOW = 5
RULES_HELP = ("valid rules: window:K (best contiguous K layers; bare 'window' is window:5), "
              "mass:P (smallest contiguous window holding fraction P of the positive score, "
              "0 < P <= 1), topk:K (the K highest-scoring layers), all, or an explicit spec "
              "such as 15-19 or 3,7-9")
# Where scores come from, and the rule `SOURCE:K` stands for: the rule each method's authors use.
# Gradient, Spectrum and ShortGPT rank layers one by one (topk); the localization recipe takes
# the contiguous window around the commit point.
SCORE_SOURCES = {"localization": "window", "grad": "topk", "snr": "topk", "bi": "topk"}
ALIASES = {"loc": "localization"}
# Selectors that need no scores, only the number of layers.
BANDS = {
    "early": "the first {k} layers",
    "middle": "the {k} layers around the middle of the depth",
    "late": "the last {k} layers",
    "random": "{k} layers drawn at random, scattered (seed {seed})",
    "randband": "a contiguous band of {k} layers at a random depth (seed {seed})",
}
SELECTOR_HELP = (
    "selectors: a rule on localization scores (window:K, mass:P, topk:K), SOURCE:K for the top "
    "K layers by SOURCE's scores (grad, snr, bi; localization:K is window:K), SOURCE:RULE for "
    "any rule on them (e.g. grad:window:5), the bands early:K, middle:K, late:K, random:K "
    "(scattered) and randband:K (contiguous), all, or an explicit spec such as 15-19")
# Float sums of equal windows can differ in the last bits; within this relative tolerance
# two candidates count as tied, so the earliest-window rule is deterministic.
_REL_TOL = 1e-9
_SPEC_CHARS = re.compile(r"[\d\s,\-]+")


@dataclass(eq=False)
class Scores:
    """One score per language layer from one source, with what it took to compute them."""

    source: str                     # "localization", "grad", "snr", "bi"
    values: np.ndarray              # [n_layers], higher = adapt this layer
    about: str = ""                 # what the numbers measure, one line (goes in reasons)
    model: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)   # data, seed, rank, ...
    cost: dict[str, Any] = field(default_factory=dict)       # seconds, forwards, backwards, ...
    details: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. per module type [L]

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        self.details = {k: np.asarray(v, dtype=np.float64) for k, v in self.details.items()}

    @property
    def n_layers(self) -> int:
        return len(self.values)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "about": self.about, "values": self.values,
                "settings": self.settings, "cost": self.cost, "details": self.details}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], model: str | None = None) -> Scores:
        values = [np.nan if v is None else v for v in doc["values"]]
        details = {k: [np.nan if x is None else x for x in v]
                   for k, v in doc.get("details", {}).items()}
        return cls(doc["source"], np.asarray(values, dtype=np.float64), doc.get("about", ""),
                   model, doc.get("settings", {}), doc.get("cost", {}), details)

    @classmethod
    def from_localization(cls, result, path: str | Path | None = None) -> Scores:
        """The scores of a `LocalizationResult` (restoration increments, mean over pairs)."""
        return cls("localization", result.scores,
                   f"localization ({result.score_name}, mean over {result.n_pairs} pairs)",
                   result.model,
                   {"path": None if path is None else str(path), "score": result.score_name,
                    "engine": result.engine, "n_pairs": result.n_pairs,
                    "n_groups": len(set(result.group_ids))},
                   {"seconds": result.settings.get("seconds")})


@dataclass(frozen=True)
class Selection:
    """The chosen layers, the rule that chose them, and how much of the score they hold.

    `covered` is None when no scores were involved (a band, `all` or a spec without scores).
    """

    spec: LayerSpec
    rule: str
    covered: float | None
    reason: str
    selector: str | None = None  # the whole selector, e.g. "grad:topk:5" or "random:5"
    scores: Scores | None = field(default=None, compare=False)
    settings: dict[str, Any] = field(default_factory=dict, compare=False)  # e.g. {"seed": 3}
    model: str | None = field(default=None, compare=False)

    @property
    def source(self) -> str | None:
        """What chose the layers: a score source (grad, ...), a band (random, ...), "all" or
        "explicit". Scores kept by a band or a spec are only the reference of its coverage."""
        head = (self.selector or "").partition(":")[0]
        if head in BANDS:
            return head
        if head in SCORE_SOURCES and self.scores is not None:
            return self.scores.source
        if self.selector is None:
            return None
        return "all" if self.rule == "all" else "explicit"

    def to_dict(self) -> dict[str, Any]:
        """The JSON document written as selection.json (schema in docs/select.md)."""
        return jsonable({
            "schema_version": SCHEMA_VERSION, "kind": "mechlora.selection",
            "selector": self.selector, "source": self.source, "model": self.model,
            "n_layers": self.spec.n_layers, "rule": self.rule, "spec": str(self.spec),
            "layers": list(self.spec.layers), "covered": self.covered, "reason": self.reason,
            "settings": self.settings,
            "scores": None if self.scores is None else self.scores.to_dict(),
        })

    @classmethod
    def from_dict(cls, doc: dict[str, Any], where: str = "selection") -> Selection:
        if not isinstance(doc, dict) or doc.get("kind") != "mechlora.selection":
            raise MechloraError(f"{where} is not a mechlora selection (no \"kind\": "
                                "\"mechlora.selection\"); write one with mechlora select --out")
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise MechloraError(f"{where} has schema version {doc.get('schema_version')}; this "
                                f"mechlora reads {SCHEMA_VERSION}")
        try:
            spec = LayerSpec.parse(doc["spec"], doc["n_layers"])
            scores = None if doc["scores"] is None else Scores.from_dict(doc["scores"],
                                                                         doc.get("model"))
            selection = cls(spec, doc["rule"], doc["covered"], doc["reason"], doc["selector"],
                            scores, doc.get("settings", {}), doc.get("model"))
        except KeyError as e:
            raise MechloraError(f"{where}: field {e.args[0]!r} is missing") from None
        except MechloraError as e:
            raise MechloraError(f"{where}: {e}") from None
        except (TypeError, ValueError) as e:
            raise MechloraError(f"{where}: a field has the wrong type ({e})") from None
        if scores is not None and scores.n_layers != spec.n_layers:
            raise MechloraError(f"{where}: {scores.n_layers} scores for a model of "
                                f"{spec.n_layers} layers")
        return selection

    def save(self, path: str | Path) -> Path:
        """Write selection.json atomically; `path` is the file or a folder to hold it."""
        path = Path(path)
        if path.suffix.lower() != ".json":
            path = path / FILE_NAME
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Selection:
        """Read a selection.json (the file, or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        return cls.from_dict(read_json(path), str(path))


def load_selection(path: str | Path, rule: str | None = None) -> Selection:
    """A saved selection, or a selection made from saved scores.

    `path`: a selection.json (or its folder), a localization folder (or its localization.json),
    or a training run that localized (its `localization/` subfolder). With `rule`, the rule is
    applied to the saved scores (any SELECTOR_HELP selector); a saved selection without `rule`
    comes back as it was saved, a localization with the default window:5.
    """
    from mechlora.result import LocalizationResult

    path = Path(path)
    if not path.exists():
        raise MechloraError(f"{path} not found; give a localization folder or a saved "
                            "selection (selection.json)")
    folder = path.parent if path.name in ("localization.json", FILE_NAME) else path
    if (folder / "localization" / "localization.json").is_file():
        folder = folder / "localization"
    if path.name == FILE_NAME or (path.suffix.lower() == ".json" and path.is_file()
                                  and path.name != "localization.json") \
            or (folder / FILE_NAME).is_file():
        saved = Selection.load(path if path.is_file() else folder / FILE_NAME)
        if rule is None:
            return saved
        if saved.scores is not None:
            rule = on_source(rule, saved.scores.source)
        return apply_selector(rule, saved.scores, saved.spec.n_layers,
                              seed=saved.settings.get("seed", 0), model=saved.model)
    if not (folder / "localization.json").is_file():
        raise MechloraError(f"{path} holds neither a selection.json nor a localization.json; "
                            "give a folder written by mechlora localize, mechlora train "
                            "(--layers auto) or mechlora select --out")
    scores = Scores.from_localization(LocalizationResult.load(folder), folder)
    return apply_selector(rule or f"window:{DEFAULT_WINDOW}", scores, scores.n_layers,
                          model=scores.model)


# ---- the selector grammar ---------------------------------------------------------------


def parse_selector(text: str) -> tuple[str | None, str]:
    """(score source or None, rule) of a selector: 'grad:5' -> ('grad', 'topk:5').

    Bands come back as (None, 'random:5'); plain rules, 'all' and specs as
    ('localization', rule) for the rules that read scores and (None, rule) otherwise.
    """
    text = text.strip().lower()
    head, _, rest = (part.strip() for part in text.partition(":"))
    head = ALIASES.get(head, head)
    if head in SCORE_SOURCES:
        native = SCORE_SOURCES[head]
        if not rest:
            return head, f"{native}:{DEFAULT_WINDOW}"
        return head, f"{native}:{rest}" if rest.isdigit() else rest
    if head in BANDS:
        return None, f"{head}:{rest}"
    if head in ("window", "mass", "topk"):
        return "localization", text
    if text == "all" or _SPEC_CHARS.fullmatch(text):
        return None, text
    raise MechloraError(f"unknown selector {text!r}; {SELECTOR_HELP}")


def on_source(selector: str, source: str) -> str:
    """A bare rule (window:K, mass:P, topk:K) read on `source`'s scores: 'grad:window:5'.

    Any other selector comes back unchanged (and is refused later if it names another source).
    """
    head = selector.strip().lower().partition(":")[0].strip()
    return f"{source}:{selector.strip()}" if head in ("window", "mass", "topk") else selector


def apply_selector(selector: str, scores: Scores | np.ndarray | None, n_layers: int | None = None,
                   *, seed: int = 0, model: str | None = None) -> Selection:
    """The selection `selector` makes from `scores` (None for bands, `all` and specs).

    `scores` of another source than the selector's are refused (pass the right ones); scores
    given to a band, `all` or a spec are only used to report coverage.
    """
    if isinstance(scores, np.ndarray):
        scores = Scores("localization", scores)
    n = scores.n_layers if scores is not None else n_layers
    if n is None:
        raise MechloraError(f"{selector!r}: give the number of layers (or scores)")
    if scores is not None and n_layers is not None and n_layers != n:
        raise MechloraError(f"{selector!r}: {scores.n_layers} scores for a model of "
                            f"{n_layers} layers")
    source, rule = parse_selector(selector)
    model = model or (scores.model if scores is not None else None)
    if source is not None:
        if scores is None:
            raise MechloraError(f"{selector!r} reads {source} scores; compute them first "
                                "(mechlora.selectors.compute_scores)")
        if scores.source != source:
            raise MechloraError(f"{selector!r} reads {source} scores, but these are "
                                f"{scores.source} scores")
        chosen = select_layers(scores, rule)
        return Selection(chosen.spec, chosen.rule, chosen.covered, chosen.reason,
                         f"{source}:{chosen.rule}", scores, {}, model)
    name = rule.partition(":")[0]
    if name in BANDS:
        return band_layers(name, rule.partition(":")[2], n, seed=seed, reference=scores,
                           model=model)
    spec = LayerSpec.parse(rule, n)  # all, or a spec
    rule = "all" if rule == "all" else str(spec)
    what = "every layer" if rule == "all" else "explicit spec"
    if scores is not None:
        chosen = _finish(_clean(scores.values), spec, rule, what, _scored(scores))
        return Selection(spec, rule, chosen.covered, chosen.reason, rule, scores, {}, model)
    return Selection(spec, rule, None, f"{rule} -> {spec}: {what}", rule, None, {}, model)


def band_layers(name: str, k: int | str, n_layers: int, *, seed: int = 0,
                reference: Scores | None = None, model: str | None = None) -> Selection:
    """early/middle/late:K, random:K (scattered) or randband:K (contiguous), seeded.

    `reference` scores (e.g. a localization's) only add the coverage to the reason.
    """
    if name not in BANDS:
        raise MechloraError(f"unknown band {name!r}; use one of {', '.join(BANDS)}")
    k = _count_arg(name, str(k).strip(), n_layers)
    rng = np.random.default_rng(seed)
    if name == "early":
        layers = range(k)
    elif name == "late":
        layers = range(n_layers - k, n_layers)
    elif name == "middle":
        layers = range((n_layers - k) // 2, (n_layers - k) // 2 + k)
    elif name == "random":
        layers = rng.choice(n_layers, size=k, replace=False).tolist()
    else:
        start = int(rng.integers(0, n_layers - k + 1))
        layers = range(start, start + k)
    spec = LayerSpec.of(layers, n_layers)
    rule = f"{name}:{k}"
    settings = {"seed": seed} if name in ("random", "randband") else {}
    what = BANDS[name].format(k=k, seed=seed)
    if reference is None:
        return Selection(spec, rule, None, f"{rule} -> {spec}: {what}", rule, None, settings,
                         model)
    chosen = _finish(_clean(reference.values), spec, rule, what, _scored(reference))
    return Selection(spec, rule, chosen.covered, chosen.reason, rule, reference, settings, model)


def _scored(scores: Scores) -> str:
    return "score" if scores.source == "localization" else f"{scores.source} score"



# ---- rules ----------------------------------------------------------------------------------


def select_layers(scores: np.ndarray | Scores, rule: str) -> Selection:
    """Apply `rule` to per-layer `scores` (shape [n_layers], or a `Scores`); see RULES_HELP.

    With a `Scores` of another source than a localization, the reason starts with what the
    scores measure, and the selection keeps them (its `scores`).
    """
    source = scores if isinstance(scores, Scores) else None
    values = _clean(source.values if source is not None else scores)
    chosen = _apply_rule(values, rule)
    if source is None:
        return chosen
    reason = chosen.reason
    if source.source != "localization":
        reason = f"{source.about or source.source + ' scores'}: {reason}"
    return Selection(chosen.spec, chosen.rule, chosen.covered, reason,
                     f"{source.source}:{chosen.rule}", source, {}, source.model)


def _apply_rule(values: np.ndarray, rule: str) -> Selection:
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


def _finish(values: np.ndarray, spec: LayerSpec, rule: str, what: str,
            scored: str = "score") -> Selection:
    pos = np.clip(values, 0.0, None)
    total = float(pos.sum())
    if total <= 0:
        return Selection(spec, rule, 0.0, f"{rule} -> {spec}: {what}, no positive {scored} to "
                                          "cover")
    covered = float(pos[list(spec.layers)].sum()) / total
    peak = int(np.argmax(pos))
    where = "" if peak in spec else ", outside the selection"
    return Selection(spec, rule, covered, f"{rule} -> {spec}: {what}, {covered:.0%} of the "
                                          f"positive {scored} (peak layer {peak}{where})")
