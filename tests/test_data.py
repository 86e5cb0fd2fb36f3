"""Paraphrase data: formats, aliases, every validation error, pairs, hashing, round trips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mechlora.data import (
    EXAMPLE_PATH,
    Pair,
    QuestionGroup,
    Variant,
    data_hash,
    load_groups,
    load_image,
    make_pairs,
    write_groups,
)
from mechlora.errors import DataError, MechloraError
from mechlora.io import read_jsonl


def make_image(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8), mode="L").save(path)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_records(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(r) for r in records])


def group_record(**overrides) -> dict:
    record = {"id": "q1", "question": "Is there pleural effusion?",
              "paraphrases": ["Is there fluid in the pleural space?"], "answer": "yes"}
    record.update(overrides)
    return {k: v for k, v in record.items() if v is not None}


def load_error(path: Path) -> DataError:
    with pytest.raises(DataError) as info:
        load_groups(path)
    return info.value


def assert_located(err: DataError, path: Path, line: int | None, field: str | None) -> None:
    msg = str(err)
    assert str(path) in msg and err.file == str(path)
    if line is not None:
        assert f"{path}:{line}:" in msg and err.line == line
    if field is not None:
        assert f"field '{field}'" in msg and err.field == field


# --------------------------------------------------------------------------------------------
# Formats


def test_jsonl_basic(tmp_path):
    make_image(tmp_path / "img" / "a.png")
    path = write_lines(tmp_path / "d.jsonl", [
        "# a comment",
        "",
        json.dumps({"id": "q1", "image": "img/a.png", "question": " Is there effusion? ",
                    "paraphrases": ["Is fluid present?",
                                    {"text": "Can effusion be seen?",
                                     "phenomenon": "syntactic_restructuring"}],
                    "answer": " Yes ", "type": "presence"}),
        "   ",
        json.dumps({"id": 7, "question": "Is the heart enlarged?",
                    "paraphrases": [{"text": "Is there cardiomegaly?"}], "answer": "no"}),
    ])
    g1, g2 = load_groups(path)
    assert g1.id == "q1" and g1.line == 3 and g1.source == str(path.resolve())
    assert g1.variants == (Variant("Is there effusion?"), Variant("Is fluid present?"),
                           Variant("Can effusion be seen?", "syntactic_restructuring"))
    assert g1.question == "Is there effusion?"
    assert g1.answer == "yes" and g1.answer_index == 0 and g1.choices == ("yes", "no")
    assert g1.image == (tmp_path / "img" / "a.png").resolve() and g1.image.is_absolute()
    assert g1.type == "presence"
    assert g2.id == "7" and g2.line == 5 and g2.image is None and g2.type is None
    assert g2.answer_index == 1 and g2.variants[1].phenomenon is None


def test_custom_choices_and_answer_case(tmp_path):
    path = write_records(tmp_path / "d.jsonl", [
        group_record(answer="LEFT", choices=["Left", "Right", "Both"])])
    (g,) = load_groups(path)
    assert g.choices == ("Left", "Right", "Both") and g.answer == "Left" and g.answer_index == 0


def test_psf_med_aliases(tmp_path):
    make_image(tmp_path / "files" / "p10" / "x.jpg")
    record = {"question_id": 1234, "original_question": "Is there any pneumothorax?",
              "image_path": "files/p10/x.jpg", "category": "abnormality",
              "paraphrases": [{"text": "Is a pneumothorax present?",
                               "phenomenon": "syntactic_restructuring", "is_yesno": True},
                              {"text": "Any air in the pleural space?",
                               "phenomenon": "lexical_substitution"}],
              "answer": "No", "dataset": "mimic"}
    (g,) = load_groups(write_records(tmp_path / "psf.jsonl", [record]))
    assert g.id == "1234" and g.question == "Is there any pneumothorax?"
    assert g.image == (tmp_path / "files" / "p10" / "x.jpg").resolve()
    assert g.type == "abnormality" and g.answer == "no"
    assert [v.phenomenon for v in g.variants] == [
        None, "syntactic_restructuring", "lexical_substitution"]


def test_question_type_alias(tmp_path):
    (g,) = load_groups(write_records(tmp_path / "d.jsonl",
                                     [group_record(question_type="presence")]))
    assert g.type == "presence"


def test_alias_conflict(tmp_path):
    path = write_records(tmp_path / "d.jsonl", [group_record(question_id="q2")])
    err = load_error(path)
    assert_located(err, path, 1, "question_id")
    assert "keep one" in str(err)


def test_alias_same_value_is_fine(tmp_path):
    path = write_records(tmp_path / "d.jsonl", [group_record(question_id="q1")])
    assert load_groups(path)[0].id == "q1"


def test_flat_pair_rows(tmp_path):
    path = write_records(tmp_path / "d.jsonl", [
        {"id": "p1", "a": "Is there effusion?", "b": "Is fluid present?", "answer": "yes",
         "phenomenon": "lexical_substitution"},
        {"id": "p2", "a": "Is it left?", "b": "Is it on the left?", "answer": "left",
         "choices": ["left", "right"], "type": "laterality"},
    ])
    g1, g2 = load_groups(path)
    assert g1.variants == (Variant("Is there effusion?"),
                           Variant("Is fluid present?", "lexical_substitution"))
    assert g2.choices == ("left", "right") and g2.type == "laterality"


@pytest.mark.parametrize("suffix", [".jsonl", ".json-lines", ".ndjson", ".JSONL"])
def test_jsonl_suffixes(tmp_path, suffix):
    path = write_records(tmp_path / f"d{suffix}", [group_record()])
    assert len(load_groups(path)) == 1


def test_csv_grouped(tmp_path):
    make_image(tmp_path / "a.png")
    path = tmp_path / "d.csv"
    path.write_text(
        "ID,image,question,paraphrases,phenomena,answer,choices,type\n"
        "\n"
        'q1,a.png,"Is there effusion, at all?",Is fluid present?|Can effusion be seen?,'
        "lexical_substitution|,Yes,,presence\n"
        "q2,,Is it left?,Is it on the left?,,right,left|right,\n",
        encoding="utf-8")
    g1, g2 = load_groups(path)
    assert g1.line == 3 and g2.line == 4
    assert g1.question == "Is there effusion, at all?" and g1.answer == "yes"
    assert [v.phenomenon for v in g1.variants] == [None, "lexical_substitution", None]
    assert g1.image == (tmp_path / "a.png").resolve() and g1.type == "presence"
    assert g2.image is None and g2.choices == ("left", "right") and g2.answer_index == 1


def test_csv_flat_pairs_and_multiline_cell(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('id,a,b,answer\np1,"Is there\neffusion?",Is fluid present?,no\n'
                    "p2,Is it big?,Is it large?,yes\n", encoding="utf-8")
    g1, g2 = load_groups(path)
    assert g1.variants[0].text == "Is there\neffusion?" and g1.line == 2
    assert g2.line == 4  # the row after a quoted newline starts on physical line 4


def test_limit(tmp_path):
    path = write_records(tmp_path / "d.jsonl", [group_record(id=f"q{i}") for i in range(5)])
    assert [g.id for g in load_groups(path, limit=2)] == ["q0", "q1"]
    with pytest.raises(MechloraError):
        load_groups(path, limit=0)


def test_absolute_image_inside_folder_is_allowed(tmp_path):
    img = make_image(tmp_path / "a.png")
    path = write_records(tmp_path / "d.jsonl", [group_record(image=str(img))])
    assert load_groups(path)[0].image == img.resolve()


def test_bundled_example_loads():
    groups = load_groups(EXAMPLE_PATH)
    assert len(groups) == 8
    assert all(4 <= len(g.variants) <= 5 for g in groups)
    assert all(g.image is not None and load_image(g.image).mode == "RGB" for g in groups)
    phenomena = {v.phenomenon for g in groups for v in g.variants[1:]}
    assert phenomena == {"lexical_substitution", "syntactic_restructuring", "register_shift",
                         "added_context"}
    assert {g.answer for g in groups} == {"yes", "no"}


# --------------------------------------------------------------------------------------------
# Errors in records: each names file, line and field


RECORD_ERRORS = [
    # (record, field, words the message must contain)
    ({"question": "Q?", "paraphrases": ["P?"], "answer": "yes"}, "id", "missing"),
    (group_record(id=""), "id", "empty"),
    (group_record(id=True), "id", "string or an integer"),
    (group_record(question=None), "question", "missing"),
    (group_record(question="  "), "question", "empty"),
    (group_record(question=3), "question", "must be a string"),
    (group_record(paraphrases=None), "paraphrases", "missing"),
    (group_record(paraphrases=[]), "paraphrases", "at least one paraphrase"),
    (group_record(paraphrases="P?"), "paraphrases", "must be a list"),
    (group_record(paraphrases=[""]), "paraphrases", "paraphrase 1 is empty"),
    (group_record(paraphrases=[5]), "paraphrases", "paraphrase 1 must be a string or an object"),
    (group_record(paraphrases=[{"phenomenon": "x"}]), "paraphrases", "has no 'text'"),
    (group_record(paraphrases=[{"text": "P?", "phenomenon": 1}]), "paraphrases", "phenomenon"),
    (group_record(paraphrases=["Is there pleural effusion?"]), "paraphrases",
     "paraphrase 1 repeats the question"),
    (group_record(paraphrases=["P?", "Q2?", "P?"]), "paraphrases",
     "paraphrase 3 repeats paraphrase 1"),
    (group_record(answer=None), "answer", "missing"),
    (group_record(answer=""), "answer", "empty"),
    (group_record(answer="maybe"), "answer", "not one of the choices"),
    (group_record(answer=True), "answer", "must be a string"),
    (group_record(choices=["yes"]), "choices", "at least two"),
    (group_record(choices=["yes", "Yes", "no"]), "choices", "listed twice"),
    (group_record(choices="yes|no"), "choices", "must be a list"),
    (group_record(choices=["yes", ""]), "choices", "empty"),
    (group_record(type=3), "type", "must be a string"),
    (group_record(image=""), "image", "empty"),
    (group_record(image=5), "image", "must be a string"),
    ({"id": "p", "a": "A?", "b": "A?", "answer": "yes"}, "b", "repeats 'a'"),
    ({"id": "p", "a": "A?", "answer": "yes"}, "b", "needs both"),
    ({"id": "p", "a": "", "b": "B?", "answer": "yes"}, "a", "empty"),
    ({"id": "p", "a": "A?", "b": "B?", "question": "Q?", "answer": "yes"}, "a", "not both"),
]


@pytest.mark.parametrize(("record", "field", "words"), RECORD_ERRORS)
def test_record_errors(tmp_path, record, field, words):
    path = write_lines(tmp_path / "d.jsonl", ["# header", json.dumps(group_record(id="ok")),
                                              json.dumps(record)])
    err = load_error(path)
    assert_located(err, path, 3, field)
    assert words in str(err)


def test_malformed_json_names_column(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(group_record()),
                                              '  {"id": "q2", "question": }'])
    err = load_error(path)
    assert_located(err, path, 2, None)
    assert "not valid JSON at column 28" in str(err)


@pytest.mark.parametrize(("line", "kind"), [("[1, 2]", "array"), ('"text"', "string"),
                                            ("null", "null"), ("3", "number")])
def test_line_not_an_object(tmp_path, line, kind):
    path = write_lines(tmp_path / "d.jsonl", [line])
    err = load_error(path)
    assert_located(err, path, 1, None)
    assert f"is a JSON {kind}, not an object" in str(err)


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_records(tmp_path / "d.jsonl", [group_record(), group_record(id="q2"),
                                                 group_record()])
    err = load_error(path)
    assert_located(err, path, 3, "id")
    assert "already used on line 1" in str(err)


def test_missing_image_file(tmp_path):
    path = write_records(tmp_path / "d.jsonl", [group_record(image="nope.png")])
    err = load_error(path)
    assert_located(err, path, 1, "image")
    assert "not found" in str(err)


def test_unreadable_image(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    path = write_records(tmp_path / "d.jsonl", [group_record(image="bad.png")])
    err = load_error(path)
    assert_located(err, path, 1, "image")
    assert "not a readable image" in str(err)


def test_truncated_image(tmp_path):
    data = (make_image(tmp_path / "full.png")).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    path = write_records(tmp_path / "d.jsonl", [group_record(image="cut.png")])
    assert_located(load_error(path), path, 1, "image")


def test_image_escaping_with_dotdot(tmp_path):
    make_image(tmp_path / "outside.png")
    (tmp_path / "data").mkdir()
    path = write_records(tmp_path / "data" / "d.jsonl", [group_record(image="../outside.png")])
    err = load_error(path)
    assert_located(err, path, 1, "image")
    assert "outside the data folder" in str(err)


def test_image_escaping_with_absolute_path(tmp_path):
    img = make_image(tmp_path / "outside.png")
    (tmp_path / "data").mkdir()
    path = write_records(tmp_path / "data" / "d.jsonl", [group_record(image=str(img))])
    assert "outside the data folder" in str(load_error(path))


def test_dotdot_that_stays_inside_is_allowed(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    path = write_records(tmp_path / "d.jsonl", [group_record(image="sub/../a.png")])
    assert load_groups(path)[0].image == (tmp_path / "a.png").resolve()


def test_image_escaping_through_symlink(tmp_path):
    make_image(tmp_path / "elsewhere" / "a.png")
    (tmp_path / "data").mkdir()
    try:
        os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "imgs")
    except OSError:
        pytest.skip("symlinks not available")
    path = write_records(tmp_path / "data" / "d.jsonl", [group_record(image="imgs/a.png")])
    err = load_error(path)
    assert_located(err, path, 1, "image")
    assert "outside the data folder" in str(err)


# --------------------------------------------------------------------------------------------
# Errors about the file itself


def test_file_not_found(tmp_path):
    path = tmp_path / "missing.jsonl"
    err = load_error(path)
    assert_located(err, path, None, None)
    assert "not found" in str(err)


def test_folder_instead_of_file(tmp_path):
    assert "is a folder" in str(load_error(tmp_path))


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n"])
def test_empty_jsonl(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    err = load_error(path)
    assert_located(err, path, None, None)
    assert "no question groups" in str(err)


def test_empty_csv_header_only(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,question,paraphrases,answer\n")
    assert "no question groups" in str(load_error(path))


def test_unknown_suffix(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("x")
    err = load_error(path)
    assert_located(err, path, None, None)
    assert "'.txt'" in str(err) and ".jsonl" in str(err) and ".csv" in str(err)


def test_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(group_record()).encode() + b"\n{\"id\": \"\xff\"}\n")
    err = load_error(path)
    assert_located(err, path, 2, None)
    assert "UTF-8" in str(err)


def test_csv_wrong_cell_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,question,paraphrases,answer\nq1,Is it big, really?,Is it large?,yes\n")
    err = load_error(path)
    assert_located(err, path, 2, None)
    assert "5 cells" in str(err) and "quote" in str(err)


def test_csv_duplicate_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,question,Answer,answer\n")
    assert_located(load_error(path), path, 1, "answer")


def test_csv_phenomena_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,question,paraphrases,phenomena,answer\n"
                    "q1,Is it big?,Is it large?|Is it huge?,lexical_substitution,yes\n")
    assert_located(load_error(path), path, 2, "phenomena")


def test_csv_record_error_has_row_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,question,paraphrases,answer\n\nq1,Is it big?,Is it large?,maybe\n")
    assert_located(load_error(path), path, 3, "answer")


def test_csv_empty_paraphrase_piece(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,question,paraphrases,answer\nq1,Is it big?,Is it large?|,yes\n")
    err = load_error(path)
    assert_located(err, path, 2, "paraphrases")
    assert "paraphrase 2 is empty" in str(err)


# --------------------------------------------------------------------------------------------
# Images


def test_load_image_rgb(tmp_path):
    img = load_image(make_image(tmp_path / "a.png"))
    assert img.mode == "RGB" and img.size == (8, 8)


def test_load_image_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    for path, words in [(tmp_path / "bad.png", "not a readable image"),
                        (tmp_path / "missing.png", "not found")]:
        with pytest.raises(DataError) as info:
            load_image(path)
        assert str(path) in str(info.value) and words in str(info.value)
        assert info.value.field == "image"


# --------------------------------------------------------------------------------------------
# Pairs


def make_group(gid: str, n: int) -> QuestionGroup:
    variants = tuple(Variant(f"{gid} wording {i}?") for i in range(n))
    return QuestionGroup(id=gid, variants=variants, answer="yes")


def test_pair_counts_and_order():
    groups = [make_group("g1", 4), make_group("g2", 2)]
    pairs = make_pairs(groups)
    assert len(pairs) == 4 * 3 + 2 * 1
    assert [p.group.id for p in pairs] == ["g1"] * 12 + ["g2"] * 2
    assert len({(p.group.id, p.a, p.b) for p in pairs}) == len(pairs)
    one_way = make_pairs(groups, both_directions=False)
    assert len(one_way) == 6 + 1 and all(p.a < p.b for p in one_way)


def test_pair_properties():
    pair = make_pairs([make_group("g1", 3)])[1]
    assert (pair.a, pair.b) == (0, 2)
    assert pair.text_a == "g1 wording 0?" and pair.text_b == "g1 wording 2?"
    assert pair.id == "g1:0>2"
    with pytest.raises(ValueError):
        Pair(pair.group, 1, 1)
    with pytest.raises(ValueError):
        Pair(pair.group, 0, 3)


def test_pair_cap_is_deterministic_and_seeded():
    groups = [make_group(f"g{i}", 5) for i in range(6)]
    capped = make_pairs(groups, max_pairs_per_group=3, seed=1)
    assert len(capped) == 18
    assert [p.id for p in capped] == [p.id for p in make_pairs(groups, max_pairs_per_group=3,
                                                                seed=1)]
    assert [p.id for p in capped] != [p.id for p in make_pairs(groups, max_pairs_per_group=3,
                                                                    seed=2)]
    # one group's subset does not depend on which other groups are loaded
    alone = make_pairs(groups[3:4], max_pairs_per_group=3, seed=1)
    assert [p.id for p in alone] == [p.id for p in capped if p.group.id == "g3"]
    # a cap above the number of pairs keeps them all
    assert len(make_pairs(groups[:1], max_pairs_per_group=100)) == 20
    with pytest.raises(MechloraError):
        make_pairs(groups, max_pairs_per_group=0)


def test_answer_index_falls_back_to_case():
    group = QuestionGroup(id="g", variants=(Variant("a?"), Variant("b?")), answer="No")
    assert group.answer_index == 1
    with pytest.raises(ValueError):
        QuestionGroup(id="g", variants=group.variants, answer="maybe").answer_index  # noqa: B018


# --------------------------------------------------------------------------------------------
# Hashing and writing


def hashed_dataset(root: Path, answer: str = "yes", pixel: int = 128) -> list[QuestionGroup]:
    make_image(root / "img" / "a.png", pixel)
    path = write_records(root / "d.jsonl", [group_record(image="img/a.png", answer=answer),
                                            group_record(id="q2", answer="no")])
    return load_groups(path)


def test_data_hash(tmp_path):
    base = data_hash(hashed_dataset(tmp_path / "a"))
    assert len(base) == 64 and base == data_hash(hashed_dataset(tmp_path / "a"))
    # moving the folder changes paths, not content
    assert data_hash(hashed_dataset(tmp_path / "b")) == base
    assert data_hash(hashed_dataset(tmp_path / "c", answer="no")) != base
    assert data_hash(hashed_dataset(tmp_path / "d", pixel=129)) != base
    assert data_hash(list(reversed(hashed_dataset(tmp_path / "e")))) != base


def test_write_load_round_trip(tmp_path):
    make_image(tmp_path / "img" / "a.png")
    src = write_records(tmp_path / "src.csv.jsonl", [
        group_record(image="img/a.png", type="presence",
                     paraphrases=["P1?", {"text": "P2?", "phenomenon": "register_shift"}]),
        {"id": "p", "a": "A?", "b": "B?", "answer": "Right", "choices": ["left", "right"]},
    ])
    groups = load_groups(src)
    out = tmp_path / "out.jsonl"
    write_groups(out, groups)
    first = json.loads(out.read_text().splitlines()[0])
    assert first["image"] == "img/a.png"
    assert first["paraphrases"][1] == {"text": "P2?", "phenomenon": "register_shift"}
    again = load_groups(out)
    strip = [(g.id, g.variants, g.answer, g.choices, g.image, g.type) for g in groups]
    assert strip == [(g.id, g.variants, g.answer, g.choices, g.image, g.type) for g in again]
    assert data_hash(again) == data_hash(groups)


def test_write_groups_in_subfolder_makes_paths_relative_to_it(tmp_path):
    img = make_image(tmp_path / "nested" / "img" / "a.png")
    groups = load_groups(write_records(tmp_path / "d.jsonl",
                                       [group_record(image="nested/img/a.png")]))
    out = tmp_path / "nested" / "out.jsonl"
    write_groups(out, groups)
    assert json.loads(out.read_text())["image"] == "img/a.png"
    assert load_groups(out)[0].image == img.resolve()


def test_write_groups_refuses_image_outside_folder(tmp_path):
    groups = hashed_dataset(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(MechloraError, match="not in or below"):
        write_groups(tmp_path / "sub" / "out.jsonl", groups)
    assert not (tmp_path / "sub" / "out.jsonl").exists()


LINE_BREAKERS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"  # str.splitlines() splits on each


def test_write_load_round_trip_keeps_unicode_line_separators(tmp_path):
    """Text may hold characters that str.splitlines() treats as line ends; JSONL does not."""
    texts = [f"Is there{ch}effusion?" for ch in LINE_BREAKERS]
    groups = [QuestionGroup(id=f"g{i}{ch}x", variants=(Variant(t), Variant(t + " (again)",
                                                                            f"ph{ch}ase")),
                            answer="yes", type=f"t{ch}y")
              for i, (ch, t) in enumerate(zip(LINE_BREAKERS, texts, strict=True))]
    out = tmp_path / "out.jsonl"
    write_groups(out, groups)
    again = load_groups(out)
    assert [(g.id, g.variants, g.type) for g in again] == [(g.id, g.variants, g.type)
                                                          for g in groups]
    assert [g.line for g in again] == list(range(1, len(groups) + 1))  # lines count "\n" only


def test_crlf_jsonl_still_loads(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\r\n".join(json.dumps(group_record(id=f"g{i}")) for i in range(3))
                      + "\r\n").encode())
    assert [g.id for g in load_groups(path)] == ["g0", "g1", "g2"]


def test_read_jsonl_splits_on_newline_only(tmp_path):
    rows = [{"text": f"a{ch}b", "i": i} for i, ch in enumerate(LINE_BREAKERS)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "\n",
                    encoding="utf-8")
    assert read_jsonl(path) == rows
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(MechloraError, match=r"rows.jsonl:2: not valid JSON"):
        read_jsonl(path)
