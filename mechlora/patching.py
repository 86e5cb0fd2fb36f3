"""Three engines that run a recipient prompt with many single-site patches.

- `full`: one forward per patched site (the reference, what a TransformerLens/nnsight loop does).
- `batched`: the recipient repeated as rows of one forward, row i patched at site i.
- `cached`: the recipient's prefix (everything before the first patched position) runs once
  with a KV cache; only the positions from the first patched one onward are recomputed, for
  all rows at once, over that shared prefix. Exact, because patching position p cannot change
  any earlier position's keys and values.

All return the answer margin of every patched row. Logits are computed at the last position
only, and only for the choices' first tokens (`choice_head`): with a 262k vocabulary the full
unembedding is about half of a short forward, and a margin needs two or three logits.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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


@contextmanager
def choice_head(subject: Subject, answer_ids: Sequence[int]) -> Iterator[list[int]]:
    """Within: the model's output head computes only the logits of `answer_ids`, in order.

    Yields the column of each choice in the logits the model now returns. The rest of the
    forward (final norm, softcapping) runs unchanged, so those logits equal the full ones. A
    head that is not a plain `nn.Linear` (adapted, quantised) is left alone.
    """
    head = subject.unembed
    if type(head) is not nn.Linear:
        yield list(answer_ids)
        return
    ids = torch.tensor(list(answer_ids), device=head.weight.device)
    weight = head.weight[ids]
    bias = None if head.bias is None else head.bias[ids]
    saved = head.__dict__.get("forward")  # an instrumenting library may have set its own
    head.forward = lambda x: F.linear(x, weight, bias)
    try:
        yield list(range(len(ids)))
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


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
    with choice_head(subject, answer_ids) as cols:
        for p in patches:
            with patch(subject, [Patch(0, p.site, p.positions, p.values)]):
                margins.append(margin(last_logits(subject, inputs), cols, ref))
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
        patches_here = [Patch(i, p.site, p.positions, p.values) for i, p in enumerate(chunk)]
        with choice_head(subject, answer_ids) as cols, patch(subject, patches_here):
            margins.append(margin(last_logits(subject, rows), cols, ref))
    return torch.cat(margins)


def patch_start(patches: Sequence[SitePatch]) -> int:
    """The first position any of `patches` writes."""
    return min(int(p.positions.min()) for p in patches)


def cached_valid(subject: Subject, inputs: dict, start: int) -> str | None:
    """Why a prefix cache up to position `start` cannot serve exact runs (None when it can)."""
    if start < 1:
        return "a patch at position 0 leaves no prefix to cache"
    if "token_type_ids" in inputs and bool(inputs["token_type_ids"][0, start:].any()):
        return "image tokens after the first patched position (bidirectional image attention)"
    if not getattr(subject.text_config, "use_cache", True):
        return "the model does not support a KV cache"
    return None


# Architectures whose forward honours a custom 4D attention mask with repeated position ids
# (tests/test_localize.py checks each against unfolded rows); others get one row per patch.
FOLDABLE = {"gemma3", "gemma3_text", "llama", "qwen2"}


@dataclass
class Prefix:
    """A prompt's KV cache for positions [0, start), shared by every run that continues it.

    Patching position p cannot change the keys and values of earlier positions, so the prefix
    runs once per prompt: for its clean run and for all of its patched rows. The rows are
    folded into one sequence over the single shared prefix (row i's suffix tokens placed after
    row i-1's, same position ids, a mask that lets each see only the prefix and itself): no
    row copies the prefix's keys and values, which for MedGemma-4B would be 43 MB per row.
    """

    start: int
    cache: object
    snapshot: list  # (cache layer, keys, values, cumulative length) right after the prefix

    def continue_with(self, subject: Subject, inputs: dict,
                      patches: Sequence[SitePatch] = ()) -> torch.Tensor:
        """Last-position logits of `inputs`' suffix over this prefix, one row per patch (one
        unpatched row without patches)."""
        rows, k = max(1, len(patches)), inputs["input_ids"].shape[1] - self.start
        fold = rows > 1 and self._foldable(subject, inputs)
        self._reset(rows=1 if fold else rows)
        suffix = {k_: v[:, self.start:] for k_, v in inputs.items()
                  if k_ in ("input_ids", "position_ids")}
        if "position_ids" not in suffix:
            suffix["position_ids"] = torch.arange(self.start, self.start + k,
                                                  device=inputs["input_ids"].device)[None]
        if fold:
            kw = {name: v.repeat(1, rows) for name, v in suffix.items()}
            kw["attention_mask"] = self._folded_mask(subject, rows, k)
            kw["logits_to_keep"] = torch.arange(k - 1, rows * k, k)
            hooks = [Patch(0, p.site, i * k + p.positions - self.start, p.values)
                     for i, p in enumerate(patches)]
        else:
            kw = {name: v.expand(rows, -1) for name, v in suffix.items()}
            if "attention_mask" in inputs:
                kw["attention_mask"] = inputs["attention_mask"].expand(rows, -1)
            kw["logits_to_keep"] = 1
            hooks = [Patch(i, p.site, p.positions - self.start, p.values)
                     for i, p in enumerate(patches)]
        try:
            with patch(subject, hooks):
                out = subject.model(**kw, **{cache_kwarg(subject): self.cache}, use_cache=True)
        finally:  # drop the suffix's keys and values, keep the prefix
            self._reset(rows=1)
        logits = out.logits
        return logits[0] if fold else logits[:, -1]

    def _reset(self, rows: int) -> None:
        # Expanded views, not copies: every call starts from the same prefix.
        for layer, keys, values, length in self.snapshot:
            layer.keys = keys.expand(rows, *keys.shape[1:])
            layer.values = values.expand(rows, *values.shape[1:])
            if length is not None:
                layer.cumulative_length = length

    def _foldable(self, subject: Subject, inputs: dict) -> bool:
        mask = inputs.get("attention_mask")
        return (getattr(subject.text_config, "model_type", None) in FOLDABLE
                and getattr(subject.base.config, "model_type", None) in FOLDABLE
                and (mask is None or bool(mask.all()))  # no padding in the prompt
                # every layer holds the whole prefix (no sliding window has dropped any)
                and all(keys.shape[-2] == self.start for _, keys, _, _ in self.snapshot))

    def _folded_mask(self, subject: Subject, rows: int, k: int) -> torch.Tensor:
        """[1, 1, rows*k, start + rows*k] additive mask: the prefix, then causal within each
        row's own block."""
        n = rows * k
        allowed = torch.zeros(n, self.start + n, dtype=torch.bool, device=subject.device)
        allowed[:, :self.start] = True
        block = torch.tril(torch.ones(k, k, dtype=torch.bool, device=subject.device))
        allowed[:, self.start:] = torch.block_diag(*[block] * rows)
        dtype = next(subject.model.parameters()).dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        mask = torch.zeros(allowed.shape, dtype=dtype, device=subject.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]

    @classmethod
    def of(cls, cache, start: int) -> Prefix | None:
        """The prefix [0, start) of a whole prompt's cache; None when a layer has dropped
        positions (a sliding window shorter than the prompt)."""
        snapshot = []
        for layer in cache.layers:
            length = getattr(layer, "cumulative_length", None)
            if length is not None and (not isinstance(length, int) or
                                       layer.keys.shape[-2] != length):
                return None
            snapshot.append((layer, layer.keys[..., :start, :], layer.values[..., :start, :],
                             None if length is None else start))
        return cls(start, cache, snapshot)


def run_prefix(subject: Subject, inputs: dict, start: int) -> Prefix:
    """Run `inputs` up to position `start` with a KV cache (`cached_valid` must allow it)."""
    why = cached_valid(subject, inputs, start)
    if why:
        raise MechloraError(f"the cached engine cannot run these patches exactly: {why}; "
                            "use --engine batched")
    prefix = {k: v[:, :start] for k, v in inputs.items() if k != "pixel_values"}
    if "pixel_values" in inputs:
        prefix.update(with_image_features(subject, {"pixel_values": inputs["pixel_values"]}))
    with choice_head(subject, [0]):  # the prefix's logits are never read
        out = subject.model(**prefix, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    snapshot = [(layer, layer.keys, layer.values, getattr(layer, "cumulative_length", None))
                for layer in cache.layers]
    return Prefix(start, cache, snapshot)


def run_cached(subject: Subject, inputs: dict, patches: Sequence[SitePatch], answer_ids,
               ref: int, max_rows: int = 256, prefix: Prefix | None = None) -> torch.Tensor:
    """`prefix`: the recipient's own prefix from its clean run, reused instead of rerun."""
    start = patch_start(patches)
    if prefix is None or prefix.start != start:
        prefix = run_prefix(subject, inputs, start)
    margins = []
    for lo, hi in _chunks(len(patches), max_rows):
        with choice_head(subject, answer_ids) as cols:
            margins.append(margin(prefix.continue_with(subject, inputs, patches[lo:hi]), cols,
                                  ref))
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
    if not patches:
        return "cached"
    return "cached" if cached_valid(subject, inputs, patch_start(patches)) is None else "batched"
