"""Engines agree; a planted divergence is found; the result round-trips."""

import numpy as np
import pytest
import torch

from mechlora.data import EXAMPLE_PATH, load_groups, make_pairs
from mechlora.errors import MechloraError
from mechlora.localize import localize
from mechlora.result import LocalizationResult
from tests.planted import PHRASING_A, PHRASING_B, planted_groups, planted_subject
from tests.tiny import decoder


@pytest.fixture(scope="module")
def vlm_pairs():
    groups = load_groups(EXAMPLE_PATH)[:2]
    pairs = make_pairs(groups, max_pairs_per_group=2)
    lengths = {len(p.text_a) != len(p.text_b) for p in pairs}
    assert True in lengths  # pairs of different token lengths are covered
    return pairs


def _close(a: LocalizationResult, b: LocalizationResult, atol=1e-4):
    assert a.pair_ids == b.pair_ids
    np.testing.assert_allclose(a.margin_a, b.margin_a, rtol=1e-4, atol=atol)
    np.testing.assert_allclose(a.margin_b, b.margin_b, rtol=1e-4, atol=atol)
    for c in a.components:
        np.testing.assert_allclose(a.restoration[c], b.restoration[c], rtol=1e-4, atol=atol)


@pytest.mark.parametrize("positions", ["last", "suffix:3"])
def test_engines_agree_on_a_vlm_with_images(tiny_vlm, vlm_pairs, positions):
    runs = {e: localize(tiny_vlm, vlm_pairs, engine=e, positions=positions, progress=False)
            for e in ("full", "batched", "cached")}
    assert runs["cached"].n_pairs == len(vlm_pairs)
    _close(runs["full"], runs["batched"])
    _close(runs["full"], runs["cached"])
    # Patching the last layer's output at the last position hands over the whole answer.
    if positions == "last":
        np.testing.assert_allclose(runs["cached"].restoration["resid"][:, -1], 1.0, atol=1e-4)


def test_image_positions_before_the_question_are_refused(tiny_vlm, vlm_pairs):
    """With the image before the question (the MedGemma chat layout) both prompts are the same
    tokens up to the question, so under causal attention the image positions' activations
    are identical: patching them restores nothing, by construction."""
    for engine in ("auto", "full", "attribution"):
        with pytest.raises(MechloraError, match="cannot differ.*identical") as err:
            localize(tiny_vlm, vlm_pairs[:1], engine=engine, positions="image", progress=False)
        assert "0 by construction" in str(err.value)


def test_image_positions_after_the_question_use_batched_and_agree_with_full(tiny_vlm):
    """Engines at image positions (a layout with the image after the question): `auto` picks
    `batched` (the image block attends both ways, so no prefix cache) and matches `full`."""
    from mechlora.patching import RUNNERS, SitePatch, choose_engine
    from mechlora.probes import all_sites

    proc = tiny_vlm.processor
    inputs = proc(text=["Is there fluid? <start_of_image>"], images=[[tiny_vlm.gray_image()]],
                  return_tensors="pt")
    inputs = dict(inputs)
    image = (inputs["input_ids"][0] == tiny_vlm.image_token_id).nonzero().flatten()
    assert int(image.min()) > 5
    torch.manual_seed(0)
    patches = [SitePatch(s, image, torch.randn(len(image), tiny_vlm.text_config.hidden_size))
               for s in all_sites(tiny_vlm.n_layers)]
    assert choose_engine("auto", tiny_vlm, inputs, patches) == "batched"
    with torch.inference_mode():
        full = RUNNERS["full"](tiny_vlm, inputs, patches, [5, 6], 0)
        batched = RUNNERS["batched"](tiny_vlm, inputs, patches, [5, 6], 0)
    torch.testing.assert_close(batched, full, rtol=0, atol=1e-5)


def test_engines_agree_on_a_text_model(tiny_text, vlm_pairs):
    full = localize(tiny_text, vlm_pairs[:2], engine="full", progress=False)
    cached = localize(tiny_text, vlm_pairs[:2], engine="cached", progress=False)
    _close(full, cached)


def test_choice_head_gives_the_full_logits_of_the_choices(tiny_text):
    from mechlora.patching import choice_head, last_logits

    inputs = tiny_text.encode(["Is there an opacity?"])
    ids = [5, 17, 3]
    config = tiny_text.text_config
    for cap in (None, 2.0):  # Gemma 2-style softcapping must still apply to the narrow head
        config.final_logit_softcapping = cap
        try:
            full = last_logits(tiny_text, inputs)
            with choice_head(tiny_text, ids) as cols:
                narrow = last_logits(tiny_text, inputs)
        finally:
            config.final_logit_softcapping = None
        assert cols == [0, 1, 2] and narrow.shape == (1, 3)
        torch.testing.assert_close(narrow, full[:, ids])
        assert last_logits(tiny_text, inputs).shape == full.shape  # the head is restored


def test_logit_lens_can_be_skipped(tiny_text, vlm_pairs):
    with_lens = localize(tiny_text, vlm_pairs[:2], progress=False)
    without = localize(tiny_text, vlm_pairs[:2], logit_lens=False, progress=False)
    assert set(with_lens.divergence) == {"cosine", "logit_lens_kl"}
    assert set(without.divergence) == {"cosine"}
    _close(with_lens, without, atol=1e-6)
    np.testing.assert_allclose(with_lens.divergence["cosine"], without.divergence["cosine"])
    assert (with_lens.divergence["logit_lens_kl"] >= -1e-6).all()


@pytest.mark.parametrize("positions", ["last", "suffix:3"])
@pytest.mark.parametrize("model", ["gemma3-vlm", "llama", "qwen2"])
def test_folded_rows_share_one_prefix_and_agree_with_full(model, positions, tiny_vlm, vlm_pairs,
                                                          monkeypatch):
    """The cached engine folds its patched rows into one sequence over the single prefix (no
    per-row copy of the prefix cache); that must give exactly the `full` engine's answer."""
    from mechlora.patching import Prefix

    subject = tiny_vlm if model == "gemma3-vlm" else decoder(model)
    folded = []
    original = Prefix.folded_masks
    monkeypatch.setattr(Prefix, "folded_masks",
                        lambda self, *a: folded.append(a[2:]) or original(self, *a))
    kw = dict(positions=positions, progress=False, min_delta=1e-3)
    cached = localize(subject, vlm_pairs[:3], engine="cached", **kw)
    assert folded and all(rows == 3 * subject.n_layers for rows, _ in folded)
    _close(localize(subject, vlm_pairs[:3], engine="full", **kw), cached)


def test_all_donors_of_a_recipient_share_one_engine_call(tiny_vlm, monkeypatch):
    from mechlora.patching import RUNNERS

    group = next(g for g in load_groups(EXAMPLE_PATH) if len(g.variants) >= 3)
    pairs = make_pairs([group])  # every ordered pair: each variant is the recipient n-1 times
    n = len(group.variants)
    calls, cached_runner = [], RUNNERS["cached"]

    def counting(subject, inputs, patches, *args, **kw):
        calls.append(len(patches))
        return cached_runner(subject, inputs, patches, *args, **kw)

    monkeypatch.setitem(RUNNERS, "cached", counting)
    kw = dict(positions="last", progress=False, min_delta=1e-6)
    cached = localize(tiny_vlm, pairs, engine="cached", **kw)
    assert calls == [(n - 1) * 3 * tiny_vlm.n_layers] * n  # one call per recipient
    assert cached.pair_ids == [p.id for p in pairs]  # results stay in the input order
    _close(localize(tiny_vlm, pairs, engine="full", **kw), cached)


@pytest.mark.parametrize("k", [2, 5])
def test_planted_divergence_is_found(k):
    subject = planted_subject(k)
    result = localize(subject, planted_groups(), progress=False)
    assert result.n_pairs == 6 and not result.excluded
    mlp = result.mean("mlp")
    assert int(np.argmax(mlp)) == k
    assert mlp[k] > 0.9
    assert np.abs(np.delete(mlp, k)).max() < 0.2
    assert int(np.argmax(result.scores)) == k
    resid = result.mean("resid")
    assert np.abs(resid[:k]).max() < 1e-3  # nothing about the phrasing reaches the last position
    np.testing.assert_allclose(resid[k:], 1.0, atol=0.05)


def test_only_flips_keeps_exactly_the_pairs_that_flip():
    """The planted model answers phrasing A one way and phrasing B the other: A-B pairs flip,
    A-A and B-B pairs do not. `only_flips` must keep the first and drop the second."""
    from mechlora.data import QuestionGroup, Variant

    subject = planted_subject(2)
    same = [QuestionGroup(id=f"same{i}", variants=(Variant(p[0] + "?"),
                                                   Variant(p[1] + "?", "lexical")),
                          answer="yes") for i, p in enumerate((PHRASING_A, PHRASING_B))]
    groups = planted_groups() + same
    every = localize(subject, groups, min_delta=1e-3, progress=False)
    assert every.n_pairs == 10 and not every.excluded
    flipped = [pid for pid, ma, mb in zip(every.pair_ids, every.margin_a, every.margin_b)
               if np.sign(ma) != np.sign(mb)]
    assert len(flipped) == 6 and not any(pid.startswith("same") for pid in flipped)
    flips = localize(subject, groups, only_flips=True, min_delta=1e-3, progress=False)
    assert flips.pair_ids == flipped
    rows = [every.pair_ids.index(pid) for pid in flipped]
    for c in flips.components:  # keeping a pair does not change its numbers
        np.testing.assert_array_equal(flips.restoration[c], every.restoration[c][rows])


def test_exclusion_by_min_delta(tiny_vlm, vlm_pairs):
    huge = localize(tiny_vlm, vlm_pairs, min_delta=1e9, progress=False)
    assert huge.n_pairs == 0 and len(huge.excluded) == len(vlm_pairs)
    assert "reason" in huge.excluded[0]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_min_delta_must_be_positive(tiny_text, vlm_pairs, bad):
    for engine in ("auto", "attribution"):
        with pytest.raises(MechloraError, match="min_delta must be a positive"):
            localize(tiny_text, vlm_pairs[:1], min_delta=bad, engine=engine, progress=False)


def test_suffix_reaching_into_the_question_is_refused_naming_the_token(tiny_text):
    """The chat template's shared suffix of these prompts is '?' + 9 template tokens; one
    more reaches the last letter of the question, which differs."""
    from mechlora.data import QuestionGroup, Variant

    groups = [QuestionGroup(id="g", variants=(Variant("is there fluid?"),
                                              Variant("is there an effusion?", "lexical")),
                            answer="yes")]
    kw = dict(min_delta=1e-3, progress=False)
    assert localize(tiny_text, groups, positions="suffix:10", **kw).n_pairs == 2
    with pytest.raises(MechloraError, match=r"token 11 from the end is 'd' \(position \d+\) "
                                            r"in the donor but 'n'.*use suffix:10 or less"):
        localize(tiny_text, groups, positions="suffix:11", **kw)
    with pytest.raises(MechloraError, match="suffix:10 or less"):
        localize(tiny_text, groups, positions="suffix:30", engine="attribution", **kw)


def test_result_round_trip(tmp_path, tiny_vlm, vlm_pairs):
    result = localize(tiny_vlm, vlm_pairs[:2], progress=False)
    result.save(tmp_path)
    back = LocalizationResult.load(tmp_path)
    _close(result, back, atol=0)
    np.testing.assert_allclose(back.scores, result.scores)
    assert back.summary()["score"]["name"] == "resid_increment"


def test_bad_positions_and_components(tiny_text, vlm_pairs):
    with pytest.raises(MechloraError, match="positions"):
        localize(tiny_text, vlm_pairs[:1], positions="first", progress=False)
    with pytest.raises(MechloraError, match="unknown site 'neurons'"):
        localize(tiny_text, vlm_pairs[:1], components=["resid", "neurons"], progress=False)
    with pytest.raises(MechloraError, match="vision-language"):
        localize(tiny_text, vlm_pairs[:1], positions="image", progress=False)
