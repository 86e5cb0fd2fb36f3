"""What mechlora knows about each model family, in one place.

Patching, localization and the image-feature cache ask this module (through `Subject`)
instead of testing model types themselves, so adding a family is one `Family` entry here plus
its line in the exactness tests (docs/localize.md, "Adding a model family"):

- which attention the prompt uses (causal, bidirectional, a bidirectional image block),
- whether the cached engine may fold its patched rows into one sequence with custom masks,
- where the vision modules are and which config field holds the image-token id,
- how transformers' KV cache keeps its keys and values (`KVLayer`), which the cached engine
  cuts and resets between patched steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Attention implementations whose masks are plain additive tensors that the model applies
# as given: the only ones the cached engine folds rows for (others get one row per patch).
FOLD_ATTENTION = ("eager", "sdpa")


@dataclass(frozen=True)
class Family:
    """One kind of model.

    `fold`: the forward honours a caller's 4D attention mask with repeated position ids
    (tests/test_localize.py checks each folded family against one forward per patch).
    `mask_by_layer_type`: the forward also takes `{"full_attention": m, "sliding_attention": m}`,
    so layers with a sliding window can fold too. `prefix_lm`: the prompt attends both ways
    (PaliGemma), so no position's keys are final before the prompt ends. `image_block`: image
    tokens attend to each other both ways (`token_type_ids` marks them; Gemma 3).
    `cached`: `engine="auto"` may pick the cached engine (it is tested exact for this family).
    """

    name: str
    model_types: tuple[str, ...]
    cached: bool = True
    fold: bool = False
    mask_by_layer_type: bool = False
    prefix_lm: bool = False
    image_block: bool = False
    vision_modules: tuple[str, ...] = ()
    image_token_field: str = "image_token_id"


FAMILIES = (
    Family("gemma3", ("gemma3", "gemma3_text"), fold=True, mask_by_layer_type=True,
           image_block=True, vision_modules=("vision_tower", "multi_modal_projector")),
    Family("llama", ("llama",), fold=True),
    Family("qwen2", ("qwen2",), fold=True, mask_by_layer_type=True),
    Family("paligemma", ("paligemma",), cached=False, prefix_lm=True,
           vision_modules=("vision_tower", "multi_modal_projector")),
)
# Anything else: exact engines only (`auto` picks `batched`); `--engine cached` runs unfolded
# rows after the same checks. Vision modules under the common names are still found.
GENERIC = Family("generic", (), cached=False,
                 vision_modules=("vision_tower", "multi_modal_projector"))


def family_of(config) -> Family:
    """The family of a model config (a VLM's own type first, then its text model's)."""
    types = [getattr(config, "model_type", None)]
    if hasattr(config, "get_text_config"):
        types.append(getattr(config.get_text_config(), "model_type", None))
    for model_type in types:
        for family in FAMILIES:
            if model_type in family.model_types:
                return family
    return GENERIC


def bidirectional(text_config, family: Family) -> str | None:
    """Why the prompt's attention is not causal (None when it is)."""
    if family.prefix_lm:
        return f"{family.name} attends over the whole prompt both ways (prefix-LM)"
    if getattr(text_config, "use_bidirectional_attention", False):
        return "the model's config sets use_bidirectional_attention"
    if getattr(text_config, "is_causal", True) is False:
        return "the model's config sets is_causal=False"
    return None


def layer_kinds(text_config, n_layers: int) -> list[str]:
    """Each decoder layer's attention kind: config.layer_types, else full attention."""
    kinds = getattr(text_config, "layer_types", None)
    return list(kinds) if kinds else ["full_attention"] * n_layers


@dataclass
class KVLayer:
    """One layer of a transformers `DynamicCache` as it stood after a prefix.

    `DynamicLayer` holds every key; `DynamicSlidingWindowLayer` only the last
    `sliding_window - 1` and counts all in `cumulative_length`, so after a prefix of `start`
    tokens it holds positions [start - held, start).
    """

    layer: object
    keys: torch.Tensor
    values: torch.Tensor
    length: int | None   # cumulative_length (sliding layers), None for plain layers
    window: int | None   # the sliding window, None for full attention

    @property
    def held(self) -> int:
        return self.keys.shape[-2]

    def restore(self, rows: int) -> None:
        # Expanded views, not copies: every continuation starts from the same prefix.
        self.layer.keys = self.keys.expand(rows, *self.keys.shape[1:])
        self.layer.values = self.values.expand(rows, *self.values.shape[1:])
        if self.length is not None:
            self.layer.cumulative_length = self.length


KNOWN_CACHE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


def cache_problem(cache) -> str | None:
    """Why the cached engine cannot cut and reset `cache` (None when it can)."""
    names = {type(layer).__name__ for layer in getattr(cache, "layers", [None])}
    unknown = names - set(KNOWN_CACHE_LAYERS)
    if unknown:
        return (f"its KV cache holds {', '.join(sorted(unknown))} layers; the cached engine "
                f"knows {' and '.join(KNOWN_CACHE_LAYERS)} only")
    return None


def kv_snapshot(cache) -> list[KVLayer]:
    """The cache's layers as they stand now (right after a prefix forward)."""
    return [KVLayer(layer, layer.keys, layer.values, getattr(layer, "cumulative_length", None),
                    getattr(layer, "sliding_window", None)) for layer in cache.layers]


def kv_cut(cache, start: int) -> list[KVLayer] | None:
    """The cache of a whole prompt cut back to its first `start` positions; None when a
    sliding layer has already dropped positions (then the prefix must run on its own)."""
    snapshot = []
    for kv in kv_snapshot(cache):
        if kv.length is not None and (not isinstance(kv.length, int) or kv.held != kv.length):
            return None
        snapshot.append(KVLayer(kv.layer, kv.keys[..., :start, :], kv.values[..., :start, :],
                                None if kv.length is None else start, kv.window))
    return snapshot
