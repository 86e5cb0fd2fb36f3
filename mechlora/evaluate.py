"""`evaluate`: answer every wording of every question, for the base model and each adapter.

The base model is loaded once; each PEFT adapter folder is attached to it under its own name
and switched on in turn (the base arm runs with adapters disabled), then detached again, so
the caller's model is left as it was. Per wording: the predicted choice, the margin, and the
prediction with a uniform gray image, with the image removed, and with another question's
image. Metrics and tests come from `mechlora.metrics` (formulas in docs/metrics.md); the
outputs and their schema are in docs/eval.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from mechlora.data import QuestionGroup, data_hash, load_groups, load_image
from mechlora.errors import MechloraError
from mechlora.features import with_image_features
from mechlora.io import prepare_out_dir, read_json, read_jsonl, write_json, write_jsonl
from mechlora.metrics import LOW_CHOICE_MASS, VariantPrediction, compare, compute_metrics
from mechlora.models.choices import LOW_MASS_NOTE, ChoiceTokens
from mechlora.models.subject import Subject
from mechlora.patching import margin

SCHEMA_VERSION = 2  # 2: cluster intervals as "ci", original_flip_rate, flip_auroc on "gap"
BASE = "base"
GRAY = "gray"  # stands for the uniform gray image in a prompt's `image`
CONDITIONS = ("main", "gray", "noimage", "swap")


@dataclass(frozen=True)
class Prompt:
    """One forward row: wording `row` of the variant table, under one image condition."""

    row: int
    condition: str  # one of CONDITIONS
    text: str
    image: Path | str | None  # an image file, GRAY, or None (no image in the prompt at all)


@dataclass
class ArmOutput:
    """Per variant-table row: choice index, margin, confidence gap, the other conditions'
    choices."""

    pred: list[int]
    margin: list[float]
    other: dict[str, list[int | None]]  # condition -> choice per row (None: not run)
    decoded: list[str | None]
    seconds: float = 0.0
    gap: list[float] = field(default_factory=list)  # predicted choice's logit - best other
    mass: list[float] = field(default_factory=list)  # probability on the choices' tokens


@dataclass
class EvalResult:
    """Predictions, metrics and base-vs-adapter comparisons of one evaluation run."""

    model: str
    data: dict[str, Any]
    arms: dict[str, str | None]  # arm name -> adapter folder (None for the base)
    predictions: dict[str, list[VariantPrediction]]
    records: list[dict[str, Any]]  # the rows of predictions.jsonl
    metrics: dict[str, dict[str, Any]]
    comparisons: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The content of eval.json (schema in docs/eval.md)."""
        return {
            "schema_version": SCHEMA_VERSION, "model": self.model, "data": self.data,
            "arms": {a: {"adapter": p, "metrics": self.metrics[a]} for a, p in self.arms.items()},
            "comparisons": self.comparisons, "settings": self.settings, "notes": self.notes,
            "timing": self.timing,
        }

    def table(self) -> str:
        """The base-vs-adapters table as plain text (what the CLI prints)."""
        from mechlora.report.eval import render_table

        return render_table(self.to_json())

    def save(self, out: str | Path, *, overwrite: bool = False, plotlyjs: str = "embed") -> Path:
        """Write eval.json, predictions.jsonl and report.html into a fresh folder."""
        from mechlora.report.eval import write_report

        folder = prepare_out_dir(out, overwrite)
        doc = self.to_json()
        write_json(folder / "eval.json", doc)
        write_jsonl(folder / "predictions.jsonl", self.records)
        write_report(folder / "report.html", doc, self.records, plotlyjs=plotlyjs)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> EvalResult:
        """Read back a folder written by `save`."""
        folder = Path(folder)
        doc = read_json(folder / "eval.json")
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise MechloraError(f"{folder}/eval.json has schema version "
                                f"{doc.get('schema_version')}; this mechlora reads "
                                f"{SCHEMA_VERSION}: rerun mechlora eval, or recompute the "
                                "metrics from its predictions.jsonl with "
                                "mechlora.metrics.compute_metrics")
        path = folder / "predictions.jsonl"
        if not path.is_file():
            raise MechloraError(f"{path} not found; it is written next to eval.json")
        records = read_jsonl(path)
        preds = {a: [VariantPrediction.from_dict(r) for r in records if r["arm"] == a]
                 for a in doc["arms"]}
        return cls(model=doc["model"], data=doc["data"],
                   arms={a: v["adapter"] for a, v in doc["arms"].items()}, predictions=preds,
                   records=records, metrics={a: v["metrics"] for a, v in doc["arms"].items()},
                   comparisons=doc["comparisons"], settings=doc["settings"],
                   notes=doc.get("notes", []), timing=doc.get("timing", {}))


# ---- adapters ---------------------------------------------------------------------------------

def check_adapter(path: str | Path) -> Path:
    """Fail early, before any model is loaded, on a folder that is not a PEFT LoRA adapter."""
    path = Path(path)
    if not path.exists():
        raise MechloraError(f"adapter folder {path} not found; give the folder that holds "
                            "adapter_config.json and adapter_model.safetensors")
    if not path.is_dir():
        raise MechloraError(f"adapter {path} is a file; give the folder that holds it")
    config = path / "adapter_config.json"
    if not config.is_file():
        raise MechloraError(f"{path} is not a PEFT adapter folder: it has no adapter_config.json "
                            "(PEFT writes one with model.save_pretrained(folder))")
    try:
        peft_type = json.loads(config.read_text(encoding="utf-8")).get("peft_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise MechloraError(f"{config} is not a valid PEFT config ({e}); re-save the adapter "
                            "with model.save_pretrained(folder)") from None
    if peft_type != "LORA":
        raise MechloraError(f"{path} holds a {peft_type or 'untyped'} adapter; mechlora eval "
                            "takes LoRA adapters (peft_type LORA)")
    if not any((path / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise MechloraError(f"{path} has no adapter weights (adapter_model.safetensors or "
                            "adapter_model.bin); was the save interrupted?")
    return path.resolve()


def arm_names(adapters: Sequence[Path]) -> list[str]:
    """One name per adapter: its folder name, made unique (and never 'base') with -2, -3..."""
    names, taken = [], {BASE}
    for path in adapters:
        name, k = path.name or "adapter", 2
        while name in taken:
            name, k = f"{path.name}-{k}", k + 1
        taken.add(name)
        names.append(name)
    return names


def _load_one(model, path: Path, key: str, subject_name: str):
    """Attach one adapter under `key`; refuse one whose weights do not all land on modules."""
    from peft import PeftConfig, PeftModel

    wrapped = model
    try:
        with warnings.catch_warnings():
            # PEFT calls a transformers API deprecated in 5.x: noise, not the user's concern.
            warnings.filterwarnings("ignore", category=FutureWarning)
            if not isinstance(model, PeftModel):
                config = PeftConfig.from_pretrained(str(path))
                config.inference_mode = True
                wrapped = PeftModel(model, config, adapter_name=key)
            result = wrapped.load_adapter(str(path), adapter_name=key)
        lost = [k for k in (*result.missing_keys, *result.unexpected_keys) if "lora_" in k]
        if lost:
            raise MechloraError(f"adapter {path} does not fit {subject_name}: {len(lost)} LoRA "
                                f"weights match no module (e.g. {lost[0]}); was it trained on "
                                "this base model?")
    except Exception as e:
        if wrapped is not model:
            wrapped.unload()  # never leave LoRA layers behind in the caller's model
        if isinstance(e, (ValueError, RuntimeError, KeyError, OSError, TypeError)) and not \
                isinstance(e, MechloraError):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MechloraError(f"adapter {path} does not fit {subject_name}: {first}; was it "
                                "trained on this base model?") from None
        raise
    return wrapped


@contextmanager
def attached(subject: Subject, adapters: Sequence[Path]) -> Iterator[tuple[Subject, list[str]]]:
    """The subject with every adapter attached (PEFT names a0, a1, ...); detached on exit."""
    if not adapters:
        yield subject, []
        return
    from peft import PeftModel

    if isinstance(subject.model, PeftModel):
        raise MechloraError("the model already carries a PEFT adapter; load the base model "
                            "alone and pass every adapter folder as an adapter")
    keys = [f"a{i}" for i in range(len(adapters))]  # folder names may hold dots PEFT refuses
    model = subject.model
    try:
        for path, key in zip(adapters, keys, strict=True):
            model = _load_one(model, path, key, subject.name)
        model.eval()
        yield dataclasses.replace(subject, model=model), keys
    finally:
        if isinstance(model, PeftModel):
            model.unload()  # puts the original modules back: the caller's model is unchanged


# ---- prompts ----------------------------------------------------------------------------------

def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def swap_images(groups: Sequence[QuestionGroup], seed: int = 0) -> dict[str, Path]:
    """Group id -> another question's image, by a seeded derangement of the distinct images.

    Images are compared by content, and Sattolo's shuffle gives a single cycle, so no question
    is ever shown its own image; with fewer than two distinct images there is nothing to swap.
    """
    first: dict[str, Path] = {}
    digest_of: dict[str, str] = {}
    for g in groups:
        if g.image is not None:
            digest_of[g.id] = _file_digest(g.image)
            first.setdefault(digest_of[g.id], g.image)
    digests = list(first)
    if len(digests) < 2:
        return {}
    rng = random.Random(f"swap:{seed}")
    perm = list(range(len(digests)))
    for i in range(len(perm) - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    target = {d: first[digests[perm[i]]] for i, d in enumerate(digests)}
    return {gid: target[d] for gid, d in digest_of.items()}


def plan_prompts(rows: Sequence[tuple[QuestionGroup, int]], *, use_images: bool, gray: bool,
                 noimage: bool, swap: dict[str, Path] | None) -> list[Prompt]:
    """Every forward row of one arm; the extra conditions only for questions with an image."""
    prompts = []
    for i, (g, v) in enumerate(rows):
        text = g.variants[v].text
        image = g.image if use_images else None
        prompts.append(Prompt(i, "main", text, image))
        if image is None:
            continue
        if gray:
            prompts.append(Prompt(i, "gray", text, GRAY))
        if noimage:
            prompts.append(Prompt(i, "noimage", text, None))
        if swap and g.id in swap:
            prompts.append(Prompt(i, "swap", text, swap[g.id]))
    return prompts


def batches(prompts: Sequence[Prompt], batch_size: int) -> list[list[Prompt]]:
    """Batches of similar prompt length (less padding); results do not depend on the order."""
    order = sorted(prompts, key=lambda p: (p.image is None, len(p.text)))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ---- inference --------------------------------------------------------------------------------

class _Images:
    """Decoded images by path, the most recently used few kept (one image serves many rows)."""

    def __init__(self, subject: Subject, keep: int = 64) -> None:
        self.subject, self.keep = subject, keep
        self.cache: OrderedDict[Path | str, Image.Image] = OrderedDict()

    def __call__(self, image: Path | str | None) -> Image.Image | None:
        if image is None:
            return None
        if image in self.cache:
            self.cache.move_to_end(image)
        else:
            self.cache[image] = (self.subject.gray_image() if image == GRAY
                                 else load_image(Path(image)))
            if len(self.cache) > self.keep:  # full-size scans are large: bound the memory
                self.cache.popitem(last=False)
        return self.cache[image]


def run_arm(subject: Subject, rows: Sequence[tuple[QuestionGroup, int]],
            prompts: Sequence[Prompt], answer_ids: dict[tuple[str, ...], ChoiceTokens], *,
            batch_size: int, decode: bool, max_new_tokens: int,
            bar: tqdm | None = None) -> ArmOutput:
    """Run every prompt once (logits at the last position only) and read off the choices."""
    n = len(rows)
    out = ArmOutput(pred=[-1] * n, margin=[float("nan")] * n,
                    other={c: [None] * n for c in CONDITIONS[1:]}, decoded=[None] * n,
                    gap=[float("nan")] * n, mass=[float("nan")] * n)
    images = _Images(subject)
    t0 = time.perf_counter()
    for batch in batches(prompts, batch_size):
        inputs = subject.encode([p.text for p in batch], [images(p.image) for p in batch])
        # The whole vocabulary at the last position: the choice mass needs its normaliser
        # (one unembedding per prompt, small beside the prompt's forward).
        logits = subject.model(**with_image_features(subject, inputs), logits_to_keep=1,
                               use_cache=False).logits[:, -1].float()
        for k, p in enumerate(batch):
            g = rows[p.row][0]
            tokens = answer_ids[g.choices]
            pred = int(tokens.scores(logits[k]).argmax())
            if p.condition == "main":
                out.pred[p.row] = pred
                out.margin[p.row] = float(margin(logits[k], tokens, g.answer_index))
                out.gap[p.row] = float(margin(logits[k], tokens, pred))
                out.mass[p.row] = float(tokens.mass(logits[k]))
            else:
                out.other[p.condition][p.row] = pred
        if decode:
            _decode(subject, [p for p in batch if p.condition == "main"], images, out,
                    max_new_tokens)
        if bar is not None:
            bar.update(1)
    out.seconds = time.perf_counter() - t0
    return out


def _decode(subject: Subject, prompts: Sequence[Prompt], images: _Images, out: ArmOutput,
            max_new_tokens: int) -> None:
    """Greedy continuation of the main prompts (the other conditions are not decoded)."""
    if not prompts:
        return
    inputs = subject.encode([p.text for p in prompts], [images(p.image) for p in prompts])
    inputs.pop("position_ids")  # generate() derives positions from the attention mask itself
    tok = subject.tokenizer
    ids = subject.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    for p, text in zip(prompts, texts, strict=True):
        out.decoded[p.row] = text.strip()


# ---- the entry point --------------------------------------------------------------------------

def _subject(subject_or_name: Subject | str, device: str | None, dtype: str | None) -> Subject:
    if isinstance(subject_or_name, Subject):
        subject = subject_or_name
    elif isinstance(subject_or_name, str):
        from mechlora.models import load_model

        subject = load_model(subject_or_name, dtype=dtype, device=device)
    else:
        raise MechloraError("evaluate() takes a model name or path, or a Subject (wrap a loaded "
                            "model with mechlora.wrap(model, processor))")
    if any(p.device.type == "meta" for p in subject.model.parameters()):
        raise MechloraError(f"{subject.name} has no weights (it lives on the meta device); load "
                            "a model with real weights to evaluate it")
    return subject


def _groups(pairs: str | Path | Sequence[QuestionGroup]) -> tuple[list[QuestionGroup], str | None]:
    if isinstance(pairs, (str, Path)):
        return load_groups(pairs), str(Path(pairs).resolve())
    groups = list(pairs)
    if not groups:
        raise MechloraError("no questions to evaluate: the list of question groups is empty")
    if not all(isinstance(g, QuestionGroup) for g in groups):
        raise MechloraError("evaluate() takes a data file path or a list of QuestionGroup "
                            "(see mechlora.load_groups)")
    return groups, None


def _option(flag: bool | None, name: str, why_not: str | None, notes: list[str]) -> bool:
    """None = on when possible; True when impossible is the user's mistake, so it raises."""
    if why_not is None:
        return flag is not False
    if flag:
        raise MechloraError(f"cannot run the {name}: {why_not}; drop the option")
    if flag is None:
        notes.append(f"{name} skipped: {why_not}")
    return False


def _check_out(out: Path, overwrite: bool, protected: Sequence[Path | str | None]) -> None:
    from mechlora.io import check_out_dir

    check_out_dir(out, overwrite, inputs=protected)


@dataclass
class Conditions:
    """Which extra image conditions run; `swap` maps group id -> image (empty when off)."""

    use_images: bool
    gray: bool
    noimage: bool
    swap: dict[str, Path]
    notes: list[str]


def resolve_conditions(subject: Subject, groups: Sequence[QuestionGroup], *, gray: bool | None,
                       noimage: bool, swap: bool | None, seed: int = 0) -> Conditions:
    notes: list[str] = []
    n_images = sum(g.image is not None for g in groups)
    if n_images and not subject.is_vlm:
        notes.append(f"{subject.name} is a text-only model: questions are asked without images")
    why = ("the model is text-only" if not subject.is_vlm
           else None if n_images else "no question has an image")
    gray_on = _option(gray, "gray-image condition (--gray)", why, notes)
    noimage_on = _option(noimage, "no-image condition (--noimage)", why, notes)
    swap_map = swap_images(groups, seed) if why is None else {}
    swap_why = why or (None if swap_map else "the questions have fewer than two distinct images")
    swap_on = _option(swap, "image-swap condition (--swap)", swap_why, notes)
    return Conditions(use_images=why is None, gray=gray_on, noimage=noimage_on,
                      swap=swap_map if swap_on else {}, notes=notes)


def _run_arms(subject: Subject, names: list[str], adapters: list[Path], rows, prompts,
              answer_ids, *, batch_size: int, decode: bool, max_new_tokens: int,
              progress: bool) -> dict[str, ArmOutput]:
    outputs: dict[str, ArmOutput] = {}
    n_batches = len(batches(prompts, batch_size))
    was_training = subject.model.training
    bar = tqdm(total=n_batches * len(names), desc="eval", unit="batch", disable=not progress)
    try:
        with attached(subject, adapters) as (live, keys), torch.inference_mode():
            live.model.eval()
            for name, key in zip(names, [None, *keys], strict=True):
                bar.set_postfix_str(name)
                if key is not None:
                    live.model.set_adapter(key)
                # The base arm is the same model with every adapter switched off.
                off = live.model.disable_adapter() if key is None and keys else nullcontext()
                with off:
                    outputs[name] = run_arm(live, rows, prompts, answer_ids,
                                            batch_size=batch_size, decode=decode,
                                            max_new_tokens=max_new_tokens, bar=bar)
    finally:
        bar.close()
        subject.model.train(was_training)
    return outputs


def evaluate(subject_or_name: Subject | str, pairs: str | Path | Sequence[QuestionGroup], *,
             adapters: Sequence[str | Path] = (), gray: bool | None = None,
             noimage: bool = False, swap: bool | None = None, decode: bool = False,
             max_new_tokens: int = 16, batch_size: int = 16, out: str | Path | None = None,
             overwrite: bool = False, progress: bool = True, n_boot: int = 2000, seed: int = 0,
             device: str | None = None, dtype: str | None = None,
             merge_variants: bool = False, low_choice_mass: float = LOW_CHOICE_MASS
             ) -> EvalResult:
    """Evaluate the base model and each adapter on every wording of every question.

    `gray` / `swap`: None runs them when the model and data allow (a VLM, questions with
    images), True insists (error if impossible), False skips. `noimage` (off by default) adds
    the prediction with the image removed from the prompt. `out`: a folder for eval.json,
    predictions.jsonl and report.html. `device` / `dtype` apply when a name is given.
    `merge_variants` reads each choice as all its case and leading-space variants
    (mechlora/models/choices.py); the reading is recorded in the settings. An arm whose mean
    choice mass is below `low_choice_mass` gets a note (docs/metrics.md).
    """
    if batch_size < 1:
        raise MechloraError(f"batch size must be at least 1, got {batch_size}")
    if n_boot < 1:
        raise MechloraError(f"n_boot must be at least 1 bootstrap replicate, got {n_boot}")
    if decode and max_new_tokens < 1:
        raise MechloraError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    groups, data_path = _groups(pairs)
    adapter_paths = [check_adapter(a) for a in adapters]
    if out is not None:
        protected = [*adapter_paths, data_path, *{g.image.parent for g in groups if g.image},
                     subject_or_name if isinstance(subject_or_name, str) else None]
        _check_out(Path(out), overwrite, protected)
    subject = _subject(subject_or_name, device, dtype)

    plan = resolve_conditions(subject, groups, gray=gray, noimage=noimage, swap=swap,
                              seed=seed)
    answer_ids: dict[tuple[str, ...], ChoiceTokens] = {}
    for g in groups:
        if g.choices not in answer_ids:
            answer_ids[g.choices] = subject.choice_tokens(g.choices, merge=merge_variants,
                                                          where=(g.source, g.line))
    rows = [(g, v) for g in groups for v in range(len(g.variants))]
    prompts = plan_prompts(rows, use_images=plan.use_images, gray=plan.gray,
                           noimage=plan.noimage, swap=plan.swap)
    names = [BASE, *arm_names(adapter_paths)]
    outputs = _run_arms(subject, names, adapter_paths, rows, prompts, answer_ids,
                        batch_size=batch_size, decode=decode, max_new_tokens=max_new_tokens,
                        progress=progress)
    result = _result(subject.name, groups, data_path, rows, names, adapter_paths, outputs,
                     plan.swap, n_boot=n_boot, seed=seed, notes=plan.notes,
                     settings={"gray": plan.gray, "noimage": plan.noimage,
                               "swap": bool(plan.swap),
                               "decode": decode, "max_new_tokens": max_new_tokens if decode
                               else None, "batch_size": batch_size, "n_boot": n_boot,
                               "seed": seed, "level": 0.95, "device": str(subject.device),
                               "dtype": str(next(subject.model.parameters()).dtype),
                               "choice_reading": "merged" if merge_variants else "first",
                               "low_choice_mass": low_choice_mass,
                               "choice_tokens": {"/".join(c): [list(v) for v in t.ids]
                                                 for c, t in answer_ids.items()}})
    for name, m in result.metrics.items():
        mass = m["choice_mass"]["value"]
        if mass is not None and mass < low_choice_mass:
            result.notes.append(LOW_MASS_NOTE.format(arm=name, mass=mass))
    if out is not None:
        result.save(out, overwrite=overwrite)
    return result


def _result(model: str, groups: list[QuestionGroup], data_path: str | None,
            rows: list[tuple[QuestionGroup, int]], names: list[str], adapters: list[Path],
            outputs: dict[str, ArmOutput], swap_map: dict[str, Path], *, n_boot: int, seed: int,
            notes: list[str], settings: dict[str, Any]) -> EvalResult:
    preds: dict[str, list[VariantPrediction]] = {}
    records: list[dict[str, Any]] = []
    for name in names:
        o = outputs[name]
        preds[name] = []
        for i, (g, v) in enumerate(rows):
            p = VariantPrediction(
                group_id=g.id, variant=v, phenomenon=g.variants[v].phenomenon, type=g.type,
                pred=o.pred[i], answer=g.answer_index, margin=o.margin[i],
                pred_gray=o.other["gray"][i], pred_noimage=o.other["noimage"][i],
                pred_swap=o.other["swap"][i], gap=o.gap[i] if o.gap else float("nan"),
                choice_mass=o.mass[i] if o.mass else float("nan"))
            preds[name].append(p)
            records.append(_record(name, g, p, swap_map, o.decoded[i], settings["decode"]))
    low = settings.get("low_choice_mass", LOW_CHOICE_MASS)
    metrics = {n: compute_metrics(preds[n], n_boot=n_boot, seed=seed, low_choice_mass=low)
               for n in names}
    comparisons = {n: compare(preds[BASE], preds[n], n_boot=n_boot, seed=seed)
                   for n in names[1:]}
    data = {"path": data_path, "hash": data_hash(groups), "n_groups": len(groups),
            "n_variants": len(rows), "n_groups_with_image": sum(g.image is not None
                                                                 for g in groups)}
    return EvalResult(
        model=model, data=data,
        arms={BASE: None, **{n: str(p) for n, p in zip(names[1:], adapters, strict=True)}},
        predictions=preds, records=records, metrics=metrics, comparisons=comparisons,
        settings=settings, notes=notes,
        timing={n: round(outputs[n].seconds, 3) for n in names})


def _record(arm: str, g: QuestionGroup, p: VariantPrediction, swap_map: dict[str, Path],
            decoded: str | None, decode: bool) -> dict[str, Any]:
    def choice(i: int | None) -> str | None:
        return None if i is None else g.choices[i]

    rec = {"arm": arm, "group_id": g.id, "variant": p.variant, "text": g.variants[p.variant].text,
           "phenomenon": p.phenomenon, "type": p.type,
           "image": None if g.image is None else str(g.image),
           "pred": p.pred, "pred_choice": choice(p.pred), "answer": p.answer,
           "answer_choice": g.answer, "correct": p.pred == p.answer, "margin": p.margin,
           "gap": p.gap, "choice_mass": p.choice_mass,
           "pred_gray": p.pred_gray, "pred_noimage": p.pred_noimage, "pred_swap": p.pred_swap,
           "pred_gray_choice": choice(p.pred_gray),
           "pred_noimage_choice": choice(p.pred_noimage),
           "pred_swap_choice": choice(p.pred_swap),
           "swap_image": str(swap_map[g.id]) if p.pred_swap is not None else None}
    if decode:
        rec["decoded"] = decoded
    return rec
