"""`mechlora select`: turn a localization's per-layer scores into a layer spec."""

from __future__ import annotations

from pathlib import Path

import typer

from mechlora.cli import app


@app.command()
def select(
    locdir: Path = typer.Argument(..., help="Folder written by `mechlora localize` (or a "
                                  "training run that localized)."),
    rule: str = typer.Option("window:5", "--rule", "-r", help="window:K | mass:P | topk:K | all "
                             "| a spec such as 15-19."),
) -> None:
    """Print the chosen layers (first line, for scripts) and why (second line).

    Example: mechlora train --layers "$(mechlora select runs/loc --rule mass:0.8 | head -1)" ...
    """
    from mechlora.result import LocalizationResult
    from mechlora.select import select_layers

    folder = locdir / "localization" if (locdir / "localization" / "localization.json").is_file() \
        else locdir
    selection = select_layers(LocalizationResult.load(folder).scores, rule)
    typer.echo(str(selection.spec))
    typer.echo(selection.reason)
