"""`train --dry-run`: what a run would do, counted on a `meta`-device model (no weights)."""

from __future__ import annotations

import torch

from mechlora.card import plan_text
from mechlora.data import QuestionGroup, load_image
from mechlora.errors import MechloraError
from mechlora.models.subject import Subject
from mechlora.spec import LayerSpec
from mechlora.spec import plan as lora_plan_of
from mechlora.training.config import TrainConfig
from mechlora.training.inputs import read_groups
from mechlora.training.layers import match_params, resolve_layers
from mechlora.training.memory import GIB, for_run

TEXT_TOKENS = 64  # prompt tokens besides the image's assumed when no data or tokenizer is given
SAMPLE = 64  # question groups whose prompts are measured for the memory estimate


def plan_training(model: Subject | str, *, layers: str | LayerSpec = "auto",
                  config: TrainConfig | None = None, pairs=None, from_localization=None) -> str:
    """What `train` would do, as text, without loading weights (the model is built on `meta`)."""
    cfg = (config or TrainConfig()).validate()
    subject = model if isinstance(model, Subject) else meta_subject(model)
    groups = read_groups(pairs, "training") if pairs is not None else None
    choice, lora_plan, memory, match = None, None, None, None
    pending = _pending(layers, from_localization, cfg)
    if pending is None:
        choice = resolve_layers(subject, groups or [], layers, cfg, from_localization,
                                progress=False)
        match = match_params(subject, choice.spec, cfg)
        lora_plan = lora_plan_of(subject.base, choice.spec, subject.layers_path, cfg.modules,
                                 cfg.r, ranks=match.ranks if match is not None else None)
        memory = memory_table(subject, choice.spec.layers, cfg, lora_plan.trainable, groups)
    steps = cfg.steps(len(groups))[1] if groups is not None else None
    return plan_text(subject, choice, lora_plan, cfg, groups, steps, memory, match, pending)


def _pending(layers, from_localization, cfg: TrainConfig) -> str | None:
    """Why the layers cannot be known without weights (scores to compute), else None."""
    from mechlora.select import Selection, parse_selector

    if isinstance(layers, (LayerSpec, Selection)) or from_localization is not None:
        return None
    text = str(layers).strip().lower()
    if text == "auto":
        return (f"auto: the training pairs are localized first, then rule {cfg.rule} picks the "
                "layers (give --from LOCDIR or a spec to count parameters now)")
    source, _ = parse_selector(text)
    if source is None:
        return None
    where = "from the weights" if source == "snr" else "on the training pairs"
    return (f"{text}: {source} scores are computed {where} first (give --from with a saved "
            "selection or localization to count parameters now)")


def prompt_length(subject: Subject, groups: list[QuestionGroup] | None) -> tuple[int, str]:
    """The longest prompt in tokens over a sample of the data, or an assumed length; and how."""
    if groups and subject.processor is not None:
        lengths = [subject.encode([v.text], [load_image(g.image) if g.image and subject.is_vlm
                                             else None])["input_ids"].shape[1]
                   for g in groups[:SAMPLE] for v in g.variants]
        return max(lengths), f"the longest of {len(lengths)} prompts in the data"
    image = getattr(subject.base.config, "mm_tokens_per_image", 0)
    how = f"assumed: {image} image + {TEXT_TOKENS} text" if image else "assumed"
    return image + TEXT_TOKENS, how


def memory_table(subject: Subject, layers, cfg: TrainConfig, trainable: int,
                 groups: list[QuestionGroup] | None) -> list[str]:
    """Estimated peak GPU memory by pairs per forward, with and without checkpointing."""
    seq_len, how = prompt_length(subject, groups)
    step = cfg.pairs_per_step
    sizes = sorted({min(2**k, step) for k in range(step.bit_length() + 1)} | {cfg.micro_batch or
                                                                              step})
    lines = [f"estimated peak on one GPU (bf16 weights{', bf16 autocast' if cfg.bf16 else ''}), "
             f"prompts of {seq_len} tokens ({how}); formula in docs/train.md",
             f"  {'pairs per forward':<20}{'peak':>10}{'with --gradient-checkpointing':>32}"]
    for size in sizes:
        off, on = (for_run(subject, layers, cfg, trainable, pairs_per_forward=size,
                           seq_len=seq_len, checkpointing=c).total / GIB for c in (False, True))
        mark = "  (this run)" if size == (cfg.micro_batch or step) else ""
        lines.append(f"  {size:<20}{off:>7.1f} GiB{on:>29.1f} GiB{mark}")
    lines.append("  on a GPU, train turns gradient checkpointing on by itself when the peak "
                 "exceeds 90% of its memory")
    return lines


def meta_subject(name: str) -> Subject:
    from mechlora.models import PRESETS

    if name in PRESETS and name != "organism":
        with torch.device("meta"):
            model, processor = PRESETS[name]()
        return Subject(model, processor, name=name)
    if name in PRESETS:  # small, and built by training: load it for real
        from mechlora.models import load_model

        return load_model(name, device="cpu")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as e:
        raise MechloraError(f"cannot plan for '{name}': not a preset, not a local folder with "
                            f"config.json, and not in the local hub cache ({e})") from None
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else \
        AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return Subject(model, None, name=name)
