"""TransformerLens 4.x: boot a `TransformerBridge` safely, localize on one, and engine "tlens".

The "tlens" engine patches through the bridge's hook points, by name:

- resid: `blocks.{l}.hook_out`, the decoder layer's output (= HF `hidden_states[l+1]`, except
  the last layer, where HF applies the final norm)
- attn: `blocks.{l}.attn.hook_out`, the attention module's output before Gemma's
  post-attention norm (TL's `blocks.{l}.hook_attn_out` is after that norm)
- mlp: `blocks.{l}.mlp.hook_out`, the MLP's output before the post-feedforward norm
- z (heads): `blocks.{l}.attn.hook_z`, the output projection's input as
  [batch, pos, n_heads, head_dim]; head h is `[:, :, h]`

These equal mechlora's hook sites exactly (tests/test_bridges.py checks each one).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mechlora.bridges import is_bridge
from mechlora.errors import MechloraError
from mechlora.models.subject import Subject
from mechlora.patching import Row, SitePatch, as_row, margin, prompt_chunks, repeat_inputs
from mechlora.probes import HEADS, Site

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

HOOKS = {"resid": "blocks.{}.hook_out", "attn": "blocks.{}.attn.hook_out",
         "mlp": "blocks.{}.mlp.hook_out", HEADS: "blocks.{}.attn.hook_z"}

# Bridges booted for plain subjects by the "tlens" engine: model -> (weights version, subject).
_BOOTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hook_name(site: Site) -> str:
    """The TransformerLens hook point that carries mechlora's `site`."""
    return HOOKS[site.component].format(site.layer)


@contextmanager
def _no_torchvision_install() -> Iterator[None]:
    # Booting a multimodal model makes TL pip-install torchvision when its processor fails to
    # load; next to a CPU torch that wheel is a CUDA build whose import error breaks
    # transformers' Gemma 3 import for good.
    from transformer_lens.model_bridge.sources.transformers import helpers

    saved = helpers._ensure_torchvision
    helpers._ensure_torchvision = lambda: False
    try:
        yield
    finally:
        helpers._ensure_torchvision = saved


def boot_bridge(model: nn.Module | Subject, processor: Any = None) -> TransformerBridge:
    """A `TransformerBridge` over a deep copy of `model`; your model is left untouched.

    `processor` is the model's tokenizer or processor (taken from a `Subject`). Booting
    rewrites the model's modules in place, needs `config.architectures` and a tokenizer
    loaded from a folder, and for a multimodal model may try to pip-install torchvision:
    this deep-copies first, fills in the architecture, saves the processor to a temporary
    folder (removed with the bridge) and blocks the install.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    if isinstance(model, Subject):
        processor = processor if processor is not None else model.processor
        model = model.model
    if processor is None:
        raise MechloraError("boot_bridge needs the model's tokenizer or processor: "
                            "boot_bridge(model, processor)")
    if callable(getattr(model, "get_base_model", None)):
        raise MechloraError("TransformerLens cannot bridge a PEFT model; merge the adapter "
                            "first (model = model.merge_and_unload()) or use another engine")
    with torch.inference_mode(False):  # a copy made in a sweep must not be inference tensors
        model = copy.deepcopy(model)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    folder = tempfile.mkdtemp(prefix="mechlora-bridge-")
    processor.save_pretrained(folder)
    model.config.save_pretrained(folder)
    param = next(model.parameters())
    try:
        # TL re-reads the tokenizer from its `name_or_path`: it must come from a folder.
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with _no_torchvision_install():
            bridge = TransformerBridge.boot_transformers(
                folder, hf_model=model, tokenizer=tokenizer, dtype=param.dtype,
                device=param.device)
    except Exception as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise MechloraError(f"TransformerLens cannot bridge {type(model).__name__}: {e}; use "
                            "engine full, batched, cached or nnsight instead") from e
    weakref.finalize(bridge, shutil.rmtree, folder, True)
    return bridge


def subject_from_bridge(bridge: TransformerBridge, processor: Any = None, *,
                        name: str | None = None) -> Subject:
    """A mechlora `Subject` for a `TransformerBridge` (its HF model, with the bridge attached).

    mechlora's hooks engines run on the bridged model unchanged; engine "tlens" uses the
    attached bridge's hook points. `processor` defaults to the bridge's processor (multimodal)
    or tokenizer.
    """
    if not is_bridge(bridge):
        raise MechloraError(f"expected a TransformerLens TransformerBridge, got "
                            f"{type(bridge).__name__}; use mechlora.wrap(model, processor)")
    if processor is None:
        processor = getattr(bridge, "processor", None) or bridge.tokenizer
    model = bridge.original_model
    subject = Subject(model, processor,
                      name=name or getattr(model.config, "_name_or_path", "") or "bridge")
    subject.bridge = bridge  # read by run_tlens
    return subject


def _weights_version(model: nn.Module) -> tuple[int, ...]:
    # In-place updates (optimizer steps, load_state_dict) bump a tensor's version: a copy
    # booted before them would silently patch a stale model.
    return tuple(p._version for p in model.parameters())


def bridged_subject(subject: Subject) -> Subject:
    """`subject` if it came from a bridge, else a bridged copy (booted once, re-booted when
    the weights change in place)."""
    if getattr(subject, "bridge", None) is not None:
        return subject
    version = _weights_version(subject.model)
    cached = _BOOTED.get(subject.model)
    if cached is None or cached[0] != version:
        size = sum(p.numel() * p.element_size() for p in subject.model.parameters())
        warnings.warn(f"engine tlens: TransformerLens rewrites a model in place, so mechlora "
                      f"boots its bridge on a deep copy of {subject.name} ({size / 1e9:.2f} GB "
                      "more memory); pass a TransformerBridge you booted to localize to avoid "
                      "the copy, or use engine cached/batched/nnsight", stacklevel=3)
        bridge = boot_bridge(subject.model, subject.processor)
        cached = (version, subject_from_bridge(bridge, subject.processor, name=subject.name))
        _BOOTED[subject.model] = cached
    return cached[1]


def _writer(groups: list[list[tuple[int, SitePatch]]]):
    """One hook writing every group of patches of one hook point (groups of one site and
    number of positions; for hook_z, one group per head)."""
    def hook(act: torch.Tensor, hook) -> torch.Tensor:
        act = act.clone()
        for group in groups:
            rows = torch.tensor([i for i, _ in group], device=act.device)[:, None]
            pos = torch.stack([p.positions for _, p in group]).to(act.device)
            vals = torch.stack([p.values for _, p in group]).to(act.device, act.dtype)
            site = group[0][1].site
            if site.component == HEADS:  # act is [batch, pos, n_heads, head_dim]
                heads = act.shape[2]
                if site.head is None:
                    act[rows, pos] = vals.unflatten(-1, (heads, -1))
                else:
                    act[rows, pos, site.head] = vals
            else:
                act[rows, pos] = vals
        return act
    return hook


def run_tlens(subject: Subject, inputs: dict, patches: Sequence[Row], answer_ids,
              ref: int, max_rows: int | None = None, max_bytes: int | None = None
              ) -> torch.Tensor:
    """Engine "tlens": the recipient as rows of `bridge.run_with_hooks`, row i patched at
    site i through its TransformerLens hook point. On a plain model this boots a bridge over
    a deep copy (warned, with its size): TransformerLens rewrites models in place."""
    bs = bridged_subject(subject)
    margins = []
    for lo, hi in prompt_chunks(bs, inputs, len(patches), max_rows, max_bytes):
        chunk = patches[lo:hi]
        rows = repeat_inputs(bs, inputs, len(chunk))
        by_name: dict[str, dict[tuple, list[tuple[int, SitePatch]]]] = {}
        for i, row in enumerate(chunk):
            for p in as_row(row):
                key = (p.site, len(p.positions))
                by_name.setdefault(hook_name(p.site), {}).setdefault(key, []).append((i, p))
        hooks = [(name, _writer(list(groups.values()))) for name, groups in by_name.items()]
        input_ids = rows.pop("input_ids")
        logits = bs.bridge.run_with_hooks(input_ids, fwd_hooks=hooks, logits_to_keep=1,
                                          use_cache=False, **rows)
        margins.append(margin(logits[:, -1], answer_ids, ref))
    return torch.cat(margins)
