"""Failures a run recovers from: every piece of advice an error prints works as printed.

A non-finite loss (resume with a lower --lr, or --skip-nonfinite N), an out-of-memory step (the
micro-batch halves and the step is retried), a crash while the adapter is written (no half
adapter), and `train_arm`, which a comparison uses to train each arm resumably.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from pathlib import Path

import pytest
import torch

from mechlora.batching import epoch_pairs
from mechlora.data import EXAMPLE_PATH, load_groups
from mechlora.errors import MechloraError
from mechlora.train import TrainConfig, train, train_arm
from tests.test_train import FAST, cli, lora_state, tiny

S = importlib.import_module("mechlora.training.step")  # the seam: one update's forward
GROUPS = load_groups(EXAMPLE_PATH)
ARGS = ["train", "--model", "tiny-gemma3-vlm", "--pairs", str(EXAMPLE_PATH), "--layers",
        "31-33", "--max-steps", "4", "--grad-accum", "4", "--save-every", "1", "-q"]


def rows(out: Path, kind: str = "train") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").split("\n")
    return [r for r in map(json.loads, filter(None, lines)) if r["kind"] == kind]


def test_a_lower_lr_resumes_a_run_that_diverged(tmp_path, monkeypatch, capsys) -> None:
    terms, calls = S.pair_terms, []

    def unstable(model, batcher, pairs, cfg):  # diverges from the third update while lr is high
        out = terms(model, batcher, pairs, cfg)
        calls.append(1)
        if cfg.lr > 2e-3 and len(calls) > 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(S, "pair_terms", unstable)
    args = [*ARGS, "--lr", "0.003", "--out", str(tmp_path / "run")]
    code, _, err = cli(args, capsys)
    assert code == 2 and "step 3: the loss is not finite" in err
    advice = re.search(r"resume with the same command plus --resume and a lower --lr \(now "
                       r"0.003\)", err)
    assert advice, err
    code, _, err = cli([*args, "--resume", "--lr", "0.001"], capsys)  # today: refused
    assert code == 0, err

    record = json.loads((tmp_path / "run" / "mechlora.json").read_text())
    assert record["training"]["resumptions"] == [
        {"step": 2, "changed": {"lr": {"then": 0.003, "now": 0.001}}}]
    assert record["config"]["lr"] == 0.001
    lrs = [r["lr"] for r in rows(tmp_path / "run")]
    # linear decay over 4 updates: 0.003 x (1, 3/4), then the new peak 0.001 x (2/4, 1/4)
    assert lrs == pytest.approx([0.003, 0.00225, 0.0005, 0.00025])
    assert "Resumed at step 2 with lr 0.003 -> 0.001." in (tmp_path / "run" /
                                                             "README.md").read_text()


def test_skip_nonfinite_steps_over_a_bad_update_as_advised(tmp_path, monkeypatch,
                                                          capsys) -> None:
    bad = epoch_pairs(GROUPS, 0, 1)[0].id  # a pair of update 3 (2 updates per epoch)
    terms = S.pair_terms

    def poisoned(model, batcher, pairs, cfg):
        out = terms(model, batcher, pairs, cfg)
        if any(p.id == bad for p in pairs):
            out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(S, "pair_terms", poisoned)
    args = [*ARGS, "--out", str(tmp_path / "run")]
    code, _, err = cli(args, capsys)
    assert code == 2 and "step 3: the loss is not finite" in err
    skip = re.search(r"--skip-nonfinite (\d+)", err).group(1)
    code, _, err = cli([*args, "--resume", "--skip-nonfinite", skip], capsys)
    assert code == 0, err
    assert "non-finite loss, update skipped" in err

    train_rows = rows(tmp_path / "run")
    assert [(r["step"], r["skipped"]) for r in train_rows] == [
        (1, False), (2, False), (3, True), (4, False)]
    assert train_rows[2]["loss"] is None  # JSON has no inf
    record = json.loads((tmp_path / "run" / "mechlora.json").read_text())
    assert record["training"]["skipped_steps"] == [3]
    assert record["training"]["pairs_seen"] == 12  # the skipped update's 4 pairs taught nothing
    assert record["training"]["final"]["step"] == 4
    assert "1 update(s) skipped for a non-finite loss" in (tmp_path / "run" /
                                                            "README.md").read_text()


def test_skipped_update_leaves_the_weights_as_they_were(monkeypatch) -> None:
    terms, calls = S.pair_terms, []

    def nan_second(model, batcher, pairs, cfg):
        out = terms(model, batcher, pairs, cfg)
        calls.append(1)
        if len(calls) == 2:
            out.loss = out.loss * float("nan")
        return out

    cfg = TrainConfig(**{**FAST.to_dict(), "max_steps": 2, "skip_nonfinite": 1, "dropout": 0.0})
    # update 1 runs at the peak lr in both runs (linear decay starts at 1 whatever the length)
    one = train(tiny(), GROUPS, layers="2-3", progress=False,
                config=dataclasses.replace(cfg, max_steps=1))
    monkeypatch.setattr(S, "pair_terms", nan_second)
    two = train(tiny(), GROUPS, layers="2-3", progress=False, config=cfg)
    assert [r["skipped"] for r in two.metrics] == [False, True]
    want, got = lora_state(one.subject), lora_state(two.subject)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_out_of_memory_halves_the_micro_batch_and_retries(tmp_path, monkeypatch) -> None:
    terms = S.pair_terms

    def small_memory(model, batcher, pairs, cfg):
        if len(pairs) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return terms(model, batcher, pairs, cfg)

    cfg = TrainConfig(**{**FAST.to_dict(), "max_steps": 2})  # 4 pairs per update
    want = train(tiny(), GROUPS, layers="2-3", progress=False,
                 config=dataclasses.replace(cfg, micro_batch=1))
    monkeypatch.setattr(S, "pair_terms", small_memory)
    got = train(tiny(), GROUPS, layers="2-3", out=tmp_path / "run", config=cfg, progress=False)

    assert [(r["step"], r["micro_batch"]) for r in got.metrics if r["kind"] == "oom"] == [
        (1, {"from": 4, "to": 2}), (1, {"from": 2, "to": 1})]
    assert got.record["training"]["oom_retries"] == [{"step": 1, "from": 4, "to": 2},
                                                     {"step": 1, "from": 2, "to": 1}]
    # the retried step starts again from the same state: the run is the micro-batch-1 run
    want_w, got_w = lora_state(want.subject), lora_state(got.subject)
    assert all(torch.equal(want_w[k], got_w[k]) for k in want_w)
    assert "Out of memory at step 1: micro-batch 4 -> 2" in (tmp_path / "run" /
                                                               "README.md").read_text()

    monkeypatch.setattr(S, "pair_terms", lambda *a: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory (simulated)")))
    with pytest.raises(MechloraError, match=r"even at 1 pair per forward\. Resume with the same "
                                            r"command plus --resume and less memory: "
                                            r"--gradient-checkpointing, or"):
        train(tiny(), GROUPS, layers="2-3", config=cfg, out=tmp_path / "tight", progress=False)
    monkeypatch.setattr(S, "pair_terms", terms)  # as advised: resume with checkpointing on
    resumed = train(tiny(), GROUPS, layers="2-3", out=tmp_path / "tight", progress=False,
                    resume=True, config=dataclasses.replace(cfg, gradient_checkpointing=True))
    assert resumed.record["training"]["resumptions"] == [
        {"step": 0, "changed": {"gradient_checkpointing": {"then": False, "now": True}}}]


def test_a_crash_while_writing_the_adapter_leaves_no_half_adapter(tmp_path,
                                                                  monkeypatch) -> None:
    import peft.peft_model
    from peft import PeftModel

    real = peft.peft_model.safe_save_file

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")  # what a full disk or a kill leaves
        raise OSError("No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    out = tmp_path / "run"
    cfg = TrainConfig(**{**FAST.to_dict(), "max_steps": 2, "save_every": 1})
    with pytest.raises(OSError, match="No space"):
        train(tiny(), GROUPS, layers="2-3", out=out, config=cfg, progress=False)
    visible = {p.name for p in out.iterdir()}
    assert not visible & {"adapter_model.safetensors", "adapter_config.json", "README.md",
                          "mechlora.json"}  # today: a half-written adapter_model.safetensors

    monkeypatch.setattr(peft.peft_model, "safe_save_file", real)
    done = train(tiny(), GROUPS, layers="2-3", out=out, config=cfg, progress=False, resume=True)
    assert ".final.tmp" not in {p.name for p in out.iterdir()}
    reloaded = PeftModel.from_pretrained(tiny().model, str(out))
    want = lora_state(done.subject)
    got = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_resumed_log_may_hold_line_separators(tmp_path) -> None:
    out = tmp_path / "run"
    cfg = TrainConfig(**{**FAST.to_dict(), "max_steps": 2, "save_every": 1})
    train(tiny(), GROUPS, layers="2-3", out=out, config=cfg, progress=False)
    note = {"kind": "warning", "step": 1, "guard": "note", "message": "line\u2028para\u2029end"}
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:  # as ensure_ascii=False writes
        f.write(json.dumps(note, ensure_ascii=False) + "\n")
    again = train(tiny(), GROUPS, layers="2-3", out=out, config=cfg, progress=False,
                  resume=True)
    assert note["message"] in again.record["training"]["warnings"]


def test_train_arm_reuses_resumes_and_hands_the_model_back(tmp_path, monkeypatch) -> None:
    cfg = TrainConfig(**{**FAST.to_dict(), "max_steps": 4, "save_every": 1})
    straight = train(tiny(), GROUPS, layers="2-3", config=cfg, progress=False)

    subject = tiny()
    before = {n: p.detach().clone() for n, p in subject.model.named_parameters()}
    step, calls = S.optimizer_step, []

    def interrupted(run, pairs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(run, pairs)

    monkeypatch.setattr(S, "optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_arm(subject, GROUPS, tmp_path / "arm", layers="2-3", config=cfg, progress=False)
    monkeypatch.setattr(S, "optimizer_step", step)
    subject = tiny()  # a fresh base, as after a crash
    record = train_arm(subject, GROUPS, tmp_path / "arm", layers="2-3", config=cfg,
                       progress=False)
    assert record["training"]["resumptions"][0]["step"] == 2
    assert [r["loss"] for r in rows(tmp_path / "arm")] == [
        r["loss"] for r in straight.metrics if r["kind"] == "train"]

    # the model comes back as it was: no PEFT wrapper, no LoRA layer, same weights
    assert not hasattr(subject.model, "peft_config")
    after = dict(subject.model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)

    monkeypatch.setattr(S, "optimizer_step", None)  # a finished arm does not train again
    assert train_arm(subject, GROUPS, tmp_path / "arm", layers="2-3", config=cfg) == record
    # a resume-safe change (checkpoint spacing) still finds the arm; a real change does not
    assert train_arm(subject, GROUPS, tmp_path / "arm", layers="2-3",
                     config=dataclasses.replace(cfg, save_every=0)) == record
    for other in ({"layers": "1-3"}, {"config": dataclasses.replace(cfg, kl_weight=2.0)},
                  {"pairs": GROUPS[:4]}):
        args = {"pairs": GROUPS, "layers": "2-3", "config": cfg, **other}
        with pytest.raises(MechloraError, match="finished run of another model, data, layers"):
            train_arm(subject, args.pop("pairs"), tmp_path / "arm", **args)


def test_resume_may_change_device_and_dtype_and_records_it(tmp_path) -> None:
    cfg = TrainConfig(**{**FAST.to_dict(), "max_steps": 2, "save_every": 1})
    kw = {"layers": "31-33", "out": tmp_path / "run", "config": cfg, "progress": False,
          "device": "cpu"}
    train("tiny-gemma3-vlm", GROUPS, dtype="float32", **kw)
    again = train("tiny-gemma3-vlm", GROUPS, dtype="bfloat16", resume=True, **kw)
    assert again.record["training"]["resumptions"] == [
        {"step": 2, "changed": {"dtype": {"then": "torch.float32", "now": "torch.bfloat16"}}}]
    with pytest.raises(MechloraError, match=r"seed: 0 then, 1 now.*only save_every"):
        train("tiny-gemma3-vlm", GROUPS, resume=True,
              **{**kw, "config": dataclasses.replace(cfg, seed=1)})
