"""A Gemma 3 text forward written out by hand from the model's weights, as an independent check
of mechlora's sites: no module's forward is called, only its parameters are read.

Per decoder layer (transformers' Gemma3DecoderLayer, written from the paper's description):
    a = o_proj(attention(rope(q_norm(q)), rope(k_norm(k)), v))      site attn
    h = h + post_attention_norm(a)
    f = down(gelu_tanh(gate(x)) * up(x)),  x = pre_feedforward_norm(h)   site mlp
    h = h + post_feedforward_norm(f)                                    site resid
with Gemma's RMSNorm y = x / rms(x) * (1 + w), queries scaled by query_pre_attn_scalar^-1/2,
a causal mask (and q - kv < window on sliding layers), RoPE with each layer kind's theta.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, norm, eps: float) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + norm.weight.float())).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [heads, T, d] rotated by position (the half-split convention)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = positions.float()[:, None] * inv[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + half * sin


def linear(x: torch.Tensor, module) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias)


def forward(model, input_ids: torch.Tensor, patch: dict | None = None,
            record: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Logits at the last position of one prompt ([T] ids) and, with `record` (positions),
    every site's output there: {(layer, component): [P, hidden]}. `patch`: {(layer,
    component): (positions, values)} written into those outputs."""
    cfg, lm = model.config, model.model
    patch, seen = patch or {}, {}
    ids = input_ids.reshape(-1)
    T = len(ids)
    pos = torch.arange(T)
    h = lm.embed_tokens.weight[ids] * torch.tensor(math.sqrt(cfg.hidden_size),
                                                   dtype=lm.embed_tokens.weight.dtype)
    eps, n_heads, n_kv, d = cfg.rms_norm_eps, cfg.num_attention_heads, \
        cfg.num_key_value_heads, cfg.head_dim

    def site(layer: int, comp: str, out: torch.Tensor) -> torch.Tensor:
        if (layer, comp) in patch:
            where, values = patch[(layer, comp)]
            out = out.clone()
            out[where] = values
        if record is not None:
            seen[(layer, comp)] = out[record]
        return out

    for i, block in enumerate(lm.layers):
        kind = cfg.layer_types[i]
        att = block.self_attn
        x = rms_norm(h, block.input_layernorm, eps)
        q = linear(x, att.q_proj).view(T, n_heads, d).transpose(0, 1)
        k = linear(x, att.k_proj).view(T, n_kv, d).transpose(0, 1)
        v = linear(x, att.v_proj).view(T, n_kv, d).transpose(0, 1)
        theta = cfg.rope_parameters[kind]["rope_theta"]
        q = rope(rms_norm(q, att.q_norm, eps), pos, theta)
        k = rope(rms_norm(k, att.k_norm, eps), pos, theta)
        k = k.repeat_interleave(n_heads // n_kv, 0)
        v = v.repeat_interleave(n_heads // n_kv, 0)
        scores = q @ k.transpose(-1, -2) * cfg.query_pre_attn_scalar ** -0.5
        if cfg.attn_logit_softcapping:
            scores = torch.tanh(scores / cfg.attn_logit_softcapping) * cfg.attn_logit_softcapping
        allowed = pos[None, :] <= pos[:, None]
        if kind == "sliding_attention":
            allowed &= pos[:, None] - pos[None, :] < cfg.sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        mixed = (scores.float().softmax(-1).to(v.dtype) @ v).transpose(0, 1).reshape(T, -1)
        a = site(i, "attn", linear(mixed, att.o_proj))
        h = h + rms_norm(a, block.post_attention_layernorm, eps)
        mlp = block.mlp
        x = rms_norm(h, block.pre_feedforward_layernorm, eps)
        f = linear(F.gelu(linear(x, mlp.gate_proj), approximate="tanh")
                   * linear(x, mlp.up_proj), mlp.down_proj)
        f = site(i, "mlp", f)
        h = site(i, "resid", h + rms_norm(f, block.post_feedforward_layernorm, eps))
    logits = F.linear(rms_norm(h[-1], lm.norm, eps), model.lm_head.weight)
    cap = cfg.final_logit_softcapping
    return (torch.tanh(logits / cap) * cap if cap else logits), seen
