"""The demo's contract on a reduced organism: every intermediate output, three arms, a report."""

import json

from mechlora.demo import DemoConfig, run_demo


def test_demo_on_a_quick_organism(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHLORA_HOME", str(tmp_path / "home"))
    cfg = DemoConfig(quick=True, steps=2, localize_groups=4, pairs_per_group=2, window=1)
    summary = run_demo(tmp_path / "demo", cfg, progress=False, log=lambda *a: None)
    out = tmp_path / "demo"
    for path in ("localize/localization.json", "localize/report.html", "eval/eval.json",
                 "eval/predictions.jsonl", "adapter-window/adapter_model.safetensors",
                 "adapter-all/adapter_config.json", "report.html", "demo.json"):
        assert (out / path).is_file(), path
    assert set(summary["eval"]) == {"base", "adapter-window", "adapter-all"}
    assert summary["selection"]["spec"] == json.loads(
        (out / "localize" / "localization.json").read_text())["settings"]["selection"]["spec"]
    spec = json.loads((out / "adapter-window" / "mechlora.json").read_text())
    assert str(spec).find(summary["selection"]["spec"]) >= 0
