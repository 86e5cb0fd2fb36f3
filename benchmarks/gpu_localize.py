"""Localize on the MedGemma-4B architecture (random bf16 weights) on one GPU.

    python -m benchmarks.gpu_localize            # H100/H200: medgemma-4b shape, bf16
    python -m benchmarks.gpu_localize --tiny     # CPU smoke run of the same script
    python -m benchmarks.gpu_localize --wordings 4   # 4 wordings per question (3 donors each)

Per ordered pair: 3 sites x 34 layers (102 patched rows), both directions, last position,
~310-token prompts with 256 image tokens; every ordered pair of each question's wordings (2 by
default: each recipient has one donor; with more, a recipient's donors share one step).
Prints pairs/s, peak memory, and the largest relative difference of patched margins between
the default engine and the `full` engine on sampled sites.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import machine, timed
from mechlora.data import QuestionGroup, Variant, make_pairs
from mechlora.localize import clean_run, localize
from mechlora.models import wrap
from mechlora.models.presets import medgemma_4b_config, tiny_gemma3_vlm
from mechlora.models.tokenizer import build_processor, build_tokenizer
from mechlora.patching import RUNNERS, SitePatch, choose_engine
from mechlora.probes import all_sites

# Wordings beyond the two of QUESTIONS (--wordings K): added-context variants of the first.
CONTEXT = ["The patient is short of breath.", "This is a follow-up film.",
           "The patient had surgery last week.", "Please answer briefly."]

QUESTIONS = [
    ("Is there a pleural effusion?", "Does this film show fluid in the pleural space?"),
    ("Is the heart enlarged?", "Does the cardiac silhouette look bigger than normal?"),
    ("Is there a pneumothorax?", "Is air present in the pleural cavity?"),
    ("Is a central line present?", "Can you see a central venous catheter?"),
]


def medgemma_random(device: str, dtype: torch.dtype):
    """MedGemma-4B's exact shapes with random weights and a tokenizer built in code."""
    from transformers import Gemma3ForConditionalGeneration

    tok = build_tokenizer()
    cfg = medgemma_4b_config()
    cfg.image_token_id = tok.image_token_id
    cfg.boi_token_id = tok.convert_tokens_to_ids(tok.boi_token)
    cfg.eoi_token_id = tok.convert_tokens_to_ids(tok.eoi_token)
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma3ForConditionalGeneration(cfg).to(dtype).eval()
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.data.normal_(0.0, proj.shape[0] ** -0.5)
    return model, build_processor(tok, image_size=896, image_seq_length=256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke run)")
    parser.add_argument("--pairs", type=int, default=4, help="question groups (every ordered "
                        "pair of their wordings is swept)")
    parser.add_argument("--sample", type=int, default=6, help="sites checked against `full`")
    parser.add_argument("--wordings", type=int, default=2, choices=range(2, 2 + len(CONTEXT) + 1),
                        help="wordings per question (more: every recipient has several donors, "
                        "swept in one step)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        model, processor = tiny_gemma3_vlm()
        dtype = torch.float32
    else:
        dtype = torch.bfloat16
        model, processor = medgemma_random(device, dtype)
    subject = wrap(model.to(device), processor, name="medgemma-4b-random" if not args.tiny
                   else "tiny-gemma3-vlm")
    size = processor.image_processor.size["height"]
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    image_path = Path(tempfile.mkdtemp()) / "film.png"
    image.save(image_path)
    groups = [QuestionGroup(id=f"q{i}", variants=(Variant(a), Variant(b, "lexical"), *(
        Variant(f"{c} {a}", "added_context") for c in CONTEXT[:args.wordings - 2])),
        answer="yes", image=image_path) for i, (a, b) in enumerate(QUESTIONS[:args.pairs])]
    pairs = make_pairs(groups)
    print(f"machine: {machine()}; model {subject.name}, {subject.n_layers} layers, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")
    localize(subject, pairs[:1], progress=False, min_delta=1e-6)  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result, seconds = timed(lambda: localize(subject, pairs, progress=False, min_delta=1e-6))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    print(f"default engine ({result.engine}): {len(pairs) / seconds:.2f} pairs/s "
          f"({seconds / len(pairs) * 1000:.0f} ms per ordered pair of 102 patched rows), "
          f"peak {peak:.1f} GiB")

    # Agreement with one full forward per site, on a sample of sites of the first pair.
    pair = pairs[0]
    g = pair.group
    ids = subject.answer_token_ids(g.choices)
    sites = all_sites(subject.n_layers)
    with torch.inference_mode():
        a = clean_run(subject, pair.text_a, image, 0, ids, sites, "last")
        b = clean_run(subject, pair.text_b, image, 0, ids, sites, "last")
        sample = random.Random(0).sample(sites, args.sample)
        patches = [SitePatch(s, b.positions, a.values[s]) for s in sample]
        engine = choose_engine("auto", subject, b.inputs, patches)
        fast = RUNNERS[engine](subject, b.inputs, patches, ids, 0)
        (full, full_s) = timed(lambda: RUNNERS["full"](subject, b.inputs, patches, ids, 0))
    rel = ((fast - full).abs() / full.abs().clamp(min=1e-3)).max().item()
    per_pair_full = full_s / len(sample) * len(sites)
    print(f"full engine: {per_pair_full:.2f} s/pair (extrapolated from {len(sample)} sites); "
          f"speed-up {per_pair_full / (seconds / len(pairs)):.0f}x; "
          f"max relative margin difference on sampled sites: {rel:.2e}")


if __name__ == "__main__":
    main()
