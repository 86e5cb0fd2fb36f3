"""The paraphrase-consistency loss: CE on the first answer token + symmetric KL between variants.

For a pair (a, b) of wordings of one question, with first-answer-token logits z_a, z_b:

    ce   = (CE(z_a, y) + CE(z_b, y)) / 2                   full vocabulary, no temperature
    kl   = (KL(p_a || p_b) + KL(p_b || p_a)) / 2           p = softmax(z / T)
    loss = ce + kl_weight * kl

With `kl_over="choices"`, p is the softmax renormalised over the choices' first tokens only, so
the two wordings must agree on the answer but not on the rest of the vocabulary. The CE term is
what keeps the answer right: consistency alone is met by a model that always says "yes".

Under the `merged` choice reading (mechlora/models/choices.py) the answer is every token that
counts for it: CE(z, y) = -log sum_{v in y} softmax(z)_v, and a choice's score in the
`choices` KL is the log-sum-exp of its tokens' logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mechlora.models.choices import ChoiceTokens, as_choices

KL_OVER = ("vocab", "choices")


@dataclass
class LossTerms:
    """Per-pair values, shape [B]; the loss of a batch is their mean."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def consistency_loss(logits_a: torch.Tensor, logits_b: torch.Tensor,
                     answer: torch.Tensor | Sequence[Sequence[int]],
                     choice_ids: Sequence[ChoiceTokens | Sequence[int]] | None = None, *,
                     kl_weight: float = 1.0, temperature: float = 1.0,
                     kl_over: str = "vocab") -> LossTerms:
    """Loss terms for B pairs: `logits_*` [B, V] at the first answer token.

    `answer`: [B] token ids, or per pair the ids that all count as the answer (merged reading).
    `choice_ids[i]`: pair i's choices, as first-token ids or a `ChoiceTokens` (needed for
    kl_over="choices"; rows may have different numbers of choices).
    """
    if kl_over not in KL_OVER:
        raise ValueError(f"kl_over must be one of {KL_OVER}, got {kl_over!r}")
    za, zb = logits_a.float(), logits_b.float()
    if isinstance(answer, torch.Tensor):
        answer = [[int(i)] for i in answer]
    index, valid = _padded([list(ids) for ids in answer], za.device)
    ce = (_nll(za, index, valid) + _nll(zb, index, valid)) / 2
    za, zb = za / temperature, zb / temperature
    mask = None
    if kl_over == "choices":
        if choice_ids is None:
            raise ValueError("kl_over='choices' needs choice_ids")
        za, mask = _choice_scores(za, choice_ids)
        zb, _ = _choice_scores(zb, choice_ids)
    kl = (_kl(za, zb, mask) + _kl(zb, za, mask)) / 2
    return LossTerms(ce + kl_weight * kl, ce, kl)


def _nll(logits: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """-log of the probability summed over each row's answer tokens."""
    logp = F.log_softmax(logits, -1).gather(-1, index).masked_fill(~valid, float("-inf"))
    return -torch.logsumexp(logp, -1)


def _choice_scores(logits: torch.Tensor, choices: Sequence[ChoiceTokens | Sequence[int]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C] score of each choice (padded with -inf) and the mask of real choices."""
    scores = [as_choices(c).scores(z) for z, c in zip(logits, choices, strict=True)]
    width = max(len(x) for x in scores)
    padded = torch.stack([F.pad(x, (0, width - len(x)), value=float("-inf")) for x in scores])
    mask = torch.tensor([[k < len(x) for k in range(width)] for x in scores],
                        device=logits.device)
    return padded, mask


def _padded(rows: Sequence[Sequence[int]], device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, W] index (short rows padded with their first id) and the mask of real entries."""
    width = max(len(ids) for ids in rows)
    index = torch.tensor([list(ids) + [ids[0]] * (width - len(ids)) for ids in rows],
                         device=device)
    mask = torch.tensor([[k < len(ids) for k in range(width)] for ids in rows], device=device)
    return index, mask


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """KL(p || q) per row; entries outside `mask` take no part (and pass no NaN gradient)."""
    if mask is not None:
        p_logits = p_logits.masked_fill(~mask, float("-inf"))
        q_logits = q_logits.masked_fill(~mask, float("-inf"))
    logp, logq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    p = logp.exp()
    if mask is not None:  # -inf - -inf is NaN: zero the log-ratio where p is 0 anyway
        logp, logq = logp.masked_fill(~mask, 0.0), logq.masked_fill(~mask, 0.0)
    return (p * (logp - logq)).sum(-1)
