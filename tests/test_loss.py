"""The consistency loss against hand computations (plain math, no torch)."""

from __future__ import annotations

import math

import pytest
import torch

from mechlora.loss import consistency_loss


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


A, B = [2.0, 0.0, -1.0], [0.0, 1.0, 0.0]


def by_hand(a, b, answer, *, weight=1.0, t=1.0, choices=None):
    ce = (-math.log(softmax(a)[answer]) - math.log(softmax(b)[answer])) / 2
    za, zb = [x / t for x in a], [x / t for x in b]
    if choices is not None:
        za, zb = [za[i] for i in choices], [zb[i] for i in choices]
    p, q = softmax(za), softmax(zb)
    sym = (kl(p, q) + kl(q, p)) / 2
    return ce + weight * sym, ce, sym


def terms(a, b, answer, **kw):
    out = consistency_loss(torch.tensor([a]), torch.tensor([b]), torch.tensor([answer]), **kw)
    return out.loss.item(), out.ce.item(), out.kl.item()


def test_matches_hand_computation() -> None:
    # CE: -log softmax(A)[0] = 0.169846, -log softmax(B)[0] = 1.551445;
    # KL(p_A || p_B) = 0.912983, KL(p_B || p_A) = 0.982577
    loss, ce, sym = terms(A, B, 0)
    assert ce == pytest.approx((0.169846 + 1.551445) / 2, abs=1e-5)
    assert sym == pytest.approx((0.912983 + 0.982577) / 2, abs=1e-5)
    assert (loss, ce, sym) == pytest.approx(by_hand(A, B, 0), abs=1e-6)
    assert loss == pytest.approx(ce + sym, abs=1e-6)


def test_weight_and_temperature() -> None:
    got = terms(A, B, 1, kl_weight=0.5, temperature=2.0)
    assert got == pytest.approx(by_hand(A, B, 1, weight=0.5, t=2.0), abs=1e-6)
    # the temperature softens only the KL, never the cross-entropy
    assert got[1] == pytest.approx(terms(A, B, 1)[1], abs=1e-6)


def test_choices_only_renormalises_over_choice_tokens() -> None:
    got = terms(A, B, 0, kl_over="choices", choice_ids=[[0, 2]])
    assert got == pytest.approx(by_hand(A, B, 0, choices=[0, 2]), abs=1e-6)
    assert got[2] != pytest.approx(terms(A, B, 0)[2])


def test_rows_with_different_numbers_of_choices() -> None:
    a = torch.tensor([A, B], requires_grad=True)
    b = torch.tensor([B, A], requires_grad=True)
    out = consistency_loss(a, b, torch.tensor([0, 2]), [[0, 1, 2], [2, 0]], kl_over="choices")
    assert out.loss[0].item() == pytest.approx(by_hand(A, B, 0, choices=[0, 1, 2])[0], abs=1e-6)
    assert out.loss[1].item() == pytest.approx(by_hand(B, A, 2, choices=[2, 0])[0], abs=1e-6)
    out.loss.sum().backward()  # the padded entry must not leak NaN into the gradient
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_identical_logits_have_no_kl_and_batches_are_per_pair() -> None:
    a = torch.randn(4, 7)
    out = consistency_loss(a, a.clone(), torch.tensor([0, 1, 2, 3]))
    assert out.loss.shape == (4,)
    assert torch.allclose(out.kl, torch.zeros(4), atol=1e-6)
    assert torch.allclose(out.loss, out.ce)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kl_over"):
        terms(A, B, 0, kl_over="tokens")
    with pytest.raises(ValueError, match="choice_ids"):
        terms(A, B, 0, kl_over="choices")
