"""One place knows model families: `mechlora/models/family.py`, asked through `Subject`."""

from pathlib import Path

import pytest
import torch

from mechlora.models import family
from mechlora.patching import choose_engine
from tests.tiny import decoder, gemma3_text, gemma3_vlm, margins, paligemma, random_patches


@pytest.mark.parametrize("make, name, fold, window, vision", [
    (lambda: gemma3_text(16), "gemma3", True, 16, 0),
    (lambda: gemma3_vlm(16), "gemma3", True, 16, 2),
    (lambda: decoder("llama"), "llama", True, None, 0),
    (lambda: decoder("qwen2", use_sliding_window=True, sliding_window=12,
                     max_window_layers=1), "qwen2", True, 12, 0),
    (paligemma, "paligemma", False, None, 2),
    (lambda: decoder("gpt2"), "generic", False, None, 0),
])
def test_subject_answers_from_the_family_registry(make, name, fold, window, vision):
    from mechlora.features import vision_modules

    subject = make()
    assert subject.family.name == name
    assert (subject.fold_problem() is None) == fold
    assert subject.sliding_window == window
    assert len(subject.layer_kinds) == subject.n_layers
    assert len(vision_modules(subject.base)) == vision
    assert subject.cache_kwarg in ("cache", "past_key_values")
    if vision:
        assert subject.image_token_id == subject.base.config.image_token_id


def test_adding_a_family_is_one_registry_entry(monkeypatch):
    """GPT-2 is not registered, so `auto` avoids the cached engine; one `Family` entry makes
    it eligible, and the cached engine is then exact for it."""
    subject = decoder("gpt2")
    inputs = subject.encode(["is there an effusion?"])
    patches = random_patches(subject, inputs, 3)
    assert choose_engine("auto", subject, inputs, patches) == "batched"
    monkeypatch.setattr(family, "FAMILIES", family.FAMILIES + (family.Family("gpt2", ("gpt2",)),))
    assert subject.family.name == "gpt2"
    assert choose_engine("auto", subject, inputs, patches) == "cached"
    torch.testing.assert_close(margins(subject, inputs, patches, "cached"),
                               margins(subject, inputs, patches, "full"), rtol=0, atol=1e-5)


def test_no_model_type_is_named_outside_the_adapter():
    """Patching, localization, interventions, SAEs, the bridges and the feature cache ask the
    adapter; none of them tests a model type or reaches into KV-cache internals itself. A
    model type is a quoted word (`"gemma3_text"`, `'llama'`); an SAE layout such as
    "gemma-scope" names a file format, not a model."""
    import re

    root = Path(__file__).parents[1] / "mechlora"
    files = [root / name for name in ("patching.py", "localize.py", "features.py",
                                      "attribution.py", "probes.py", "sweep.py",
                                      "interventions.py")]
    files += sorted((root / "sae").glob("*.py")) + sorted((root / "bridges").glob("*.py"))
    model_type = re.compile(r"""["'](gemma\w*|paligemma\w*|llama\w*|qwen\w*|gpt2)["']""")
    for path in files:
        text = path.read_text()
        name = path.relative_to(root)
        assert not model_type.search(text), f"{name} names {model_type.search(text)[0]}"
        for word in ("model_type", "cumulative_length", '"vision_tower"',
                     "getattr(subject.base.config"):
            assert word not in text, f"{name} mentions {word}"
