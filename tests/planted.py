"""Models with a planted divergence, whose location the localizer must find.

`planted_subject(k)`: attention outputs are zeroed in every layer but k, so the last position
learns nothing about the phrasing before layer k. Layer k's MLP gets a gate that reads the
phrasing feature its attention brought to the last position and writes +/- s along the
yes-no unembedding direction. The localizer must find layer k for the MLP site and the
residual increment.

The others plant one more thing each (tests/test_interventions.py):
- `spread_subject`: the gate split over the MLPs of several layers (each writes s/n);
- `head_subject`: only one attention head of layer k carries the phrasing;
- `two_gate_subject`: questions of type "x" diverge at one layer, type "y" at another;
- `position_subject`: the phrasing reaches the last position through one suffix position
  only (sliding windows of 6 tokens, attention in two layers);
- `and_subject`: layer k's MLP writes a flag, layer k+1's MLP answers yes only when the flag
  AND the phrasing are present: patching the flag restores one direction, not the other.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mechlora.data import QuestionGroup, Variant
from mechlora.models import wrap
from mechlora.models.presets import tiny_gemma3_text
from tests.tiny import gemma3_text

PHRASING_A = ["is there an effusion", "is the heart enlarged", "is a line present"]
PHRASING_B = ["does this film show fluid around the lung", "would you call the cardiac shadow big",
              "can you see a tube or catheter"]
# Six questions (intervals need five groups); A ends in 'n', B in 'd' (position_subject
# reads only the last letter).
MORE_A = ["is there an effusion", "is a mass seen", "is there a pneumothorax in",
          "can you see a lesion", "is a tube in", "is there consolidation"]
MORE_B = ["is fluid around the lung found", "is the heart enlarged",
          "would you call the hilum widened", "is a nodule found", "is the line placed",
          "is the mediastinum shifted"]


class GatedMLP(nn.Module):
    """`inner(x) + s * tanh(slope * (x . w - c)) * d`: writes +s or -s along d."""

    def __init__(self, inner: nn.Module, w: torch.Tensor, c: float, d: torch.Tensor, s: float,
                 slope: float = 20.0):
        super().__init__()
        self.inner = inner
        self.register_buffer("w", w)
        self.register_buffer("d", d)
        self.c, self.s, self.slope = c, s, slope

    def forward(self, x):
        gate = torch.tanh((x @ self.w - self.c) * self.slope)
        return self.inner(x) + self.s * gate[..., None] * self.d


class FlagMLP(nn.Module):
    """`inner(x) + s * sigmoid(slope * (x . w - c)) * u`, or a forced flag (0 / 1)."""

    def __init__(self, inner, w, c, u, s, slope=20.0):
        super().__init__()
        self.inner = inner
        self.register_buffer("w", w)
        self.register_buffer("u", u)
        self.c, self.s, self.slope, self.force = c, s, slope, None

    def forward(self, x):
        flag = torch.sigmoid((x @ self.w - self.c) * self.slope)
        if self.force is not None:
            flag = torch.full_like(flag, float(self.force))
        return self.inner(x) + self.s * flag[..., None] * self.u


class AndMLP(nn.Module):
    """`inner(x) + s * (2 * sig(x . w1 - c1) * sig(x . w2 - c2) - 1) * d`."""

    def __init__(self, inner, w1, c1, w2, c2, d, s, slope=20.0):
        super().__init__()
        self.inner = inner
        for name, v in (("w1", w1), ("w2", w2), ("d", d)):
            self.register_buffer(name, v)
        self.c1, self.c2, self.s, self.slope = c1, c2, s, slope

    def forward(self, x):
        both = torch.sigmoid((x @ self.w1 - self.c1) * self.slope) \
            * torch.sigmoid((x @ self.w2 - self.c2) * self.slope)
        return self.inner(x) + self.s * (2 * both - 1)[..., None] * self.d


def planted_groups(a=PHRASING_A, b=PHRASING_B) -> list[QuestionGroup]:
    return [QuestionGroup(id=f"q{i}", variants=(Variant(x + "?"), Variant(y + "?", "lexical")),
                          answer="yes") for i, (x, y) in enumerate(zip(a, b))]


def more_groups() -> list[QuestionGroup]:
    return planted_groups(MORE_A, MORE_B)


def mlp_inputs(subject, layer: int, groups) -> dict[str, torch.Tensor]:
    """The MLP input of `layer` at the last position, per phrasing: {"a": [n, h], "b": ...}."""
    feats: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    grab = {}
    h = subject.mlp(layer).register_forward_pre_hook(lambda m, args: grab.update(x=args[0]))
    try:
        for g in groups:
            for key, v in zip("ab", g.variants):
                subject.model(**subject.encode([v.text]))
                feats[key].append(grab["x"][0, -1].clone())
    finally:
        h.remove()
    return {k: torch.stack(v) for k, v in feats.items()}


def fit(feats: dict[str, torch.Tensor], away: list[torch.Tensor] = ()) -> tuple[torch.Tensor,
                                                                                float]:
    """A unit direction separating the phrasings (orthogonal to `away`) and the midpoint:
    the mean difference when it separates them, else the least-squares direction (a dozen
    points in 32-64 dimensions are always linearly separable)."""
    basis = torch.linalg.qr(torch.stack(list(away), 1))[0] if len(away) else None

    def project(w: torch.Tensor) -> torch.Tensor:
        if basis is not None:
            w = w - basis @ (basis.T @ w)
        return w / w.norm()

    w = project(feats["a"].mean(0) - feats["b"].mean(0))
    if (feats["a"] @ w).min() <= (feats["b"] @ w).max():
        x = torch.cat([feats["a"], feats["b"]])
        y = torch.cat([torch.ones(len(feats["a"])), -torch.ones(len(feats["b"]))])
        x = torch.stack([project(row) * row.norm() for row in x - x.mean(0)])
        w = project(torch.linalg.pinv(x) @ y)
    pa, pb = feats["a"] @ w, feats["b"] @ w
    assert pa.min() > pb.max(), "the planted gate does not separate the phrasings"
    return w, float((pa.min() + pb.max()) / 2)


def answer_direction(subject) -> torch.Tensor:
    yes, no = subject.answer_token_ids(["yes", "no"])
    emb = subject.unembed.weight.detach()
    return (emb[yes] - emb[no]) / (emb[yes] - emb[no]).norm()


def _base(n_layers: int, attention: tuple[int, ...], name: str, window: int | None = None):
    if window is None:
        model, tok = tiny_gemma3_text(seed=1, n_layers=n_layers)
        subject = wrap(model, tok, name=name)
    else:  # every layer sliding, with this window
        subject = gemma3_text(window, ("sliding_attention",) * n_layers, seed=1)
        subject.name = name
    with torch.no_grad():
        for i, layer in enumerate(subject.layers):
            if i not in attention:
                layer.self_attn.o_proj.weight.zero_()
    return subject


def planted_subject(k: int, n_layers: int = 8, strength: float = 30.0, slope: float = 20.0,
                    groups=None):
    subject = _base(n_layers, (k,), f"planted-{k}")
    with torch.no_grad():
        w, c = fit(mlp_inputs(subject, k, groups or planted_groups()))
        block = subject.layers[k]
        block.mlp = GatedMLP(block.mlp, w, c, answer_direction(subject), strength, slope)
    return subject


def spread_subject(layers=(3, 4, 5), n_layers: int = 8, strength: float = 30.0):
    """Attention at the first of `layers` only; from there on each MLP writes nothing but
    its gate (strength s / len(layers)), fitted on its own input orthogonal to the answer
    direction and to the inputs' mean: every gate reads only what the attention brought,
    never another gate's output, and the RMSNorm's rescaling of the input (which another
    gate changes) cannot move it across its threshold."""
    subject = _base(n_layers, (layers[0],), "spread")
    d = answer_direction(subject)
    with torch.no_grad():
        for layer in subject.layers[layers[0]:]:  # MLPs that would pass the phrasing on
            layer.mlp.down_proj.weight.zero_()
        for k in layers:
            feats = mlp_inputs(subject, k, more_groups())
            w, c = fit(feats, away=[d, torch.cat([feats["a"], feats["b"]]).mean(0)])
            block = subject.layers[k]
            block.mlp = GatedMLP(block.mlp, w, c, d, strength / len(layers))
    return subject


def typed_groups() -> list[QuestionGroup]:
    """more_groups(): the first three of type "x", the last three of type "y"."""
    return [dataclasses.replace(g, type="x" if i < 3 else "y")
            for i, g in enumerate(more_groups())]


def two_gate_subject(kx: int = 2, ky: int = 4, n_layers: int = 6, strength: float = 30.0):
    """Type "x" questions diverge at layer kx's MLP, type "y" at layer ky's: attention at kx
    only, the MLPs from kx on write nothing but their gates, and each gate is fitted on its
    type's pairs orthogonal to the other type's pair differences (so it reads the same value
    in both wordings of the other type's questions)."""
    subject = _base(n_layers, (kx,), "two-gates")
    d = answer_direction(subject)
    groups = typed_groups()
    with torch.no_grad():
        for layer in subject.layers[kx:]:
            layer.mlp.down_proj.weight.zero_()
        for k, mine in ((kx, "x"), (ky, "y")):
            feats = {t: mlp_inputs(subject, k, [g for g in groups if g.type == t])
                     for t in ("x", "y")}
            other = feats["y" if mine == "x" else "x"]
            mean = torch.cat([f for t in feats.values() for f in t.values()]).mean(0)
            away = [d, mean, *(other["a"] - other["b"])]
            w, c = fit(feats[mine], away=away)
            block = subject.layers[k]
            block.mlp = GatedMLP(block.mlp, w, c, d, strength)
    return subject


def head_subject(k: int, head: int, n_layers: int = 6, strength: float = 30.0):
    """Only `head` of layer k writes to the residual stream (the other heads' columns of
    o_proj are zero); layer k's MLP gates on what it brings."""
    subject = _base(n_layers, (k,), f"head-{k}.{head}")
    d = subject.head_dim
    with torch.no_grad():
        o = subject.out_proj(k).weight
        keep = o[:, head * d:(head + 1) * d].clone()
        o.zero_()
        o[:, head * d:(head + 1) * d] = keep
        w, c = fit(mlp_inputs(subject, k, more_groups()))
        block = subject.layers[k]
        block.mlp = GatedMLP(block.mlp, w, c, answer_direction(subject), strength)
    return subject


def position_subject(k1: int = 1, k2: int = 3, n_layers: int = 5, strength: float = 30.0):
    """Sliding windows of 6 tokens in every layer, attention in layers k1 and k2 only. The
    question's last letter is 11 tokens from the end (then '?' and the 9-token template
    suffix). At k1 the positions up to 5 after it read it, the last position does not; at
    k2 the last position reads the 6 last positions, of which only the one 6 from the end
    (the 'm' of 'model') carries it. So the phrasing reaches the answer through that one
    position, between layers k1 and k2."""
    subject = _base(n_layers, (k1, k2), "position", window=6)
    with torch.no_grad():
        w, c = fit(mlp_inputs(subject, k2, more_groups()))
        block = subject.layers[k2]
        block.mlp = GatedMLP(block.mlp, w, c, answer_direction(subject), strength)
    return subject


def and_subject(k: int = 2, n_layers: int = 6, strength: float = 30.0):
    """Layer k's MLP raises a flag along a fixed direction u when it reads phrasing A; layer
    k+1's MLP answers yes only when the flag and phrasing A are both there. Patching the flag
    (mlp@k) from A into B supplies one condition of two: nothing changes. From B into A it
    removes one: the answer flips. Only the second direction restores."""
    subject = _base(n_layers, (k,), "and")
    groups = more_groups()
    d = answer_direction(subject)
    with torch.no_grad():
        w, c = fit(mlp_inputs(subject, k, groups), away=[d])
        u = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
        u = u - (u @ d) * d - (u @ w) * w
        flag = FlagMLP(subject.layers[k].mlp, w, c, u / u.norm(), strength)
        subject.layers[k].mlp = flag
        flag.force = 0  # the phrasing alone, without the flag
        phrasing = mlp_inputs(subject, k + 1, groups)
        flag.force = 1  # the flag alone: phrasing B with the flag raised
        raised = mlp_inputs(subject, k + 1, groups)["b"]
        flag.force = None
        lowered = phrasing["b"]
        w_flag, c_flag = fit({"a": raised, "b": lowered})
        w_phr, c_phr = fit(phrasing, away=[w_flag])
        for name, feats, (v, cut) in (("flag", {"a": raised, "b": lowered}, (w_phr, c_phr)),):
            # the phrasing test must not see the flag: B with the flag stays below its cut
            assert (feats["a"] @ v).max() < cut, name
        block = subject.layers[k + 1]
        block.mlp = AndMLP(block.mlp, w_flag, c_flag, w_phr, c_phr, d, strength)
    return subject
