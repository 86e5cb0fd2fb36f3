"""Built-in models that need no download: tiny random models, MedGemma-4B's shape on `meta`,
the model organisms (trained here on first use; `organism-mid@SEED` picks a seed)."""

from __future__ import annotations

from functools import partial

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
)

from mechlora.models.tokenizer import build_processor, build_tokenizer
from mechlora.organism import ORGANISMS as ORGANISM_PRESETS

TINY_IMAGE_SIZE = 32
TINY_IMAGE_TOKENS = 4

# MedGemma-4B-it (guide section 3): 4,300,079,472 parameters.
MEDGEMMA_4B_TEXT = dict(
    hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
    vocab_size=262208,
)
MEDGEMMA_4B_VISION = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    image_size=896, patch_size=14, vision_use_head=False,
)


def _tiny_text_config(vocab_size: int, n_layers: int = 34) -> dict:
    return dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=512,
        vocab_size=vocab_size, max_position_embeddings=2048,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
        # Wider than HF's 0.02 so that random margins are ~1 logit, not ~0.2: restoration
        # divides by margin differences.
        initializer_range=0.1,
    )


def medgemma_4b_config() -> Gemma3Config:
    cfg = Gemma3Config(
        text_config=MEDGEMMA_4B_TEXT, vision_config=MEDGEMMA_4B_VISION, mm_tokens_per_image=256,
        boi_token_index=255999, eoi_token_index=256000, image_token_index=262144,
    )
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    return cfg


def medgemma_4b(device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16):
    """MedGemma-4B's exact architecture with no weights (on `meta`) or random ones (elsewhere)."""
    with torch.device(device):
        model = Gemma3ForConditionalGeneration(medgemma_4b_config()).to(dtype)
    return model, None


def tiny_gemma3_vlm(seed: int = 0, n_layers: int = 34):
    """A random Gemma 3 VLM with 34 language layers and a small SigLIP tower; seeded."""
    tok = build_tokenizer()
    processor = build_processor(tok, image_size=TINY_IMAGE_SIZE, image_seq_length=TINY_IMAGE_TOKENS)
    cfg = Gemma3Config(
        text_config=_tiny_text_config(len(tok), n_layers),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=TINY_IMAGE_SIZE, patch_size=8,
                           vision_use_head=False),
        mm_tokens_per_image=TINY_IMAGE_TOKENS,
        boi_token_index=tok.convert_tokens_to_ids(tok.boi_token),
        eoi_token_index=tok.convert_tokens_to_ids(tok.eoi_token),
        image_token_index=tok.image_token_id,
    )
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    # Random init leaves the projector at zero, so the image would have no effect at all.
    with torch.no_grad():
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.normal_(0.0, proj.shape[0] ** -0.5)
    return model, processor


def tiny_gemma3_text(seed: int = 0, n_layers: int = 12):
    """A random text-only Gemma 3 with a character-level tokenizer; seeded."""
    tok = build_tokenizer()
    cfg = Gemma3TextConfig(**_tiny_text_config(len(tok), n_layers))
    cfg.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(cfg).eval(), tok


def organism(preset: str = "organism-mid", seed: int | None = None):
    """A trained model organism (built on first use, then cached; see docs/organism.md)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mechlora.organism import build_organism

    # Built and loaded on the CPU even inside a `torch.device("meta")` block: it is trained.
    with torch.device("cpu"):
        path = build_organism(preset=preset, seed=seed)
        model = AutoModelForImageTextToText.from_pretrained(path)
    return model, AutoProcessor.from_pretrained(path)


def _gemma3_270m():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechlora.models.gemma270m import gemma3_270m_dir

    path = gemma3_270m_dir()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


class Presets(dict):
    """Preset name -> loader. Organism presets take a seed: `organism-mid@1`."""

    def _organism(self, name: object) -> tuple[str, int] | None:
        from mechlora.organism import ALIASES, ORGANISMS

        base, at, seed = str(name).partition("@")
        if at and (base in ORGANISMS or base in ALIASES) and seed.isdigit():
            return base, int(seed)
        return None

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or self._organism(name) is not None

    def __getitem__(self, name: str):
        if not super().__contains__(name) and (found := self._organism(name)) is not None:
            return partial(organism, *found)
        return super().__getitem__(name)


PRESETS = Presets({
    "tiny-gemma3-vlm": tiny_gemma3_vlm,
    "tiny-gemma3-text": tiny_gemma3_text,
    "medgemma-4b": medgemma_4b,
    **{name: partial(organism, name) for name in ("organism", *ORGANISM_PRESETS)},
    "gemma3-270m": _gemma3_270m,
})
