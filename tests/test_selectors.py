"""Rival selectors (grad, snr, bi) on tiny models with planted answers and independent checks."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch

from mechlora.batching import Batcher, first_token_logits
from mechlora.data import QuestionGroup, Variant, make_pairs
from mechlora.errors import MechloraError
from mechlora.loss import consistency_loss
from mechlora.models import wrap
from mechlora.models.presets import tiny_gemma3_text, tiny_gemma3_vlm
from mechlora.select import select_layers
from mechlora.selectors import (
    bi_scores,
    choose_layers,
    grad_scores,
    matrix_snr,
    mp_median,
    snr_scores,
)
from mechlora.spec import DEFAULT_MODULES, LayerSpec

QUESTIONS = [("is the sky blue", "would you say the sky is blue", "yes"),
             ("is fire cold", "does fire feel cold to the touch", "no"),
             ("is water wet", "can water be called wet", "yes")]


def groups() -> list[QuestionGroup]:
    return [QuestionGroup(id=f"q{i}", variants=(Variant(a + "?"), Variant(b + "?", "lexical")),
                          answer=answer) for i, (a, b, answer) in enumerate(QUESTIONS)]


def text_subject(n_layers: int = 6, seed: int = 0):
    model, tok = tiny_gemma3_text(seed=seed, n_layers=n_layers)
    return wrap(model, tok, name=f"tiny-text-{n_layers}")


# ---------------------------------------------------------------- grad


def only_layer_alive(subject, k: int) -> None:
    """Every layer but k adds nothing: Gemma's post-norms scale by (1 + w), so w = -1 zeroes
    what attention and MLP write, and no gradient reaches their LoRA."""
    with torch.no_grad():
        for i, layer in enumerate(subject.layers):
            if i != k:
                layer.post_attention_layernorm.weight.fill_(-1.0)
                layer.post_feedforward_layernorm.weight.fill_(-1.0)


@pytest.mark.parametrize("k", [1, 4])
def test_grad_ranks_the_only_layer_that_changes_the_loss_first(k: int) -> None:
    subject = text_subject()
    only_layer_alive(subject, k)
    scores = grad_scores(subject, groups(), progress=False)
    assert int(np.argmax(scores.values)) == k and scores.values[k] > 0
    assert np.all(scores.values[np.arange(6) != k] == 0)
    assert select_layers(scores, "topk:1").spec.layers == (k,)
    assert set(scores.details) == {f"{b}.{m}" for m in DEFAULT_MODULES
                                   for b in ["self_attn" if m[0] in "qkvo" else "mlp"]}
    assert (scores.cost["forwards"], scores.cost["backwards"], scores.cost["rows"]) == (1, 1, 6)


def test_grad_equals_the_weight_gradient_seen_through_lora_a() -> None:
    """Independent check: at init (B = 0) the B gradient is scale * dL/dW @ A^T. dL/dW comes
    from plain autograd on the frozen weights with every pair in one batch (grad_scores
    accumulates batches of 2), A from PEFT's init under the same seed."""
    subject = text_subject(n_layers=3)
    data = groups()
    scores = grad_scores(subject, data, batch_size=2, r=4, alpha=8, seed=7, progress=False)

    model = subject.model
    targets = {(i, name): m for i, layer in enumerate(subject.layers)
               for name, m in layer.named_modules() if name.rsplit(".", 1)[-1] in DEFAULT_MODULES}
    for m in targets.values():
        m.weight.requires_grad_(True)
    pairs = make_pairs(data, both_directions=False)
    batcher = Batcher(subject)
    rows = [(p.group, p.a) for p in pairs] + [(p.group, p.b) for p in pairs]
    logits = first_token_logits(model, batcher.inputs(rows))
    choices = [batcher.choice_ids(p.group) for p in pairs]
    answer = torch.tensor([c[p.group.answer_index] for c, p in zip(choices, pairs)])
    n = len(pairs)
    consistency_loss(logits[:n], logits[n:], answer, choices).loss.mean().backward()
    weight_grads = {key: m.weight.grad.clone() for key, m in targets.items()}
    for m in targets.values():
        m.weight.requires_grad_(False)
        m.weight.grad = None

    config = LayerSpec.all(3).lora_config(subject.layers_path, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(7)
    peft_model = peft.get_peft_model(model, config)
    a = {(i, name): m.lora_A["default"].weight.detach().clone()
         for i, layer in enumerate(subject.layers) for name, m in layer.named_modules()
         if name.rsplit(".", 1)[-1] in DEFAULT_MODULES}
    peft_model.unload()
    for (layer, name), g in weight_grads.items():
        expected = float((8 / 4) * (g @ a[(layer, name)].T).norm())
        assert scores.details[name][layer] == pytest.approx(expected, rel=1e-4)
    total = np.sqrt(sum(scores.details[name] ** 2 for name in scores.details))
    np.testing.assert_allclose(scores.values, total)
    terms = consistency_loss(logits[:n], logits[n:], answer, choices)
    assert scores.settings["loss_at_init"] == pytest.approx(
        {"ce": float(terms.ce.mean()), "kl": float(terms.kl.mean())}, rel=1e-5)


def test_grad_leaves_the_model_as_it_was() -> None:
    subject = text_subject(n_layers=3)
    model = subject.model
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)  # a user's own freezing
    model.model.layers[2].train()  # and a mixed train/eval state
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    classes = {n: type(m) for n, m in model.named_modules()}
    inputs = subject.encode(["is the sky blue?"])
    with torch.no_grad():
        before = model(**inputs).logits
    rng = torch.get_rng_state()

    grad_scores(subject, groups(), progress=False)

    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    after_state = model.state_dict()
    assert after_state.keys() == state.keys()
    assert all(torch.equal(after_state[k], v) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    assert not hasattr(model, "peft_config")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_grad_is_seeded() -> None:
    subject = text_subject(n_layers=4)
    one = grad_scores(subject, groups(), seed=0, progress=False)
    same = grad_scores(subject, groups(), seed=0, progress=False)
    other = grad_scores(subject, groups(), seed=1, progress=False)
    np.testing.assert_array_equal(one.values, same.values)
    assert not np.allclose(one.values, other.values)
    assert one.settings["seed"] == 0 and one.settings["data"]["n_pairs"] == 3


def test_grad_on_the_tiny_vlm_with_images(tiny_vlm) -> None:
    from mechlora.data import EXAMPLE_PATH, load_groups

    scores = grad_scores(tiny_vlm, load_groups(EXAMPLE_PATH)[:2], batch_size=4, r=2,
                         progress=False)
    assert scores.values.shape == (6,) and np.all(scores.values > 0)
    assert not any("vision" in str(k) for k in scores.details)


# ---------------------------------------------------------------- snr


def test_mp_median_matches_theory_and_a_large_noise_matrix() -> None:
    # Gavish & Donoho 2014: for square matrices, omega(1) = 2.858 = lambda*(1) / sqrt(mu_1),
    # lambda*(1) = 4 / sqrt(3)
    assert mp_median(1.0) == pytest.approx((4 / np.sqrt(3) / 2.858) ** 2, rel=1e-3)
    rng = np.random.default_rng(0)
    for n, m in [(500, 500), (300, 900)]:
        s = np.linalg.svd(rng.standard_normal((n, m)), compute_uv=False)
        assert np.median(s ** 2 / m) == pytest.approx(mp_median(n / m), rel=0.02)
    with pytest.raises(ValueError):
        mp_median(1.5)


def test_matrix_snr_noise_and_planted_rank_one() -> None:
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((200, 400)) * 0.02
    assert matrix_snr(torch.tensor(noise, dtype=torch.float32)) < 0.01
    u, v = rng.standard_normal(200), rng.standard_normal(400)
    spike = noise + 3 * 0.02 * (np.sqrt(200) + np.sqrt(400)) * np.outer(u / np.linalg.norm(u),
                                                                        v / np.linalg.norm(v))
    s = np.linalg.svd(spike, compute_uv=False)
    # exactly one singular value above the edge: the SNR is it over the sum of the rest
    assert matrix_snr(torch.tensor(spike, dtype=torch.float32)) == pytest.approx(
        s[0] / s[1:].sum(), rel=1e-4)
    assert matrix_snr(torch.tensor(spike.T, dtype=torch.float32)) == pytest.approx(
        s[0] / s[1:].sum(), rel=1e-4)


@pytest.mark.parametrize("k", [0, 3, 5])
def test_snr_ranks_the_layer_with_planted_low_rank_signal_first(k: int) -> None:
    subject = text_subject()
    gen = torch.Generator().manual_seed(k)
    with torch.no_grad():
        for name, m in subject.layers[k].named_modules():
            if name.rsplit(".", 1)[-1] in DEFAULT_MODULES:
                out, inp = m.weight.shape
                u, v = torch.randn(out, generator=gen), torch.randn(inp, generator=gen)
                edge = 0.1 * (out ** 0.5 + inp ** 0.5)  # the preset's init scale is 0.1
                m.weight += 4 * edge * torch.outer(u / u.norm(), v / v.norm())
    scores = snr_scores(subject, progress=False)
    assert int(np.argmax(scores.values)) == k and scores.values[k] == 1.0
    assert all(scores.details[name][k] == scores.details[name].max() for name in scores.details)
    assert scores.cost["matrices"] == 6 * 7 and scores.cost["forwards"] == 0
    assert select_layers(scores, "topk:1").spec.layers == (k,)


def test_snr_refuses_meta_and_unknown_modules() -> None:
    from mechlora.models import load_model

    with pytest.raises(MechloraError, match="no weights"):
        snr_scores(load_model("medgemma-4b"), progress=False)
    with pytest.raises(MechloraError, match="no module named c_attn.*q_proj"):
        snr_scores(text_subject(n_layers=2), modules=["q_proj", "c_attn"], progress=False)


# ---------------------------------------------------------------- bi


def test_bi_ranks_an_identity_layer_last() -> None:
    subject = text_subject()
    with torch.no_grad():
        subject.layers[2].self_attn.o_proj.weight.zero_()
        subject.layers[2].mlp.down_proj.weight.zero_()
    scores = bi_scores(subject, groups(), progress=False)
    assert int(np.argmin(scores.values)) == 2 and scores.values[2] == pytest.approx(0, abs=1e-6)
    assert np.all(np.delete(scores.values, 2) > 1e-3)
    assert scores.cost["forwards"] == 1 and scores.cost["rows"] == 6
    assert select_layers(scores, "topk:5").spec.layers == (0, 1, 3, 4, 5)


def test_bi_equals_the_cosine_of_hidden_states() -> None:
    """hidden_states[l] is layer l's input and hidden_states[l + 1] its output (all but the last
    layer, whose output gets the final norm); batches of 4 prompts must not change the mean."""
    subject = text_subject()
    scores = bi_scores(subject, groups(), batch_size=4, progress=False)
    prompts = [v.text for g in groups() for v in g.variants]
    expected = np.zeros(5)
    for text in prompts:
        with torch.no_grad():
            hs = subject.model(**subject.encode([text]), output_hidden_states=True).hidden_states
        for layer in range(5):
            cos = torch.nn.functional.cosine_similarity(hs[layer][0, -1], hs[layer + 1][0, -1],
                                                        dim=0)
            expected[layer] += float(1 - cos) / len(prompts)
    np.testing.assert_allclose(scores.values[:5], expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- choose_layers


def test_choose_layers_computes_the_scores_the_selector_reads() -> None:
    subject = text_subject()
    only_layer_alive(subject, 3)
    sel = choose_layers("grad:2", subject, groups(), progress=False)
    assert sel.rule == "topk:2" and 3 in sel.spec and sel.selector == "grad:topk:2"
    assert sel.reason.startswith("grad (norm of the CE + KL gradient") and sel.model == \
        "tiny-text-6"
    windowed = choose_layers("grad:window:3", scores=sel.scores)
    assert windowed.scores is sel.scores and 3 in windowed.spec and len(windowed.spec) == 3
    band = choose_layers("late:2", subject, seed=5)
    assert band.spec.layers == (4, 5) and band.scores is None and band.covered is None
    with pytest.raises(MechloraError, match="give a model"):
        choose_layers("bi:2")
    with pytest.raises(MechloraError, match="need paraphrase pairs"):
        choose_layers("bi:2", subject)


def test_scores_refuse_a_peft_model_and_bad_pairs() -> None:
    subject = text_subject(n_layers=2)
    with pytest.raises(MechloraError, match="no paraphrase pairs"):
        bi_scores(subject, [], progress=False)
    peft_model = peft.get_peft_model(subject.model, LayerSpec.all(2).lora_config("model.layers"))
    wrapped = wrap(peft_model, subject.processor)
    with pytest.raises(MechloraError, match="PEFT adapter"):
        grad_scores(wrapped, groups(), progress=False)


def test_tiny_vlm_bi_runs_on_images() -> None:
    model, processor = tiny_gemma3_vlm(n_layers=3)
    from mechlora.data import EXAMPLE_PATH, load_groups

    scores = bi_scores(wrap(model, processor), load_groups(EXAMPLE_PATH)[:2], progress=False)
    assert scores.values.shape == (3,) and np.all(scores.values > 0)


def test_groups_give_seeded_pairs_per_group() -> None:
    subject = text_subject(n_layers=2)
    wide = [QuestionGroup(id=f"w{i}", variants=tuple(Variant(f"{w} {i}?") for w in
                                                      ("is it", "would it be", "can it be")),
                          answer="yes") for i in range(4)]
    one = bi_scores(subject, wide, progress=False)
    assert one.settings["data"]["n_pairs"] == 4 and one.cost["rows"] == 8
    every = bi_scores(subject, wide, pairs_per_group=None, progress=False)
    assert every.settings["data"]["n_pairs"] == 12 and every.cost["rows"] == 12
    picks = {tuple(bi_scores(subject, wide, seed=s, progress=False).values) for s in range(4)}
    assert len(picks) > 1  # the seed draws other pairs
    grad = grad_scores(subject, wide, pairs_per_group=2, seed=3, progress=False)
    assert grad.settings["data"]["n_pairs"] == 8 and grad.cost["rows"] == 16
