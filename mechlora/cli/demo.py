"""`mechlora demo`."""

from __future__ import annotations

from pathlib import Path

import typer

from mechlora.cli import app


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Output folder."),
    steps: int = typer.Option(150, help="Optimizer steps per adapter arm (same for both)."),
    window: int = typer.Option(2, help="Width of the auto-selected layer window."),
    kl_weight: float = typer.Option(1.0, help="Weight of the symmetric-KL consistency term."),
    seed: int = typer.Option(0, help="Seed of the organism and the training runs."),
    rebuild: bool = typer.Option(False, help="Retrain the model organism from scratch."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """The whole method on the built-in model organism, offline, in minutes on a CPU.

    Builds (or reuses) a small Gemma 3 VLM trained here on synthetic chest films, which flips
    its answers on held-out paraphrases; localizes its flip pairs; selects a layer window;
    trains LoRA on that window and on all layers with the same budget; evaluates base, window
    and all on held-out images and held-out paraphrase families; writes OUT/report.html.
    """
    from mechlora.demo import DemoConfig, run_demo

    cfg = DemoConfig(seed=seed, window=window, steps=steps, kl_weight=kl_weight,
                     rebuild=rebuild)
    run_demo(out, cfg, overwrite=overwrite, progress=not quiet, log=typer.echo)
