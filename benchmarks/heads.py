"""Per-head and per-position patching: mechlora's sweep vs the TransformerLens and nnsight
loops a user writes for the same numbers, on the same pairs, in one run.

    python -m benchmarks.heads                       # Gemma 3 270M (optional extra gemma270m)
    python -m benchmarks.heads --tiny                # tiny random Gemma 3 text model (seconds)
    python -m benchmarks.heads --pairs 2 --threads 1 --suffix 4

Heads: every attention head of every layer alone (o_proj's input, one head's slice, at the
last position): mechlora `localize(heads=True)` (default engine: the recipient's prefix cache
from its clean run, one folded step over all heads) vs a TransformerLens 4 loop
(`run_with_cache` on the donor, one `run_with_hooks` on `blocks.{l}.attn.hook_z[:, -1, h]`
per head) and an nnsight 0.8 loop (one trace saving the donor's o_proj inputs, one trace per
head setting `o_proj.input`). Positions: the residual stream after every layer at each of
the last K positions alone (the shared chat-template suffix): mechlora
`localize(per_position=True, positions="suffix:K")` (rows grouped by the position they
patch, each group continuing the clean-run cache cut there) vs the same two loops on
`blocks.{l}.hook_resid_post` / the decoder layer's output. Each method runs once untimed on
the first pair; the printed difference is the largest |difference| of patched margins.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.common import machine, timed
from benchmarks.localize import YES_NO
from mechlora.data import QuestionGroup, Variant, make_pairs
from mechlora.localize import localize
from mechlora.models import load_model
from mechlora.patching import margin
from mechlora.probes import HEADS, Site

COMMAND = "python -m benchmarks.heads"


def _margin(logits, ids) -> float:
    """The margin at the last position (yes is the reference answer)."""
    return float(margin(logits[:, -1].float(), ids, 0)[0])


def tlens_loop(bridge, a, b, ids, sites) -> np.ndarray:
    """Patched margins of recipient `b`, one `run_with_hooks` per site: (hook name, position
    from the end, head or None)."""
    names = sorted({name for name, _, _ in sites})
    _, cache = bridge.run_with_cache(a["input_ids"], names_filter=lambda n: n in names)
    out = []
    for name, back, head in sites:
        donor = cache[name][:, back] if head is None else cache[name][:, back, head]

        def hook(act, hook, donor=donor, back=back, head=head):
            act = act.clone()
            if head is None:
                act[:, back] = donor
            else:  # hook_z is [batch, pos, head, head_dim]
                act[:, back, head] = donor
            return act
        out.append(_margin(bridge.run_with_hooks(b["input_ids"], fwd_hooks=[(name, hook)]), ids))
    return np.array(out)


def nnsight_loop(model, envoys: dict, a, b, ids, sites, head_dim: int) -> np.ndarray:
    """The same with nnsight: one trace saves the donor's values, one trace per site.
    `envoys`: site key -> (envoy, whether the value is the module's input)."""
    saved = {}
    with model.trace(**a):
        for key, (envoy, is_input) in envoys.items():
            saved[key] = (envoy.input if is_input else envoy.output).save()
    out = []
    for key, back, head in sites:
        envoy, is_input = envoys[key]
        cols = slice(None) if head is None else slice(head * head_dim, (head + 1) * head_dim)
        with model.trace(**b):
            value = (envoy.input if is_input else envoy.output).clone()
            value[:, back, cols] = saved[key][:, back, cols]
            if is_input:
                envoy.input = value
            else:
                envoy.output = value
            logits = model.output.logits.save()
        out.append(_margin(logits, ids))
    return np.array(out)


def sweeps(L: int, H: int, suffix: int) -> dict:
    """name -> (localize options, TransformerLens sites, nnsight sites, result -> [pairs, rows])"""
    heads = [(layer, h) for layer in range(L) for h in range(H)]
    spots = [(layer, k) for layer in range(L) for k in range(suffix, 0, -1)]
    return {
        "heads": (dict(components=[], heads=True),
                  [(f"blocks.{layer}.attn.hook_z", -1, h) for layer, h in heads],
                  [(Site(layer, HEADS), -1, h) for layer, h in heads],
                  lambda r: r.heads.reshape(r.n_pairs, -1)),
        f"positions (suffix:{suffix}, resid)": (
            dict(components=["resid"], per_position=True, positions=f"suffix:{suffix}"),
            [(f"blocks.{layer}.hook_resid_post", -k, None) for layer, k in spots],
            [(Site(layer, "resid"), -k, None) for layer, k in spots],
            lambda r: r.by_position["resid"].reshape(r.n_pairs, -1)),
    }


def mechlora_margins(subject, part, options, rows_of) -> np.ndarray:
    result = localize(subject, part, min_delta=1e-6, progress=False, logit_lens=False,
                      **options)
    gap = (result.margin_a - result.margin_b)[:, None]
    return result.margin_b[:, None] + rows_of(result) * gap


def nnsight_margins(subject, prompts, part, ids, sites) -> np.ndarray:
    from mechlora.bridges.nnsight import envoy_at, envoy_path, traced

    # NNsight(model) for the loop only: mechlora's own runs then see the plain model.
    with traced(subject.model) as model:
        envoys = {site: (envoy_at(model, envoy_path(subject, site)), site.component == HEADS)
                  for site, _, _ in sites}
        return np.stack([nnsight_loop(model, envoys, *prompts[p.id], ids, sites,
                                      subject.head_dim) for p in part])


def shared_suffix(prompts: dict, cap: int) -> int:
    """The most trailing tokens every pair's two prompts share (at most `cap`)."""
    k = cap
    for a, b in prompts.values():
        ids_a, ids_b = a["input_ids"][0], b["input_ids"][0]
        same = 0
        while same < min(len(ids_a), len(ids_b)) and ids_a[-1 - same] == ids_b[-1 - same]:
            same += 1
        k = min(k, same)
    return k


def run(model: str, n_pairs: int, suffix: int):
    """Yields the table's lines as they are measured."""
    from mechlora.bridges.tlens import boot_bridge

    subject = load_model(model, device="cpu", dtype="float32")
    groups = [QuestionGroup(id=f"g{i}", variants=(Variant(a), Variant(b, "syntactic")),
                            answer="yes") for i, (a, b) in enumerate(YES_NO[:n_pairs + 1])]
    pairs = make_pairs(groups, both_directions=False)
    warm, timed_pairs = pairs[:1], pairs[1:]
    ids = subject.answer_token_ids(("yes", "no"))
    prompts = {p.id: (subject.encode([p.text_a]), subject.encode([p.text_b])) for p in pairs}
    suffix = shared_suffix(prompts, suffix)
    bridge = boot_bridge(subject)
    one = subject.encode([YES_NO[0][0]])
    with torch.no_grad():
        forward = timed(lambda: subject.model(**one), repeat=3)[1]
    yield (f"machine: {machine()}; {model}, {subject.n_layers} layers x {subject.n_heads} "
           f"heads; {len(timed_pairs)} timed pairs; one clean forward {forward:.3f} s\n\n"
           "| sweep | method | s / pair | patched sites / pair | max abs diff of patched "
           "margins vs mechlora |\n|---|---|---|---|---|")
    for name, (options, tl_sites, nn_sites, rows_of) in sweeps(
            subject.n_layers, subject.n_heads, suffix).items():
        methods = {
            "mechlora (default engine)": lambda part, o=options, f=rows_of:
                mechlora_margins(subject, part, o, f),
            "TransformerLens 4 loop": lambda part, s=tl_sites: np.stack(
                [tlens_loop(bridge, *prompts[p.id], ids, s) for p in part]),
            "nnsight 0.8 loop": lambda part, s=nn_sites: nnsight_margins(subject, prompts,
                                                                         part, ids, s),
        }
        results = {}
        for method, fn in methods.items():
            with torch.no_grad():
                fn(warm)  # untimed: imports, first-call allocations
                results[method] = timed(lambda f=fn: f(timed_pairs))
        ref = results["mechlora (default engine)"][0]
        for method, (values, seconds) in results.items():
            yield (f"| {name} | {method} | {seconds / len(timed_pairs):.2f} | "
                   f"{len(tl_sites)} | {float(np.abs(values - ref).max()):.1e} |")
    yield (f"\ncommand: {COMMAND}" + (" --tiny" if model.startswith("tiny") else "")
           + f" --pairs {n_pairs} --suffix {suffix}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny-gemma3-text preset")
    parser.add_argument("--pairs", type=int, default=2, help="timed pairs (at most 3)")
    parser.add_argument("--suffix", type=int, default=5, help="positions K of suffix:K (at "
                        "most what every pair's prompts share)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = "tiny-gemma3-text" if args.tiny else "gemma3-270m"
    for line in run(model, min(args.pairs, len(YES_NO) - 1), args.suffix):
        print(line, flush=True)


if __name__ == "__main__":
    main()
