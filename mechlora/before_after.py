"""Before and after training: localize an adapted model on the base model's pairs, in the base
model's units, and say where the divergence shrank.

For each pair the base localization divides by the base gap g = m(a) - m(b). The adapted run
(`localize(..., adapter=DIR, baseline=base)`) keeps exactly the base's pairs and divides by
the same g, so its restoration reads "the share of the *base* divergence this site still
carries": at the last layer's residual (last position) it is (m'(a) - m'(b)) / g, the share
of the divergence left after training. Per layer and site, base minus adapted is the
divergence removed there; the score drop (residual increments) says in which layers it was
written before and no longer is.

`compare_localizations(base, adapted, trained_layers)` returns a `LocalizationComparison`
(means, intervals over question groups, a verdict: shrank at the trained layers, elsewhere,
or nowhere); `localize_adapter` does both runs' second half in one call. `check_comparable`
refuses a base and an adapted run that measure different things.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mechlora import stats
from mechlora.effects import mean_ci
from mechlora.errors import MechloraError
from mechlora.io import jsonable
from mechlora.models.subject import Subject
from mechlora.result import LocalizationResult

SHRINK_BY_MEANS = 0.1  # without intervals (< MIN_CLUSTERS groups): a drop of 10% of the gap
MIN_SHRINK = 0.01  # with intervals, a drop must also average 1% of the base gap: float noise
# of a few 1e-7 (same weights through another kernel, a zero adapter) can lie wholly above 0


@contextmanager
def adapted(subject: Subject, adapter: str | Path) -> Iterator[Subject]:
    """`subject` with the PEFT adapter folder `adapter` applied; afterwards the model is put
    back as it was (the LoRA modules removed, the original ones restored, nothing merged)."""
    from peft import PeftModel

    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise MechloraError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    if isinstance(subject.model, PeftModel):
        raise MechloraError(f"{subject.name} already carries a PEFT adapter: localize it as it "
                            "is (no adapter argument), or pass the base model")
    try:
        model = PeftModel.from_pretrained(subject.model, str(path)).eval()
    except BaseException as e:
        _remove_lora(subject.model)  # PEFT injects LoRA before it loads (and fails on) weights
        if isinstance(e, (RuntimeError, ValueError)):
            detail = " ".join(str(e).split())[:300]
            raise MechloraError(f"the adapter {path} does not fit this model ({subject.name}): "
                                f"{detail}; pass the adapter trained on this base model") from e
        raise
    try:
        # LoRA may reach the vision tower too: never reuse cached image features here.
        yield dataclasses.replace(subject, model=model, feature_cache=None,
                                  name=f"{subject.name}+{path.name}")
    finally:
        model.unload()


def _remove_lora(model) -> None:
    """Put back every module that LoRA wrapped, and drop PEFT's config attribute."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def check_comparable(base: LocalizationResult, n_layers: int, components: Sequence[str],
                     choice_reading: str | None, what: str = "the adapted run") -> None:
    """Refuse comparing a base localization with a run that measures something else: another
    layer count (another model), other components, another choice reading (each is compared
    only where both record it)."""
    theirs = base.settings.get("choice_reading")
    for name, b, a in (("layers", base.n_layers, n_layers),
                       ("components", ",".join(sorted(base.components)),
                        ",".join(sorted(components))),
                       ("choice reading", theirs, choice_reading if theirs else None)):
        if b != a:
            raise MechloraError(
                f"cannot compare with the baseline ({base.model}): {name} {b} there, {a} in "
                f"{what}; localize both with the same model, components and "
                "choice reading (merge_variants)")


def adapted_layers(subject: Subject) -> tuple[int, ...]:
    """The decoder layers holding any LoRA module (empty for a plain model)."""
    return tuple(i for i, layer in enumerate(subject.layers)
                 if any(hasattr(m, "lora_A") for m in layer.modules()))


@dataclass
class LocalizationComparison:
    """A base localization and its adapted counterpart on the same pairs, in base units."""

    base: LocalizationResult
    adapted: LocalizationResult
    trained_layers: tuple[int, ...] | None = None
    adapter: str | None = None

    def __post_init__(self) -> None:
        check_comparable(self.base, self.adapted.n_layers, self.adapted.components,
                         self.adapted.settings.get("choice_reading"),
                         f"the adapted localization ({self.adapted.model})")
        if self.adapted.gap is None:
            raise MechloraError("the adapted localization was not run against this baseline; "
                                "localize it with baseline=<the base result>")
        if sorted(self.adapted.pair_ids) != sorted(self.base.pair_ids):
            raise MechloraError("the two localizations hold different pairs; localize the "
                                "adapted model with baseline=<the base result>")
        order = {pid: i for i, pid in enumerate(self.adapted.pair_ids)}
        self.adapted = self.adapted.subset(np.array([order[p] for p in self.base.pair_ids],
                                                    dtype=int))

    @property
    def components(self) -> list[str]:
        return [c for c in self.base.components if c in self.adapted.components]

    def _stat(self, values: np.ndarray) -> dict:
        return mean_ci(self.base.group_ids, values, self.base.n_boot)

    def shrink(self, component: str) -> dict:
        """Per layer: base restoration minus adapted (base units), mean and interval."""
        return self._stat(self.base.restoration[component]
                          - self.adapted.restoration[component])

    def score_shrink(self) -> dict:
        """Per layer: the drop of the per-layer score (where the divergence is written)."""
        return self._stat(self.base.per_pair_scores() - self.adapted.per_pair_scores())

    def remaining(self) -> dict:
        """The share of each pair's base divergence left after training, (m'(a)-m'(b)) / g."""
        return self._stat((self.adapted.margin_a - self.adapted.margin_b) / self.adapted.gap)

    def shrank_at(self) -> tuple[list[int], str]:
        """The layers whose score dropped: interval above 0 and a mean drop above MIN_SHRINK
        of the base gap, or (with too few question groups for intervals) a mean drop above
        SHRINK_BY_MEANS; and which test was used."""
        drop = self.score_shrink()
        if np.isfinite(drop["ci_low"]).all():
            return [int(i) for i in np.flatnonzero((drop["ci_low"] > 0)
                                                   & (drop["mean"] > MIN_SHRINK))], "interval"
        return [int(i) for i in np.flatnonzero(drop["mean"] > SHRINK_BY_MEANS)], "means"

    def verdict(self) -> str:
        left = self.remaining()
        layers, test = self.shrank_at()
        share = f"{_pct(left['mean'])} of the base divergence remains"
        if np.isfinite(left["ci_low"]):
            share += f" (95% CI {_pct(left['ci_low'])} to {_pct(left['ci_high'])})"
        how = (f"score drops whose 95% interval lies above 0 and whose mean exceeds "
               f"{MIN_SHRINK:g} of the gap" if test == "interval" else
               f"mean score drops above {SHRINK_BY_MEANS:g} of the gap (fewer than "
               f"{stats.MIN_CLUSTERS} question groups: no intervals)")
        if not layers:
            return f"{share}; no layer's score dropped ({how}): the divergence shrank nowhere"
        trained = set(self.trained_layers or ())
        inside = [i for i in layers if i in trained]
        outside = [i for i in layers if i not in trained]
        where = []
        if self.trained_layers is not None:
            where.append(f"at the trained layers {_list(inside)}" if inside
                         else "at none of the trained layers")
            where.append(f"elsewhere at {_list(outside)}" if outside else "nowhere else")
        else:
            where.append(f"at layers {_list(layers)}")
        return f"{share}; it shrank {' and '.join(where)} ({how})"

    def summary(self) -> dict[str, Any]:
        """The JSON document written as comparison.json."""
        return jsonable({
            "schema_version": 1, "kind": "mechlora.localize_comparison",
            "base_model": self.base.model, "adapted_model": self.adapted.model,
            "adapter": self.adapter, "trained_layers": self.trained_layers,
            "n_pairs": self.base.n_pairs, "n_groups": len(set(self.base.group_ids)),
            "units": "restoration in units of the base model's gap m(a) - m(b) per pair",
            "remaining": self.remaining(), "score_shrink": self.score_shrink(),
            "shrank_at": self.shrank_at()[0], "test": self.shrank_at()[1],
            "shrink": {c: self.shrink(c) for c in self.components},
            "verdict": self.verdict(),
        })


def _pct(x: float) -> str:
    return f"{0.0 if abs(x) < 0.005 else x:.0%}"  # never "-0%"


def _list(layers: Sequence[int]) -> str:
    return ", ".join(str(i) for i in layers)


def compare_localizations(base: LocalizationResult | str | Path,
                          adapted: LocalizationResult | str | Path,
                          trained_layers: Sequence[int] | None = None,
                          adapter: str | None = None) -> LocalizationComparison:
    """Compare a base localization with an adapted one run against it (baseline=base)."""
    def load(x):
        return x if isinstance(x, LocalizationResult) else LocalizationResult.load(x)

    adapted = load(adapted)
    layers = trained_layers if trained_layers is not None \
        else adapted.settings.get("adapted_layers")
    return LocalizationComparison(load(base), adapted,
                                  None if layers is None else tuple(int(i) for i in layers),
                                  adapter or adapted.settings.get("adapter"))


def localize_adapter(subject: Subject, pairs, adapter: str | Path,
                     base: LocalizationResult | str | Path, **kw) -> LocalizationComparison:
    """Localize `subject` with `adapter` applied on `base`'s pairs (same positions, components
    and choice reading unless given) and compare; `mechlora compare` attaches this per arm."""
    from mechlora.localize import localize

    base = base if isinstance(base, LocalizationResult) else LocalizationResult.load(base)
    kw.setdefault("components", base.components)
    kw.setdefault("positions", base.positions)
    kw.setdefault("heads", base.heads is not None)
    kw.setdefault("merge_variants", base.settings.get("choice_reading") == "merged")
    adapted_result = localize(subject, pairs, adapter=adapter, baseline=base, **kw)
    return compare_localizations(base, adapted_result)
