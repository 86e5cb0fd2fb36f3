"""`mechlora demo` end to end, from scratch: time against its 10-minute CPU budget, and the result.

    python -m benchmarks.demo            # organism built first, in a fresh temporary home
    python -m benchmarks.demo --quick    # reduced organism, tiny demo: seconds, not accurate

The organism is built in a temporary `MECHLORA_HOME`, so nothing cached is reused and the
user's cache is untouched; the demo then runs as `mechlora demo` does (one torch thread). Wall
and CPU seconds are both reported, with the load average before and after: on a shared machine
the wall time says as much about the neighbours as about the demo.
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
QUICK = dict(quick=True, steps=2, localize_groups=4, pairs_per_group=2, test_groups=20)


def run(quick: bool) -> tuple[list[Row], str]:
    """The timing rows, and the demo's result (markdown: its per-arm table and verdict)."""
    from mechlora.io import read_json
    from mechlora.report.demo import headline_table, verdict

    command = COMMAND + (" --quick" if quick else "")
    with tempfile.TemporaryDirectory() as home:
        os.environ["MECHLORA_HOME"] = home
        from mechlora.demo import DemoConfig, run_demo
        from mechlora.organism import read_meta

        load0 = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        summary = run_demo(Path(home) / "demo", DemoConfig(**(QUICK if quick else {})),
                           progress=False, log=lambda msg: print(msg, file=sys.stderr,
                                                                 flush=True))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        load1 = os.getloadavg()[0]
        meta = read_meta(Path(summary["organism"]["path"]))
        doc = read_json(Path(home) / "demo" / "compare" / "compare.json")
    header, rows = headline_table(doc, list(doc["arms"]))
    data = summary["data"]
    result = "\n".join([
        f"The demo's result in this run: {summary['localization']['n_pairs']} flip pairs "
        f"localized, {summary['localization']['selection']['reason']}; evaluated on "
        f"{data['test_subsample']} ({data['test_family']}, test films: "
        f"{doc['data']['eval']['n_variants']} wordings); mean over the training seeds "
        f"{doc['seeds']} [95% interval resampling seeds and questions].", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        *("| " + " | ".join(map(str, row)) + " |" for row in rows), "",
        verdict(doc, list(doc["arms"])), "", "\n\n".join(doc["notes"])])
    seconds, arms = summary["seconds"], summary["arms"]
    base = summary["base"]["metrics"]["original_flip_rate"]["mean"]
    flips = {name: a["metrics"]["original_flip_rate"]["mean"] for name, a in arms.items()}
    what = "`mechlora demo` from scratch" + (" (--quick)" if quick else "")
    sel = summary["localization"]["selection"]
    return [
        Row(what, f"wall s (CPU {cpu:.0f} s of this process; load average {load0:.1f} before, "
            f"{load1:.1f} after)", f"{wall:.0f}", f"budget {BUDGET_S} s",
            f"{wall / BUDGET_S:.2f} of budget", command),
        Row(what, "wall s per phase: organism build (its training CPU s) / localize / compare "
            "(train + evaluate every arm and seed)",
            f"{seconds['organism']:.0f} ({meta['train_cpu_seconds']:.0f}) / "
            f"{seconds['localize']:.0f} / {seconds['compare']:.0f}", "", "", command),
        Row(what, "training s per step (" + ", ".join(arms) + ")",
            " / ".join(f"{a['seconds_per_step']:.3f}" for a in arms.values()),
            f"{summary['config']['pairs_per_step']} pairs per step", "", command),
        Row(what, f"held-out flip rate vs original ({', '.join(flips)}; auto = {sel['spec']})",
            " / ".join(f"{f:.1%}" for f in flips.values()), f"no adapter {base:.1%}",
            " / ".join(f"{f / base:.2f}x" if base else "n/a" for f in flips.values()), command),
    ], result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the reduced organism and a tiny demo: seconds, not accurate")
    args = parser.parse_args()
    rows, result = run(args.quick)
    print(f"machine: {machine()}, {os.cpu_count()} cores. CPU seconds are what the demo needs "
          "on a free core (it runs one torch thread); on a shared machine the wall time also "
          f"counts the neighbours.\n\n{Row.header()}")
    for row in rows:
        print(row.markdown())
    print(f"\n{result}")


if __name__ == "__main__":
    main()
