"""Tiny random models for the exactness tests: Gemma 3 with a small sliding window and mixed
layer kinds (text and VLM), and other families' decoders. Prompts of the character-level
tokenizer are 40-90 tokens, so windows of 8-40 are crossed by every prompt."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
)

from mechlora.models import wrap
from mechlora.models.tokenizer import build_processor, build_tokenizer
from mechlora.patching import RUNNERS, SitePatch
from mechlora.probes import all_sites

MIXED = ("sliding_attention", "full_attention", "sliding_attention", "sliding_attention")


def text_config(window: int, kinds=MIXED, vocab: int = 0, **kw) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=len(kinds),
                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                query_pre_attn_scalar=8, sliding_window=window, layer_types=list(kinds),
                vocab_size=vocab, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
                bos_token_id=2, initializer_range=0.2, **kw)


def gemma3_text(window: int = 16, kinds=MIXED, seed: int = 0, attn: str = "sdpa", **kw):
    tok = build_tokenizer()
    cfg = Gemma3TextConfig(**text_config(window, kinds, len(tok), **kw))
    cfg.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    model.set_attn_implementation(attn)
    return wrap(model, tok, name=f"gemma3-text-w{window}")


def gemma3_vlm(window: int = 16, kinds=MIXED, seed: int = 0, attn: str = "sdpa"):
    tok = build_tokenizer()
    processor = build_processor(tok, image_size=32, image_seq_length=4)
    cfg = Gemma3Config(
        text_config=text_config(window, kinds, len(tok)),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8,
                           vision_use_head=False),
        mm_tokens_per_image=4, boi_token_index=tok.convert_tokens_to_ids(tok.boi_token),
        eoi_token_index=tok.convert_tokens_to_ids(tok.eoi_token),
        image_token_index=tok.image_token_id)
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random init leaves the projector at zero: the image would not count
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.normal_(0.0, proj.shape[0] ** -0.5)
    model.set_attn_implementation(attn)
    return wrap(model, processor, name=f"gemma3-vlm-w{window}")


def decoder(kind: str, seed: int = 0, **kw):
    """A tiny Llama, Qwen2 (optionally with sliding layers) or GPT-2."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tok = build_tokenizer()
    if kind == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=len(tok), pad_token_id=0)
        model_cls = GPT2LMHeadModel
    else:
        config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
        config = config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                            initializer_range=0.2, pad_token_id=0, **kw)
    torch.manual_seed(seed)
    return wrap(model_cls(config).eval(), tok, name=f"tiny-{kind}")


def random_patches(subject, inputs, k: int, seed: int = 0) -> list[SitePatch]:
    """A random value at every site for the last `k` positions."""
    length = inputs["input_ids"].shape[1]
    g = torch.Generator().manual_seed(seed)
    hidden = subject.text_config.hidden_size
    dtype = subject.base.get_input_embeddings().weight.dtype
    return [SitePatch(site, torch.arange(length - k, length),
                      torch.randn(k, hidden, generator=g).to(dtype))
            for site in all_sites(subject.n_layers)]


def margins(subject, inputs, patches, engine: str, **kw) -> torch.Tensor:
    with torch.inference_mode():
        return RUNNERS[engine](subject, inputs, patches, [5, 6, 7], 1, **kw)


def paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    tok = build_tokenizer()
    cfg = PaliGemmaConfig(
        text_config=dict(model_type="gemma", hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, vocab_size=len(tok)),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        image_token_index=tok.image_token_id, projection_dim=32)
    torch.manual_seed(0)
    return wrap(PaliGemmaForConditionalGeneration(cfg).eval(), tok, name="tiny-paligemma")
