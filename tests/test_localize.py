"""Engines agree; a planted divergence is found; the result round-trips."""

import numpy as np
import pytest

from mechlora.data import EXAMPLE_PATH, load_groups, make_pairs
from mechlora.errors import MechloraError
from mechlora.localize import localize
from mechlora.result import LocalizationResult
from tests.planted import planted_groups, planted_subject


@pytest.fixture(scope="module")
def vlm_pairs():
    groups = load_groups(EXAMPLE_PATH)[:2]
    pairs = make_pairs(groups, max_pairs_per_group=2)
    lengths = {len(p.text_a) != len(p.text_b) for p in pairs}
    assert True in lengths  # pairs of different token lengths are covered
    return pairs


def _close(a: LocalizationResult, b: LocalizationResult, atol=1e-4):
    assert a.pair_ids == b.pair_ids
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


def test_image_positions_use_batched_and_agree_with_full(tiny_vlm, vlm_pairs):
    full = localize(tiny_vlm, vlm_pairs[:2], engine="full", positions="image", progress=False)
    auto = localize(tiny_vlm, vlm_pairs[:2], engine="auto", positions="image", progress=False)
    assert auto.engine == "batched"
    _close(full, auto)
    with pytest.raises(MechloraError, match="cached engine cannot"):
        localize(tiny_vlm, vlm_pairs[:1], engine="cached", positions="image", progress=False)


def test_engines_agree_on_a_text_model(tiny_text, vlm_pairs):
    full = localize(tiny_text, vlm_pairs[:2], engine="full", progress=False)
    cached = localize(tiny_text, vlm_pairs[:2], engine="cached", progress=False)
    _close(full, cached)


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


def test_only_flips_and_exclusion(tiny_vlm, vlm_pairs):
    flips = localize(tiny_vlm, vlm_pairs, only_flips=True, progress=False)
    every = localize(tiny_vlm, vlm_pairs, progress=False)
    for pid, ma, mb in zip(flips.pair_ids, flips.margin_a, flips.margin_b):
        assert np.sign(ma) != np.sign(mb), pid
    assert flips.n_pairs <= every.n_pairs
    huge = localize(tiny_vlm, vlm_pairs, min_delta=1e9, progress=False)
    assert huge.n_pairs == 0 and len(huge.excluded) == len(vlm_pairs)
    assert "reason" in huge.excluded[0]


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
    with pytest.raises(MechloraError, match="component"):
        localize(tiny_text, vlm_pairs[:1], components=["resid", "heads"], progress=False)
    with pytest.raises(MechloraError, match="vision-language"):
        localize(tiny_text, vlm_pairs[:1], positions="image", progress=False)
