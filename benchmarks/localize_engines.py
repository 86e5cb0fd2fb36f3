"""The cost of every localize engine on the same sweep, and how far each is from `full`.

    python -m benchmarks.localize_engines                # tiny 34-layer VLM, 2 pairs
    python -m benchmarks.localize_engines --pairs 4 --threads 1 --positions suffix:4

Sweep: tiny Gemma 3 VLM (34 layers, random weights, image + question), positions `last`
(or `--positions`; an engine that cannot run them exactly is listed as such),
resid + attn + mlp at every layer (102 sites), both directions of each pair's question. Each
engine first runs one untimed pair (imports, TransformerLens's boot of a copy, nnsight's
instrumentation: reported as "first call"), then the timed pairs. Exact engines are compared
with `full` by the largest |difference| in restoration; attribution (an estimate) by the
Spearman correlation with `full` over pairs x sites and the mean |difference|.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import machine, timed
from mechlora.attribution import spearman
from mechlora.data import EXAMPLE_PATH, load_groups, make_pairs
from mechlora.errors import MechloraError
from mechlora.localize import localize
from mechlora.models import load_model
from mechlora.patching import last_logits

ENGINES = ("full", "batched", "cached", "nnsight", "tlens", "attribution", "attribution+verify")


def flat(result) -> np.ndarray:
    return np.concatenate([result.restoration[c].ravel() for c in result.components])


def forward_seconds(subject, pairs) -> float:
    g = pairs[0].group
    inputs = subject.encode([g.variants[0].text], [subject.gray_image()])
    with torch.inference_mode():
        last_logits(subject, inputs)
        return min(timed(lambda: last_logits(subject, inputs))[1] for _ in range(5))


def run(n_pairs: int, verify_top: int, positions: str = "last") -> list[str]:
    subject = load_model("tiny-gemma3-vlm", device="cpu")
    pairs = make_pairs(load_groups(EXAMPLE_PATH), max_pairs_per_group=1)[:n_pairs + 1]
    warm, timed_pairs = pairs[:1], pairs[1:]
    one = forward_seconds(subject, pairs)
    results, rows, invalid = {}, [], {}
    for engine in ENGINES:
        name, _, check = engine.partition("+")
        kw = {"verify_top": verify_top} if check else {}
        # Every pair is kept (random margins are small), so each engine does the same work.
        kw.update(positions=positions, min_delta=1e-3)
        t0 = time.perf_counter()
        try:
            localize(subject, warm, engine=name, progress=False, **kw)
        except MechloraError as e:
            invalid[engine] = str(e).split(";")[0]
            continue
        first = time.perf_counter() - t0
        results[engine], seconds = timed(
            lambda e=name, kw=kw: localize(subject, timed_pairs, engine=e, progress=False, **kw))
        assert results[engine].n_pairs == len(timed_pairs), engine
        per_pair = seconds / len(timed_pairs)
        rows.append([engine, per_pair, per_pair / one, first])
    lines = [f"machine: {machine()}; one clean forward {one * 1000:.0f} ms; "
             f"{len(timed_pairs)} timed pairs, {subject.n_layers} layers x 3 sites, "
             f"positions {positions}", "",
             "| engine | s / pair | forward-equivalents / pair | first call (s) | vs `full` |",
             "|---|---|---|---|---|"]
    full = flat(results["full"])
    for engine, per_pair, fwd, first in rows:
        r = flat(results[engine])
        if engine.startswith("attribution"):
            agree = (f"estimate: Spearman {spearman(r, full):.2f}, mean abs diff "
                     f"{np.abs(r - full).mean():.2f}")
            check = results[engine].settings["attribution"]
            if "spearman" in check:
                agree = (f"exact re-run of the top {check['verify_top']} sites: Spearman "
                         f"{check['spearman']:.2f} (site means), "
                         f"{check['spearman_pairs']:.2f} (pairs x sites)")
        else:
            agree = f"max abs diff {np.abs(r - full).max():.1e}"
        lines.append(f"| `{engine}` | {per_pair:.2f} | {fwd:.1f} | {first:.1f} | {agree} |")
    lines += [f"| `{engine}` | | | | not valid here: {why} |" for engine, why in invalid.items()]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="timed pairs (after one warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--verify-top", type=int, default=10)
    parser.add_argument("--positions", default="last", help="last | suffix:K | image")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("\n".join(run(args.pairs, args.verify_top, args.positions)))


if __name__ == "__main__":
    main()
