"""The GPU checks of localize and train in one command (one H100/H200, under 8 minutes).

    python -m benchmarks.gpu            # on the GPU machine: writes docs/benchmarks-gpu.md
    python -m benchmarks.gpu --tiny     # the same scripts on CPU with tiny models

Runs benchmarks/gpu_localize.py (MedGemma-4B architecture, random bf16 weights, 3 sites x 34
layers, pairs/s, peak memory, agreement with the `full` engine; with 2 and with 4 wordings per
question) and benchmarks/gpu_train.py
(pairs/s and peak memory of a LoRA step, layers 15-19 vs all), each in a fresh process.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (smoke run)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or ROOT / "docs" / ("benchmarks-gpu-tiny.md" if args.tiny
                                        else "benchmarks-gpu.md")
    extra = ["--tiny"] if args.tiny else []
    parts = [f"# GPU benchmarks\n\n`python -m benchmarks.gpu {' '.join(extra)}` on "
             f"{time.strftime('%Y-%m-%d')}; machine: {machine()}.\n"]
    # Two wordings per question (every recipient has one donor), then four (three donors share
    # each recipient's step, as with a paraphrase set like PSF-Med's).
    runs = [("benchmarks.gpu_localize", []), ("benchmarks.gpu_localize", ["--wordings", "4"]),
            ("benchmarks.gpu_train", [])]
    for module, argv in runs:
        command = " ".join(["python -m", module, *extra, *argv])
        print(f"running: {command}", flush=True)
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", module, *extra, *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=420)
        body = done.stdout.strip()
        if done.returncode != 0:
            body += f"\n\nFAILED (exit {done.returncode}):\n```\n{done.stderr[-2000:]}\n```"
        parts.append(f"## `{command}` ({time.perf_counter() - t0:.0f} s)\n\n```\n{body}\n```\n")
        print(body, flush=True)
    atomic_write_text(out, "\n".join(parts))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
