"""Image-feature cache: what reusing each image's frozen vision features saves.

    python -m benchmarks.features            # localize + eval, memory and disk cache
    python -m benchmarks.features --quick    # fewer questions

The saving depends on how much of a forward the vision tower is. MedGemma-4B's SigLIP tower
sees 4,096 patches per image while the language model sees ~310 tokens per prompt, so its
vision tower costs more multiply-adds per image than the language model per prompt (ratio
printed below, from the two configs). The benchmark model is a random Gemma 3 VLM (34 language
layers, hidden 64, as `tiny-gemma3-vlm`) whose SigLIP tower (224 px, 256 patches, 2 layers)
is sized so that, measured on this machine, it takes that ratio of time to a prompt's language
forward.

Baseline: the same calls with the cache off (pixels go through the vision tower in every
forward, as plain HF code does). Results must be identical; the largest difference is printed.
"""

from __future__ import annotations

import argparse
import tempfile
from contextlib import contextmanager

import numpy as np
import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

import mechlora.features as features
from benchmarks.common import Row, machine, timed
from mechlora.data import EXAMPLE_PATH, load_groups, make_pairs
from mechlora.evaluate import evaluate
from mechlora.features import FeatureCache
from mechlora.localize import localize
from mechlora.models import wrap
from mechlora.models.presets import _tiny_text_config, medgemma_4b_config
from mechlora.models.tokenizer import build_processor, build_tokenizer

COMMAND = "python -m benchmarks.features"
IMAGE_SIZE, PATCH, IMAGE_TOKENS = 224, 14, 16  # 256 patches pooled to 16 tokens


def layer_macs(hidden: int, intermediate: int, q_dim: int, kv_dim: int, gated: bool) -> int:
    """Multiply-adds per token of one transformer layer's matrices (attention scores aside)."""
    return hidden * (2 * q_dim + 2 * kv_dim) + (3 if gated else 2) * hidden * intermediate


def vision_ratio(cfg, prompt_tokens: int) -> float:
    """Vision tower multiply-adds per image / language model multiply-adds per prompt."""
    v, t = cfg.vision_config, cfg.text_config
    patches = (v.image_size // v.patch_size) ** 2
    vision = v.num_hidden_layers * patches * layer_macs(
        v.hidden_size, v.intermediate_size, v.hidden_size, v.hidden_size, gated=False)
    language = t.num_hidden_layers * prompt_tokens * layer_macs(
        t.hidden_size, t.intermediate_size, t.num_attention_heads * t.head_dim,
        t.num_key_value_heads * t.head_dim, gated=True)
    return vision / language


def benchmark_model(inputs: dict, target: float, seed: int = 0):
    """A random Gemma 3 VLM whose vision tower takes `target` times as long per image as its
    language model per prompt (`inputs`), measured here: on a CPU, tiny models are bound by
    per-layer overhead, so matching multiply-adds would not match time."""
    tok = build_tokenizer()
    processor = build_processor(tok, image_size=IMAGE_SIZE, image_seq_length=IMAGE_TOKENS)

    def build(hidden: int):
        cfg = Gemma3Config(
            text_config=_tiny_text_config(len(tok), 34),
            vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
                               patch_size=PATCH, vision_use_head=False),
            mm_tokens_per_image=IMAGE_TOKENS,
            boi_token_index=tok.convert_tokens_to_ids(tok.boi_token),
            eoi_token_index=tok.convert_tokens_to_ids(tok.eoi_token),
            image_token_index=tok.image_token_id)
        cfg.architectures = ["Gemma3ForConditionalGeneration"]
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(cfg).eval()
        with torch.no_grad():  # a fresh projector is zero: the image would not matter
            proj = model.model.multi_modal_projector.mm_input_projection_weight
            proj.normal_(0.0, proj.shape[0] ** -0.5)
        return model

    def time_ratio(model) -> float:
        with torch.inference_mode():
            feats = model.get_image_features(inputs["pixel_values"]).pooler_output
            text = {k: v for k, v in inputs.items() if k != "pixel_values"}
            mm = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
            vision = min(timed(lambda: model.get_image_features(inputs["pixel_values"]),
                               repeat=5)[1] for _ in range(2))
            language = timed(lambda: model(**text, mm_encoder_outputs=mm, logits_to_keep=1),
                             repeat=5)[1]
        return vision / language

    best = min((abs(np.log(time_ratio(m) / target)), h, m)
               for h in (64, 128, 256, 384, 512, 768, 1024) for m in [build(h)])
    return wrap(best[2], processor, name=f"bench-vlm-vision{best[1]}"), time_ratio(best[2])


@contextmanager
def cache_off():
    """Pixels through the vision tower in every forward (what the model does without mechlora)."""
    saved = features.supports_features
    features.supports_features = lambda model: False
    try:
        yield
    finally:
        features.supports_features = saved


def restoration_diff(a, b) -> float:
    return max(float(np.abs(a.restoration[c] - b.restoration[c]).max()) for c in a.components)


def margin_diff(a, b) -> float:
    ma, mb = (np.array([r["margin"] for r in x.records]) for x in (a, b))
    return float(np.abs(ma - mb).max())


def run(quick: bool) -> list[Row]:
    groups = load_groups(EXAMPLE_PATH)[: 3 if quick else 8]
    pairs = make_pairs(groups)
    medgemma = vision_ratio(medgemma_4b_config(), 310)
    tok = build_tokenizer()
    processor = build_processor(tok, image_size=IMAGE_SIZE, image_seq_length=IMAGE_TOKENS)
    probe = wrap(Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=_tiny_text_config(len(tok), 1))), processor)  # encodes a typical prompt
    g = groups[0]
    inputs = probe.encode([g.variants[0].text], [probe.gray_image()])
    subject, ratio = benchmark_model(inputs, medgemma)
    what = (f"vision tower {ratio:.2f}x the time of a prompt's language forward (MedGemma-4B: "
            f"{medgemma:.2f}x in multiply-adds), {len(groups)} questions")
    rows = []

    def loc():
        subject.feature_cache = FeatureCache()
        return localize(subject, pairs, progress=False)

    with torch.inference_mode():
        loc()  # warm-up
        with cache_off():
            slow, slow_s = timed(loc)
        fast, fast_s = timed(loc)
    rows.append(Row(f"localize, {len(pairs)} pairs, 3 sites x 34 layers, last position (cached "
                    "engine: the image is in the shared prefix)", f"{what}; s, feature cache in "
                    f"memory (max abs diff of r {restoration_diff(slow, fast):.1e})",
                    f"{fast_s:.2f}", f"cache off {slow_s:.2f} s", f"{slow_s / fast_s:.2f}x",
                    COMMAND))

    few = pairs[:4]

    def loc_image():
        subject.feature_cache = FeatureCache()
        return localize(subject, few, positions="image", components=["resid"], progress=False)

    with torch.inference_mode():
        with cache_off():
            slow, slow_s = timed(loc_image)
        fast, fast_s = timed(loc_image)
    rows.append(Row(f"localize, {len(few)} pairs, resid x 34 layers, image positions (batched "
                    "engine: 34 rows per pair, each with the image)", f"s, feature cache in "
                    f"memory (max abs diff of r {restoration_diff(slow, fast):.1e})",
                    f"{fast_s:.2f}", f"cache off {slow_s:.2f} s", f"{slow_s / fast_s:.1f}x",
                    COMMAND))

    def ev():
        return evaluate(subject, groups, gray=True, swap=True, progress=False, n_boot=10)

    subject.feature_cache = FeatureCache()
    ev()  # warm-up
    with cache_off():
        slow, slow_s = timed(ev)
    subject.feature_cache = FeatureCache()
    fast, fast_s = timed(ev)
    rows.append(Row("eval, base model, 3 conditions (image, gray, swapped)", f"{what}; s, "
                    f"feature cache in memory (max abs diff of margins "
                    f"{margin_diff(slow, fast):.1e})", f"{fast_s:.2f}",
                    f"cache off {slow_s:.2f} s", f"{slow_s / fast_s:.2f}x", COMMAND))
    with tempfile.TemporaryDirectory() as folder:
        subject.feature_cache = FeatureCache(folder)
        _, cold_s = timed(ev)
        subject.feature_cache = FeatureCache(folder)  # a later run: features come from disk
        warm, warm_s = timed(ev)
    rows.append(Row("eval, a second run with `--feature-cache DIR`", f"s, features read from "
                    f"disk (max abs diff of margins vs cache off {margin_diff(slow, warm):.1e})",
                    f"{warm_s:.2f}", f"first run, cache filled {cold_s:.2f} s; cache off "
                    f"{slow_s:.2f} s", f"{slow_s / warm_s:.2f}x vs off", COMMAND))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}\n\n{Row.header()}")
    for row in run(args.quick):
        print(row.markdown())


if __name__ == "__main__":
    main()
