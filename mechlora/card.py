"""What a training run is and was: the dry-run plan, `mechlora.json`'s record, the model card.

The card is a plain function of the record, so it can be regenerated from mechlora.json alone.
"""

from __future__ import annotations

import math
import platform
from typing import Any

MODULE_NAMES = {"q_proj": "Q", "k_proj": "K", "v_proj": "V", "o_proj": "O", "gate_proj": "gate",
                "up_proj": "up", "down_proj": "down"}


def versions() -> dict[str, str]:
    """Versions of the libraries that decide what a run computes."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("mechlora", "torch", "transformers", "peft", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def run_record(subject, cfg, choice, lora_plan, metrics: list[dict], *, steps: int,
               steps_per_epoch: int, world_size: int, data: dict,
               resumptions: list[dict] | None = None, memory: dict | None = None,
               match=None) -> dict[str, Any]:
    """The JSON document written as mechlora.json (schema in docs/train.md); `match` is the
    `spec.RankMatch` of --match-params."""
    sel, loc = choice.selection, choice.localization
    train_rows = [m for m in metrics if m["kind"] == "train"]
    applied = [m for m in train_rows if not m.get("skipped")]
    eval_rows = [m for m in metrics if m["kind"] == "eval"]
    return {
        "schema_version": 1,
        "base_model": subject.name,
        "model_class": type(subject.base).__name__,
        "layers_path": subject.layers_path,
        "layers": {"spec": str(choice.spec), "list": list(choice.spec.layers),
                   "n_layers": choice.spec.n_layers, "how": choice.how,
                   "rule": sel.rule if sel and choice.how in ("auto", "selector") else None,
                   "given": choice.given,
                   "selector": sel.selector if sel and choice.how in ("auto", "selector")
                   else None,
                   "covered": sel.covered if sel else None, "reason": sel.reason if sel else None},
        "selection": sel.to_dict() if sel else None,
        "localization": None if loc is None else {
            "path": choice.localization_path, "recorded_here": choice.localized_here,
            "model": loc.model, "n_pairs": loc.n_pairs, "score_name": loc.score_name,
            "scores": [float(s) if math.isfinite(s) else None for s in loc.scores]},
        "lora": {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout,
                 "modules": list(cfg.modules),
                 "target_modules": choice.spec.target_regex(subject.layers_path, cfg.modules),
                 "matched_modules": lora_plan.n_modules,
                 "trainable_parameters": lora_plan.trainable,
                 "base_parameters": lora_plan.base_params, "share": lora_plan.share,
                 "ranks": None if match is None else {str(k): v for k, v in match.ranks.items()},
                 "match": None if match is None else {
                     "reference": match.reference, "target": match.target,
                     "trainable": match.trainable, "difference": match.difference,
                     "rank_step": match.step}},
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "data": data,
        "training": {"steps": steps, "epochs": round(steps / steps_per_epoch, 4),
                     "world_size": world_size,
                     "pairs_seen": sum(m["pairs"] for m in applied),
                     "final": applied[-1] if applied else None,
                     "eval": eval_rows[-1] if eval_rows else None,
                     "skipped_steps": [m["step"] for m in train_rows if m.get("skipped")],
                     "oom_retries": [{"step": m["step"], **m["micro_batch"]} for m in metrics
                                     if m["kind"] == "oom"],
                     "resumptions": resumptions or [],
                     "warnings": [m["message"] for m in metrics if m["kind"] == "warning"],
                     "memory": memory},
        "versions": versions(),
    }


def epochs_text(cfg: dict, training: dict) -> str:
    """Epochs run, and why fewer than asked when --max-steps cut the run short."""
    done = training.get("epochs", cfg["epochs"])
    text = f"{done:g}" if done == cfg["epochs"] else f"{done:.3g} of {cfg['epochs']}"
    if done < cfg["epochs"] and cfg.get("max_steps"):
        text += f", stopped by --max-steps {cfg['max_steps']}"
    return text


def recipe(cfg) -> str:
    schedule = f"{cfg.schedule} schedule" + (f", {cfg.warmup} warmup steps" if cfg.warmup else "")
    return (f"r {cfg.r}, alpha {cfg.alpha}, dropout {cfg.dropout:g}, lr {cfg.lr:g} ({schedule}), "
            f"{cfg.pairs_per_step} pairs per step ({cfg.batch_size} x {cfg.grad_accum} "
            f"accumulated), {cfg.epochs} epochs" + (f", at most {cfg.max_steps} steps"
                                                      if cfg.max_steps else ""))


def loss_text(kl_weight: float, temperature: float, kl_over: str) -> str:
    over = "the full vocabulary" if kl_over == "vocab" else "the choices' first tokens"
    return (f"cross-entropy on the first answer token + {kl_weight:g} x symmetric KL between "
            f"the two wordings' first-answer-token distributions (T = {temperature:g}, over "
            f"{over})")


def plan_text(subject, choice, lora_plan, cfg, groups, steps, memory=None, match=None,
              pending: str | None = None) -> str:
    """The dry-run report: what would be adapted and trained, nothing loaded. `pending` says
    why the layers are not known yet (scores still to compute)."""
    base = sum(p.numel() for p in subject.base.parameters())
    lines = [("model", f"{subject.name} ({type(subject.base).__name__}): {subject.n_layers} "
                       f"language layers at {subject.layers_path}, {base:,} parameters")]
    if choice is None:
        lines.append(("layers", pending or f"auto: the training pairs are localized first, "
                      f"then rule {cfg.rule} picks the layers (give --from LOCDIR or a spec to "
                      "count parameters now)"))
    else:
        how = choice.selection.reason if choice.how in ("auto", "selector") else choice.how
        lines.append(("layers", f"{choice.spec} ({how})"))
        if choice.selection is not None and choice.how in ("all", "explicit"):
            lines.append(("coverage", choice.selection.reason))
        lines.append(("modules", f"{', '.join(cfg.modules)}: {lora_plan.n_modules} modules "
                                 "matched"))
        lines.append(("trainable", f"{lora_plan.trainable:,} ({lora_plan.share:.2%}) of "
                                   f"{lora_plan.base_params:,} base parameters"))
        if match is not None:
            lines.append(("matched", str(match)))
    lines.append(("recipe", recipe(cfg)))
    lines.append(("loss", loss_text(cfg.kl_weight, cfg.kl_temperature, cfg.kl_over)))
    if groups is not None:
        lines.append(("data", f"{len(groups)} question groups: 1 pair each per epoch, "
                              f"{steps} optimizer steps"))
    for i, line in enumerate(memory or []):
        lines.append(("memory" if i == 0 else "", line))
    lines.append(("", "dry run: no weights were loaded and nothing was written"))
    return "\n".join(f"{k:<10} {v}".rstrip() for k, v in lines)


def _notes(training: dict[str, Any]) -> list[str]:
    """Warnings and the events of the run: collapse guards, skipped steps, OOM, resumptions."""
    notes = [f"- **Warning**: {w}." for w in training.get("warnings", [])]
    skipped = training.get("skipped_steps", [])
    if skipped:
        notes.append(f"- {len(skipped)} update(s) skipped for a non-finite loss (--skip-nonfinite):"
                     f" step {', '.join(map(str, skipped))}.")
    for o in training.get("oom_retries", []):
        notes.append(f"- Out of memory at step {o['step']}: micro-batch {o['from']} -> {o['to']} "
                     "pairs, step retried (same gradient).")
    for r in training.get("resumptions", []):
        what = ", ".join(f"{k} {v['then']} -> {v['now']}" for k, v in r["changed"].items())
        notes.append(f"- Resumed at step {r['step']}" + (f" with {what}." if what else "."))
    return ["## Training notes\n", "\n".join(notes) + "\n"] if notes else []


def _rank_text(cfg: dict, lora: dict) -> str:
    """The rank, or the per-layer ranks of a --match-params run and what they match."""
    match = lora.get("match")
    if not match:
        return str(cfg["r"])
    counts: dict[int, int] = {}
    for rank in lora["ranks"].values():
        counts[rank] = counts.get(rank, 0) + 1
    ranks = " and ".join(f"{n} layer{'s' if n > 1 else ''} at {r}"
                         for r, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return (f"{ranks}, matched to {match['reference']} ({match['target']:,} parameters, "
            f"difference {match['difference']:+,}); alpha scaled per layer to keep alpha / r = "
            f"{cfg['alpha'] / cfg['r']:g}")


def _modules(names: list[str]) -> str:
    return ", ".join(MODULE_NAMES.get(n, n) for n in names) + " projections"


def model_card(record: dict[str, Any]) -> str:
    """README.md for the adapter folder, from the mechlora.json record."""
    cfg, lora, layers = record["config"], record["lora"], record["layers"]
    training, data = record["training"], record["data"]["train"]
    base = record["base_model"]
    vlm = "ConditionalGeneration" in record["model_class"] or "ImageText" in record["model_class"]
    auto_model = "AutoModelForImageTextToText" if vlm else "AutoModelForCausalLM"
    processor = "AutoProcessor" if vlm else "AutoTokenizer"
    chosen = {"auto": f"chosen by localization ({layers['rule']})", "all": "all layers",
              "explicit": "given explicitly",
              "selector": f"chosen by {layers.get('selector') or layers.get('given')}"
              }[layers["how"]]
    if layers["how"] == "auto" and (layers.get("selector") or "").partition(":")[0] not in \
            ("", "localization"):
        chosen = f"chosen by {layers['selector']}"  # a saved selection given with --from
    rows = [
        ("Base model", f"`{base}`"),
        ("Adapter rank (r)", _rank_text(cfg, lora)),
        ("alpha", cfg["alpha"]),
        ("Dropout", f"{cfg['dropout']:g}"),
        ("Learning rate", f"{cfg['lr']:g} ({cfg['schedule']}, {cfg['warmup']} warmup steps)"),
        ("Effective batch", f"{cfg['batch_size'] * cfg['grad_accum']} pairs per step "
                            f"(batch {cfg['batch_size']}, grad-accum {cfg['grad_accum']})"),
        ("Epochs", f"{epochs_text(cfg, training)} ({training['steps']} steps, "
                   f"{training['pairs_seen']} pairs)"),
        ("Target layers", f"{layers['spec']} of {layers['n_layers']} ({chosen})"),
        ("Target modules", _modules(lora["modules"])),
        ("Loss", loss_text(cfg["kl_weight"], cfg["kl_temperature"], cfg["kl_over"])),
        ("Trainable parameters", f"{lora['trainable_parameters']:,} ({lora['share']:.2%} of "
                                 "base)"),
        ("Training data", f"{data['n_groups']} question groups, sha256 {data['sha256'][:12]}"),
        ("Seed", cfg["seed"]),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    parts = [
        f"---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- lora\n- mechlora\n"
        "- paraphrase-consistency\n---\n",
        f"# LoRA adapter for {base}: paraphrase consistency on layers {layers['spec']}\n",
        f"Trained with mechlora {record['versions']['mechlora']} to make `{base}` give the same "
        "answer to a question however it is worded. Only the listed language-model layers carry "
        "the adapter; the vision tower and every other layer are untouched.\n",
        "## Settings\n", "| Setting | Value |\n|---|---|", table + "\n",
    ]
    if layers.get("reason"):
        parts.append(f"Layer selection: {layers['reason']}.\n")
    final, evaluation = training.get("final"), training.get("eval")
    if final:
        parts.append(f"Last step: loss {final['loss']:.4f} (CE {final['ce']:.4f}, KL "
                     f"{final['kl']:.4f}).\n")
    if evaluation:
        parts.append(f"Held-out check at step {evaluation['step']}: flip rate "
                     f"{evaluation['flip_rate']:.1%} over {evaluation['n_pairs']} pairs, "
                     f"accuracy {evaluation['accuracy']:.1%}.\n")
    parts += _notes(training)
    parts += [
        "## Usage\n",
        "```python\nimport torch\nfrom peft import PeftModel\n"
        f"from transformers import {processor}, {auto_model}\n\n"
        f'base = {auto_model}.from_pretrained("{base}", dtype=torch.bfloat16)\n'
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")\n'
        f'processor = {processor}.from_pretrained("path/to/this/folder")\n```\n',
        "or, with mechlora (built-in presets included):\n",
        f'```python\nimport mechlora\n\nsubject = mechlora.load_model("{base}", '
        'adapter="path/to/this/folder")\n```\n',
        "`mechlora.json` holds the full settings, the localization scores the layers came from, "
        "the data hash and the library versions; `metrics.jsonl` the loss at every step.\n",
        "## Before you rely on it\n",
        "A research adapter. Check it on held-out paraphrases with `mechlora eval`: besides the "
        "flip rate, look at text-only agreement, since a model can become consistent by leaning "
        "on the question and ignoring the image. Not for clinical use.\n",
        f"Library versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}.\n",
    ]
    return "\n".join(parts)
