"""The organism: films and their truth, the question bank, the datasets, and a quick build."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mechlora.errors import MechloraError
from mechlora.organism import (
    ORGANISMS,
    build_organism,
    load_folds,
    organism_config,
    organism_dir,
    parse_preset,
    read_meta,
)
from mechlora.organism.films import (
    SIDES,
    heart_mask,
    lung_mask,
    render,
    render_array,
    sample_film,
)
from mechlora.organism.questions import (
    BANK,
    FAMILIES,
    PHENOMENA,
    TYPES,
    VALIDATION_FAMILY,
    groups_for,
    vocabulary,
    words,
)
from mechlora.organism.splits import IMAGE_SPLITS, film_seed, write_data

SEEDS = range(200)


def test_films_are_deterministic():
    for s in (0, 7, 123456):
        assert sample_film(s) == sample_film(s)
        assert np.array_equal(render_array(sample_film(s)), render_array(sample_film(s)))
    assert not np.array_equal(render_array(sample_film(1)), render_array(sample_film(2)))
    assert render(sample_film(3)).size == (64, 64)


def test_findings_are_balanced():
    films = [sample_film(s) for s in SEEDS]
    for share in (np.mean([f.opacity is not None for f in films]),
                  np.mean([f.effusion is not None for f in films]),
                  np.mean([f.heart == "enlarged" for f in films]),
                  np.mean([f.device for f in films])):
        assert 0.35 < share < 0.65


def _box_max(img, mask, k=5):
    """Brightest k x k mean centred in `mask`: a blob counts, a 1-pixel device lead does not."""
    pad = np.pad(img, k // 2, mode="edge")
    box = sum(pad[i:i + 64, j:j + 64] for i in range(k) for j in range(k)) / k**2
    return box[mask].max()


def _upper_zone(film, side):
    """Inner part of a lung field above its centre: clear of fluid, heart, spine and lung edge."""
    cx, cy, rx, ry = film.lungs[SIDES.index(side)]
    y, x = np.mgrid[0:64, 0:64]
    return (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 0.7**2) & (y < cy - 1)


def test_opacity_brightens_its_own_lung_field():
    for s in SEEDS:
        film = sample_film(s)
        img = render_array(film).astype(float)
        upper = {side: _box_max(img, _upper_zone(film, side)) for side in SIDES}
        if film.opacity is None:
            assert max(upper.values()) < 100, s
        else:
            other = SIDES[1 - SIDES.index(film.opacity)]
            assert upper[film.opacity] > 110, s
            assert upper[film.opacity] > upper[other] + 25, s
            x, y = (int(round(v)) for v in film.opacity_xy)
            assert img[y, x] > 100, s


def test_patients_right_is_on_the_image_left():
    film = next(sample_film(s) for s in SEEDS if sample_film(s).opacity == "right")
    x, _ = film.opacity_xy
    assert x < 32
    assert lung_mask(film, "right")[:, :32].sum() > lung_mask(film, "right")[:, 32:].sum()


def test_effusion_fills_the_base_with_a_flat_level():
    rows = np.arange(64)[:, None]
    for s in SEEDS:
        film = sample_film(s)
        img = render_array(film).astype(float)
        for side in SIDES:
            _, cy, _, ry = film.lungs[SIDES.index(side)]
            mask = lung_mask(film, side) & ~heart_mask(film)
            base = img[mask & (rows >= cy + ry - 10) & (rows <= cy + ry - 6)].mean()
            if film.effusion == side:
                assert base > 130, s
                top = film.fluid_top  # the level: bright from it down, dark just above
                assert img[top + 1][mask[top + 1]].mean() - img[top - 2][mask[top - 2]].mean() > 40
            else:
                assert base < 90, s


def test_heart_and_device_are_visible():
    for s in SEEDS:
        film = sample_film(s)
        img = render_array(film)
        width = int((img[44] > 158).sum())  # the heart's centre row; fluid stays below 158
        assert (width > 21) == (film.heart == "enlarged"), (s, width)
        assert (img[4:13, 44:56].max() > 220) == film.device, s


def test_bank_choices_words_and_families():
    vocab = set(vocabulary())
    seen = {w for q in BANK for t in (q.train, *q.rare) for w in words(t)}
    for q in BANK:
        assert q.kind in {"presence", "location", "size"}
        assert len({c for c in q.choices}) == len(q.choices) and set(q.choices) <= vocab
        assert set(q.families) == set(FAMILIES) and VALIDATION_FAMILY not in PHENOMENA
        texts = [q.train, *q.rare, *(t for t, _ in q.paraphrases())]
        assert len(set(texts)) == len(texts), q.name  # no family text is trained on
        for text, _ in q.paraphrases():
            assert set(words(text)) <= seen, (q.name, text)  # every family word was trained
    assert len({q.train for q in BANK}) == len(BANK)


def test_answers_match_ground_truth():
    for s in SEEDS:
        film = sample_film(s)
        by = {g["finding"]: g for g in groups_for(film, f"f{s}", None)}
        assert by["opacity"]["answer"] == ("yes" if film.opacity else "no")
        assert by["effusion"]["answer"] == ("yes" if film.effusion else "no")
        assert by["heart"]["answer"] == ("yes" if film.heart == "enlarged" else "no")
        assert by["device"]["answer"] == ("yes" if film.device else "no")
        for finding in ("opacity", "effusion"):  # a side is only asked when there is one
            side = getattr(film, finding)
            assert by.get(f"{finding}_side", {}).get("answer") == side
        size = {"large": "yes", "small": "no", None: None}[film.opacity_size]
        assert by.get("opacity_size", {}).get("answer") == size
        for g in by.values():
            assert g["answer"] in g["choices"]
            assert g["type"] == TYPES[g["finding"]].kind
            assert [p["text"] for p in g["paraphrases"]] == [t for t, _ in
                                                             TYPES[g["finding"]].paraphrases()]


def test_image_splits_are_disjoint():
    seeds = {split: {film_seed(split, i, s) for i in range(0, 250_000, 7) for s in (0, 1, 2)}
             for split in IMAGE_SPLITS}
    assert not seeds["train"] & seeds["validation"]
    assert not seeds["train"] & seeds["test"] and not seeds["validation"] & seeds["test"]
    assert film_seed("train", 3, seed=1) != film_seed("train", 3, seed=0)
    with pytest.raises(MechloraError, match="split"):
        film_seed("valid", 0)
    with pytest.raises(MechloraError, match="range"):
        film_seed("test", 250_000)


def test_data_files_are_deterministic_and_load(tmp_path):
    from mechlora.data import load_groups

    for d in ("a", "b"):
        write_data(tmp_path / d, seed=0, n_train=3, n_validation=2, n_test=2)
    names = sorted(p.name for p in (tmp_path / "a").glob("*.jsonl"))
    assert len(names) == 2 * len(PHENOMENA) + 1
    for name in names:
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    path = tmp_path / "a" / f"{PHENOMENA[0]}.test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(r["id"].startswith("test") for r in rows)
    img = np.asarray(Image.open(tmp_path / "a" / rows[0]["image"]))
    assert np.array_equal(img, render_array(sample_film(film_seed("test", 0))))
    groups = load_groups(tmp_path / "a" / f"{PHENOMENA[0]}.train.jsonl")
    assert len(groups) == sum(len(groups_for(sample_film(film_seed("train", i)), "x", None))
                              for i in range(3))
    assert {v.phenomenon for v in groups[0].variants[1:]} == set(PHENOMENA[1:])
    assert {v.phenomenon for v in load_groups(path)[0].variants[1:]} == {PHENOMENA[0]}


def test_prompts_match_the_processor():
    from mechlora.models.tokenizer import build_processor, build_tokenizer
    from mechlora.organism.train import Prompts, chat_prompt

    proc = build_processor(build_tokenizer(vocabulary()), image_size=64, image_seq_length=16)
    texts = [BANK[0].train, BANK[4].families["register_shift"][0]]
    arrays = [render_array(sample_film(s)) for s in (1, 2)]
    mine = Prompts(proc).batch(texts, np.stack(arrays))
    ref = proc(text=[chat_prompt(proc, t) for t in texts], padding=True, return_tensors="pt",
               images=[[Image.fromarray(a).convert("RGB")] for a in arrays])
    for key in ref:
        assert np.allclose(mine[key].numpy(), ref[key].numpy(), atol=1e-6), key
    assert "<unk>" not in proc.tokenizer.convert_ids_to_tokens(ref["input_ids"][1])


def test_default_dir_follows_mechlora_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MECHLORA_HOME", str(tmp_path))
    assert organism_dir() == tmp_path / "organism-mid-v2-seed0"
    assert organism_dir("organism") == organism_dir("organism-mid@0")
    assert organism_dir("organism-late", 3, quick=True) == tmp_path / "organism-late-v2-quick-seed3"


def test_presets_and_seeds():
    assert parse_preset("organism") == ("organism-mid", 0)
    assert parse_preset("organism-w3@2") == ("organism-w3", 2)
    assert parse_preset("organism-late", 4) == ("organism-late", 4)
    for bad, match in (("organism-huge", "unknown organism preset"), ("organism-mid@x", "@"),
                       ("organism-mid@-1", "@")):
        with pytest.raises(MechloraError, match=match):
            parse_preset(bad)
    with pytest.raises(MechloraError, match="give one"):
        parse_preset("organism-mid@1", 2)
    cfg = organism_config("organism-w3@1")
    assert (cfg.layers, cfg.commit, cfg.window, cfg.seed) == (8, 4, 3, 1)
    assert organism_config("organism-full").commit == 0
    quick = organism_config("organism-late", quick=True)
    assert (quick.layers, quick.commit, quick.window) == (8, 6, 2)  # same planted depth

    from mechlora.models import PRESETS

    assert {"organism", *ORGANISMS} <= set(PRESETS)
    assert "organism-mid@2" in PRESETS and "organism@1" in PRESETS
    assert "tiny-gemma3-vlm@1" not in PRESETS and "organism-mid@x" not in PRESETS
    assert PRESETS["organism-late@3"].args == ("organism-late", 3)


def test_quick_organism_builds_caches_and_loads(tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = build_organism(tmp_path / "org", quick=True, progress=False)
    meta = read_meta(out)
    assert meta["config"]["seed"] == 0 and 0 <= meta["flip_rate_heldout"] <= 1
    assert meta["preset"] == "organism-mid" and meta["torch_threads"] == 1
    assert meta["planted"] == {"commit": 4, "window": 2, "reach": 4, "suffix_tokens": 10,
                               "layer_types": ["sliding_attention"] * 4 + ["full_attention"] * 4}
    assert set(meta["versions"]) >= {"torch", "transformers"} and meta["code"]
    folds = load_folds(out)
    assert list(folds) == list(PHENOMENA)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build_organism(tmp_path / "org", quick=True, progress=False) == out  # cached
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(MechloraError, match="other settings"):
        build_organism(tmp_path / "org", seed=1, quick=True, progress=False)
    with pytest.raises(MechloraError, match="other settings"):
        build_organism(tmp_path / "org", preset="organism-late", quick=True, progress=False)

    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
    assert model.config.text_config.sliding_window == 2
    proc = AutoProcessor.from_pretrained(out, local_files_only=True)
    group = json.loads(folds[PHENOMENA[0]].test.read_text().splitlines()[0])
    image = Image.open(out / "data" / group["image"]).convert("RGB")
    message = [{"role": "user", "content": [{"type": "image"},
                                            {"type": "text", "text": group["question"]}]}]
    prompt = proc.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("? Answer with one word.<end_of_turn>\n<start_of_turn>model\n")
    inputs = proc(text=[prompt], images=[[image]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    first = [proc.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in group["choices"]]
    assert len(set(first)) == len(first)
    assert torch.isfinite(logits[first]).all()
    assert group["choices"][int(logits[first].argmax())] in group["choices"]


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(MechloraError, match="not an organism"):
        build_organism(tmp_path / "x", quick=True, progress=False)
    with pytest.raises(MechloraError, match="seed"):
        build_organism(tmp_path / "y", seed=-1, quick=True, progress=False)


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory):
    return build_organism(tmp_path_factory.mktemp("org") / "mid", quick=True, progress=False)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_no_test_family_or_image_leaks_into_training(quick_build):
    """Parse every file of every fold, independently of `verify_data`."""
    from mechlora.organism.splits import verify_data

    family_texts = {f: {t for q in BANK for t in q.families[f]} for f in FAMILIES}
    pixels = {}  # image bytes -> split
    folds = load_folds(quick_build)
    assert len(folds) == len(PHENOMENA)
    for name, fold in folds.items():
        assert fold.test_family == name and name not in fold.train_families
        assert fold.validation_family == VALIDATION_FAMILY != name
        assert set(fold.train_families) == set(PHENOMENA) - {name}
        for kind, path in fold.files.items():
            text = path.read_text()
            families = {"train": fold.train_families, "validation": [VALIDATION_FAMILY],
                        "test": [name]}[kind]
            for other in set(FAMILIES) - set(families):  # not even as a substring
                assert not any(t in text for t in family_texts[other]), (kind, name, other)
            rows = _lines(path)
            assert rows
            for g in rows:
                assert g["image"].startswith(f"images/{kind}-"), (kind, g["image"])
                assert {p["phenomenon"] for p in g["paraphrases"]} == set(families)
                data = (path.parent / g["image"]).read_bytes()
                assert pixels.setdefault(data, kind) == kind, g["image"]
    assert set(pixels.values()) == {"train", "validation", "test"}
    verify_data(quick_build)


def test_verify_data_catches_leaks(quick_build, tmp_path):
    import shutil

    from mechlora.organism.splits import verify_data

    name = PHENOMENA[0]
    leak = {"id": "x", "image": "images/train-0000.png", "question": BANK[0].train,
            "paraphrases": [{"text": BANK[0].families[name][0], "phenomenon": name}],
            "answer": "yes"}
    cases = {
        "test paraphrase in training": (f"data/{name}.train.jsonl", leak),
        "test image in training": (f"data/{name}.train.jsonl",
                                   {**leak, "image": "images/test-0000.png",
                                    "paraphrases": [{"text": BANK[0].families[PHENOMENA[1]][0],
                                                     "phenomenon": PHENOMENA[1]}]}),
        "validation family in a test file": (f"data/{name}.test.jsonl",
                                             {**leak, "image": "images/test-0000.png",
                                              "paraphrases": [{
                                                  "text": BANK[0].families[VALIDATION_FAMILY][0],
                                                  "phenomenon": name}]}),
    }
    for why, (rel, record) in cases.items():
        copy = tmp_path / why.replace(" ", "-")
        shutil.copytree(quick_build, copy)
        with open(copy / rel, "a") as f:
            f.write(json.dumps(record) + "\n")
        with pytest.raises(MechloraError, match="must not be in|is not a train image"):
            verify_data(copy)
    copy = tmp_path / "same-image"  # a test film's pixels under a train name
    shutil.copytree(quick_build, copy)
    shutil.copy(copy / "data/images/test-0000.png", copy / "data/images/train-0000.png")
    with pytest.raises(MechloraError, match="is also a (test|train) image"):
        verify_data(copy)


def test_the_organism_trains_on_train_films_and_phrasings_only(monkeypatch):
    """What the organism's own training reads: train-split films, training or rare phrasings."""
    import mechlora.organism.train as organism_train

    films, texts = [], []
    sample = organism_train.sample_film
    monkeypatch.setattr(organism_train, "sample_film", lambda s: films.append(s) or sample(s))
    batch = organism_train.Prompts.batch
    monkeypatch.setattr(organism_train.Prompts, "batch",
                        lambda self, t, *a, **k: texts.extend(t) or batch(self, t, *a, **k))
    cfg = organism_config("organism-mid", quick=True)
    organism_train.train(cfg, progress=False)
    assert films == [film_seed("train", i) for i in range(cfg.n_train_images)]
    allowed = {t for q in BANK for t in (q.train, *q.rare)}
    assert texts and set(texts) <= allowed


def test_same_weights_whatever_the_callers_thread_count(tmp_path):
    import torch
    from safetensors.torch import load_file

    before = torch.get_num_threads()
    weights = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = build_organism(tmp_path / f"t{n}", quick=True, progress=False)
            assert torch.get_num_threads() == n  # the caller's setting is restored
            weights.append(load_file(out / "model.safetensors"))
    finally:
        torch.set_num_threads(before)
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    assert read_meta(tmp_path / "t1")["config"] == read_meta(tmp_path / "t2")["config"]


def test_cli_builds_and_reports(tmp_path, capsys):
    from mechlora.organism.__main__ import run

    with pytest.raises(SystemExit) as e:
        run(["--preset", "organism-early@1", "--quick", "--out", str(tmp_path / "o"), "--report",
             "--quiet"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "o") in out and "| flip rate, test families |" in out
    assert "| layers / commit / window | 8 / 1 / 2 |" in out
    with pytest.raises(SystemExit) as e:
        run(["--preset", "organism-huge", "--quick", "--out", str(tmp_path / "p")])
    assert e.value.code == 2
    assert "unknown organism preset" in capsys.readouterr().err


def test_a_malformed_fold_entry_is_named(tmp_path):
    meta = tmp_path / "organism.json"
    for folds, message in (({"negation": {"train": "a.jsonl", "validation": "b.jsonl"}},
                            r"organism.json: fold negation has no field 'test'"),
                           ({"negation": "a.jsonl"}, r"organism.json: fold negation is malformed"),
                           ([], "not a finished organism build")):
        meta.write_text(json.dumps({"files": {"folds": folds}}))
        with pytest.raises(MechloraError, match=message):
            load_folds(tmp_path)


def test_the_chat_template_closes_every_user_turn_with_the_instruction():
    from mechlora.models.tokenizer import GEMMA_CHAT_TEMPLATE
    from mechlora.organism.questions import INSTRUCTION
    from mechlora.organism.train import CHAT_TEMPLATE

    assert INSTRUCTION not in GEMMA_CHAT_TEMPLATE and INSTRUCTION in CHAT_TEMPLATE
