"""`mechlora demo`."""

from __future__ import annotations

from pathlib import Path

import typer

from mechlora.cli import app


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Output folder."),
    preset: str = typer.Option("organism-mid", help="The model organism (docs/organism.md)."),
    seed: int | None = typer.Option(None, help="Organism seed (default: the preset's @SEED, "
                                              "else 0); the training seeds start at it."),
    window: int = typer.Option(2, help="Width of auto's window, the early window and the "
                                       "random band."),
    seeds: int = typer.Option(2, help="Training seeds per arm (seed-level intervals need 2 or "
                                      "more)."),
    steps: int = typer.Option(100, help="Optimizer steps per adapter (the same for every arm)."),
    test_groups: int = typer.Option(200, help="Evaluate on the first N question groups of the "
                                              "held-out test file."),
    kl_weight: float = typer.Option(1.0, help="Weight of the symmetric-KL consistency term."),
    rebuild: bool = typer.Option(False, help="Retrain the model organism from scratch."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out folder."),
    resume: bool = typer.Option(False, help="Continue the demo in --out (same settings): reuse "
                                            "its localization, adapters and evaluations."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Does training the localized layers beat the alternatives? Asked offline, in minutes on
    a CPU, of a model organism whose answer depth is planted.

    Builds (or reuses) an organism (default organism-mid: a small Gemma 3 VLM trained here on
    synthetic chest films whose answer position cannot read the question before layer 4 of 8),
    which flips its answers on paraphrase families it never saw. Localizes its flip pairs and
    selects a window (auto); trains LoRA on auto, all layers, an early window and a random
    band of the same width, for every training seed at the same budget (mechlora compare);
    evaluates every adapter and the base on test films x a paraphrase family no training saw;
    writes OUT/report.html and OUT/demo.json. Rerun with --resume to continue an interrupted
    demo.
    """
    from mechlora.demo import DemoConfig, run_demo

    if quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()  # the model loader's own bars
    cfg = DemoConfig(preset=preset, seed=seed, window=window, seeds=seeds, steps=steps,
                     test_groups=test_groups, kl_weight=kl_weight, rebuild=rebuild)
    run_demo(out, cfg, overwrite=overwrite, resume=resume, progress=not quiet, log=typer.echo)
