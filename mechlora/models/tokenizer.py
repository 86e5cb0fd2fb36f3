"""Small tokenizers built in code, with Gemma 3's special tokens and chat template.

The built-in presets must run with no download, so their tokenizer cannot come from the hub.
A character-level vocabulary gives every English paraphrase a distinct token sequence (random
models); a word-level one suits models trained on a closed vocabulary (the organism).
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = (
    "<pad>", "<eos>", "<bos>", "<unk>",
    "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
)

# Gemma 3's template: the image and the question in the user turn, the answer is predicted at
# the start of the model turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tokenizer(words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """A Gemma-3-style tokenizer: character level when `words` is None, else word level.

    Word level lowercases and splits off punctuation; unknown words map to `<unk>`.
    """
    if words is None:
        pieces = [chr(i) for i in range(32, 127)] + ["\n"]
        pre = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        decoder = decoders.Fuse()
        normalizer = None
    else:
        pieces = ["\n", *dict.fromkeys(w.lower() for w in words)]
        pre = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"[^\w\s]"), behavior="isolated"),
        ])
        decoder = decoders.WordPiece(prefix="##", cleanup=True)
        normalizer = normalizers.Lowercase()
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *pieces])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tk.decoder = decoder
    if normalizer is not None:
        tk.normalizer = normalizer
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        padding_side="left",
    )
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    return tok


def build_processor(tokenizer: PreTrainedTokenizerFast, *, image_size: int, image_seq_length: int):
    """A Gemma3Processor over `tokenizer` with the PIL image processor (no torchvision)."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                           chat_template=GEMMA_CHAT_TEMPLATE, image_seq_length=image_seq_length)
