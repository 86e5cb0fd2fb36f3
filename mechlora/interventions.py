"""Does a layer spec carry the divergence? Sufficiency and necessity of multi-layer patches.

`localize(..., specs=["15-19", "all", "auto"])` patches, for each spec S and kept pair
(a, b), every attn and mlp output of S's layers at once (mechlora/effects.py has the
formulas): a's into b's run (sufficiency, denoising) and b's into a's run (necessity,
noising); and every attn and mlp output outside S at once, a's into b's run
(necessity_complement = 1 - its restoration). `auto` is the spec `rule` selects from the
same run's scores: it is known only after the per-layer sweep, so it runs as a second pass
over the kept pairs (one more clean forward per prompt plus three rows per pair).
`spec_effect` is the one-spec function.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mechlora.effects import SpecEffect
from mechlora.errors import MechloraError
from mechlora.spec import LayerSpec

AUTO = "auto"
NONE = "none"


def asked_specs(specs: Sequence[str | LayerSpec] | str | None) -> list[str | LayerSpec]:
    """The specs to test: `none` alone means none; `none` beside another spec is refused
    (needs no model, so the CLI calls it before loading one)."""
    if isinstance(specs, (str, LayerSpec)):
        specs = [specs]
    specs = list(specs or ())
    words = [s.strip().lower() for s in specs if isinstance(s, str)]
    if NONE in words:
        if len(specs) > 1:
            others = ", ".join(str(s) for s in specs if not (isinstance(s, str)
                                                             and s.strip().lower() == NONE))
            raise MechloraError(f"--spec none turns the spec test off, so it cannot come with "
                                f"other specs ({others}); drop none or the others")
        return []
    return specs


def parse_specs(specs: Sequence[str | LayerSpec] | str, n_layers: int
                ) -> tuple[list[tuple[LayerSpec, str]], bool]:
    """Explicit specs with their labels ("all" or "explicit"), and whether "auto" was asked
    (`none` alone: no spec; beside others: refused, see `asked_specs`)."""
    specs = asked_specs(specs)
    explicit, auto = [], False
    for item in specs:
        if isinstance(item, LayerSpec):
            explicit.append((item, "all" if item.is_all else "explicit"))
        elif item.strip().lower() == AUTO:
            auto = True
        else:
            spec = LayerSpec.parse(item, n_layers)
            explicit.append((spec, "all" if item.strip().lower() == "all" else "explicit"))
    return list(dict.fromkeys(explicit)), auto


def check_options(engine: str, **options) -> None:
    """Refuse what an estimate engine cannot do exactly."""
    asked = [name for name, value in options.items() if value]
    if asked:
        raise MechloraError(f"engine {engine} estimates per-layer sites only; "
                            f"{', '.join(asked)} need an exact engine (auto, cached, batched, "
                            "full, nnsight or tlens)")


def add_auto_specs(result, subject, pairs, rule: str, *, progress: bool, **kw) -> None:
    """Select `rule`'s spec from `result`'s scores and measure it on the kept pairs (a second
    pass with the same denominators); sets every spec's coverage of the score."""
    from mechlora.localize import run_sweep
    from mechlora.select import select_layers
    from mechlora.sweep import Plan

    note = None
    if result.n_pairs:
        try:
            chosen = select_layers(result.scores, rule)
        except MechloraError as e:
            note = f"auto: {e}"
        else:
            gaps = result.gap if result.gap is not None else result.margin_a - result.margin_b
            second = run_sweep(subject, pairs, Plan(sites=[], specs=[(chosen.spec,
                                                                      f"auto ({rule})")]),
                               keep=dict(zip(result.pair_ids, gaps.tolist())),
                               progress=progress, **{**kw, "components": ()})
            if second.pair_ids != result.pair_ids:  # kept by their base gaps: all must stay
                raise MechloraError(
                    f"the auto spec's pass kept {second.n_pairs} pairs, the per-layer sweep "
                    f"{result.n_pairs}: the specs cannot be reported beside the sweep; "
                    "please report this with the command that ran")
            result.specs.insert(0, second.specs[0])
    else:
        note = "auto: no pairs kept, nothing to select from"
    if note:
        result.settings["spec_note"] = note
    cover(result)


def cover(result) -> None:
    """Set each spec's share of the positive per-layer score (None without one)."""
    from mechlora.select import select_layers

    for effect in result.specs:
        try:
            spec = LayerSpec(effect.layers, result.n_layers)
            effect.covered = select_layers(result.scores, str(spec)).covered \
                if result.n_pairs and result.components else None
        except MechloraError:
            effect.covered = None


def spec_effect(subject, pairs, spec: str | LayerSpec, *, rule: str = "window:5",
                positions: str = "last", engine: str = "auto", min_delta: float = 0.25,
                only_flips: bool = False, adapter: str | Path | None = None,
                progress: bool = True, **kw) -> SpecEffect:
    """Sufficiency and necessity (noising, and as the complement) of `spec` ("15-19", "all",
    or "auto": what `rule` selects from a localization run first) on `pairs`: per-pair
    values, means and intervals (`SpecEffect.stat`, `.summary()`, `.text()`)."""
    from mechlora.localize import localize

    auto = isinstance(spec, str) and spec.strip().lower() == AUTO
    result = localize(subject, pairs, specs=[spec], rule=rule, positions=positions,
                      engine=engine, min_delta=min_delta, only_flips=only_flips,
                      adapter=adapter, progress=progress, logit_lens=False,
                      components=kw.pop("components", ("resid",) if auto else ()), **kw)
    if not result.specs:
        raise MechloraError(result.settings.get("spec_note", "no spec was measured"))
    return result.specs[0]


def localization_folder(path: str | Path, selection=None) -> Path | None:
    """The localization folder behind `mechlora select`'s SOURCE: a localization folder (or
    its localization.json), a training run's `localization/`, or the folder a saved
    selection's localization scores came from (a relative path is looked for beside the
    selection file, then in the working directory); None when there is none."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    for candidate in (folder, folder / "localization"):
        if (candidate / "localization.json").is_file():
            return candidate
    scores = getattr(selection, "scores", None)
    where = (scores.settings.get("path") if scores is not None
             and scores.source == "localization" else None)
    if where:
        for candidate in (folder / where, Path(where)):  # folder / an absolute path = the path
            if (candidate / "localization.json").is_file():
                return candidate
    return None


def measured_effect(folder: str | Path, spec: LayerSpec) -> SpecEffect | None:
    """The spec test a localization run saved for `spec` (None when it has none)."""
    from mechlora.result import LocalizationResult

    result = LocalizationResult.load(folder)
    return next((e for e in result.specs if e.layers == tuple(spec.layers)), None)
