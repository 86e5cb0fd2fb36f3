"""`mechlora train`: LoRA on the localized layers with CE + symmetric KL (docs/train.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from mechlora.cli import app, recipe
from mechlora.train import TrainConfig

D = TrainConfig()  # the published recipe: every default below comes from here


@app.command()
def train(
    model: str = typer.Option(..., "--model", "-m", help="Preset, local model folder or HF hub "
                              "id (from the local cache)."),
    pairs: Path = typer.Option(None, "--pairs", "-p", help="Training data (JSONL or CSV, see "
                               "docs/data.md). Optional with --dry-run."),
    layers: str = typer.Option("auto", "--layers", "-l", help="auto (localize, then --rule), "
                               "all, a spec such as 15-19 or 3,7-9, or any selector: grad:5, "
                               "snr:5, bi:5, localization:window:5, early:5, middle:5, late:5, "
                               "random:5, randband:5 (random ones drawn with --seed); scores "
                               "come from --from or are computed on the training pairs."),
    from_: Path = typer.Option(None, "--from", help="A localization folder or a saved selection "
                               "(selection.json from mechlora select --out): --layers auto uses "
                               "it as it is; a selector or rule reads its scores."),
    match_params: str = typer.Option(None, "--match-params", help="Give the chosen layers the "
                                     "LoRA ranks whose trainable count equals this spec's at "
                                     "--r (e.g. --layers all --match-params 15-19); alpha is "
                                     "scaled per layer to keep alpha / r."),
    rule: str = typer.Option(D.rule, help="Selection rule for --layers auto: window:K, mass:P, "
                             "topk:K."),
    out: Path = typer.Option(None, "--out", "-o", help="Adapter folder to write."),
    r: recipe.R = D.r,
    alpha: recipe.Alpha = D.alpha,
    dropout: recipe.Dropout = D.dropout,
    modules: recipe.Modules = ",".join(D.modules),
    lr: recipe.Lr = D.lr,
    batch_size: recipe.BatchSize = D.batch_size,
    grad_accum: recipe.GradAccum = D.grad_accum,
    micro_batch: recipe.MicroBatch = D.micro_batch,
    epochs: recipe.Epochs = D.epochs,
    max_steps: recipe.MaxSteps = D.max_steps,
    warmup: recipe.Warmup = D.warmup,
    schedule: recipe.Schedule = D.schedule,
    weight_decay: recipe.WeightDecay = D.weight_decay,
    max_grad_norm: recipe.MaxGradNorm = D.max_grad_norm,
    kl_weight: recipe.KlWeight = D.kl_weight,
    kl_temperature: recipe.KlTemperature = D.kl_temperature,
    kl_over: recipe.KlOver = D.kl_over,
    merge_variants: recipe.MergeVariants = D.merge_variants,
    seed: int = typer.Option(D.seed, help="Seed of the LoRA init, pair draws and dropout."),
    save_every: recipe.SaveEvery = D.save_every,
    keep_checkpoints: int = typer.Option(D.keep_checkpoints, help="Checkpoints to keep."),
    eval_pairs: Path = typer.Option(None, help="Held-out data for a periodic flip-rate check."),
    eval_every: int = typer.Option(D.eval_every, help="Check every N updates (0: each epoch)."),
    gradient_checkpointing: recipe.GradientCheckpointing = D.gradient_checkpointing,
    bf16: recipe.Bf16 = D.bf16,
    skip_nonfinite: int = typer.Option(D.skip_nonfinite, help="Skip up to N updates whose loss "
                                       "is not finite (logged) before stopping; 0: stop at the "
                                       "first."),
    localize_groups: int = typer.Option(D.localize_groups, help="Groups localized for --layers "
                                        "auto without --from."),
    dtype: str = typer.Option("auto", help="Weights: auto (bf16 on GPU, fp32 on CPU), float32, "
                              "bfloat16."),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda if available)."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub folder."),
    overwrite: bool = typer.Option(False, help="Replace an --out folder that mechlora made "
                                   "(never one holding the inputs, or a folder mechlora did "
                                   "not create)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last "
                                "checkpoint; --lr, --micro-batch, --gradient-checkpointing, "
                                "--bf16, --skip-nonfinite, --device and --dtype may change."),
    dry_run: bool = typer.Option(False, help="Print the plan (layers, trainable parameters, "
                                 "estimated peak GPU memory) without loading weights."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train a LoRA adapter on the chosen language layers for paraphrase consistency.

    Example: mechlora train --model tiny-gemma3-vlm --pairs pairs.jsonl --layers 15-19 --out runs/a

    Check the plan and the estimated GPU memory first: add --dry-run. After a failure (a
    non-finite loss, out of memory), rerun the same command with --resume and the change the
    error suggests. Multi-GPU: accelerate launch -m mechlora train ... (same options).
    """
    from mechlora.errors import MechloraError
    from mechlora.train import plan_training
    from mechlora.train import train as run

    cfg = TrainConfig(
        r=r, alpha=alpha, dropout=dropout, modules=modules,
        lr=lr, batch_size=batch_size, grad_accum=grad_accum, micro_batch=micro_batch,
        epochs=epochs, max_steps=max_steps, warmup=warmup, schedule=schedule,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, kl_weight=kl_weight,
        kl_temperature=kl_temperature, kl_over=kl_over, merge_variants=merge_variants,
        seed=seed, save_every=save_every,
        keep_checkpoints=keep_checkpoints, eval_every=eval_every,
        gradient_checkpointing=gradient_checkpointing, bf16=bf16, skip_nonfinite=skip_nonfinite,
        rule=rule, localize_groups=localize_groups, match_params=match_params,
    ).validate()
    if dry_run:
        typer.echo(plan_training(model, layers=layers, config=cfg, pairs=pairs,
                                 from_localization=from_))
        if out is not None:
            from mechlora.io import check_out_dir

            try:
                check_out_dir(out, overwrite, resume=resume, inputs=[pairs, from_])
            except MechloraError as e:
                typer.echo(f"note: a real run would stop here: {e}")
        return
    if pairs is None:
        raise MechloraError("--pairs is required: the paraphrase data to train on")
    if out is None:
        raise MechloraError("--out is required: the folder to write the adapter to")
    result = run(model, pairs, layers=layers, out=out, config=cfg, from_localization=from_,
                 eval_pairs=eval_pairs, overwrite=overwrite, resume=resume, progress=not quiet,
                 dtype=None if dtype == "auto" else dtype, device=device,
                 trust_remote_code=trust_remote_code)
    from accelerate import PartialState

    if PartialState().is_main_process:
        final = result.record["training"]["final"]
        typer.echo(f"layers {result.spec} ({result.layers.how}); {result.steps} steps"
                   + (f"; final loss {final['loss']:.4f} (CE {final['ce']:.4f}, "
                      f"KL {final['kl']:.4f})" if final else ""))
        match = result.record["lora"]["match"]
        if match:
            typer.echo(f"ranks matched to {match['reference']}: "
                       f"{match['trainable']:,} trainable parameters (difference "
                       f"{match['difference']:+,})")
        evaluation = result.record["training"]["eval"]
        if evaluation:
            typer.echo(f"held-out flip rate {evaluation['flip_rate']:.1%} over "
                       f"{evaluation['n_pairs']} pairs")
        typer.echo(f"wrote {out}: adapter, mechlora.json, metrics.jsonl, README.md")
