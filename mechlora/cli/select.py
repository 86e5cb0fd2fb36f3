"""`mechlora select`: per-layer scores (localization or a rival selector) -> a layer spec."""

from __future__ import annotations

from pathlib import Path

import typer

from mechlora.cli import app
from mechlora.spec import DEFAULT_MODULES, DEFAULT_R


@app.command()
def select(
    source: Path = typer.Argument(None, help="A localization folder (from `mechlora localize`, "
                                  "or a training run that localized) or a saved selection "
                                  "(selection.json or its folder). Omit it to compute scores "
                                  "with --scores and --model."),
    rule: str = typer.Option(None, "--rule", "-r", help="How scores become layers: window:K | "
                             "mass:P | topk:K | all | a spec such as 15-19; or a whole selector: "
                             "grad:K, snr:K, bi:K (top K), grad:window:5, early:K, middle:K, "
                             "late:K, random:K (scattered), randband:K (contiguous). Default: "
                             "window:5 on localization scores, topk:5 on grad/snr/bi."),
    scores: str = typer.Option(None, "--scores", "-s", help="grad | snr | bi | localization: "
                               "compute these scores on --model (grad, bi and localization "
                               "also need --pairs)."),
    model: str = typer.Option(None, "--model", "-m", help="Preset, local model folder or HF hub "
                              "id (from the local cache), for --scores and the bands."),
    pairs: Path = typer.Option(None, "--pairs", "-p", help="Paraphrase data (JSONL or CSV, see "
                               "docs/data.md) for grad, bi and localization scores."),
    out: Path = typer.Option(None, "--out", "-o", help="Write the selection here: a .json file, "
                             "or a folder that gets selection.json."),
    seed: int = typer.Option(0, help="Seed of random:K / randband:K, of the pairs grad and bi "
                             "draw, and of grad's LoRA init."),
    batch_size: int = typer.Option(None, help="Pairs (grad, default 8) or prompts (bi, default "
                                   "16) per forward."),
    pairs_per_group: int = typer.Option(1, help="grad and bi: seeded pairs of wordings drawn per "
                                        "question group, as a training epoch draws one (0: "
                                        "every pair)."),
    r: int = typer.Option(DEFAULT_R, "--r", help="LoRA rank of the grad probe (the recipe's)."),
    modules: str = typer.Option(",".join(DEFAULT_MODULES), help="Projections grad and snr read, "
                                "comma separated."),
    dtype: str = typer.Option("auto", help="float32 | bfloat16 | float16 | auto."),
    device: str = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub folder."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Print the chosen layers (first line, for scripts), why (second line), and whether they
    carry the divergence (sufficiency and necessity, when a localization measured them or
    --scores localization computes them).

    Examples:

        mechlora select runs/loc --rule mass:0.8

        mechlora select --scores grad --model organism --pairs train.jsonl --out runs/grad.json

        mechlora select runs/grad.json --rule window:5

        mechlora train --layers "$(mechlora select runs/loc | head -1)" ...
    """
    from mechlora.errors import MechloraError
    from mechlora.select import load_selection, parse_selector

    target = _out_path(out, overwrite)
    effect = None
    if source is not None:
        if scores is not None or model is not None:
            raise MechloraError("give either SOURCE (saved scores) or --scores/--model "
                                "(scores computed now), not both")
        selection = load_selection(source, rule)
        effect = _saved_effect(source, selection)
    else:
        if model is None:
            raise MechloraError("give SOURCE (a localization folder or a saved selection), or "
                                "--model with --scores or a band such as --rule early:5")
        selector = _selector(scores, rule)
        needs, _ = parse_selector(selector)
        selection, subject = _compute(selector, needs, model, pairs, seed, batch_size,
                                      pairs_per_group, r, modules, dtype, device,
                                      trust_remote_code, quiet)
        if needs == "localization":  # the pairs and model are at hand: measure it now
            from mechlora.interventions import spec_effect

            effect = spec_effect(subject, pairs, selection.spec, progress=not quiet)
    typer.echo(str(selection.spec))
    typer.echo(selection.reason)
    if isinstance(effect, str):
        typer.echo(effect)
    elif effect is not None:
        typer.echo(effect.text())
    if target is not None:
        written = selection.save(target)
        typer.echo(f"wrote {written}")


def _selector(scores: str | None, rule: str | None) -> str:
    """--scores and --rule as one selector string."""
    from mechlora.errors import MechloraError
    from mechlora.select import ALIASES, SCORE_SOURCES, on_source, parse_selector

    if scores is None:
        if rule is None:
            raise MechloraError("say which scores (--scores grad|snr|bi|localization) or give a "
                                "--rule such as early:5 or random:5")
        return rule
    name = ALIASES.get(scores.strip().lower(), scores.strip().lower())
    if name not in SCORE_SOURCES:
        raise MechloraError(f"--scores {scores}: use one of {', '.join(SCORE_SOURCES)}")
    if rule is None:
        return name
    selector = on_source(rule, name)
    source, _ = parse_selector(selector)
    if source not in (None, name):
        raise MechloraError(f"--rule {rule} reads {source} scores but --scores is {name}; "
                            f"drop one of them")
    return selector


def _compute(selector, needs, model, pairs, seed, batch_size, pairs_per_group, r, modules,
             dtype, device, trust_remote_code, quiet):
    from mechlora.errors import MechloraError
    from mechlora.models import load_model
    from mechlora.selectors import choose_layers

    if needs in ("grad", "bi", "localization") and pairs is None:
        raise MechloraError(f"{needs} scores need paraphrase pairs: give --pairs")
    subject = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    names = tuple(m.strip() for m in modules.split(",") if m.strip())
    options = {"grad": dict(r=r, modules=names), "snr": dict(modules=names), "bi": {},
               "localization": {}}.get(needs, {})
    if pairs_per_group < 0:
        raise MechloraError("--pairs-per-group must be 0 (every pair) or more")
    if needs in ("grad", "bi"):
        options["pairs_per_group"] = pairs_per_group or None
        if batch_size is not None:
            options["batch_size"] = batch_size
    return (choose_layers(selector, subject, pairs, seed=seed, progress=not quiet, **options),
            subject)


def _saved_effect(source: Path, selection):
    """The sufficiency/necessity a localization run measured for the selected spec, or a
    line saying how to measure it (None without a localization behind SOURCE)."""
    from mechlora.interventions import localization_folder, measured_effect

    folder = localization_folder(source, selection)
    if folder is None:
        return None
    effect = measured_effect(folder, selection.spec)
    if effect is not None:
        return effect
    return (f"sufficiency/necessity of {selection.spec}: not measured in {folder}; rerun "
            f"mechlora localize with --spec {selection.spec} (--spec auto tests what --rule "
            "selects)")


def _out_path(out: Path | None, overwrite: bool) -> Path | None:
    from mechlora.errors import MechloraError
    from mechlora.select import FILE_NAME

    if out is None:
        return None
    path = out if out.suffix.lower() == ".json" else out / FILE_NAME
    if path.exists() and not overwrite:
        raise MechloraError(f"{path} already exists; pass --overwrite to replace it or choose "
                            "another --out")
    if out.suffix.lower() != ".json" and out.exists() and not out.is_dir():
        raise MechloraError(f"{out} exists and is not a folder; choose another --out")
    return path
