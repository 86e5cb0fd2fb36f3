"""`train`: LoRA on the chosen language layers with the paraphrase-consistency loss.

An optimizer step takes `pairs_per_step` pairs (batch_size x grad_accum: the recipe's 1 x 8).
Each epoch draws, for every question group, one random pair of distinct wordings (seeded by
seed and epoch, so a resumed run sees the same pairs). Both wordings of every pair go through
one forward, `micro_batch` pairs at a time (default: the whole step): the loss is a mean over
pairs, so the gradient equals one-pair-at-a-time accumulation, for a fraction of the time.
Each prompt is tokenized once and each image encoded once per run, since the vision tower is
frozen. Under `accelerate launch` every process takes a share of each step's pairs and the
LoRA gradients are summed across processes: the update does not depend on the process count.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mechlora.batching import Batcher, epoch_pairs, first_token_logits
from mechlora.card import model_card, plan_text, run_record
from mechlora.data import Pair, QuestionGroup, data_hash, load_groups, make_pairs
from mechlora.errors import DataError, MechloraError
from mechlora.io import atomic_write_text, prepare_out_dir, write_json
from mechlora.loss import KL_OVER, LossTerms, consistency_loss
from mechlora.models.subject import Subject
from mechlora.result import LocalizationResult
from mechlora.select import Selection, select_layers
from mechlora.spec import DEFAULT_ALPHA, DEFAULT_DROPOUT, DEFAULT_MODULES, DEFAULT_R, LayerSpec
from mechlora.spec import plan as lora_plan_of

SCHEDULES = ("linear", "cosine", "constant")
# Options that may change between a run and its resumption: they do not change the weights.
RESUMABLE = ("save_every", "keep_checkpoints", "eval_every")


@dataclass
class TrainConfig:
    """Every hyperparameter of a run; the defaults are the published recipe. JSON round-trips."""

    r: int = DEFAULT_R
    alpha: int = DEFAULT_ALPHA
    dropout: float = DEFAULT_DROPOUT
    modules: tuple[str, ...] = DEFAULT_MODULES
    lr: float = 2e-4
    batch_size: int = 1
    grad_accum: int = 8
    micro_batch: int = 0  # pairs per forward; 0: every pair of a step in one forward
    epochs: int = 3
    max_steps: int = 0  # 0: no cap
    warmup: int = 0
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    kl_over: str = "vocab"
    seed: int = 0
    save_every: int = 100  # steps between checkpoints; 0: none
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps between flip-rate checks on eval pairs; 0: each epoch's end
    gradient_checkpointing: bool = False
    bf16: bool = True  # bf16 autocast when training on a GPU
    rule: str = "window:5"  # layers="auto": how localization scores become a spec
    localize_groups: int = 64  # layers="auto" with no localization given: groups to localize

    def __post_init__(self) -> None:
        names = self.modules.split(",") if isinstance(self.modules, str) else self.modules
        self.modules = tuple(m.strip() for m in names)

    @property
    def pairs_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def steps(self, n_groups: int) -> tuple[int, int]:
        """(updates per epoch, updates in the run) for `n_groups` question groups."""
        per_epoch = math.ceil(n_groups / self.pairs_per_step)
        total = self.epochs * per_epoch
        return per_epoch, min(total, self.max_steps) if self.max_steps else total

    def validate(self) -> TrainConfig:
        checks = [
            (self.r >= 1, "--r (LoRA rank) must be at least 1"),
            (self.alpha > 0, "--alpha must be positive"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (len(self.modules) > 0 and all(m.strip() for m in self.modules),
             "--modules must name at least one projection, e.g. q_proj,v_proj"),
            (self.lr > 0, "--lr must be positive"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.micro_batch >= 0, "--micro-batch must be 0 (whole step) or more"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.max_steps >= 0, "--max-steps must be 0 (no cap) or more"),
            (self.warmup >= 0, "--warmup must be 0 or more steps"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (self.weight_decay >= 0, "--weight-decay must be 0 or more"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be 0 (no clipping) or more"),
            (self.kl_weight >= 0, "--kl-weight must be 0 or more"),
            (self.kl_temperature > 0, "--kl-temperature must be positive"),
            (self.kl_over in KL_OVER, f"--kl-over must be one of {', '.join(KL_OVER)}"),
            (self.save_every >= 0, "--save-every must be 0 (no checkpoints) or more"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
            (self.eval_every >= 0, "--eval-every must be 0 (each epoch) or more"),
            (self.localize_groups >= 1, "--localize-groups must be at least 1"),
        ]
        bad = [message for ok, message in checks if not ok]
        if bad:
            raise MechloraError("; ".join(bad))
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modules"] = list(self.modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MechloraError(f"unknown training settings {', '.join(unknown)}; known: "
                                f"{', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class LayerChoice:
    """The layers to adapt, and where they came from."""

    spec: LayerSpec
    how: str  # "auto", "all" or "explicit"
    selection: Selection | None = None
    localization: LocalizationResult | None = None
    localization_path: str | None = None
    localized_here: bool = False


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
          layers: str | LayerSpec = "auto", out: str | Path | None = None,
          config: TrainConfig | None = None, from_localization: str | Path | None = None,
          eval_pairs: str | Path | Sequence[QuestionGroup] | None = None,
          overwrite: bool = False, resume: bool = False, progress: bool = True,
          dtype: str | torch.dtype | None = None, device: str | None = None) -> TrainResult:
    """Train a LoRA adapter on `layers` ("auto", "all", "15-19" or a LayerSpec).

    `model` is a preset/folder/hub name or a loaded `Subject` (PEFT wraps its model in place).
    With `out`, writes the adapter folder (see docs/train.md) and checkpoints every
    `config.save_every` steps; `resume` continues from the last one. Without `out`, nothing is
    written and the trained model is only returned.
    """
    cfg = (config or TrainConfig()).validate()
    if resume and out is None:
        raise MechloraError("--resume needs --out: the folder of the run to continue")
    groups = _groups(pairs, "training")
    eval_groups = _groups(eval_pairs, "eval") if eval_pairs is not None else None
    acc = _accelerator(cfg, model, device)
    out_dir = _prepare(out, overwrite, resume, acc)
    subject = _load(model, dtype, acc)
    batcher = Batcher(subject)
    for g in [*groups, *(eval_groups or [])]:
        batcher.choice_ids(g)  # a bad choice list fails now, not after an hour of training
    choice = resolve_layers(subject, groups, layers, cfg, from_localization, out_dir, resume,
                            acc, progress)
    lora_plan = lora_plan_of(subject.base, choice.spec, subject.layers_path, cfg.modules, cfg.r)
    peft_model = _add_lora(subject, choice.spec, cfg, acc.process_index)
    trained = Subject(peft_model, subject.processor, name=subject.name,
                      layers_path=subject.layers_path, template=subject.template)
    params = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch, total = cfg.steps(len(groups))
    sched = _scheduler(opt, cfg, total)
    run = _Run(trained, batcher, cfg, acc, params, opt, sched, out_dir, progress)
    data = {"train": _data(pairs, groups), "eval": _data(eval_pairs, eval_groups)}
    identity = {"model": subject.name, "spec": str(choice.spec),
                "data": data["train"]["sha256"], "config": cfg.to_dict()}
    start = _resume(run, identity) if resume else 0
    if out_dir is not None and acc.is_main_process and start == 0:
        write_json(out_dir / "checkpoints" / "run.json", identity)
    metrics = _loop(run, groups, eval_groups, start, total, steps_per_epoch)
    peft_model.eval()
    record = run_record(trained, cfg, choice, lora_plan, metrics, steps=total,
                        world_size=acc.num_processes, data=data)
    if out_dir is not None and acc.is_main_process:
        _write_outputs(run, record, out_dir)
    acc.wait_for_everyone()
    return TrainResult(trained, choice, out_dir, total, metrics, record)


# ---- setup ---------------------------------------------------------------------------------


def _groups(pairs, what: str) -> list[QuestionGroup]:
    groups = load_groups(pairs) if isinstance(pairs, (str, Path)) else list(pairs)
    if not groups:
        raise DataError(f"no {what} question groups given")
    for g in groups:
        if not isinstance(g, QuestionGroup):
            raise MechloraError(f"{what} data must be a data file or QuestionGroups, "
                                f"got {type(g).__name__}")
        if len(g.variants) < 2:
            raise DataError(f"group {g.id!r} has one wording; a pair needs two",
                            file=g.source, line=g.line)
    return groups


def _accelerator(cfg: TrainConfig, model, device: str | None):
    from accelerate import Accelerator

    where = model.device.type if isinstance(model, Subject) else str(device or "")
    if where.startswith("cuda") and not torch.cuda.is_available():
        raise MechloraError(f"device {where} asked for, but no GPU is visible; use --device cpu")
    cpu = where == "cpu" or not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision="bf16" if cfg.bf16 and not cpu else "no")


def _prepare(out, overwrite: bool, resume: bool, acc) -> Path | None:
    if out is None:
        return None
    out = Path(out)
    if acc.is_main_process:
        prepare_out_dir(out, overwrite, resume=resume)
    acc.wait_for_everyone()
    return out


def _load(model: Subject | str, dtype, acc) -> Subject:
    from mechlora.models import load_model

    if isinstance(model, Subject):
        subject = model
    elif isinstance(model, str):
        dtype = dtype or ("bfloat16" if acc.device.type == "cuda" else "float32")
        subject = load_model(model, dtype=dtype, device=str(acc.device))
    else:
        raise MechloraError(f"model must be a name or a Subject (mechlora.wrap(model, "
                            f"processor)), got {type(model).__name__}")
    if hasattr(subject.model, "peft_config"):
        raise MechloraError(f"{subject.name} already carries a PEFT adapter; train on the base "
                            "model (merge the adapter first if you mean to stack them)")
    if any(p.is_meta for p in subject.model.parameters()):
        raise MechloraError(f"{subject.name} has no weights (meta device): it can only be "
                            "planned with --dry-run; train a real checkpoint, e.g. "
                            "google/medgemma-4b-it or a local folder")
    return subject


def _add_lora(subject: Subject, spec: LayerSpec, cfg: TrainConfig, rank: int):
    from peft import get_peft_model

    config = spec.lora_config(subject.layers_path, modules=cfg.modules, r=cfg.r,
                              alpha=cfg.alpha, dropout=cfg.dropout)
    torch.manual_seed(cfg.seed)  # the same LoRA init on every process
    with warnings.catch_warnings():  # PEFT reads a property transformers 5 deprecates
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        peft_model = get_peft_model(subject.model, config)
    peft_model.peft_config["default"].base_model_name_or_path = subject.name
    if rank:
        torch.manual_seed(cfg.seed + rank)  # but each process its own dropout masks
    base = subject.base
    if cfg.gradient_checkpointing:
        enable = getattr(base, "activation_checkpointing_enable", None) or \
            base.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    # transformers (and PEFT, for a model that arrives with checkpointing on) make the input
    # embeddings require grad, which only reentrant checkpointing needs: it would carry the
    # backward through every frozen layer below the lowest adapted one.
    if hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()
    return peft_model


def _scheduler(opt, cfg: TrainConfig, total: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
    return get_scheduler(name, opt, num_warmup_steps=cfg.warmup, num_training_steps=total)


# ---- which layers --------------------------------------------------------------------------


def resolve_layers(subject: Subject, groups: Sequence[QuestionGroup], layers: str | LayerSpec,
                   cfg: TrainConfig, from_localization=None, out: Path | None = None,
                   resume: bool = False, acc=None, progress: bool = True) -> LayerChoice:
    """`layers` -> a LayerChoice; "auto" selects from a localization, run here when not given."""
    n = subject.n_layers
    text = "" if isinstance(layers, LayerSpec) else str(layers).strip().lower()
    loc, path = None, None
    if from_localization is not None:
        loc, path = _load_localization(from_localization, n), str(from_localization)
    if isinstance(layers, LayerSpec):
        if layers.n_layers != n:
            raise MechloraError(f"the layer spec {layers} was made for {layers.n_layers} layers; "
                                f"{subject.name} has {n}")
        spec, how = layers, "explicit"
    elif text == "all":
        spec, how = LayerSpec.all(n), "all"
    elif text != "auto":
        spec, how = LayerSpec.parse(text, n), "explicit"
    else:
        select_layers(np.ones(n), cfg.rule)  # a mistyped rule fails before localizing
        here = out / "localization" if out is not None else None
        if loc is None and resume and here is not None and (here / "localization.json").is_file():
            loc, path = _load_localization(here, n), "localization"  # recorded by the first try
        if loc is None:
            loc = _localize_here(subject, groups, cfg, here, acc, progress)
            path = "localization" if here is not None else None
        selection = select_layers(loc.scores, cfg.rule)
        return LayerChoice(selection.spec, "auto", selection, loc, path,
                           localized_here=path == "localization")
    selection = select_layers(loc.scores, str(spec)) if loc is not None else None
    return LayerChoice(spec, how, selection, loc, path)


def _load_localization(path, n_layers: int) -> LocalizationResult:
    path = Path(path)
    if (path / "localization" / "localization.json").is_file():
        path = path / "localization"  # a training run's folder: use what it recorded
    loc = LocalizationResult.load(path)
    if loc.n_layers != n_layers:
        raise MechloraError(f"the localization in {path} was made on a model with {loc.n_layers} "
                            f"layers; this model has {n_layers}: localize this model first")
    return loc


def _localize_here(subject, groups, cfg: TrainConfig, here: Path | None, acc, progress: bool
                   ) -> LocalizationResult:
    from mechlora.localize import localize

    main = acc is None or acc.is_main_process
    if here is not None and not main:  # the main process localizes; the others read its result
        acc.wait_for_everyone()
        return LocalizationResult.load(here)
    rng = random.Random(cfg.seed)
    keep = sorted(rng.sample(range(len(groups)), min(cfg.localize_groups, len(groups))))
    sample = [groups[i] for i in keep]
    if progress and main:
        tqdm.write(f"layers auto: no localization given (--from), so localizing {len(sample)} of "
                   f"the {len(groups)} training groups first; rule {cfg.rule}")
    loc = localize(subject, make_pairs(sample, max_pairs_per_group=2, seed=cfg.seed),
                   progress=progress and main)
    if here is not None:
        loc.save(here)
        if acc is not None:
            acc.wait_for_everyone()
    return loc


def pair_terms(model, batcher: Batcher, pairs: Sequence[Pair], cfg: TrainConfig) -> LossTerms:
    """Loss terms of `pairs`; both wordings of all of them in one forward."""
    rows = [(p.group, p.a) for p in pairs] + [(p.group, p.b) for p in pairs]
    logits = first_token_logits(model, batcher.inputs(rows))
    choices = [batcher.choice_ids(p.group) for p in pairs]
    answer = torch.tensor([c[p.group.answer_index] for c, p in zip(choices, pairs, strict=True)],
                          device=logits.device)
    n = len(pairs)
    return consistency_loss(logits[:n], logits[n:], answer, choices, kl_weight=cfg.kl_weight,
                            temperature=cfg.kl_temperature, kl_over=cfg.kl_over)


# ---- the loop ------------------------------------------------------------------------------


@dataclass
class _Run:
    subject: Subject
    batcher: Batcher
    cfg: TrainConfig
    acc: Any
    params: list[tuple[str, torch.nn.Parameter]]
    opt: torch.optim.Optimizer
    sched: Any
    out: Path | None
    progress: bool


def optimizer_step(run: _Run, pairs: Sequence[Pair]) -> dict[str, float]:
    """One update from `pairs` (split over processes); loss/ce/kl are means over all pairs."""
    acc, cfg = run.acc, run.cfg
    mine = list(pairs)[acc.process_index::acc.num_processes]
    sums = torch.zeros(3, device=acc.device)
    size = cfg.micro_batch or max(1, len(mine))
    for start in range(0, len(mine), size):
        with acc.autocast():
            terms = pair_terms(run.subject.model, run.batcher, mine[start:start + size], cfg)
        acc.backward(terms.loss.sum() / len(pairs))
        sums += torch.stack([terms.loss.sum(), terms.ce.sum(), terms.kl.sum()]).detach()
    params = [p for _, p in run.params]
    if acc.num_processes > 1:
        sums = acc.reduce(sums, "sum")
        _sum_grads(params, acc)
    loss, ce, kl = (sums / len(pairs)).tolist()
    norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
    ok = math.isfinite(loss) and math.isfinite(norm)
    if ok:
        run.opt.step()
        run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    return {"loss": loss, "ce": ce, "kl": kl, "grad_norm": norm, "finite": ok}


def _sum_grads(params: list[torch.nn.Parameter], acc) -> None:
    # One flat all-reduce of the (small) LoRA gradients; a process with no pairs adds zeros.
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = acc.reduce(torch.cat([g.reshape(-1) for g in grads]), "sum")
    for p, g in zip(params, flat.split([q.numel() for q in params]), strict=True):
        p.grad = g.view_as(p)


def _loop(run: _Run, groups, eval_groups, start: int, total: int, per_epoch: int) -> list[dict]:
    cfg, acc = run.cfg, run.acc
    main = acc.is_main_process
    metrics = _read_metrics(run.out, start, main)
    bar = tqdm(total=total, initial=start, desc="train", unit="step",
               disable=not (run.progress and main))
    run.subject.model.train()
    if eval_groups and start == 0:
        metrics.append(_evaluate(run, eval_groups, 0, bar))
    epoch, drawn = -1, []
    for step in range(start, total):
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            drawn = epoch_pairs(groups, cfg.seed, epoch)
        k = step % per_epoch
        pairs = drawn[k * cfg.pairs_per_step:(k + 1) * cfg.pairs_per_step]
        lr = run.sched.get_last_lr()[0]
        t0 = time.perf_counter()
        stats = optimizer_step(run, pairs)
        seconds = time.perf_counter() - t0
        if not stats.pop("finite"):
            raise MechloraError(_non_finite(run, step + 1, stats, pairs))
        row = {"kind": "train", "step": step + 1, "epoch": epoch, **stats, "lr": lr,
               "pairs": len(pairs), "seconds": seconds, "pairs_per_s": len(pairs) / seconds}
        metrics.append(_log(run, row))
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", kl=f"{row['kl']:.3f}",
                        pairs_s=f"{row['pairs_per_s']:.1f}")
        end_of_epoch = (step + 1) % per_epoch == 0 or step + 1 == total
        due = (step + 1) % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch
        if eval_groups and due:  # before the checkpoint, so a resumed log has this row
            metrics.append(_evaluate(run, eval_groups, step + 1, bar))
        if run.out is not None and cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint(run, step + 1)
    bar.close()
    return metrics


def _non_finite(run: _Run, step: int, stats: dict, pairs: Sequence[Pair]) -> str:
    last = latest_checkpoint(run.out) if run.out is not None else None
    kept = (f"the last good checkpoint, {last}, is kept" if last is not None
            else "no checkpoint had been written yet")
    return (f"step {step}: the loss is not finite (loss {stats['loss']}, gradient norm "
            f"{stats['grad_norm']}; pairs {', '.join(p.id for p in pairs[:4])}...), so training "
            f"stopped before updating the weights; {kept}. Lower --lr (now {run.cfg.lr:g}), "
            "clip with --max-grad-norm, or train in float32 (--no-bf16)")


def _log(run: _Run, row: dict) -> dict:
    if run.out is not None and run.acc.is_main_process:
        with open(run.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return row


def _read_metrics(out: Path | None, upto: int, main: bool) -> list[dict]:
    """Rows logged up to step `upto` (the checkpoint resumed from); later ones are dropped."""
    path = out / "metrics.jsonl" if out is not None else None
    if path is None or not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    rows = [r for r in rows if 0 < upto and r["step"] <= upto]
    if main:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


@torch.no_grad()
def flip_check(subject: Subject, batcher: Batcher, groups: Sequence[QuestionGroup], *,
               rows_per_forward: int = 16) -> dict[str, Any]:
    """Pairwise flip rate, accuracy and mean |margin difference| over every group's wordings."""
    from mechlora.metrics import VariantPrediction, pair_table
    from mechlora.patching import margin

    rows = [(g, v) for g in groups for v in range(len(g.variants))]
    preds = []
    for start in range(0, len(rows), rows_per_forward):
        chunk = rows[start:start + rows_per_forward]
        logits = first_token_logits(subject.model, batcher.inputs(chunk)).float()
        for (g, v), z in zip(chunk, logits, strict=True):
            ids = batcher.choice_ids(g)
            preds.append(VariantPrediction(g.id, v, None, None, int(z[ids].argmax()),
                                           g.answer_index, float(margin(z, ids, g.answer_index))))
    table = pair_table(preds)
    return {"flip_rate": float(table.flip.mean()), "n_pairs": int(table.flip.size),
            "accuracy": sum(p.pred == p.answer for p in preds) / len(preds),
            "margin_diff": float(table.margin_absdiff.mean())}


def _evaluate(run: _Run, groups, step: int, bar) -> dict:
    model = run.subject.model
    model.eval()
    with run.acc.autocast():
        result = flip_check(run.subject, run.batcher, groups,
                            rows_per_forward=2 * (run.cfg.micro_batch or run.cfg.pairs_per_step))
    model.train()
    if run.progress and run.acc.is_main_process:
        bar.write(f"step {step}: eval flip rate {result['flip_rate']:.1%} over "
                  f"{result['n_pairs']} pairs, accuracy {result['accuracy']:.1%}")
    return _log(run, {"kind": "eval", "step": step, **result})


# ---- checkpoints ---------------------------------------------------------------------------


def checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints, oldest first (unfinished ones are hidden `.step-N.tmp` folders)."""
    done = [p for p in (out / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out: Path) -> Path | None:
    return (checkpoints(out) or [None])[-1]


def save_checkpoint(run: _Run, step: int) -> Path:
    """LoRA weights (safetensors), optimizer, scheduler and RNG states; written atomically."""
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    rng = gather_object([{"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()
                          if torch.cuda.is_available() else []}])
    final = run.out / "checkpoints" / f"step-{step}"
    if run.acc.is_main_process:
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in run.params},
                  str(tmp / "adapter.safetensors"))
        torch.save({"step": step, "optimizer": run.opt.state_dict(),
                    "scheduler": run.sched.state_dict(), "rng": rng}, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for stale in checkpoints(run.out)[:-run.cfg.keep_checkpoints]:
            shutil.rmtree(stale)
    run.acc.wait_for_everyone()
    return final


def _resume(run: _Run, identity: dict) -> int:
    """Load the last checkpoint of the run in `run.out`; the step to continue from (0: none)."""
    from safetensors.torch import load_file

    saved_path = run.out / "checkpoints" / "run.json"
    if not saved_path.is_file():
        if any(p.name != "localization" for p in run.out.iterdir()):
            raise MechloraError(f"{run.out} holds no resumable run (no checkpoints/run.json); "
                                "pass --overwrite to start over, or choose another --out")
        return 0
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    _check_same_run(saved, identity, run.out)
    last = latest_checkpoint(run.out)
    if last is None:
        return 0
    weights = load_file(str(last / "adapter.safetensors"))
    with torch.no_grad():
        for name, p in run.params:
            p.copy_(weights[name])
    state = torch.load(last / "state.pt", weights_only=True)
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    rank = run.acc.process_index
    if len(state["rng"]) == run.acc.num_processes:  # else: fresh dropout masks, still valid
        torch.set_rng_state(state["rng"][rank]["torch"])
        if state["rng"][rank]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"][rank]["cuda"])
    if run.progress and run.acc.is_main_process:
        tqdm.write(f"resuming from {last} (step {state['step']})")
    return int(state["step"])


def _check_same_run(saved: dict, now: dict, out: Path) -> None:
    diffs = [f"{k}: {saved[k]!r} then, {now[k]!r} now" for k in ("model", "spec", "data")
             if saved.get(k) != now[k]]
    old, new = saved.get("config", {}), now["config"]
    diffs += [f"{k}: {old.get(k)!r} then, {new[k]!r} now" for k in new
              if k not in RESUMABLE and old.get(k) != new[k]]
    if diffs:
        raise MechloraError(f"--resume: {out} was started with other settings ("
                            + "; ".join(diffs) + "); use the same ones, or start a new --out")


# ---- outputs -------------------------------------------------------------------------------


def _data(source, groups) -> dict | None:
    if groups is None:
        return None
    path = str(source) if isinstance(source, (str, Path)) else None
    return {"path": path, "sha256": data_hash(groups), "n_groups": len(groups)}


def _write_outputs(run: _Run, record: dict, out: Path) -> None:
    run.subject.model.save_pretrained(str(out), save_embedding_layers=False)
    processor = run.subject.processor
    if hasattr(processor, "save_pretrained"):
        processor.save_pretrained(str(out))
    write_json(out / "mechlora.json", record)
    (out / "README.md").write_text(model_card(record), encoding="utf-8")  # replaces PEFT's stub


# ---- dry run -------------------------------------------------------------------------------


def plan_training(model: Subject | str, *, layers: str | LayerSpec = "auto",
                  config: TrainConfig | None = None, pairs=None, from_localization=None) -> str:
    """What `train` would do, as text, without loading weights (the model is built on `meta`)."""
    cfg = (config or TrainConfig()).validate()
    subject = model if isinstance(model, Subject) else _meta_subject(model)
    groups = _groups(pairs, "training") if pairs is not None else None
    choice, lora_plan = None, None
    if str(layers).strip().lower() != "auto" or from_localization is not None:
        choice = resolve_layers(subject, groups or [], layers, cfg, from_localization,
                                progress=False)
        lora_plan = lora_plan_of(subject.base, choice.spec, subject.layers_path, cfg.modules, cfg.r)
    steps = cfg.steps(len(groups))[1] if groups is not None else None
    return plan_text(subject, choice, lora_plan, cfg, groups, steps)


def _meta_subject(name: str) -> Subject:
    from mechlora.models import PRESETS

    if name in PRESETS and name != "organism":
        with torch.device("meta"):
            model, processor = PRESETS[name]()
        return Subject(model, processor, name=name)
    if name in PRESETS:  # small, and built by training: load it for real
        from mechlora.models import load_model

        return load_model(name, device="cpu")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as e:
        raise MechloraError(f"cannot plan for '{name}': not a preset, not a local folder with "
                            f"config.json, and not in the local hub cache ({e})") from None
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else \
        AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return Subject(model, None, name=name)
