"""The paraphrase-consistency loss: CE on the first answer token + symmetric KL between variants.

For a pair (a, b) of wordings of one question, with first-answer-token logits z_a, z_b:

    ce   = (CE(z_a, y) + CE(z_b, y)) / 2                   full vocabulary, no temperature
    kl   = (KL(p_a || p_b) + KL(p_b || p_a)) / 2           p = softmax(z / T)
    loss = ce + kl_weight * kl

With `kl_over="choices"`, p is the softmax renormalised over the choices' first tokens only, so
the two wordings must agree on the answer but not on the rest of the vocabulary. The CE term is
what keeps the answer right: consistency alone is met by a model that always says "yes".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KL_OVER = ("vocab", "choices")


@dataclass
class LossTerms:
    """Per-pair values, shape [B]; the loss of a batch is their mean."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def consistency_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, answer: torch.Tensor,
                     choice_ids: Sequence[Sequence[int]] | None = None, *,
                     kl_weight: float = 1.0, temperature: float = 1.0,
                     kl_over: str = "vocab") -> LossTerms:
    """Loss terms for B pairs: `logits_*` [B, V] at the first answer token, `answer` [B] ids.

    `choice_ids[i]` lists the first-token ids of pair i's choices (needed for kl_over="choices";
    rows may have different numbers of choices).
    """
    if kl_over not in KL_OVER:
        raise ValueError(f"kl_over must be one of {KL_OVER}, got {kl_over!r}")
    za, zb = logits_a.float(), logits_b.float()
    ce = (F.cross_entropy(za, answer, reduction="none")
          + F.cross_entropy(zb, answer, reduction="none")) / 2
    za, zb = za / temperature, zb / temperature
    mask = None
    if kl_over == "choices":
        if choice_ids is None:
            raise ValueError("kl_over='choices' needs choice_ids")
        index, mask = _padded(choice_ids, za.device)
        za, zb = za.gather(-1, index), zb.gather(-1, index)
    kl = (_kl(za, zb, mask) + _kl(zb, za, mask)) / 2
    return LossTerms(ce + kl_weight * kl, ce, kl)


def _padded(choice_ids: Sequence[Sequence[int]], device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C] index (short rows padded with their first id) and the mask of real entries."""
    width = max(len(ids) for ids in choice_ids)
    index = torch.tensor([list(ids) + [ids[0]] * (width - len(ids)) for ids in choice_ids],
                         device=device)
    mask = torch.tensor([[k < len(ids) for k in range(width)] for ids in choice_ids],
                        device=device)
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
