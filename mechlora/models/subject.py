"""The model adapter: where a model keeps its decoder layers, and how to prompt it.

A `Subject` wraps an HF model (plain or PEFT-wrapped) plus its tokenizer or processor. It names
the pieces the probes hook (decoder layers, each layer's attention and MLP, the final norm, the
unembedding) and turns a question (+ image) into model inputs. It never touches vision layers.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mechlora.errors import DataError, MechloraError
from mechlora.models import family as families
from mechlora.models.choices import ChoiceTokens, spellings

# Dotted paths from the (unwrapped) HF model to its decoder-layer list, most specific first:
# Gemma 3 / LLaVA VLMs, Llama-family decoders (Llama, Qwen2, Mistral, Gemma 2/3), GPT-2, NeoX.
LAYER_PATHS = ("model.language_model.layers", "model.layers", "transformer.h", "gpt_neox.layers",
               "language_model.model.layers")
ATTN_NAMES = ("self_attn", "attn", "attention")
MLP_NAMES = ("mlp", "feed_forward")
OUT_PROJ_NAMES = ("o_proj", "out_proj", "c_proj", "dense")
NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")
DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _find(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return get_module(root, path)
    except (AttributeError, IndexError):
        return None


@dataclass
class Subject:
    """A model and its processor, with the module map mechlora's probes need.

    `layers_path` overrides the search for the decoder-layer list (e.g. "model.layers").
    `template` is used for models without a chat template; it must contain "{question}".
    """

    model: nn.Module
    processor: Any
    name: str = "model"
    layers_path: str | None = None
    template: str = DEFAULT_TEMPLATE
    image_size: int | None = field(default=None)
    feature_cache: Any = field(default=None, repr=False)  # mechlora.features.FeatureCache

    def __post_init__(self) -> None:
        if self.layers_path is None:
            self.layers_path = next(
                (p for p in LAYER_PATHS if isinstance(_find(self.base, p), nn.ModuleList)), None)
        if self.layers_path is None or not isinstance(_find(self.base, self.layers_path),
                                                      nn.ModuleList):
            raise MechloraError(
                f"cannot find the decoder layers of {type(self.base).__name__}; pass "
                "layers_path='dotted.path.to.layers' (the nn.ModuleList of decoder blocks, e.g. "
                "'model.layers'); searched: " + ", ".join(LAYER_PATHS))
        if "{question}" not in self.template:
            raise MechloraError("the prompt template must contain '{question}'")

    # -- module map -------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        """The HF model under any PEFT wrapper."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    @property
    def layers(self) -> nn.ModuleList:
        return get_module(self.base, self.layers_path)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def _child(self, layer: int, names: Sequence[str], what: str) -> nn.Module:
        block = self.layers[layer]
        for name in names:
            if isinstance(getattr(block, name, None), nn.Module):
                return getattr(block, name)
        raise MechloraError(f"layer {layer} ({type(block).__name__}) has no {what} submodule; "
                            f"looked for {', '.join(names)}")

    def attn(self, layer: int) -> nn.Module:
        return self._child(layer, ATTN_NAMES, "attention")

    def mlp(self, layer: int) -> nn.Module:
        return self._child(layer, MLP_NAMES, "MLP")

    def out_proj(self, layer: int) -> nn.Module:
        """The attention's output projection, whose input holds each query head's output."""
        attn = self.attn(layer)
        for name in OUT_PROJ_NAMES:
            if isinstance(getattr(attn, name, None), nn.Module):
                return getattr(attn, name)
        raise MechloraError(f"the attention of layer {layer} ({type(attn).__name__}) has no "
                            f"output projection; looked for {', '.join(OUT_PROJ_NAMES)}")

    @property
    def n_heads(self) -> int:
        """Query heads per layer (the output projection reads one `head_dim` slice each)."""
        cfg = self.text_config
        return getattr(cfg, "num_attention_heads", None) or cfg.n_head

    @property
    def head_dim(self) -> int:
        cfg = self.text_config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads

    def check_heads(self) -> None:
        """Refuse per-head sites where the output projection's input is not
        `n_heads x head_dim` columns (heads could not be told apart)."""
        proj = self.out_proj(0)
        weight = getattr(proj, "weight", None)
        width = getattr(proj, "in_features", None) or getattr(proj, "nx", None)
        if width is None and weight is not None:  # GPT-2's Conv1D stores [in, out]
            width = weight.shape[0]
        if width != self.n_heads * self.head_dim:
            raise MechloraError(
                f"{self.name}: the attention output projection reads {width} features, not "
                f"{self.n_heads} heads x {self.head_dim}; per-head sites need one slice per "
                "query head")

    @property
    def final_norm(self) -> nn.Module:
        parent = get_module(self.base, self.layers_path.rsplit(".", 1)[0])
        for name in NORM_NAMES:
            if isinstance(getattr(parent, name, None), nn.Module):
                return getattr(parent, name)
        raise MechloraError(f"cannot find the final norm beside {self.layers_path}")

    @property
    def unembed(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def logit_lens(self, resid: torch.Tensor) -> torch.Tensor:
        """Final norm + unembedding applied to residual-stream vectors (the logit lens)."""
        logits = self.unembed(self.final_norm(resid))
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    @property
    def text_config(self):
        cfg = self.base.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- family facts (mechlora/models/family.py) ---------------------------------------------
    @property
    def family(self) -> families.Family:
        return families.family_of(self.base.config)

    @property
    def layer_kinds(self) -> list[str]:
        """Each decoder layer's attention kind ("full_attention", "sliding_attention", ...)."""
        return families.layer_kinds(self.text_config, self.n_layers)

    @property
    def sliding_window(self) -> int | None:
        """The window of the sliding-attention layers (None without any)."""
        if "sliding_attention" not in self.layer_kinds:
            return None
        return getattr(self.text_config, "sliding_window", None)

    @property
    def attn_implementation(self) -> str:
        """The language model's attention implementation (eager, sdpa, flash_attention_2...)."""
        return getattr(self.text_config, "_attn_implementation", None) or "eager"

    @property
    def image_token_id(self) -> int | None:
        return getattr(self.base.config, self.family.image_token_field, None)

    @property
    def cache_kwarg(self) -> str:
        """transformers 5.x renamed `past_key_values` to `cache` in some models, not all."""
        params = inspect.signature(self.base.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def prefix_cache_problem(self, inputs: dict, start: int) -> str | None:
        """Why a KV cache of positions [0, `start`) of `inputs` cannot serve exact
        continuations (None when it can): every cached key must be final before `start`."""
        if start < 1:
            return "a patch at position 0 leaves no prefix to cache"
        why = families.bidirectional(self.text_config, self.family)
        if why:
            return f"{why}, so patching a later position changes earlier keys"
        types = inputs.get("token_type_ids")
        if self.family.image_block and types is not None and bool(types[0, start:].any()):
            return ("image tokens come at or after the first patched position (their "
                    "attention block is bidirectional)")
        if not getattr(self.text_config, "use_cache", True):
            return "the model does not support a KV cache"
        return None

    def fold_problem(self) -> str | None:
        """Why the cached engine cannot fold patched rows into one sequence over a shared
        prefix with its own masks (None when it can); it then runs one row per patch."""
        family, impl = self.family, self.attn_implementation
        if not family.fold:
            return f"folding is not tested for {self.base.config.model_type} models"
        if impl not in families.FOLD_ATTENTION:
            return f"attention implementation {impl} does not take our masks as given"
        kinds = set(self.layer_kinds)
        if not kinds <= {"full_attention", "sliding_attention"}:
            return f"layer kinds {', '.join(sorted(kinds))}"
        if len(kinds) > 1 and not family.mask_by_layer_type:
            return "the model takes one mask for all of its layer kinds"
        return None

    # -- prompting --------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def is_vlm(self) -> bool:
        return hasattr(self.processor, "image_processor")

    @cached_property
    def _has_chat_template(self) -> bool:
        return bool(getattr(self.processor, "chat_template", None)
                    or getattr(self.tokenizer, "chat_template", None))

    @cached_property
    def _bos(self) -> str:
        """The BOS token text when the tokenizer starts every sequence with it, else "".

        Prompts are encoded with `add_special_tokens=False` (a chat template writes its own
        BOS), so a plain template must carry it: without it Gemma 3 270M puts 0.4% of its
        probability on yes/no after "Answer:" instead of ~43% (analyses/data/gemma3_270m).
        """
        tok = self.tokenizer
        bos = getattr(tok, "bos_token", None)
        if not bos or tok.bos_token_id is None:
            return ""
        adds = tok("a", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]
        return bos if adds else ""

    def prompt(self, question: str, with_image: bool = False) -> str:
        """The prompt text; the answer's first token is predicted at its last position."""
        if not self._has_chat_template:
            return self._bos + self.template.format(question=question)
        if with_image:
            content = [{"type": "image"}, {"type": "text", "text": question}]
        elif self.is_vlm:
            content = [{"type": "text", "text": question}]
        else:
            content = question
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)

    def encode(self, questions: Sequence[str], images: Sequence[Image.Image | None] | None = None
               ) -> dict[str, torch.Tensor]:
        """Left-padded model inputs for a batch of questions (one optional image each).

        `position_ids` come from the attention mask so that left padding does not shift them.
        """
        images = list(images) if images is not None else [None] * len(questions)
        texts = [self.prompt(q, with_image=img is not None) for q, img in zip(questions, images)]
        tok = self.tokenizer
        tok.padding_side = "left"
        if any(img is not None for img in images):
            if not self.is_vlm:
                raise MechloraError(f"{self.name} is a text-only model; drop the images or use a "
                                    "vision-language model")
            batch = self.processor(text=texts, images=[[img] if img is not None else []
                                                       for img in images],
                                   return_tensors="pt", padding=True)
        else:
            batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            if self.is_vlm:  # Gemma 3 expects token_type_ids when a processor is in use
                batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        batch = dict(batch)
        mask = batch["attention_mask"]
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return {k: v.to(self.device) for k, v in batch.items()}

    def gray_image(self) -> Image.Image:
        size = self.image_size or _processor_image_size(self.processor)
        return Image.fromarray(np.full((size, size, 3), 128, dtype=np.uint8))

    def answer_token_ids(self, choices: Sequence[str], *, where: tuple[str | None, int | None] =
                         (None, None)) -> list[int]:
        """First token of each choice as the model would write it after the prompt.

        Found by tokenising prompt + choice and reading the first new token, so leading-space
        conventions of the tokenizer are respected rather than guessed.
        """
        tok = self.tokenizer
        prompt = self.prompt("?", with_image=False)
        # A chat turn ends in a newline; a plain "Answer:" template is followed by a space.
        sep = "" if prompt[-1:].isspace() else " "
        base = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = []
        for choice in choices:
            full = tok(prompt + sep + choice, add_special_tokens=False)["input_ids"]
            if len(full) <= len(base) or full[: len(base)] != base:
                # The choice merged with the prompt's last token: fall back to the token the
                # choice starts with on its own.
                full = base + tok(choice, add_special_tokens=False)["input_ids"]
            ids.append(full[len(base)])
        seen: dict[int, str] = {}
        for choice, i in zip(choices, ids):
            if i in seen:
                raise DataError(
                    f"choices '{seen[i]}' and '{choice}' begin with the same token "
                    f"({tok.convert_ids_to_tokens(i)!r}), so the model's first answer token cannot "
                    "tell them apart; reword one of them", file=where[0], line=where[1],
                    field="choices")
            seen[i] = choice
        return ids

    def choice_tokens(self, choices: Sequence[str], *, merge: bool = False,
                      where: tuple[str | None, int | None] = (None, None)) -> ChoiceTokens:
        """How this model's first answer token is read as each of `choices`.

        `merge=False`: the one token of `answer_token_ids` per choice. `merge=True`: also every
        case and leading-space variant of the choice that the tokenizer writes right after the
        prompt as a single token (mechlora/models/choices.py says why only those).
        """
        first = self.answer_token_ids(choices, where=where)
        if not merge:
            return ChoiceTokens.single(first)
        tok = self.tokenizer
        prompt = self.prompt("?", with_image=False)
        base = tok(prompt, add_special_tokens=False)["input_ids"]
        special = set(tok.all_special_ids)  # an unknown word is <unk>: not a spelling of it
        found = []
        for choice, canonical in zip(choices, first, strict=True):
            ids = [canonical]
            for text in spellings(choice):
                full = tok(prompt + text, add_special_tokens=False)["input_ids"]
                if len(full) == len(base) + 1 and full[:len(base)] == base \
                        and full[-1] not in special:
                    ids.append(full[-1])
            found.append(list(dict.fromkeys(ids)))
        owners = Counter(i for ids in found for i in ids)
        # A variant two choices share says nothing about which one is meant: drop it.
        return ChoiceTokens(tuple(tuple(i for k, i in enumerate(ids) if k == 0 or owners[i] == 1)
                                  for ids in found), "merged")


def _processor_image_size(processor: Any) -> int:
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    return int(size.get("height") or size.get("shortest_edge") or 224)
