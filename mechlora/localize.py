"""`localize`: where in the layer stack does one paraphrase's answer become the other's?

For each pair (donor a, recipient b) and each site (layer, component) the recipient runs with
a's activation patched in at aligned positions; restoration r = (m(b<-a) - m(b)) / (m(a) - m(b))
says how much of a's answer that site carries. Per-layer divergence of the clean runs (cosine
distance, logit-lens KL) is recorded alongside, at no extra forward.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mechlora.data import Pair, QuestionGroup, load_groups, make_pairs
from mechlora.errors import MechloraError
from mechlora.features import with_image_features
from mechlora.models.choices import ChoiceTokens, as_choices
from mechlora.models.family import bidirectional
from mechlora.models.subject import Subject
from mechlora.patching import Prefix, cached_valid, choice_head, margin, run_prefix
from mechlora.probes import COMPONENTS, Site, all_sites, record
from mechlora.result import GROUP_KEYS, LocalizationResult, merge_results
from mechlora.select import select_layers
from mechlora.spec import LayerSpec


@dataclass
class CleanRun:
    """One prompt's clean forward: inputs, margin, prediction, and recorded activations."""

    inputs: dict
    positions: torch.Tensor          # [P] aligned positions (absolute, this prompt)
    values: dict[Site, torch.Tensor]  # site -> [P, hidden]
    resid_last: torch.Tensor         # [L, hidden] residual stream at the last position
    margin: float
    pred: int
    prefix: Prefix | None = None     # KV cache before the first aligned position (cached engine)
    _lens: torch.Tensor | None = None
    prefixes: dict[int, Prefix] = field(default_factory=dict)  # start -> the cache before it

    def logit_lens(self, subject: Subject) -> torch.Tensor:
        """[L, vocab] log-probabilities of the logit lens at the last position (computed once)."""
        if self._lens is None:
            dtype = subject.unembed.weight.dtype  # resid_last is fp32; the model may be bf16
            lens = subject.logit_lens(self.resid_last.to(subject.device, dtype))
            self._lens = F.log_softmax(lens.float(), -1)
        return self._lens


def parse_positions(spec: str) -> tuple[str, int]:
    """`last`, `suffix:K` (last K positions, aligned from the end) or `image`."""
    if spec == "last":
        return "last", 1
    if spec == "image":
        return "image", 0
    if spec.startswith("suffix:") and spec[7:].isdigit() and int(spec[7:]) > 0:
        return "suffix", int(spec[7:])
    raise MechloraError(f"unknown positions '{spec}'; use last, suffix:K (e.g. suffix:4) or image")


def aligned_positions(subject: Subject, inputs: dict, spec: str) -> torch.Tensor:
    kind, k = parse_positions(spec)
    length = inputs["input_ids"].shape[1]
    if kind == "image":
        token = subject.image_token_id
        if token is None or not subject.is_vlm:
            raise MechloraError("positions 'image' need a vision-language model")
        pos = (inputs["input_ids"][0] == token).nonzero().flatten()
        if len(pos) == 0:
            raise MechloraError("positions 'image' need pairs with an image")
        return pos
    if k > length:
        raise MechloraError(f"positions {spec} is longer than a prompt of {length} tokens")
    return torch.arange(length - k, length)


def clean_run(subject: Subject, question: str, image, ref: int,
              answer_ids: ChoiceTokens | Sequence[int],
              sites: Sequence[Site], spec: str, *, keep_prefix: bool = False,
              each_position: bool = False) -> CleanRun:
    """`keep_prefix`: keep the KV cache of the positions before the first aligned one, which the
    cached engine then reuses (one forward fewer per recipient). `each_position`: also the
    cache cut before each later aligned position (views of the same tensors, no copies), for
    rows that patch one position only."""
    inputs = subject.encode([question], [image])
    positions = aligned_positions(subject, inputs, spec)
    length = inputs["input_ids"].shape[1]
    start = int(positions.min())
    keep_prefix = keep_prefix and cached_valid(subject, inputs, start) is None
    resid_sites = all_sites(subject.n_layers, ["resid"])
    with choice_head(subject, answer_ids) as cols, \
            record(subject, sites, positions[None]) as values, \
            record(subject, resid_sites, torch.tensor([[length - 1]])) as resid:
        out = subject.model(**with_image_features(subject, inputs), logits_to_keep=1,
                            use_cache=keep_prefix)
    logits = out.logits[:, -1]
    prefixes: dict[int, Prefix] = {}
    if keep_prefix:  # the clean run's own cache, cut before the aligned positions
        cache = getattr(out, "cache", None) or out.past_key_values
        starts = sorted({int(p) for p in positions}) if each_position else [start]
        # Every cut is taken before any is used: each holds views of the whole prompt's cache.
        prefixes = {s: cut for s in starts if (cut := Prefix.of(cache, s)) is not None}
        prefixes[start] = prefixes.get(start) or run_prefix(subject, inputs, start)
    return CleanRun(
        inputs=inputs, positions=positions,
        values={s: v[0] for s, v in values.items()},
        resid_last=torch.stack([resid[s][0, 0] for s in resid_sites]).float(),
        margin=float(margin(logits, cols, ref)[0]),
        pred=int(as_choices(cols).scores(logits[0]).argmax()),
        prefix=prefixes.get(start), prefixes=prefixes,
    )


def divergence(subject: Subject, a: CleanRun, b: CleanRun, *, logit_lens: bool = True
               ) -> dict[str, np.ndarray]:
    """Per-layer cosine distance and logit-lens KL(a || b) of the last-position residuals."""
    cosine = 1 - F.cosine_similarity(a.resid_last, b.resid_last, dim=-1)
    out = {"cosine": cosine.cpu().numpy()}
    if logit_lens:
        logp_a, logp_b = a.logit_lens(subject), b.logit_lens(subject)
        out["logit_lens_kl"] = (logp_a.exp() * (logp_a - logp_b)).sum(-1).cpu().numpy()
    return out


def screen(pair: Pair, a: CleanRun, b: CleanRun, *, positions: str, only_flips: bool,
           min_delta: float, excluded: list[dict], subject: Subject | None = None
           ) -> float | None:
    """m(a) - m(b) for a pair to patch; None for a pair that is skipped (not a flip, with
    `only_flips`) or excluded (margins too close: appended to `excluded` with the reason).
    A position set that cannot mean what it says for this pair stops the run
    (`check_positions`, given the `subject`)."""
    if only_flips and a.pred == b.pred:
        return None
    if len(a.positions) != len(b.positions):
        raise MechloraError(f"pair {pair.id}: {len(a.positions)} vs {len(b.positions)} "
                            f"aligned positions for '{positions}'")
    delta = a.margin - b.margin
    if abs(delta) < min_delta:
        excluded.append({"id": pair.id, "margin_a": a.margin, "margin_b": b.margin,
                         "reason": f"|m(a) - m(b)| < {min_delta}"})
        return None
    if subject is not None:
        check_positions(subject, pair, a, b, positions)
    return delta


def check_positions(subject: Subject, pair: Pair, a: CleanRun, b: CleanRun, spec: str) -> None:
    """Refuse a position set whose patches cannot do what they say, for the whole run.

    - `suffix:K` aligns the last K tokens of both prompts; they must be the same tokens
      (the shared chat-template suffix), else the patch moves one word's activation onto
      another's. The error names the first differing token from the end.
    - Any position set: when donor and recipient are the same tokens (and image) up to beyond
      the last patched position, at the same offsets, causal attention makes the patched
      activations identical in both runs, so r = 0 by construction (image tokens before
      the question, the MedGemma chat layout, with `image`).
    """
    ids_a, ids_b = a.inputs["input_ids"][0].cpu(), b.inputs["input_ids"][0].cpu()
    pos_a, pos_b = a.positions.cpu(), b.positions.cpu()
    kind, _ = parse_positions(spec)
    if kind == "suffix":
        same = ids_a[pos_a] == ids_b[pos_b]
        if not bool(same.all()):
            j = int((~same).nonzero()[-1])   # the differing token nearest the end
            back = len(pos_a) - j            # 1 = the last token
            text_a, text_b = (subject.tokenizer.decode([int(t)]) for t in (ids_a[pos_a[j]],
                                                                          ids_b[pos_b[j]]))
            fix = (f"use suffix:{back - 1} or less" if back > 2 else "use --positions last")
            raise MechloraError(
                f"pair {pair.id}: positions '{spec}' reach into the question: token {back} "
                f"from the end is {text_a!r} (position {int(pos_a[j])}) in the donor but "
                f"{text_b!r} (position {int(pos_b[j])}) in the recipient, so the aligned "
                f"activations belong to different words; these prompts share their last "
                f"{back - 1} tokens: {fix}")
    pixels = [run.inputs.get("pixel_values") for run in (a, b)]
    same_image = pixels[0] is None or pixels[1] is None or torch.equal(*pixels)
    if (bidirectional(subject.text_config, subject.family) is None and same_image
            and torch.equal(pos_a, pos_b)):
        n = min(len(ids_a), len(ids_b))
        differ = (ids_a[:n] != ids_b[:n]).nonzero()
        first = int(differ[0]) if len(differ) else n
        if int(pos_a.max()) < first:
            raise MechloraError(
                f"positions '{spec}' cannot differ between the prompts of pair {pair.id}: "
                f"both are the same tokens up to position {first}, after every patched "
                f"position (the last is {int(pos_a.max())}); under causal attention the "
                "patched activations are then identical in donor and recipient, so every "
                "restoration is 0 by construction. This is the layout of chat VLMs that put "
                "the image before the question (MedGemma): patch last or suffix:K instead")


def _as_pairs(pairs) -> list[Pair]:
    if isinstance(pairs, (str, Path)):
        return make_pairs(load_groups(pairs))
    pairs = list(pairs)
    if pairs and isinstance(pairs[0], QuestionGroup):
        return make_pairs(pairs)
    return pairs


def localize(subject: Subject, pairs: Sequence[Pair] | Sequence[QuestionGroup] | str | Path, *,
             components: Sequence[str] = COMPONENTS, positions: str = "last",
             engine: str = "auto", only_flips: bool = False, min_delta: float = 0.25,
             max_rows: int | None = None, max_bytes: int | None = None, n_boot: int = 1000,
             progress: bool = True, verify_top: int = 0, logit_lens: bool = True,
             merge_variants: bool = False, heads: bool = False, per_position: bool = False,
             specs: Sequence[str | LayerSpec] = (), rule: str = "window:5",
             by: str | None = None, baseline: LocalizationResult | str | Path | None = None,
             adapter: str | Path | None = None) -> LocalizationResult:
    """Patch every (layer, component) site from each pair's donor into its recipient.

    `pairs` are ordered: pair (a, b) patches a's activations into b's run; `make_pairs` forms
    both directions. `only_flips` keeps pairs whose predicted answers differ; pairs with
    |m(a) - m(b)| < `min_delta` cannot be normalised and are reported in `excluded`.
    `subject` may be a TransformerLens `TransformerBridge`. `engine="attribution"` estimates
    restoration from gradients (mechlora.attribution); `verify_top=K` then checks K sites exactly.
    Each forward holds as many patched rows as fit `max_bytes` (an estimate, default 4 GiB:
    mechlora/memory.py, docs/memory.md) and, when given, at most `max_rows`; results do not
    depend on the split. `logit_lens=False` skips the
    logit-lens KL divergence (a full-vocabulary unembedding of every layer of every prompt: on
    a CPU with a 262k vocabulary, a large share of the sweep). `merge_variants` reads each
    choice as all its case and leading-space variants (mechlora/models/choices.py).

    Beyond the per-layer sweep (docs/localize.md): `components` may name TransformerLens hooks
    (mechlora.sites); `heads` (or component "z") patches each attention head alone
    (`result.heads`); `per_position` patches each aligned position of `suffix:K` or `image`
    alone (`result.by_position`); `specs` ("15-19", "all", "auto": what `rule` selects from
    this run) measures sufficiency and necessity of patching every attn and mlp output of the
    spec at once (`result.specs`); `by` ("type", "phenomenon") adds per-group scores to the
    summary. `adapter` localizes the model with that PEFT adapter applied (the model is left
    as it came); `baseline` (a base model's result) keeps exactly its pairs and divides every
    effect by its gaps, so the curves compare (mechlora.before_after).
    """
    from mechlora.bridges import as_subject
    from mechlora.interventions import add_auto_specs, check_options, cover, parse_specs
    from mechlora.models import wrap
    from mechlora.sites import components as parse_components
    from mechlora.sweep import plan_for

    subject = as_subject(subject)
    check_limits(min_delta=min_delta, max_rows=max_rows, max_bytes=max_bytes)
    if by is not None and by not in GROUP_KEYS:
        raise MechloraError(f"cannot split a localization by '{by}'; use {', '.join(GROUP_KEYS)}")
    comps, want_heads = parse_components(components)
    heads = heads or want_heads
    if engine == "attribution":
        from mechlora.attribution import attribute

        check_options("attribution", heads=heads, per_position=per_position, specs=specs,
                      baseline=baseline, adapter=adapter)
        return attribute(subject, pairs, components=comps, positions=positions,
                         only_flips=only_flips, min_delta=min_delta, max_rows=max_rows,
                         max_bytes=max_bytes, n_boot=n_boot, progress=progress,
                         verify_top=verify_top, merge_variants=merge_variants)
    if verify_top:
        raise MechloraError("verify_top checks engine='attribution' against exact patching; "
                            "use it with that engine only")
    subject = wrap(subject, None) if not isinstance(subject, Subject) else subject
    all_sites(subject.n_layers, comps)  # bad options fail before any work
    explicit, auto = parse_specs(specs, subject.n_layers)
    if auto:  # the rule runs only after the sweep: check it now on placeholder scores
        select_layers(np.ones(subject.n_layers), rule)
    args = dict(components=comps, positions=positions, engine=engine, only_flips=only_flips,
                min_delta=min_delta, max_rows=max_rows, max_bytes=max_bytes, n_boot=n_boot,
                progress=progress, logit_lens=logit_lens, merge_variants=merge_variants,
                heads=heads, per_position=per_position, specs=specs, rule=rule, by=by,
                baseline=baseline)
    if adapter is not None:
        from mechlora.before_after import adapted

        with adapted(subject, adapter) as with_adapter:
            result = localize(with_adapter, pairs, **args)
        result.settings["adapter"] = str(adapter)
        return result
    pairs = _as_pairs(pairs)
    if not pairs:
        raise MechloraError("no pairs to localize: the data has no paraphrase pairs")
    kind, _ = parse_positions(positions)
    if per_position and kind == "last":
        raise MechloraError("per_position patches each aligned position alone; positions "
                            "'last' has one: use suffix:K (or image after the question)")
    if not comps and not specs and not heads:
        raise MechloraError(f"no sites to patch; name components ({', '.join(COMPONENTS)}), "
                            "heads or specs")
    if per_position and not comps:
        raise MechloraError("per_position patches the components at each position: name "
                            f"some ({', '.join(COMPONENTS)})")
    if auto and "resid" not in comps and not {"attn", "mlp"} & set(comps):
        raise MechloraError("spec 'auto' selects from this run's scores: patch resid, attn "
                            "or mlp too")
    base, keep = _baseline(baseline, pairs, positions, subject.n_layers, comps, merge_variants)
    plan = plan_for(subject, comps, heads=heads, per_position=per_position, specs=explicit)
    kw = dict(components=comps, positions=positions, engine=engine, only_flips=only_flips,
              min_delta=min_delta, max_rows=max_rows, max_bytes=max_bytes, n_boot=n_boot,
              logit_lens=logit_lens, merge_variants=merge_variants)
    result = run_sweep(subject, pairs, plan, keep=keep, progress=progress, **kw)
    if auto:
        add_auto_specs(result, subject, pairs, rule, progress=progress, **kw)
    elif result.specs:
        cover(result)
    result.settings.update(heads=heads, per_position=per_position, rule=rule, by=by,
                           specs=[f"{e.spec} ({e.label})" for e in result.specs])
    from mechlora.before_after import adapted_layers

    if adapted_layers(subject):
        result.settings["adapted_layers"] = list(adapted_layers(subject))
    if base is not None:
        result.settings["normalization"] = {
            "by": "baseline", "baseline_model": base.model, "n_pairs": base.n_pairs,
            "meaning": "every effect divided by the baseline's m(a) - m(b) for the pair"}
    return result


def _baseline(baseline, pairs: Sequence[Pair], positions: str, n_layers: int,
              components: Sequence[str], merge_variants: bool):
    """The baseline result and its pairs' gaps (pair id -> m(a) - m(b)), or (None, None)."""
    if baseline is None:
        return None, None
    from mechlora.before_after import check_comparable

    base = baseline if isinstance(baseline, LocalizationResult) \
        else LocalizationResult.load(baseline)
    check_comparable(base, n_layers, components, "merged" if merge_variants else "first",
                     "this run")
    if base.positions != positions:
        raise MechloraError(f"the baseline was localized at positions '{base.positions}', "
                            f"not '{positions}': use the same positions to compare")
    missing = set(base.pair_ids) - {p.id for p in pairs}
    if missing:
        raise MechloraError(f"{len(missing)} pairs of the baseline are not in these pairs "
                            f"(e.g. {sorted(missing)[0]}): localize the adapted model on the "
                            "data the baseline used")
    gaps = base.gap if base.gap is not None else base.margin_a - base.margin_b
    return base, dict(zip(base.pair_ids, gaps.tolist()))


def run_sweep(subject: Subject, pairs: Sequence[Pair], plan, *, progress: bool,
              **kw) -> LocalizationResult:
    """`mechlora.sweep.sweep` here, or under `accelerate launch` split over the processes
    (each sweeps every world-th pair) and gathered into one result in the pairs' order."""
    from mechlora.sweep import sweep

    world = distributed_state()
    if world is None:
        return sweep(subject, pairs, plan, progress=progress, **kw)
    from accelerate.utils import gather_object

    part = sweep(subject, pairs[world.process_index::world.num_processes], plan,
                 progress=progress and world.is_main_process, **kw)
    return merge_results(gather_object([part]), [p.id for p in pairs])


def check_limits(*, min_delta: float, max_rows: int | None = None,
                 max_bytes: int | None = None) -> None:
    """Refuse options that would divide by zero or bound nothing."""
    if not min_delta > 0:  # also refuses NaN
        raise MechloraError(f"min_delta must be a positive number of logits (r divides by "
                            f"m(a) - m(b)), got {min_delta}; the default is 0.25")
    if max_rows is not None and max_rows < 1:
        raise MechloraError(f"max_rows must be at least 1 (or unset), got {max_rows}")
    if max_bytes is not None and max_bytes < 1:
        raise MechloraError(f"max_bytes must be a positive number of bytes, got {max_bytes}")


def distributed_state():
    """accelerate's process state when launched on several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    # Without cpu=True accelerate leaves CPU-only processes undistributed (no gloo group).
    state = PartialState(cpu=not torch.cuda.is_available())
    return state if state.num_processes > 1 else None
