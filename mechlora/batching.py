"""Training data: the pairs each epoch draws, and their prompts as padded model inputs."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mechlora.data import Pair, QuestionGroup, load_image
from mechlora.features import supports_features, with_image_features
from mechlora.models.choices import ChoiceTokens
from mechlora.models.subject import Subject


def epoch_pairs(groups: Sequence[QuestionGroup], seed: int, epoch: int) -> list[Pair]:
    """One random pair of distinct wordings per group, in a shuffled order; seeded per epoch."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(groups)))
    rng.shuffle(order)
    return [Pair(groups[i], *rng.sample(range(len(groups[i].variants)), 2)) for i in order]


class Batcher:
    """Left-padded model inputs for (group, variant) rows.

    Each prompt is tokenized once and each image encoded once: Gemma 3 gets the projected image
    features (`mm_encoder_outputs`), other vision-language models the cached pixel values.
    """

    def __init__(self, subject: Subject, *, merge_variants: bool = False) -> None:
        self.subject = subject
        self.merge_variants = merge_variants
        self._prompts: dict[tuple[str, str | None], dict[str, torch.Tensor]] = {}
        self._images: dict[Path, torch.Tensor] = {}
        self._choices: dict[tuple[str, ...], ChoiceTokens] = {}
        base = subject.base
        self.features = supports_features(base)
        tok = subject.tokenizer
        self.pad = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)

    def choice_tokens(self, group: QuestionGroup) -> ChoiceTokens:
        """How the model's first answer token reads as each of the group's choices."""
        if group.choices not in self._choices:
            self._choices[group.choices] = self.subject.choice_tokens(
                group.choices, merge=self.merge_variants, where=(group.source, group.line))
        return self._choices[group.choices]

    def choice_ids(self, group: QuestionGroup) -> list[int]:
        """The canonical first token of each choice."""
        return self.choice_tokens(group).first

    def _image(self, group: QuestionGroup) -> Path | None:
        return group.image if group.image is not None and self.subject.is_vlm else None

    def _prompt(self, group: QuestionGroup, variant: int) -> dict[str, torch.Tensor]:
        text, path = group.variants[variant].text, self._image(group)
        key = (text, str(path))
        if key not in self._prompts:
            enc = self.subject.encode([text], [load_image(path) if path else None])
            if path is not None and path not in self._images:
                with torch.no_grad():
                    pixels = enc["pixel_values"]
                    if self.features:  # through the subject's cache: shared with localize/eval
                        feats = with_image_features(self.subject, {"pixel_values": pixels})
                        pixels = feats["mm_encoder_outputs"]["image"].pooler_output
                    self._images[path] = pixels[0].cpu()
            self._prompts[key] = {k: enc[k][0].cpu() for k in ("input_ids", "token_type_ids")
                                  if k in enc}
        return self._prompts[key]

    def length(self, group: QuestionGroup, variant: int) -> int:
        """Tokens in the prompt of one wording (tokenized once, like every prompt here)."""
        return len(self._prompt(group, variant)["input_ids"])

    def inputs(self, rows: Sequence[tuple[QuestionGroup, int]]) -> dict[str, Any]:
        prompts = [self._prompt(g, v) for g, v in rows]
        width = max(len(p["input_ids"]) for p in prompts)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        types = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            n = len(p["input_ids"])
            ids[i, width - n:] = p["input_ids"]
            if "token_type_ids" in p:
                types[i, width - n:] = p["token_type_ids"]
        mask = (torch.arange(width) >= width - torch.tensor(
            [len(p["input_ids"]) for p in prompts])[:, None]).long()
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask,
                                 "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        if "token_type_ids" in prompts[0]:
            batch["token_type_ids"] = types
        device = self.subject.device
        batch = {k: v.to(device) for k, v in batch.items()}
        images = [self._image(g) for g, _ in rows if self._image(g) is not None]
        if images:
            stacked = torch.stack([self._images[p] for p in images]).to(device)
            if self.features:
                from transformers.modeling_outputs import BaseModelOutputWithPooling

                batch["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(
                    pooler_output=stacked)}
            else:
                batch["pixel_values"] = stacked
        return batch


def first_token_logits(model, inputs: dict[str, Any]) -> torch.Tensor:
    """[rows, vocab] logits at the last prompt position, where the first answer token is read."""
    return model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
