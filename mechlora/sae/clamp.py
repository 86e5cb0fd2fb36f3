"""Clamp one SAE feature to a value while the model runs, and evaluate the clamped model.

The clamp moves the residual at resid@layer along the feature's decoder row only:
x' = x + (v - z_f(x)) W_dec[f], the SAE's reconstruction with z_f set to v plus the original
error term; every other part of x is as it was. (Encoding x' again need not give exactly v:
an inactive JumpReLU feature's pre-activation, or an encoder row not dual to the decoder row,
shifts it.) `positions="last"` clamps the last position of every forward (the answer position of a
left-padded prompt; each new token while generating); `"all"` clamps every position.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mechlora.data import QuestionGroup, load_groups, load_image
from mechlora.errors import MechloraError
from mechlora.features import with_image_features
from mechlora.patching import choice_head
from mechlora.probes import Site, _tensor, _with_tensor, record, site_module
from mechlora.sae.analysis import _subject
from mechlora.sae.model import SAE, attach_layer
from mechlora.sae.result import ClampResult

CLAMP_POSITIONS = ("last", "all")
VALUE_HELP = ("a number, mean (over every wording), mean:N (wording N; 0 = the original), "
              "mean:PHENOMENON (the paraphrases of one phenomenon), max or max*K (K times the "
              "largest activation on the data)")


def _check(sae: SAE, feature: int, positions: str) -> None:
    if not 0 <= feature < sae.d_sae:
        raise MechloraError(f"feature {feature} does not exist: the SAE has {sae.d_sae} "
                            f"features (0-{sae.d_sae - 1})")
    if positions not in CLAMP_POSITIONS:
        raise MechloraError(f"clamp positions must be last or all, got '{positions}'")


@contextmanager
def clamp_feature(subject, sae: SAE, feature: int, value: float, *, layer: int | None = None,
                  positions: str = "last") -> Iterator[None]:
    """Within: every forward of `subject` runs with feature `feature` of the SAE at resid@layer
    set to `value` (x' = x + (value - z_f(x)) W_dec[f]). The hook is removed on exit, so the
    model is left as it was."""
    subject = _subject(subject)
    layer = attach_layer(sae, subject, layer)
    _check(sae, feature, positions)
    direction = sae.W_dec[feature].float()

    def hook(module, args, output):
        x = _tensor(output)
        part = x[:, -1:] if positions == "last" else x
        z = sae.encode(part, feature).float().to(x.device)
        moved = (part.float() + (value - z)[..., None] * direction.to(x.device)).to(x.dtype)
        if positions == "last":
            moved = torch.cat([x[:, :-1], moved], dim=1)
        return _with_tensor(output, moved)

    handle = site_module(subject, Site(layer, "resid")).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def feature_values(subject, sae: SAE, groups: Sequence[QuestionGroup], feature: int, *,
                   layer: int | None = None, positions: str = "last", progress: bool = True
                   ) -> list[dict]:
    """The feature's activation on every wording (one forward each): its mean and max over
    `positions` (the last position, or all), with the wording's group, index, phenomenon."""
    subject = _subject(subject)
    layer = attach_layer(sae, subject, layer)
    _check(sae, feature, positions)
    site, rows = Site(layer, "resid"), []
    n = sum(len(g.variants) for g in groups)
    with torch.inference_mode(), tqdm(total=n, desc="feature values", unit="wording",
                                      disable=not progress) as bar:
        for g in groups:
            image = load_image(g.image) if (g.image is not None and subject.is_vlm) else None
            for v, variant in enumerate(g.variants):
                inputs = subject.encode([variant.text], [image])
                length = inputs["input_ids"].shape[1]
                pos = (torch.tensor([[length - 1]]) if positions == "last"
                       else torch.arange(length)[None])
                with choice_head(subject, [0]), record(subject, [site], pos) as store:
                    subject.model(**with_image_features(subject, inputs), logits_to_keep=1,
                                  use_cache=False)
                z = sae.encode(store[site][0], feature).float()
                rows.append({"group": g.id, "variant": v, "phenomenon": variant.phenomenon,
                             "mean": float(z.mean()), "max": float(z.max())})
                bar.update(1)
    return rows


def resolve_value(spec: str | float, rows: Sequence[dict] = ()) -> tuple[float, int]:
    """The clamp value a spec names, and how many wordings it was computed from (0 for a
    number). `rows`: `feature_values` of the data."""
    if isinstance(spec, (int, float)):
        return float(spec), 0
    text = spec.strip()
    try:
        return float(text), 0
    except ValueError:
        pass
    if m := re.fullmatch(r"max(?:\*(-?[0-9.]+(?:e-?\d+)?))?", text):
        if not rows:
            raise MechloraError("no wordings to take the feature's max over")
        return float(m[1] or 1) * max(r["max"] for r in rows), len(rows)
    if m := re.fullmatch(r"mean(?::(.+))?", text):
        which = m[1]
        if which is None:
            picked = list(rows)
        elif which.isdigit() or which == "original":
            picked = [r for r in rows if r["variant"] == (0 if which == "original"
                                                          else int(which))]
        else:
            picked = [r for r in rows if r["phenomenon"] == which]
        if not picked:
            known = sorted({r["phenomenon"] for r in rows if r["phenomenon"]})
            raise MechloraError(f"--value {spec}: no wording matches '{which}'; the data has "
                                f"wordings 0-{max((r['variant'] for r in rows), default=0)} "
                                f"and phenomena {', '.join(known) or '(none)'}")
        return float(np.mean([r["mean"] for r in picked])), len(picked)
    raise MechloraError(f"--value '{spec}' is not a clamp value; use {VALUE_HELP}")


def clamp_eval(subject, sae: SAE, feature: int, value: str | float,
               pairs: str | Path | Sequence[QuestionGroup], *, layer: int | None = None,
               positions: str = "last", batch_size: int = 16, n_boot: int = 2000,
               seed: int = 0, progress: bool = True, merge_variants: bool = False
               ) -> ClampResult:
    """`mechlora.evaluate` on the data without and with the feature clamped to `value` (a
    number or a spec: `resolve_value`); flips, accuracy, margin difference of both and their
    paired comparison (`mechlora.metrics.compare`, diff = clamped - base)."""
    from mechlora.evaluate import evaluate
    from mechlora.metrics import compare

    subject = _subject(subject)
    groups = load_groups(pairs) if isinstance(pairs, (str, Path)) else list(pairs)
    layer = attach_layer(sae, subject, layer)
    _check(sae, feature, positions)
    rows = [] if isinstance(value, (int, float)) else feature_values(
        subject, sae, groups, feature, layer=layer, positions=positions, progress=progress)
    v, n_used = resolve_value(value, rows)
    notes = []
    if rows and not any(r["max"] > 0 for r in rows):
        notes.append(f"feature {feature} is never active at positions '{positions}' on these "
                     f"{len(rows)} wordings, so '{value}' resolves to {v:g}")
    kw = dict(gray=False, noimage=False, swap=False, batch_size=batch_size, progress=progress,
              n_boot=n_boot, seed=seed, merge_variants=merge_variants)
    base = evaluate(subject, groups, **kw)
    with clamp_feature(subject, sae, feature, v, layer=layer, positions=positions):
        clamped = evaluate(subject, groups, **kw)
    return ClampResult(
        model=subject.name, layer=layer, feature=int(feature), positions=positions, value=v,
        value_spec=str(value), sae=sae.describe(), base=base.metrics["base"],
        clamped=clamped.metrics["base"],
        comparison=compare(base.predictions["base"], clamped.predictions["base"],
                           n_boot=n_boot, seed=seed),
        records=[{**r, "arm": "base"} for r in base.records]
        + [{**r, "arm": "clamped"} for r in clamped.records],
        settings={"batch_size": batch_size, "n_boot": n_boot, "seed": seed,
                  "value_from_wordings": n_used, "notes": notes, "data": base.data,
                  "choice_reading": "merged" if merge_variants else "first",
                  "eval_settings": base.settings})
