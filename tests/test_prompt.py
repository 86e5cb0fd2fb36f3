"""Prompts of models without a chat template: the template, and the BOS the tokenizer expects."""

from __future__ import annotations

from tokenizers import processors

from mechlora.models import load_model, wrap
from mechlora.models.presets import tiny_gemma3_text
from mechlora.models.tokenizer import build_tokenizer


def plain_tokenizer(adds_bos: bool):
    tok = build_tokenizer()
    tok.chat_template = None
    if adds_bos:
        bos = tok.convert_tokens_to_ids("<bos>")
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", bos)])
    return tok


def test_a_plain_template_starts_with_the_bos_the_tokenizer_adds():
    model, _ = tiny_gemma3_text(n_layers=2)
    tok = plain_tokenizer(adds_bos=True)
    subject = wrap(model, tok, template="Q: {question}\nA:")
    assert subject.prompt("is it?") == "<bos>Q: is it?\nA:"
    ids = subject.encode(["is it?"])["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_no_bos_when_the_tokenizer_adds_none_or_the_chat_template_writes_it():
    model, _ = tiny_gemma3_text(n_layers=2)
    subject = wrap(model, plain_tokenizer(adds_bos=False), template="Q: {question}\nA:")
    assert subject.prompt("is it?") == "Q: is it?\nA:"
    chat = load_model("tiny-gemma3-text", device="cpu")
    ids = chat.encode(["is it?"])["input_ids"][0].tolist()
    assert ids.count(chat.tokenizer.bos_token_id) == 1


def test_load_model_takes_a_template():
    subject = load_model("tiny-gemma3-text", device="cpu", template="Say: {question}")
    assert subject.template == "Say: {question}"
