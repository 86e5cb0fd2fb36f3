"""The organism: films and their truth, the question bank, the datasets, and a quick build."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mechlora.errors import MechloraError
from mechlora.organism import build_organism, organism_dir, read_meta
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
    PHENOMENA,
    TYPES,
    film_seed,
    groups_for,
    vocabulary,
    words,
    write_datasets,
)

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
        assert set(q.families) == set(PHENOMENA)
        texts = [q.train, *q.rare, *(t for t, _ in q.heldout())]
        assert len(set(texts)) == len(texts), q.name  # held-out means never trained on
        for text, _ in q.heldout():
            assert set(words(text)) <= seen, (q.name, text)  # every held-out word was trained
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
                                                             TYPES[g["finding"]].heldout()]


def test_image_splits_are_disjoint():
    train = {film_seed("train", i) for i in range(5000)}
    assert not train & {film_seed("test", i) for i in range(5000)}
    assert film_seed("train", 3, seed=1) != film_seed("train", 3, seed=0)
    with pytest.raises(MechloraError):
        film_seed("valid", 0)


def test_datasets_are_deterministic_and_load(tmp_path):
    a = write_datasets(tmp_path / "a", n_train=3, n_test=2)
    b = write_datasets(tmp_path / "b", n_train=3, n_test=2)
    for name in a:
        assert a[name].read_text() == b[name].read_text()
    rows = [json.loads(line) for line in a["heldout"].read_text().splitlines()]
    assert all(r["id"].startswith("test") for r in rows)
    film = sample_film(film_seed("test", 0))
    img = np.asarray(Image.open(tmp_path / "a" / rows[0]["image"]))
    assert np.array_equal(img, render_array(film))
    data = pytest.importorskip("mechlora.data")
    groups = data.load_groups(a["train_pairs"])
    assert len(groups) == sum(len(groups_for(sample_film(film_seed("train", i)), "x", None))
                              for i in range(3))
    assert {v.phenomenon for v in groups[0].variants[1:]} == set(PHENOMENA)


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
    assert organism_dir() == tmp_path / "organism-v1-seed0"
    assert organism_dir(3, quick=True) == tmp_path / "organism-v1-quick-seed3"


def test_quick_organism_builds_caches_and_loads(tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = build_organism(tmp_path / "org", quick=True, progress=False)
    meta = read_meta(out)
    assert meta["config"]["seed"] == 0 and 0 <= meta["flip_rate_heldout"] <= 1
    assert (out / meta["files"]["heldout"]).exists()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build_organism(tmp_path / "org", quick=True, progress=False) == out  # cached
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(MechloraError, match="other settings"):
        build_organism(tmp_path / "org", seed=1, quick=True, progress=False)

    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
    proc = AutoProcessor.from_pretrained(out, local_files_only=True)
    group = json.loads((out / meta["files"]["heldout"]).read_text().splitlines()[0])
    image = Image.open(out / "data" / group["image"]).convert("RGB")
    message = [{"role": "user", "content": [{"type": "image"},
                                            {"type": "text", "text": group["question"]}]}]
    prompt = proc.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
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
