"""The sweep behind `localize`: which rows each recipient runs, and what they become.

Per question, each prompt runs once clean (recording every site any row needs). Then each
recipient b runs one engine call over all of its rows:

- for each donor a of a kept pair (a, b): one row per per-layer site (components x layers),
  one per attention head (`heads`), one per site and single aligned position
  (`per_position`), and two per layer spec S: all of S's attn and mlp outputs at once
  (sufficiency, denoising), and all of those outside S at once (the complement: what the
  rest restores without S; none for an S of every layer);
- for each kept pair (b, x) it is the donor of, one row per layer spec with x's values
  (necessity, noising: b's own answer with the spec taken from x).

With the cached engine, rows are grouped by the first position they patch, and each group
continues the recipient's clean-run cache cut at that position (a per-position row at the
last position recomputes one token, not the whole suffix).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from mechlora import memory
from mechlora.data import Pair, load_image
from mechlora.effects import SpecEffect, direction_of
from mechlora.localize import CleanRun, check_positions, clean_run, divergence, screen
from mechlora.models.choices import ChoiceTokens
from mechlora.models.subject import Subject
from mechlora.patching import RUNNERS, Row, SitePatch, choose_engine, patch_start
from mechlora.probes import HEADS, Site, all_sites, columns
from mechlora.result import LocalizationResult
from mechlora.spec import LayerSpec

SPEC_COMPONENTS = ("attn", "mlp")


@dataclass
class Plan:
    """What each recipient patches, beyond its clean run."""

    sites: list[Site]                       # per-layer sweep, component-major
    heads: list[Site] = field(default_factory=list)          # Site(l, "z", h), layer-major
    position_sites: list[Site] = field(default_factory=list)  # each at one position
    specs: list[tuple[LayerSpec, str]] = field(default_factory=list)  # (spec, label)

    def record(self, n_layers: int) -> list[Site]:
        need = list(self.sites) + list(self.position_sites)
        need += [Site(layer, HEADS) for layer in range(n_layers)] if self.heads else []
        need += [s for spec, _ in self.specs for s in spec_sites(spec) + complement_sites(spec)]
        return list(dict.fromkeys(need))

    def complemented(self) -> list[int]:
        """The indices of the specs whose complement is not empty (they get a row)."""
        return [i for i, (spec, _) in enumerate(self.specs) if complement_sites(spec)]


def spec_sites(spec: LayerSpec) -> list[Site]:
    return [Site(layer, c) for layer in spec.layers for c in SPEC_COMPONENTS]


def complement_sites(spec: LayerSpec) -> list[Site]:
    """The attn and mlp outputs of every layer outside `spec`."""
    inside = set(spec.layers)
    return [Site(layer, c) for layer in range(spec.n_layers) if layer not in inside
            for c in SPEC_COMPONENTS]


class Rows:
    """A recipient's rows, in blocks that map back to (pair, what)."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.blocks: dict[tuple, slice] = {}

    def add(self, key: tuple, rows: Sequence[Row]) -> None:
        self.blocks[key] = slice(len(self.rows), len(self.rows) + len(rows))
        self.rows.extend(rows)


def donor_rows(subject: Subject, plan: Plan, a: CleanRun, b: CleanRun) -> dict[str, list[Row]]:
    """The rows patching donor `a` into recipient `b`, by block."""
    pos = b.positions
    out: dict[str, list[Row]] = {"sites": [SitePatch(s, pos, a.values[s]) for s in plan.sites]}
    if plan.heads:
        out["heads"] = [SitePatch(s, pos, a.values[Site(s.layer, HEADS)][:, columns(subject, s)])
                        for s in plan.heads]
    if plan.position_sites:
        out["positions"] = [SitePatch(s, pos[j:j + 1], a.values[s][j:j + 1])
                            for s in plan.position_sites for j in range(len(pos))]
    out["specs"] = [spec_row(spec, a, b) for spec, _ in plan.specs]
    out["complement"] = [spec_row(plan.specs[i][0], a, b, complement_sites)
                         for i in plan.complemented()]
    return out


def spec_row(spec: LayerSpec, donor: CleanRun, recipient: CleanRun,
             sites=spec_sites) -> tuple[SitePatch, ...]:
    return tuple(SitePatch(s, recipient.positions, donor.values[s]) for s in sites(spec))


def run_rows(subject: Subject, engine: str, run: CleanRun, rows: Sequence[Row], ids, ref: int,
             max_rows: int | None, max_bytes: int | None) -> tuple[np.ndarray, str]:
    """Every row's margin on recipient `run`, and the engine that ran them."""
    name = choose_engine(engine, subject, run.inputs, rows)
    if name != "cached":
        out = RUNNERS[name](subject, run.inputs, rows, ids, ref, max_rows=max_rows,
                            max_bytes=max_bytes)
        return out.cpu().numpy(), name
    first = patch_start(rows)
    starts: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        start = patch_start([row])
        starts.setdefault(start if start in run.prefixes else first, []).append(i)
    margins = np.empty(len(rows))
    for start, idx in starts.items():
        margins[idx] = RUNNERS["cached"](
            subject, run.inputs, [rows[i] for i in idx], ids, ref, max_rows=max_rows,
            max_bytes=max_bytes, prefix=run.prefixes.get(start)).cpu().numpy()
    return margins, name


def phenomenon_of(pair: Pair) -> str | None:
    """The paraphrase phenomenon of a pair: the one of its paraphrase (variant 0 is the
    original); between two paraphrases, both joined by '+' (one when they agree)."""
    found = [pair.group.variants[v].phenomenon for v in (pair.a, pair.b) if v != 0]
    found = sorted({p for p in found if p})
    return "+".join(found) or None


def position_labels(subject: Subject, run: CleanRun, kind: str) -> list[str]:
    ids = run.inputs["input_ids"][0].cpu()
    length, pos = len(ids), run.positions.cpu()
    if kind == "image":
        return [f"image {i}" for i in range(len(pos))]
    return [f"{int(p) - length} {subject.tokenizer.decode([int(ids[p])])!r}" for p in pos]


@dataclass
class Collected:
    """The kept pairs' numbers, appended pair by pair."""

    plan: Plan
    components: Sequence[str]
    n_layers: int
    lists: dict[str, list] = field(default_factory=lambda: {
        k: [] for k in ("pair", "group", "type", "phen", "dir", "ma", "mb", "gap", "heads",
                        "suff", "nec", "comp")})
    restoration: dict[str, list] = field(default_factory=dict)
    by_position: dict[str, list] = field(default_factory=dict)
    divergence: dict[str, list] = field(default_factory=dict)

    def add(self, pair: Pair, a: CleanRun, b: CleanRun, delta: float,
            margins: dict[tuple, np.ndarray], div: dict[str, np.ndarray]) -> None:
        def r(what: str) -> np.ndarray:
            return (margins[(pair.id, what)] - b.margin) / delta

        L = self.n_layers
        for c, row in zip(self.components, r("sites").reshape(len(self.components), L)):
            self.restoration.setdefault(c, []).append(row)
        if self.plan.heads:
            self.lists["heads"].append(r("heads").reshape(L, -1))
        if self.plan.position_sites:
            kinds = list(dict.fromkeys(s.component for s in self.plan.position_sites))
            for c, row in zip(kinds, r("positions").reshape(len(kinds), L, -1)):
                self.by_position.setdefault(c, []).append(row)
        if self.plan.specs:
            self.lists["suff"].append(r("specs"))
            self.lists["nec"].append((a.margin - margins[(pair.id, "necessity")]) / delta)
            comp = np.zeros(len(self.plan.specs))  # an empty complement patches nothing
            comp[self.plan.complemented()] = r("complement")
            self.lists["comp"].append(comp)
        for k, v in div.items():
            self.divergence.setdefault(k, []).append(v)
        g = pair.group
        for k, v in (("pair", pair.id), ("group", g.id), ("type", g.type),
                     ("phen", phenomenon_of(pair)), ("dir", direction_of(pair.a, pair.b)),
                     ("ma", a.margin), ("mb", b.margin), ("gap", delta)):
            self.lists[k].append(v)

    def stack(self, values: list, *shape: int) -> np.ndarray:
        return np.stack(values) if values else np.zeros((0, *shape))

    def specs(self, n_boot: int) -> list[SpecEffect]:
        out, n = self.lists, len(self.plan.specs)
        suff, nec = self.stack(out["suff"], n), self.stack(out["nec"], n)
        comp = self.stack(out["comp"], n)
        return [SpecEffect(str(spec), spec.layers, label, list(out["pair"]), list(out["group"]),
                           list(out["dir"]), suff[:, i].copy(), nec[:, i].copy(),
                           SPEC_COMPONENTS, n_boot, complement=comp[:, i].copy())
                for i, (spec, label) in enumerate(self.plan.specs)]


def sweep(subject: Subject, pairs: Sequence[Pair], plan: Plan, *, components: Sequence[str],
          positions: str, engine: str, only_flips: bool, min_delta: float,
          max_rows: int | None, max_bytes: int | None, n_boot: int, progress: bool,
          logit_lens: bool, merge_variants: bool = False,
          keep: dict[str, float] | None = None) -> LocalizationResult:
    """The sweep over `pairs` in this process. `keep` (pair id -> denominator) replaces the
    screening: exactly those pairs, each normalised by its given gap (a baseline's)."""
    from mechlora.localize import parse_positions

    L = subject.n_layers
    record_sites = plan.record(L)
    got = Collected(plan, components, L)
    keep_prefix = engine == "cached" or (engine == "auto" and subject.family.cached)
    each = bool(plan.position_sites) and keep_prefix
    excluded, used_engines, labels = [], set(), []
    answer_ids: dict[tuple, ChoiceTokens] = {}
    runs: dict[tuple[str, int], CleanRun] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=len(pairs), desc="localize", unit="pair", disable=not progress)
    with torch.inference_mode():
        for _, chunk in itertools.groupby(pairs, key=lambda p: p.group.id):
            chunk = list(chunk)
            g = chunk[0].group
            if g.choices not in answer_ids:
                answer_ids[g.choices] = subject.choice_tokens(
                    g.choices, merge=merge_variants, where=(g.source, g.line))
            ids = answer_ids[g.choices]
            image = load_image(g.image) if (g.image is not None and subject.is_vlm) else None
            runs = {k: r for k, r in runs.items() if k[0] == g.id}  # bound the memory
            for v in dict.fromkeys(v for pair in chunk for v in (pair.a, pair.b)):
                if (g.id, v) not in runs:
                    runs[(g.id, v)] = clean_run(subject, g.variants[v].text, image,
                                                g.answer_index, ids, record_sites, positions,
                                                keep_prefix=keep_prefix, each_position=each)
            kept: list[tuple[Pair, float]] = []
            for pair in chunk:
                a, b = runs[(g.id, pair.a)], runs[(g.id, pair.b)]
                if keep is None:
                    delta = screen(pair, a, b, positions=positions, only_flips=only_flips,
                                   min_delta=min_delta, excluded=excluded, subject=subject)
                elif pair.id in keep:
                    check_positions(subject, pair, a, b, positions)
                    delta = keep[pair.id]
                else:
                    delta = None
                if delta is not None:
                    kept.append((pair, delta))
            margins: dict[tuple, np.ndarray] = {}
            for v in dict.fromkeys(v for pair, _ in kept
                                   for v in ((pair.b, pair.a) if plan.specs else (pair.b,))):
                b, rows = runs[(g.id, v)], Rows()
                for pair, _ in kept:
                    if pair.b == v:
                        for what, block in donor_rows(subject, plan, runs[(g.id, pair.a)],
                                                      b).items():
                            rows.add((pair.id, what), block)
                    if pair.a == v and plan.specs:  # noising: v's answer with x's spec
                        x = runs[(g.id, pair.b)]
                        rows.add((pair.id, "necessity"),
                                 [spec_row(spec, x, b) for spec, _ in plan.specs])
                patched, name = run_rows(subject, engine, b, rows.rows, ids, g.answer_index,
                                         max_rows, max_bytes)
                used_engines.add(name)
                margins.update({key: patched[s] for key, s in rows.blocks.items()})
            for pair, delta in kept:
                a, b = runs[(g.id, pair.a)], runs[(g.id, pair.b)]
                if not labels and plan.position_sites:
                    labels = position_labels(subject, b, parse_positions(positions)[0])
                got.add(pair, a, b, delta, margins,
                        divergence(subject, a, b, logit_lens=logit_lens))
            bar.update(len(chunk))
            bar.set_postfix(kept=len(got.lists["pair"]), excluded=len(excluded))
    bar.close()
    out, stack = got.lists, got.stack
    div_keys = ("cosine", "logit_lens_kl") if logit_lens else ("cosine",)
    return LocalizationResult(
        model=subject.name, n_layers=L, components=tuple(components), positions=positions,
        engine="+".join(sorted(used_engines)) or engine, pair_ids=out["pair"],
        group_ids=out["group"],
        restoration={c: stack(got.restoration.get(c, []), L) for c in components},
        margin_a=np.array(out["ma"]), margin_b=np.array(out["mb"]),
        divergence={k: stack(got.divergence.get(k, []), L) for k in div_keys},
        excluded=excluded, n_boot=n_boot, types=out["type"], phenomena=out["phen"],
        directions=out["dir"],
        heads=stack(out["heads"], L, subject.n_heads) if plan.heads else None,
        by_position={c: stack(got.by_position.get(c, []), L, len(labels))
                     for c in dict.fromkeys(s.component for s in plan.position_sites)},
        position_labels=labels, specs=got.specs(n_boot),
        gap=np.array(out["gap"]) if keep is not None else None,
        settings={"engine": engine, "only_flips": only_flips, "min_delta": min_delta,
                  "max_rows": max_rows, "max_bytes": max_bytes or memory.DEFAULT_MAX_BYTES,
                  "logit_lens": logit_lens, "n_pairs_in": len(pairs),
                  "choice_reading": "merged" if merge_variants else "first",
                  "choice_tokens": {"/".join(c): [list(v) for v in t.ids]
                                    for c, t in answer_ids.items()},
                  "seconds": round(time.perf_counter() - t0, 3)},
    )


def plan_for(subject: Subject, components: Sequence[str], *, heads: bool = False,
             per_position: bool = False, specs: Sequence[tuple[LayerSpec, str]] = ()) -> Plan:
    from mechlora.probes import head_sites

    sites = all_sites(subject.n_layers, components)
    return Plan(sites=sites, heads=head_sites(subject) if heads else [],
                position_sites=list(sites) if per_position else [], specs=list(specs))
