"""`train`: LoRA on the chosen language layers with the paraphrase-consistency loss.

The pipeline, one module of `mechlora.training` per job:

    inputs       the training / held-out groups, and every path the run reads
    model        device, accelerate, LoRA, optimizer and schedule
    layers       --layers auto|all|SPEC|SELECTOR (scores from --from or computed here),
                 --match-params (per-layer ranks)
    memory       the peak-memory estimate (dry run; checkpointing turned on when it won't fit)
    step         one optimizer update (one forward per micro-batch, gradients summed across
                 processes, out-of-memory retry)
    loop         epochs of seeded pairs, logging, held-out checks, checkpoints
    heldout      the held-out check (mechlora.evaluate) and guards (collapse warnings)
    checkpoints  run.json, step-N/ folders, resume
    outputs      the adapter folder, written atomically
    plan         --dry-run

`train` wires them together; `train_arm` trains one arm of a comparison resumably.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mechlora.batching import Batcher, epoch_pairs, first_token_logits
from mechlora.card import run_record
from mechlora.data import QuestionGroup, data_hash
from mechlora.errors import MechloraError
from mechlora.io import check_out_dir, prepare_out_dir
from mechlora.models.subject import Subject
from mechlora.select import Selection
from mechlora.spec import LayerSpec
from mechlora.spec import plan as lora_plan_of
from mechlora.training.checkpoints import begin, checkpoints, latest_checkpoint, resumptions
from mechlora.training.config import RESUMABLE, SCHEDULES, TrainConfig
from mechlora.training.inputs import data_info, read_groups, read_paths
from mechlora.training.layers import LayerChoice, match_params, resolve_layers
from mechlora.training.loop import train_loop
from mechlora.training.memory import fit_memory
from mechlora.training.model import (
    accelerator,
    add_lora,
    concrete,
    load_subject,
    optimizer,
    pick_device,
    remove_lora,
)
from mechlora.training.outputs import finished, write_outputs
from mechlora.training.plan import plan_training
from mechlora.training.step import Run, optimizer_step, pair_terms

__all__ = ["RESUMABLE", "SCHEDULES", "Batcher", "LayerChoice", "TrainConfig", "TrainResult",
           "checkpoints", "epoch_pairs", "first_token_logits", "latest_checkpoint",
           "optimizer_step", "pair_terms", "plan_training", "resolve_layers", "train",
           "train_arm"]


@dataclass
class TrainResult:
    subject: Subject  # the model with the trained adapter, in eval mode
    layers: LayerChoice
    out: Path | None
    steps: int
    metrics: list[dict] = field(default_factory=list)
    record: dict = field(default_factory=dict)  # what mechlora.json holds

    @property
    def spec(self) -> LayerSpec:
        return self.layers.spec


def train(model: Subject | str, pairs: str | Path | Sequence[QuestionGroup], *,
          layers: str | LayerSpec | Selection = "auto", out: str | Path | None = None,
          config: TrainConfig | None = None, from_localization: str | Path | None = None,
          eval_pairs: str | Path | Sequence[QuestionGroup] | None = None,
          overwrite: bool = False, resume: bool = False, progress: bool = True,
          dtype: str | torch.dtype | None = None, device: str | None = None,
          trust_remote_code: bool = False) -> TrainResult:
    """Train a LoRA adapter on `layers`: "auto", "all", "15-19", a selector ("grad:5",
    "random:5", ...; docs/select.md), a LayerSpec or a Selection.

    `model` is a preset/folder/hub name or a loaded `Subject` (PEFT wraps its model in place).
    With `out`, writes the adapter folder (see docs/train.md) and checkpoints every
    `config.save_every` steps; `resume` continues from the last one. Without `out`, nothing is
    written and the trained model is only returned.
    """
    cfg = (config or TrainConfig()).validate()
    if resume and out is None:
        raise MechloraError("--resume needs --out: the folder of the run to continue")
    groups = read_groups(pairs, "training")
    eval_groups = read_groups(eval_pairs, "eval") if eval_pairs is not None else None
    where = pick_device(model, device)
    acc = accelerator(cfg, where)
    reads = read_paths(model, [pairs, eval_pairs], [*groups, *(eval_groups or [])],
                       from_localization)
    out_dir = _prepare(out, overwrite, resume, reads, acc)
    subject = load_subject(model, dtype, concrete(where), trust_remote_code)
    batcher = Batcher(subject, merge_variants=cfg.merge_variants)
    for g in [*groups, *(eval_groups or [])]:
        batcher.choice_ids(g)  # a bad choice list fails now, not after an hour of training
    choice = resolve_layers(subject, groups, layers, cfg, from_localization, out_dir, resume,
                            acc, progress)
    match = match_params(subject, choice.spec, cfg)
    ranks = match.ranks if match is not None else None
    lora_plan = lora_plan_of(subject.base, choice.spec, subject.layers_path, cfg.modules, cfg.r,
                             ranks=ranks)
    cfg, memory = fit_memory(subject, batcher, groups, choice.spec, cfg, lora_plan.trainable,
                             acc)
    peft_model = add_lora(subject, choice.spec, cfg, acc.process_index, ranks)
    trained = dataclasses.replace(subject, model=peft_model)
    params = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    per_epoch, total = cfg.steps(len(groups))
    opt, sched = optimizer([p for _, p in params], cfg, total)
    run = Run(trained, batcher, cfg, acc, params, opt, sched, out_dir, progress, cfg.micro_batch)
    data = {"train": data_info(pairs, groups), "eval": data_info(eval_pairs, eval_groups)}
    start = 0
    if out_dir is not None:
        identity = {"model": subject.name, "spec": str(choice.spec),
                    "data": data["train"]["sha256"], "config": cfg.to_dict(),
                    "device": str(subject.device),
                    "dtype": str(next(subject.model.parameters()).dtype)}
        start = begin(run, identity, resume)
    metrics = train_loop(run, groups, eval_groups, start)
    peft_model.eval()
    record = run_record(trained, cfg, choice, lora_plan, metrics, steps=total,
                        steps_per_epoch=per_epoch, world_size=acc.num_processes, data=data,
                        resumptions=resumptions(out_dir), memory=memory, match=match)
    if out_dir is not None and acc.is_main_process:
        write_outputs(run, record, out_dir)
    acc.wait_for_everyone()
    return TrainResult(trained, choice, out_dir, total, metrics, record)


def train_arm(model: Subject | str, pairs, out: str | Path, *,
              layers: str | LayerSpec | Selection,
              config: TrainConfig | None = None, eval_pairs=None, from_localization=None,
              progress: bool = True, **kw) -> dict:
    """Train one arm of a comparison into `out`, resumably; returns its mechlora.json record.

    A finished run in `out` with the same model, layers, data and settings is reused as it
    is; an unfinished one is resumed from its last checkpoint; otherwise training starts.
    A loaded `Subject` is handed back as it came (the adapter lives in `out`), so one base
    model can train every arm in turn.
    """
    out = Path(out)
    cfg = (config or TrainConfig()).validate()
    done = finished(out)
    if done is not None:
        if _same_arm(done, model, pairs, layers, cfg):
            return done
        raise MechloraError(f"{out} holds a finished run of another model, data, layers or "
                            "settings; choose another folder for this arm, or delete that one")
    result = train(model, pairs, layers=layers, out=out, config=cfg, eval_pairs=eval_pairs,
                   from_localization=from_localization, resume=True, progress=progress, **kw)
    if isinstance(model, Subject):
        # (on a GPU checkpointing may have been turned on for memory: the record says)
        remove_lora(result.subject.model, result.record["config"]["gradient_checkpointing"])
    return result.record


def _same_arm(record: dict, model, pairs, layers, cfg: TrainConfig) -> bool:
    """A finished record is this arm: same model, data, layers (a selector: whatever it chose)
    and settings (those a resume may change aside)."""
    name = model.name if isinstance(model, Subject) else str(model)
    fixed = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE}
    same = (record["base_model"] == name
            and record["data"]["train"]["sha256"] == data_hash(read_groups(pairs, "training"))
            and {k: record["config"].get(k) for k in fixed} == fixed)
    if isinstance(layers, Selection):
        layers = layers.spec
    if not isinstance(layers, LayerSpec):
        text = str(layers).strip().lower()
        if text != "all" and not text[:1].isdigit():  # auto or a selector
            return same and record["layers"].get("given", "auto") == text
        layers = LayerSpec.parse(text, record["layers"]["n_layers"])
    return same and record["layers"]["list"] == list(layers.layers)


def _prepare(out, overwrite: bool, resume: bool, reads, acc) -> Path | None:
    if out is None:
        return None
    out = Path(out)
    if acc.is_main_process:
        prepare_out_dir(out, overwrite, resume=resume, inputs=reads)
    else:
        check_out_dir(out, overwrite, resume=True, inputs=reads)
    acc.wait_for_everyone()
    return out
