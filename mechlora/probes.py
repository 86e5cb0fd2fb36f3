"""Record and patch per-layer activations with plain torch hooks.

Sites are (layer, component[, head]): `resid` is the decoder layer's output (the residual
stream after the layer), `attn` and `mlp` the outputs of the layer's attention and MLP
submodules (what the layer adds to the residual stream, up to a position-wise norm), and `z`
the input of the attention's output projection (`o_proj`): every query head's output,
concatenated, before the heads are mixed. `Site(l, "z", h)` is head h's slice of it
(`head_dim` columns), TransformerLens's `blocks.{l}.attn.hook_z[:, :, h]`. Only the positions
asked for are kept, so recording every site of a long prompt stays small.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from mechlora.errors import MechloraError
from mechlora.models.subject import Subject

COMPONENTS = ("resid", "attn", "mlp")
HEADS = "z"  # the output projection's input, split by head


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    component: str
    head: int | None = None  # with component "z": one head's columns (None: every head)

    def __str__(self) -> str:
        head = "" if self.head is None else f".{self.head}"
        return f"{self.component}@{self.layer}{head}"


def all_sites(n_layers: int, components: Sequence[str] = COMPONENTS) -> list[Site]:
    for c in components:
        if c not in COMPONENTS:
            raise MechloraError(f"unknown site component '{c}'; use {', '.join(COMPONENTS)}")
    return [Site(layer, c) for c in components for layer in range(n_layers)]


def head_sites(subject: Subject) -> list[Site]:
    """Every attention head of every layer, layer-major: [Site(l, "z", h)]."""
    subject.check_heads()
    return [Site(layer, HEADS, h) for layer in range(subject.n_layers)
            for h in range(subject.n_heads)]


def site_module(subject: Subject, site: Site) -> nn.Module:
    if site.component == "resid":
        return subject.layers[site.layer]
    if site.component == HEADS:
        return subject.out_proj(site.layer)
    return subject.attn(site.layer) if site.component == "attn" else subject.mlp(site.layer)


def columns(subject: Subject, site: Site) -> slice:
    """The hidden columns a site covers: one head's `head_dim` columns of `z`, else all."""
    if site.head is None:
        return slice(None)
    d = subject.head_dim
    return slice(site.head * d, (site.head + 1) * d)


def _tensor(output):
    # transformers 5.x decoder layers return a tensor, attention modules a tuple; never take
    # output[0] of a tensor (that would be batch row 0).
    return output[0] if isinstance(output, tuple) else output


def _with_tensor(output, new: torch.Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _hook(module: nn.Module, site: Site, edit):
    """Register `edit(tensor) -> tensor | None` on the site's tensor: the module's output,
    or for `z` its first input (a pre-hook, so the projection sees the edit)."""
    if site.component == HEADS:
        def pre(module, args):
            new = edit(args[0])
            return None if new is None else (new, *args[1:])
        return module.register_forward_pre_hook(pre)

    def post(module, args, output):
        new = edit(_tensor(output))
        return None if new is None else _with_tensor(output, new)
    return module.register_forward_hook(post)


@contextmanager
def _hooks(subject: Subject, edits: Sequence[tuple[Site, object]]) -> Iterator[None]:
    handles = [_hook(site_module(subject, site), site, fn) for site, fn in edits]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record(subject: Subject, sites: Sequence[Site], positions: torch.Tensor
           ) -> Iterator[dict[Site, torch.Tensor]]:
    """Record `sites` at `positions` ([batch, P] indices) during the forwards run inside.

    Yields a dict filled during the forward: site -> tensor [batch, P, width] (detached;
    width is the hidden size, `n_heads * head_dim` for `z`, `head_dim` for one head).
    """
    store: dict[Site, torch.Tensor] = {}
    rows = torch.arange(positions.shape[0], device=positions.device)[:, None]

    def make(site: Site):
        cols = columns(subject, site)

        def keep(t: torch.Tensor) -> None:
            store[site] = t[rows, positions][..., cols].detach()
        return keep

    with _hooks(subject, [(s, make(s)) for s in sites]):
        yield store


@dataclass
class Patch:
    """Write `values` [P, width] at `positions` [P] of batch row `row`, at `site`."""

    row: int
    site: Site
    positions: torch.Tensor
    values: torch.Tensor


@contextmanager
def patch(subject: Subject, patches: Sequence[Patch]) -> Iterator[None]:
    """Overwrite activations during the forwards run inside. A row may carry patches at
    several sites (a multi-site intervention); patches of one site are written together."""
    groups: dict[tuple[Site, int], list[Patch]] = {}
    for p in patches:
        groups.setdefault((p.site, len(p.positions)), []).append(p)

    def make(site: Site, group: list[Patch]):
        rows = torch.tensor([p.row for p in group])[:, None]
        pos = torch.stack([p.positions for p in group])
        vals = torch.stack([p.values for p in group])
        cols = columns(subject, site)

        def write(t: torch.Tensor) -> torch.Tensor:
            out = t.clone()
            out[rows.to(out.device), pos.to(out.device), cols] = vals.to(out.device, out.dtype)
            return out
        return write

    with _hooks(subject, [(site, make(site, g)) for (site, _), g in groups.items()]):
        yield
