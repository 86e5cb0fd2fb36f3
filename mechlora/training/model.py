"""The model a run trains: on its device, under accelerate, with LoRA, optimizer and schedule."""

from __future__ import annotations

import warnings

import torch

from mechlora.errors import MechloraError
from mechlora.models.subject import Subject
from mechlora.spec import LayerSpec
from mechlora.training.config import TrainConfig


def pick_device(model, device: str | None) -> torch.device:
    """Where to train: a loaded model's own device, else `device`, else cuda when visible."""
    if isinstance(model, Subject):
        return model.device
    try:
        where = torch.device(device) if device else None
    except RuntimeError:
        raise MechloraError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N"
                            ) from None
    if where is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if where.type == "cuda":
        if not torch.cuda.is_available():
            raise MechloraError(f"device {device} asked for, but no GPU is visible; use "
                                "--device cpu")
        if where.index is not None and where.index >= torch.cuda.device_count():
            raise MechloraError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) "
                                f"visible (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return where


def accelerator(cfg: TrainConfig, where: torch.device):
    """accelerate's Accelerator for a run on `where` (cuda:N becomes the current GPU).

    A single process on cuda:N makes N the current device, since accelerate places a
    one-process run on "cuda", the current one. Under `accelerate launch` each process gets
    its own GPU, so an explicit index is refused there.
    """
    from accelerate import Accelerator, PartialState

    cpu = where.type != "cuda"
    if not cpu:
        if where.index is not None:
            if PartialState(cpu=False).num_processes > 1:
                raise MechloraError(f"--device {where} with several processes: accelerate gives "
                                    "each process its own GPU; choose them with "
                                    "CUDA_VISIBLE_DEVICES instead")
            torch.cuda.set_device(where)
    return Accelerator(cpu=cpu, mixed_precision="bf16" if cfg.bf16 and not cpu else "no")


def concrete(where: torch.device) -> torch.device:
    """cuda -> cuda:N, the GPU accelerate made current for this process."""
    if where.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return where


def load_subject(model: Subject | str, dtype, device: torch.device,
                 trust_remote_code: bool = False) -> Subject:
    from mechlora.models import load_model

    if isinstance(model, Subject):
        subject = model
    elif isinstance(model, str):
        dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
        subject = load_model(model, dtype=dtype, device=str(device),
                             trust_remote_code=trust_remote_code)
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


def add_lora(subject: Subject, spec: LayerSpec, cfg: TrainConfig, rank: int,
             ranks: dict[int, int] | None = None):
    """Wrap the subject's model in PEFT (in place) with LoRA on `spec`'s layers only
    (`ranks`: per-layer ranks, e.g. from `--match-params`; the others get `cfg.r`)."""
    from peft import get_peft_model

    config = spec.lora_config(subject.layers_path, modules=cfg.modules, r=cfg.r,
                              alpha=cfg.alpha, dropout=cfg.dropout, ranks=ranks)
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


def remove_lora(peft_model, gradient_checkpointing: bool):
    """The base model as it was before `add_lora` (LoRA layers out, checkpointing off)."""
    base = peft_model.unload()
    if gradient_checkpointing:
        (getattr(base, "activation_checkpointing_disable", None)
         or base.gradient_checkpointing_disable)()
    return base


def optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, total: int):
    """AdamW and its learning-rate schedule over `total` updates."""
    from transformers import get_scheduler

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    name = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
    return opt, get_scheduler(name, opt, num_warmup_steps=cfg.warmup, num_training_steps=total)


def set_lr(opt, sched, lr: float) -> None:
    """A new peak learning rate for a resumed run; the schedule keeps its shape and position."""
    sched.base_lrs = [lr] * len(opt.param_groups)
    for group, factor in zip(opt.param_groups, sched.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]
