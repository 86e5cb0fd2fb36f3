"""The trainer on a tiny Gemma 3 VLM (4 language layers, fp32, CPU): real effects, exact resume."""

from __future__ import annotations

import importlib
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mechlora.data import EXAMPLE_PATH, QuestionGroup, Variant, load_groups
from mechlora.errors import DataError, MechloraError
from mechlora.loss import consistency_loss
from mechlora.models import wrap
from mechlora.models.presets import tiny_gemma3_vlm
from mechlora.result import LocalizationResult
from mechlora.spec import LayerSpec
from mechlora.train import Batcher, TrainConfig, epoch_pairs, first_token_logits, pair_terms, train
from mechlora.training.model import add_lora
from tests.cli import run_cli

T = importlib.import_module("mechlora.train")  # the module, whatever `mechlora.train` exports
S = importlib.import_module("mechlora.training.step")  # the seams tests patch: one update
FAST = TrainConfig(epochs=10, lr=3e-3, grad_accum=4, dropout=0.0, save_every=0)


def tiny(seed: int = 0):
    model, processor = tiny_gemma3_vlm(seed, n_layers=4)
    with torch.no_grad():  # logits x2: sharper outputs, so that paraphrases measurably disagree
        model.model.language_model.norm.weight.fill_(1.0)
    return wrap(model, processor, name="tiny-gemma3-vlm")


@pytest.fixture(scope="module")
def groups() -> list[QuestionGroup]:
    return load_groups(EXAMPLE_PATH)


def lora_state(subject) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in subject.model.named_parameters() if "lora_" in n}


@torch.no_grad()
def mean_sym_kl(subject, groups) -> float:
    """Symmetric KL of the first-answer-token distributions over every pair of wordings."""
    subject.model.eval()
    batcher, values = Batcher(subject), []
    for g in groups:
        z = first_token_logits(subject.model, batcher.inputs([(g, v) for v in
                                                               range(len(g.variants))]))
        for i, j in itertools.combinations(range(len(z)), 2):
            values.append(consistency_loss(z[i:i + 1], z[j:j + 1], torch.tensor([0])).kl.item())
    return float(np.mean(values))


@torch.no_grad()
def hidden_states(subject, groups) -> tuple[torch.Tensor, ...]:
    subject.model.eval()
    inputs = Batcher(subject).inputs([(g, 0) for g in groups[:3]])
    return subject.model(**inputs, output_hidden_states=True).hidden_states


# ---- real effects ----------------------------------------------------------------------------


def test_training_lowers_symmetric_kl_and_changes_only_chosen_layers(groups) -> None:
    subject = tiny()
    kl_before = mean_sym_kl(subject, groups)
    hs_before = hidden_states(subject, groups)
    result = train(subject, groups, layers="2-3", config=FAST, progress=False)
    kl_after = mean_sym_kl(result.subject, groups)
    ce_only = train(tiny(), groups, layers="2-3", progress=False,
                    config=TrainConfig(**{**FAST.to_dict(), "kl_weight": 0.0}))
    # (measured: 0.32 -> 0.09, and 0.17 without the KL term)
    assert kl_after < 0.4 * kl_before
    assert kl_after < 0.8 * mean_sym_kl(ce_only.subject, groups)  # the KL term does it

    names = list(lora_state(result.subject))
    assert names and all(re.search(r"language_model\.layers\.[23]\.", n) for n in names)
    assert {n for n, p in result.subject.model.named_parameters() if p.requires_grad} == set(names)
    hs_after = hidden_states(result.subject, groups)
    for i in range(3):  # embeddings and the outputs of layers 0 and 1: bit for bit the same
        assert torch.equal(hs_before[i], hs_after[i])
    assert not torch.allclose(hs_before[3], hs_after[3])  # layer 2's output moved
    with result.subject.model.disable_adapter():  # the base weights themselves are untouched
        assert torch.equal(hidden_states(result.subject, groups)[-1], hs_before[-1])


def test_no_gradient_below_lowest_adapted_layer(groups) -> None:
    weights = []
    for checkpointing in (False, True):
        subject = tiny()
        seen: dict[int, set[bool]] = {}
        for i, layer in enumerate(subject.layers):
            layer.register_forward_hook(lambda m, args, out, i=i, seen=seen:
                                        seen.setdefault(i, set()).add(out.requires_grad))
        cfg = TrainConfig(**{**FAST.to_dict(), "max_steps": 2,
                             "gradient_checkpointing": checkpointing})
        result = train(subject, groups, layers="2-3", config=cfg, progress=False)
        # no autograd graph is kept below layer 2, with or without activation checkpointing
        assert seen == {0: {False}, 1: {False}, 2: {True}, 3: {True}}
        assert not subject.model.get_input_embeddings().weight.requires_grad
        weights.append(lora_state(result.subject))
    for name, value in weights[0].items():  # checkpointing changes memory, not the result
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-7)


def test_one_forward_per_step_gives_the_per_pair_gradient(groups) -> None:
    subject = tiny()
    cfg = TrainConfig(dropout=0.0)
    model = add_lora(subject, LayerSpec.parse("1-3", 4), cfg, 0)
    with torch.no_grad():  # B starts at zero, which would leave A without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    batcher, pairs = Batcher(subject), epoch_pairs(groups, 0, 0)

    pair_terms(model, batcher, pairs, cfg).loss.mean().backward()
    batched = [p.grad.clone() for p in params]
    model.zero_grad()
    for pair in pairs:
        (pair_terms(model, batcher, [pair], cfg).loss.sum() / len(pairs)).backward()
    for one, many in zip(batched, (p.grad for p in params), strict=True):
        assert (one - many).norm() <= 1e-4 * many.norm()  # fp32 summation order only


def test_epoch_pairs_are_seeded_distinct_and_cover_every_group(groups) -> None:
    first = epoch_pairs(groups, 0, 0)
    assert [p.id for p in first] == [p.id for p in epoch_pairs(groups, 0, 0)]
    assert [p.id for p in first] != [p.id for p in epoch_pairs(groups, 0, 1)]
    assert sorted(p.group.id for p in first) == sorted(g.id for g in groups)
    assert all(p.a != p.b for p in first)


# ---- the output folder -----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # PEFT's
def test_adapter_folder_reloads_with_plain_peft(groups, tmp_path) -> None:
    from peft import PeftModel

    out = tmp_path / "run"
    cfg = TrainConfig(**{**FAST.to_dict(), "epochs": 2, "save_every": 1, "keep_checkpoints": 2})
    result = train(tiny(), EXAMPLE_PATH, layers="2-3", out=out, config=cfg, progress=False,
                   eval_pairs=EXAMPLE_PATH)
    for name in ("adapter_config.json", "adapter_model.safetensors", "mechlora.json",
                 "metrics.jsonl", "README.md", "tokenizer.json", "processor_config.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-3", "step-4"]

    reloaded = PeftModel.from_pretrained(tiny().model, str(out)).eval()
    inputs = Batcher(result.subject).inputs([(g, 1) for g in groups])
    with torch.no_grad():
        want = result.subject.model(**inputs).logits
        got = reloaded(**inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    record = json.loads((out / "mechlora.json").read_text())
    assert record["layers"]["spec"] == "2-3" and record["layers"]["how"] == "explicit"
    assert record["config"] == cfg.to_dict() and record["seed"] == 0
    assert record["lora"]["trainable_parameters"] == sum(
        p.numel() for n, p in result.subject.model.named_parameters() if p.requires_grad)
    assert record["data"]["train"]["n_groups"] == len(groups)
    assert len(record["data"]["train"]["sha256"]) == 64
    assert set(record["versions"]) >= {"torch", "transformers", "peft", "accelerate"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all({"loss", "ce", "kl", "lr", "pairs_per_s"} <= set(r) for r in train_rows)
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2, 4]  # start, each epoch
    card = (out / "README.md").read_text()
    for needle in ("| Adapter rank (r) | 16 |", "| Target layers | 2-3 of 4",
                   "PeftModel.from_pretrained", "| Trainable parameters |"):
        assert needle in card
    assert TrainConfig.from_dict(record["config"]) == cfg

    with pytest.raises(MechloraError, match="--overwrite"):
        train(tiny(), groups, layers="2-3", out=out, config=cfg, progress=False)


def test_resume_after_interruption_gives_identical_weights(groups, tmp_path, monkeypatch) -> None:
    cfg = TrainConfig(epochs=2, lr=3e-3, grad_accum=4, save_every=2)  # dropout on: RNG matters
    straight = train(tiny(), groups, layers="1-3", out=tmp_path / "a", config=cfg,
                     progress=False)

    step, calls = S.optimizer_step, []

    def interrupted(run, pairs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(run, pairs)

    monkeypatch.setattr(S, "optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), groups, layers="1-3", out=tmp_path / "b", config=cfg, progress=False)
    monkeypatch.setattr(S, "optimizer_step", step)
    assert T.latest_checkpoint(tmp_path / "b").name == "step-2"
    resumed = train(tiny(), groups, layers="1-3", out=tmp_path / "b", config=cfg,
                    progress=False, resume=True)

    want, got = lora_state(straight.subject), lora_state(resumed.subject)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [r["loss"] for r in resumed.metrics] == [r["loss"] for r in straight.metrics]

    with pytest.raises(MechloraError, match="kl_weight: 1.0 then, 2.0 now"):
        train(tiny(), groups, layers="1-3", out=tmp_path / "b", resume=True, progress=False,
              config=TrainConfig(**{**cfg.to_dict(), "kl_weight": 2.0}))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(groups, tmp_path,
                                                             monkeypatch) -> None:
    terms = S.pair_terms

    def poisoned(model, batcher, pairs, cfg):
        out = terms(model, batcher, pairs, cfg)
        if len(calls) >= 2:
            out.loss = out.loss * float("nan")
        calls.append(1)
        return out

    calls: list[int] = []
    monkeypatch.setattr(S, "pair_terms", poisoned)
    cfg = TrainConfig(**{**FAST.to_dict(), "save_every": 1})
    with pytest.raises(MechloraError, match=r"step 3: the loss is not finite.*step-2"):
        train(tiny(), groups, layers="2-3", out=tmp_path / "r", config=cfg, progress=False)
    assert T.latest_checkpoint(tmp_path / "r").name == "step-2"
    assert not (tmp_path / "r" / "adapter_model.safetensors").exists()


# ---- choosing layers -------------------------------------------------------------------------


def fake_localization(n_layers: int, peak: int) -> LocalizationResult:
    r = np.zeros((2, n_layers))
    r[:, peak], r[:, peak + 1:] = 0.5, 1.0  # restoration rises over `peak` and the next layer
    return LocalizationResult(
        model="tiny-gemma3-vlm", n_layers=n_layers, components=("resid",), positions="last",
        engine="cached", pair_ids=["g:0>1", "g:1>0"], group_ids=["g", "g"],
        restoration={"resid": r}, margin_a=np.ones(2), margin_b=np.zeros(2),
        divergence={"cosine": np.zeros((2, n_layers))})


def test_layers_auto_uses_a_given_localization(groups, tmp_path) -> None:
    fake_localization(4, peak=1).save(tmp_path / "loc")
    cfg = TrainConfig(**{**FAST.to_dict(), "max_steps": 1, "rule": "window:2"})
    result = train(tiny(), groups, layers="auto", from_localization=tmp_path / "loc",
                   out=tmp_path / "run", config=cfg, progress=False)
    assert str(result.spec) == "1-2"
    record = json.loads((tmp_path / "run" / "mechlora.json").read_text())
    assert record["layers"]["rule"] == "window:2" and record["layers"]["covered"] == 1.0
    assert record["localization"]["scores"] == [0.0, 0.5, 0.5, 0.0]
    assert not (tmp_path / "run" / "localization").exists()

    explicit = T.resolve_layers(tiny(), groups, "3", cfg, tmp_path / "loc", progress=False)
    assert explicit.how == "explicit" and explicit.selection.covered == 0.0  # coverage reported

    fake_localization(6, peak=1).save(tmp_path / "loc6")
    with pytest.raises(MechloraError, match="6 layers; this model has 4"):
        train(tiny(), groups, from_localization=tmp_path / "loc6", config=cfg, progress=False)


def test_layers_auto_localizes_the_training_pairs_first(groups, tmp_path, capsys) -> None:
    cfg = TrainConfig(**{**FAST.to_dict(), "max_steps": 1, "rule": "window:2",
                         "localize_groups": 2})
    result = train(tiny(), groups, layers="auto", out=tmp_path / "run", config=cfg)
    assert "localizing 2 of the 8 training groups first" in capsys.readouterr().out
    loc = LocalizationResult.load(tmp_path / "run" / "localization")
    assert loc.n_layers == 4 and loc.n_pairs > 0
    record = json.loads((tmp_path / "run" / "mechlora.json").read_text())
    assert record["layers"]["how"] == "auto" and len(result.spec) == 2
    assert record["localization"]["recorded_here"] is True
    assert record["localization"]["path"] == "localization"


# ---- clear errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"lr": 0}, "--lr must be positive"),
    ({"r": 0}, "--r (LoRA rank) must be at least 1"),
    ({"kl_over": "tokens"}, "--kl-over must be one of vocab, choices"),
    ({"schedule": "step"}, "--schedule must be one of"),
    ({"micro_batch": -1}, "--micro-batch"),
    ({"dropout": 1.0}, "--dropout"),
    ({"modules": ()}, "--modules"),
])
def test_bad_options(change, message) -> None:
    with pytest.raises(MechloraError, match=re.escape(message)):
        TrainConfig(**change).validate()
    with pytest.raises(MechloraError, match="unknown training settings lr_max"):
        TrainConfig.from_dict({"lr_max": 1})


def test_bad_data_and_arguments(groups, tmp_path) -> None:
    with pytest.raises(DataError, match="file not found"):
        train(tiny(), tmp_path / "missing.jsonl", layers="2-3", progress=False)
    clash = QuestionGroup("c1", (Variant("Is it big?"), Variant("Is it large?")), "yes",
                          ("yes", "yeah"))
    with pytest.raises(DataError, match="begin with the same token"):
        train(tiny(), [clash], layers="2-3", progress=False)
    single = QuestionGroup("s1", (Variant("Is it big?"),), "yes")
    with pytest.raises(DataError, match="one wording"):
        train(tiny(), [single], layers="2-3", progress=False)
    with pytest.raises(MechloraError, match="numbered 0-3"):
        train(tiny(), groups, layers="15-19", progress=False)
    with pytest.raises(MechloraError, match="--resume needs --out"):
        train(tiny(), groups, layers="2-3", resume=True, progress=False)
    with pytest.raises(MechloraError, match="no module named qq_proj"):
        train(tiny(), groups, layers="2-3", progress=False,
              config=TrainConfig(modules=("q_proj", "qq_proj")))
    done = train(tiny(), groups, layers="2-3", config=TrainConfig(max_steps=1), progress=False)
    with pytest.raises(MechloraError, match="already carries a PEFT adapter"):
        train(done.subject, groups, layers="2-3", progress=False)
    with pytest.raises(MechloraError, match="--dry-run"):
        train("medgemma-4b", groups, layers="2-3", progress=False)


# ---- command line ----------------------------------------------------------------------------


cli = run_cli


def test_cli_dry_run_on_medgemma_counts_the_published_numbers(capsys) -> None:
    code, out, _ = cli(["train", "--dry-run", "--model", "medgemma-4b", "--layers", "all"], capsys)
    assert code == 0 and "29,802,496 (0.69%)" in out and "238 modules" in out
    code, out, _ = cli(["train", "--dry-run", "--model", "medgemma-4b", "--layers", "15-19",
                        "--pairs", str(EXAMPLE_PATH)], capsys)
    assert code == 0 and "4,382,720 (0.10%)" in out and "35 modules" in out
    assert "8 question groups" in out and "3 optimizer steps" in out


def test_cli_train_and_select(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code, stdout, err = cli(["train", "--model", "tiny-gemma3-vlm", "--pairs", str(EXAMPLE_PATH),
                             "--layers", "31-33", "--max-steps", "1", "--micro-batch", "4",
                             "--out", str(out), "-q"], capsys)
    assert code == 0, err
    assert "layers 31-33 (explicit); 1 steps" in stdout
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16

    code, _, err = cli(["train", "--model", "tiny-gemma3-vlm", "--pairs", str(EXAMPLE_PATH),
                        "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in err and "Traceback" not in err
    code, _, err = cli(["train", "--model", "tiny-gemma3-vlm", "--pairs", str(EXAMPLE_PATH),
                        "--out", str(tmp_path / "x"), "--kl-over", "all"], capsys)
    assert code == 2 and "--kl-over must be one of vocab, choices" in err

    fake_localization(34, peak=16).save(tmp_path / "loc")
    code, stdout, _ = cli(["select", str(tmp_path / "loc"), "--rule", "window:2"], capsys)
    lines = stdout.splitlines()
    assert code == 0 and lines[0] == "16-17"
    assert lines[1].startswith("window:2 -> 16-17: best contiguous 2 layers, 100%")
    code, _, err = cli(["select", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "not found" in err


def test_public_api_round_trip_of_config(tmp_path) -> None:
    cfg = TrainConfig(r=8, modules=("q_proj", "v_proj"), kl_over="choices")
    path = Path(tmp_path / "c.json")
    path.write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(json.loads(path.read_text())) == cfg
    assert TrainConfig().pairs_per_step == 8


@pytest.mark.slow
def test_two_process_cpu_run_matches_one_process(tmp_path) -> None:
    """Data parallel without code change: torchrun (accelerate launch on GPUs) runs the CLI."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    args = ["--model", "tiny-gemma3-vlm", "--pairs", str(EXAMPLE_PATH), "--layers", "30-33",
            "--max-steps", "2", "--dropout", "0"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", "2", "-m", "mechlora", "train", *args, "-q",
                    "--out", str(tmp_path / "ddp")], check=True, capture_output=True,
                   timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    record = json.loads((tmp_path / "ddp" / "mechlora.json").read_text())
    assert record["training"]["world_size"] == 2 and record["training"]["pairs_seen"] == 16

    one = train("tiny-gemma3-vlm", EXAMPLE_PATH, layers="30-33", device="cpu", progress=False,
                config=TrainConfig(max_steps=2, dropout=0.0))
    want = get_peft_model_state_dict(one.subject.model, save_embedding_layers=False)
    got = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for name, value in want.items():  # the same update: gradients summed over both processes
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6)
