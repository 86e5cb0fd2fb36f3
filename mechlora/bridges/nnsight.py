"""Engine "nnsight": mechlora's patching written as nnsight 0.8 traces.

The recipient runs as rows of one traced forward; row i has its sites' values replaced.
nnsight addresses modules by their path in the model's own tree, so the sites are exactly
mechlora's hook sites: the decoder layer's output (resid), the attention module's output[0]
(attn), the MLP's output (mlp), and the output projection's input (`o_proj.input`, z: every
head, or one head's columns). Inside a trace, modules must be reached in execution order, so
the sites are visited layer by layer: o_proj's input, attention, MLP, the layer's output.

`NNsight(model)` instruments the model in place: it puts a controller in every module's
instance `forward` and its state in `module.__nnsight__`, and leaves them there. The engine
wraps the model for one call only (`traced`) and then puts every module back as it was, so
your model leaves a sweep exactly as it came (tests/test_bridges.py checks modules, hooks and
forwards).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from mechlora.models.subject import Subject
from mechlora.patching import Row, SitePatch, as_row, margin, prompt_chunks, repeat_inputs
from mechlora.probes import HEADS, Site, columns, site_module

if TYPE_CHECKING:
    from nnsight import NNsight

ORDER = {HEADS: 0, "attn": 1, "mlp": 2, "resid": 3}

# What nnsight writes into a module's __dict__ (nnsight.intervention.source: the controller
# forward and STATE); restored or removed after each call.
_INSTRUMENTED = ("forward", "__nnsight__")
_ABSENT = object()


@contextmanager
def traced(model: nn.Module) -> Iterator[NNsight]:
    """`nnsight.NNsight(model)` for the block inside; afterwards every module's instance
    attributes that nnsight sets are put back as they were (removed where it added them)."""
    from nnsight import NNsight

    saved = [(module, {name: module.__dict__.get(name, _ABSENT) for name in _INSTRUMENTED})
             for module in model.modules()]
    try:
        yield NNsight(model)
    finally:
        for module, attrs in saved:
            for name, value in attrs.items():
                if value is _ABSENT:
                    module.__dict__.pop(name, None)
                else:
                    module.__dict__[name] = value


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


def run_nnsight(subject: Subject, inputs: dict, patches: Sequence[Row], answer_ids,
                ref: int, max_rows: int | None = None, max_bytes: int | None = None
                ) -> torch.Tensor:
    paths = {p.site: envoy_path(subject, p.site) for row in patches for p in as_row(row)}
    margins = []
    with traced(subject.model) as model:
        for lo, hi in prompt_chunks(subject, inputs, len(patches), max_rows, max_bytes):
            margins.append(_step(model, subject, inputs, patches[lo:hi], paths, answer_ids, ref))
    return torch.cat(margins)


def _step(model: NNsight, subject: Subject, inputs: dict, chunk: Sequence[Row],
          paths: dict, answer_ids, ref: int) -> torch.Tensor:
    """One trace: the recipient as rows, row i patched at `chunk[i]`'s sites."""
    groups: dict[tuple[str, Site, int], list[tuple[int, SitePatch]]] = {}
    for i, row in enumerate(chunk):
        for p in as_row(row):
            groups.setdefault((paths[p.site], p.site, len(p.positions)), []).append((i, p))
    # Modules must be reached in execution order; the heads of one layer share one module.
    by_module: dict[str, list] = {}
    for key in sorted(groups, key=lambda k: (k[1].layer, ORDER[k[1].component])):
        by_module.setdefault(key[0], []).append(key)
    rows = repeat_inputs(subject, inputs, len(chunk))
    with model.trace(**rows, logits_to_keep=1, use_cache=False):
        for path, keys in by_module.items():
            envoy = envoy_at(model, path)
            z = keys[0][1].component == HEADS  # the output projection's input
            out = envoy.input if z else envoy.output
            # Attention modules return (hidden, weights); decoder layers a plain tensor.
            new = (out[0] if isinstance(out, tuple) else out).clone()
            for key in keys:
                group = groups[key]
                idx = torch.tensor([i for i, _ in group])[:, None].to(new.device)
                pos = torch.stack([p.positions for _, p in group]).to(new.device)
                vals = torch.stack([p.values for _, p in group]).to(new.device, new.dtype)
                new[idx, pos, columns(subject, key[1])] = vals
            if z:
                envoy.input = new
            else:
                envoy.output = (new, *out[1:]) if isinstance(out, tuple) else new
        logits = model.output.logits[:, -1].save()
    return margin(logits, answer_ids, ref)
