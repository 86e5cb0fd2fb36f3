"""`mechlora eval`: base model vs adapters on paraphrase consistency, accuracy and image use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechlora.cli import app


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Preset (tiny-gemma3-vlm, "
                                       "organism, ...), local model folder or hub id.")],
    pairs: Annotated[Path, typer.Option("--pairs", "-p", help="Paraphrase data file "
                                        "(.jsonl or .csv, see docs/data.md).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for eval.json, "
                                      "predictions.jsonl and report.html.")],
    adapter: Annotated[list[Path] | None, typer.Option(
        "--adapter", "-a", help="A PEFT LoRA adapter folder; repeat for several. Each is "
        "compared with the base model.")] = None,
    gray: Annotated[bool | None, typer.Option(
        "--gray/--no-gray", help="Also answer with a uniform gray image (text-only agreement). "
        "Default: when the model and data have images.")] = None,
    noimage: Annotated[bool, typer.Option(
        "--noimage", help="Also answer with the image removed from the prompt.")] = False,
    swap: Annotated[bool | None, typer.Option(
        "--swap/--no-swap", help="Also answer with another question's image (swap "
        "sensitivity). Default: when there are two or more distinct images.")] = None,
    decode: Annotated[bool, typer.Option(
        "--decode", help="Also record the greedy-decoded answer text.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to decode with --decode.")] = 16,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts per "
                                            "forward.")] = 16,
    n_boot: Annotated[int, typer.Option(help="Bootstrap replicates for the intervals (resampling "
                                        "questions; none below 5 questions).")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap and the image swap.")] = 0,
    merge_variants: Annotated[bool, typer.Option(
        help="Read each choice as all its case and leading-space variants (' yes', 'Yes', "
        "...), summing their probabilities (docs/metrics.md).")] = False,
    min_choice_mass: Annotated[float, typer.Option(
        help="Note an arm whose mean probability on the choices' tokens is below this: it is "
        "mostly not answering in the format asked (0.5 suits yes/no; a cloze needs less).")
    ] = 0.5,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto.")] = "auto",
    device: Annotated[str | None, typer.Option(help="cuda, cpu, ... (default: cuda if "
                                               "available).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the results in "
                                            "--out.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    feature_cache: Annotated[Path | None, typer.Option(
        help="Folder caching image features across runs (the vision tower is frozen).")] = None,
) -> None:
    """Evaluate a model and LoRA adapters: flip rate, accuracy, margins, text-only agreement.

    Writes OUT/eval.json (metrics with 95% intervals, tests against the base),
    OUT/predictions.jsonl (one row per model and wording) and OUT/report.html.

    Example: mechlora eval --model organism --pairs heldout.jsonl --adapter runs/a --out runs/ev
    """
    from rich.console import Console

    from mechlora.evaluate import evaluate
    from mechlora.report.eval import rich_table

    if feature_cache is not None:
        from mechlora.features import FeatureCache
        from mechlora.models import load_model

        model = load_model(model, device=device, dtype=dtype)
        model.feature_cache = FeatureCache(feature_cache)
    result = evaluate(model, pairs, adapters=adapter or (), gray=gray, noimage=noimage,
                      swap=swap, decode=decode, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, out=out, overwrite=overwrite, progress=progress,
                      n_boot=n_boot, seed=seed, device=device, dtype=dtype,
                      merge_variants=merge_variants, low_choice_mass=min_choice_mass)
    console = Console()
    if not console.is_terminal:  # a log file: one wide table rather than wrapped cells
        console = Console(width=240)
    console.print(rich_table(result.to_json()))
    for note in result.notes:
        console.print(f"note: {note}", style="yellow", highlight=False)
    console.print(f"wrote {out}/eval.json, predictions.jsonl, report.html", highlight=False)
