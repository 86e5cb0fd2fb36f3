"""Record and patch per-layer activations with plain torch hooks.

Sites are (layer, component): `resid` is the decoder layer's output (the residual stream after
the layer), `attn` and `mlp` the outputs of the layer's attention and MLP submodules (what the
layer adds to the residual stream, up to a position-wise norm). Only the positions asked for
are kept, so recording every site of a long prompt stays small.
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


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    component: str

    def __str__(self) -> str:
        return f"{self.component}@{self.layer}"


def all_sites(n_layers: int, components: Sequence[str] = COMPONENTS) -> list[Site]:
    for c in components:
        if c not in COMPONENTS:
            raise MechloraError(f"unknown site component '{c}'; use {', '.join(COMPONENTS)}")
    return [Site(layer, c) for c in components for layer in range(n_layers)]


def site_module(subject: Subject, site: Site) -> nn.Module:
    if site.component == "resid":
        return subject.layers[site.layer]
    return subject.attn(site.layer) if site.component == "attn" else subject.mlp(site.layer)


def _tensor(output):
    # transformers 5.x decoder layers return a tensor, attention modules a tuple; never take
    # output[0] of a tensor (that would be batch row 0).
    return output[0] if isinstance(output, tuple) else output


def _with_tensor(output, new: torch.Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


@contextmanager
def _hooks(pairs: Sequence[tuple[nn.Module, object]]) -> Iterator[None]:
    handles = [module.register_forward_hook(fn) for module, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record(subject: Subject, sites: Sequence[Site], positions: torch.Tensor
           ) -> Iterator[dict[Site, torch.Tensor]]:
    """Record `sites` at `positions` ([batch, P] indices) during the forwards run inside.

    Yields a dict filled during the forward: site -> tensor [batch, P, hidden] (detached).
    """
    store: dict[Site, torch.Tensor] = {}
    rows = torch.arange(positions.shape[0], device=positions.device)[:, None]

    def make(site: Site):
        def hook(module, args, output):
            store[site] = _tensor(output)[rows, positions].detach()
        return hook

    with _hooks([(site_module(subject, s), make(s)) for s in sites]):
        yield store


@dataclass
class Patch:
    """Write `values` [P, hidden] at `positions` [P] of batch row `row`, at `site`."""

    row: int
    site: Site
    positions: torch.Tensor
    values: torch.Tensor


@contextmanager
def patch(subject: Subject, patches: Sequence[Patch]) -> Iterator[None]:
    """Overwrite activations during the forwards run inside (each patch on its own row)."""
    by_site: dict[Site, list[Patch]] = {}
    for p in patches:
        by_site.setdefault(p.site, []).append(p)

    def make(group: list[Patch]):
        rows = torch.tensor([p.row for p in group])[:, None]
        pos = torch.stack([p.positions for p in group])
        vals = torch.stack([p.values for p in group])

        def hook(module, args, output):
            out = _tensor(output).clone()
            out[rows.to(out.device), pos.to(out.device)] = vals.to(out.device, out.dtype)
            return _with_tensor(output, out)
        return hook

    with _hooks([(site_module(subject, s), make(g)) for s, g in by_site.items()]):
        yield
