"""`mechlora demo` end to end, from scratch: time against its 10-minute CPU budget, and the result.

    python -m benchmarks.demo            # organism built first, in a fresh temporary home
    python -m benchmarks.demo --quick    # the reduced organism and demo (seconds; not accurate)

The organism is built in a temporary `MECHLORA_HOME`, so nothing cached is reused and the
user's cache is untouched; the demo then runs as `mechlora demo` does (one torch thread).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Row, machine

COMMAND = "python -m benchmarks.demo"
BUDGET_S = 600


def run(quick: bool) -> list[Row]:
    with tempfile.TemporaryDirectory() as home:
        os.environ["MECHLORA_HOME"] = home
        from mechlora.demo import DemoConfig, run_demo
        from mechlora.organism import read_meta

        wall, cpu = time.perf_counter(), time.process_time()
        summary = run_demo(Path(home) / "demo", DemoConfig(quick=quick), progress=False,
                           log=lambda msg: print(msg, file=sys.stderr, flush=True))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        build = read_meta(Path(summary["organism"]))["train_seconds"]
    flips = {arm: m["pairwise_flip_rate"]["value"] for arm, m in summary["eval"].items()
             if isinstance(m, dict) and "pairwise_flip_rate" in m}
    what = "`mechlora demo` from scratch" + (" (--quick organism)" if quick else "")
    return [
        Row(what, f"wall s (CPU {cpu:.0f} s; organism training {build:.0f} s)", f"{wall:.0f}",
            f"budget {BUDGET_S} s", f"{wall / BUDGET_S:.2f} of budget", COMMAND),
        Row(what, f"held-out pairwise flip rate: LoRA on window {summary['selection']['spec']}"
            " / on all layers", f"{flips['adapter-window']:.1%} / {flips['adapter-all']:.1%}",
            f"no adapter {flips['base']:.1%}", " / ".join(
                f"{flips[a] / flips['base']:.2f}x" if flips["base"] else "n/a"
                for a in ("adapter-window", "adapter-all")), COMMAND),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = run(args.quick)
    print(f"machine: {machine()}\n\n{Row.header()}")
    for row in rows:
        print(row.markdown())


if __name__ == "__main__":
    main()
