"""A model with a planted divergence: only layer k's MLP turns phrasing into the answer.

Attention outputs are zeroed in every layer but k, so the last position learns nothing about
the phrasing before layer k. Layer k's MLP gets a gate that reads the phrasing feature its
attention brought to the last position and writes +/- s along the yes-no unembedding
direction. The localizer must find layer k for the MLP site and the residual increment.
"""

from __future__ import annotations

import torch
from torch import nn

from mechlora.data import QuestionGroup, Variant
from mechlora.models import wrap
from mechlora.models.presets import tiny_gemma3_text

PHRASING_A = ["is there an effusion", "is the heart enlarged", "is a line present"]
PHRASING_B = ["does this film show fluid around the lung", "would you call the cardiac shadow big",
              "can you see a tube or catheter"]


class GatedMLP(nn.Module):
    def __init__(self, inner: nn.Module, w: torch.Tensor, c: float, d: torch.Tensor, s: float):
        super().__init__()
        self.inner = inner
        self.register_buffer("w", w)
        self.register_buffer("d", d)
        self.c, self.s = c, s

    def forward(self, x):
        gate = torch.tanh((x @ self.w - self.c) * 20.0)
        return self.inner(x) + self.s * gate[..., None] * self.d


def planted_groups() -> list[QuestionGroup]:
    return [QuestionGroup(id=f"q{i}", variants=(Variant(a + "?"), Variant(b + "?", "lexical")),
                          answer="yes") for i, (a, b) in enumerate(zip(PHRASING_A, PHRASING_B))]


def planted_subject(k: int, n_layers: int = 8, strength: float = 30.0):
    model, tok = tiny_gemma3_text(seed=1, n_layers=n_layers)
    subject = wrap(model, tok, name=f"planted-{k}")
    with torch.no_grad():
        for i, layer in enumerate(subject.layers):
            if i != k:
                layer.self_attn.o_proj.weight.zero_()
        # Fit the gate on the MLP input at the last position of each phrasing.
        feats: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
        grab = {}
        h = subject.mlp(k).register_forward_pre_hook(lambda m, args: grab.update(x=args[0]))
        for g in planted_groups():
            for key, v in zip("ab", g.variants):
                subject.model(**subject.encode([v.text]))
                feats[key].append(grab["x"][0, -1])
        h.remove()
        mean_a, mean_b = torch.stack(feats["a"]).mean(0), torch.stack(feats["b"]).mean(0)
        w = (mean_a - mean_b) / (mean_a - mean_b).norm()
        proj_a = torch.stack(feats["a"]) @ w
        proj_b = torch.stack(feats["b"]) @ w
        assert proj_a.min() > proj_b.max(), "the planted gate does not separate the phrasings"
        c = float((proj_a.min() + proj_b.max()) / 2)
        yes, no = subject.answer_token_ids(["yes", "no"])
        emb = subject.unembed.weight
        d = (emb[yes] - emb[no]) / (emb[yes] - emb[no]).norm()
        block = subject.layers[k]
        block.mlp = GatedMLP(block.mlp, w, c, d, strength)
    return subject
