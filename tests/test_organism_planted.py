"""The planted commit depth: what the answer position can read, what localization finds, and
the cached engine's exactness on the organisms' short sliding windows."""

import numpy as np
import pytest
import torch

from mechlora.data import load_groups, make_pairs
from mechlora.errors import MechloraError
from mechlora.localize import localize
from mechlora.models import load_model
from mechlora.organism import ORGANISMS, build_organism, load_folds, organism_config
from mechlora.organism.films import render_array, sample_film
from mechlora.organism.train import (
    OrganismConfig,
    Prompts,
    build_model,
    check_planted,
    organism_processor,
)

# Same token length as the first, another word early on; then another length altogether.
QUESTIONS = ("Is there an opacity?", "Is there an infiltrate?",
             "The patient has a cough. Is the heart larger than it should be?")


def _last_position_states(cfg: OrganismConfig) -> list[torch.Tensor]:
    """[layers + 1, hidden] states of the answer position for each of QUESTIONS, random init."""
    processor = organism_processor(cfg)
    model = build_model(cfg, processor.tokenizer).eval()
    prompts = Prompts(processor)
    image = render_array(sample_film(3))[None]
    states = []
    for q in QUESTIONS:
        with torch.no_grad():
            out = model(**prompts.batch([q], image), output_hidden_states=True)
        states.append(torch.stack([h[0, -1] for h in out.hidden_states]))
    return states


@pytest.mark.parametrize("preset", list(ORGANISMS))
def test_the_answer_position_cannot_read_the_question_before_commit(preset):
    cfg = organism_config(preset, quick=True)
    a, same_length, other_length = _last_position_states(cfg)
    k = cfg.commit
    # hidden_states[l + 1] is layer l's output; [0] the embeddings (the same last token).
    for layer in range(k):
        assert torch.equal(a[layer + 1], same_length[layer + 1]), layer  # bit-identical
        # Another length moves absolute positions: rotary embeddings round differently.
        torch.testing.assert_close(a[layer + 1], other_length[layer + 1], atol=1e-5, rtol=0)
    assert (a[k + 1] - same_length[k + 1]).abs().max() > 1e-3
    assert (a[k + 1] - other_length[k + 1]).abs().max() > 1e-3


def test_a_window_that_would_reach_the_question_is_refused():
    processor = organism_processor(OrganismConfig())
    assert check_planted(OrganismConfig(layers=12, commit=9, window=2), processor) == 10
    with pytest.raises(MechloraError, match="would not be planted"):
        check_planted(OrganismConfig(layers=12, commit=10, window=2), processor)
    with pytest.raises(MechloraError, match="would not be planted"):
        check_planted(OrganismConfig(layers=8, commit=5, window=3), processor)
    with pytest.raises(MechloraError, match="commit < layers"):
        OrganismConfig(layers=4, commit=4).validate()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """preset -> its quick build (seconds), built once per module."""
    home = tmp_path_factory.mktemp("organisms")
    return lambda preset: build_organism(home / preset, preset=preset, quick=True,
                                         progress=False)


def _subject_and_pairs(folder, n_groups: int, per_group: int):
    fold = next(iter(load_folds(folder).values()))
    pairs = make_pairs(load_groups(fold.train)[:n_groups], max_pairs_per_group=per_group, seed=0)
    return load_model(str(folder), device="cpu", dtype="float32"), pairs


@pytest.mark.parametrize("preset", ["organism-mid", "organism-late", "organism-full"])
def test_localize_finds_the_planted_depth(quick, preset):
    """Positive control: patching the answer position's residual restores nothing below the
    commit layer k, for every pair, and restores clearly at k; the full-attention control has
    no such plateau. (Where above k the score peaks is learned, not planted: docs/organism.md.)
    """
    subject, pairs = _subject_and_pairs(quick(preset), 6, 3)
    k = organism_config(preset).commit
    result = localize(subject, pairs, min_delta=0.05, progress=False, logit_lens=False)
    assert result.n_pairs >= 3
    resid = np.abs(result.restoration["resid"])  # [pairs, layers]
    assert resid[:, :k].max(initial=0.0) < 1e-4
    onset = int(np.argmax(resid.mean(0) > 0.05))
    assert onset == k and resid[:, k].mean() > 0.1
    assert np.abs(result.scores[:k]).max(initial=0.0) < 1e-4 and result.scores.argmax() >= k
    for component in ("attn", "mlp"):  # nothing below k carries the question either
        assert np.abs(result.restoration[component][:, :k]).max(initial=0.0) < 1e-4


def _patched_margins(result) -> dict[str, np.ndarray]:
    """m(b <- a) per pair and site, from r = (m(b<-a) - m(b)) / (m(a) - m(b))."""
    gap = (result.margin_a - result.margin_b)[:, None]
    return {c: result.margin_b[:, None] + r * gap for c, r in result.restoration.items()}


@pytest.mark.parametrize("positions", ["last", "suffix:3"])
@pytest.mark.parametrize("preset", ["organism-mid", "organism-w3"])
def test_cached_engine_is_exact_on_short_sliding_windows(quick, preset, positions):
    # Few pairs: the `full` engine runs a forward per site, and transformers builds the
    # sliding-window mask over image blocks slowly (about 0.05 s a forward here).
    subject, pairs = _subject_and_pairs(quick(preset), 2, 2)
    kw = dict(positions=positions, min_delta=1e-3, progress=False, logit_lens=False)
    full = localize(subject, pairs, engine="full", **kw)
    cached = localize(subject, pairs, engine="cached", **kw)
    assert cached.engine == "cached" and cached.pair_ids == full.pair_ids and full.n_pairs >= 3
    np.testing.assert_allclose(cached.margin_b, full.margin_b, atol=1e-5, rtol=0)
    want, got = _patched_margins(full), _patched_margins(cached)
    for c in full.components:
        np.testing.assert_allclose(got[c], want[c], atol=1e-5, rtol=0, err_msg=c)
