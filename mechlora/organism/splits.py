"""Image splits and leave-one-family-out folds: the data files an organism build writes.

Images: three splits of disjoint film seeds. The organism trains on `train` films; a LoRA
trains on `train` films too, chooses its hyperparameters on `validation` films and is judged on
`test` films, which nothing else ever sees.

Paraphrases: one fold per phenomenon of `PHENOMENA` (named after it, its test family). A fold's
LoRA trains on the three other phenomena, is validated on `VALIDATION_FAMILY` (the same in
every fold, and never a test family: hyperparameters chosen on it may be shared by all folds)
and is tested on its own phenomenon, which neither the organism nor that LoRA ever saw.

Layout under the build's `data/` folder (image paths are relative to the data files, which
mechlora's loader confines to their folder, so every file sits beside `images/`):

    images/{train,validation,test}-NNNN.png
    <fold>.train.jsonl    train images x the fold's training families
    validation.jsonl      validation images x the validation family (every fold)
    <fold>.test.jsonl     test images x the fold's test family

Every group's `question` is the organism's training phrasing (variant 0), its `paraphrases`
those of the file's families. `verify_data` parses every file and refuses any leak.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from mechlora.errors import MechloraError
from mechlora.io import atomic_write_bytes, atomic_write_text
from mechlora.organism.films import Film, render, sample_film
from mechlora.organism.questions import (
    BANK,
    FAMILIES,
    PHENOMENA,
    VALIDATION_FAMILY,
    groups_for,
)

IMAGE_SPLITS = {"train": 0, "validation": 250_000, "test": 500_000}  # film seed offsets
SPLIT_SIZE = 250_000
VALIDATION_FILE = "validation.jsonl"


def film_seed(split: str, index: int, seed: int = 0) -> int:
    """Seed of film `index` of an image split of organism seed `seed`; splits never meet."""
    if split not in IMAGE_SPLITS:
        raise MechloraError(f"unknown image split {split!r}; use one of {', '.join(IMAGE_SPLITS)}")
    if not 0 <= index < SPLIT_SIZE:
        raise MechloraError(f"film index {index} is out of range 0..{SPLIT_SIZE - 1}")
    return seed * 1_000_000 + IMAGE_SPLITS[split] + index


@dataclass(frozen=True)
class Fold:
    """One leave-one-family-out fold of a build: where its three data files are."""

    name: str                        # = test_family
    train_families: tuple[str, ...]
    validation_family: str
    test_family: str
    train: Path                      # train images x train_families: LoRA training pairs
    validation: Path                 # validation images x validation_family: choose settings
    test: Path                       # test images x test_family: report

    @property
    def files(self) -> dict[str, Path]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


def fold_families(test_family: str) -> tuple[tuple[str, ...], str, str]:
    """(training families, validation family, test family) of the fold of `test_family`."""
    if test_family not in PHENOMENA:
        raise MechloraError(f"unknown fold {test_family!r}; folds are named after their test "
                            f"family: {', '.join(PHENOMENA)}")
    return tuple(p for p in PHENOMENA if p != test_family), VALIDATION_FAMILY, test_family


def fold_paths(test_family: str) -> dict[str, str]:
    """A fold's files, relative to the build folder."""
    fold_families(test_family)
    return {"train": f"data/{test_family}.train.jsonl", "validation": f"data/{VALIDATION_FILE}",
            "test": f"data/{test_family}.test.jsonl"}


def layout() -> dict:
    """The `files` entry of organism.json: every fold's families and files."""
    folds = {}
    for name in PHENOMENA:
        train, validation, test = fold_families(name)
        folds[name] = {"train_families": list(train), "validation_family": validation,
                       "test_family": test, **fold_paths(name)}
    return {"images": "data/images", "folds": folds}


def load_folds(folder: str | Path) -> dict[str, Fold]:
    """Every fold of the build in `folder`, in `PHENOMENA` order; its files must exist."""
    folder = Path(folder)
    meta_path = folder / "organism.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        entries = meta["files"]["folds"].items()
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, KeyError, TypeError,
            AttributeError):
        raise MechloraError(f"{folder} is not a finished organism build with folds (no valid "
                            f"{meta_path.name}); build it with mechlora.organism.build_organism"
                            ) from None
    folds = {}
    for name, e in entries:
        try:
            paths = {k: folder / e[k] for k in ("train", "validation", "test")}
            fold = Fold(name, tuple(e["train_families"]), e["validation_family"],
                        e["test_family"], **paths)
        except (KeyError, TypeError) as err:
            what = (f"has no field {err.args[0]!r}" if isinstance(err, KeyError)
                    else f"is malformed ({err})")
            raise MechloraError(f"{meta_path}: fold {name} {what}; rebuild the organism "
                                "(rebuild=True)") from None
        for kind, path in paths.items():
            if not path.is_file():
                raise MechloraError(f"{path}: the {kind} file of fold {name} is missing; "
                                    "rebuild the organism (rebuild=True)")
        folds[name] = fold
    return folds


def _records(films: list[tuple[int, Film]], split: str, families) -> list[dict]:
    return [r for i, film in films
            for r in groups_for(film, f"{split}{i:04d}", f"images/{split}-{i:04d}.png", families)]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def write_data(folder: str | Path, *, seed: int, n_train: int, n_validation: int,
               n_test: int) -> None:
    """Write the images of the three splits and every fold's files under `folder` (`data/`)."""
    folder = Path(folder)
    films = {}
    for split, n in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        films[split] = [(i, sample_film(film_seed(split, i, seed))) for i in range(n)]
        for i, film in films[split]:
            buf = io.BytesIO()
            render(film).save(buf, format="PNG")
            atomic_write_bytes(folder / "images" / f"{split}-{i:04d}.png", buf.getvalue())
    _write_jsonl(folder / VALIDATION_FILE,
                 _records(films["validation"], "validation", [VALIDATION_FAMILY]))
    for name in PHENOMENA:
        train, _, test = fold_families(name)
        _write_jsonl(folder / f"{name}.train.jsonl", _records(films["train"], "train", train))
        _write_jsonl(folder / f"{name}.test.jsonl", _records(films["test"], "test", [test]))


def verify_data(folder: str | Path) -> None:
    """Parse every file of every fold of the build in `folder`; raise on any leak.

    A training file may hold only train images and the training phrasing or paraphrases of its
    training families; a validation file only validation images and the validation family; a
    test file only test images and its test family. No image (by content) is in two splits, and
    no text of a fold's validation or test family is in its training file.
    """
    folder = Path(folder)
    texts = {f: {t for q in BANK for t in q.families[f]} for f in FAMILIES}
    canonical = {q.train for q in BANK}
    seen: dict[str, str] = {}  # image content hash -> split
    digests: dict[Path, str] = {}
    for name, fold in load_folds(folder).items():
        allowed = {"train": fold.train_families, "validation": (fold.validation_family,),
                   "test": (fold.test_family,)}
        if fold.test_family in (*fold.train_families, fold.validation_family):
            raise MechloraError(f"fold {name}: its test family is also trained or validated on")
        for kind, path in fold.files.items():
            forbidden = set().union(*(texts[f] for f in FAMILIES if f not in allowed[kind]))
            for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                where = f"{path}:{line_no}"
                g = json.loads(line)
                image = g.get("image", "")
                if not image.startswith(f"images/{kind}-"):
                    raise MechloraError(f"{where}: image {image!r} is not a {kind} image")
                file = path.parent / image
                if file not in digests:
                    digests[file] = hashlib.sha256(file.read_bytes()).hexdigest()
                digest = digests[file]
                if seen.setdefault(digest, kind) != kind:
                    raise MechloraError(f"{where}: image {image!r} is also a {seen[digest]} image")
                if g["question"] not in canonical:
                    raise MechloraError(f"{where}: question {g['question']!r} is not a training "
                                        "phrasing")
                for p in g["paraphrases"]:
                    if p["phenomenon"] not in allowed[kind] or p["text"] in forbidden:
                        raise MechloraError(f"{where}: paraphrase {p['text']!r} "
                                            f"({p['phenomenon']}) must not be in a {kind} file "
                                            f"of fold {name}")
