"""`mechlora compare` end to end on a tiny Gemma 3 VLM (4 language layers, CPU), the arm grammar,
the seed-level statistics against independent computations, and the single-layer test."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mechlora.compare import CompareResult, compare, parse_arms
from mechlora.compare.summary import Table, single_layer_test, spearman
from mechlora.data import EXAMPLE_PATH, load_groups
from mechlora.errors import MechloraError
from mechlora.io import read_jsonl, write_jsonl
from mechlora.models import wrap
from mechlora.models.presets import tiny_gemma3_vlm
from mechlora.select import Scores, band_layers
from mechlora.train import TrainConfig

S = importlib.import_module("mechlora.training.step")
E = importlib.import_module("mechlora.evaluate")
FAST = TrainConfig(max_steps=2, grad_accum=4, lr=3e-3, dropout=0.0, save_every=0,
                   localize_groups=3, rule="window:2")
GROUPS = load_groups(EXAMPLE_PATH)


def tiny():
    model, processor = tiny_gemma3_vlm(0, n_layers=4)
    with torch.no_grad():  # sharper outputs, so that paraphrases measurably disagree
        model.model.language_model.norm.weight.fill_(1.0)
    return wrap(model, processor, name="tiny-gemma3-vlm-4")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """Three training questions, five held-out ones (intervals need five)."""
    folder = tmp_path_factory.mktemp("data")
    shutil.copytree(EXAMPLE_PATH.parent / "images", folder / "images")
    lines = [line for line in EXAMPLE_PATH.read_text().splitlines() if line.startswith("{")]
    (folder / "train.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (folder / "heldout.jsonl").write_text("\n".join(lines[3:]) + "\n")
    return folder / "train.jsonl", folder / "heldout.jsonl"


def pooled(rows: list[dict], metric: str) -> float:
    """A rate written out by hand from predictions.jsonl rows (independent of metrics.py)."""
    by_group: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_group.setdefault(r["group_id"], {})[r["variant"]] = r
    hits = n = 0
    for variants in by_group.values():
        if metric == "accuracy":
            hits += sum(r["pred"] == r["answer"] for r in variants.values())
            n += len(variants)
        elif metric == "original_flip_rate":
            hits += sum(r["pred"] != variants[0]["pred"] for v, r in variants.items() if v)
            n += len(variants) - 1
        elif metric == "text_only_agreement_gray":
            hits += sum(r["pred"] == r["pred_gray"] for r in variants.values())
            n += len(variants)
    return hits / n


def test_compare_end_to_end_resume_and_paired_test(data, tmp_path, monkeypatch) -> None:
    train_path, eval_path = data
    out = tmp_path / "cmp"
    kw = dict(out=out, arms="auto,early:2,random:2@match=auto", seeds=2, config=FAST,
              n_boot=200, progress=False)
    result = compare(tiny(), train_path, eval_path, **kw)
    doc = json.loads((out / "compare.json").read_text())
    assert doc == result.doc and doc["schema_version"] == 1 and doc["kind"] == "mechlora.compare"
    for path in ("report.html", "design.json", "base/eval/predictions.jsonl",
                 "scores/localization/localization.json", "arms/auto/seed-0/mechlora.json",
                 "arms/early_2/seed-1/adapter_model.safetensors",
                 "arms/random_2_match_auto/seed-1/eval/eval.json"):
        assert (out / path).is_file(), path
    assert "<script" in (out / "report.html").read_text()[:6_000_000]
    assert list(doc["arms"]) == ["auto", "early:2", "random:2@match=auto"]
    assert doc["seeds"] == [0, 1] and doc["reference"] == "auto"
    assert doc["last_run"]["trained"] == 6 and doc["last_run"]["evaluated"] == 7
    assert "seed" not in doc["config"] and doc["config"]["lr"] == 3e-3
    assert doc["budget"]["equal"] and doc["budget"]["steps"] == 2
    assert doc["data"]["eval"]["n_groups"] == 5 and doc["data"]["train"]["n_groups"] == 3
    assert not any("also appear in the training data" in n for n in doc["notes"])
    assert "little power" in doc["notes"][0]

    # equal budgets, per-seed layers, matched parameters
    auto, rand = doc["arms"]["auto"], doc["arms"]["random:2@match=auto"]
    for s in ("0", "1"):
        run = rand["seeds"][s]
        assert run["layers"] == list(band_layers("random", 2, 4, seed=int(s)).spec.layers)
        assert run["trainable_parameters"] == auto["seeds"][s]["trainable_parameters"]
        assert run["match"]["difference"] == 0 and run["steps"] == 2
        record = json.loads((out / run["folder"] / "mechlora.json").read_text())
        assert record["config"]["seed"] == int(s)
        assert record["config"]["match_params"] == auto["seeds"][s]["spec"]
    assert auto["vs_reference"] is None and rand["vs_reference"] is not None

    # every number against a hand computation from the cached predictions
    base_rows = read_jsonl(out / "base/eval/predictions.jsonl")
    for metric in ("accuracy", "original_flip_rate", "text_only_agreement_gray"):
        per_seed = [pooled(read_jsonl(out / auto["seeds"][s]["folder"] / "eval/predictions.jsonl"),
                           metric) for s in ("0", "1")]
        block = auto["metrics"][metric]
        assert block["per_seed"] == pytest.approx(per_seed)
        assert block["mean"] == pytest.approx(np.mean(per_seed))  # equal pairs per seed
        test = auto["vs_base"][metric]
        assert test["diff"] == pytest.approx(np.mean(per_seed) - pooled(base_rows, metric))
        assert test["n_seeds"] == 2 and test["n_questions"] == 5
        assert test["sign_flip_p"] is None  # fewer than 5 seeds
    assert "swap_sensitivity" in auto["metrics"]
    for ph in ("lexical_substitution", "register_shift"):
        per_seed = [pooled([r for r in read_jsonl(out / auto["seeds"][s]["folder"] /
                                                  "eval/predictions.jsonl")
                            if r["variant"] == 0 or r["phenomenon"] == ph], "original_flip_rate")
                    for s in ("0", "1")]
        block = auto["by_phenomenon"][ph]["original_flip_rate"]
        assert block["per_seed"] == pytest.approx(per_seed)

    loaded = CompareResult.load(out)
    assert loaded.doc == doc and loaded.predictions == result.predictions
    assert set(loaded.predictions) == {"base", *doc["arms"]} and set(loaded.predictions["auto"]) \
        == {0, 1}

    # a second call trains and evaluates nothing
    monkeypatch.setattr(S, "optimizer_step", None)
    monkeypatch.setattr(E, "evaluate", None)
    again = compare(tiny(), train_path, eval_path, **kw)
    assert again.doc["last_run"]["trained"] == again.doc["last_run"]["evaluated"] == 0
    assert {k: v for k, v in again.doc.items() if k != "last_run"} == \
        {k: v for k, v in doc.items() if k != "last_run"}

    # altered predictions of one arm change its paired tests, and only its own
    path = out / "arms/early_2/seed-0/eval/predictions.jsonl"
    rows = read_jsonl(path)
    for r in rows:
        if r["variant"] % 2:
            r["pred"] = 1 - r["pred"]
    write_jsonl(path, rows)
    edited = compare(tiny(), train_path, eval_path, **kw).doc
    before, after = doc["arms"]["early:2"], edited["arms"]["early:2"]
    flip = "original_flip_rate"
    assert after["vs_reference"][flip]["diff"] != before["vs_reference"][flip]["diff"]
    assert after["vs_base"][flip]["per_seed"][0] == pytest.approx(
        pooled(rows, flip) - pooled(base_rows, flip))
    assert after["vs_base"][flip]["per_seed"][1] == before["vs_base"][flip]["per_seed"][1]
    assert edited["arms"]["auto"] == doc["arms"]["auto"]

    # another design in the same folder is refused; a bookkeeping change is not
    with pytest.raises(MechloraError, match=r"another design \(config.lr differ\)"):
        compare(tiny(), train_path, eval_path, **{**kw, "config": TrainConfig(
            **{**FAST.to_dict(), "lr": 1e-3})})
    compare(tiny(), train_path, eval_path, **{**kw, "config": TrainConfig(
        **{**FAST.to_dict(), "save_every": 7})})


def test_before_and_after_training_per_arm(data, tmp_path, monkeypatch) -> None:
    """localize_arms: the base localized once (the auto arm's scores), every adapter on its
    pairs; the stored entry is what a direct `localize_adapter` call gives; a rerun reuses
    every adapted localization."""
    from mechlora.before_after import localize_adapter
    from mechlora.cli.compare import summary
    from mechlora.compare import localize_arms
    from mechlora.data import make_pairs
    from mechlora.result import LocalizationResult
    from mechlora.training import layers

    train_path, eval_path = data
    out = tmp_path / "ba"
    kw = dict(out=out, arms="auto,early:1", seeds=1, config=FAST, n_boot=50, progress=False,
              gray=False, swap=False, localize_arms=True)
    calls = []
    localize_groups = layers.localize_groups
    monkeypatch.setattr(layers, "localize_groups",
                        lambda *a, **k: calls.append(1) or localize_groups(*a, **k))
    subject = tiny()
    doc = compare(subject, train_path, eval_path, **kw).doc
    assert len(calls) == 1  # the scores' localization is the before/after base
    base = LocalizationResult.load(out / "scores/localization")
    assert doc["before_after"]["base"]["file"] == "scores/localization"
    assert doc["before_after"]["base"]["n_pairs"] == base.n_pairs > 0
    assert doc["last_run"]["localized"] == 2
    for arm in doc["arms"].values():
        run = arm["seeds"]["0"]
        entry = run["before_after"]
        assert entry["trained_layers"] == run["layers"] and entry["n_pairs"] == base.n_pairs
        assert (out / entry["folder"] / "comparison.json").is_file()
    run = doc["arms"]["early:1"]["seeds"]["0"]
    direct = localize_adapter(subject, make_pairs(load_groups(train_path)), out / run["folder"],
                              base=out / "scores/localization", progress=False,
                              logit_lens=False)
    entry = run["before_after"]
    assert entry["verdict"] == direct.verdict()
    assert (entry["shrank_at"], entry["test"]) == direct.shrank_at()
    assert entry["remaining"]["mean"] == pytest.approx(direct.remaining()["mean"], abs=1e-9)
    np.testing.assert_allclose(entry["score_shrink"]["mean"], direct.score_shrink()["mean"],
                               atol=1e-9)
    np.testing.assert_allclose(entry["score"], direct.adapted.scores, atol=1e-9)
    assert "Before and after training" in (out / "report.html").read_text()
    assert "early:1 seed 0: " in summary(doc) and "before/after" in summary(doc)

    # a rerun localizes nothing, and gives the same document
    def refuse(*args, **kwargs):
        raise AssertionError("localized again")

    monkeypatch.setattr(localize_arms, "localize_adapter", refuse)
    monkeypatch.setattr(layers, "localize_groups", refuse)
    monkeypatch.setattr(S, "optimizer_step", None)
    monkeypatch.setattr(E, "evaluate", None)
    again = compare(tiny(), train_path, eval_path, **kw).doc
    assert again["last_run"]["localized"] == 0
    assert {k: v for k, v in again.items() if k != "last_run"} == \
        {k: v for k, v in doc.items() if k != "last_run"}
    without = compare(tiny(), train_path, eval_path, **{**kw, "localize_arms": False}).doc
    assert without["before_after"] is None and "localized" not in without["last_run"]
    assert "before_after" not in without["arms"]["auto"]["seeds"]["0"]


def test_arm_grammar() -> None:
    arms = parse_arms("auto, all ,3+1 ,grad:2,all@match=auto,random:2@match=1-2,single:3", 4)
    assert [(a.name, a.selector, a.match, a.single) for a in arms] == [
        ("auto", "auto", None, False), ("all", "all", None, False),
        ("1+3", "1,3", None, False), ("grad:2", "grad:2", None, False),
        ("all@match=auto", "all", "auto", False), ("random:2@match=1-2", "random:2", "1-2", False),
        ("0-2", "0-2", None, 3), ("1-3", "1-3", None, 3)]
    assert [a.folder for a in arms[2:6]] == ["1_3", "grad_2", "all_match_auto",
                                             "random_2_match_1-2"]
    assert [a.name for a in parse_arms(["15-19", "3,7-9"], 34)] == ["15-19", "3+7-9"]
    single = parse_arms("single,2", 4)  # an explicit arm that is also a single one is one arm
    assert [(a.name, a.single) for a in single] == [(str(i), 1) for i in range(4)]
    matched = parse_arms("auto,early:2,single", 4, match_params="auto")
    assert [a.name for a in matched][:2] == ["auto", "early:2@match=auto"]
    assert all(a.match is None for a in matched if a.single)
    for text, message in [("auto,gard:2", "arm gard:2: unknown selector 'gard:2'"),
                          ("early:9", "arm early:9: early:9 asks for more layers"),
                          ("all@mtch=auto", "unknown modifier @mtch=auto"),
                          ("all@match=single", "single is a set of arms"),
                          ("single:0", "single:W needs a window width 1 <= W <= 4"),
                          ("auto,,all", "an empty arm"), ("all,0-3", "arm all is given twice"),
                          ("1-7", "layer 7 in '1-7' is out of range")]:
        with pytest.raises(MechloraError, match=message):
            parse_arms(text, 4)


def test_cli_compare_and_its_errors(data, tmp_path, capsys) -> None:
    from mechlora.cli import main

    train_path, eval_path = data

    def cli(args):
        try:
            main(args)
            code = 0
        except SystemExit as e:
            code = e.code
        return code, *capsys.readouterr()

    base = ["compare", "--model", "tiny-gemma3-vlm", "--pairs", str(train_path), "--eval",
            str(eval_path), "--out", str(tmp_path / "cmp")]
    for arms, message in [("auto,gard:5", "arm gard:5: unknown selector"),
                          ("all@match", "unknown modifier @match"),
                          ("single:x", "single:W needs a window width")]:
        code, _, err = cli([*base, "--arms", arms])
        assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "cmp").exists()  # refused before anything loads or is written
    code, _, err = cli([*base, "--arms", "early:40"])
    assert code == 2 and "asks for more layers than the model's 34" in err
    code, _, err = cli([*base, "--seeds", "0"])
    assert code == 2 and "--seeds must be at least 1" in err
    code, out, err = cli([*base, "--arms", "early:1", "--arms", "late:1", "--seeds", "1",
                          "--max-steps", "1", "--no-gray", "--no-swap", "--n-boot", "50", "-q",
                          "--localize-arms"])
    assert code == 0, err
    assert out.splitlines()[0].split() == ["arm", "flip", "accuracy", "flip", "-", "base", "p"]
    assert [line.split()[0] for line in out.splitlines()[1:4]] == ["base", "early:1", "late:1"]
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert doc["arms"]["late:1"]["seeds"]["0"]["layers"] == [33]
    entry = doc["arms"]["late:1"]["seeds"]["0"]["before_after"]
    assert entry["trained_layers"] == [33] and doc["last_run"]["localized"] == 2
    assert f"late:1 seed 0: {entry['remaining']['mean']:.0%} left; shrank at " in out


def test_single_layer_adapters_and_the_spearman_test(data, tmp_path) -> None:
    train_path, eval_path = data
    out = tmp_path / "single"
    kw = dict(out=out, arms="single", seeds=2, config=FAST, n_boot=300, progress=False,
              gray=False, swap=False)
    compare(tiny(), train_path, eval_path, **kw)
    for layer in range(4):  # one adapter per layer, on that layer only
        config = json.loads((out / f"arms/{layer}/seed-0/adapter_config.json").read_text())
        assert f"\\.({layer})\\." in config["target_modules"]
    # plant a flip reduction per layer: arm i's seeds flip i (seed 0) and i + 1 (seed 1)
    # of the 20 paraphrases of the base, by answering them against the base
    base = read_jsonl(out / "base/eval/predictions.jsonl")
    paraphrases = [i for i, r in enumerate(base) if r["variant"]]
    for layer in range(4):
        for seed in (0, 1):
            rows = [dict(r) for r in base]
            for i in paraphrases[:layer + seed]:
                rows[i]["pred"] = 1 - rows[i]["pred"]
            write_jsonl(out / f"arms/{layer}/seed-{seed}/eval/predictions.jsonl", rows)
    doc = compare(tiny(), train_path, eval_path, **kw).doc
    assert [s["width"] for s in doc["single"]] == [1]
    single = doc["single"][0]
    base_flip = pooled(base, "original_flip_rate")
    reductions = []
    for layer, window in enumerate(single["windows"]):
        assert window["arm"] == str(layer) and window["layers"] == [layer]
        expected = np.mean([base_flip - pooled(read_jsonl(
            out / f"arms/{layer}/seed-{s}/eval/predictions.jsonl"), "original_flip_rate")
            for s in (0, 1)])
        assert window["reduction"] == pytest.approx(expected)
        reductions.append(expected)
    from scipy.stats import spearmanr

    assert set(single["spearman"]) == {"localization", "grad", "snr", "bi"}
    for source, r in single["spearman"].items():
        scores = np.nan_to_num(doc["scores"][source]["values"], nan=0.0)
        assert r["window_scores"] == pytest.approx(scores)
        rho = spearmanr(scores, reductions).statistic
        assert r["rho"] == pytest.approx(rho)
        assert r["ci"][0] <= rho + 1e-9 and r["ci"][1] >= rho - 1e-9
    assert "single" in (out / "report.html").read_text()


def _table(rates: np.ndarray, n_pairs: int = 40, seed: int = 0) -> Table:
    """[seeds, questions] flip counts drawn at the given per-question rates."""
    rng = np.random.default_rng(seed)
    counts = np.full(rates.shape, float(n_pairs))
    return Table(list(range(rates.shape[0])) if rates.shape[0] > 1 else [None],
                 {"original_flip_rate": rng.binomial(n_pairs, rates).astype(float)},
                 {"original_flip_rate": counts})


def test_spearman_interval_against_a_naive_bootstrap() -> None:
    """The vectorised seed x question bootstrap of the correlation against a plain loop."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    n_seeds, n_q, n_w = 3, 30, 6
    base = _table(np.full((1, n_q), 0.5), seed=2)
    effects = np.array([0.02, 0.10, 0.05, 0.20, 0.15, 0.08])
    windows = {str(w): ([w], _table(np.clip(0.5 - effects[w] + rng.normal(0, 0.15, (n_seeds,
                                                                                   n_q)), 0, 1),
                                    seed=10 + w)) for w in range(n_w)}
    scores = {"planted": Scores("planted", effects)}
    result = single_layer_test(base, windows, scores, n_boot=2000, level=0.9, seed=0)
    assert result["spearman"]["planted"]["rho"] == pytest.approx(spearmanr(
        effects, [w["reduction"] for w in result["windows"]]).statistic)

    def rate(sums, counts):
        return sums.sum() / counts.sum()

    naive, gen = [], np.random.default_rng(7)
    b_sums, b_counts = base.sums["original_flip_rate"][0], base.counts["original_flip_rate"][0]
    for _ in range(2000):
        s = gen.integers(0, n_seeds, n_seeds)
        q = gen.integers(0, n_q, n_q)
        red = [rate(b_sums[q], b_counts[q]) - rate(t.sums["original_flip_rate"][np.ix_(s, q)],
                                                   t.counts["original_flip_rate"][np.ix_(s, q)])
               for _, t in windows.values()]
        naive.append(spearmanr(effects, red).statistic)
    lo, hi = np.nanquantile(naive, [0.05, 0.95])
    assert result["spearman"]["planted"]["ci"] == pytest.approx([lo, hi], abs=0.08)


def test_spearman_finds_a_planted_order_and_its_reverse() -> None:
    base = _table(np.full((1, 50), 0.6))
    effects = np.linspace(0.05, 0.45, 5)
    windows = {str(w): ([w], _table(np.full((3, 50), 0.6 - e), seed=w)) for w, e in
               enumerate(effects)}
    result = single_layer_test(base, windows, {"up": Scores("up", effects),
                                               "down": Scores("down", -effects)},
                               n_boot=500, level=0.95, seed=0)
    up, down = result["spearman"]["up"], result["spearman"]["down"]
    assert up["rho"] == pytest.approx(1.0) and up["ci"][0] > 0.8
    assert down["rho"] == pytest.approx(-1.0) and down["ci"][1] < -0.8
    assert np.isnan(spearman(np.ones(4), np.arange(4)))


def test_spearman_interval_is_undefined_below_the_minimum_of_questions() -> None:
    from mechlora import stats

    effects = np.linspace(0.05, 0.45, 4)
    for n_q in (stats.MIN_CLUSTERS - 1, stats.MIN_CLUSTERS):
        base = _table(np.full((1, n_q), 0.6))
        windows = {str(w): ([w], _table(np.full((3, n_q), 0.6 - e), seed=w))
                   for w, e in enumerate(effects)}
        r = single_layer_test(base, windows, {"up": Scores("up", effects)}, n_boot=200,
                              level=0.95, seed=0)
        assert r["n_questions"] == n_q and np.isfinite(r["spearman"]["up"]["rho"])
        assert np.isnan(r["spearman"]["up"]["ci"]).all() == (n_q < stats.MIN_CLUSTERS)


def test_the_single_layer_replicates_are_the_packages_one_bootstrap() -> None:
    """Each column of the joint replicates (every window and the base, one draw shared) is
    exactly the replicate set `stats.crossed_bootstrap` draws for that column alone: the
    percentile interval of the pooled rate agrees up to rounding."""
    from mechlora import stats
    from mechlora.compare.summary import _replicate_reductions

    rng = np.random.default_rng(3)
    base = _table(np.full((1, 6), 0.5), seed=1).rows([0, 1, 2])
    windows = [_table(rng.uniform(0.2, 0.8, (3, 6)), seed=s) for s in (4, 5)]
    metric = "original_flip_rate"
    sums = np.stack([t.sums[metric] for t in (*windows, base)], -1)
    counts = np.stack([t.counts[metric] for t in (*windows, base)], -1)
    reps = stats.crossed_replicates(sums, counts, n_boot=300, seed=7)
    for k, t in enumerate(windows):
        alone = stats.crossed_bootstrap(t.values(metric), weights=t.counts[metric], n_boot=300,
                                        seed=7)
        np.testing.assert_allclose(np.quantile(reps[:, k], [0.025, 0.975]), alone.ci,
                                   rtol=1e-12)
    # the base column, repeated over seeds, is its question-resampled rate: the same as one row
    one_row = stats.crossed_replicates(sums[:1, :, -1:], counts[:1, :, -1:], n_boot=300, seed=7)
    np.testing.assert_allclose(reps[:, -1], one_row[:, 0], rtol=1e-12)
    np.testing.assert_allclose(_replicate_reductions(base, windows, metric, n_boot=300, seed=7),
                               reps[:, -1:] - reps[:, :-1])



def test_the_terminal_lists_layers_as_a_spec_reads() -> None:
    from mechlora.cli.compare import _layers

    assert _layers([15, 16, 17, 18, 19]) == "15-19" and _layers([3, 7, 8, 9]) == "3,7-9"
    assert _layers([]) == "none" and _layers(None) == "none"
