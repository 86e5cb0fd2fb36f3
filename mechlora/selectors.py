"""Per-layer scores from the selectors a user could pick instead of localization.

Each function returns a `mechlora.select.Scores`: one number per language layer, higher meaning
"adapt this layer", which `select_layers(scores, rule)` turns into a layer spec (docs/select.md).

- `grad_scores`: the norm of the training loss's gradient (CE + symmetric KL over paraphrase
  pairs) on each layer's LoRA parameters, LoRA at its initialisation on every layer; one
  forward and one backward per batch of pairs.
- `snr_scores`: weights only, after Spectrum (Hartford et al. 2024): per matrix, the singular
  values above the Marchenko-Pastur edge over those below, ranked across layers per matrix type;
  a layer's score is its mean rank. No data.
- `bi_scores`: block influence (ShortGPT; Gromov et al.'s angular distance): 1 - cosine of a
  layer's input and output hidden state at the last prompt position, mean over prompts;
  forward only.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mechlora.batching import Batcher, first_token_logits
from mechlora.data import Pair, QuestionGroup, data_hash, load_groups, make_pairs
from mechlora.errors import MechloraError
from mechlora.models.subject import Subject
from mechlora.select import Scores, Selection, apply_selector, parse_selector
from mechlora.spec import DEFAULT_ALPHA, DEFAULT_MODULES, DEFAULT_R, LayerSpec

PairsLike = str | Path | Sequence[QuestionGroup] | Sequence[Pair]


# ---- grad -----------------------------------------------------------------------------------


def grad_scores(subject: Subject, pairs: PairsLike, *, batch_size: int = 8, r: int = DEFAULT_R,
                alpha: float = DEFAULT_ALPHA, modules: Sequence[str] = DEFAULT_MODULES,
                seed: int = 0, pairs_per_group: int | None = 1, kl_weight: float = 1.0,
                kl_temperature: float = 1.0, kl_over: str = "vocab",
                merge_variants: bool = False, progress: bool = True) -> Scores:
    """Per-layer norm of the loss gradient on LoRA (rank `r`) added to every layer, at init.

    The loss is the training recipe's (`mechlora.loss.consistency_loss`, mean over `pairs`),
    accumulated over batches of `batch_size` pairs: one forward and one backward each. PEFT's
    initialisation sets B = 0, so the gradient on A is 0 and a layer's norm is that of its B
    gradients, scale * dL/dW @ A^T: the full weight gradient seen through the seeded random A.
    The LoRA is removed afterwards; the model is left as it was (weights, trainable flags,
    train/eval modes, RNG state). From question groups, `pairs_per_group` unordered pairs of
    wordings are drawn per group (seeded by `seed`; None: all), as a training epoch draws one.
    `settings["loss_at_init"]` records the mean CE and KL: when CE dwarfs KL, the gradient
    mostly says where the model can learn the answer tokens, not where the wordings diverge.
    """
    subject = _weighted(subject, "grad")
    pair_list, data = _pairs(pairs, pairs_per_group, seed)
    if batch_size < 1:
        raise MechloraError(f"batch_size must be at least 1 pair, got {batch_size}")
    from mechlora.training.config import TrainConfig
    from mechlora.training.step import pair_terms

    loss = TrainConfig(kl_weight=kl_weight, kl_temperature=kl_temperature, kl_over=kl_over,
                       merge_variants=merge_variants).validate()
    batcher = Batcher(subject, merge_variants=merge_variants)
    t0 = time.perf_counter()
    forwards = 0
    sums = torch.zeros(2, dtype=torch.float64)  # CE and KL over the pairs, for the record
    with _lora_on_every_layer(subject, modules, r, alpha, seed) as adapters:
        starts = range(0, len(pair_list), batch_size)
        for start in tqdm(starts, desc="grad", unit="batch", disable=not progress):
            terms = pair_terms(subject.model, batcher, pair_list[start:start + batch_size], loss)
            (terms.loss.sum() / len(pair_list)).backward()
            sums += torch.stack([terms.ce.sum(), terms.kl.sum()]).detach().double().cpu()
            forwards += 1
        squares: dict[str, np.ndarray] = {}
        for layer, name, module in adapters:
            grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
            total = sum(float(g.float().pow(2).sum()) for g in grads)
            squares.setdefault(name, np.zeros(subject.n_layers))[layer] += total
    values = np.sqrt(sum(squares.values()))
    return Scores(
        "grad", values,
        f"grad (norm of the CE + KL gradient on each layer's LoRA at init, {len(pair_list)} "
        "pairs)", subject.name,
        {"data": data, "batch_size": batch_size, "r": r, "alpha": alpha, "modules": list(modules),
         "seed": seed, "kl_weight": kl_weight, "kl_temperature": kl_temperature,
         "kl_over": kl_over, "choice_reading": "merged" if merge_variants else "first",
         "loss_at_init": dict(zip(("ce", "kl"), (sums / len(pair_list)).tolist()))},
        {"seconds": time.perf_counter() - t0, "forwards": forwards, "backwards": forwards,
         "rows": 2 * len(pair_list)},
        {name: np.sqrt(sq) for name, sq in squares.items()})


@contextmanager
def _lora_on_every_layer(subject: Subject, modules: Sequence[str], r: int, alpha: float,
                         seed: int) -> Iterator[list[tuple[int, str, nn.Module]]]:
    """LoRA on `modules` of every language layer, as (layer, module name, LoRA layer); removed
    on exit, with the model's trainable flags and train/eval modes restored."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    model, base = subject.model, subject.base
    where = {id(linear): (layer, name) for layer, targets in enumerate(_targets(subject, modules))
             for name, linear in targets.items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    had_input_hook = hasattr(base, "_require_grads_hook")
    config = LayerSpec.all(subject.n_layers).lora_config(
        subject.layers_path, modules=modules, r=r, alpha=alpha, dropout=0.0)
    device = subject.device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)  # the LoRA init, without moving the caller's random state
        with warnings.catch_warnings():  # PEFT reads a property transformers 5 deprecates
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            peft_model = get_peft_model(model, config)
    try:
        model.eval()  # no dropout anywhere; gradients still flow
        yield [(*where[id(m.base_layer)], m) for m in model.modules() if isinstance(m, LoraLayer)]
    finally:
        peft_model.unload()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        for name, m in model.named_modules():
            m.training = modes[name]
        if not had_input_hook and hasattr(base, "_require_grads_hook"):
            base.disable_input_require_grads()


# ---- snr ------------------------------------------------------------------------------------


def snr_scores(subject: Subject, *, modules: Sequence[str] = DEFAULT_MODULES,
               progress: bool = True) -> Scores:
    """Spectrum's per-layer signal-to-noise, from the weights alone (no data).

    For every target matrix (`modules` of each language layer) `matrix_snr` gives its SNR; each
    matrix type (e.g. self_attn.q_proj) is ranked across layers (1 = lowest SNR, average ranks
    for ties, divided by the number of layers) and a layer's score is its mean rank over the
    types, in (0, 1]. One matrix at a time, in float32 on its own device.
    """
    subject = _weighted(subject, "snr")
    t0 = time.perf_counter()
    n = subject.n_layers
    snr: dict[str, np.ndarray] = {}
    targets = _targets(subject, modules)
    count = sum(len(t) for t in targets)
    with tqdm(total=count, desc="snr", unit="matrix", disable=not progress) as bar:
        for layer, found in enumerate(targets):
            for name, linear in found.items():
                snr.setdefault(name, np.full(n, np.nan))[layer] = matrix_snr(linear.weight)
                bar.update(1)
    ranks = [_ranks(values) for values in snr.values()]
    values = np.nanmean(np.stack(ranks), axis=0)
    return Scores(
        "snr", values,
        f"snr (Spectrum signal-to-noise of the weights, mean rank over {len(snr)} matrix types)",
        subject.name, {"modules": list(modules), "noise": "Marchenko-Pastur median fit"},
        {"seconds": time.perf_counter() - t0, "forwards": 0, "backwards": 0,
         "matrices": count}, snr)


def matrix_snr(weight: torch.Tensor) -> float:
    """Sum of the singular values above the Marchenko-Pastur edge over the sum of the others.

    A pure-noise n x m matrix (n <= m, i.i.d. entries of scale sigma) has singular values up to
    sigma * (sqrt(n) + sqrt(m)). sigma is estimated from the median singular value, which is
    sigma * sqrt(m * mu) with mu the median of the Marchenko-Pastur law of ratio n / m (Gavish
    & Donoho 2014): robust to a few strong signal directions. (Spectrum's code takes the
    interquartile range of the singular values / 1.349 as sigma and divides the ratio by the
    largest singular value; we keep the ratio itself.)
    """
    w = weight.detach()
    if w.dim() != 2:
        raise MechloraError(f"matrix_snr needs a 2-D weight, got shape {tuple(w.shape)}")
    s = torch.linalg.svdvals(w.float()).double().cpu().numpy()
    n, m = sorted(w.shape)
    sigma = float(np.median(s)) / np.sqrt(m * mp_median(n / m))
    edge = sigma * (np.sqrt(n) + np.sqrt(m))
    signal, noise = s[s > edge].sum(), s[s <= edge].sum()
    return float(signal / noise) if noise > 0 else float("inf")


@lru_cache(maxsize=64)
def mp_median(beta: float, grid: int = 20_000) -> float:
    """Median of the Marchenko-Pastur law with ratio 0 < beta <= 1 (unit variance).

    Integrates the density sqrt((b - x)(x - a)) / (2 pi beta x) on [a, b] after the change of
    variable x = a + (b - a)(1 - cos t) / 2, which removes the square-root edges (midpoint rule).
    """
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    a, b = (1 - np.sqrt(beta)) ** 2, (1 + np.sqrt(beta)) ** 2
    t = (np.arange(grid) + 0.5) * np.pi / grid
    x = a + (b - a) * (1 - np.cos(t)) / 2
    density = ((b - a) / 2) ** 2 * np.sin(t) ** 2 / (2 * np.pi * beta * x)
    cdf = np.cumsum(density)
    return float(np.interp(0.5, cdf / cdf[-1], x))


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks 1..n (ties share their mean rank) divided by n; NaN stays NaN."""
    out = np.full(len(values), np.nan)
    ok = np.flatnonzero(np.isfinite(values) | np.isposinf(values))
    order = ok[np.argsort(values[ok], kind="stable")]
    sorted_values = values[order]
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        out[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return out / len(values)


# ---- bi -------------------------------------------------------------------------------------


@torch.no_grad()
def bi_scores(subject: Subject, pairs: PairsLike, *, batch_size: int = 16,
              pairs_per_group: int | None = 1, seed: int = 0, progress: bool = True) -> Scores:
    """Block influence: 1 - cos(layer input, layer output) at the last prompt position.

    Averaged over the prompts of the pairs (each wording once; from question groups,
    `pairs_per_group` seeded pairs per group as in `grad_scores`), `batch_size` prompts per
    forward. A layer that leaves the residual stream's direction unchanged scores
    0; ShortGPT prunes the lowest, so the highest are the layers that change the stream most.
    """
    subject = _weighted(subject, "bi")
    pair_list, data = _pairs(pairs, pairs_per_group, seed)
    if batch_size < 1:
        raise MechloraError(f"batch_size must be at least 1 prompt, got {batch_size}")
    rows = list(dict.fromkeys((p.group, v) for p in pair_list for v in (p.a, p.b)))
    batcher = Batcher(subject)
    t0 = time.perf_counter()
    seen: dict[int, torch.Tensor] = {}
    total = torch.zeros(subject.n_layers, dtype=torch.float64)

    def before(layer: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            seen[layer] = x[:, -1].float()
        return hook

    def after(layer: int):
        def hook(module, args, kwargs, output):
            y = output[0] if isinstance(output, tuple) else output  # tensor in transformers 5
            cos = torch.nn.functional.cosine_similarity(seen.pop(layer), y[:, -1].float(), dim=-1)
            total[layer] += (1 - cos).double().sum().cpu()
        return hook

    handles = []
    for i, layer in enumerate(subject.layers):
        handles.append(layer.register_forward_pre_hook(before(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(after(i), with_kwargs=True))
    forwards = 0
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="bi", unit="batch",
                          disable=not progress):
            first_token_logits(subject.model, batcher.inputs(rows[start:start + batch_size]))
            forwards += 1
    finally:
        for h in handles:
            h.remove()
    return Scores(
        "bi", (total / len(rows)).numpy(),
        f"bi (block influence, 1 - cos of each layer's input and output at the last position, "
        f"{len(rows)} prompts)", subject.name,
        {"data": data, "batch_size": batch_size, "seed": seed},
        {"seconds": time.perf_counter() - t0, "forwards": forwards, "backwards": 0,
         "rows": len(rows)})


# ---- one entry point ------------------------------------------------------------------------


def compute_scores(source: str, subject: Subject, pairs: PairsLike | None = None, *,
                   progress: bool = True, **options: Any) -> Scores:
    """Scores from `source` ("grad", "snr", "bi" or "localization"); `options` go to its
    function (`grad_scores`, `snr_scores`, `bi_scores`, `mechlora.localize`)."""
    if source == "snr":
        return snr_scores(subject, progress=progress, **options)
    if source not in ("grad", "bi", "localization"):
        raise MechloraError(f"unknown score source {source!r}; use grad, snr, bi or "
                            "localization")
    if pairs is None:
        raise MechloraError(f"{source} scores need paraphrase pairs (--pairs)")
    if source == "grad":
        return grad_scores(subject, pairs, progress=progress, **options)
    if source == "bi":
        return bi_scores(subject, pairs, progress=progress, **options)
    from mechlora.localize import localize

    path = str(pairs) if isinstance(pairs, (str, Path)) else None
    return Scores.from_localization(localize(subject, pairs, progress=progress, **options), path)


def choose_layers(selector: str, subject: Subject | None = None, pairs: PairsLike | None = None,
                  *, scores: Scores | None = None, seed: int = 0, progress: bool = True,
                  **options: Any) -> Selection:
    """The selection `selector` makes (e.g. "grad:5", "snr:window:5", "random:5", "15-19").

    Scores the selector reads are computed on `subject` (and `pairs`) unless given as
    `scores`; `seed` draws random selections, grad's and bi's pairs and grad's LoRA. Bands,
    `all` and specs need only the number of layers; `scores` given to them add coverage to the
    reason.
    """
    source, _ = parse_selector(selector)
    if source is not None and scores is None:
        if subject is None:
            raise MechloraError(f"{selector!r} needs {source} scores: give a model (and pairs)")
        if source in ("grad", "bi"):
            options.setdefault("seed", seed)
        scores = compute_scores(source, subject, pairs, progress=progress, **options)
    n_layers = subject.n_layers if subject is not None else None
    model = subject.name if subject is not None else None
    return apply_selector(selector, scores, n_layers, seed=seed, model=model)


# ---- shared ---------------------------------------------------------------------------------


def _weighted(subject: Subject, what: str) -> Subject:
    if not isinstance(subject, Subject):
        raise MechloraError(f"{what} scores need a Subject (mechlora.load_model(...) or "
                            f"mechlora.wrap(model, processor)), got {type(subject).__name__}")
    if hasattr(subject.model, "peft_config"):
        raise MechloraError(f"{subject.name} carries a PEFT adapter; score the base model "
                            "(layer selection is about where to put a new adapter)")
    if any(p.is_meta for p in subject.model.parameters()):
        raise MechloraError(f"{subject.name} has no weights (meta device); {what} scores read "
                            "real weights: load a checkpoint")
    return subject


def _targets(subject: Subject, modules: Sequence[str]) -> list[dict[str, nn.Module]]:
    """Per language layer: {name inside the layer (e.g. self_attn.q_proj): linear module}."""
    wanted = {m.strip() for m in modules}
    out = []
    for i, layer in enumerate(subject.layers):
        found = {name: m for name, m in layer.named_modules()
                 if name.rsplit(".", 1)[-1] in wanted
                 and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2}
        missing = wanted - {name.rsplit(".", 1)[-1] for name in found}
        if missing:
            raise MechloraError(f"layer {i} has no module named {', '.join(sorted(missing))}; "
                                "pick --modules among: " + ", ".join(sorted(
                                    {n.rsplit('.', 1)[-1] for n, m in layer.named_modules()
                                     if isinstance(getattr(m, 'weight', None), torch.Tensor)
                                     and m.weight.dim() == 2})))
        out.append(found)
    return out


def _pairs(pairs: PairsLike, per_group: int | None, seed: int
           ) -> tuple[list[Pair], dict[str, Any]]:
    """Pairs, and what data they came from. Groups give `per_group` seeded unordered pairs of
    their wordings each (None: all of them); Pairs are used as given."""
    path = str(pairs) if isinstance(pairs, (str, Path)) else None
    items = load_groups(pairs) if path is not None else list(pairs)
    if items and isinstance(items[0], QuestionGroup):
        pair_list = make_pairs(items, max_pairs_per_group=per_group, both_directions=False,
                               seed=seed)
    else:
        pair_list = items
    if not pair_list or not all(isinstance(p, Pair) for p in pair_list):
        raise MechloraError("no paraphrase pairs: give a data file, QuestionGroups with two or "
                            "more wordings each, or Pairs")
    groups = list(dict.fromkeys(p.group for p in pair_list))
    return pair_list, {"path": path, "n_pairs": len(pair_list), "n_groups": len(groups),
                       "pairs_per_group": per_group, "sha256": data_hash(groups)}
