"""The demo's contract on a reduced organism: the four arms named, one budget for all, the
window the saved localization selects, held-out evaluation, the report, demo.json, reruns."""

import json
import re
from html import escape

import pytest
from safetensors import safe_open

from mechlora.cli import main
from mechlora.data import data_hash, load_groups
from mechlora.demo import SCHEMA_VERSION, DemoConfig, run_demo
from mechlora.errors import MechloraError
from mechlora.organism import load_folds
from mechlora.result import LocalizationResult
from mechlora.select import select_layers

CFG = dict(quick=True, steps=2, localize_groups=4, pairs_per_group=2, test_groups=12)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MECHLORA_HOME", str(root / "home"))
        cfg = DemoConfig(**CFG)
        summary = run_demo(root / "out", cfg, progress=False, log=lambda *a: None)
        yield root / "out", cfg, summary, mp


def read(path):
    return json.loads(path.read_text())


def adapter_layers(folder):
    """The language layers that the saved LoRA weights sit on."""
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        found = {re.search(r"language_model\.layers\.(\d+)\.", k) for k in f.keys()}
    return sorted({int(m.group(1)) for m in found if m})


def test_the_arms_named_are_trained_on_their_layers(demo):
    out, cfg, summary, _ = demo
    doc = read(out / "compare" / "compare.json")
    assert list(doc["arms"]) == ["auto", "all", "early:2", "randband:2"] == cfg.arms
    assert doc["seeds"] == [0, 1]
    loc = LocalizationResult.load(out / "localize")
    window = list(select_layers(loc.scores, "window:2").spec.layers)
    assert summary["localization"]["selection"]["layers"] == window
    for name, want in (("auto", window), ("all", list(range(8))), ("early:2", [0, 1])):
        for seed, run in doc["arms"][name]["seeds"].items():
            assert run["layers"] == want, (name, seed)
            assert adapter_layers(out / "compare" / run["folder"]) == want, (name, seed)
    for run in doc["arms"]["randband:2"]["seeds"].values():
        lo = run["layers"][0]
        assert run["layers"] == [lo, lo + 1] and 0 <= lo <= 6
        assert adapter_layers(out / "compare" / run["folder"]) == run["layers"]


def test_every_arm_gets_the_same_budget(demo):
    out, cfg, _, _ = demo
    doc = read(out / "compare" / "compare.json")
    assert doc["budget"]["equal"] and doc["budget"]["steps"] == cfg.steps
    records = [read(out / "compare" / run["folder"] / "mechlora.json")
               for arm in doc["arms"].values() for run in arm["seeds"].values()]
    assert len(records) == 8
    for key in ("steps", "pairs_seen"):
        assert {r["training"][key] for r in records} == {records[0]["training"][key]}
    assert records[0]["training"]["steps"] == cfg.steps
    assert len({r["data"]["train"]["sha256"] for r in records}) == 1
    recipe = [{k: v for k, v in r["config"].items() if k != "seed"} for r in records]
    assert all(c == recipe[0] for c in recipe)
    assert recipe[0]["max_steps"] == cfg.steps and recipe[0]["grad_accum"] == cfg.pairs_per_step


def test_evaluation_is_the_first_test_groups_of_a_family_never_trained_on(demo):
    out, cfg, summary, _ = demo
    doc = read(out / "compare" / "compare.json")
    fold = next(iter(load_folds(summary["organism"]["path"]).values()))
    heldout = load_groups(fold.test)[: cfg.test_groups]
    assert doc["data"]["eval"]["sha256"] == data_hash(heldout)
    assert doc["data"]["train"]["sha256"] == data_hash(load_groups(fold.train))
    trained = {p.phenomenon for g in load_groups(fold.train) for p in g.variants[1:]}
    tested = {p.phenomenon for g in heldout for p in g.variants[1:]}
    assert tested == {fold.test_family} and not tested & trained
    assert summary["data"]["test_groups"] == cfg.test_groups
    assert summary["data"]["test_groups_in_file"] == len(load_groups(fold.test))


def test_demo_json_summarizes_compare_json(demo):
    out, cfg, summary, _ = demo
    doc, saved = read(out / "compare" / "compare.json"), read(out / "demo.json")
    assert saved["schema_version"] == SCHEMA_VERSION and saved["kind"] == "mechlora.demo"
    assert saved["config"]["steps"] == cfg.steps and saved["organism"]["planted"]["commit"] == 4
    assert saved["organism"]["built"]  # the fixture's home was empty
    assert set(saved["seconds"]) == {"organism", "localize", "compare", "total"}
    for name, arm in doc["arms"].items():
        mine = saved["arms"][name]
        assert mine["metrics"]["original_flip_rate"]["mean"] == \
            arm["metrics"]["original_flip_rate"]["mean"]
        assert mine["layers"] == {s: r["spec"] for s, r in arm["seeds"].items()}
        assert mine["seconds_per_step"] == pytest.approx(
            sum(r["train_seconds"] for r in arm["seeds"].values()) / (2 * cfg.steps))
        assert (mine["vs_auto"] is None) == (name == "auto")
    base = saved["base"]["metrics"]["accuracy"]
    assert base["mean"] == doc["base"]["metrics"]["accuracy"]["mean"]


def test_report_has_tables_and_figures_not_text_dumps(demo):
    out, _, summary, _ = demo
    html = (out / "report.html").read_text()
    assert "<pre>" not in html and html.count("<table>") >= 4
    assert "<th>flip vs original</th>" in html and "<th>trainable parameters</th>" in html
    for arm in ("auto", "all", "early:2", "randband:2"):
        assert f"<td>{arm}</td>" in html
    assert "planted k = 4" in html and html.count("plotly-graph-div") >= 3
    assert escape(summary["localization"]["selection"]["reason"]) in html  # "->" escaped
    assert (out / "compare" / "report.html").is_file() and (out / "localize" /
                                                           "report.html").is_file()


def test_rerun_refuses_without_overwrite_and_resume_reuses(demo, capsys):
    out, cfg, summary, mp = demo
    with pytest.raises(MechloraError, match="already holds a demo; pass --resume"):
        run_demo(out, cfg, progress=False, log=lambda *a: None)
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(MechloraError, match="steps differ"):
        run_demo(out, DemoConfig(**{**CFG, "steps": 3}), resume=True, progress=False)
    with pytest.raises(MechloraError, match="exclude each other"):
        run_demo(out, cfg, overwrite=True, resume=True, progress=False)
    again = run_demo(out, cfg, resume=True, progress=False, log=lambda *a: None)
    assert read(out / "compare" / "compare.json")["last_run"]["trained"] == 0
    assert read(out / "compare" / "compare.json")["last_run"]["evaluated"] == 0
    assert again["arms"] == summary["arms"] and not again["organism"]["built"]


@pytest.mark.parametrize("bad, message", [
    (dict(seeds=0), "--seeds must be at least 1"), (dict(window=9), "wider than organism-mid"),
    (dict(preset="organism-deep"), "unknown organism preset"), (dict(lr=0), "--lr"),
    (dict(kl_weight=-1), "--kl-weight"),
    (dict(pairs_per_group=0), "DemoConfig.pairs_per_group must be at least 1"),
    (dict(localize_groups=0), "DemoConfig.localize_groups must be at least 1")])
def test_bad_settings_are_refused_before_any_work(tmp_path, monkeypatch, bad, message):
    monkeypatch.setenv("MECHLORA_HOME", str(tmp_path / "home"))
    with pytest.raises(MechloraError, match=message):
        run_demo(tmp_path / "x", DemoConfig(**bad))
    assert not (tmp_path / "x").exists() and not (tmp_path / "home").exists()


def test_the_preset_seed_is_the_default_seed(tmp_path, monkeypatch, capsys):
    """`--preset organism-mid@1` alone means seed 1 (a default --seed 0 used to conflict);
    with another --seed it is refused before any work, in one line."""
    assert DemoConfig(preset="organism-mid@1").seed == 1 and DemoConfig().seed == 0
    assert DemoConfig(preset="organism-mid@1").validate().seed == 1
    monkeypatch.setenv("MECHLORA_HOME", str(tmp_path / "home"))
    ran = []
    monkeypatch.setattr("mechlora.demo.run_demo", lambda out, cfg, **kw: ran.append(cfg))
    with pytest.raises(SystemExit) as e:
        main(["demo", "--preset", "organism-mid@1", "--out", str(tmp_path / "x"), "--quiet"])
    assert e.value.code in (0, None) and ran[0].seed == 1 and ran[0].validate().seed == 1
    monkeypatch.undo()
    monkeypatch.setenv("MECHLORA_HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as e:
        main(["demo", "--preset", "organism-mid@1", "--seed", "2", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "names seed 1 but seed=2" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "home").exists()


def test_resume_with_rebuild_is_refused(tmp_path, monkeypatch, capsys):
    """--rebuild retrains the organism; the demo resumed in --out would mix old and new."""
    monkeypatch.setenv("MECHLORA_HOME", str(tmp_path / "home"))
    with pytest.raises(MechloraError, match="--rebuild and --resume exclude each other"):
        run_demo(tmp_path / "x", DemoConfig(rebuild=True), resume=True)
    with pytest.raises(SystemExit) as e:
        main(["demo", "--resume", "--rebuild", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--rebuild and --resume exclude each other" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "home").exists()
