"""The Gemma 3 270M data: its build step, the split rules, and the cached answer reading."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from mechlora.data import load_groups
from mechlora.models import wrap
from mechlora.models.presets import tiny_gemma3_text
from tests.analyses import load_analysis

gd = load_analysis("gemma3_270m_data")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", params=["yesno", "cloze"])
def built(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    gd.main(["build", "--task", request.param, "--out", str(out), "--baked-shots", "4"])
    return gd.TASKS[request.param], out


def test_build_is_what_the_repository_holds(built):
    task, out = built
    for name in ("train", "validation", "test"):
        for sub in ("", "all/", "negation/"):
            assert (out / f"{sub}{name}.jsonl").read_text() == \
                (gd.DATA / task.name / f"{sub}{name}.jsonl").read_text()


def test_splits_are_disjoint_balanced_and_keep_clusters_together(built):
    task, out = built
    items = {it.id: it for it in gd.read_items(task)}
    split_of = {}
    for split in gd.SPLITS:
        groups = load_groups(out / "all" / f"{split}.jsonl")
        answers = Counter(g.answer_index for g in groups)
        assert answers[0] == answers[1]  # yes = no (cloze: each choice word as often gold)
        for g in groups:
            assert g.id not in split_of
            split_of[g.id] = split
    assert set(split_of) == set(items)
    by_cluster = {}
    for iid, split in split_of.items():
        assert by_cluster.setdefault(items[iid].cluster, split) == split
    n = Counter(split_of.values())
    assert [n[s] for s in gd.SPLITS] == {"yesno": [120, 48, 120], "cloze": [70, 36, 70]}[task.name]


def test_files_hold_the_right_families_and_negations_carry_their_own_answer(built):
    task, out = built
    for split in gd.SPLITS:
        families = task.train_families if split == "train" else task.held_out_families
        for g in load_groups(out / f"{split}.jsonl"):
            assert [v.phenomenon for v in g.variants[1:]] == list(families)
        originals = {r["id"]: r for r in _records(out / "all" / f"{split}.jsonl")}
        for r in _records(out / "negation" / f"{split}.jsonl"):
            pos = originals[r["negates"]]
            assert r["answer"] != pos["answer"] and r["negates_answer"] == pos["answer"]
            assert r["choices"] == pos["choices"]
            assert {r["question"], r["paraphrases"][0]["text"]}.isdisjoint(
                {pos["question"], *(p["text"] for p in pos["paraphrases"])})


def test_baked_wordings_give_the_few_shot_prompt_through_mechlora_template(built):
    task, out = built
    if task.name != "yesno":
        assert not (out / "baked").exists()
        return
    prefix = gd.fewshot_prefix(task, gd.read_shots(task), 4)
    plain = {r["id"]: r for r in _records(out / "test.jsonl")}
    for r in _records(out / "baked" / "test.jsonl"):
        q = plain[r["id"]]["question"]
        assert gd.QA.format(question=r["question"]) == prefix + gd.QA.format(question=q)


def test_no_few_shot_example_is_about_an_item(built):
    task, _ = built
    texts = " ".join(t for it in gd.read_items(task) for t in it.texts).lower()
    for shot in gd.read_shots(task):
        assert shot.get("question", shot.get("text")).lower() not in texts
        assert all(w.lower() not in texts for w in shot["topic"])


def test_cloze_distractor_states_the_mirrored_fact():
    items = {it.id: it for it in gd.read_items(gd.TASKS["cloze"])}
    fire, ice = items["temp1.fire"], items["temp1.ice"]
    assert fire.paraphrases[-1] == "Ice is very cold. Fire is very"
    assert ice.paraphrases[-1] == "Fire is very hot. Ice is very"
    assert fire.negated_answer == "cold" and ice.negated_answer == "hot"


def test_decapitalise_keeps_names():
    assert gd.decapitalise("Ice is very", ("Ice is very", "Ice is made of water. Ice is very")) \
        == "ice is very"
    assert gd.decapitalise("Paris is the capital of",
                           ("The country whose capital is Paris is",)) == "Paris is the capital of"


def test_bad_source_line_exits_2_naming_the_line(tmp_path, capsys):
    src = tmp_path / "items.txt"
    src.write_text("@ cat\nx.a | hot | cold | Fire is | only four fields\n")
    with pytest.raises(SystemExit) as e:
        gd.read_cloze(src)
    assert e.value.code == 2
    assert f"{src}:2:" in capsys.readouterr().err


def test_rule_skips_low_mass_and_breaks_ties_by_length():
    rows = [dict(format="long", correct_originals=30, mass_originals=0.9, prompt_tokens=60),
            dict(format="short", correct_originals=28, mass_originals=0.9, prompt_tokens=10),
            dict(format="mute", correct_originals=40, mass_originals=0.01, prompt_tokens=5),
            dict(format="worse", correct_originals=27, mass_originals=0.9, prompt_tokens=3)]
    choice = gd.apply_rule(rows, gd.TASKS["yesno"])
    assert choice["format"] == "short" and choice["tied"] == ["long", "short"]


def test_stats_count_flips_and_accuracy():
    ws = [gd.Wording("q", 0, None, "a", ("yes", "no"), 0),
          gd.Wording("q", 1, "lexical_substitution", "b", ("yes", "no"), 0),
          gd.Wording("q", 2, "added_context", "c", ("yes", "no"), 0)]
    rows = [{"merged": 1.0}, {"merged": -2.0}, {"merged": 0.5}]
    s = gd.stats(rows, ws, "merged")
    assert s["accuracy_originals"]["value"] == 1.0
    assert s["flip_vs_original"] == {"k": 1, "n": 2, "value": 0.5}
    assert s["pairwise_flip"]["k"] == 2 and s["pairwise_flip"]["n"] == 3
    assert s["by_phenomenon"]["lexical_substitution"]["flip_vs_original"]["k"] == 1
    assert gd.auc([3.0, 1.0, 2.0, 0.0], [True, False, True, False]) == 1.0
    assert gd.auc([1.0, 3.0, 2.0], [True, False, False]) == 0.0
    assert gd.auc([1.0, 1.0], [True, False]) == 0.5


def test_cached_prefix_reading_equals_full_prompts_and_merges_variants():
    """The shared prefix's KV cache, batch copies and left padding give mechlora's numbers."""
    model, tok = tiny_gemma3_text(seed=0, n_layers=6)
    tok.chat_template = None  # like Gemma 3 270M's GGUF tokenizer: Subject.template is used
    subject = wrap(model, tok)
    reader = gd.Reader(subject, batch_size=3)
    # the template ends in a space: a character-level tokenizer would start both choices
    # with the same token " ", which mechlora's single-token reading refuses
    fmt = gd.Format("t", "<bos>Question: is it?\nAnswer: yes\n\n", gd.QA + " ", "")
    questions = ["is ice cold?", "a?", "is a much longer question here?", "no?"]
    cached = reader.logprobs(fmt, questions)
    full = reader.reference_logprobs(fmt, questions)
    assert torch.allclose(cached, full, atol=1e-4)
    ws = [gd.Wording("g", 0, None, q, ("yes", "no"), 0) for q in questions]
    rows = reader.readings(fmt, ws)
    yes, no = reader.variant_sets(("yes", "no"))
    # character-level tokenizer: the first token of "yes"/"Yes"/" yes"... is y, Y or space;
    # the space starts both choices' variants, so it is dropped from both
    assert subject.tokenizer.convert_ids_to_tokens(yes) and not set(yes) & set(no)
    assert " " not in subject.tokenizer.convert_ids_to_tokens(yes + no)
    for row, lp in zip(rows, full):
        assert math.isclose(row["merged"], float(lp[yes].logsumexp(0) - lp[no].logsumexp(0)),
                            abs_tol=1e-4)
        assert math.isclose(row["mass"], float(lp[yes + no].exp().sum()), rel_tol=1e-4)


def test_build_refuses_to_change_files_without_overwrite(tmp_path, capsys):
    gd.main(["build", "--task", "cloze", "--out", str(tmp_path)])
    gd.main(["build", "--task", "cloze", "--out", str(tmp_path)])  # identical: fine
    (tmp_path / "test.jsonl").write_text("edited\n")
    with pytest.raises(SystemExit) as e:
        gd.main(["build", "--task", "cloze", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    gd.main(["build", "--task", "cloze", "--out", str(tmp_path), "--overwrite"])
    assert (tmp_path / "test.jsonl").read_text() == (gd.DATA / "cloze" / "test.jsonl").read_text()
