"""Train the organism from scratch: a tiny Gemma 3 VLM that knows one phrasing per question.

The language model's layers below `commit` are sliding-window layers with a tiny window: the
answer position cannot read the question before layer `commit` (docs/organism.md). Plain torch
loop on one thread, seeded: the same config gives the same weights whatever the caller's
thread count. Each example is (film, question, phrasing): the training phrasing, or with
probability `rare_share` one of the rare phrasings. Loss: cross-entropy of the first answer
token at the last prompt position (the start of the model turn), exactly where mechlora reads
the answer, plus an auxiliary finding loss on the image tokens (see `train`). Prompts go
through the processor's chat template, as in localize and eval. `quick_check` measures the
result on test films and every paraphrase family.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mechlora.errors import MechloraError
from mechlora.models.tokenizer import GEMMA_CHAT_TEMPLATE, build_processor, build_tokenizer
from mechlora.organism.films import SIZE, Film, render_array, sample_film
from mechlora.organism.questions import (
    BANK,
    FAMILIES,
    INSTRUCTION,
    PHENOMENA,
    groups_for,
    vocabulary,
)
from mechlora.organism.splits import film_seed

if TYPE_CHECKING:
    from transformers import Gemma3ForConditionalGeneration, PreTrainedModel, ProcessorMixin


@dataclass
class OrganismConfig:
    seed: int = 0
    # vision: SigLIP, 64 px, patch 16 -> 16 patches, one image token each (in development
    # runs, patch 8 with 2x2 pooling learned small findings several times slower)
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    patch_size: int = 16
    mm_tokens: int = 16
    # language model: layers [0, commit) attend to a window of `window` tokens (themselves and
    # the window - 1 before), layers [commit, layers) to the whole prompt; commit 0: no window
    layers: int = 8
    commit: int = 4
    window: int = 2
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 1
    intermediate: int = 256
    init_std: float = 0.02  # transformers' default initializer_range
    # training
    steps: int = 1000
    batch_size: int = 32
    questions_per_image: int = 4  # every film has at least 4 applicable questions
    lr: float = 1e-3
    warmup: int = 50
    aux_weight: float = 1.0  # finding labels on the pooled image tokens (see `train`)
    rare_share: float = 0.01  # share of examples in a rare phrasing: teaches their words, barely
    bidirectional_share: float = 0.5  # share of batches given token_type_ids (see `train`)
    n_train_images: int = 3000
    n_pair_images: int = 64  # train images in the folds' training files (for the LoRA)
    n_validation_images: int = 64  # validation images (choosing the LoRA's settings)
    n_test_images: int = 128  # test images (the folds' test files, and `quick_check`)

    def validate(self) -> OrganismConfig:
        if not (0 <= self.commit < self.layers and self.window >= 1):
            raise MechloraError(f"organism: need 0 <= commit < layers and window >= 1, got "
                                f"layers={self.layers}, commit={self.commit}, "
                                f"window={self.window}")
        return self

    @property
    def reach(self) -> int:
        """How many positions before itself the answer position can read through the
        sliding-window layers below `commit`: each adds window - 1."""
        return self.commit * (self.window - 1)


# Seconds to build, for tests: a narrow network and a dozen steps, same depth and windows. A
# wider init makes paraphrases' margins differ by logits, not hundredths, so that localize
# keeps pairs at its default `min_delta`.
QUICK = dict(vision_hidden=32, vision_layers=1, hidden=32, heads=2, intermediate=64,
             init_std=0.1, steps=12, batch_size=16, questions_per_image=2, warmup=2,
             n_train_images=64, n_pair_images=4, n_validation_images=2, n_test_images=4)

# Gemma's template with `INSTRUCTION` closing every user turn.
CHAT_TEMPLATE = GEMMA_CHAT_TEMPLATE.replace(
    "{% endif %}<end_of_turn>",
    "{% endif %}{% if message['role'] == 'user' %} " + INSTRUCTION + "{% endif %}<end_of_turn>")


def organism_processor(cfg: OrganismConfig):
    """The organism's processor: word-level tokenizer, 64 px films, the padded chat template."""
    tokenizer = build_tokenizer(vocabulary())
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = build_processor(tokenizer, image_size=SIZE, image_seq_length=cfg.mm_tokens)
    processor.chat_template = CHAT_TEMPLATE
    return processor


def suffix_tokens(processor: ProcessorMixin) -> int:
    """Tokens of the prompt after the question's last token, the answer position included."""
    question = "Is there an opacity?"
    prompt = chat_prompt(processor, question)
    tail = prompt[prompt.index(question) + len(question):]
    return len(processor.tokenizer(tail, add_special_tokens=False)["input_ids"])


def check_planted(cfg: OrganismConfig, processor: ProcessorMixin) -> int:
    """The suffix length; refuses a config whose sliding layers would reach the question."""
    n = suffix_tokens(processor)
    if cfg.reach >= n:
        raise MechloraError(
            f"organism: commit={cfg.commit} layers of window {cfg.window} let the answer "
            f"position read {cfg.reach} tokens back, but only {n - 1} template tokens separate "
            "it from the question: the commit depth would not be planted; lower commit or "
            "window")
    return n


@contextmanager
def one_thread() -> Iterator[None]:
    """Run on one torch thread, then restore the caller's setting: float sums then do not
    depend on the thread count, so a build is the same whatever the caller's threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_model(cfg: OrganismConfig, tokenizer) -> Gemma3ForConditionalGeneration:
    """A randomly initialised Gemma3ForConditionalGeneration sized by `cfg`."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    ids = tokenizer.convert_tokens_to_ids
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.hidden // cfg.heads,
        query_pre_attn_scalar=cfg.hidden // cfg.heads, max_position_embeddings=512,
        initializer_range=cfg.init_std,
        layer_types=["sliding_attention"] * cfg.commit
        + ["full_attention"] * (cfg.layers - cfg.commit),
        sliding_window=cfg.window,
        pad_token_id=ids("<pad>"), eos_token_id=ids("<eos>"), bos_token_id=ids("<bos>"),
    )
    vision = SiglipVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        image_size=SIZE, patch_size=cfg.patch_size, vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=cfg.mm_tokens,
        boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    config.architectures = ["Gemma3ForConditionalGeneration"]
    torch.manual_seed(cfg.seed)
    model = Gemma3ForConditionalGeneration(config)
    # A fresh projector is all zeros: the image would have no effect at all.
    w = model.model.multi_modal_projector.mm_input_projection_weight
    torch.nn.init.normal_(w, std=cfg.vision_hidden**-0.5)
    return model


class Prompts:
    """Token ids of each phrasing's full prompt, through the processor (chat template, image)."""

    def __init__(self, processor: ProcessorMixin) -> None:
        self.processor = processor
        self.tok = processor.tokenizer
        self.pad = self.tok.pad_token_id
        self.image_token = self.tok.convert_tokens_to_ids("<image_soft_token>")
        self._ids: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._ids:
            prompt = chat_prompt(self.processor, text)
            self._ids[text] = self.processor(text=[prompt], images=[[_blank()]])["input_ids"][0]
        return self._ids[text]

    def batch(self, texts: list[str], images: np.ndarray | None = None, *,
              token_types: bool = True) -> dict:
        """Inputs as the processor makes them: left padding, pixels scaled to [-1, 1]."""
        seqs = [self.ids(t) for t in texts]
        n = max(len(s) for s in seqs)
        input_ids = torch.tensor([[self.pad] * (n - len(s)) + list(s) for s in seqs])
        out = {"input_ids": input_ids, "attention_mask": (input_ids != self.pad).long()}
        if images is not None:
            out["pixel_values"] = pixel_values(images)
        if token_types:
            out["token_type_ids"] = (input_ids == self.image_token).long()
        return out


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 films -> what the Gemma 3 image processor makes of them (RGB, [-1, 1])."""
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def chat_prompt(processor: ProcessorMixin, text: str) -> str:
    """The prompt mechlora builds: image then question in the user turn, then the model turn."""
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)


def _blank():
    from PIL import Image

    return Image.new("RGB", (SIZE, SIZE))


N_CHOICES = max(len(q.choices) for q in BANK)


def finding_labels(film: Film) -> list[int]:
    """Index of each question's answer among its choices, -1 where it does not apply."""
    return [-1 if q.answer(film) is None else q.choices.index(q.answer(film)) for q in BANK]


def answer_ids(tokenizer, choices: tuple[str, ...]) -> list[int]:
    """First token of each choice; the bank guarantees they differ."""
    return [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]


def train(cfg: OrganismConfig, *, progress: bool = True,
          ) -> tuple[Gemma3ForConditionalGeneration, ProcessorMixin, dict[str, float]]:
    """Train from scratch on one thread. Returns the model (eval mode), its processor, and the
    timing."""
    cfg.validate()
    processor = organism_processor(cfg)
    check_planted(cfg, processor)
    with one_thread():
        return _train(cfg, processor, progress)


def _train(cfg: OrganismConfig, processor: ProcessorMixin, progress: bool):
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = processor.tokenizer
    prompts = Prompts(processor)
    model = build_model(cfg, tokenizer)

    t0, c0 = time.perf_counter(), time.process_time()
    films = [sample_film(film_seed("train", i, cfg.seed)) for i in range(cfg.n_train_images)]
    pixels = np.stack([render_array(f) for f in films])
    applicable = [[q for q in BANK if q.answer(f) is not None] for f in films]
    answer = {t: tokenizer.convert_tokens_to_ids(t) for q in BANK for t in q.choices}
    labels = torch.tensor([finding_labels(f) for f in films])
    # An auxiliary head, dropped after training: it reads every question's answer off the mean
    # image token. In development runs, the vision tower learned small findings very slowly
    # through a from-scratch LM alone; this gets it there in the CPU budget. The LM still
    # learns the rest.
    head = torch.nn.Linear(cfg.hidden, labels.shape[1] * N_CHOICES)
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    n_images = cfg.batch_size // cfg.questions_per_image
    model.train()
    bar = tqdm(range(cfg.steps), desc="training organism", disable=not progress)
    for step in bar:
        # Each film answers several questions per batch: the vision tower runs once per film.
        idx = rng.sample(range(len(films)), n_images)
        items = [(i, q) for i in idx for q in rng.sample(applicable[i], cfg.questions_per_image)]
        texts = [rng.choice(q.rare) if rng.random() < cfg.rare_share else q.train
                 for _, q in items]
        target = torch.tensor([answer[q.answer(films[i])] for i, q in items])
        features = model.model.get_image_features(pixel_values(pixels[idx])).pooler_output
        image = BaseModelOutputWithPooling(
            pooler_output=features.repeat_interleave(cfg.questions_per_image, dim=0))
        # Callers may or may not pass the processor's token_type_ids (bidirectional attention
        # over image tokens); train both ways so the organism answers the same either way.
        inputs = prompts.batch(texts, token_types=rng.random() < cfg.bidirectional_share)
        logits = model(**inputs, mm_encoder_outputs={"image": image}, logits_to_keep=1).logits
        loss = F.cross_entropy(logits[:, -1], target)
        aux = head(features.mean(1)).view(-1, N_CHOICES)
        loss = loss + cfg.aux_weight * F.cross_entropy(aux, labels[idx].view(-1), ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    # CPU seconds too: on a shared machine wall time says more about the neighbours.
    timing = {"train_seconds": round(time.perf_counter() - t0, 1),
              "train_cpu_seconds": round(time.process_time() - c0, 1)}
    return model, processor, timing


@torch.no_grad()
def predict(model: PreTrainedModel, prompts: Prompts, texts: list[str], images: np.ndarray,
            choices: tuple[str, ...], *, token_types: bool = True,
            batch_size: int = 256) -> list[str]:
    """The choice whose first token has the largest logit at the last prompt position."""
    ids = answer_ids(prompts.tok, choices)
    out = []
    for s in range(0, len(texts), batch_size):
        inputs = prompts.batch(texts[s:s + batch_size], images[s:s + batch_size],
                               token_types=token_types)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1, ids]
        out += [choices[k] for k in logits.argmax(-1).tolist()]
    return out


@dataclass(frozen=True)
class _Row:
    group: str
    finding: str
    phenomenon: str | None  # None: the training phrasing
    text: str
    film: int  # index among the test films
    choices: tuple[str, ...]
    answer: str


def quick_check(model: PreTrainedModel, processor: ProcessorMixin, cfg: OrganismConfig, *,
                token_types: bool = True) -> dict:
    """Accuracy and flip rate on test films x every paraphrase family (none of which the
    organism saw). Headline figures pool the four test families (`PHENOMENA`); the validation
    family is reported on its own in `flip_rate_by_phenomenon`."""
    with one_thread():
        return _check(model, processor, cfg, token_types)


def _check(model, processor, cfg: OrganismConfig, token_types: bool) -> dict:
    prompts = Prompts(processor)
    films = [sample_film(film_seed("test", i, cfg.seed)) for i in range(cfg.n_test_images)]
    pixels = np.stack([render_array(f) for f in films])
    rows = [_Row(g["id"], g["finding"], phenomenon, text, i, tuple(g["choices"]), g["answer"])
            for i, film in enumerate(films) for g in groups_for(film, f"test{i:04d}", None)
            for text, phenomenon in [(g["question"], None),
                                     *((p["text"], p["phenomenon"]) for p in g["paraphrases"])]]
    pred: dict[_Row, str] = {}
    for choices in sorted({r.choices for r in rows}):  # one answer set per batch
        part = [r for r in rows if r.choices == choices]
        got = predict(model, prompts, [r.text for r in part], pixels[[r.film for r in part]],
                      choices, token_types=token_types)
        pred |= dict(zip(part, got, strict=True))
    original = {r.group: pred[r] for r in rows if r.phenomenon is None}
    questions = [r for r in rows if r.phenomenon is None]
    pairs = [r for r in rows if r.phenomenon in PHENOMENA]

    def flipped(r: _Row) -> bool:
        return pred[r] != original[r.group]

    def correct(r: _Row) -> bool:
        return pred[r] == r.answer

    def rate(items: list[_Row], hit) -> float:
        return round(sum(map(hit, items)) / max(1, len(items)), 4)

    return {
        "n_groups": len(questions),
        "n_pairs": len(pairs),
        "accuracy_train_phrasing": rate(questions, correct),
        "accuracy_heldout_paraphrases": rate(pairs, correct),
        "flip_rate_heldout": rate(pairs, flipped),
        "flip_rate_by_phenomenon": {p: rate([r for r in rows if r.phenomenon == p], flipped)
                                    for p in FAMILIES},
        "by_question": {q.name: {
            "accuracy_train_phrasing": rate([r for r in questions if r.finding == q.name], correct),
            "flip_rate_heldout": rate([r for r in pairs if r.finding == q.name], flipped),
        } for q in BANK},
    }
