"""The `mechlora` command line: one sub-command per pipeline step.

Each command lives in its own module and registers itself on `app`; user mistakes
(`MechloraError`) print one clear line and exit 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from mechlora.errors import MechloraError

app = typer.Typer(
    name="mechlora",
    help="Find where paraphrases diverge inside a (vision-)language model, then fix those "
    "layers with LoRA.\n\nPipeline: localize -> select -> train -> eval (or `mechlora demo`); "
    "`mechlora compare` pits layer choices against each other.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings wrap as paragraphs, not at their source lines
)


def _register() -> None:
    # Imported for their side effect of adding commands to `app`.
    import importlib

    for name in ("localize", "select", "train", "eval", "compare", "sae", "demo"):
        try:
            importlib.import_module(f"mechlora.cli.{name}")
        except ModuleNotFoundError as e:  # a command whose module is not written yet
            if e.name != f"mechlora.cli.{name}":
                raise


@app.callback()
def _root() -> None:
    """Find where paraphrases diverge inside a (vision-)language model, then fix those layers
    with LoRA. Pipeline: localize -> select -> train -> eval; `mechlora demo` runs it all."""


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        app(args=argv, prog_name="mechlora")  # click handles usage errors and --help itself
    except MechloraError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
