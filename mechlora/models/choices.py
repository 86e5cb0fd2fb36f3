"""How a model's first answer token is read as one of a question's choices.

A yes/no answer can begin with " yes", "yes", "Yes", " Yes" and so on: the tokenizer gives
each its own id, and a model may spread its probability over them. Two readings:

- `first` (the default): each choice is the single token the model would write first after
  the prompt (`Subject.answer_token_ids`); a choice's score is that token's logit.
- `merged`: each choice also counts every case and leading-space variant of its text that the
  tokenizer writes as ONE token ("yes", " yes", "Yes", " Yes", "YES", " YES"); a choice's score
  is the log-sum-exp of those tokens' logits, i.e. its log-probability up to a constant shared
  by all choices. Variants that are several tokens are left out: their first token (" Y") would
  also begin unrelated words. A variant token that two choices share is left out of both.

Margins, predictions, the training loss and the evaluation metrics all read choices through
`ChoiceTokens.scores`, so one switch changes them together; JSON outputs record the reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

READINGS = ("first", "merged")
LOW_MASS_NOTE = ("{arm}: the model puts only {mass:.0%} of its probability on the choices' tokens "
                 "on average: it is mostly not answering in the format asked, so margins between "
                 "the choices say little; check the prompt format, or try merge_variants")


@dataclass(frozen=True)
class ChoiceTokens:
    """Per choice, the token ids that count as answering it (the first is the canonical one)."""

    ids: tuple[tuple[int, ...], ...]
    reading: str = "first"

    @classmethod
    def single(cls, ids: Sequence[int]) -> ChoiceTokens:
        """One token per choice (the `first` reading)."""
        return cls(tuple((int(i),) for i in ids))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def first(self) -> list[int]:
        """The canonical token of each choice."""
        return [ids[0] for ids in self.ids]

    @property
    def flat(self) -> list[int]:
        """Every token id that counts for some choice, each once, in order."""
        return list(dict.fromkeys(i for ids in self.ids for i in ids))

    def on(self, columns: Sequence[int]) -> ChoiceTokens:
        """The same choices, indexed into logits whose column j holds token `flat[j]`."""
        where = dict(zip(self.flat, columns, strict=True))
        return ChoiceTokens(tuple(tuple(where[i] for i in ids) for ids in self.ids), self.reading)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., n_choices] score of each choice: the canonical token's logit (`first`), or the
        log-sum-exp over its variant tokens (`merged`). Computed in float32."""
        logits = logits.float()
        if all(len(ids) == 1 for ids in self.ids):
            return logits[..., [ids[0] for ids in self.ids]]
        return torch.stack([torch.logsumexp(logits[..., list(ids)], dim=-1) for ids in self.ids],
                           dim=-1)

    def mass(self, logits: torch.Tensor) -> torch.Tensor:
        """[...] probability the model puts on any token of any choice (full-vocabulary logits)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        return torch.logsumexp(logp[..., self.flat], dim=-1).exp()


def as_choices(choices: ChoiceTokens | Sequence[int]) -> ChoiceTokens:
    return choices if isinstance(choices, ChoiceTokens) else ChoiceTokens.single(choices)


def spellings(choice: str) -> list[str]:
    """The case and leading-space variants of a choice that `merged` may count."""
    words = dict.fromkeys([choice, choice.lower(), choice.capitalize(), choice.upper()])
    return [*words, *(" " + w for w in words)]
