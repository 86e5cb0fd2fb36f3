"""Site names: mechlora's components, and the TransformerLens hook names users already know.

- `blocks.{l}.hook_resid_post` = `Site(l, "resid")`: decoder layer l's output
- `blocks.{l}.hook_attn_out` = `Site(l, "attn")`: `self_attn`'s output (before Gemma's
  `post_attention_layernorm`)
- `blocks.{l}.hook_mlp_out` = `Site(l, "mlp")`: `mlp`'s output (before Gemma's
  `post_feedforward_layernorm`)
- `blocks.{l}.attn.hook_z` = `Site(l, "z")`: `o_proj`'s input, every query head; head h
  (`hook_z[:, :, h]`) = `Site(l, "z", h)`, columns h*head_dim .. (h+1)*head_dim

TransformerLens places `hook_attn_out` and `hook_mlp_out` of Gemma 2/3 *after* the
post-attention / post-feedforward RMSNorms (its bridge aliases them to `ln1_post.hook_out`
and `ln2_post.hook_out`); mechlora hooks the submodules' own outputs, before the norms. Each
norm acts on one position's vector alone, so writing a's value before the norm gives exactly
a's value after it: restoration is the same at either point (tests/test_heads.py checks it
against a patch written at the norm's output).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mechlora.errors import MechloraError
from mechlora.probes import COMPONENTS, HEADS, Site

ALIASES = {
    "resid": "resid", "hook_resid_post": "resid", "resid_post": "resid",
    "attn": "attn", "hook_attn_out": "attn", "attn_out": "attn",
    "mlp": "mlp", "hook_mlp_out": "mlp", "mlp_out": "mlp",
    "z": HEADS, "head": HEADS, "heads": HEADS, "hook_z": HEADS, "attn.hook_z": HEADS,
}
TL_NAMES = {"resid": "blocks.{}.hook_resid_post", "attn": "blocks.{}.hook_attn_out",
            "mlp": "blocks.{}.hook_mlp_out", HEADS: "blocks.{}.attn.hook_z"}
_BLOCK = re.compile(r"blocks\.(\{l\}|\*|\d+)\.(.+)")
_MECHLORA = re.compile(r"(\w+)@(\d+)(?:\.(\d+))?")
_HEAD_INDEX = re.compile(r"(.+?)\[(\d+)\]")
HELP = ("resid, attn, mlp, z (every attention head), or TransformerLens names: "
        "hook_resid_post, hook_attn_out, hook_mlp_out, attn.hook_z (optionally as "
        "blocks.{l}.NAME)")


def component(name: str) -> str:
    """The mechlora component a name stands for: 'attn', 'hook_attn_out',
    'blocks.{l}.hook_attn_out' and 'blocks.*.hook_attn_out' are all 'attn'."""
    text = name.strip()
    block = _BLOCK.fullmatch(text)
    if block and not block.group(1).isdigit():
        text = block.group(2)
    if text not in ALIASES:
        raise MechloraError(f"unknown site '{name}'; use {HELP}")
    return ALIASES[text]


def components(names: Sequence[str] | str) -> tuple[list[str], bool]:
    """Per-layer components (resid/attn/mlp, in the order given) and whether the per-head
    sweep (`z`) was asked for."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    found = [component(n) for n in names]
    return list(dict.fromkeys(c for c in found if c in COMPONENTS)), HEADS in found


def parse_site(name: str) -> Site:
    """One site by name: 'attn@3', 'z@3.1', 'blocks.3.hook_attn_out', 'blocks.3.attn.hook_z'
    (every head), 'blocks.3.attn.hook_z[1]' (head 1)."""
    text = name.strip()
    own = _MECHLORA.fullmatch(text)
    if own:
        comp, layer, head = own.groups()
        return _site(name, int(layer), component(comp), head)
    head = None
    indexed = _HEAD_INDEX.fullmatch(text)
    if indexed:
        text, head = indexed.groups()
    block = _BLOCK.fullmatch(text)
    if not block or not block.group(1).isdigit():
        raise MechloraError(f"'{name}' names no single site; write e.g. attn@3, z@3.1, "
                            "blocks.3.hook_attn_out or blocks.3.attn.hook_z[1]")
    return _site(name, int(block.group(1)), component(block.group(2)), head)


def _site(name: str, layer: int, comp: str, head: str | None) -> Site:
    if head is not None and comp != HEADS:
        raise MechloraError(f"'{name}': only z (attn.hook_z) sites have heads")
    return Site(layer, comp, None if head is None else int(head))


def tl_name(site: Site) -> str:
    """The TransformerLens hook name of a mechlora site (head index as `[h]`)."""
    name = TL_NAMES[site.component].format(site.layer)
    return name if site.head is None else f"{name}[{site.head}]"
