"""Training throughput and peak memory on the tiny VLM (34 layers, CPU, fp32).

    python benchmarks/train.py --steps 5 --threads 1

Layers 15-19 vs all, each fed `naive` (one pair per forward, 8 accumulated) and `batched`
(the 8 pairs of an update in one forward). Each setting runs in its own process, so the peak
resident memory (ru_maxrss) is that setting's own; "training" is the peak minus the memory
held once the model and data are loaded. The GPU version is benchmarks/gpu_train.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(layers: str, mode: str, steps: int, warmup: int, threads: int) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from gpu_train import measure, tiny_subject, write_data

    from mechlora.data import load_groups

    torch.set_num_threads(threads)
    subject = tiny_subject("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        groups = load_groups(write_data(Path(tmp), 8 * (steps + warmup), 32))
        loaded = rss_mb()
        result = measure(subject, groups, layers, mode, steps, warmup)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({**result, "peak_rss_mb": peak, "training_mb": peak - loaded,
                      "threads": threads}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed updates per setting")
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--child", nargs=2, metavar=("LAYERS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.steps, args.warmup, args.threads)
    rows = []
    for layers in ("15-19", "all"):
        for mode in ("naive", "batched"):
            out = subprocess.run([sys.executable, __file__, "--child", layers, mode,
                                  "--steps", str(args.steps), "--warmup", str(args.warmup),
                                  "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| layers | mode | pairs/s | step (8 pairs) | peak RSS | training |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['mode']} | {r['pairs_per_s']:.2f} | "
              f"{r['step_ms_median']:.0f} ms | {r['peak_rss_mb']:.0f} MB | "
              f"{r['training_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
