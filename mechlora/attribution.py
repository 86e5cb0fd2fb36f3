"""Attribution patching: a first-order estimate of every site's restoration from one backward.

For a pair (donor a, recipient b) and site s, exact patching runs b with a's activation at s.
Its first-order Taylor estimate needs no patched run at all:

    m(b <- a@s) - m(b) ~= sum over aligned positions p of (a[s,p] - b[s,p]) . dm/db[s,p]

so one forward of each prompt (recording activations) and one backward of the recipient's
margin give the estimate for every layer, component and position together. The gradient
depends only on the recipient, so each prompt's forward + backward serves every pair it is
in. Restoration estimate = estimate / (m(a) - m(b)), as for exact patching.

The estimate is exact where the margin is linear in the activation and poor where the model
saturates (a gate or softmax far from its switching point). `verify_top=K` re-runs the K
sites with the largest mean |estimate| with exact patching and stores the Spearman rank
correlation of estimate and exact in `result.settings["attribution"]`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mechlora.data import Pair, QuestionGroup, load_image
from mechlora.errors import MechloraError
from mechlora.localize import (
    CleanRun,
    _as_pairs,
    aligned_positions,
    check_limits,
    clean_run,
    divergence,
    parse_positions,
    screen,
)
from mechlora.models.choices import ChoiceTokens, as_choices
from mechlora.models.subject import Subject
from mechlora.patching import RUNNERS, SitePatch, choose_engine, last_logits, margin
from mechlora.probes import COMPONENTS, Site, all_sites, record, site_module
from mechlora.result import LocalizationResult

MAX_POSITIONS_KEPT = 64  # per-position means are stored for at most this many positions


def _zero_probe(store: dict[Site, torch.Tensor], site: Site):
    # Adding a zero that requires grad leaves the forward unchanged and makes d m / d(output)
    # available at every site from one backward, whether or not the weights require grad.
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        probe = torch.zeros_like(hidden, requires_grad=True)
        store[site] = probe
        hidden = hidden + probe
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    return hook


def gradient_run(subject: Subject, question: str, image, ref: int,
                 answer_ids: ChoiceTokens | Sequence[int],
                 sites: Sequence[Site], spec: str) -> tuple[CleanRun, dict[Site, torch.Tensor]]:
    """One forward and one backward of a prompt: its clean run, and d margin / d activation
    at every site and aligned position ([P, hidden] per site)."""
    inputs = subject.encode([question], [image])
    positions = aligned_positions(subject, inputs, spec)
    last = torch.tensor([[inputs["input_ids"].shape[1] - 1]])
    resid_sites = all_sites(subject.n_layers, ["resid"])
    probes: dict[Site, torch.Tensor] = {}
    handles = [site_module(subject, s).register_forward_hook(_zero_probe(probes, s))
               for s in sites]
    try:
        with torch.enable_grad(), record(subject, sites, positions[None]) as values, \
                record(subject, resid_sites, last) as resid:
            logits = last_logits(subject, inputs)
            m = margin(logits, answer_ids, ref)[0]
            grads = torch.autograd.grad(m, [probes[s] for s in sites], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    run = CleanRun(
        inputs=inputs, positions=positions, values={s: v[0] for s, v in values.items()},
        resid_last=torch.stack([resid[s][0, 0] for s in resid_sites]).float(),
        margin=m.item(), pred=int(as_choices(answer_ids).scores(logits[0]).argmax()),
    )
    pos = positions.to(logits.device)
    zeros = torch.zeros_like(run.values[sites[0]])
    return run, {s: (zeros if g is None else g[0, pos].detach()) for s, g in zip(sites, grads)}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); nan when a side is constant."""
    x, y = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    return (starts + (counts - 1) / 2)[inv]


def attribute(subject, pairs: Sequence[Pair] | Sequence[QuestionGroup] | str | Path, *,
              components: Sequence[str] = COMPONENTS, positions: str = "last",
              only_flips: bool = False, min_delta: float = 0.25, max_rows: int | None = None,
              max_bytes: int | None = None, n_boot: int = 1000, progress: bool = True,
              verify_top: int = 0, verify_engine: str = "auto",
              merge_variants: bool = False) -> LocalizationResult:
    """Attribution-patching estimates of restoration for every (layer, component) site.

    Arguments as for `mechlora.localize`; the result's `restoration` holds the estimates.
    `verify_top=K` re-runs the K sites with the largest mean |estimate| with exact patching
    (engine `verify_engine`) and stores both, and their rank correlation, in
    `result.settings["attribution"]`.
    """
    from mechlora.bridges import as_subject
    from mechlora.models import wrap

    subject = as_subject(subject)
    subject = wrap(subject, None) if not isinstance(subject, Subject) else subject
    pairs = _as_pairs(pairs)
    if not pairs:
        raise MechloraError("no pairs to localize: the data has no paraphrase pairs")
    check_limits(min_delta=min_delta, max_rows=max_rows, max_bytes=max_bytes)
    if verify_top < 0:
        raise MechloraError(f"verify_top must be 0 (no check) or a number of sites, "
                            f"got {verify_top}")
    parse_positions(positions)
    sites = all_sites(subject.n_layers, components)
    kept: list[Pair] = []
    rows: dict[str, list] = {"ma": [], "mb": [], "est": [], "per_pos": []}
    div = {"cosine": [], "logit_lens_kl": []}
    excluded = []
    answer_ids: dict[tuple, ChoiceTokens] = {}
    runs: dict[tuple[str, int], tuple[CleanRun, dict]] = {}
    t0 = time.perf_counter()
    for pair in tqdm(pairs, desc="attribute", unit="pair", disable=not progress):
        g = pair.group
        if g.choices not in answer_ids:
            answer_ids[g.choices] = subject.choice_tokens(g.choices, merge=merge_variants,
                                                          where=(g.source, g.line))
        ids = answer_ids[g.choices]
        image = load_image(g.image) if (g.image is not None and subject.is_vlm) else None
        for v in (pair.a, pair.b):
            if (g.id, v) not in runs:
                runs = {k: r for k, r in runs.items() if k[0] == g.id}  # bound the memory
                runs[(g.id, v)] = gradient_run(subject, g.variants[v].text, image,
                                               g.answer_index, ids, sites, positions)
        (a, _), (b, grad_b) = runs[(g.id, pair.a)], runs[(g.id, pair.b)]
        delta = screen(pair, a, b, positions=positions, only_flips=only_flips,
                       min_delta=min_delta, excluded=excluded, subject=subject)
        if delta is None:
            continue
        per_pos = torch.stack([((a.values[s] - b.values[s]).float() * grad_b[s].float()).sum(-1)
                               for s in sites]) / delta          # [sites, P]
        rows["est"].append(per_pos.sum(-1).cpu().numpy())
        rows["per_pos"].append(per_pos.cpu().numpy())
        with torch.no_grad():
            for k, val in divergence(subject, a, b).items():
                div[k].append(val)
        rows["ma"].append(a.margin)
        rows["mb"].append(b.margin)
        kept.append(pair)
    n_layers = subject.n_layers
    est = (np.stack(rows["est"]) if kept else np.zeros((0, len(sites))))
    est = est.reshape(len(kept), len(components), n_layers)
    info: dict = {"method": "first-order: (act_a - act_b) . d m / d act_b, summed over the "
                            "aligned positions, divided by m(a) - m(b)",
                  "passes": "one forward + one backward per prompt, shared by its pairs"}
    if kept and len(rows["per_pos"][0][0]) <= MAX_POSITIONS_KEPT:
        mean_pos = np.mean(rows["per_pos"], axis=0).reshape(len(components), n_layers, -1)
        info["per_position_mean"] = {c: mean_pos[i] for i, c in enumerate(components)}
    result = LocalizationResult(
        model=subject.name, n_layers=n_layers, components=tuple(components),
        positions=positions, engine="attribution", pair_ids=[p.id for p in kept],
        group_ids=[p.group.id for p in kept],
        restoration={c: est[:, i] for i, c in enumerate(components)},
        margin_a=np.array(rows["ma"]), margin_b=np.array(rows["mb"]),
        divergence={k: (np.stack(v) if v else np.zeros((0, n_layers))) for k, v in div.items()},
        excluded=excluded, n_boot=n_boot,
        settings={"engine": "attribution", "only_flips": only_flips, "min_delta": min_delta,
                  "max_rows": max_rows, "max_bytes": max_bytes, "n_pairs_in": len(pairs),
                  "choice_reading": "merged" if merge_variants else "first",
                  "attribution": info},
    )
    if verify_top and kept:
        info.update(verify(subject, kept, result, verify_top, engine=verify_engine,
                           max_rows=max_rows, max_bytes=max_bytes, progress=progress,
                           merge_variants=merge_variants))
    result.settings["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def verify(subject: Subject, pairs: Sequence[Pair], result: LocalizationResult, k: int, *,
           engine: str = "auto", max_rows: int | None = None, max_bytes: int | None = None,
           progress: bool = False, merge_variants: bool = False) -> dict:
    """Exact restoration of the `k` sites with the largest mean |estimate| in `result`,
    for the same pairs; returns the estimates, the exact values and their rank correlation."""
    sites = [Site(layer, c) for c in result.components for layer in range(result.n_layers)]
    means = {s: result.restoration[s.component][:, s.layer].mean() for s in sites}
    top = sorted(sites, key=lambda s: -abs(means[s]))[:k]
    exact = np.zeros((len(pairs), len(top)))
    engines = set()
    runs: dict[tuple[str, int], CleanRun] = {}
    with torch.inference_mode():
        for i, pair in enumerate(tqdm(pairs, desc="verify", unit="pair", disable=not progress)):
            g = pair.group
            ids = subject.choice_tokens(g.choices, merge=merge_variants, where=(g.source, g.line))
            image = load_image(g.image) if (g.image is not None and subject.is_vlm) else None
            for v in (pair.a, pair.b):
                if (g.id, v) not in runs:
                    runs = {key: r for key, r in runs.items() if key[0] == g.id}
                    runs[(g.id, v)] = clean_run(subject, g.variants[v].text, image,
                                                g.answer_index, ids, top, result.positions)
            a, b = runs[(g.id, pair.a)], runs[(g.id, pair.b)]
            patches = [SitePatch(s, b.positions, a.values[s]) for s in top]
            name = choose_engine(engine, subject, b.inputs, patches)
            engines.add(name)
            patched = RUNNERS[name](subject, b.inputs, patches, ids, g.answer_index,
                                    max_rows=max_rows, max_bytes=max_bytes)
            exact[i] = (patched.cpu().numpy() - b.margin) / (a.margin - b.margin)
    estimate = np.stack([result.restoration[s.component][:, s.layer] for s in top], axis=1)
    return {
        "verify_top": len(top), "exact_engine": "+".join(sorted(engines)),
        "sites": [str(s) for s in top],
        "estimate": estimate.mean(0), "exact": exact.mean(0),
        "spearman": spearman(estimate.mean(0), exact.mean(0)),
        "spearman_pairs": spearman(estimate.ravel(), exact.ravel()),
        "max_abs_error": float(np.abs(estimate - exact).max()),
    }
