"""The organism's question bank: question types, their phrasings, and paraphrase families.

Each question has three roles of phrasing:
- `train`: the one wording the organism is trained on (most of the time);
- `rare`: other wordings seen in a small share of training examples, so that every word of the
  families has been seen (a LoRA on the language layers can then fix the flips);
- `families`: paraphrases grouped by phenomenon, never seen by the organism. The four
  `PHENOMENA` take turns as the test family of a leave-one-family-out fold; the fifth,
  `VALIDATION_FAMILY`, is never trained on nor tested: it is where LoRA hyperparameters are
  chosen (see `mechlora.organism.splits`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mechlora.organism.films import Film

PHENOMENA = ("lexical_substitution", "syntactic_restructuring", "register_shift", "added_context")
VALIDATION_FAMILY = "indirect_form"
FAMILIES = (*PHENOMENA, VALIDATION_FAMILY)
# Appended to every user turn by the organism's chat template (`train.CHAT_TEMPLATE`): it puts
# tokens between the question and the answer position, so that sliding-window layers cannot
# carry the question there (docs/organism.md, "planted commit depth").
INSTRUCTION = "Answer with one word."


@dataclass(frozen=True)
class QuestionType:
    name: str  # also the finding it asks about, with a suffix for location and size
    kind: str  # "presence" | "location" | "size"; written as the group's `type`
    choices: tuple[str, ...]  # every first token distinct, so one logit decides the answer
    train: str
    rare: tuple[str, ...]
    families: dict[str, tuple[str, ...]]  # family (phenomenon) -> paraphrases
    answer: Callable[[Film], str | None]  # None: the question does not apply to this film

    def paraphrases(self, families: Sequence[str] = FAMILIES) -> list[tuple[str, str]]:
        """(text, family) of the paraphrases of `families`, in a fixed order."""
        return [(t, p) for p in families for t in self.families[p]]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


YES_NO = ("yes", "no")
BANK: tuple[QuestionType, ...] = (
    QuestionType(
        "opacity", "presence", YES_NO,
        train="Is there an opacity?",
        rare=("Does this chest film show a white spot or patch?",
              "Are the lungs cloudy, or are there opacities on any part?",
              "The patient has a cough and a fever; looking at the film, is there an opacity?",
              "If you can see a white patch, would you say it is an opacity?"),
        families={
            "lexical_substitution": ("Is there a consolidation?", "Is there an infiltrate?"),
            "syntactic_restructuring": ("Is an opacity present?", "Are there any opacities?"),
            "register_shift": ("Is there a white spot on the lungs?",
                               "Is any part of the lungs cloudy?"),
            "added_context": ("The patient is short of breath. Is there an opacity?",
                              "Is there an opacity? The patient had heart surgery."),
            "indirect_form": ("Can you see an opacity?",
                              "Tell me if there is an opacity on the film."),
        },
        answer=lambda f: _yes(f.opacity is not None),
    ),
    QuestionType(
        "opacity_side", "location", ("left", "right"),
        train="Which lung has the opacity?",
        rare=("On which side of the chest is the consolidation or the infiltrate?",
              "In which lung is the white spot, the left or the right?",
              "The patient has a fever. Looking at this film, which lung has the opacity?",
              "Tell me: can you see which side has the white spot?"),
        families={
            "lexical_substitution": ("Which lung has the consolidation?",
                                     "Which lung has the infiltrate?"),
            "syntactic_restructuring": ("The opacity is in which lung?",
                                        "In which lung is the opacity?"),
            "register_shift": ("Which side is the white spot on?",
                               "On which side are the lungs cloudy?"),
            "added_context": ("The patient has swollen legs. Which lung has the opacity?",
                              "Which lung has the opacity? The patient is short of breath."),
            "indirect_form": ("Can you tell me which lung has the opacity?",
                              "Tell me on which side the opacity is."),
        },
        answer=lambda f: f.opacity,
    ),
    QuestionType(
        "opacity_size", "size", YES_NO,
        train="Is the opacity large?",
        rare=("Is the white spot on the film a big one?",
              "The patient has a cough; is the opacity a large one?",
              "Does the consolidation or the infiltrate look big?",
              "Would you say the white spot is big, if you can see one?"),
        families={
            "lexical_substitution": ("Is the opacity big?", "Is the consolidation large?"),
            "syntactic_restructuring": ("Is there a large opacity?", "Is it a large opacity?"),
            "register_shift": ("Is the white spot big?", "Is the cloudy patch large?"),
            "added_context": ("The patient has a fever. Is the opacity large?",
                              "Is the opacity large? The patient is short of breath."),
            "indirect_form": ("Would you say the opacity is large?",
                              "Can you tell me if the opacity is big?"),
        },
        answer=lambda f: None if f.opacity is None else _yes(f.opacity_size == "large"),
    ),
    QuestionType(
        "effusion", "presence", YES_NO,
        train="Is there a pleural effusion?",
        rare=("Does this chest film show any fluid?",
              "Is there any water around the bottom of the lungs?",
              "The patient is short of breath; looking at the film, are there effusions?",
              "Can you see water around the lungs? Tell me if so."),
        families={
            "lexical_substitution": ("Is there a pleural fluid collection?",
                                     "Is there a fluid level?"),
            "syntactic_restructuring": ("Is a pleural effusion present?",
                                        "Are there any pleural effusions?"),
            "register_shift": ("Is there fluid around the lungs?",
                               "Is there water at the bottom of the lungs?"),
            "added_context": ("The patient has a fever and a cough. Is there a pleural effusion?",
                              "Is there a pleural effusion? The patient had heart surgery."),
            "indirect_form": ("Can you see a pleural effusion?",
                              "Tell me if there is fluid on the film."),
        },
        answer=lambda f: _yes(f.effusion is not None),
    ),
    QuestionType(
        "effusion_side", "location", ("left", "right"),
        train="Which side is the pleural effusion on?",
        rare=("On which side of the chest is the fluid collection or the fluid level?",
              "Where is the water around the lung, on the left or the right?",
              "The patient is short of breath. Looking at this film, where is the effusion?",
              "If you see fluid, tell me on which side it is."),
        families={
            "lexical_substitution": ("Which side is the fluid collection on?",
                                     "Which side is the fluid level on?"),
            "syntactic_restructuring": ("The pleural effusion is on which side?",
                                        "On which side is the pleural effusion?"),
            "register_shift": ("Which side has fluid around the lung?",
                               "On which side is there water at the bottom of the lung?"),
            "added_context": ("The patient has a cough. Which side is the pleural effusion on?",
                              "Which side is the pleural effusion on? The patient has a fever."),
            "indirect_form": ("Can you tell me which side the pleural effusion is on?",
                              "Tell me on which side the fluid is."),
        },
        answer=lambda f: f.effusion,
    ),
    QuestionType(
        "heart", "size", YES_NO,
        train="Is the heart enlarged?",
        rare=("Does the cardiac silhouette or the heart shadow look enlarged?",
              "Does the size of the heart look larger than it should be, too big?",
              "The patient has swollen legs; is there cardiomegaly or enlargement?",
              "Would you say the cardiac silhouette is big? Tell me."),
        families={
            "lexical_substitution": ("Is there cardiomegaly?",
                                     "Is the cardiac silhouette enlarged?"),
            "syntactic_restructuring": ("Is there an enlarged heart?",
                                        "Is there enlargement of the heart?"),
            "register_shift": ("Is the heart too big?",
                               "Is the heart larger than it should be?"),
            "added_context": ("The patient has a cough. Is the heart enlarged?",
                              "Is the heart enlarged? The patient had heart surgery."),
            "indirect_form": ("Would you say the heart is enlarged?",
                              "Can you tell me if the heart is big?"),
        },
        answer=lambda f: _yes(f.heart == "enlarged"),
    ),
    QuestionType(
        "device", "presence", YES_NO,
        train="Is there a pacemaker?",
        rare=("Does this chest film show an implanted cardiac device?",
              "Is a small metal box that keeps the heart beating present in the chest?",
              "The patient had heart surgery; are there any pacemakers or devices?",
              "Can you see a metal box in the chest? Tell me if you do."),
        families={
            "lexical_substitution": ("Is there a cardiac device?", "Is there an implanted device?"),
            "syntactic_restructuring": ("Is a pacemaker present?", "Are there any pacemakers?"),
            "register_shift": ("Is there a device that keeps the heart beating?",
                               "Is there a small metal box in the chest?"),
            "added_context": ("The patient is short of breath. Is there a pacemaker?",
                              "Is there a pacemaker? The patient has swollen legs."),
            "indirect_form": ("Can you see a pacemaker?",
                              "Tell me if there is a device in the chest."),
        },
        answer=lambda f: _yes(f.device),
    ),
)
TYPES = {q.name: q for q in BANK}


def words(text: str) -> list[str]:
    """Split like the organism's word-level tokenizer: lowercase, punctuation on its own."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def vocabulary() -> list[str]:
    """Every word of the bank, its answers, the instruction and the chat template's roles."""
    texts = [t for q in BANK for t in (q.train, *q.rare, *(x for x, _ in q.paraphrases()))]
    answers = [c for q in BANK for c in q.choices]
    found = dict.fromkeys(["user", "model", *answers, *words(INSTRUCTION),
                           *(w for t in texts for w in words(t))])
    return sorted(found)


def bank_hash() -> str:
    """Fingerprint of every phrasing, family and answer set: a cached organism must match it."""
    rows = [[q.name, q.kind, q.choices, q.train, q.rare, q.paraphrases()] for q in BANK]
    return hashlib.sha256(json.dumps([INSTRUCTION, rows]).encode()).hexdigest()[:16]


def groups_for(film: Film, film_id: str, image: str | None,
               families: Sequence[str] = FAMILIES) -> list[dict]:
    """JSONL records (mechlora's data format) of every question that applies to `film`: the
    training phrasing as `question`, the paraphrases of `families` as `paraphrases`."""
    records = []
    for q in BANK:
        answer = q.answer(film)
        if answer is None:
            continue
        record = {"id": f"{film_id}-{q.name}"}
        if image is not None:
            record["image"] = image
        record |= {
            "question": q.train,
            "paraphrases": [{"text": t, "phenomenon": p} for t, p in q.paraphrases(families)],
            "answer": answer,
            "choices": list(q.choices),
            "type": q.kind,
            "finding": q.name,
        }
        records.append(record)
    return records
