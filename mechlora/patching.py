"""Three engines that run a recipient prompt with many single-site patches.

- `full`: one forward per patched site (the reference, what a TransformerLens/nnsight loop does).
- `batched`: the recipient repeated as rows of one forward, row i patched at site i.
- `cached`: the recipient's prefix (everything before the first patched position) runs once
  with a KV cache; only the positions from the first patched one onward are recomputed, for
  all rows at once, over that shared prefix. Exact under causal attention, because patching
  position p cannot change any earlier position's keys and values; refused where the prompt
  attends both ways (`Subject.prefix_cache_problem`).

A row is one `SitePatch` or several applied together (a multi-site intervention, e.g. every
attn and mlp output of a layer spec); sites may be one attention head (`Site(l, "z", h)`).
All return the answer margin of every patched row, and split their rows into forwards that
fit `max_bytes` (and `max_rows`, when given; mechlora/memory.py). Logits are computed at the
last position only, and only for the choices' first tokens (`choice_head`): with a 262k
vocabulary the full unembedding is about half of a short forward, and a margin needs two or
three logits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mechlora import memory
from mechlora.errors import MechloraError
from mechlora.features import with_image_features
from mechlora.models import family as families
from mechlora.models.choices import ChoiceTokens, as_choices
from mechlora.models.subject import Subject
from mechlora.probes import Patch, Site, patch

ENGINES = ("auto", "full", "batched", "cached", "nnsight", "tlens")


@dataclass
class SitePatch:
    """A patch to apply in its own run: `values` [P, width] written at recipient `positions`."""

    site: Site
    positions: torch.Tensor
    values: torch.Tensor


# A patched row: one SitePatch, or several applied together in one run (a multi-site
# intervention, e.g. the attn and mlp outputs of every layer of a spec).
Row = SitePatch | Sequence[SitePatch]


def as_row(row: Row) -> tuple[SitePatch, ...]:
    return (row,) if isinstance(row, SitePatch) else tuple(row)


def row_patches(rows: Sequence[Row], offset=lambda i, p: (i, p.positions)) -> list[Patch]:
    """The `Patch`es of `rows`: row i's patches on batch row `offset(i, p)[0]` at positions
    `offset(i, p)[1]`."""
    out = []
    for i, row in enumerate(rows):
        for p in as_row(row):
            r, pos = offset(i, p)
            out.append(Patch(r, p.site, pos, p.values))
    return out


def margin(logits: torch.Tensor, choices: ChoiceTokens | Sequence[int], ref: int
           ) -> torch.Tensor:
    """Score of the reference choice minus the best other choice's: with the default `first`
    reading, logit(reference answer's first token) - max logit of the other choices' first
    tokens; with `merged`, the same over log-sum-exps of each choice's variant tokens."""
    scores = as_choices(choices).scores(logits)
    others = torch.cat([scores[..., :ref], scores[..., ref + 1:]], dim=-1)
    return scores[..., ref] - others.max(dim=-1).values


@contextmanager
def choice_head(subject: Subject, choices: ChoiceTokens | Sequence[int]
                ) -> Iterator[ChoiceTokens | list[int]]:
    """Within: the model's output head computes only the logits of the choices' tokens.

    Yields `choices` re-indexed into the logits the model now returns (a `ChoiceTokens` for a
    `ChoiceTokens`, the column of each id for a list of ids). The rest of the forward (final
    norm, softcapping) runs unchanged, so those logits equal the full ones. A head that is not
    a plain `nn.Linear` (adapted, quantised) is left alone.
    """
    tokens = as_choices(choices)
    head = subject.unembed
    if type(head) is not nn.Linear:
        yield choices if isinstance(choices, ChoiceTokens) else list(choices)
        return
    ids = torch.tensor(tokens.flat, device=head.weight.device)
    weight = head.weight[ids]
    bias = None if head.bias is None else head.bias[ids]
    saved = head.__dict__.get("forward")  # an instrumenting library may have set its own
    head.forward = lambda x: F.linear(x, weight, bias)
    try:
        columns = tokens.on(range(len(ids)))
        yield columns if isinstance(choices, ChoiceTokens) else columns.first
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


def run_full(subject: Subject, inputs: dict, patches: Sequence[Row], answer_ids, ref: int,
             max_rows: int | None = None, max_bytes: int | None = None) -> torch.Tensor:
    margins = []
    with choice_head(subject, answer_ids) as cols:
        for row in patches:
            with patch(subject, row_patches([row])):
                margins.append(margin(last_logits(subject, inputs), cols, ref))
    return torch.cat(margins)


def prompt_chunks(subject: Subject, inputs: dict, n: int, max_rows: int | None,
                  max_bytes: int | None):
    """Chunks of `n` whole-prompt rows that fit the memory budget."""
    cost, length = memory.TokenCost.of(subject), inputs["input_ids"].shape[1]
    size = memory.rows_per_forward(lambda r: memory.prompt_rows(cost, r, length), n,
                                   max_bytes, max_rows)
    return memory.chunks(n, size)


def run_batched(subject: Subject, inputs: dict, patches: Sequence[Row], answer_ids,
                ref: int, max_rows: int | None = None, max_bytes: int | None = None
                ) -> torch.Tensor:
    margins = []
    for start, stop in prompt_chunks(subject, inputs, len(patches), max_rows, max_bytes):
        chunk = patches[start:stop]
        rows = repeat_inputs(subject, inputs, len(chunk))
        with choice_head(subject, answer_ids) as cols, patch(subject, row_patches(chunk)):
            margins.append(margin(last_logits(subject, rows), cols, ref))
    return torch.cat(margins)


def patch_start(patches: Sequence[Row]) -> int:
    """The first position any of `patches` writes."""
    return min(int(p.positions.min()) for row in patches for p in as_row(row))


def cached_valid(subject: Subject, inputs: dict, start: int) -> str | None:
    """Why a prefix cache up to position `start` cannot serve exact runs (None when it can)."""
    return subject.prefix_cache_problem(inputs, start)


def fold_mask(start: int, held: int, rows: int, k: int, window: int | None,
              valid: torch.Tensor | None, dtype: torch.dtype, device) -> torch.Tensor:
    """[1, 1, rows*k, held + rows*k] additive mask of `rows` continuations of `k` tokens
    folded into one sequence after a cache holding the prefix positions [start - held, start).

    Row i's tokens sit at positions start..start+k-1 (as in the unfolded prompt) and see the
    cached prefix and the earlier tokens of their own row; with a sliding `window` only keys
    less than `window` positions back (transformers' rule: q - kv < window). `valid`
    [held + k] marks the positions start - held .. start + k - 1 that are not padding.
    Positions are sequence indices, as in transformers' masks (left padding counts toward
    the window).
    """
    q = torch.arange(start, start + k, device=device).repeat(rows)
    q_row = torch.arange(rows, device=device).repeat_interleave(k)
    kv = torch.cat([torch.arange(start - held, start, device=device), q])
    kv_row = torch.cat([torch.full((held,), -1, device=device), q_row])
    allowed = ((kv_row == -1) | (kv_row == q_row[:, None])) & (kv <= q[:, None])
    if window is not None:
        allowed &= q[:, None] - kv < window
    if valid is not None:
        valid = valid.to(device=device, dtype=torch.bool)
        allowed &= torch.cat([valid[:held], valid[held:].repeat(rows)])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


@dataclass
class Prefix:
    """A prompt's KV cache for positions [0, start), shared by every run that continues it.

    Patching position p cannot change the keys and values of earlier positions, so the prefix
    runs once per prompt: for its clean run and for all of its patched rows. Where the model
    allows (`fold_problem`), the rows are folded into one sequence over the single shared
    prefix (row i's suffix tokens placed after row i-1's, same position ids, a mask per layer
    kind that lets each see only the prefix and itself, within the layer's sliding window):
    no row copies the prefix's keys and values, which for MedGemma-4B would be 43 MB per row.
    Otherwise each row continues its own (expanded) copy, which transformers masks itself.
    """

    start: int
    cache: object
    snapshot: list[families.KVLayer]  # every cache layer right after the prefix

    def fold_problem(self, subject: Subject) -> str | None:
        """Why these rows cannot be folded (None when they can)."""
        why = subject.fold_problem()
        if why:
            return why
        kinds = subject.layer_kinds
        if len(self.snapshot) != len(kinds):
            return f"the cache has {len(self.snapshot)} layers for {len(kinds)} decoder layers"
        for kind in set(kinds):
            if len({kv.held for kv, t in zip(self.snapshot, kinds) if t == kind}) > 1:
                return f"the {kind} layers of the cache hold different numbers of keys"
        return None

    def continue_with(self, subject: Subject, inputs: dict,
                      patches: Sequence[Row] = (), fold: bool | None = None
                      ) -> torch.Tensor:
        """Last-position logits of `inputs`' suffix over this prefix, one row per patch (one
        unpatched row without patches). `fold`: None folds the rows where it is exact."""
        rows, k = max(1, len(patches)), inputs["input_ids"].shape[1] - self.start
        if fold is None:
            fold = rows > 1 and self.fold_problem(subject) is None
        self._reset(rows=1 if fold else rows)
        suffix = {k_: v[:, self.start:] for k_, v in inputs.items()
                  if k_ in ("input_ids", "position_ids")}
        if "position_ids" not in suffix:
            suffix["position_ids"] = torch.arange(self.start, self.start + k,
                                                  device=inputs["input_ids"].device)[None]
        if fold:
            kw = {name: v.repeat(1, rows) for name, v in suffix.items()}
            kw["attention_mask"] = self.folded_masks(subject, inputs, rows, k)
            kw["logits_to_keep"] = torch.arange(k - 1, rows * k, k)
            hooks = row_patches(patches, lambda i, p: (0, i * k + p.positions - self.start))
        else:
            kw = {name: v.expand(rows, -1) for name, v in suffix.items()}
            if "attention_mask" in inputs:
                kw["attention_mask"] = inputs["attention_mask"].expand(rows, -1)
            kw["logits_to_keep"] = 1
            hooks = row_patches(patches, lambda i, p: (i, p.positions - self.start))
        try:
            with patch(subject, hooks):
                out = subject.model(**kw, **{subject.cache_kwarg: self.cache}, use_cache=True)
        finally:  # drop the suffix's keys and values, keep the prefix
            self._reset(rows=1)
        logits = out.logits
        return logits[0] if fold else logits[:, -1]

    def _reset(self, rows: int) -> None:
        for kv in self.snapshot:
            kv.restore(rows)

    def folded_masks(self, subject: Subject, inputs: dict, rows: int, k: int):
        """One `fold_mask` per layer kind, each sized to what that kind's cache layers hold:
        a tensor when every layer is of one kind, else {kind: mask} (Gemma 3, Qwen2)."""
        kinds = subject.layer_kinds
        dtype = subject.base.get_input_embeddings().weight.dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        padding = inputs.get("attention_mask")
        masks = {}
        for kind in dict.fromkeys(kinds):
            held = next(kv.held for kv, t in zip(self.snapshot, kinds) if t == kind)
            window = subject.sliding_window if kind == "sliding_attention" else None
            valid = None if padding is None else padding[0, self.start - held:]
            masks[kind] = fold_mask(self.start, held, rows, k, window, valid, dtype,
                                    subject.device)
        return next(iter(masks.values())) if len(masks) == 1 else masks

    @classmethod
    def of(cls, cache, start: int) -> Prefix | None:
        """The prefix [0, start) of a whole prompt's cache; None when a layer has dropped
        positions (a sliding window shorter than the prompt) or is of an unknown kind."""
        if families.cache_problem(cache):
            return None
        snapshot = families.kv_cut(cache, start)
        return None if snapshot is None else cls(start, cache, snapshot)


def run_prefix(subject: Subject, inputs: dict, start: int) -> Prefix:
    """Run `inputs` up to position `start` with a KV cache (`cached_valid` must allow it)."""
    why = cached_valid(subject, inputs, start)
    if why:
        raise MechloraError(f"the cached engine cannot run these patches exactly: {why}; "
                            "use --engine batched (or auto)")
    prefix = {k: v[:, :start] for k, v in inputs.items() if k != "pixel_values"}
    if "pixel_values" in inputs:
        prefix.update(with_image_features(subject, {"pixel_values": inputs["pixel_values"]}))
    with choice_head(subject, [0]):  # the prefix's logits are never read
        out = subject.model(**prefix, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    why = families.cache_problem(cache)
    if why:
        raise MechloraError(f"the cached engine cannot run {subject.name}: {why}; "
                            "use --engine batched (or auto)")
    return Prefix(start, cache, families.kv_snapshot(cache))


def run_cached(subject: Subject, inputs: dict, patches: Sequence[Row], answer_ids,
               ref: int, max_rows: int | None = None, max_bytes: int | None = None,
               prefix: Prefix | None = None) -> torch.Tensor:
    """`prefix`: the recipient's own prefix from its clean run, reused instead of rerun."""
    start = patch_start(patches)
    if prefix is None or prefix.start != start:
        prefix = run_prefix(subject, inputs, start)
    k = inputs["input_ids"].shape[1] - start
    fold = len(patches) > 1 and prefix.fold_problem(subject) is None
    cost = memory.TokenCost.of(subject)
    if fold:
        kinds = len(set(subject.layer_kinds))
        size = memory.rows_per_forward(lambda r: memory.folded_rows(cost, r, start, k, kinds),
                                       len(patches), max_bytes, max_rows)
    else:
        size = memory.rows_per_forward(lambda r: memory.unfolded_rows(cost, r, start, k),
                                       len(patches), max_bytes, max_rows)
    margins = []
    for lo, hi in memory.chunks(len(patches), size):
        with choice_head(subject, answer_ids) as cols:
            logits = prefix.continue_with(subject, inputs, patches[lo:hi],
                                          fold=fold and hi - lo > 1)
            margins.append(margin(logits, cols, ref))
    return torch.cat(margins)


def _bridge(name: str):
    # nnsight and TransformerLens take seconds to import: load them on first use only.
    def run(*args, **kwargs):
        from importlib import import_module

        return getattr(import_module(f"mechlora.bridges.{name}"), f"run_{name}")(*args, **kwargs)
    return run


RUNNERS = {"full": run_full, "batched": run_batched, "cached": run_cached,
           "nnsight": _bridge("nnsight"), "tlens": _bridge("tlens")}


def choose_engine(engine: str, subject: Subject, inputs: dict,
                  patches: Sequence[Row]) -> str:
    if engine not in ENGINES:
        raise MechloraError(f"unknown engine '{engine}'; use one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    if not patches or not subject.family.cached:
        return "batched"  # the cached engine is picked only where it is tested exact
    return "cached" if cached_valid(subject, inputs, patch_start(patches)) is None else "batched"
