"""Engine "nnsight": mechlora's patching written as nnsight 0.8 traces.

The recipient runs as rows of one traced forward; row i has site i's output replaced. nnsight
addresses modules by their path in the model's own tree, so the sites are exactly mechlora's
hook sites: the decoder layer's output (resid), the attention module's output[0] (attn) and
the MLP's output (mlp). Inside a trace, modules must be reached in execution order, so the
sites are visited layer by layer, attention before MLP before the layer's output.

`NNsight(model)` instruments the model's modules in place (they run as before outside a
trace); the wrapper is made once per model and reused.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from mechlora.models.subject import Subject
from mechlora.patching import SitePatch, margin, repeat_inputs
from mechlora.probes import Site, site_module

if TYPE_CHECKING:
    from nnsight import NNsight

ORDER = {"attn": 0, "mlp": 1, "resid": 2}

_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def traced(model: nn.Module) -> NNsight:
    """The `nnsight.NNsight` wrapper of `model` (made once per model)."""
    from nnsight import NNsight

    if model not in _TRACED:
        _TRACED[model] = NNsight(model)
    return _TRACED[model]


def envoy_path(subject: Subject, site: Site) -> str:
    """The dotted path of `site`'s module from `subject.model` (PEFT prefixes included)."""
    target = site_module(subject, site)
    for name, module in subject.model.named_modules():
        if module is target:
            return name
    raise AssertionError(f"{site} is not a module of the model")


def envoy_at(root: NNsight, path: str):
    envoy = root
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def run_nnsight(subject: Subject, inputs: dict, patches: Sequence[SitePatch], answer_ids,
                ref: int, max_rows: int = 64) -> torch.Tensor:
    model = traced(subject.model)
    paths = {p.site: envoy_path(subject, p.site) for p in patches}
    step = max_rows if max_rows > 0 else len(patches)
    margins = []
    for lo in range(0, len(patches), step):
        chunk = patches[lo:lo + step]
        groups: dict[Site, list[tuple[int, SitePatch]]] = {}
        for i, p in enumerate(chunk):
            groups.setdefault(p.site, []).append((i, p))
        order = sorted(groups, key=lambda s: (s.layer, ORDER[s.component]))
        rows = repeat_inputs(subject, inputs, len(chunk))
        with model.trace(**rows, logits_to_keep=1, use_cache=False):
            for site in order:
                group = groups[site]
                idx = torch.tensor([i for i, _ in group])[:, None]
                pos = torch.stack([p.positions for _, p in group])
                vals = torch.stack([p.values for _, p in group])
                envoy = envoy_at(model, paths[site])
                out = envoy.output
                # Attention modules return (hidden, weights); decoder layers a plain tensor.
                hidden = out[0] if isinstance(out, tuple) else out
                new = hidden.clone()
                new[idx.to(new.device), pos.to(new.device)] = vals.to(new.device, new.dtype)
                envoy.output = (new, *out[1:]) if isinstance(out, tuple) else new
            logits = model.output.logits[:, -1].save()
        margins.append(margin(logits, answer_ids, ref))
    return torch.cat(margins)
