"""`mechlora sae rank | patch | clamp`: SAE features at a residual site (docs/sae.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechlora.cli import app
from mechlora.errors import MechloraError

sae_app = typer.Typer(
    name="sae", no_args_is_help=True, rich_markup_mode="markdown",
    help="SAE features at a residual site: rank them by how paraphrases differ on them, patch "
    "them from one paraphrase into the other, clamp one over a data set (docs/sae.md).")
app.add_typer(sae_app, name="sae")

Model = Annotated[str, typer.Option("--model", "-m", help="Preset, local model folder or hub "
                                    "id (from the local cache).")]
SaeFile = Annotated[Path, typer.Option(
    "--sae", help="The SAE's .safetensors file, or its folder (Gemma Scope params.safetensors, "
    "SAELens sae_weights.safetensors, sparsify sae.safetensors). A config.json / cfg.json "
    "beside it gives its layer, k and architecture.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder (sae.json, "
                                   "report.html, arrays or predictions).")]
Pairs = Annotated[Path | None, typer.Option("--pairs", "-p", help="Paraphrase data (JSONL or "
                                            "CSV, docs/data.md). Default: the bundled example.")]
Layer = Annotated[int | None, typer.Option(
    help="The decoder layer whose output (resid@L) the SAE reads. Default: from the SAE's "
    "config (Gemma Scope's model.layers.L.output, SAELens' blocks.L.hook_resid_post).")]
K = Annotated[int | None, typer.Option("--k", help="TopK size, when the SAE's config does not "
                                       "give it.")]
Positions = Annotated[str, typer.Option(help="last | suffix:K (aligned from the end).")]
SaeDtype = Annotated[str, typer.Option(help="dtype of the SAE's weights (float32, bfloat16); "
                                       "residuals are cast to it.")]
Dtype = Annotated[str, typer.Option(help="Model dtype: float32 | bfloat16 | float16 | auto.")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: cuda if "
                                            "available).")]
MaxPairs = Annotated[int | None, typer.Option(help="Cap the ordered pairs per question.")]
NBoot = Annotated[int, typer.Option(help="Bootstrap replicates (resampling questions).")]
Merge = Annotated[bool, typer.Option(help="Read each choice as all its case and leading-space "
                                     "variants (docs/metrics.md).")]
Remote = Annotated[bool, typer.Option(help="Allow model code from the hub folder.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the results in --out.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
PlotlyJs = Annotated[str, typer.Option(help="embed (offline report) | cdn (small file).")]


def _setup(model: str, sae_file: Path, layer: int | None, k: int | None, pairs: Path | None,
           out: Path, overwrite: bool, dtype: str, device: str | None, sae_dtype: str,
           trust_remote_code: bool, extra_inputs=()):
    """Data, output folder check, model and SAE, all before any long work."""
    from mechlora.data import EXAMPLE_PATH, load_groups
    from mechlora.io import check_out_dir
    from mechlora.models import load_model
    from mechlora.sae import attach_layer, load_sae

    groups = load_groups(pairs or EXAMPLE_PATH)
    check_out_dir(out, overwrite, inputs=[pairs, model, sae_file, *extra_inputs,
                                          *{g.image.parent for g in groups if g.image}])
    sae = load_sae(sae_file, k=k, layer=layer, dtype=sae_dtype)
    subject = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    sae.to(device=subject.device)
    layer = attach_layer(sae, subject, layer)
    typer.echo(f"{sae.d_sae} features ({sae.layout}, {sae.activation}) at resid@{layer} of "
               f"{subject.name}; {len(groups)} questions")
    return groups, subject, sae, layer


@sae_app.command("rank")
def rank(model: Model, sae: SaeFile, out: Out, pairs: Pairs = None, layer: Layer = None,
         k: K = None, positions: Positions = "last",
         score: Annotated[str, typer.Option(
             help="abs: mean |z_a - z_b|; signed: mean (z_a - z_b) x sign(m(a) - m(b)), "
             "positive when higher in the wording with the larger margin.")] = "abs",
         top: Annotated[int, typer.Option(help="Features to report with intervals.")] = 20,
         only_flips: Annotated[bool, typer.Option(
             "--only-flips/--all-pairs", help="Rank on the pairs whose answers differ (default) "
             "or on every pair.")] = True,
         max_pairs_per_group: MaxPairs = None, n_boot: NBoot = 1000,
         merge_variants: Merge = False, sae_dtype: SaeDtype = "float32", dtype: Dtype = "auto",
         device: Device = None, trust_remote_code: Remote = False, overwrite: Overwrite = False,
         quiet: Quiet = False, plotlyjs: PlotlyJs = "embed") -> None:
    """Rank SAE features by how differently the two wordings of a pair activate them.

    Example: mechlora sae rank -m M --sae layer_17/params.safetensors -p pairs.jsonl -o runs/r
    """
    from mechlora.data import make_pairs
    from mechlora.sae import rank_features

    groups, subject, sae_, layer = _setup(model, sae, layer, k, pairs, out, overwrite, dtype,
                                          device, sae_dtype, trust_remote_code)
    result = rank_features(subject, sae_, make_pairs(groups, both_directions=False,
                                                     max_pairs_per_group=max_pairs_per_group),
                           layer=layer, positions=positions, score=score,
                           only_flips=only_flips, top=top, n_boot=n_boot,
                           progress=not quiet, merge_variants=merge_variants)
    result.save(out, overwrite=overwrite, plotlyjs=plotlyjs)
    lo, hi = result.ci()
    typer.echo(f"reconstruction: ||e||/||x|| = {result.fit['relative_error']:.3g}, "
               f"L0 = {result.fit['l0']:.1f} per position")
    typer.echo(f"{result.n_pairs} pairs; top features by {score} score (95% CI):")
    for i, f in enumerate(result.top[:10]):
        typer.echo(f"  {i + 1:>2}. f{int(f)}  {result.mean[f]:.4g}  [{lo[i]:.3g}, {hi[i]:.3g}]")
    typer.echo(f"wrote {out}/sae.json, arrays.safetensors, report.html")


def parse_features(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise MechloraError(f"--features '{text}' is not a comma-separated list of feature "
                            "numbers (e.g. 1203,88)") from None


@sae_app.command("patch")
def patch(model: Model, sae: SaeFile, out: Out, pairs: Pairs = None, layer: Layer = None,
          k: K = None, positions: Positions = "last",
          features: Annotated[str | None, typer.Option(
              help="Features to patch, e.g. 1203,88 (each alone, and together).")] = None,
          top: Annotated[int | None, typer.Option(
              help="Patch the top K features of --ranking (or of a ranking on these same "
              "pairs, which is then not a held-out test).")] = None,
          ranking: Annotated[Path | None, typer.Option(
              help="A `mechlora sae rank` output folder to take --top from.")] = None,
          random: Annotated[int, typer.Option(
              "--random", help="Control rows: random sets of as many features, drawn per pair "
              "among those whose activation differs.")] = 5,
          seed: Annotated[int, typer.Option(help="Seed of the random control rows.")] = 0,
          engine: Annotated[str, typer.Option(help="auto | cached | batched | full | nnsight | "
                                              "tlens (all exact).")] = "auto",
          only_flips: Annotated[bool, typer.Option(
              "--only-flips", help="Keep only pairs whose predicted answers differ.")] = False,
          min_delta: Annotated[float, typer.Option(
              help="Exclude pairs with |m(a)-m(b)| below this many logits (> 0).")] = 0.25,
          max_bytes: Annotated[str, typer.Option(help="Memory bound of each patched forward "
                                                 "(docs/memory.md).")] = "4GiB",
          max_rows: Annotated[int | None, typer.Option(help="Also cap the rows per "
                                                       "forward.")] = None,
          max_pairs_per_group: MaxPairs = None, n_boot: NBoot = 1000,
          merge_variants: Merge = False, sae_dtype: SaeDtype = "float32",
          dtype: Dtype = "auto", device: Device = None, trust_remote_code: Remote = False,
          overwrite: Overwrite = False, quiet: Quiet = False,
          plotlyjs: PlotlyJs = "embed") -> None:
    """Patch SAE features from one paraphrase's run into the other's; report restoration.

    x' = x_b + sum over F of (z_a[f] - z_b[f]) W_dec[f] (the error term kept), run by the exact
    patching engines. Example: mechlora sae patch -m M --sae FILE -p pairs.jsonl --features
    1203 -o runs/p
    """
    from mechlora.cli.localize import parse_bytes
    from mechlora.data import make_pairs
    from mechlora.localize import check_limits
    from mechlora.sae import FeatureRanking, patch_features, rank_features

    if (features is None) == (top is None):
        raise MechloraError("give either --features (a list) or --top K (from --ranking)")
    if ranking is not None and top is None:
        raise MechloraError("--ranking is read for --top K; give --top")
    limit = parse_bytes(max_bytes)
    check_limits(min_delta=min_delta, max_rows=max_rows, max_bytes=limit)
    chosen = parse_features(features) if features is not None else None
    loaded = FeatureRanking.load(ranking) if ranking is not None else None
    groups, subject, sae_, layer = _setup(model, sae, layer, k, pairs, out, overwrite, dtype,
                                          device, sae_dtype, trust_remote_code,
                                          extra_inputs=[ranking])
    pair_list = make_pairs(groups, max_pairs_per_group=max_pairs_per_group)
    source = "given"
    if loaded is not None:
        if loaded.layer != layer or loaded.sae["d_sae"] != sae_.d_sae:
            raise MechloraError(f"--ranking {ranking} ranked a {loaded.sae['d_sae']}-feature "
                                f"SAE at resid@{loaded.layer}, not this one at resid@{layer}")
        chosen, source = loaded.features(top), f"top {top} of the ranking in {ranking}"
    elif top is not None:
        ranked = rank_features(subject, sae_, pair_list, layer=layer, positions=positions,
                               only_flips=only_flips, top=top, n_boot=n_boot,
                               progress=not quiet, merge_variants=merge_variants)
        chosen = ranked.features(top)
        source = f"top {top} of a ranking on these same pairs (not held out)"
    result = patch_features(subject, sae_, pair_list, chosen, layer=layer, positions=positions,
                            engine=engine, n_random=random, seed=seed, only_flips=only_flips,
                            min_delta=min_delta, max_rows=max_rows, max_bytes=limit,
                            n_boot=n_boot, progress=not quiet, merge_variants=merge_variants,
                            features_from=source)
    result.save(out, overwrite=overwrite, plotlyjs=plotlyjs)
    doc = result.summary()
    typer.echo(f"{result.n_pairs} pairs kept, {len(result.excluded)} excluded (engine "
               f"{result.engine}); restoration r (95% CI):")
    for row in doc["rows"]:
        ci = ("n/a" if row["ci_low"] is None else
              f"[{row['ci_low']:.3g}, {row['ci_high']:.3g}]")
        mean = "n/a" if row["mean"] is None else f"{row['mean']:.3f}"
        typer.echo(f"  {row['name']:<14} {mean}  {ci}")
    typer.echo(f"wrote {out}/sae.json, arrays.safetensors, report.html")


@sae_app.command("clamp")
def clamp(model: Model, sae: SaeFile, out: Out,
          feature: Annotated[int, typer.Option(help="The feature to clamp.")],
          value: Annotated[str, typer.Option(
              help="A number, mean (over every wording), mean:N (wording N, 0 = the "
              "original), mean:PHENOMENON, max or max*K (K times its largest activation on "
              "the data).")],
          pairs: Pairs = None, layer: Layer = None, k: K = None,
          positions: Annotated[str, typer.Option(
              help="last (the answer position) | all (every position).")] = "last",
          batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 16,
          n_boot: NBoot = 2000,
          seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
          merge_variants: Merge = False, sae_dtype: SaeDtype = "float32",
          dtype: Dtype = "auto", device: Device = None, trust_remote_code: Remote = False,
          overwrite: Overwrite = False, quiet: Quiet = False,
          plotlyjs: PlotlyJs = "embed") -> None:
    """Evaluate the model with one SAE feature clamped to a value, against the unclamped model.

    Example: mechlora sae clamp -m M --sae FILE -p pairs.jsonl --feature 1203 --value 0 -o
    runs/c
    """
    from mechlora.sae import clamp_eval

    groups, subject, sae_, layer = _setup(model, sae, layer, k, pairs, out, overwrite, dtype,
                                          device, sae_dtype, trust_remote_code)
    result = clamp_eval(subject, sae_, feature, value, groups, layer=layer, positions=positions,
                        batch_size=batch_size, n_boot=n_boot, seed=seed, progress=not quiet,
                        merge_variants=merge_variants)
    result.save(out, overwrite=overwrite, plotlyjs=plotlyjs)
    for note in result.settings["notes"]:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW)
    typer.echo(f"feature {feature} clamped to {result.value:.4g} ({value}) at {positions}:")
    for key, h in result.headline().items():
        base, new = h["base"], h["clamped"]
        if base is not None and new is not None:
            typer.echo(f"  {key:<20} {base:.3f} -> {new:.3f}")
    typer.echo(f"wrote {out}/sae.json, predictions.jsonl, report.html")
