"""Image features are computed once and give identical results with and without the cache."""

import numpy as np
import torch

from mechlora.data import EXAMPLE_PATH, load_groups, load_image, make_pairs
from mechlora.features import FeatureCache, with_image_features
from mechlora.localize import localize
from mechlora.models import wrap
from mechlora.models.presets import tiny_gemma3_vlm


def test_cached_features_equal_the_vision_tower(tiny_vlm, tmp_path):
    g = load_groups(EXAMPLE_PATH)[0]
    inputs = tiny_vlm.encode([g.variants[0].text], [load_image(g.image)])
    cache = FeatureCache(tmp_path)
    with torch.no_grad():
        direct = tiny_vlm.base.get_image_features(inputs["pixel_values"]).pooler_output
        first = cache.features(tiny_vlm.base, inputs["pixel_values"])
        again = FeatureCache(tmp_path).features(tiny_vlm.base, inputs["pixel_values"])
    torch.testing.assert_close(first, direct, rtol=0, atol=0)
    torch.testing.assert_close(again, direct, rtol=0, atol=0)
    assert cache.misses == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1


def test_localize_identical_with_and_without_a_disk_cache(tmp_path):
    groups = load_groups(EXAMPLE_PATH)[:4]
    pairs = make_pairs(groups, max_pairs_per_group=2)
    n_images = len({g.image for g in groups})
    assert 1 < n_images < len(groups)  # some images are shared between questions
    results = []
    for cache in (None, FeatureCache(tmp_path)):
        subject = wrap(*tiny_gemma3_vlm(seed=0, n_layers=3))
        subject.feature_cache = cache
        results.append(localize(subject, pairs, min_delta=1e-6, progress=False))
        if cache is not None:
            # each distinct image is encoded once, whatever the questions and phrasings
            assert cache.misses == n_images and cache.hits > n_images
    for c in results[0].components:
        np.testing.assert_array_equal(results[0].restoration[c], results[1].restoration[c])


def test_adapted_vision_tower_is_never_cached(tiny_vlm):
    from peft import LoraConfig, get_peft_model

    model, processor = tiny_gemma3_vlm(seed=0, n_layers=2)
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"], r=2))
    subject = wrap(peft_model, processor)
    g = load_groups(EXAMPLE_PATH)[0]
    inputs = subject.encode([g.variants[0].text], [load_image(g.image)])
    with_image_features(subject, inputs)
    assert subject.feature_cache.fingerprint(subject.base) is None
    assert len(subject.feature_cache.memory) == 0
