"""Selector cost: grad, snr and bi beside a localization of the same pairs, in one run.

    python -m benchmarks.selectors            # the organism and Gemma 3 270M, 8 groups each
    python -m benchmarks.selectors --tiny     # the tiny 6-layer VLM, 2 groups: seconds on CPU
    python -m benchmarks.selectors --models organism --groups 16 --threads 1

Each model reads the first two wordings of G question groups (the organism: its training
pairs; Gemma 3 270M: analyses/data/yesno_general.jsonl; tiny: the bundled example). The
localization is what `mechlora localize` runs by default (engine auto, resid + attn + mlp, both
directions of each pair); grad takes one pair per group (one forward and backward per 8 pairs),
bi every prompt once, snr the weights. Counted with a hook on the model: forward calls and the
token positions they processed; backward passes from the scores' own count (the exact
localization engines never backpropagate). A forward-equivalent is one plain forward of one
prompt, timed in the same run. The bands and random:K cost nothing and are not listed. The last
column is the Spearman correlation of each selector's per-layer scores with the localization's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine
from mechlora.data import EXAMPLE_PATH, load_groups, make_pairs
from mechlora.localize import localize
from mechlora.models import load_model
from mechlora.select import Scores, select_layers
from mechlora.selectors import bi_scores, grad_scores, snr_scores

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python -m benchmarks.selectors"


def data_for(name: str) -> Path:
    if name == "organism":
        from mechlora.organism import build_organism, load_folds

        return next(iter(load_folds(build_organism(progress=False)).values())).train
    if name == "gemma3-270m":
        return ROOT / "analyses" / "data" / "yesno_general.jsonl"
    return EXAMPLE_PATH


class Counter:
    """Forward calls of the model and the token positions they processed."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = self.tokens = 0
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.tokens += int(ids.numel()) if ids is not None else 0

    def take(self) -> tuple[int, int]:
        counts = (self.calls, self.tokens)
        self.calls = self.tokens = 0
        return counts


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(np.nan_to_num(a), np.nan_to_num(b)).statistic)


def one_forward(subject, prompt: str, repeat: int = 5) -> float:
    inputs = subject.encode([prompt])
    times = []
    with torch.no_grad():
        for _ in range(repeat):
            t0 = time.perf_counter()
            subject.model(**inputs, logits_to_keep=1, use_cache=False)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench(name: str, n_groups: int, tiny: bool) -> list[dict]:
    if tiny:
        from mechlora.models import wrap
        from mechlora.models.presets import tiny_gemma3_vlm

        subject = wrap(*tiny_gemma3_vlm(n_layers=6), name="tiny-gemma3-vlm")
    else:
        subject = load_model(name, device="cpu", dtype="float32")
    source = data_for("tiny" if tiny else name)
    groups = [g.__class__(**{**g.__dict__, "variants": g.variants[:2]})
              for g in load_groups(source)[:n_groups]]
    k = max(2, round(subject.n_layers * 5 / 34))  # the recipe's 5 of 34 layers
    unit = one_forward(subject, groups[0].question)
    import peft  # noqa: F401  (imported before timing: grad's first call would pay for it)

    counter = Counter(subject.base)
    runs: dict[str, tuple[Scores, float, str]] = {}
    t0 = time.perf_counter()
    loc = localize(subject, make_pairs(groups), progress=False)
    seconds = time.perf_counter() - t0
    runs[f"localization ({loc.n_pairs} of {2 * len(groups)} ordered pairs kept)"] = (
        Scores.from_localization(loc), seconds, f"window:{k}")
    calls = {next(iter(runs)): counter.take()}
    reference = next(iter(runs.values()))[0].values
    for label, fn in (("grad", lambda: grad_scores(subject, groups, progress=False)),
                      ("bi", lambda: bi_scores(subject, groups, progress=False)),
                      ("snr", lambda: snr_scores(subject, progress=False))):
        t0 = time.perf_counter()
        scores = fn()
        runs[label] = (scores, time.perf_counter() - t0, f"topk:{k}")
        calls[label] = counter.take()
    counter.handle.remove()
    # grad reads the gradient through LoRA's seeded random A: how much does the seed move it?
    other = grad_scores(subject, groups, seed=1, progress=False).values
    first = runs["grad"][0].values
    seed_check = {**runs["grad"][0].settings["loss_at_init"], "spearman": spearman(first, other),
                  "max_rel_diff": float(np.max(np.abs(first - other) / np.abs(first).max())),
                  "same_topk": str(select_layers(first, f"topk:{k}").spec) ==
                  str(select_layers(other, f"topk:{k}").spec)}
    rows = []
    for label, (scores, secs, rule) in runs.items():
        positive = np.clip(np.nan_to_num(scores.values), 0, None).any()
        spec = str(select_layers(scores, rule).spec) if positive else "n/a (no positive score)"
        rows.append({
            "model": subject.name, "layers": subject.n_layers, "groups": len(groups),
            "selector": label, "seconds": secs, "forward_equivalents": secs / unit,
            "forward_calls": calls[label][0], "tokens": calls[label][1],
            "backwards": int(scores.cost.get("backwards", 0)), "rule": rule, "spec": spec,
            "spearman_vs_localization": spearman(scores.values, reference),
            "one_forward_s": unit, "grad_seed_0_vs_1": seed_check if label == "grad" else None,
            "scores": [round(float(v), 4) for v in np.nan_to_num(scores.values)]})
    return rows


def snr_medgemma_shapes() -> str:
    """snr's cost on MedGemma-4B without its 8.6 GB of weights: one random bf16 matrix of each
    projection shape, timed, times how often the shape occurs (q, o: 2; k, v: 2; gate, up,
    down: 3 per layer; 34 layers). The transpose of a shape has the same singular values."""
    from mechlora.models.presets import MEDGEMMA_4B_TEXT
    from mechlora.selectors import matrix_snr

    hidden, inter = MEDGEMMA_4B_TEXT["hidden_size"], MEDGEMMA_4B_TEXT["intermediate_size"]
    heads, kv, dim = (MEDGEMMA_4B_TEXT[k] for k in ("num_attention_heads",
                                                      "num_key_value_heads", "head_dim"))
    shapes = {"q_proj, o_proj": ((heads * dim, hidden), 2),
              "k_proj, v_proj": ((kv * dim, hidden), 2),
              "gate_proj, up_proj, down_proj": ((inter, hidden), 3)}
    lines, per_layer = [], 0.0
    for names, (shape, count) in shapes.items():
        w = (torch.randn(*shape) * 0.02).to(torch.bfloat16)
        before = _reset_peak()
        t0 = time.perf_counter()
        matrix_snr(w)
        secs = time.perf_counter() - t0
        extra = _memory_mb("VmHWM") - before
        per_layer += count * secs
        lines.append(f"| {names} | {shape[0]} x {shape[1]} | {secs:.1f} | {extra:.0f} |")
    n = MEDGEMMA_4B_TEXT["num_hidden_layers"]
    total = f"{per_layer * n / 60:.0f} min"
    return "\n".join(["| MedGemma-4B matrices | shape | s per matrix (float32 SVD, CPU) | "
                      "resident memory growth, MB |",
                      "|---|---|---|---|", *lines,
                      f"| **per layer** (7 matrices) | | **{per_layer:.0f}** | |",
                      f"| **all {n} layers** (238 matrices) | | **{total}** | |"])


def _memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB (Linux)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(field))
    return int(line.split()[1]) / 1024


def _reset_peak() -> float:
    """Reset the peak resident memory to the current one (Linux); the current one, in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _memory_mb("VmRSS")


def markdown(rows: list[dict]) -> str:
    out = ["| model | selector | wall s | forward-equivalents | forward calls | tokens in "
           "forwards | backward passes | selection | Spearman vs localization |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} ({r['layers']} layers, {r['groups']} groups) | "
                   f"{r['selector']} | {r['seconds']:.2f} | {r['forward_equivalents']:.0f} | "
                   f"{r['forward_calls']} | {r['tokens']:,} | {r['backwards']} | "
                   f"{r['rule']} -> {r['spec']} | {r['spearman_vs_localization']:.2f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny 6-layer VLM, 2 groups")
    parser.add_argument("--models", default="organism,gemma3-270m",
                        help="comma-separated presets (default: organism,gemma3-270m)")
    parser.add_argument("--groups", type=int, default=8, help="question groups per model")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = ["tiny"] if args.tiny else [m.strip() for m in args.models.split(",")]
    n_groups = 2 if args.tiny else args.groups
    rows = [row for name in models for row in bench(name, n_groups, args.tiny)]
    argv = " --tiny" if args.tiny else f" --models {','.join(models)} --groups {n_groups}"
    print(f"machine: {machine()}; command: `{COMMAND}{argv}`; one forward = one plain "
          f"forward of one prompt, timed in the same run\n")
    print(markdown(rows))
    print()
    for r in rows:
        if r["grad_seed_0_vs_1"]:
            check = r["grad_seed_0_vs_1"]
            print(f"- grad on {r['model']}: loss at init CE {check['ce']:.2f}, KL "
                  f"{check['kl']:.2f}; LoRA seed 0 vs 1: Spearman {check['spearman']:.2f}, "
                  f"largest difference {check['max_rel_diff']:.0%} of the top score, same "
                  f"top-k: {'yes' if check['same_topk'] else 'no'}")
    if not args.tiny:
        print(f"\nsnr on MedGemma-4B's shapes (random bf16 weights, one matrix at a time):\n\n"
              f"{snr_medgemma_shapes()}")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
