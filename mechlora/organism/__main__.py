"""`python -m mechlora.organism`: build (or reuse) an organism, print its folder or its figures.

    python -m mechlora.organism --preset organism-mid --seed 0 --report
    python -m mechlora.organism --preset organism-late@2 --json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from mechlora.errors import MechloraError


def main(
    preset: str = typer.Option("organism-mid", help="organism-mid, -early, -late, -w3, -full "
                               "(or organism = organism-mid), optionally with @SEED."),
    seed: int | None = typer.Option(None, help="Organism seed (default 0, or the preset's "
                                    "@SEED)."),
    out: Path | None = typer.Option(None, help="Build folder (default: the cache, "
                                    "$MECHLORA_HOME or ~/.cache/mechlora)."),
    quick: bool = typer.Option(False, help="The reduced organism for tests (seconds)."),
    rebuild: bool = typer.Option(False, help="Retrain even when the folder holds this build."),
    report: bool = typer.Option(False, help="Print the build's figures as a table."),
    as_json: bool = typer.Option(False, "--json", help="Print organism.json (without the file "
                                 "layout)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train an organism with a planted commit depth once, then reuse the cached folder.

    Prints the folder; `--report` adds its build time, accuracy and flip rates (test films,
    paraphrase families the organism never saw). See docs/organism.md.
    """
    from mechlora.organism import build_organism, read_meta

    folder = build_organism(out, preset=preset, seed=seed, rebuild=rebuild, quick=quick,
                            progress=not quiet)
    meta = read_meta(folder)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in meta.items() if k != "files"}, indent=1))
        return
    typer.echo(str(folder))
    if report:
        typer.echo(report_table(meta))


def report_table(meta: dict) -> str:
    """The figures of one build as a Markdown table."""
    cfg, check = meta["config"], meta["check"]
    rows = [
        ("preset", f"{meta['preset']} (seed {cfg['seed']})"),
        ("layers / commit / window", f"{cfg['layers']} / {cfg['commit']} / {cfg['window']}"),
        ("suffix tokens / reach", f"{meta['planted']['suffix_tokens']} / "
                                  f"{meta['planted']['reach']}"),
        ("build s (training s, training CPU s)", f"{meta['build_seconds']:.0f} "
         f"({meta['train_seconds']:.0f}, {meta['train_cpu_seconds']:.0f})"),
        ("accuracy, training phrasing", f"{check['accuracy_train_phrasing']:.1%} "
                                        f"({check['n_groups']} groups)"),
        ("accuracy, test families", f"{check['accuracy_heldout_paraphrases']:.1%}"),
        ("flip rate, test families", f"{check['flip_rate_heldout']:.1%} "
                                     f"({check['n_pairs']} pairs)"),
        *((f"flip rate, {p}", f"{v:.1%}") for p, v in check["flip_rate_by_phenomenon"].items()),
    ]
    return "\n".join(["| figure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def run(argv: list[str] | None = None) -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(main)
    try:
        app(args=argv, prog_name="python -m mechlora.organism")
    except MechloraError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
