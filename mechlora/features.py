"""Image features computed once: the vision tower and projector are frozen, so the features of
one image are the same for every paraphrase, direction, epoch and eval run.

Kept in memory, and on disk with a folder (`--feature-cache DIR`), keyed by a fingerprint of
the vision weights (a SHA-256 of every byte, their names, shapes and dtypes) and of the
preprocessed pixels. The fingerprint of a model is remembered for that model object only
(never by `id`, which Python reuses) and recomputed when any vision weight changes in place
(its version counter moves) or is replaced. Edits through `param.data` bypass version
counters: call `FeatureCache.clear()` after those. A model whose vision tower carries
adapter weights is never cached (its features are not frozen).
"""

from __future__ import annotations

import hashlib
import inspect
import weakref
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from mechlora.io import atomic_write_bytes


def vision_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that turn pixels into LM-ready features (mechlora/models/family.py names
    them per family; Gemma 3: the vision tower and the projector)."""
    from mechlora.models.family import family_of

    inner = getattr(model, "model", model)
    names = family_of(model.config).vision_modules if hasattr(model, "config") else ()
    return [m for name in names if isinstance(m := getattr(inner, name, None), nn.Module)]


def _weights_stamp(params: list[tuple[str, torch.Tensor]]) -> tuple | None:
    """Changes whenever a weight is modified in place (version counter) or replaced; None
    for inference tensors, which keep no version counter (then every call re-hashes)."""
    if any(p.is_inference() for _, p in params):
        return None
    return tuple((p._version, p.data_ptr(), p.dtype) for _, p in params)


def _digest(params: list[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, p in params:
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:24]


class FeatureCache:
    def __init__(self, folder: str | Path | None = None, max_items: int = 1024) -> None:
        self.folder = Path(folder) if folder else None
        self.max_items = max_items
        self.memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0
        # model -> (weights stamp, fingerprint); dies with the model, so a new model at a
        # reused id starts afresh.
        self._fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def clear(self) -> None:
        """Forget every feature and fingerprint kept in memory (not the folder's files)."""
        self.memory.clear()
        self._fingerprints = weakref.WeakKeyDictionary()

    def fingerprint(self, model: nn.Module) -> str | None:
        """A digest of the vision weights; None when they are not frozen-and-plain."""
        modules = vision_modules(model)
        if not modules:
            return None
        params = [(n, p) for m in modules for n, p in m.named_parameters()]
        if any("lora_" in n for n, _ in params):  # an adapter on the vision side
            return None
        stamp = _weights_stamp(params)
        known = self._fingerprints.get(model)
        if known is None or stamp is None or known[0] != stamp:
            known = (stamp, _digest(params))
            self._fingerprints[model] = known
        return known[1]

    def features(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, tokens, hidden] projected features for `pixel_values` [n_images, ...]."""
        fp = self.fingerprint(model)
        if fp is None:
            return _compute(model, pixel_values)
        out = []
        dtype = _feature_dtype(model)
        for image in pixel_values:
            pixels = hashlib.sha256(image.detach().float().cpu().numpy().tobytes()).hexdigest()
            key = f"{fp}-{str(dtype).removeprefix('torch.')}-{pixels[:40]}"
            out.append(self._get(key, model, image, dtype))
        return torch.stack(out)

    def _get(self, key: str, model: nn.Module, image: torch.Tensor, dtype: torch.dtype
             ) -> torch.Tensor:
        if key in self.memory:
            self.hits += 1
            self.memory.move_to_end(key)
            return self.memory[key]
        path = self.folder / f"{key}.safetensors" if self.folder else None
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            feats = load_file(str(path))["features"].to(image.device, dtype)
            self.hits += 1
        else:
            feats = _compute(model, image[None])[0]
            self.misses += 1
            if path is not None:
                from safetensors.torch import save

                atomic_write_bytes(path, save({"features": feats.detach().cpu().contiguous()}))
        self.memory[key] = feats
        if len(self.memory) > self.max_items:
            self.memory.popitem(last=False)
        return feats


def _feature_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the features (Gemma 3 returns them in the vision tower's dtype)."""
    params = [p for m in vision_modules(model) for p in m.parameters()]
    return params[0].dtype if params else torch.float32


def _compute(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model.get_image_features(pixel_values, return_dict=True)
    return out.pooler_output


def supports_features(model: nn.Module) -> bool:
    """Models whose forward takes precomputed image features (Gemma 3: `mm_encoder_outputs`)."""
    return hasattr(model, "get_image_features") and \
        "mm_encoder_outputs" in inspect.signature(model.forward).parameters


def with_image_features(subject, inputs: dict, rows: int = 1) -> dict:
    """`inputs` with `pixel_values` swapped for cached image features, repeated over `rows`.

    Models that cannot take features keep their pixel values (expanded to `rows`).
    """
    if "pixel_values" not in inputs:
        return inputs
    out = {k: v for k, v in inputs.items() if k != "pixel_values"}
    pixels = inputs["pixel_values"]
    base = subject.base
    if not supports_features(base):
        out["pixel_values"] = pixels if rows == 1 else pixels.repeat(rows, 1, 1, 1)
        return out
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if subject.feature_cache is None:
        subject.feature_cache = FeatureCache()
    feats = subject.feature_cache.features(base, pixels)
    if rows > 1:
        feats = feats.repeat(rows, *[1] * (feats.dim() - 1))
    out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
    return out
