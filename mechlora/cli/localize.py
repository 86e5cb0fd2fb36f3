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
    sites: str = typer.Option(",".join(COMPONENTS), help="Components to patch: resid,attn,mlp."),
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
    rule: str = typer.Option("window:5", help="Selection rule reported with the result."),
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
    (per-pair arrays) and OUT/report.html.

    Example: mechlora localize --model tiny-gemma3-vlm --out runs/loc
    """
    from mechlora.data import EXAMPLE_PATH, load_groups, make_pairs
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
    reads = [pairs, model, feature_cache, *{g.image.parent for g in groups if g.image}]
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
    result = run(subject, pair_list, components=[c.strip() for c in sites.split(",")],
                 positions=positions, engine=engine, only_flips=only_flips, min_delta=min_delta,
                 max_rows=max_rows, max_bytes=limit, progress=not quiet, verify_top=verify_top,
                 logit_lens=logit_lens, merge_variants=merge_variants)
    selection = select_layers(result.scores, rule) if result.n_pairs else None
    if selection is not None:
        result.settings["selection"] = {"rule": rule, "spec": str(selection.spec),
                                        "covered": selection.covered, "reason": selection.reason}
    if not main_process:
        return
    result.save(out_dir)
    write_localize_report(result, out_dir / "report.html", selection, plotlyjs=plotlyjs)
    typer.echo(f"{result.n_pairs} pairs kept, {len(result.excluded)} excluded "
               f"(engine {result.engine}, {result.settings['seconds']:.1f}s)")
    if selection is not None:
        typer.echo(f"selected: {selection.reason}")
    check = result.settings.get("attribution", {})
    if "spearman" in check:
        typer.echo(f"attribution vs exact, top {check['verify_top']} sites: Spearman "
                   f"{check['spearman']:.2f} (site means), {check['spearman_pairs']:.2f} "
                   "(per pair)")
    typer.echo(f"wrote {out_dir}/localization.json, arrays.safetensors, report.html")


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
