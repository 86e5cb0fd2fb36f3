"""Peak accelerator memory of a training step, estimated before anything is loaded.

    peak = weights + LoRA state + activations + workspace

- weights: every base parameter at the training dtype (bf16 on a GPU: 2 bytes).
- LoRA state: 16 bytes per trainable parameter (fp32 weight, gradient, AdamW's two moments),
  plus 2 for the bf16 copy autocast keeps during a forward.
- activations: what autograd keeps for the backward. A forward holds `rows` prompts (2 per
  pair) padded to the longest, `T` tokens each; the backward reaches the lowest adapted layer
  and everything above it. Per token and layer, with a = bytes of an activation (2 in bf16), h
  the hidden size, q / kv the query / key-value widths, H / Hkv the heads, I the MLP width:

      frozen layer  F = 4 (n h + q + kv + n + H + Hkv)   n norms over h and the q/k norms
                                                         run in fp32 (input, 1/rms)
                      + 4a q + 4H + a T                  attention: q, k and v (kv repeated
                                                         to q heads), output, logsumexp, mask
                      + 3a I                             MLP: gate, act(gate), up
      adapted layer A = F + sum over adapted projections of (in x (a + m) + r a)
                                                         LoRA input, dropout mask, LoRA hidden

  m is the dropout mask: 1 byte on a GPU (bool), 4 on CPU (an fp32 noise tensor), 0 without
  dropout. One more adapted layer's worth is added for the gradients in flight while a layer
  is back-propagated, and 4 (h + 1) per token for the final norm. With gradient checkpointing
  every layer keeps only its input (a h per token; those below the LoRA too) and one layer is
  recomputed at a time.
- workspace: a fixed 0.5 GiB for kernels' scratch space and allocator rounding.

The activation terms equal, to within 1%, the bytes autograd actually saves on a small Gemma 3
(tests/test_memory.py); docs/train.md compares the total with the H200 anchors. `fit_memory`
turns gradient checkpointing on when a GPU run's estimate exceeds 90% of the GPU's memory.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

GIB = 2**30
WORKSPACE = GIB // 2
FRACTION = 0.9  # share of the device's memory a run may plan to use


@dataclass(frozen=True)
class Shape:
    """The widths of a decoder layer that decide its activation memory."""

    hidden: int
    intermediate: int
    q: int  # heads x head_dim
    kv: int  # key-value heads x head_dim
    heads: int
    kv_heads: int
    norms: int  # norms over the hidden size per layer (Gemma 3: 4, Llama: 2)
    qk_norm: bool  # per-head q/k norms (Gemma 3)
    in_features: dict[str, int]  # projection name -> its input width

    @classmethod
    def of(cls, layer: nn.Module, text_config) -> Shape:
        c = text_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        names = {n.rsplit(".", 1)[-1] for n, _ in layer.named_modules()}
        norms = sum(1 for n, m in layer.named_children() if "norm" in n and
                    getattr(m, "weight", None) is not None and m.weight.numel() == c.hidden_size)
        linears = {n.rsplit(".", 1)[-1]: m.in_features for n, m in layer.named_modules()
                   if isinstance(m, nn.Linear)}
        return cls(c.hidden_size, c.intermediate_size, c.num_attention_heads * head_dim,
                   kv_heads * head_dim, c.num_attention_heads, kv_heads, norms,
                   {"q_norm", "k_norm"} <= names, linears)

    def frozen(self, seq_len: int, act: int) -> int:
        """Bytes per token that autograd keeps for a layer without LoRA (above the lowest)."""
        qk = (self.q + self.kv + self.heads + self.kv_heads) if self.qk_norm else 0
        norms = 4 * (self.norms * (self.hidden + 1) + qk)
        attention = 4 * act * self.q + 4 * self.heads + act * seq_len
        return norms + attention + 3 * act * self.intermediate

    def adapted(self, seq_len: int, act: int, modules: Sequence[str], r: int, mask: int) -> int:
        """Bytes per token of a layer carrying LoRA on `modules`."""
        lora = sum(self.in_features[m] * (act + mask) + r * act for m in modules)
        return self.frozen(seq_len, act) + lora


def activation_bytes(s: Shape, layers: Sequence[int], n_layers: int, modules: Sequence[str],
                     r: int, rows: int, seq_len: int, *, act: int = 2, mask: int = 1,
                     checkpointing: bool = False) -> int:
    """What the backward keeps for `rows` prompts of `seq_len` tokens (see the module doc)."""
    adapted = s.adapted(seq_len, act, modules, r, mask)
    reached = n_layers - min(layers)  # the backward runs from the top down to the lowest LoRA
    if checkpointing:
        per_token = n_layers * act * s.hidden + 2 * adapted
    else:
        per_token = (len(layers) * adapted + (reached - len(layers)) * s.frozen(seq_len, act)
                     + adapted)
    return rows * seq_len * (per_token + 4 * (s.hidden + 1))


@dataclass(frozen=True)
class Estimate:
    weights: int
    lora_state: int
    activations: int
    workspace: int
    rows: int
    seq_len: int
    checkpointing: bool

    @property
    def total(self) -> int:
        return self.weights + self.lora_state + self.activations + self.workspace

    def text(self) -> str:
        return (f"{self.total / GIB:.1f} GiB = weights {self.weights / GIB:.1f} + LoRA state "
                f"{self.lora_state / GIB:.2f} + activations {self.activations / GIB:.2f} "
                f"({self.rows} prompts x {self.seq_len} tokens per forward"
                + (", gradient checkpointing" if self.checkpointing else "")
                + f") + workspace {self.workspace / GIB:.1f}")


def estimate(base: nn.Module, layer: nn.Module, text_config, layers: Sequence[int],
             n_layers: int, modules: Sequence[str], r: int, trainable: int, *, rows: int,
             seq_len: int, checkpointing: bool, weight_bytes: int = 2, autocast: bool = True,
             dropout: bool = True, device: str = "cuda") -> Estimate:
    """Peak memory of one forward+backward on `device`; `layer` is any decoder layer (shapes
    only, `meta` is fine). `autocast`: LoRA runs in bf16 (mechlora's GPU default); without it
    PEFT keeps the LoRA inputs in fp32."""
    s = Shape.of(layer, text_config)
    lora_act = weight_bytes if autocast or weight_bytes == 4 else 4
    mask = 0 if not dropout else (1 if device == "cuda" else 4)
    acts = activation_bytes(s, layers, n_layers, modules, r, rows, seq_len, act=weight_bytes,
                            mask=mask + lora_act - weight_bytes, checkpointing=checkpointing)
    state = trainable * (16 + (2 if autocast and weight_bytes == 2 else 0))
    weights = sum(p.numel() for p in base.parameters()) * weight_bytes
    return Estimate(weights, state, acts, WORKSPACE, rows, seq_len, checkpointing)


def for_run(subject, layers: Sequence[int], cfg, trainable: int, *, pairs_per_forward: int,
            seq_len: int, checkpointing: bool, weight_bytes: int = 2,
            device: str = "cuda") -> Estimate:
    """`estimate` for a Subject trained with TrainConfig `cfg` (cuda: bf16 autocast if on)."""
    return estimate(subject.base, subject.layers[0], subject.text_config, layers,
                    subject.n_layers, cfg.modules, cfg.r, trainable,
                    rows=2 * pairs_per_forward, seq_len=seq_len, checkpointing=checkpointing,
                    weight_bytes=weight_bytes, autocast=cfg.bf16 and device == "cuda",
                    dropout=cfg.dropout > 0, device=device)


def device_budget(device: torch.device) -> int | None:
    """Bytes a run may plan to use: 90% of what the GPU has for it (None off a GPU)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(FRACTION * (free + torch.cuda.memory_allocated(device)))


def fit_memory(subject, batcher, groups, spec, cfg, trainable: int, acc
               ) -> tuple[Any, dict | None]:
    """On a GPU, the run's estimated peak (its longest prompt, its pairs per forward) and, when
    it exceeds `device_budget`, the config with gradient checkpointing on; (cfg, None) off a
    GPU. Returns the config to train with and the `training.memory` record."""
    device = subject.device
    budget = device_budget(device)
    if budget is None:
        return cfg, None
    seq_len = max(batcher.length(g, v) for g in groups for v in range(len(g.variants)))
    mine = -(-cfg.pairs_per_step // acc.num_processes)
    pairs = min(cfg.micro_batch or mine, mine)
    weight_bytes = next(subject.model.parameters()).element_size()

    def peak(checkpointing: bool) -> int:
        return for_run(subject, spec.layers, cfg, trainable, pairs_per_forward=pairs,
                       seq_len=seq_len, checkpointing=checkpointing,
                       weight_bytes=weight_bytes).total

    auto = not cfg.gradient_checkpointing and peak(False) > budget
    memory = {"estimate_gib": round(peak(cfg.gradient_checkpointing) / GIB, 2),
              "with_checkpointing_gib": round(peak(True) / GIB, 2),
              "budget_gib": round(budget / GIB, 2), "pairs_per_forward": pairs,
              "seq_len": seq_len, "auto_checkpointing": auto}
    if auto:
        if acc.is_main_process:
            print(f"memory: estimated peak {peak(False) / GIB:.1f} GiB exceeds "
                  f"{budget / GIB:.1f} GiB (90% of what {device} has), so gradient "
                  f"checkpointing is on ({peak(True) / GIB:.1f} GiB)", file=sys.stderr)
        cfg = dataclasses.replace(cfg, gradient_checkpointing=True)
    return cfg, memory
