"""Localize speed: the cached engine vs one full forward per site, same pairs, same results.

    python -m benchmarks.localize            # tiny 34-layer VLM (+ Gemma 3 270M if installed)
    python -m benchmarks.localize --quick    # 2 pairs per model
    python -m benchmarks.localize --pairs 4 --threads 1

Part 1, tiny Gemma 3 VLM (34 layers, random weights, CPU): every engine on the same pairs,
3 components x 34 layers per pair. Part 2, the real Gemma 3 270M (optional extra
`gemma270m`): last-position residual patching of every layer on 4 yes/no pairs, mechlora's
default engine vs the layer loops users of plain hooks, nnsight and TransformerLens write (a
donor run, a clean recipient run, then one patched recipient forward per layer), and vs
mechlora's own nnsight engine. Every method runs once untimed first.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.common import Row, machine, timed
from mechlora.data import EXAMPLE_PATH, QuestionGroup, Variant, load_groups, make_pairs
from mechlora.localize import localize
from mechlora.models import load_model
from mechlora.patching import margin

COMMAND = "python -m benchmarks.localize"
YES_NO = [  # equal token lengths within a pair are not required by mechlora, only by TL's API
    ("Is the sky blue on a clear day?", "On a clear day, is the sky blue?"),
    ("Is water wet to the touch?", "To the touch, is water wet?"),
    ("Is fire hot when you touch it?", "When you touch it, is fire hot?"),
    ("Is snow cold in the winter?", "In the winter, is snow cold?"),
]


def margin_diff(a, b) -> float:
    """Largest difference in patched margins (r times m(a) - m(b)): r itself divides by
    margin differences that can be tiny, which inflates float noise."""
    delta = np.abs(a.margin_a - a.margin_b)[:, None]
    return max(float((np.abs(a.restoration[c] - b.restoration[c]) * delta).max())
               for c in a.components)


def tiny_vlm(n_pairs: int) -> list[Row]:
    subject = load_model("tiny-gemma3-vlm", device="cpu")
    pairs = make_pairs(load_groups(EXAMPLE_PATH), max_pairs_per_group=1)[:n_pairs]
    runs = {}
    for engine in ("full", "batched", "cached"):
        # Random margins are small: keep every pair, so that each engine patches all of them.
        def sweep(part, e=engine):
            return localize(subject, part, engine=e, min_delta=1e-3, progress=False)
        sweep(pairs[:1])  # warm-up
        runs[engine] = timed(lambda s=sweep: s(pairs))
    full_s = runs["full"][1] / n_pairs
    rows = []
    for engine in ("batched", "cached"):
        per_pair = runs[engine][1] / n_pairs
        diff = margin_diff(runs["full"][0], runs[engine][0])
        rows.append(Row("localize, tiny VLM 34 layers, 3 sites", f"`{engine}` engine, s/pair "
                        f"(max abs diff of patched margins vs full: {diff:.1e})",
                        f"{per_pair:.3f}",
                        f"`full` {full_s:.2f} s/pair", f"{full_s / per_pair:.1f}x",
                        f"{COMMAND} --pairs {n_pairs}"))
    return rows


def tlens_layer_loop(bridge, a: dict, b: dict, ids: list[int], n_layers: int) -> np.ndarray:
    """Restoration per layer the way a TransformerLens user writes it: cache the donor, then one
    `run_with_hooks` of the recipient per layer, patching the last position."""
    names = [f"blocks.{layer}.hook_out" for layer in range(n_layers)]
    logits_a, cache = bridge.run_with_cache(a["input_ids"], names_filter=lambda n: n in names)
    logits_b = bridge(b["input_ids"])
    ma, mb = (float(margin(x[:, -1], ids, 0)[0]) for x in (logits_a, logits_b))
    out = []
    for name in names:
        donor = cache[name][:, -1]

        def hook(act, hook, donor=donor):
            act = act.clone()
            act[:, -1] = donor
            return act
        logits = bridge.run_with_hooks(b["input_ids"], fwd_hooks=[(name, hook)])
        out.append((float(margin(logits[:, -1], ids, 0)[0]) - mb) / (ma - mb))
    return np.array(out)


def nnsight_layer_loop(model, layers: list, a: dict, b: dict, ids: list[int]) -> np.ndarray:
    """The same with nnsight: one trace saves the donor's layer outputs, then one trace of the
    recipient per layer. `layers`: the decoder layers' envoys."""
    saved = []  # filled inside the trace: names bound there do not all come back out
    with model.trace(**a):
        for layer in layers:
            saved.append(layer.output[:, -1].save())
        logits_a = model.output.logits[:, -1].save()
    with model.trace(**b):
        logits_b = model.output.logits[:, -1].save()
    ma, mb = (float(margin(x, ids, 0)[0]) for x in (logits_a, logits_b))
    out = []
    for layer, donor in zip(layers, saved, strict=True):
        with model.trace(**b):
            hidden = layer.output.clone()
            hidden[:, -1] = donor
            layer.output = hidden
            logits = model.output.logits[:, -1].save()
        out.append((float(margin(logits, ids, 0)[0]) - mb) / (ma - mb))
    return np.array(out)


def gemma270m(n_pairs: int) -> list[Row]:
    try:
        subject = load_model("gemma3-270m", device="cpu", dtype="float32")
    except Exception as e:  # the optional extra is not installed
        print(f"skipping Gemma 3 270M: {e}")
        return []
    groups = [QuestionGroup(id=f"g{i}", variants=(Variant(a), Variant(b, "syntactic")),
                            answer="yes") for i, (a, b) in enumerate(YES_NO[:n_pairs])]
    pairs = make_pairs(groups, both_directions=False)
    ids = subject.answer_token_ids(("yes", "no"))
    prompts = [(subject.encode([p.text_a]), subject.encode([p.text_b])) for p in pairs]
    what = "localize, Gemma 3 270M, resid x 18 layers, last position"

    def mechlora_run(**kw):
        return localize(subject, pairs, components=["resid"], min_delta=1e-6, progress=False,
                        **kw)

    # Each method runs once untimed first: imports, booting, first-call allocations.
    loops = {"plain-hook loop (mechlora `full` engine)": lambda: mechlora_run(engine="full")
             .restoration["resid"]}
    from mechlora.bridges.nnsight import envoy_at, envoy_path, traced
    from mechlora.bridges.tlens import boot_bridge
    from mechlora.probes import Site

    def nnsight_loop():
        # NNsight(model) for the loop only: mechlora's own runs then see the plain model.
        with traced(subject.model) as traced_model:
            layers = [envoy_at(traced_model, envoy_path(subject, Site(layer, "resid")))
                      for layer in range(subject.n_layers)]
            return np.stack([nnsight_layer_loop(traced_model, layers, a, b, ids)
                             for a, b in prompts])

    loops["nnsight 0.8 layer loop (one trace per layer)"] = nnsight_loop
    bridge = boot_bridge(subject)
    loops["TransformerLens 4 layer loop (`run_with_hooks` per layer)"] = lambda: np.stack(
        [tlens_layer_loop(bridge, a, b, ids, subject.n_layers) for a, b in prompts])
    loops["mechlora `nnsight` engine (all layers as rows of one trace)"] = lambda: mechlora_run(
        engine="nnsight").restoration["resid"]
    for fn in (*loops.values(), lambda: mechlora_run(logit_lens=False), mechlora_run):
        fn()  # warm-up
    fast, fast_s = timed(lambda: mechlora_run(logit_lens=False), repeat=2)
    lens_s = timed(mechlora_run, repeat=2)[1]
    fast_s, lens_s = fast_s / len(pairs), lens_s / len(pairs)
    command = f"{COMMAND} --pairs {n_pairs}"
    rows = []
    delta = np.abs(fast.margin_a - fast.margin_b)[:, None]
    for name, fn in loops.items():
        with torch.no_grad():  # the loops' users would not keep autograd graphs either
            r, slow = timed(fn)
        slow /= len(pairs)
        # r divides by m(a) - m(b); compare the patched margins themselves.
        diff = float((np.abs(r - fast.restoration["resid"]) * delta).max())
        rows.append(Row(what, f"default engine (`{fast.engine}`), restoration only, s/pair; "
                        f"max abs diff of patched margins {diff:.1e}", f"{fast_s:.3f}",
                        f"{name}: {slow:.2f} s/pair", f"{slow / fast_s:.1f}x", command))
        if name.startswith("TransformerLens"):
            rows.append(Row(what, "default settings (+ logit-lens KL of every layer, full "
                            "262k vocabulary), s/pair", f"{lens_s:.3f}",
                            f"{name}: {slow:.2f} s/pair", f"{slow / lens_s:.1f}x", command))
    return rows


def run(n_pairs: int) -> list[Row]:
    torch.manual_seed(0)
    return tiny_vlm(n_pairs) + gemma270m(n_pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 pairs (same as --pairs 2)")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per model (at most 4)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}\n\n{Row.header()}")
    for row in run(2 if args.quick else min(args.pairs, len(YES_NO))):
        print(row.markdown())


if __name__ == "__main__":
    main()
