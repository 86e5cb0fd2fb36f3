"""nnsight and TransformerLens engines equal the hooks engines; TL's own patching agrees."""

import numpy as np
import pandas as pd
import pytest
import torch

from mechlora.bridges import is_bridge
from mechlora.bridges.tlens import HOOKS, boot_bridge, bridged_subject, subject_from_bridge
from mechlora.data import EXAMPLE_PATH, QuestionGroup, Variant, load_groups, make_pairs
from mechlora.errors import MechloraError
from mechlora.localize import localize
from mechlora.models import wrap
from mechlora.models.presets import tiny_gemma3_text, tiny_gemma3_vlm
from mechlora.patching import margin
from mechlora.probes import COMPONENTS, Site, record

# Random tiny models move the margin by less than localize's default min_delta; these tests
# compare numbers pair by pair, so they keep every pair.
KW = dict(min_delta=1e-3, progress=False)


@pytest.fixture(scope="module")
def models():
    vlm, processor = tiny_gemma3_vlm(seed=0, n_layers=4)
    text, tok = tiny_gemma3_text(seed=0, n_layers=4)
    return {"vlm": wrap(vlm, processor, name="vlm-4"), "text": wrap(text, tok, name="text-4")}


@pytest.fixture(scope="module")
def pairs():
    pairs = make_pairs(load_groups(EXAMPLE_PATH)[:2], max_pairs_per_group=1)
    assert len({len(p.text_a) for p in pairs} | {len(p.text_b) for p in pairs}) > 1
    return pairs


def _same(a, b, rtol=1e-5, atol=1e-5):
    assert a.pair_ids == b.pair_ids and a.n_pairs > 0
    np.testing.assert_allclose(a.margin_a, b.margin_a, rtol=1e-6)
    for c in a.components:
        np.testing.assert_allclose(a.restoration[c], b.restoration[c], rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", ["vlm", "text"])
def test_nnsight_and_tlens_equal_the_hooks_engines(models, pairs, kind):
    subject = models[kind]
    runs = {e: localize(subject, pairs, engine=e, positions="suffix:2", **KW)
            for e in ("batched", "nnsight", "tlens")}
    assert runs["nnsight"].engine == "nnsight" and runs["tlens"].engine == "tlens"
    _same(runs["batched"], runs["nnsight"])
    # tlens runs on a bridged copy, whose attention TL switches to eager (HF default: sdpa).
    _same(runs["batched"], runs["tlens"])


def test_a_bridge_is_a_subject_and_its_hook_points_are_mechloras_sites(models, pairs):
    bridge = boot_bridge(models["vlm"])
    assert is_bridge(bridge) and not is_bridge(models["vlm"].model)
    subject = subject_from_bridge(bridge)
    inputs = subject.encode(["Is there fluid?"], [subject.gray_image()])
    np.testing.assert_array_equal(inputs["input_ids"],
                                  models["vlm"].encode(["Is there fluid?"],
                                                       [subject.gray_image()])["input_ids"])
    sites = [Site(1, c) for c in COMPONENTS]
    positions = torch.arange(inputs["input_ids"].shape[1])[None]
    with torch.no_grad(), record(subject, sites, positions) as ours:
        _, cache = bridge.run_with_cache(inputs.pop("input_ids"), **inputs)
    for s in sites:
        torch.testing.assert_close(ours[s], cache[HOOKS[s.component].format(1)],
                                   rtol=0, atol=0)
    via_bridge = localize(bridge, pairs, engine="tlens", **KW)
    same_model = localize(subject, pairs, engine="batched", **KW)
    _same(via_bridge, same_model, rtol=1e-6, atol=1e-6)
    _same(via_bridge, localize(models["vlm"], pairs, engine="batched", **KW))


def test_resid_matches_transformer_lens_patching(models):
    from transformer_lens import patching

    # Permuted words: equal character counts, so equal token lengths (char-level tokenizer).
    groups = [QuestionGroup(id=f"g{i}", variants=(Variant(a), Variant(b, "syntactic")),
                            answer="yes")
              for i, (a, b) in enumerate([("is there an effusion?", "is an effusion there?"),
                                          ("is the heart enlarged?", "is the enlarged heart?")])]
    bridge = boot_bridge(models["text"])
    subject = subject_from_bridge(bridge)
    result = localize(bridge, groups, components=["resid"], engine="tlens", **KW)
    assert result.n_pairs == 4
    ids = subject.answer_token_ids(("yes", "no"))
    n = subject.n_layers
    for row, pair in enumerate(make_pairs(groups)):
        tok_a, tok_b = (subject.encode([pair.group.variants[v].text])["input_ids"]
                        for v in (pair.a, pair.b))
        assert tok_a.shape == tok_b.shape

        def metric(logits):
            return margin(logits[:, -1], ids, 0)[0]

        with torch.no_grad():
            m_a, m_b = metric(bridge(tok_a)), metric(bridge(tok_b))
            _, cache_a = bridge.run_with_cache(tok_a)
            # TL's resid_pre of layer l + 1 is mechlora's resid site l (layer l's output).
            index = pd.DataFrame({"layer": range(1, n), "pos": tok_b.shape[1] - 1})
            patched = patching.get_act_patch_resid_pre(bridge, tok_b, cache_a, metric,
                                                       index_axis_names=None, index_df=index)
        tl = ((patched - m_b) / (m_a - m_b)).numpy()
        np.testing.assert_allclose(result.restoration["resid"][row, :n - 1], tl,
                                   rtol=1e-5, atol=1e-5)


def test_boot_bridge_copies_the_model_and_never_installs_torchvision(models, monkeypatch):
    from transformer_lens.model_bridge.sources.transformers import helpers

    def install():
        raise AssertionError("TransformerLens tried to pip-install torchvision")

    def no_processor(*args, **kwargs):
        raise OSError("no processor here")  # the failure that triggers TL's install

    monkeypatch.setattr(helpers, "_ensure_torchvision", install)
    monkeypatch.setattr(helpers.transformers.AutoProcessor, "from_pretrained", no_processor)
    subject = models["vlm"]
    layer_type = type(subject.layers[0])
    attn = subject.base.config._attn_implementation
    before = {k: v.clone() for k, v in subject.model.state_dict().items()}
    bridge = boot_bridge(subject.model, subject.processor)
    assert helpers._ensure_torchvision is install  # the guard is scoped to the boot
    assert type(subject.layers[0]) is layer_type
    assert subject.base.config._attn_implementation == attn
    assert bridge.original_model is not subject.model
    after = subject.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tlens_engine_reboots_after_in_place_weight_changes():
    model, tok = tiny_gemma3_text(seed=3, n_layers=2)
    subject = wrap(model, tok)
    first = bridged_subject(subject)
    assert bridged_subject(subject) is first
    with torch.no_grad():
        subject.layers[0].mlp.down_proj.weight.mul_(2.0)
    second = bridged_subject(subject)
    assert second is not first
    weight = subject.layers[0].mlp.down_proj.weight
    assert torch.equal(second.layers[0].mlp.down_proj.weight, weight)


def test_bridge_mistakes_are_clear(models):
    with pytest.raises(MechloraError, match="TransformerBridge"):
        subject_from_bridge(models["text"].model)
    with pytest.raises(MechloraError, match="processor"):
        boot_bridge(models["text"].model)


def test_nnsight_engine_leaves_the_model_as_it_was(pairs):
    """NNsight(model) puts a controller into every module's forward and keeps its state on
    the module; after the engine ran, modules, hooks and forwards are as they were (a user's
    own hook and instance forward included)."""
    model, tok = tiny_gemma3_text(seed=0, n_layers=2)
    subject = wrap(model, tok)
    handle = subject.layers[0].register_forward_hook(lambda module, args, out: None)
    mlp = subject.mlp(1)
    own = mlp.forward  # a bound method set on the instance, as some libraries do
    mlp.forward = own

    def state():
        return {name: (type(m), sorted(m.__dict__), m.__dict__.get("forward"),
                       dict(m._forward_hooks), dict(m._forward_pre_hooks))
                for name, m in model.named_modules()}

    before = state()
    inputs = subject.encode(["Is there fluid?"])
    with torch.no_grad():
        logits = model(**inputs).logits
    for _ in range(2):
        localize(subject, pairs, engine="nnsight", **KW)
        assert state() == before
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=0, atol=0)
    assert not any("__nnsight__" in m.__dict__ for m in model.modules())
    handle.remove()
