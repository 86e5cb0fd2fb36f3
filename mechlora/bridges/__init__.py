"""Engines and adapters that run mechlora's patching through nnsight and TransformerLens.

Both libraries are heavy imports (seconds) and nnsight patches `object` and `Tensor.backward`
when imported, so nothing here imports them until an engine or helper is used:

- `mechlora.bridges.nnsight.run_nnsight`: engine "nnsight", patches inside nnsight traces.
- `mechlora.bridges.tlens.run_tlens`: engine "tlens", patches through TransformerLens hook points.
- `mechlora.bridges.tlens.boot_bridge` / `subject_from_bridge`: a `TransformerBridge` for a
  model, and a mechlora `Subject` for a bridge.
"""

from __future__ import annotations


def is_bridge(obj: object) -> bool:
    """Whether `obj` is a TransformerLens `TransformerBridge`, without importing TransformerLens."""
    return any(cls.__name__ == "TransformerBridge" and cls.__module__.startswith("transformer_lens")
               for cls in type(obj).__mro__)


def as_subject(obj: object) -> object:
    """A `TransformerBridge` as a mechlora `Subject`; anything else unchanged."""
    if is_bridge(obj):
        from mechlora.bridges.tlens import subject_from_bridge

        return subject_from_bridge(obj)
    return obj
