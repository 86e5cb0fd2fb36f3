"""The cached engine is exact where it most likely breaks, and refuses where it cannot be.

Every comparison is against the `full` engine (one plain forward per patch): prompts longer
than a sliding window, patched suffixes that reach across the window's edge, mixed layer
kinds, text and VLM, folded and unfolded rows, eager/sdpa and an unknown attention
implementation, left padding, bf16, and bidirectional models.
"""

import numpy as np
import pytest
import torch

from mechlora import patching
from mechlora.data import QuestionGroup, Variant
from mechlora.errors import MechloraError
from mechlora.localize import localize
from mechlora.patching import Prefix, SitePatch, choose_engine
from tests.tiny import decoder, gemma3_text, gemma3_vlm, margins, paligemma, random_patches

QUESTIONS = ["fluid?", "is there an effusion?",
             "does this film show fluid in the pleural space of the left lung?"]


@pytest.fixture
def fold_calls(monkeypatch):
    """The (held, rows, k, window) of every folded mask built."""
    calls, original = [], patching.fold_mask

    def spy(start, held, rows, k, window, *args):
        calls.append((held, rows, k, window))
        return original(start, held, rows, k, window, *args)

    monkeypatch.setattr(patching, "fold_mask", spy)
    return calls


@pytest.fixture
def unfolded(monkeypatch):
    monkeypatch.setattr(Prefix, "fold_problem", lambda self, subject: "forced for the test")


def _inputs(subject, question: str):
    image = [subject.gray_image()] if subject.is_vlm else None
    return subject.encode([question], image)


WINDOWS, SUFFIXES = (8, 16, 40), (1, 3, 12, 30, 60)


@pytest.mark.parametrize("kind", ["text", "vlm"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_folded_rows_are_exact_across_the_sliding_window(kind, attn, fold_calls):
    """Prompts of 79-89 tokens, windows of 8-40, patched suffixes from 1 to 60 tokens: the
    suffix starts before the window edge and ends after it, or starts beyond it."""
    crossed = set()
    for window in WINDOWS:
        subject = (gemma3_text if kind == "text" else gemma3_vlm)(window, attn=attn)
        inputs = _inputs(subject, QUESTIONS[2])
        length = inputs["input_ids"].shape[1]
        assert length > window
        for k in SUFFIXES:
            _check_folded(subject, inputs, window, k, fold_calls)
            crossed.add("edge" if length - k < window else "beyond")
    assert crossed == {"edge", "beyond"}


def _check_folded(subject, inputs, window: int, k: int, fold_calls: list) -> None:
    patches = random_patches(subject, inputs, k)
    fold_calls.clear()
    full = margins(subject, inputs, patches, "full")
    cached = margins(subject, inputs, patches, "cached")
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
    assert {window} <= {w for *_, w in fold_calls}  # the sliding layers' mask was folded
    start = inputs["input_ids"].shape[1] - k
    held = {h for h, *_, w in fold_calls if w == window}
    assert held == {min(start, window - 1)}  # sized to what the sliding cache holds


@pytest.mark.parametrize("kind", ["text", "vlm"])
def test_unfolded_rows_over_a_sliding_cache_are_exact(kind, unfolded, fold_calls):
    for window in WINDOWS:
        subject = (gemma3_text if kind == "text" else gemma3_vlm)(window)
        inputs = _inputs(subject, QUESTIONS[2])
        for k in SUFFIXES:
            patches = random_patches(subject, inputs, k)
            torch.testing.assert_close(margins(subject, inputs, patches, "cached"),
                                       margins(subject, inputs, patches, "full"),
                                       rtol=0, atol=1e-5)
    assert not fold_calls


@pytest.mark.parametrize("fold", [True, False])
def test_left_padding_is_exact(fold, monkeypatch):
    """A prompt left-padded in a batch (row 0 of two) keeps its padding mask and its position
    ids; the pad slots count toward the sliding window, as in transformers."""
    if not fold:
        monkeypatch.setattr(Prefix, "fold_problem", lambda self, subject: "forced")
    subject = gemma3_text(16)
    batch = subject.encode([QUESTIONS[1], QUESTIONS[2]])
    inputs = {key: v[:1] for key, v in batch.items()}
    assert not bool(inputs["attention_mask"].all())  # it is padded
    for k in (1, 12, 20, 70):
        patches = random_patches(subject, inputs, k)
        torch.testing.assert_close(margins(subject, inputs, patches, "cached"),
                                   margins(subject, inputs, patches, "full"), rtol=0, atol=1e-5)


def test_bf16_stays_within_rounding(fold_calls):
    """bf16: the folded step runs other kernel shapes than a plain forward, so margins differ
    by bf16 rounding (measured: at most 0.016 logits, one bf16 step at |margin| ~ 2); the
    tolerance, 0.05, is far below the sliding-window error this guards against (order 1).
    Suffixes of 30 and 60 of the 79 tokens start beyond and before the window's edge at 40."""
    subject = gemma3_text(40)
    subject.model.to(torch.bfloat16)
    inputs = _inputs(subject, QUESTIONS[2])
    for k in (1, 30, 60):
        patches = random_patches(subject, inputs, k)
        full = margins(subject, inputs, patches, "full")
        torch.testing.assert_close(margins(subject, inputs, patches, "cached"), full,
                                   rtol=0, atol=0.05)
    assert {w for *_, w in fold_calls} == {None, 40}


def test_localize_is_exact_when_a_pair_crosses_the_window(tmp_path):
    """End to end: clean runs with an image, their reused prefixes, suffix:9 within the shared
    template; the 32-token prompt's suffix starts at 23, before the window's edge at 24."""
    subject = gemma3_vlm(24)
    image = tmp_path / "gray.png"
    subject.gray_image().save(image)
    groups = [QuestionGroup(id=f"g{i}", variants=(Variant(a), Variant(b, "lexical")),
                            answer="yes", image=str(image))
              for i, (a, b) in enumerate([(QUESTIONS[0], QUESTIONS[1]),
                                          (QUESTIONS[1], QUESTIONS[2])])]
    assert _inputs(subject, QUESTIONS[0])["input_ids"].shape[1] == 32
    kw = dict(positions="suffix:9", min_delta=0.05, progress=False)
    full = localize(subject, groups, engine="full", **kw)
    cached = localize(subject, groups, engine="cached", **kw)
    assert full.n_pairs == 4 and cached.pair_ids == full.pair_ids
    for c in full.components:
        np.testing.assert_allclose(cached.restoration[c], full.restoration[c], atol=1e-4)


def test_unknown_attention_implementation_runs_unfolded_rows_exactly(fold_calls):
    """Folding is for eager and sdpa only: another implementation (here sdpa registered under
    a new name, as a kernel library would) gets one row per patch, still exact."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("mechlora_test", sdpa_attention_forward)
    AttentionMaskInterface.register("mechlora_test", sdpa_mask)
    subject = gemma3_text(16, attn="mechlora_test")
    assert "mechlora_test" in subject.fold_problem()
    inputs = _inputs(subject, QUESTIONS[2])
    patches = random_patches(subject, inputs, 20)
    torch.testing.assert_close(margins(subject, inputs, patches, "cached"),
                               margins(subject, inputs, patches, "full"), rtol=0, atol=1e-5)
    assert not fold_calls
    subject.text_config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in subject.fold_problem()


@pytest.mark.parametrize("model", ["gemma3-bidirectional", "paligemma"])
def test_bidirectional_prompts_never_get_the_cached_engine(model):
    subject = gemma3_text(16, use_bidirectional_attention=True) if model != "paligemma" \
        else paligemma()
    inputs = subject.encode([QUESTIONS[1]])
    patches = random_patches(subject, inputs, 3)
    assert choose_engine("auto", subject, inputs, patches) == "batched"
    with pytest.raises(MechloraError, match="both ways|bidirectional"):
        margins(subject, inputs, patches, "cached")
    # ... and `batched` is exact there: one plain forward per row
    torch.testing.assert_close(margins(subject, inputs, patches, "batched"),
                               margins(subject, inputs, patches, "full"), rtol=0, atol=1e-5)


def test_bidirectional_localize_auto_is_exact_and_cached_refuses():
    subject = gemma3_text(16, use_bidirectional_attention=True)
    groups = [QuestionGroup(id="g", variants=(Variant(QUESTIONS[0]), Variant(QUESTIONS[1],
                                                                              "lexical")),
                            answer="yes")]
    kw = dict(min_delta=1e-3, progress=False)
    auto = localize(subject, groups, engine="auto", **kw)
    assert auto.engine == "batched"
    full = localize(subject, groups, engine="full", **kw)
    np.testing.assert_allclose(auto.restoration["resid"], full.restoration["resid"], atol=1e-5)
    with pytest.raises(MechloraError, match="use_bidirectional_attention"):
        localize(subject, groups, engine="cached", **kw)


def test_image_tokens_after_the_patched_position_refuse_the_cache():
    """Gemma 3's image block attends both ways: a prefix cut inside or before it is not final."""
    subject = gemma3_vlm(16)
    inputs = _inputs(subject, QUESTIONS[0])
    image = (inputs["input_ids"][0] == subject.image_token_id).nonzero().flatten()
    patches = [SitePatch(p.site, image, p.values[:1].expand(len(image), -1))
               for p in random_patches(subject, inputs, 1)]
    assert choose_engine("auto", subject, inputs, patches) == "batched"
    with pytest.raises(MechloraError, match="image tokens"):
        margins(subject, inputs, patches, "cached")


def test_unregistered_families_get_batched_under_auto_and_cached_stays_exact():
    subject = decoder("gpt2")
    assert subject.family.name == "generic" and subject.fold_problem()
    inputs = subject.encode([QUESTIONS[2]])
    patches = random_patches(subject, inputs, 4)
    assert choose_engine("auto", subject, inputs, patches) == "batched"
    torch.testing.assert_close(margins(subject, inputs, patches, "cached"),
                               margins(subject, inputs, patches, "full"), rtol=0, atol=1e-5)


def test_qwen2_sliding_layers_fold_exactly(fold_calls):
    subject = decoder("qwen2", use_sliding_window=True, sliding_window=12, max_window_layers=1)
    assert set(subject.layer_kinds) == {"full_attention", "sliding_attention"}
    inputs = _inputs(subject, QUESTIONS[2])
    for k in (3, 20):
        patches = random_patches(subject, inputs, k)
        torch.testing.assert_close(margins(subject, inputs, patches, "cached"),
                                   margins(subject, inputs, patches, "full"), rtol=0, atol=1e-5)
    assert {w for *_, w in fold_calls} == {None, 12}
