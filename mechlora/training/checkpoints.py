"""Checkpoints and resume: OUT/checkpoints/run.json (what the run is) and step-N/ folders.

A resumed run must be the same run: same model, layers, data and every setting that changes
the weights, except those in `RESUMABLE` (memory, precision, learning rate, bookkeeping) and
the device and dtype, which a run that failed may need to change. Every resumption is
recorded in run.json (and so in mechlora.json) with what changed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mechlora.errors import MechloraError
from mechlora.io import is_mechlora_output, read_json, write_json
from mechlora.training.config import RESUMABLE
from mechlora.training.model import set_lr
from mechlora.training.step import Run

RUN_FILE = Path("checkpoints") / "run.json"
FIXED = ("model", "spec", "data")  # identity keys that can never change on resume


def checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints, oldest first (unfinished ones are hidden `.step-N.tmp` folders)."""
    done = [p for p in (out / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out: Path) -> Path | None:
    return (checkpoints(out) or [None])[-1]


def save_checkpoint(run: Run, step: int) -> Path:
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


def begin(run: Run, identity: dict, resume: bool) -> int:
    """Record a new run in run.json, or (`resume`) load the last checkpoint of the one in
    `run.out`; returns the step to continue from (0: from the start)."""
    path = run.out / RUN_FILE
    if resume and path.is_file():
        return _resume(run, identity, read_json(path))
    if resume and any(p.name not in ("localization", ".mechlora-output")
                      for p in run.out.iterdir()):
        how = ("pass --overwrite to start over" if is_mechlora_output(run.out)
               else "it was not made by mechlora, so choose another --out")
        raise MechloraError(f"{run.out} holds no resumable run (no {RUN_FILE}); {how}")
    if run.acc.is_main_process:
        write_json(path, {**identity, "resumptions": []})
    return 0


def _resume(run: Run, identity: dict, saved: dict) -> int:
    changed = _changes(saved, identity, run.out)
    last = latest_checkpoint(run.out)
    step = 0
    if last is not None:
        step = _load(run, last)
        if run.progress and run.acc.is_main_process:
            tqdm.write(f"resuming from {last} (step {step})")
    if "lr" in changed:
        set_lr(run.opt, run.sched, run.cfg.lr)
    if run.acc.is_main_process:
        resumptions = [*saved.get("resumptions", []), {"step": step, "changed": changed}]
        write_json(run.out / RUN_FILE, {**identity, "resumptions": resumptions})
    return step


def resumptions(out: Path | None) -> list[dict]:
    """The resumptions recorded for the run in `out` (each: step and what changed)."""
    path = out / RUN_FILE if out is not None else None
    return read_json(path).get("resumptions", []) if path and path.is_file() else []


def _changes(saved: dict, now: dict, out: Path) -> dict[str, dict]:
    """What changed since the run started; raises if anything outside `RESUMABLE` did."""
    fixed = [f"{k}: {saved.get(k)!r} then, {now[k]!r} now" for k in FIXED
             if saved.get(k) != now[k]]
    old, new = saved.get("config", {}), now["config"]
    fixed += [f"{k}: {old.get(k)!r} then, {new[k]!r} now" for k in new
              if k not in RESUMABLE and k in old and old[k] != new[k]]
    if fixed:
        raise MechloraError(f"--resume: {out} was started with other settings ("
                            + "; ".join(fixed) + f"); use the same ones (only "
                            f"{', '.join(RESUMABLE)}, device and dtype may change), or start "
                            "a new --out")
    changed = {k: {"then": old.get(k), "now": new[k]} for k in new
               if k in RESUMABLE and old.get(k) != new[k]}
    changed.update({k: {"then": saved.get(k), "now": now[k]} for k in ("device", "dtype")
                    if saved.get(k) != now.get(k)})
    return changed


def _load(run: Run, last: Path) -> int:
    from safetensors.torch import load_file

    weights = load_file(str(last / "adapter.safetensors"))
    with torch.no_grad():
        for name, p in run.params:
            p.copy_(weights[name])
    state = torch.load(last / "state.pt", weights_only=True, map_location="cpu")
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    rank = run.acc.process_index
    if len(state["rng"]) == run.acc.num_processes:  # else: fresh dropout masks, still valid
        torch.set_rng_state(state["rng"][rank]["torch"])
        if state["rng"][rank]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"][rank]["cuda"])
    return int(state["step"])
