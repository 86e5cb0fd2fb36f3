"""Localize speed: the cached engine vs one full forward per site, same pairs, same results.

    python -m benchmarks.localize            # tiny 34-layer VLM (+ Gemma 3 270M if installed)
    python -m benchmarks.localize --quick    # fewer pairs

Part 1, tiny Gemma 3 VLM (34 layers, random weights, CPU): every engine on the same pairs,
3 components x 34 layers per pair. Part 2, the real Gemma 3 270M (optional extra
`gemma270m`): last-position residual patching of every layer on 4 yes/no pairs, mechlora's
default engine vs one forward per layer through plain hooks, nnsight and TransformerLens
(the loops those libraries' users write).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import Row, machine, max_abs_diff, timed
from mechlora.data import EXAMPLE_PATH, QuestionGroup, Variant, load_groups, make_pairs
from mechlora.localize import localize
from mechlora.models import load_model
from mechlora.patching import ENGINES

COMMAND = "python -m benchmarks.localize"
YES_NO = [  # equal token lengths within a pair are not required by mechlora, only by TL's API
    ("Is the sky blue on a clear day?", "On a clear day, is the sky blue?"),
    ("Is water wet to the touch?", "To the touch, is water wet?"),
    ("Is fire hot when you touch it?", "When you touch it, is fire hot?"),
    ("Is snow cold in the winter?", "In the winter, is snow cold?"),
]


def tiny_vlm(n_pairs: int) -> list[Row]:
    subject = load_model("tiny-gemma3-vlm", device="cpu")
    pairs = make_pairs(load_groups(EXAMPLE_PATH), max_pairs_per_group=1)[:n_pairs]
    runs = {}
    for engine in ("full", "batched", "cached"):
        runs[engine] = timed(lambda e=engine: localize(subject, pairs, engine=e, progress=False))
    full_s = runs["full"][1] / n_pairs
    rows = []
    for engine in ("batched", "cached"):
        per_pair = runs[engine][1] / n_pairs
        diff = max_abs_diff(runs["full"][0], runs[engine][0])
        rows.append(Row("localize, tiny VLM 34 layers, 3 sites", f"`{engine}` engine, s/pair "
                        f"(max abs diff of r vs full: {diff:.1e})", f"{per_pair:.3f}",
                        f"`full` {full_s:.2f} s/pair", f"{full_s / per_pair:.1f}x",
                        f"{COMMAND} --pairs {n_pairs}"))
    return rows


def gemma270m(n_pairs: int) -> list[Row]:
    try:
        subject = load_model("gemma3-270m", device="cpu", dtype="float32")
    except Exception as e:  # the optional extra is not installed
        print(f"skipping Gemma 3 270M: {e}")
        return []
    groups = [QuestionGroup(id=f"g{i}", variants=(Variant(a), Variant(b, "syntactic")),
                            answer="yes") for i, (a, b) in enumerate(YES_NO[:n_pairs])]
    pairs = make_pairs(groups, both_directions=False)
    engines = ["auto", "full"] + [e for e in ("nnsight", "tlens") if e in ENGINES]
    runs = {e: timed(lambda e=e: localize(subject, pairs, components=["resid"], engine=e,
                                          min_delta=0.0, progress=False)) for e in engines}
    fast = runs["auto"][1] / len(pairs)
    rows = []
    for engine in engines[1:]:
        slow = runs[engine][1] / len(pairs)
        diff = max_abs_diff(runs["auto"][0], runs[engine][0])
        rows.append(Row("localize, Gemma 3 270M, resid x 18 layers, last position",
                        f"default engine (`{runs['auto'][0].engine}`) s/pair; max abs diff of r "
                        f"{diff:.1e}", f"{fast:.3f}", f"`{engine}` loop {slow:.2f} s/pair",
                        f"{slow / fast:.1f}x", COMMAND))
    return rows


def run(quick: bool = False) -> list[Row]:
    torch.manual_seed(0)
    return tiny_vlm(2 if quick else 4) + gemma270m(2 if quick else 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine()}\n\n{Row.header()}")
    for row in run(args.quick):
        print(row.markdown())


if __name__ == "__main__":
    main()
