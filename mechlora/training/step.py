"""One optimizer update: the loss of a step's pairs, its gradient, and the AdamW step.

Both wordings of every pair go through one forward, `micro_batch` pairs at a time (0: the whole
step); the loss is a mean over pairs, so the gradient does not depend on the micro-batch. Under
`accelerate launch` each process takes a share of the pairs and the LoRA gradients are summed
across processes, so the update does not depend on the process count either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechlora.batching import Batcher, first_token_logits
from mechlora.data import Pair
from mechlora.errors import MechloraError
from mechlora.loss import LossTerms, consistency_loss
from mechlora.models.subject import Subject
from mechlora.training.config import TrainConfig


@dataclass
class Run:
    """The state of a training run that its steps, checks and checkpoints share."""

    subject: Subject  # the model with LoRA
    batcher: Batcher
    cfg: TrainConfig
    acc: Any  # accelerate.Accelerator
    params: list[tuple[str, torch.nn.Parameter]]  # the trainable (LoRA) parameters
    opt: torch.optim.Optimizer
    sched: Any
    out: Path | None
    progress: bool
    micro_batch: int = 0  # pairs per forward now (halved after an out-of-memory error)
    oom: list[dict] = field(default_factory=list)  # the micro-batch halvings, as logged


def pair_terms(model, batcher: Batcher, pairs: Sequence[Pair], cfg: TrainConfig) -> LossTerms:
    """Loss terms of `pairs`; both wordings of all of them in one forward."""
    rows = [(p.group, p.a) for p in pairs] + [(p.group, p.b) for p in pairs]
    logits = first_token_logits(model, batcher.inputs(rows))
    choices = [batcher.choice_tokens(p.group) for p in pairs]
    answer = [c.ids[p.group.answer_index] for c, p in zip(choices, pairs, strict=True)]
    n = len(pairs)
    return consistency_loss(logits[:n], logits[n:], answer, choices, kl_weight=cfg.kl_weight,
                            temperature=cfg.kl_temperature, kl_over=cfg.kl_over)


def optimizer_step(run: Run, pairs: Sequence[Pair]) -> dict[str, Any]:
    """One update from `pairs` (split over processes); loss/ce/kl are means over all pairs.

    A non-finite loss or gradient norm leaves the weights as they were ("finite": False). An
    out-of-memory error halves the micro-batch and retries the step from the same random state
    (one process only: several would have to agree on it).
    """
    rng = _rng_state()
    while True:
        try:
            return _step(run, pairs)
        except torch.OutOfMemoryError:
            run.opt.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = run.micro_batch or _my_share(run, pairs)
            if size <= 1 or run.acc.num_processes > 1:
                raise MechloraError(_oom_advice(run, size)) from None
            run.oom.append({"from": size, "to": size // 2})
            run.micro_batch = size // 2
            _set_rng_state(rng)


def _my_share(run: Run, pairs: Sequence[Pair]) -> int:
    return len(list(pairs)[run.acc.process_index::run.acc.num_processes])


def _step(run: Run, pairs: Sequence[Pair]) -> dict[str, Any]:
    acc, cfg = run.acc, run.cfg
    mine = list(pairs)[acc.process_index::acc.num_processes]
    sums = torch.zeros(3, device=run.subject.device)
    size = run.micro_batch or max(1, len(mine))
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
    run.sched.step()  # a skipped update keeps the schedule in step with the step count
    run.opt.zero_grad(set_to_none=True)
    return {"loss": loss, "ce": ce, "kl": kl, "grad_norm": norm, "finite": ok}


def _sum_grads(params: list[torch.nn.Parameter], acc) -> None:
    # One flat all-reduce of the (small) LoRA gradients; a process with no pairs adds zeros.
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = acc.reduce(torch.cat([g.reshape(-1) for g in grads]), "sum")
    for p, g in zip(params, flat.split([q.numel() for q in params]), strict=True):
        p.grad = g.view_as(p)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _oom_advice(run: Run, size: int) -> str:
    where = (f"with {run.acc.num_processes} processes (they would all have to shrink together)"
             if run.acc.num_processes > 1 else f"even at {size} pair per forward")
    less = ([f"--micro-batch {size // 2}"] if size > 1 else []) + \
        ([] if run.cfg.gradient_checkpointing else ["--gradient-checkpointing"])
    again = ("Resume with the same command plus --resume and" if run.out is not None
             else "Run again with")
    return (f"out of memory {where}. {again} "
            + (f"less memory: {', '.join(less)}, or " if less else "")
            + "a GPU with more free memory (--device cuda:N); mechlora train --dry-run prints "
            "the estimated peak memory of each setting")
