"""Three engines that run a recipient prompt with many single-site patches.

- `full`: one forward per patched site (the reference, what a TransformerLens/nnsight loop does).
- `batched`: the recipient repeated as rows of one forward, row i patched at site i.
- `cached`: the recipient's prefix (everything before the first patched position) runs once
  with a KV cache; only the positions from the first patched one onward are recomputed, for
  all rows at once, over that shared prefix. Exact, because patching position p cannot change
  any earlier position's keys and values.

All return the answer margin of every patched row; logits are computed at the last position
only (with a 262k vocabulary, the unembedding is a large share of a short forward).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mechlora.errors import MechloraError
from mechlora.features import with_image_features
from mechlora.models.subject import Subject
from mechlora.probes import Patch, Site, patch

ENGINES = ("auto", "full", "batched", "cached", "nnsight", "tlens")


@dataclass
class SitePatch:
    """A patch to apply in its own run: `values` [P, hidden] written at recipient `positions`."""

    site: Site
    positions: torch.Tensor
    values: torch.Tensor


def margin(logits: torch.Tensor, answer_ids: Sequence[int], ref: int) -> torch.Tensor:
    """logit(reference answer's first token) - max logit of the other choices' first tokens."""
    choice = logits[..., list(answer_ids)].float()
    others = torch.cat([choice[..., :ref], choice[..., ref + 1:]], dim=-1)
    return choice[..., ref] - others.max(dim=-1).values


def last_logits(subject: Subject, inputs: dict, **kw) -> torch.Tensor:
    out = subject.model(**with_image_features(subject, inputs), logits_to_keep=1,
                        use_cache=False, **kw)
    return out.logits[:, -1]


def repeat_inputs(subject: Subject, inputs: dict, rows: int) -> dict:
    """`inputs` (batch 1) as `rows` identical rows; an image is encoded once, not per row."""
    out = {k: v.expand(rows, *v.shape[1:]) for k, v in inputs.items() if k != "pixel_values"}
    if "pixel_values" in inputs:
        out.update(with_image_features(subject, {"pixel_values": inputs["pixel_values"]}, rows))
    return out


def run_full(subject: Subject, inputs: dict, patches: Sequence[SitePatch], answer_ids, ref: int,
             max_rows: int = 0) -> torch.Tensor:
    margins = []
    for p in patches:
        with patch(subject, [Patch(0, p.site, p.positions, p.values)]):
            margins.append(margin(last_logits(subject, inputs), answer_ids, ref))
    return torch.cat(margins)


def _chunks(n: int, size: int):
    size = size if size > 0 else n
    for start in range(0, n, size):
        yield start, min(n, start + size)


def run_batched(subject: Subject, inputs: dict, patches: Sequence[SitePatch], answer_ids,
                ref: int, max_rows: int = 64) -> torch.Tensor:
    margins = []
    for start, stop in _chunks(len(patches), max_rows):
        chunk = patches[start:stop]
        rows = repeat_inputs(subject, inputs, len(chunk))
        with patch(subject, [Patch(i, p.site, p.positions, p.values) for i, p in enumerate(chunk)]):
            margins.append(margin(last_logits(subject, rows), answer_ids, ref))
    return torch.cat(margins)


def cached_valid(subject: Subject, inputs: dict, patches: Sequence[SitePatch]) -> str | None:
    """Why the cached engine cannot run these patches exactly (None when it can)."""
    if not patches:
        return None
    start = min(int(p.positions.min()) for p in patches)
    if start < 1:
        return "a patch at position 0 leaves no prefix to cache"
    if "token_type_ids" in inputs and bool(inputs["token_type_ids"][0, start:].any()):
        return "image tokens after the first patched position (bidirectional image attention)"
    if not getattr(subject.text_config, "use_cache", True):
        return "the model does not support a KV cache"
    return None


def run_cached(subject: Subject, inputs: dict, patches: Sequence[SitePatch], answer_ids,
               ref: int, max_rows: int = 256) -> torch.Tensor:
    why = cached_valid(subject, inputs, patches)
    if why:
        raise MechloraError(f"the cached engine cannot run these patches exactly: {why}; "
                            "use --engine batched")
    start = min(int(p.positions.min()) for p in patches)
    prefix = {k: v[:, :start] for k, v in inputs.items() if k != "pixel_values"}
    if "pixel_values" in inputs:
        prefix.update(with_image_features(subject, {"pixel_values": inputs["pixel_values"]}))
    out = subject.model(**prefix, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    snapshot = [(layer, layer.keys, layer.values, getattr(layer, "cumulative_length", None))
                for layer in cache.layers]
    suffix = {k: v[:, start:] for k, v in inputs.items()
              if k in ("input_ids", "position_ids", "attention_mask")}
    margins = []
    for lo, hi in _chunks(len(patches), max_rows):
        n = hi - lo
        # Every chunk starts from the same prefix: expanded views, not copies.
        for layer, keys, values, length in snapshot:
            layer.keys = keys.expand(n, *keys.shape[1:])
            layer.values = values.expand(n, *values.shape[1:])
            if length is not None:
                layer.cumulative_length = length
        rows = {k: v.expand(n, *v.shape[1:]) for k, v in suffix.items()}
        if "attention_mask" in inputs:
            rows["attention_mask"] = inputs["attention_mask"].expand(n, -1)
        if "token_type_ids" in inputs:
            rows["token_type_ids"] = None
        shifted = [Patch(i, p.site, p.positions - start, p.values)
                   for i, p in enumerate(patches[lo:hi])]
        with patch(subject, shifted):
            logits = subject.model(**rows, **{cache_kwarg(subject): cache}, use_cache=True,
                                   logits_to_keep=1).logits[:, -1]
        margins.append(margin(logits, answer_ids, ref))
    return torch.cat(margins)


def cache_kwarg(subject: Subject) -> str:
    """transformers 5.x renamed `past_key_values` to `cache` in some models, not all."""
    params = inspect.signature(subject.base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _bridge(name: str):
    # nnsight and TransformerLens take seconds to import: load them on first use only.
    def run(*args, **kwargs):
        from importlib import import_module

        return getattr(import_module(f"mechlora.bridges.{name}"), f"run_{name}")(*args, **kwargs)
    return run


RUNNERS = {"full": run_full, "batched": run_batched, "cached": run_cached,
           "nnsight": _bridge("nnsight"), "tlens": _bridge("tlens")}


def choose_engine(engine: str, subject: Subject, inputs: dict,
                  patches: Sequence[SitePatch]) -> str:
    if engine not in ENGINES:
        raise MechloraError(f"unknown engine '{engine}'; use one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    return "cached" if cached_valid(subject, inputs, patches) is None else "batched"
