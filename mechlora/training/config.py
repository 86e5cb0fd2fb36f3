"""`TrainConfig`: every hyperparameter of a run (the defaults are the published recipe)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from mechlora.errors import MechloraError
from mechlora.loss import KL_OVER
from mechlora.spec import DEFAULT_ALPHA, DEFAULT_DROPOUT, DEFAULT_MODULES, DEFAULT_R

SCHEDULES = ("linear", "cosine", "constant")
# What a resumed run may change: bookkeeping, memory and precision, the learning rate and the
# non-finite tolerance (what a failed run's advice asks for). Every change is recorded.
RESUMABLE = ("save_every", "keep_checkpoints", "eval_every", "micro_batch",
             "gradient_checkpointing", "bf16", "lr", "skip_nonfinite")


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
    merge_variants: bool = False  # read each choice as all its case/space variants (choices.py)
    seed: int = 0
    save_every: int = 100  # steps between checkpoints; 0: none
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps between flip-rate checks on eval pairs; 0: each epoch's end
    gradient_checkpointing: bool = False
    bf16: bool = True  # bf16 autocast when training on a GPU
    skip_nonfinite: int = 0  # updates with a non-finite loss skipped before stopping
    rule: str = "window:5"  # layers="auto": how localization scores become a spec
    match_params: str | None = None  # a spec whose LoRA count at rank r the layers must hold
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
            (self.skip_nonfinite >= 0, "--skip-nonfinite must be 0 (stop at the first) or more"),
            (self.localize_groups >= 1, "--localize-groups must be at least 1"),
            (self.match_params is None or bool(str(self.match_params).strip()),
             "--match-params must be a layer spec such as 15-19"),
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
