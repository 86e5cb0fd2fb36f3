"""Shared benchmark helpers: a timer, the machine's description, markdown rows."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import torch


@dataclass
class Row:
    benchmark: str
    what: str
    value: str
    baseline: str
    ratio: str
    command: str

    @staticmethod
    def header() -> str:
        return ("| benchmark | what | figure | baseline (same run) | ratio | command |\n"
                "|---|---|---|---|---|---|")

    def markdown(self) -> str:
        return (f"| {self.benchmark} | {self.what} | {self.value} | {self.baseline} | "
                f"{self.ratio} | `{self.command}` |")


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
            f"threads, torch {torch.__version__}")


def timed(fn, *, repeat: int = 1):
    """(result, best seconds) over `repeat` runs; GPU work is synchronised."""
    best, result = float("inf"), None
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return result, best
