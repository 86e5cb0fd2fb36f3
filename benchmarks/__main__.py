"""Run every CPU benchmark and write docs/benchmarks.md.

    python -m benchmarks            # the documented settings
    python -m benchmarks --quick    # fewer pairs/steps, to check that they all run

Each benchmark is a script that prints markdown (figures with the baseline measured in the same
run); this runs them one after another in fresh processes, so that one's memory and threads do
not affect the next, and records their output with the command that produced it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine
from mechlora.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
# (title, module, arguments, quick arguments)
BENCHMARKS = [
    ("Localize: exact engines on the tiny 34-layer VLM, and Gemma 3 270M vs TL/nnsight loops",
     "benchmarks.localize", [], ["--quick"]),
    ("Localize: every engine on the same sweep (hooks, nnsight, TransformerLens, attribution)",
     "benchmarks.localize_engines", ["--pairs", "2", "--threads", "1"],
     ["--pairs", "1", "--threads", "1", "--verify-top", "3"]),
    ("Localize heads and positions: mechlora vs TransformerLens and nnsight loops (Gemma 3 270M)",
     "benchmarks.heads", ["--pairs", "2", "--threads", "1", "--suffix", "4"],
     ["--tiny", "--pairs", "1", "--threads", "1"]),
    ("Image-feature cache: localize and eval with and without it, memory and disk",
     "benchmarks.features", ["--threads", "1"], ["--quick", "--threads", "1"]),
    ("Train: pairs/s and peak memory, layers 15-19 vs all, naive vs batched",
     "benchmarks.train", ["--steps", "5", "--threads", "1"], ["--steps", "1", "--threads", "1"]),
    ("Selectors: grad, snr and bi beside a localization of the same pairs",
     "benchmarks.selectors", ["--threads", "1"], ["--tiny", "--threads", "1"]),
    ("`mechlora demo` from scratch against its 10-minute budget", "benchmarks.demo", [],
     ["--quick"]),
    ("GPU localize script, CPU smoke run (`--tiny`)", "benchmarks.gpu_localize", ["--tiny"],
     ["--tiny", "--pairs", "1"]),
    ("GPU train script, CPU smoke run (`--tiny`)", "benchmarks.gpu_train", ["--tiny"],
     ["--tiny"]),
]


def tidy(body: str) -> str:
    """Move the JSON records some scripts print (one per line) under a collapsed block."""
    lines = body.splitlines()
    records = [line for line in lines if line.startswith("{")]
    if not records:
        return body
    rest = "\n".join(line for line in lines if not line.startswith("{")).strip()
    return (f"{rest}\n\n<details><summary>raw records (JSON lines)</summary>\n\n```\n"
            + "\n".join(records) + "\n```\n</details>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    parts = ["# Benchmarks\n",
             f"Written by `python -m benchmarks{' --quick' if args.quick else ''}` on "
             f"{time.strftime('%Y-%m-%d')}; machine: {machine()}. Each benchmark runs in a "
             "fresh process; every ratio is against a baseline measured in the same run, so "
             "read the ratios first: absolute CPU times move with the machine's load. Rerun "
             "this command to refresh the page (`--quick` checks that every script runs).\n",
             "GPU: `python -m benchmarks.gpu` runs the localize and train checks on one "
             "H100/H200 (MedGemma-4B architecture, random bf16 weights) and writes "
             "docs/benchmarks-gpu.md; `--tiny` runs the same scripts on CPU, as below. Peak "
             "memory on that architecture: docs/memory.md.\n"]
    for title, module, full, quick in BENCHMARKS:
        argv = quick if args.quick else full
        command = " ".join(["python -m", module, *argv])
        print(f"running: {command}", flush=True)
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        body = tidy(done.stdout.strip()) or "(no output)"
        if done.returncode != 0:
            body += f"\n\nFAILED (exit {done.returncode}):\n```\n{done.stderr[-2000:]}\n```"
        parts.append(f"## {title}\n\nCommand: `{command}` ({seconds:.0f} s)\n\n{body}\n")
        print(body, flush=True)
    atomic_write_text(args.out, "\n".join(parts))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
