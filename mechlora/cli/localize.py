"""`mechlora localize`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from mechlora.cli import app
from mechlora.probes import COMPONENTS


@app.command()
def localize(
    model: str = typer.Option("tiny-gemma3-vlm", "--model", "-m",
                              help="Preset name (tiny-gemma3-vlm, tiny-gemma3-text, organism), "
                              "local model folder, or HF hub id (from the local cache)."),
    pairs: Path = typer.Option(None, "--pairs", "-p",
                               help="Paraphrase data (JSONL or CSV; see docs/data.md). "
                               "Default: the bundled example."),
    out: Path = typer.Option(Path("runs/localize"), "--out", "-o", help="Output folder."),
    sites: str = typer.Option(
        ",".join(COMPONENTS), help="Components to patch: resid,attn,mlp, and z for every "
        "attention head; TransformerLens names work too (hook_resid_post, hook_attn_out, "
        "hook_mlp_out, attn.hook_z, or blocks.{l}.NAME)."),
    heads: bool = typer.Option(False, "--heads", help="Also patch each attention head alone "
                               "(the input of o_proj split by head): a head x layer heatmap."),
    per_position: bool = typer.Option(
        False, "--per-position", help="Also patch each aligned position of --positions "
        "suffix:K (or image) alone: a position x layer heatmap."),
    spec: list[str] = typer.Option(
        None, "--spec", help="Layer specs whose attn+mlp outputs are patched all at once, "
        "for sufficiency (denoising) and necessity (noising; and as 1 - what every layer "
        "outside the spec restores): auto (what --rule selects; the "
        "default when --sites has resid, attn or mlp), all, or e.g. 15-19; repeat the option "
        "for several, 'none' for no test."),
    by: str = typer.Option(None, "--by", help="type | phenomenon: scores, intervals and a "
                           "selection per question type or paraphrase phenomenon."),
    adapter: Path = typer.Option(None, "--adapter", help="A PEFT adapter folder to apply "
                                 "(the adapted model is localized; the base is left as is)."),
    compare_to: Path = typer.Option(
        None, "--compare-to", help="A base model's localization folder: localize on exactly "
        "its pairs, in units of its gaps, and report where the divergence shrank "
        "(comparison.json; the report overlays both)."),
    positions: str = typer.Option(
        "last", help="last | suffix:K | image. suffix:K must stay within the tokens both "
        "prompts share (the chat template's end); image needs the image after the question "
        "(before it, causal attention makes the activations identical: refused)."),
    engine: str = typer.Option(
        "auto", help="auto (the fastest engine exact for this model) | cached | batched | full "
        "| nnsight | tlens (all exact; cached refuses bidirectional prompt attention; tlens "
        "boots TransformerLens on a deep copy of the model: twice the weights' memory) | "
        "attribution (gradient estimate)."),
    verify_top: int = typer.Option(0, "--verify-top", help="With --engine attribution: re-run "
                                   "the K strongest sites exactly; report the rank correlation."),
    only_flips: bool = typer.Option(False, "--only-flips",
                                    help="Keep only pairs whose predicted answers differ."),
    max_pairs_per_group: int = typer.Option(None, help="Cap the ordered pairs per question."),
    min_delta: float = typer.Option(
        0.25, help="Exclude pairs with |m(a)-m(b)| below this many logits (> 0): r divides "
        "by it."),
    max_bytes: str = typer.Option(
        "4GiB", help="Memory bound of each patched forward, estimated from the model's sizes "
        "(e.g. 2GiB, 500MB, 1e9); the default fits MedGemma-4B on a 24 GB GPU "
        "(docs/memory.md). Results do not depend on it."),
    max_rows: int = typer.Option(None, help="Also cap the patched rows per forward "
                                 "(default: only --max-bytes bounds them)."),
    logit_lens: bool = typer.Option(True, help="Also record the per-layer logit-lens KL of "
                                    "the two clean runs (a full-vocabulary unembedding per "
                                    "layer: on CPU with a large vocabulary, much of the time)."),
    merge_variants: bool = typer.Option(
        False, help="Read each choice as all its case and leading-space variants (' yes', "
        "'Yes', ...), summing their probabilities, instead of the one first token mechlora "
        "would write (docs/localize.md)."),
    rule: str = typer.Option("window:5", help="Selection rule reported with the result "
                             "(and tested by --spec auto)."),
    dtype: str = typer.Option("auto", help="float32 | bfloat16 | float16 | auto."),
    device: str = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub folder."),
    plotlyjs: str = typer.Option("embed", help="embed (offline report) | cdn (small file)."),
    feature_cache: Path = typer.Option(
        None, help="Folder caching image features across runs (the vision tower is frozen)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Patch each layer's activations across paraphrase pairs; find where answers diverge.

    Writes OUT/localization.json (means, 95% CIs, per-layer scores), OUT/arrays.safetensors
    (per-pair arrays) and OUT/report.html; prints the selected layers and whether they carry
    the divergence (sufficiency and necessity of --spec).

    Examples:

        mechlora localize --model tiny-gemma3-vlm --out runs/loc

        mechlora localize --spec 15-19 --spec all --heads --by type --out runs/loc2

        mechlora localize --adapter runs/arm --compare-to runs/loc --out runs/loc-after
    """
    from mechlora.data import EXAMPLE_PATH, load_groups, make_pairs
    from mechlora.errors import MechloraError
    from mechlora.io import check_out_dir, prepare_out_dir
    from mechlora.localize import check_limits, distributed_state
    from mechlora.localize import localize as run
    from mechlora.models import load_model
    from mechlora.report.localize import write_localize_report
    from mechlora.select import select_layers

    limit = parse_bytes(max_bytes)
    check_limits(min_delta=min_delta, max_rows=max_rows, max_bytes=limit)  # before any work
    world = distributed_state()  # under `accelerate launch`, only the main process writes
    main_process = world is None or world.is_main_process
    groups = load_groups(pairs or EXAMPLE_PATH)
    reads = [pairs, model, feature_cache, adapter, compare_to,
             *{g.image.parent for g in groups if g.image}]
    from mechlora.sites import components as parse_sites

    per_layer, _ = parse_sites(sites)  # a bad site name fails now, before loading the model
    from mechlora.interventions import asked_specs, check_options

    exact = engine != "attribution"
    # the implicit --spec auto only where it can run; an explicit --spec must be refused
    specs = asked_specs(spec or (["auto"] if per_layer and exact else []))  # before loading
    if not exact:
        check_options(engine, **{"--spec": specs, "--heads": heads,
                                 "--per-position": per_position, "--compare-to": compare_to,
                                 "--adapter": adapter})
    if by is not None and by not in ("type", "phenomenon"):
        raise MechloraError(f"--by {by}: use type or phenomenon")
    out_dir = (prepare_out_dir(out, overwrite, inputs=reads) if main_process
               else check_out_dir(out, overwrite, inputs=reads))
    pair_list = make_pairs(groups, max_pairs_per_group=max_pairs_per_group)
    subject = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if feature_cache is not None:
        from mechlora.features import FeatureCache

        subject.feature_cache = FeatureCache(feature_cache)
    select_layers(np.ones(subject.n_layers), rule)  # a bad rule fails now, not after the sweep
    if main_process:
        typer.echo(f"localize: {subject.name}, {subject.n_layers} layers, {len(pair_list)} "
                   f"pairs from {len(groups)} questions")
    base = None
    if compare_to is not None:
        from mechlora.result import LocalizationResult

        base = LocalizationResult.load(compare_to)
    result = run(subject, pair_list, components=[c.strip() for c in sites.split(",")],
                 positions=positions, engine=engine, only_flips=only_flips, min_delta=min_delta,
                 max_rows=max_rows, max_bytes=limit, progress=not quiet, verify_top=verify_top,
                 logit_lens=logit_lens, merge_variants=merge_variants, heads=heads,
                 per_position=per_position, specs=specs, rule=rule, by=by,
                 adapter=adapter, baseline=base)
    selection = None
    if result.n_pairs and result.components:
        try:
            selection = select_layers(result.scores, rule)
        except MechloraError as e:  # e.g. no positive score left after training: still write
            result.settings["selection"] = {"rule": rule, "spec": None, "covered": None,
                                            "reason": str(e)}
    if selection is not None:
        result.settings["selection"] = {"rule": rule, "spec": str(selection.spec),
                                        "covered": selection.covered, "reason": selection.reason}
    comparison = None
    if base is not None:
        from mechlora.before_after import compare_localizations

        comparison = compare_localizations(base, result)
    if not main_process:
        return
    result.save(out_dir)
    if comparison is not None:
        from mechlora.io import write_json

        write_json(out_dir / "comparison.json", comparison.summary())
    write_localize_report(result, out_dir / "report.html", selection, plotlyjs=plotlyjs,
                          comparison=comparison)
    typer.echo(f"{result.n_pairs} pairs kept, {len(result.excluded)} excluded "
               f"(engine {result.engine}, {result.settings['seconds']:.1f}s)")
    if selection is not None:
        typer.echo(f"selected: {selection.reason}")
    elif "selection" in result.settings:
        typer.echo(f"no selection: {result.settings['selection']['reason']}")
    _print_extras(result, comparison)
    check = result.settings.get("attribution", {})
    if "spearman" in check:
        typer.echo(f"attribution vs exact, top {check['verify_top']} sites: Spearman "
                   f"{check['spearman']:.2f} (site means), {check['spearman_pairs']:.2f} "
                   "(per pair)")
    extra = ", comparison.json" if comparison is not None else ""
    typer.echo(f"wrote {out_dir}/localization.json, arrays.safetensors{extra}, report.html")


def _print_extras(result, comparison) -> None:
    """Spec tests, direction notes, groups and the before/after verdict, a line or so each."""
    from mechlora.breakdown import direction_notes, rule_of, selection_of

    for effect in result.specs:
        typer.echo(effect.text())
    if "spec_note" in result.settings:
        typer.echo(result.settings["spec_note"])
    for note in direction_notes(result):
        typer.echo(f"directions disagree: {note}")
    key = result.settings.get("by")
    if key:
        for value, part in result.by(key).items():
            chosen = selection_of(part, rule_of(result))
            what = chosen["reason"] if chosen["spec"] else f"no selection: {chosen['reason']}"
            typer.echo(f"{key} {value}: {part.n_pairs} pairs, {what}")
    if comparison is not None:
        typer.echo(f"before/after: {comparison.verdict()}")


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'4GiB', '500MB', '1e9' -> bytes."""
    from mechlora.errors import MechloraError

    number = text.strip().rstrip("bBiIkKmMgGtT ")
    unit = text.strip()[len(number):].strip().lower()
    try:
        value = float(number) * UNITS[unit]
    except (ValueError, KeyError):
        raise MechloraError(f"--max-bytes '{text}' is not a size; write e.g. 4GiB, 500MB or "
                            "1e9") from None
    return int(value)
