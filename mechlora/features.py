"""Image features computed once: the vision tower and projector are frozen, so the features of
one image are the same for every paraphrase, direction, epoch and eval run.

Kept in memory, and on disk with a folder (`--feature-cache DIR`), keyed by a fingerprint of
the vision weights and the preprocessed pixels. A model whose vision tower carries adapter
weights is never cached (its features are not frozen).
"""

from __future__ import annotations

import hashlib
import inspect
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from mechlora.io import atomic_write_bytes


def vision_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that turn pixels into LM-ready features (Gemma 3: tower + projector)."""
    inner = getattr(model, "model", model)
    return [m for name in ("vision_tower", "multi_modal_projector")
            if isinstance(m := getattr(inner, name, None), nn.Module)]


class FeatureCache:
    def __init__(self, folder: str | Path | None = None, max_items: int = 1024) -> None:
        self.folder = Path(folder) if folder else None
        self.max_items = max_items
        self.memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0
        self._fingerprints: dict[int, str] = {}

    def fingerprint(self, model: nn.Module) -> str | None:
        """A digest of the vision weights; None when they are not frozen-and-plain."""
        modules = vision_modules(model)
        if not modules:
            return None
        params = [(n, p) for m in modules for n, p in m.named_parameters()]
        if any("lora_" in n for n, _ in params):  # an adapter on the vision side
            return None
        if id(model) not in self._fingerprints:
            h = hashlib.sha256()
            for name, p in params:
                h.update(name.encode())
                h.update(str(tuple(p.shape)).encode())
                flat = p.detach().flatten().float()
                h.update(flat[:: max(1, flat.numel() // 4096)].cpu().numpy().tobytes())
            self._fingerprints[id(model)] = h.hexdigest()[:16]
        return self._fingerprints[id(model)]

    def features(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, tokens, hidden] projected features for `pixel_values` [n_images, ...]."""
        fp = self.fingerprint(model)
        if fp is None:
            return _compute(model, pixel_values)
        out = []
        for image in pixel_values:
            key = fp + hashlib.sha256(image.detach().float().cpu().numpy().tobytes()).hexdigest()
            out.append(self._get(key, model, image))
        return torch.stack(out)

    def _get(self, key: str, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        if key in self.memory:
            self.hits += 1
            self.memory.move_to_end(key)
            return self.memory[key]
        path = self.folder / f"{key}.safetensors" if self.folder else None
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            feats = load_file(str(path))["features"].to(image.device)
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
