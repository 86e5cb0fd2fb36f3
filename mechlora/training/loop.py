"""The training loop: draw each epoch's pairs, step, log, check on held-out data, checkpoint.

Every row goes to OUT/metrics.jsonl as it happens (schema in docs/train.md): "train" rows (one
per update, `skipped` when a non-finite update was stepped over), "eval" rows (held-out
checks), "oom" rows (the micro-batch halved) and "warning" rows (the collapse guards).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from mechlora.batching import epoch_pairs
from mechlora.data import Pair, QuestionGroup
from mechlora.errors import MechloraError
from mechlora.io import atomic_write_text, read_jsonl
from mechlora.training import step as steps
from mechlora.training.checkpoints import latest_checkpoint, save_checkpoint
from mechlora.training.guards import answer_share, choice_collapse, kl_dominance
from mechlora.training.heldout import heldout_check
from mechlora.training.step import Run


def train_loop(run: Run, groups: Sequence[QuestionGroup],
               eval_groups: Sequence[QuestionGroup] | None, start: int) -> list[dict]:
    """Updates `start + 1` .. the run's last; returns every metrics row of the run."""
    cfg, main = run.cfg, run.acc.is_main_process
    per_epoch, total = cfg.steps(len(groups))
    metrics = read_log(run.out, start, main)
    bar = tqdm(total=total, initial=start, desc="train", unit="step",
               disable=not (run.progress and main))
    run.subject.model.train()
    if eval_groups and not any(r["kind"] == "eval" and r["step"] == 0 for r in metrics):
        _check(run, eval_groups, 0, metrics, bar)  # the adapter starts as the identity: the base
    epoch, drawn = -1, []
    for step in range(start, total):
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            drawn = epoch_pairs(groups, cfg.seed, epoch)
        k = step % per_epoch
        pairs = drawn[k * cfg.pairs_per_step:(k + 1) * cfg.pairs_per_step]
        lr = run.sched.get_last_lr()[0]
        t0 = time.perf_counter()
        n_oom = len(run.oom)
        stats = steps.optimizer_step(run, pairs)
        seconds = time.perf_counter() - t0
        for event in run.oom[n_oom:]:
            metrics.append(_log(run, {"kind": "oom", "step": step + 1, "micro_batch": event}))
            bar.write(f"step {step + 1}: out of memory; micro-batch {event['from']} -> "
                      f"{event['to']} pairs, step retried", file=sys.stderr)
        finite = stats.pop("finite")
        if not finite:
            skipped = sum(1 for r in metrics if r.get("skipped"))
            if skipped >= cfg.skip_nonfinite:
                raise MechloraError(_non_finite(run, step + 1, stats, pairs, skipped))
            stats = {k: v if math.isfinite(v) else None for k, v in stats.items()}
        row = {"kind": "train", "step": step + 1, "epoch": epoch, **stats, "lr": lr,
               "pairs": len(pairs), "seconds": seconds, "pairs_per_s": len(pairs) / seconds,
               "skipped": not finite}
        metrics.append(_log(run, row))
        bar.update(1)
        if finite:
            bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}",
                            kl=f"{row['kl']:.3f}", pairs_s=f"{row['pairs_per_s']:.1f}")
        else:
            bar.write(f"step {step + 1}: non-finite loss, update skipped "
                      f"({sum(1 for r in metrics if r.get('skipped'))} of at most "
                      f"{cfg.skip_nonfinite})", file=sys.stderr)
        last = step + 1 == total
        end_of_epoch = (step + 1) % per_epoch == 0 or last
        due = (step + 1) % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch
        if eval_groups and (due or last):  # before the checkpoint, so a resumed log has it
            _check(run, eval_groups, step + 1, metrics, bar)
        if last:
            _warn(run, metrics, "kl_dominance",
                  kl_dominance([r for r in metrics if r["kind"] == "train"], cfg.kl_weight),
                  step + 1, bar)
        if run.out is not None and cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint(run, step + 1)
    bar.close()
    return metrics


def _check(run: Run, groups, step: int, metrics: list[dict], bar) -> None:
    row = heldout_check(run, groups, step)
    metrics.append(_log(run, row))
    if run.progress and run.acc.is_main_process:
        bar.write(f"step {step}: eval flip rate {row['flip_rate']:.1%} over {row['n_pairs']} "
                  f"pairs, accuracy {row['accuracy']:.1%}")
    base = next((r for r in metrics if r["kind"] == "eval" and r["step"] == 0), None)
    if step > 0:
        _warn(run, metrics, "choice_collapse",
              choice_collapse(row, base, answer_share(groups)[1]), step, bar)


def _warn(run: Run, metrics: list[dict], guard: str, message: str | None, step: int,
          bar) -> None:
    """Log a guard's warning once per run (always printed, even with --quiet)."""
    if message is None or any(r.get("guard") == guard for r in metrics):
        return
    metrics.append(_log(run, {"kind": "warning", "step": step, "guard": guard,
                              "message": message}))
    if run.acc.is_main_process:
        bar.write(f"warning: {message}", file=sys.stderr)


def _non_finite(run: Run, step: int, stats: dict, pairs: Sequence[Pair], skipped: int) -> str:
    last = latest_checkpoint(run.out) if run.out is not None else None
    kept = (f"the last good checkpoint, {last}, is kept" if last is not None
            else "no checkpoint had been written yet")
    done = f" after skipping {skipped} such updates" if skipped else ""
    resume = ("resume with the same command plus --resume and" if run.out is not None
              else "run again with")
    fp32 = (", or --dtype float32 --no-bf16 to compute in float32"
            if run.subject.device.type == "cuda" else "")
    return (f"step {step}: the loss is not finite (loss {stats['loss']}, gradient norm "
            f"{stats['grad_norm']}; pairs {', '.join(p.id for p in pairs[:4])}...){done}, so "
            f"training stopped before updating the weights; {kept}. To go on, {resume} a lower "
            f"--lr (now {run.cfg.lr:g}), or --skip-nonfinite {max(1, 2 * skipped)} to step over "
            f"such updates (each is logged){fp32}")


def _log(run: Run, row: dict) -> dict:
    if run.out is not None and run.acc.is_main_process:
        with open(run.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return row


def read_log(out: Path | None, upto: int, main: bool) -> list[dict]:
    """Rows logged up to step `upto` (the checkpoint resumed from); later ones are dropped."""
    path = out / "metrics.jsonl" if out is not None else None
    if path is None or not path.is_file():
        return []
    rows = read_jsonl(path)
    rows = [r for r in rows if 0 < upto and r["step"] <= upto]
    if main:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows
