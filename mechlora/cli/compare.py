"""`mechlora compare`: train every arm for every seed at one budget, evaluate them on held-out
data, compare them with seed-level statistics (docs/compare.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from mechlora.cli import app, recipe
from mechlora.compare.run import DEFAULT_ARMS
from mechlora.train import TrainConfig

D = TrainConfig()  # the published recipe: every training default below comes from here


@app.command("compare")
def compare_command(
    model: str = typer.Option(..., "--model", "-m", help="Preset, local model folder or HF hub "
                              "id (from the local cache)."),
    pairs: Path = typer.Option(..., "--pairs", "-p", help="Training data (JSONL or CSV, see "
                               "docs/data.md); scores are computed on it too."),
    eval_pairs: Path = typer.Option(..., "--eval", "-e", help="Held-out data every arm is "
                                    "evaluated on (never trained or scored on)."),
    out: Path = typer.Option(..., "--out", "-o", help="Comparison folder; rerun the same "
                             "command to resume it (finished arms are reused)."),
    arms: list[str] = typer.Option([DEFAULT_ARMS], "--arms", "-a", help="Comma-separated arms "
                                   "(repeatable): auto, all, a spec (15-19; a list as 3+7-9), "
                                   "any selector (grad:5, snr:5, bi:5, localization:window:5, "
                                   "early:5, middle:5, late:5, random:5, randband:5), "
                                   "X@match=REF (X's layers at REF's parameter count, e.g. "
                                   "all@match=auto), single or single:W (one adapter per layer "
                                   "or width-W window)."),
    seeds: int = typer.Option(3, "--seeds", help="Training seeds per arm: --seed, --seed + 1, "
                              "..."),
    seed: int = typer.Option(D.seed, help="The first training seed (LoRA init, pair draws, "
                             "random arms; the scores use it too)."),
    reference: str = typer.Option(None, help="The arm every arm is also tested against "
                                  "(default: auto when it is an arm)."),
    match_params: str = typer.Option(None, "--match-params", help="Every arm but the single "
                                     "ones holds this selector's parameter count (e.g. auto or "
                                     "15-19), as if each had @match=SPEC."),
    scores: str = typer.Option("", help="More score sources to compute and plot: grad, snr, bi, "
                               "localization (comma separated)."),
    from_: Path = typer.Option(None, "--from", help="A localization folder for auto and "
                               "localization arms (else the training pairs are localized)."),
    rule: str = typer.Option(D.rule, help="The rule of the auto arm: window:K, mass:P, topk:K."),
    localize_groups: int = typer.Option(D.localize_groups, help="Groups localized for auto "
                                        "without --from."),
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
    save_every: recipe.SaveEvery = D.save_every,
    gradient_checkpointing: recipe.GradientCheckpointing = D.gradient_checkpointing,
    bf16: recipe.Bf16 = D.bf16,
    gray: bool = typer.Option(None, "--gray/--no-gray", help="Also answer with a gray image "
                              "(text-only agreement). Default: when the model and data have "
                              "images."),
    noimage: bool = typer.Option(False, "--noimage", help="Also answer with the image removed."),
    swap: bool = typer.Option(None, "--swap/--no-swap", help="Also answer with another "
                              "question's image (swap sensitivity). Default: when possible."),
    eval_batch_size: int = typer.Option(16, help="Prompts per forward in evaluation."),
    n_boot: int = typer.Option(2000, help="Bootstrap replicates (seeds x questions)."),
    localize_arms: bool = typer.Option(False, "--localize-arms", help="Before and after "
                                       "training: localize the base once on a subset of the "
                                       "training pairs (the localization the scores use, when "
                                       "there is one) and every adapter on the same pairs, and "
                                       "say where each shrank the divergence (one more "
                                       "localization sweep per arm and seed; reused on a "
                                       "rerun)."),
    dtype: str = typer.Option("auto", help="Weights: auto (bf16 on GPU, fp32 on CPU), float32, "
                              "bfloat16."),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda if available)."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub folder."),
    overwrite: bool = typer.Option(False, help="Replace a comparison of another design in "
                                   "--out (only a folder mechlora made)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train every arm for every seed with the same budget, evaluate the base model and every
    adapter on held-out data, and compare them with seed-level statistics.

    Example: mechlora compare --model organism --pairs train.jsonl --eval heldout.jsonl
    --arms auto,all,early:5,random:5,grad:5,snr:5,all@match=auto --seeds 3 --out runs/cmp

    Writes OUT/compare.json and OUT/report.html; each adapter lives in OUT/arms/ARM/seed-S/
    (with --localize-arms, its before/after localization in OUT/arms/ARM/seed-S/before_after/).
    Scores that arms read (localization, grad, bi; snr from the weights) are computed once, on
    the training pairs, with the first seed.
    """
    from mechlora.compare import compare

    cfg = TrainConfig(
        r=r, alpha=alpha, dropout=dropout, modules=modules, lr=lr, batch_size=batch_size,
        grad_accum=grad_accum, micro_batch=micro_batch, epochs=epochs, max_steps=max_steps,
        warmup=warmup, schedule=schedule, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, kl_weight=kl_weight, kl_temperature=kl_temperature,
        kl_over=kl_over, merge_variants=merge_variants, seed=seed, save_every=save_every,
        gradient_checkpointing=gradient_checkpointing, bf16=bf16, rule=rule,
        localize_groups=localize_groups,
    ).validate()
    result = compare(model, pairs, eval_pairs, out=out, arms=",".join(arms), seeds=seeds,
                     config=cfg, reference=reference, match_params=match_params,
                     from_localization=from_, scores=scores, gray=gray, noimage=noimage,
                     swap=swap, eval_batch_size=eval_batch_size, n_boot=n_boot,
                     overwrite=overwrite, progress=not quiet,
                     dtype=None if dtype == "auto" else dtype, device=device,
                     trust_remote_code=trust_remote_code, localize_arms=localize_arms)
    typer.echo(summary(result.doc))
    typer.echo(f"wrote {out}/compare.json and report.html")


def summary(doc: dict) -> str:
    """One line per arm: flip rate and accuracy (mean over seeds) and the test against base."""
    def pct(block: dict | None, key: str) -> str:
        return "n/a" if not block or block.get(key) is None else f"{100 * block[key]:.1f}%"

    lines = [f"{'arm':<24}{'flip':>8}{'accuracy':>10}{'flip - base':>13}{'p':>8}",
             f"{'base':<24}{pct(doc['base']['metrics'].get('original_flip_rate'), 'mean'):>8}"
             f"{pct(doc['base']['metrics'].get('accuracy'), 'mean'):>10}"]
    for name, arm in doc["arms"].items():
        m, t = arm["metrics"], arm["vs_base"].get("original_flip_rate") or {}
        p = t.get("p")
        lines.append(f"{name:<24}{pct(m.get('original_flip_rate'), 'mean'):>8}"
                     f"{pct(m.get('accuracy'), 'mean'):>10}{pct(t, 'diff'):>13}"
                     f"{'n/a' if p is None else f'{p:.3f}':>8}")
    if doc.get("before_after"):
        lines.append("before/after on the training pairs (share of the base divergence left; "
                     "layers where it shrank / trained):")
        for name, arm in doc["arms"].items():
            for s, run in arm["seeds"].items():
                entry = run.get("before_after")
                if entry:
                    left = entry["remaining"]["mean"]
                    lines.append(f"  {name} seed {s}: {'n/a' if left is None else f'{left:.0%}'}"
                                 f" left; shrank at {_layers(entry['shrank_at'])} / trained "
                                 f"{_layers(entry['trained_layers'])}")
    return "\n".join(lines + [f"note: {n}" for n in doc["notes"][:1]])


def _layers(layers: list[int] | None) -> str:
    """As a layer spec reads ("15-19", "3,7-9"); the string does not depend on the depth."""
    from mechlora.spec import LayerSpec

    return "none" if not layers else str(LayerSpec.of(layers, max(layers) + 1))
