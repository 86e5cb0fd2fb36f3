"""The organism's question bank: question types, paraphrase families, splits, and its datasets.

Each question has three roles of phrasing:
- `train`: the one wording the organism is trained on (most of the time);
- `rare`: other wordings seen in a small share of training examples, so that every word of the
  held-out paraphrases has been seen (a LoRA on the language layers can then fix the flips);
- `families`: held-out paraphrases, grouped by phenomenon. The organism never sees them; the
  LoRA trains on them with train images (`train_pairs.jsonl`) and is judged on them with test
  images (`heldout.jsonl`).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mechlora.errors import MechloraError
from mechlora.io import atomic_write_bytes, atomic_write_text
from mechlora.organism.films import Film, render, sample_film

PHENOMENA = ("lexical_substitution", "syntactic_restructuring", "register_shift", "added_context")
SPLIT_OFFSET = {"train": 0, "test": 500_000}  # film seeds of the two image splits never meet


@dataclass(frozen=True)
class QuestionType:
    name: str  # also the finding it asks about, with a suffix for location and size
    kind: str  # "presence" | "location" | "size"; written as the group's `type`
    choices: tuple[str, ...]  # every first token distinct, so one logit decides the answer
    train: str
    rare: tuple[str, ...]
    families: dict[str, tuple[str, ...]]  # phenomenon -> held-out paraphrases
    answer: Callable[[Film], str | None]  # None: the question does not apply to this film

    def heldout(self) -> list[tuple[str, str]]:
        """(text, phenomenon) of every held-out paraphrase, in a fixed order."""
        return [(t, p) for p in PHENOMENA for t in self.families[p]]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


YES_NO = ("yes", "no")
BANK: tuple[QuestionType, ...] = (
    QuestionType(
        "opacity", "presence", YES_NO,
        train="Is there an opacity?",
        rare=("Does this chest film show a white spot or patch?",
              "Are the lungs cloudy, or are there opacities on any part?",
              "The patient has a cough and a fever; looking at the film, is there an opacity?"),
        families={
            "lexical_substitution": ("Is there a consolidation?", "Is there an infiltrate?"),
            "syntactic_restructuring": ("Is an opacity present?", "Are there any opacities?"),
            "register_shift": ("Is there a white spot on the lungs?",
                               "Is any part of the lungs cloudy?"),
            "added_context": ("The patient is short of breath. Is there an opacity?",
                              "Is there an opacity? The patient had heart surgery."),
        },
        answer=lambda f: _yes(f.opacity is not None),
    ),
    QuestionType(
        "opacity_side", "location", ("left", "right"),
        train="Which lung has the opacity?",
        rare=("On which side of the chest is the consolidation or the infiltrate?",
              "In which lung is the white spot, the left or the right?",
              "The patient has a fever. Looking at this film, which lung has the opacity?"),
        families={
            "lexical_substitution": ("Which lung has the consolidation?",
                                     "Which lung has the infiltrate?"),
            "syntactic_restructuring": ("The opacity is in which lung?",
                                        "In which lung is the opacity?"),
            "register_shift": ("Which side is the white spot on?",
                               "On which side are the lungs cloudy?"),
            "added_context": ("The patient has swollen legs. Which lung has the opacity?",
                              "Which lung has the opacity? The patient is short of breath."),
        },
        answer=lambda f: f.opacity,
    ),
    QuestionType(
        "opacity_size", "size", YES_NO,
        train="Is the opacity large?",
        rare=("Is the white spot on the film a big one?",
              "The patient has a cough; is the opacity a large one?",
              "Does the consolidation or the infiltrate look big?"),
        families={
            "lexical_substitution": ("Is the opacity big?", "Is the consolidation large?"),
            "syntactic_restructuring": ("Is there a large opacity?", "Is it a large opacity?"),
            "register_shift": ("Is the white spot big?", "Is the cloudy patch large?"),
            "added_context": ("The patient has a fever. Is the opacity large?",
                              "Is the opacity large? The patient is short of breath."),
        },
        answer=lambda f: None if f.opacity is None else _yes(f.opacity_size == "large"),
    ),
    QuestionType(
        "effusion", "presence", YES_NO,
        train="Is there a pleural effusion?",
        rare=("Does this chest film show any fluid?",
              "Is there any water around the bottom of the lungs?",
              "The patient is short of breath; looking at the film, are there effusions?"),
        families={
            "lexical_substitution": ("Is there a pleural fluid collection?",
                                     "Is there a fluid level?"),
            "syntactic_restructuring": ("Is a pleural effusion present?",
                                        "Are there any pleural effusions?"),
            "register_shift": ("Is there fluid around the lungs?",
                               "Is there water at the bottom of the lungs?"),
            "added_context": ("The patient has a fever and a cough. Is there a pleural effusion?",
                              "Is there a pleural effusion? The patient had heart surgery."),
        },
        answer=lambda f: _yes(f.effusion is not None),
    ),
    QuestionType(
        "effusion_side", "location", ("left", "right"),
        train="Which side is the pleural effusion on?",
        rare=("On which side of the chest is the fluid collection or the fluid level?",
              "Where is the water around the lung, on the left or the right?",
              "The patient is short of breath. Looking at this film, where is the effusion?"),
        families={
            "lexical_substitution": ("Which side is the fluid collection on?",
                                     "Which side is the fluid level on?"),
            "syntactic_restructuring": ("The pleural effusion is on which side?",
                                        "On which side is the pleural effusion?"),
            "register_shift": ("Which side has fluid around the lung?",
                               "On which side is there water at the bottom of the lung?"),
            "added_context": ("The patient has a cough. Which side is the pleural effusion on?",
                              "Which side is the pleural effusion on? The patient has a fever."),
        },
        answer=lambda f: f.effusion,
    ),
    QuestionType(
        "heart", "size", YES_NO,
        train="Is the heart enlarged?",
        rare=("Does the cardiac silhouette or the heart shadow look enlarged?",
              "Does the size of the heart look larger than it should be, too big?",
              "The patient has swollen legs; is there cardiomegaly or enlargement?"),
        families={
            "lexical_substitution": ("Is there cardiomegaly?",
                                     "Is the cardiac silhouette enlarged?"),
            "syntactic_restructuring": ("Is there an enlarged heart?",
                                        "Is there enlargement of the heart?"),
            "register_shift": ("Is the heart too big?",
                               "Is the heart larger than it should be?"),
            "added_context": ("The patient has a cough. Is the heart enlarged?",
                              "Is the heart enlarged? The patient had heart surgery."),
        },
        answer=lambda f: _yes(f.heart == "enlarged"),
    ),
    QuestionType(
        "device", "presence", YES_NO,
        train="Is there a pacemaker?",
        rare=("Does this chest film show an implanted cardiac device?",
              "Is a small metal box that keeps the heart beating present in the chest?",
              "The patient had heart surgery; are there any pacemakers or devices?"),
        families={
            "lexical_substitution": ("Is there a cardiac device?", "Is there an implanted device?"),
            "syntactic_restructuring": ("Is a pacemaker present?", "Are there any pacemakers?"),
            "register_shift": ("Is there a device that keeps the heart beating?",
                               "Is there a small metal box in the chest?"),
            "added_context": ("The patient is short of breath. Is there a pacemaker?",
                              "Is there a pacemaker? The patient has swollen legs."),
        },
        answer=lambda f: _yes(f.device),
    ),
)
TYPES = {q.name: q for q in BANK}


def words(text: str) -> list[str]:
    """Split like the organism's word-level tokenizer: lowercase, punctuation on its own."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def vocabulary() -> list[str]:
    """Every word of the bank and its answers, plus the chat template's role names."""
    texts = [t for q in BANK for t in (q.train, *q.rare, *(x for x, _ in q.heldout()))]
    answers = [c for q in BANK for c in q.choices]
    found = dict.fromkeys(["user", "model", *answers, *(w for t in texts for w in words(t))])
    return sorted(found)


def bank_hash() -> str:
    """Fingerprint of every phrasing and answer set: a cached organism must match the bank."""
    rows = [[q.name, q.kind, q.choices, q.train, q.rare, q.heldout()] for q in BANK]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def film_seed(split: str, index: int, seed: int = 0) -> int:
    """Seed of film `index` of an image split; the splits never share a film."""
    if split not in SPLIT_OFFSET:
        raise MechloraError(f"unknown image split {split!r}; use 'train' or 'test'")
    if not 0 <= index < SPLIT_OFFSET["test"]:
        raise MechloraError(f"film index {index} is out of range 0..{SPLIT_OFFSET['test'] - 1}")
    return seed * 1_000_000 + SPLIT_OFFSET[split] + index


def groups_for(film: Film, film_id: str, image: str | None) -> list[dict]:
    """JSONL records (mechlora's data format) of every question that applies to `film`."""
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
            "paraphrases": [{"text": t, "phenomenon": p} for t, p in q.heldout()],
            "answer": answer,
            "choices": list(q.choices),
            "type": q.kind,
            "finding": q.name,
        }
        records.append(record)
    return records


def write_split(path: str | Path, split: str, n_images: int, *, seed: int = 0) -> Path:
    """Write `n_images` films of `split` as PNGs under `images/` beside `path`, their groups as
    JSONL at `path` (image paths relative to it, as mechlora's loader expects)."""
    path = Path(path)
    lines = []
    for i in range(n_images):
        film = sample_film(film_seed(split, i, seed))
        name = f"images/{split}-{i:04d}.png"
        _write_png(path.parent / name, film)
        lines += [json.dumps(r) for r in groups_for(film, f"{split}{i:04d}", name)]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _write_png(path: Path, film: Film) -> None:
    buf = io.BytesIO()
    render(film).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_datasets(folder: str | Path, *, seed: int = 0, n_train: int = 64,
                   n_test: int = 64) -> dict[str, Path]:
    """`train_pairs.jsonl` (train images, for the LoRA) and `heldout.jsonl` (test images, eval)."""
    folder = Path(folder)
    return {
        "train_pairs": write_split(folder / "train_pairs.jsonl", "train", n_train, seed=seed),
        "heldout": write_split(folder / "heldout.jsonl", "test", n_test, seed=seed),
    }
