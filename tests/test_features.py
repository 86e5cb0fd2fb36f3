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


def _pixels(subject):
    return subject.encode(["Is there fluid?"], [subject.gray_image()])["pixel_values"]


def test_in_place_change_of_the_vision_weights_is_not_served_stale(tmp_path):
    model, processor = tiny_gemma3_vlm(seed=0, n_layers=2)
    subject = wrap(model, processor)
    cache = FeatureCache(tmp_path)
    pixels = _pixels(subject)
    with torch.no_grad():
        before = cache.features(model, pixels)
        # one element the old strided fingerprint never read
        model.model.vision_tower.post_layernorm.weight[1] += 0.5
        after = cache.features(model, pixels)
        direct = model.get_image_features(pixels).pooler_output
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, direct, rtol=0, atol=0)
    assert cache.misses == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_a_new_model_at_a_reused_id_gets_its_own_features(monkeypatch):
    """Python reuses a freed object's id for the next one; simulated here by making every id
    equal, which a cache keyed by id(model) would answer with the first model's features."""
    from mechlora import features

    monkeypatch.setattr(features, "id", lambda obj: 42, raising=False)
    cache = FeatureCache()
    first, processor = tiny_gemma3_vlm(seed=0, n_layers=2)
    second, _ = tiny_gemma3_vlm(seed=1, n_layers=2)
    pixels = _pixels(wrap(first, processor))
    with torch.no_grad():
        cache.features(first, pixels)
        got = cache.features(second, pixels)
        direct = second.get_image_features(pixels).pooler_output
    torch.testing.assert_close(got, direct, rtol=0, atol=0)
    assert cache.misses == 2


def test_dtype_is_part_of_the_key_and_loaded_features_take_the_runs_dtype(tmp_path):
    model, processor = tiny_gemma3_vlm(seed=0, n_layers=2)
    pixels = _pixels(wrap(model, processor))
    with torch.no_grad():
        fp32 = FeatureCache(tmp_path).features(model, pixels)
        model.to(torch.bfloat16)
        bf16 = FeatureCache(tmp_path).features(model, pixels.to(torch.bfloat16))
        direct = model.get_image_features(pixels.to(torch.bfloat16)).pooler_output
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16, direct, rtol=0, atol=0)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 2 and {"float32", "bfloat16"} == {f.stem.split("-")[1] for f in files}
    # A file holding another dtype under the run's key (an older writer) is cast on load.
    from safetensors.torch import load_file, save_file

    bf16_file = next(f for f in files if "bfloat16" in f.name)
    save_file({"features": load_file(str(bf16_file))["features"].float()}, str(bf16_file))
    with torch.no_grad():
        loaded = FeatureCache(tmp_path).features(model, pixels.to(torch.bfloat16))
    assert loaded.dtype == torch.bfloat16
    torch.testing.assert_close(loaded, direct, rtol=0, atol=0)
