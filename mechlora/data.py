"""Paraphrase data: question groups (a question, its paraphrases, an answer, an image) and pairs.

Formats, aliases and every error are documented in docs/data.md. Every user mistake is a
DataError that names the file, the line and the field, and says what to do.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mechlora.errors import DataError, MechloraError
from mechlora.io import atomic_write_text, jsonl_lines

JSONL_SUFFIXES = (".jsonl", ".json-lines", ".ndjson")
CSV_SUFFIXES = (".csv",)
DEFAULT_CHOICES = ("yes", "no")
EXAMPLE_PATH = Path(__file__).parent / "examples" / "pairs.jsonl"

# Field names of the published PSF-Med records (and common spellings) -> our names.
ALIASES = {
    "question_id": "id",
    "original_question": "question",
    "image_path": "image",
    "category": "type",
    "question_type": "type",
}


@dataclass(frozen=True)
class Variant:
    text: str
    phenomenon: str | None = None  # None for the original question


@dataclass(frozen=True)
class QuestionGroup:
    id: str
    variants: tuple[Variant, ...]  # variants[0] is the original question, then the paraphrases
    answer: str  # spelled exactly as one of `choices`
    choices: tuple[str, ...] = DEFAULT_CHOICES
    image: Path | None = None  # absolute, resolved, checked to open with Pillow
    type: str | None = None
    source: str | None = None  # file the group came from
    line: int | None = None  # 1-based line of the record in `source`

    @property
    def question(self) -> str:
        return self.variants[0].text

    @property
    def answer_index(self) -> int:
        if self.answer in self.choices:
            return self.choices.index(self.answer)
        folded = [c.casefold() for c in self.choices]
        if self.answer.casefold() in folded:
            return folded.index(self.answer.casefold())
        raise ValueError(f"group {self.id}: answer {self.answer!r} is not among {self.choices}")


@dataclass(frozen=True)
class Pair:
    group: QuestionGroup
    a: int  # variant index of the first prompt (the donor when patching a into b)
    b: int  # variant index of the second prompt

    def __post_init__(self) -> None:
        n = len(self.group.variants)
        if not (0 <= self.a < n and 0 <= self.b < n) or self.a == self.b:
            raise ValueError(f"bad pair ({self.a}, {self.b}) for group {self.group.id} of {n}")

    @property
    def text_a(self) -> str:
        return self.group.variants[self.a].text

    @property
    def text_b(self) -> str:
        return self.group.variants[self.b].text

    @property
    def id(self) -> str:
        return f"{self.group.id}:{self.a}>{self.b}"


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class _Where:
    """Where a record sits, so every error can point at it."""

    file: str
    line: int | None = None

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, file=self.file, line=self.line, field=field)


@dataclass
class _Context:
    base: Path  # resolved folder of the data file: image paths are confined to it
    source: str
    checked_images: set[Path]


def load_groups(path: str | Path, *, limit: int | None = None) -> list[QuestionGroup]:
    """Read question groups from a .jsonl or .csv file, validating every record."""
    if limit is not None and limit < 1:
        raise MechloraError(f"limit must be at least 1 group, got {limit}")
    path = Path(path)
    where = _Where(str(path))
    if not path.exists():
        raise where.error("file not found; check the path to the paraphrase data file")
    if not path.is_file():
        raise where.error("is a folder, not a data file; give the .jsonl or .csv file inside it")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        records = _jsonl_records(path, _read_text(path))
    elif suffix in CSV_SUFFIXES:
        records = _csv_records(path, _read_text(path))
    else:
        raise where.error(f"unknown data file type {suffix or '(no suffix)'!r}; use .jsonl "
                          "(one JSON object per line) or .csv (a header row), see docs/data.md")

    ctx = _Context(base=path.absolute().parent.resolve(), source=str(path.resolve()),
                   checked_images=set())
    groups: list[QuestionGroup] = []
    first_line: dict[str, int] = {}
    for line, record in records:
        group = _parse_record(record, _Where(str(path), line), ctx)
        if group.id in first_line:
            raise _Where(str(path), line).error(
                f"id {group.id!r} is already used on line {first_line[group.id]}; "
                "give each question group its own id", "id")
        first_line[group.id] = line
        groups.append(group)
        if limit is not None and len(groups) >= limit:
            break
    if not groups:
        raise where.error("holds no question groups; add at least one record (see docs/data.md)")
    return groups


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError("is not UTF-8 text; save the file with UTF-8 encoding",
                        file=str(path), line=line) from None


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, raw in enumerate(jsonl_lines(text), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = _Where(str(path), line)
        try:
            record = json.loads(stripped)
        except json.JSONDecodeError as e:
            # Column within the original line, which may have leading spaces we stripped.
            column = e.colno + (len(raw) - len(raw.lstrip()))
            raise where.error(f"not valid JSON at column {column} ({e.msg}); each line must "
                              "be one complete JSON object") from None
        if not isinstance(record, dict):
            raise where.error(f"is a JSON {_json_kind(record)}, not an object; write each "
                              'question group as {"id": ..., "question": ..., ...}')
        yield line, record


def _json_kind(value: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _csv_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    header_line = 0
    while True:
        start = reader.line_num + 1  # a row may span lines (quoted newlines): report its first
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"is not valid CSV ({e}); check the quoting",
                            file=str(path), line=start) from None
        if not any(cell.strip() for cell in row):
            continue
        where = _Where(str(path), start)
        if header is None:
            header, header_line = _csv_header(row, where), start
            continue
        if len(row) != len(header):
            raise where.error(f"row has {len(row)} cells but the header on line {header_line} "
                              f"has {len(header)}; quote cells that contain commas")
        yield start, _csv_row_to_record(dict(zip(header, row, strict=True)), where)


def _csv_header(row: list[str], where: _Where) -> list[str]:
    header = [cell.strip().lower() for cell in row]
    for i, name in enumerate(header):
        if not name:
            raise where.error(f"header column {i + 1} has no name; name every column")
        if name in header[:i]:
            raise where.error(f"column {name!r} appears twice in the header; keep one", name)
    return header


def _csv_row_to_record(cells: dict[str, str], where: _Where) -> dict[str, Any]:
    """CSV cells -> the record shape JSONL uses; empty cells count as absent."""
    record: dict[str, Any] = {k: v.strip() for k, v in cells.items() if v.strip()}
    for key in ("choices", "paraphrases", "phenomena"):
        if key in record:
            record[key] = [part.strip() for part in record[key].split("|")]
    phenomena = record.pop("phenomena", None)
    if phenomena is not None:
        texts = record.get("paraphrases", [])
        if len(phenomena) != len(texts):
            raise where.error(f"lists {len(phenomena)} phenomena for {len(texts)} paraphrases; "
                              "give one per paraphrase, '|'-separated (leave one empty for "
                              "none)", "phenomena")
        record["paraphrases"] = [{"text": t, "phenomenon": p or None}
                                 for t, p in zip(texts, phenomena, strict=True)]
    return record


def _parse_record(record: dict[str, Any], where: _Where, ctx: _Context) -> QuestionGroup:
    record = _apply_aliases(record, where)
    choices = _parse_choices(record, where)
    return QuestionGroup(
        id=_parse_id(record, where),
        variants=_parse_variants(record, where),
        answer=_parse_answer(record, choices, where),
        choices=choices,
        image=_parse_image(record, where, ctx),
        type=_optional_str(record, "type", where),
        source=ctx.source,
        line=where.line,
    )


def _apply_aliases(record: dict[str, Any], where: _Where) -> dict[str, Any]:
    out = dict(record)
    for alias, name in ALIASES.items():
        if alias not in record:
            continue
        value = out.pop(alias)
        if name in out and out[name] != value:
            raise where.error(f"both {name!r} and {alias!r} are given with different values; "
                              "keep one", alias)
        out[name] = value
    return out


def _parse_id(record: dict[str, Any], where: _Where) -> str:
    if "id" not in record or record["id"] is None:
        raise where.error("missing; give each question group a unique id", "id")
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise where.error("must be a string or an integer", "id")
    text = str(value).strip()
    if not text:
        raise where.error("is empty; give each question group a unique id", "id")
    return text


def _required_text(value: Any, where: _Where, field: str, what: str) -> str:
    if not isinstance(value, str):
        raise where.error(f"{what} must be a string, got {_json_kind(value)}", field)
    text = value.strip()
    if not text:
        raise where.error(f"{what} is empty; write the text or remove the entry", field)
    return text


def _optional_str(record: dict[str, Any], field: str, where: _Where) -> str | None:
    value = record.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise where.error(f"must be a string, got {_json_kind(value)}", field)
    return value.strip() or None


def _parse_variants(record: dict[str, Any], where: _Where) -> tuple[Variant, ...]:
    if "a" in record or "b" in record:
        return _parse_flat_pair(record, where)
    if record.get("question") is None:
        raise where.error("missing; give 'question' and 'paraphrases' (or 'a' and 'b' for a "
                          "single pair)", "question")
    variants = [Variant(_required_text(record["question"], where, "question", "the question"))]
    paraphrases = record.get("paraphrases")
    if paraphrases is None:
        raise where.error("missing; list at least one paraphrase of the question", "paraphrases")
    if not isinstance(paraphrases, list):
        raise where.error(f"must be a list, got {_json_kind(paraphrases)}", "paraphrases")
    if not paraphrases:
        raise where.error("is empty; a group needs the question and at least one paraphrase "
                          "(two variants) to compare", "paraphrases")
    for k, item in enumerate(paraphrases, start=1):
        variants.append(_parse_paraphrase(item, k, where))
    _check_distinct(variants, where)
    return tuple(variants)


def _parse_paraphrase(item: Any, k: int, where: _Where) -> Variant:
    what = f"paraphrase {k}"
    if isinstance(item, str):
        return Variant(_required_text(item, where, "paraphrases", what))
    if not isinstance(item, dict):
        raise where.error(f"{what} must be a string or an object with 'text', got "
                          f"{_json_kind(item)}", "paraphrases")
    if "text" not in item:
        raise where.error(f"{what} has no 'text'; write it as {{\"text\": ..., "
                          "\"phenomenon\": ...}", "paraphrases")
    text = _required_text(item["text"], where, "paraphrases", what)
    phenomenon = item.get("phenomenon")
    if phenomenon is not None and not isinstance(phenomenon, str):
        raise where.error(f"{what}: 'phenomenon' must be a string, got {_json_kind(phenomenon)}",
                          "paraphrases")
    return Variant(text, (phenomenon or "").strip() or None)


def _parse_flat_pair(record: dict[str, Any], where: _Where) -> tuple[Variant, ...]:
    for other in ("question", "paraphrases"):
        if other in record:
            raise where.error(f"give either 'a' and 'b' (one pair) or 'question' and "
                              f"'paraphrases', not both ('{other}' is also present)", "a")
    for field in ("a", "b"):
        if record.get(field) is None:
            raise where.error("missing; a pair row needs both 'a' and 'b'", field)
    a = _required_text(record["a"], where, "a", "the first prompt")
    b = _required_text(record["b"], where, "b", "the second prompt")
    if a == b:
        raise where.error("repeats 'a'; a pair needs two different wordings", "b")
    phenomenon = _optional_str(record, "phenomenon", where)
    return (Variant(a), Variant(b, phenomenon))


def _check_distinct(variants: list[Variant], where: _Where) -> None:
    seen: dict[str, int] = {}
    for k, variant in enumerate(variants):
        if variant.text in seen:
            first = seen[variant.text]
            earlier = "the question" if first == 0 else f"paraphrase {first}"
            raise where.error(f"paraphrase {k} repeats {earlier}; remove it or reword it",
                              "paraphrases")
        seen[variant.text] = k


def _parse_choices(record: dict[str, Any], where: _Where) -> tuple[str, ...]:
    value = record.get("choices")
    if value is None:
        return DEFAULT_CHOICES
    if not isinstance(value, list):
        raise where.error(f'must be a list such as ["yes", "no"], got {_json_kind(value)}',
                          "choices")
    choices = tuple(_required_text(c, where, "choices", f"choice {i}")
                    for i, c in enumerate(value, start=1))
    if len(choices) < 2:
        raise where.error("needs at least two choices, e.g. [\"yes\", \"no\"]", "choices")
    folded = [c.casefold() for c in choices]
    for i, c in enumerate(folded):
        if c in folded[:i]:
            raise where.error(f"choice {choices[i]!r} is listed twice (case is ignored); "
                              "list each answer once", "choices")
    return choices


def _parse_answer(record: dict[str, Any], choices: tuple[str, ...], where: _Where) -> str:
    if record.get("answer") is None:
        raise where.error(f"missing; give the reference answer, one of {_listing(choices)}",
                          "answer")
    answer = _required_text(record["answer"], where, "answer", "the answer")
    for choice in choices:
        if choice.casefold() == answer.casefold():
            return choice  # normalise to the choice's spelling
    raise where.error(f"{answer!r} is not one of the choices {_listing(choices)}; fix the "
                      "answer or list the choices in 'choices'", "answer")


def _listing(choices: Sequence[str]) -> str:
    return ", ".join(repr(c) for c in choices)


def _parse_image(record: dict[str, Any], where: _Where, ctx: _Context) -> Path | None:
    value = record.get("image")
    if value is None:
        return None
    given = _required_text(value, where, "image", "the image path")
    path = Path(given)
    resolved = (path if path.is_absolute() else ctx.base / path).resolve()
    # Data paths are confined to the data folder: a shared file cannot make us read elsewhere.
    if not resolved.is_relative_to(ctx.base):
        raise where.error(f"{given!r} points outside the data folder {ctx.base}; image paths "
                          "must lie in or below the data file's folder: move the images (or "
                          "the data file) and use a relative path", "image")
    if not resolved.is_file():
        raise where.error(f"image file {given!r} not found (looked for {resolved}); image "
                          "paths are relative to the data file's folder", "image")
    if resolved not in ctx.checked_images:
        _verify_image(resolved, given, where)
        ctx.checked_images.add(resolved)
    return resolved


def _verify_image(path: Path, given: str, where: _Where) -> None:
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ...) on bad files
        raise where.error(f"{given!r} is not a readable image ({type(e).__name__}: {e}); "
                          "replace it with a PNG or JPEG file", "image") from None


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB, fully decoded, or raise a DataError that says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError("image file not found; check the data file's image paths",
                        file=str(path), field="image")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # Pillow raises many types on bad files
        raise DataError(f"is not a readable image ({type(e).__name__}: {e}); replace it with "
                        "a PNG or JPEG file", file=str(path), field="image") from None


# ---------------------------------------------------------------------------------------------
# Pairs


def make_pairs(groups: Sequence[QuestionGroup], *, max_pairs_per_group: int | None = None,
               both_directions: bool = True, seed: int = 0) -> list[Pair]:
    """Ordered variant pairs within each group, in file order; a seeded subset when capped."""
    if max_pairs_per_group is not None and max_pairs_per_group < 1:
        raise MechloraError(f"max pairs per group must be at least 1, got {max_pairs_per_group}")
    pairs: list[Pair] = []
    for group in groups:
        n = len(group.variants)
        index = [(i, j) for i in range(n) for j in range(n)
                 if i != j and (both_directions or i < j)]
        if max_pairs_per_group is not None and len(index) > max_pairs_per_group:
            # Seeded per group, so one group's choice does not depend on which others are loaded.
            rng = random.Random(f"{seed}:{group.id}")
            keep = sorted(rng.sample(range(len(index)), max_pairs_per_group))
            index = [index[k] for k in keep]
        pairs.extend(Pair(group, i, j) for i, j in index)
    return pairs


# ---------------------------------------------------------------------------------------------
# Writing and provenance


def write_groups(path: str | Path, groups: Sequence[QuestionGroup]) -> None:
    """Write groups as canonical JSONL, atomically; image paths relative to the file's folder."""
    path = Path(path)
    folder = path.absolute().parent.resolve()
    lines = [json.dumps(_canonical(g, _relative_image(g, folder, path)), ensure_ascii=False)
             for g in groups]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _relative_image(group: QuestionGroup, folder: Path, out: Path) -> str | None:
    if group.image is None:
        return None
    image = Path(group.image).resolve()
    if not image.is_relative_to(folder):
        # load_groups would refuse a path outside the folder, so do not write one.
        raise MechloraError(f"cannot write {out}: the image of group {group.id!r} ({image}) is "
                            f"not in or below {folder}; write the data file into a folder that "
                            "holds the images")
    return image.relative_to(folder).as_posix()


def _canonical(group: QuestionGroup, image: str | None) -> dict[str, Any]:
    record: dict[str, Any] = {"id": group.id}
    if image is not None:
        record["image"] = image
    record["question"] = group.variants[0].text
    record["paraphrases"] = [
        {"text": v.text, "phenomenon": v.phenomenon} if v.phenomenon else {"text": v.text}
        for v in group.variants[1:]
    ]
    record["answer"] = group.answer
    record["choices"] = list(group.choices)
    if group.type is not None:
        record["type"] = group.type
    return record


def data_hash(groups: Sequence[QuestionGroup]) -> str:
    """sha256 over the content that matters for results; image bytes, not their paths."""
    digest = hashlib.sha256()
    image_hashes: dict[Path, str] = {}
    for group in groups:
        record = _canonical(group, None)
        if group.image is not None:
            if group.image not in image_hashes:
                image_hashes[group.image] = _file_sha256(group.image)
            record["image_sha256"] = image_hashes[group.image]
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    except OSError as e:
        raise DataError(f"cannot read image ({e.strerror}); check that it still exists",
                        file=os.fspath(path), field="image") from None
